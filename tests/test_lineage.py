"""Checkpoint lineage (``abs_llm_source`` in config.json) and the one tokenizer fallback every verb uses."""

import json

import pytest
from transformers import AutoModelForCausalLM

import abs_llm
from abs_llm import DoubleRoundingConfig
from abs_llm.cli import main
from abs_llm.lineage import describe_source, load_tokenizer, read_source
from tests.conftest import char_tokenizer, load_q


def test_embedded_default_source_comes_from_the_gguf_header(tmp_path):
    from abs_llm.data import DEFAULT_GGUF_FILE

    (tmp_path / ".complete").write_text(f"source: {DEFAULT_GGUF_FILE}\n")  # what default_model_path() leaves
    src = describe_source(tmp_path)
    assert src["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert src["gguf"]["organization"] == "HuggingFaceTB" and src["gguf"]["file"] == DEFAULT_GGUF_FILE
    assert src["gguf"]["size_label"] == "135M" and src["gguf"]["name"]  # the header's own name


def test_quantizing_records_the_source_and_saves_keep_it(tiny_llama_dir, tiny_llama, tmp_path):
    model = load_q(tiny_llama_dir)
    model.save_pretrained(tmp_path / "q")
    assert read_source(tmp_path / "q") == {"base_model": None, "path": str(tiny_llama_dir.resolve())}
    AutoModelForCausalLM.from_pretrained(tmp_path / "q").save_pretrained(tmp_path / "again")  # e.g. search's save
    assert read_source(tmp_path / "again") == read_source(tmp_path / "q")
    assert describe_source("some-org/some-model") == {"base_model": "some-org/some-model", "path": None}
    abs_llm.quantize(tiny_llama, DoubleRoundingConfig())  # built in memory: nothing to record but that
    assert tiny_llama.config.abs_llm_source == {"base_model": None, "path": None}


@pytest.fixture
def bare_ckpt(tiny_llama_dir, tmp_path):
    """A switchable checkpoint saved without a tokenizer, quantized from a float folder without one."""
    load_q(tiny_llama_dir, candidate_bits=[8, 4]).save_pretrained(tmp_path / "bare")
    return tmp_path / "bare"


def test_tokenizer_fallback_order(bare_ckpt, tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError) as e:
        load_tokenizer(bare_ckpt)
    msg = str(e.value)
    assert "\n" not in msg and "holds none" in msg and str(tiny_llama_dir.resolve()) in msg and "--tokenizer" in msg
    char_tokenizer().save_pretrained(tmp_path / "tok")
    assert load_tokenizer(bare_ckpt, tmp_path / "tok").vocab_size == char_tokenizer().vocab_size  # explicit
    char_tokenizer().save_pretrained(tiny_llama_dir)  # now the recorded source model has one
    assert load_tokenizer(bare_ckpt)("ab")["input_ids"] == [ord("a"), ord("b")]
    with pytest.raises(ValueError, match=r"the tokenizer of --tokenizer .* could not be loaded"):
        load_tokenizer(bare_ckpt, tmp_path / "nothing-here")


def test_cli_verbs_stop_with_one_line_naming_the_flag(bare_ckpt, tmp_path, capsys, monkeypatch):
    import abs_llm.data

    monkeypatch.setattr(abs_llm.data, "default_corpus", lambda split="train": ["The quick brown fox. " * 40] * 8)
    commands = [["search", str(bare_ckpt), "--avg-bits", "6", "--out", str(tmp_path / "s")],
                ["eval", str(bare_ckpt)],
                ["push", str(bare_ckpt), "--repo-id", "me/x", "--dry-run", "--out", str(tmp_path / "u")]]
    for argv in commands:
        assert main(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith(f"error: no tokenizer for {bare_ckpt}"), (argv, err)
        assert "Pass --tokenizer PATH_OR_HF_ID" in err[0]
    assert not (tmp_path / "u").exists()  # push refused before copying anything
    char_tokenizer().save_pretrained(tmp_path / "tok")
    assert main(["search", str(bare_ckpt), "--avg-bits", "6", "--calib-docs", "2", "--calib-seq-len", "16",
                 "--n-samples", "1", "--out", str(tmp_path / "s"), "--tokenizer", str(tmp_path / "tok"),
                 "--eval-chunks", "1"]) == 0
    assert (tmp_path / "s" / "tokenizer.json").is_file()  # the searched checkpoint carries the tokenizer it used


def test_quantize_without_a_tokenizer(tiny_llama_dir, tmp_path, capsys):
    assert main(["quantize", str(tiny_llama_dir), "--out", str(tmp_path / "q")]) == 2
    assert "no tokenizer: the model folder" in capsys.readouterr().err
    assert main(["quantize", str(tiny_llama_dir), "--out", str(tmp_path / "q"), "--no-eval"]) == 0  # none needed
    assert json.loads((tmp_path / "q" / "config.json").read_text())["abs_llm_source"]["path"]
