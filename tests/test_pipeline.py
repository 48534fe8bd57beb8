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
