"""A checkpoint's own evaluation (eval_results.json + .md) written by quantize / search / eval --save, tied to its
weights, and the model card built from it by push / push --dry-run."""

import json

import pytest
from transformers import AutoModelForCausalLM

import abs_llm.data
from abs_llm.cli import main
from abs_llm.lm_eval_tasks import LOCAL_TASK
from abs_llm.results import RESULTS_JSON, RESULTS_MD, read_results, weights_fingerprint
from tests.conftest import char_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 30] * 6


@pytest.fixture
def corpus(monkeypatch):
    # the Lee corpus would work too (char tokenizer), but a short text keeps the tiny evaluation to one window
    monkeypatch.setattr(abs_llm.data, "default_corpus", lambda split="train", name="lee": TEXTS)


@pytest.fixture
def fp_dir(tiny_llama_dir):
    char_tokenizer().save_pretrained(tiny_llama_dir)
    return tiny_llama_dir


def test_quantize_stores_its_per_width_evaluation(fp_dir, tmp_path, corpus):
    out = tmp_path / "q"
    assert main(["quantize", str(fp_dir), "--out", str(out), "--candidate-bits", "8,4,2", "--eval-chunks", "2"]) == 0
    data = json.loads((out / RESULTS_JSON).read_text())
    assert data["weights"] == weights_fingerprint(out) and data["source"]["path"] == str(fp_dir.resolve())
    assert [r["bits"] for r in data["ppl"]["rows"]] == [8, 4, 2] and data["ppl"]["max_chunks"] == 2
    assert all(r["ppl"] > 1 and r["bytes"] > 0 for r in data["ppl"]["rows"])
    assert "| 2 |" in (out / RESULTS_MD).read_text()
    assert main(["quantize", str(fp_dir), "--out", str(tmp_path / "n"), "--no-eval"]) == 0
    assert not (tmp_path / "n" / RESULTS_JSON).exists()


def test_results_of_other_weights_are_stale(qckpt, tmp_path, corpus):
    from abs_llm.results import evaluate_and_store
    from abs_llm.switching import switchable_layers

    model = AutoModelForCausalLM.from_pretrained(qckpt)
    evaluate_and_store(qckpt, model, char_tokenizer(), max_chunks=1)
    assert read_results(qckpt)["ppl"]["rows"]
    layer = next(iter(switchable_layers(model).values()))
    layer.weight_master[0, 0] = 1 - layer.weight_master[0, 0]
    model.save_pretrained(qckpt)  # other weights into the same folder: the old file stays but no longer counts
    assert (qckpt / RESULTS_JSON).is_file() and read_results(qckpt) is None


def test_eval_save_adds_lm_eval_and_ppl_sections(qckpt, tmp_path, corpus, capsys):
    pytest.importorskip("lm_eval")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox.\n\nDouble rounding derives low bits from a master.")
    assert main(["eval", str(qckpt), "--max-chunks", "1", "--seq-len", "32", "--save"]) == 0
    assert main(["eval", str(qckpt), "--tasks", LOCAL_TASK, "--limit", "2", "--max-length", "64", "--save"]) == 0
    data = read_results(qckpt)
    assert [r["bits"] for r in data["ppl"]["rows"]] == [8, 4, 2]  # kept when lm-eval results are added
    assert {r["bits"] for r in data["lm_eval"]["rows"]} == {8, 4, 2} and data["lm_eval"]["limit"] == 2
    md = (qckpt / RESULTS_MD).read_text()
    assert "lm-evaluation-harness (abs_local_ppl, limit 2" in md and "bits_per_byte" in md and "| 8 |" in md
    capsys.readouterr()
    assert main(["eval", str(qckpt), "--save", "--split", "train"]) == 2
    assert "--save stores results on the Lee held-out split" in capsys.readouterr().err


def test_push_dry_run_card_has_table_plot_and_base_model(qckpt, tmp_path, corpus, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda *a, **k: pytest.fail("uploaded"))
    cfg = json.loads((qckpt / "config.json").read_text())
    cfg["abs_llm_source"] = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "path": None}
    (qckpt / "config.json").write_text(json.dumps(cfg))
    before = sorted(p.name for p in qckpt.iterdir())
    out = tmp_path / "up"
    assert main(["push", str(qckpt), "--repo-id", "me/tiny", "--dry-run", "--out", str(out), "--eval-chunks", "1"]) == 0
    card = (out / "README.md").read_text()
    assert "\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n" in card.split("---")[1] + "\n"
    assert "| 8 |" in card and "| 4 |" in card and "| 2 |" in card and "![perplexity by bit-width](ppl.png)" in card
    assert (out / "ppl.png").stat().st_size > 1000 and read_results(out) is not None
    assert sorted(p.name for p in qckpt.iterdir()) == before  # measured on the copy: the checkpoint is untouched
    skip = tmp_path / "skip"
    assert main(["push", str(qckpt), "--repo-id", "me/tiny", "--dry-run", "--out", str(skip), "--no-eval"]) == 0
    assert "Evaluation skipped on purpose (`--no-eval`)" in (skip / "README.md").read_text()
    assert not (skip / "ppl.png").exists()


def test_card_uses_stored_results_and_search_map(qckpt, tmp_path, corpus):
    out = tmp_path / "s"
    assert main(["search", str(qckpt), "--avg-bits", "5", "--calib-docs", "2", "--calib-seq-len", "16",
                 "--n-samples", "1", "--out", str(out), "--eval-chunks", "1"]) == 0
    rows = read_results(out)["ppl"]["rows"]
    assert rows[0]["bits"].startswith("map (") and [r["bits"] for r in rows[1:]] == [8, 4, 2]
    from abs_llm.hub import write_model_card

    card = write_model_card(out, out=tmp_path / "card").read_text()
    assert "| map (" in card and "| 2 |" in card and (tmp_path / "card" / "ppl.png").is_file()
