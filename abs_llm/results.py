"""A checkpoint's own evaluation, stored next to its weights: ``eval_results.json`` + ``eval_results.md``.

``quantize``, ``train`` and ``search`` write it right after saving (``--no-eval`` skips); ``abs-llm eval --save`` adds
lm-eval results; the model card (``abs-llm push``) reads it. The JSON holds a fingerprint of the weights (the SHA-256 of
the per-tensor digests in the safetensors headers), so results measured on other weights (a checkpoint re-saved into
the same folder) are recognised as stale and never published as this checkpoint's.

Layout::

    {"format": 1, "weights": "<sha256>", "source": {...},
     "ppl": {"corpus": ..., "seq_len": 512, "max_chunks": 8, "seconds": ..., "rows": [{bits, ppl, bytes}, ...]},
     "lm_eval": {"tasks": [...], "limit": ..., "rows": [{bits, task, metric: value, ...}, ...]}}
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

RESULTS_JSON = "eval_results.json"
RESULTS_MD = "eval_results.md"
DEFAULT_EVAL_CHUNKS = 8  # 8 windows x 512 tokens of the held-out split per width (~4k tokens): cheap, and labelled
CORPUS = "Lee corpus held-out split (docs 250-299)"


def weights_fingerprint(checkpoint) -> str:
    """SHA-256 over the ``abs_llm.digests`` header entry of every ``*.safetensors`` file (no tensor is read)."""
    from .integrity import DIGESTS_KEY, read_header

    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{checkpoint} holds no *.safetensors weights")
    h = hashlib.sha256()
    for f in files:
        meta = read_header(f)[0].get("__metadata__") or {}
        digests = meta.get(DIGESTS_KEY)
        if digests is None:
            raise ValueError(f"{f} has no {DIGESTS_KEY} in its header; re-save it with abs_llm")
        h.update(f.name.encode() + b"\0" + digests.encode() + b"\0")
    return h.hexdigest()


def read_results(checkpoint) -> dict | None:
    """The stored results when they were measured on these weights; ``None`` when absent or stale."""
    path = Path(checkpoint) / RESULTS_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it or re-run `abs-llm eval --save`") from None
    if data.get("weights") != weights_fingerprint(checkpoint):
        logger.warning("%s was measured on other weights (stale); ignoring it", path)
        return None
    return data


def markdown(data: dict) -> str:
    """The Markdown report of stored results: the PPL table and the lm-eval table, whichever exist."""
    from .evaluation import ppl_table
    from .lm_eval_tasks import format_lm_eval_table

    parts = []
    if data.get("ppl"):
        p = data["ppl"]
        span = "every window" if p.get("max_chunks") is None else f"the first {p['max_chunks']} windows"
        parts.append(f"Perplexity on the {p['corpus']}, {span} of {p['seq_len']} tokens "
                     f"(`abs_llm.evaluation.perplexity`):\n\n{ppl_table(p['rows'])}")
    if data.get("lm_eval"):
        e = data["lm_eval"]
        limit = "" if e.get("limit") is None else f", limit {e['limit']} documents per task"
        parts.append(f"lm-evaluation-harness ({', '.join(e['tasks'])}{limit}):\n\n{format_lm_eval_table(e['rows'])}")
    return "\n\n".join(parts)


def write_results(checkpoint, ppl: dict | None = None, lm_eval: dict | None = None) -> Path:
    """Store ``ppl`` and/or ``lm_eval`` sections for ``checkpoint`` (keeping the other section when it is still
    current) and rewrite the Markdown report. Returns the JSON path."""
    from .lineage import read_source

    checkpoint = Path(checkpoint)
    data = read_results(checkpoint) or {}
    data.update(format=1, weights=weights_fingerprint(checkpoint), source=read_source(checkpoint))
    if ppl is not None:
        data["ppl"] = ppl
    if lm_eval is not None:
        data["lm_eval"] = lm_eval
    path = checkpoint / RESULTS_JSON
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (checkpoint / RESULTS_MD).write_text(f"# Evaluation of {checkpoint.name}\n\n{markdown(data)}\n", encoding="utf-8")
    return path


def evaluate_ppl(model, tokenizer, max_chunks: int | None = DEFAULT_EVAL_CHUNKS, seq_len: int = 512,
                 progress: bool = False) -> dict:
    """The ``ppl`` section: PPL at every candidate width on the held-out split (plus the saved per-layer map, if any)."""
    from .data import default_corpus
    from .evaluation import evaluate_bits, perplexity
    from .switching import allowed_bits, get_bits, model_bytes

    texts = default_corpus("eval")
    t = time.perf_counter()
    rows = evaluate_bits(model, tokenizer, allowed_bits(model), texts, seq_len, max_chunks, progress=progress)
    if isinstance(get_bits(model), dict):  # a searched mixed-precision map: also the model as saved
        from .hasb.search import average_bits

        rows.insert(0, {"bits": f"map ({average_bits(model):.2f} avg)", "bytes": model_bytes(model),
                        "ppl": perplexity(model, tokenizer, texts, seq_len, max_chunks, progress=progress)})
    return {"corpus": CORPUS, "seq_len": seq_len, "max_chunks": max_chunks, "rows": rows,
            "seconds": round(time.perf_counter() - t, 1)}


def evaluate_and_store(checkpoint, model, tokenizer, max_chunks: int | None = DEFAULT_EVAL_CHUNKS) -> Path:
    """Measure the ``ppl`` section for a checkpoint just saved from ``model`` and store it next to the weights."""
    return write_results(checkpoint, ppl=evaluate_ppl(model, tokenizer, max_chunks))
