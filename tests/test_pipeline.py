"""abs_llm.pipeline: the library functions behind ``abs-llm quantize`` and ``abs-llm eval``."""

import json

import pytest

from abs_llm import DoubleRoundingConfig
from abs_llm.pipeline import evaluate_checkpoint, load_checkpoint, quantize_to_dir
from tests.conftest import char_tokenizer


def test_quantize_to_dir_then_evaluate(tiny_llama_dir, tmp_path):
    char_tokenizer().save_pretrained(tiny_llama_dir)
    out = quantize_to_dir(tiny_llama_dir, tmp_path / "q", DoubleRoundingConfig(candidate_bits=[8, 2], group_size=32))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 32
    rows, table = evaluate_checkpoint(out, split="train", seq_len=16, max_chunks=2)
    assert [r["bits"] for r in rows] == [8, 2] and table.splitlines()[0].startswith("| bits | PPL |")


def test_refusals_come_before_any_loading(tiny_llama_dir, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        quantize_to_dir("no/such/model", tmp_path / "busy", DoubleRoundingConfig())
    with pytest.raises(ValueError, match="apply to lm-eval tasks"):
        evaluate_checkpoint("no/such/checkpoint", limit=3)
    with pytest.raises(ValueError, match="is not a switchable"):
        load_checkpoint(tiny_llama_dir)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_an_unusable_eval_window_count_is_refused_before_the_slow_part(tiny_llama_dir, tmp_path, monkeypatch, bad):
    """``eval_chunks`` is used only after quantizing (minutes for GPTQ) or training (hours): a count no evaluation can
    use is refused first, nothing is written, and the message names the way to skip the evaluation."""
    from abs_llm import recipe as recipe_mod
    from tests.conftest import write_recipe

    char_tokenizer().save_pretrained(tiny_llama_dir)
    with pytest.raises(ValueError, match="evaluate=False, CLI --no-eval"):
        quantize_to_dir(tiny_llama_dir, tmp_path / "q", DoubleRoundingConfig(), eval_chunks=bad)
    assert not (tmp_path / "q").exists()
    monkeypatch.setattr(recipe_mod, "build_trainer", lambda *a, **k: pytest.fail("trained before the check"))
    with pytest.raises(ValueError, match="evaluate=False, CLI --no-eval"):
        recipe_mod.train(write_recipe(tmp_path, tiny_llama_dir), output_dir=str(tmp_path / "t"), eval_chunks=bad)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("flag", ["0", "-1", "two"])
def test_cli_eval_chunks_must_be_a_window_count(tiny_llama_dir, tmp_path, capsys, flag):
    from abs_llm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["quantize", str(tiny_llama_dir), "--out", str(tmp_path / "q"), "--eval-chunks", flag])
    assert e.value.code == 2 and "--no-eval" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
