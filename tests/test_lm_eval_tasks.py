"""lm-evaluation-harness at each bit-width with the bundled offline task ``abs_local_ppl``."""

import math

import pytest
import yaml

import abs_llm
from abs_llm import DoubleRoundingConfig
from abs_llm.lm_eval_tasks import LOCAL_TASK, format_lm_eval_table, lm_eval_bits, write_local_task

pytest.importorskip("lm_eval")

DOCS = ["The quick brown fox jumps over the lazy dog. " * 3, "Double rounding derives low bits from one master.",
        "Short text here"]


def char_tokenizer():
    """A byte-free character tokenizer within the tiny model's 128-token vocabulary (no download)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1} | {chr(i): i for i in range(32, 127)} | {"\n": 127}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  eos_token="<eos>", unk_token="<unk>")
    tok.backend_tokenizer.pre_tokenizer = __import__("tokenizers").pre_tokenizers.Split("", "isolated")
    return tok


@pytest.fixture
def qmodel(tiny_llama):
    return abs_llm.quantize(tiny_llama, DoubleRoundingConfig(bits=8, candidate_bits=[8, 4, 2]))


def test_local_task_is_written_with_absolute_paths(tmp_path):
    write_local_task(tmp_path, texts=DOCS)
    text = (tmp_path / f"{LOCAL_TASK}.yaml").read_text()
    cfg = yaml.safe_load(text.replace("!function", "fn"))
    data = cfg["dataset_kwargs"]["data_files"]["test"]
    assert data.startswith("/") and open(data).read().count("\n") == len(DOCS)
    assert [m["metric"] for m in cfg["metric_list"]] == ["word_perplexity", "byte_perplexity", "bits_per_byte"]


def test_lm_eval_runs_per_bit_width(qmodel):
    tok = char_tokenizer()
    rows = lm_eval_bits(qmodel, tok, [8, 2], [LOCAL_TASK], texts=DOCS, max_length=64)
    assert [r["bits"] for r in rows] == [8, 2]
    for r in rows:
        assert set(r) >= {"word_perplexity", "byte_perplexity", "bits_per_byte"}
        assert math.isfinite(r["word_perplexity"]) and r["byte_perplexity"] > 1
        assert r["byte_perplexity"] == pytest.approx(2 ** r["bits_per_byte"], rel=1e-6)
        # same log-likelihood, normalised by words instead of bytes
        n_bytes = sum(len(d.encode()) for d in DOCS)
        n_words = sum(len(d.split()) for d in DOCS)
        assert math.log(r["word_perplexity"]) == pytest.approx(math.log(r["byte_perplexity"]) * n_bytes / n_words,
                                                               rel=1e-6)
    assert rows[0]["bits_per_byte"] != rows[1]["bits_per_byte"]  # the switch really happened
    table = format_lm_eval_table(rows)
    assert "| abs_local_ppl | word_perplexity |" in table and "8-bit | 2-bit" in table


