"""HASB sweep: PPL per budget and per uniform width from one helper, the model's bits restored, the plot drawn."""

import torch

from abs_llm import DoubleRoundingConfig, get_bits, hasb, quantize, set_bits
from tests.conftest import char_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 6, "Double rounding derives low bits from a master. " * 6]


def test_sweep_restores_bits_and_plots(tiny_llama, tmp_path):
    model = quantize(tiny_llama, DoubleRoundingConfig(candidate_bits=[8, 4, 2]))
    set_bits(model, {"model.layers.0.mlp.up_proj": 2})
    before = get_bits(model)
    traces = {n: float(i + 1) for i, n in enumerate(before)}
    out = hasb.sweep(model, char_tokenizer(), traces, TEXTS, [3, 6], uniform_bits=[8, 2], seq_len=32, progress=False)
    assert get_bits(model) == before
    assert [r["bits"] for r in out["uniform"]] == [8, 2] and all(r["ppl"] > 1 for r in out["uniform"])
    assert [r["avg_bits_budget"] for r in out["mixed"]] == [3, 6]
    assert all(r["avg_bits"] <= r["avg_bits_budget"] + 1e-9 for r in out["mixed"])
    assert len(out["mixed"][0]["bits"]) == len(out["layers"]) == 14
    assert hasb.plot_sweep(out, tmp_path / "s.png") and (tmp_path / "s.png").stat().st_size > 1000


def test_calibration_batches_are_the_first_windows():
    tok = char_tokenizer()
    batches = hasb.calibration_batches(tok, TEXTS, seq_len=8, batch_size=2, n_batches=3)
    ids = torch.tensor(tok("\n\n".join(TEXTS), add_special_tokens=False)["input_ids"])
    assert len(batches) == 3 and torch.equal(torch.cat(batches).flatten(), ids[:48])
