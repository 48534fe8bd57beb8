"""abs_llm.evaluation: windows, perplexity (against a manual loop), the per-bit table helper, plots."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from abs_llm.evaluation import perplexity, plot_ppl, token_windows
from tests import conftest


@pytest.fixture(scope="module")
def char_tokenizer():
    return conftest.char_tokenizer()


@pytest.fixture(scope="module")
def ppl_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


class ByteTokenizer:
    """Minimal tokenizer: one token per byte (enough for window arithmetic)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}


TEXTS = ["The cat sat on the mat.", "Double rounding derives low bits from a high-bit master.", "Short one."]


def manual_ppl(model, ids: torch.Tensor, seq_len: int, max_chunks=None) -> float:
    """Reference: an explicit loop over non-overlapping windows, each scored on its own."""
    n_windows = len(ids) // seq_len if len(ids) >= seq_len else 1
    if max_chunks is not None:
        n_windows = min(n_windows, max_chunks)
    total_nll, total_tok = 0.0, 0
    for w in range(n_windows):
        window = ids[w * seq_len : (w + 1) * seq_len]
        with torch.no_grad():
            logits = model(window[None]).logits[0]
        total_nll += F.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
        total_tok += len(window) - 1
    return math.exp(total_nll / total_tok)


def test_windows_are_exact_non_overlapping_prefix(char_tokenizer):
    ids = torch.tensor(char_tokenizer("\n\n".join(TEXTS), add_special_tokens=False)["input_ids"])
    n = len(ids)
    w = token_windows(char_tokenizer, TEXTS, seq_len=16)
    assert w.shape == (n // 16, 16)
    assert torch.equal(w.flatten(), ids[: (n // 16) * 16])  # in order, no overlap, tail dropped
    assert token_windows(char_tokenizer, TEXTS, seq_len=16, max_chunks=2).shape == (2, 16)
    assert token_windows(char_tokenizer, TEXTS, seq_len=16, max_chunks=10_000).shape == (n // 16, 16)
    short = token_windows(char_tokenizer, TEXTS, seq_len=n + 5)  # shorter than one window: one short window
    assert short.shape == (1, n) and torch.equal(short[0], ids)
    assert token_windows(char_tokenizer, TEXTS, seq_len=n).shape == (1, n)


@settings(max_examples=60, deadline=None)
@given(n_chars=st.integers(2, 300), seq_len=st.integers(2, 64), max_chunks=st.one_of(st.none(), st.integers(1, 8)))
def test_window_count_property(n_chars, seq_len, max_chunks):
    w = token_windows(ByteTokenizer(), "x" * n_chars, seq_len=seq_len, max_chunks=max_chunks)
    expected = n_chars // seq_len if n_chars >= seq_len else 1
    if max_chunks is not None:
        expected = min(expected, max_chunks)
    assert w.shape[0] == expected
    assert w.shape[1] == min(seq_len, n_chars)


@pytest.mark.parametrize("seq_len,max_chunks", [(16, None), (16, 2), (32, 1), (1000, None)])
def test_perplexity_matches_manual_loop(ppl_llama, char_tokenizer, seq_len, max_chunks):
    ids = torch.tensor(char_tokenizer("\n\n".join(TEXTS), add_special_tokens=False)["input_ids"])
    got = perplexity(ppl_llama, char_tokenizer, TEXTS, seq_len=seq_len, max_chunks=max_chunks, progress=False)
    want = manual_ppl(ppl_llama, ids, seq_len, max_chunks)
    assert got == pytest.approx(want, rel=1e-5)


def test_perplexity_batch_size_invariant_and_restores_mode(ppl_llama, char_tokenizer):
    a = perplexity(ppl_llama, char_tokenizer, TEXTS, seq_len=8, batch_size=1, progress=False)
    ppl_llama.train()
    try:
        b = perplexity(ppl_llama, char_tokenizer, TEXTS, seq_len=8, batch_size=5, progress=False)
        assert ppl_llama.training  # mode restored
    finally:
        ppl_llama.eval()
    assert a == pytest.approx(b, rel=1e-5)
    # a random model is near-uniform over the 128-token vocabulary
    assert 30 < a < 500


def test_perplexity_bad_inputs(ppl_llama, char_tokenizer):
    kw = dict(progress=False)
    with pytest.raises(ValueError, match="empty"):
        perplexity(ppl_llama, char_tokenizer, [], **kw)
    with pytest.raises(ValueError, match="empty"):
        perplexity(ppl_llama, char_tokenizer, ["", "  "], **kw)
    for bad in (1, 0, -3):
        with pytest.raises(ValueError, match="seq_len"):
            perplexity(ppl_llama, char_tokenizer, TEXTS, seq_len=bad, **kw)
    with pytest.raises(ValueError, match="max_chunks"):
        perplexity(ppl_llama, char_tokenizer, TEXTS, max_chunks=0, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(ppl_llama, char_tokenizer, TEXTS, batch_size=0, **kw)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(ppl_llama, char_tokenizer, ["a"], **kw)
    with pytest.raises(TypeError):
        perplexity(ppl_llama, char_tokenizer, [1, 2], **kw)


def test_plot_ppl_writes_png(tmp_path):
    rows = [
        {"bits": "fp", "ppl": 12.0, "bytes": 538_000_000},
        {"bits": 8, "ppl": 12.1, "bytes": 140_000_000},
        {"bits": 4, "ppl": 15.0, "bytes": 140_000_000},
        {"bits": 2, "ppl": 900.0, "bytes": 140_000_000},
    ]
    out = plot_ppl(rows, tmp_path / "sub" / "ppl.png", title="test")
    with open(out, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_ppl([{"bits": 4, "ppl": 1.0}], tmp_path / "bad.png")


def test_evaluate_bits_rows_table_and_restored_bits(tiny_llama):
    from abs_llm import DoubleRoundingConfig, get_bits, quantize, set_bits
    from abs_llm.evaluation import evaluate_bits, ppl_table
    from tests.conftest import char_tokenizer as saved_tokenizer

    model = quantize(tiny_llama, DoubleRoundingConfig(candidate_bits=[8, 4, 2]))
    set_bits(model, 4)
    tok = saved_tokenizer()
    seen = []
    rows = evaluate_bits(model, tok, [8, 2], TEXTS, seq_len=8, progress=False, each=lambda m, b: seen.append(b) or {})
    assert [r["bits"] for r in rows] == [8, 2] and seen == [8, 2] and get_bits(model) == 4
    set_bits(model, 2)
    assert rows[1]["ppl"] == perplexity(model, tok, TEXTS, seq_len=8, progress=False)
    assert rows[0]["bytes"] > rows[1]["bytes"]
    table = ppl_table(rows + [{"bits": "fp32", "ppl": rows[0]["ppl"], "bytes": 1e6}], fp_ppl=rows[0]["ppl"])
    lines = table.splitlines()
    assert lines[0] == "| bits | PPL | delta vs FP | size at this width |" and lines[2].startswith("| fp32 |")
    assert lines[3].startswith("| 8 |") and "+0.00%" in lines[3] and lines[4].startswith("| 2 |")
    assert evaluate_bits(model, tok, [], TEXTS) == []


def test_tokenizer_errors_are_not_retried_away(char_tokenizer):
    """Only a tokenizer without the ``verbose`` keyword is called again without it; any other TypeError is the
    caller's to see, unchanged."""
    calls = []

    def no_verbose(text, add_special_tokens=False):
        calls.append(text)
        return char_tokenizer(text, add_special_tokens=add_special_tokens)

    assert token_windows(no_verbose, ["hello world"], seq_len=4).shape[1] == 4 and len(calls) == 1

    def broken(text, **kw):
        raise TypeError("expected str, got bytes")

    with pytest.raises(TypeError, match="expected str, got bytes"):
        token_windows(broken, ["hello world"], seq_len=4)
