"""Integration tests on the real embedded default model (SmolLM2-135M-Instruct). Select with `-m integration`."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import abs_llm
from abs_llm import DoubleRoundingConfig, set_bits
from abs_llm.cli import main as cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def default():
    path = abs_llm.default_model_path()
    return path, AutoTokenizer.from_pretrained(path), abs_llm.default_corpus("eval")


def test_int8_master_is_nearly_lossless(default):
    path, tok, texts = default
    fp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    fp_ppl = abs_llm.perplexity(fp, tok, texts, max_chunks=3, progress=False)
    del fp
    qm = AutoModelForCausalLM.from_pretrained(path, quantization_config=DoubleRoundingConfig(bits=8, group_size=64))
    q8 = abs_llm.perplexity(qm, tok, texts, max_chunks=3, progress=False)
    assert abs(q8 / fp_ppl - 1) < 0.005, (fp_ppl, q8)
    set_bits(qm, 4)
    q4 = abs_llm.perplexity(qm, tok, texts, max_chunks=3, progress=False)
    assert q8 < q4 < 3 * fp_ppl  # 4 bits is worse but still a language model (measured: +32% PTQ)


def test_cli_quantize_eval_and_refuse_overwrite(default, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert cli(["quantize", "--out", str(out), "--candidate-bits", "8,4", "--group-size", "128"]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["candidate_bits"] == [8, 4] and cfg["group_size"] == 128
    assert (out / "tokenizer.json").exists()
    src = json.loads((out / "config.json").read_text())["abs_llm_source"]  # lineage from the GGUF header
    assert src["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and src["gguf"]["organization"] == "HuggingFaceTB"
    stored = json.loads((out / "eval_results.json").read_text())["ppl"]["rows"]  # its own per-width evaluation
    assert [r["bits"] for r in stored] == [8, 4] and stored[0]["ppl"] < stored[1]["ppl"]
    capsys.readouterr()
    assert cli(["eval", str(out), "--bits", "8,4", "--max-chunks", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["bits"] for r in rows] == [8, 4] and rows[0]["ppl"] < rows[1]["ppl"]
    assert cli(["quantize", "--out", str(out)]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert cli(["eval", str(out), "--bits", "6"]) == 2
    assert "bits=[6] is not a candidate bit-width; allowed [4, 8]" in capsys.readouterr().err
