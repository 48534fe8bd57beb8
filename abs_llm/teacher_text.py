"""Training text sampled from the float teacher (the data-free distillation data of LLM-QAT, Liu et al. 2023).

A recipe's ``data.teacher_text`` section adds (or substitutes) sequences that the float model writes itself, each
started from the first few tokens of a training document: distillation data for a model whose training text is
scarce or private. On the default model it did not pay: per token, the teacher's own text taught the low widths less
than Lee news text did, on Lee and on Wikipedia validation alike (BENCHMARKS.md, "Teacher-generated training text")."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULTS = {"sequences": 200, "tokens": 256, "prompt_tokens": 4, "temperature": 1.0, "seed": 0, "mix": "add"}
MIXES = ("add", "only")
CACHE_NAME = "teacher_text.jsonl"


def settings(section) -> dict:
    """``data.teacher_text`` with its defaults, checked before any model loads."""
    if section is None or section is False:
        return {}
    if section is True:
        section = {}
    if not isinstance(section, dict):
        raise ValueError(f"data.teacher_text must be a mapping such as {{sequences: 200, tokens: 256}}, got "
                         f"{section!r}")
    unknown = set(section) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"data.teacher_text: unknown keys {sorted(unknown)}; allowed {sorted(DEFAULTS)}")
    s = {**DEFAULTS, **section}
    for key in ("sequences", "tokens", "prompt_tokens"):
        if not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < 1:
            raise ValueError(f"data.teacher_text.{key} must be an integer >= 1, got {s[key]!r}")
    if not isinstance(s["temperature"], (int, float)) or not s["temperature"] > 0:
        raise ValueError(f"data.teacher_text.temperature must be a number > 0, got {s['temperature']!r}")
    if s["mix"] not in MIXES:
        raise ValueError(f"data.teacher_text.mix must be one of {MIXES}, got {s['mix']!r}")
    return s


def prompts(tokenizer, docs: list[str], n: int, prompt_tokens: int) -> list[list[int]]:
    """The first ``prompt_tokens`` tokens of ``n`` documents, cycling through ``docs`` (shorter ones are skipped)."""
    heads = [h for h in (tokenizer(d, add_special_tokens=False)["input_ids"][:prompt_tokens] for d in docs)
             if len(h) == prompt_tokens]
    if not heads:
        raise ValueError(f"data.teacher_text: no training document has {prompt_tokens} tokens to start a sequence from")
    return [heads[i % len(heads)] for i in range(n)]


@torch.no_grad()
def sample(model, tokenizer, heads: list[list[int]], tokens: int, temperature: float = 1.0, seed: int = 0,
           batch: int = 100) -> list[list[int]]:
    """Token ids of one sequence per prompt: the prompt, then ``tokens`` new tokens sampled from the full softmax
    (no top-k/top-p, so the text follows the teacher's distribution), special tokens suppressed so every sequence
    fills its length with plain text."""
    gen = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    special = sorted(set(tokenizer.all_special_ids))  # no end-of-text or chat markers inside the training text
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=_bf16_pays(device))
    rows, t0, was_training = [], time.perf_counter(), model.training
    model.eval()
    try:  # generate() samples from the global RNG: seed it per batch from `seed` alone, give the caller's state back
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for start in range(0, len(heads), batch):
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
                ids = torch.tensor(heads[start:start + batch], device=device)
                with autocast:
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                         temperature=float(temperature), top_k=0, top_p=1.0, max_new_tokens=tokens,
                                         pad_token_id=eos, eos_token_id=eos, suppress_tokens=special, use_cache=True)
                rows += out.tolist()
                logger.info("teacher text: %d/%d sequences (%.0f s)", len(rows), len(heads), time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return rows


def _bf16_pays(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from .recipe import native_bf16

    return native_bf16()[0]


def teacher_text(section: dict, model, tokenizer, docs: list[str], cache_dir: str | Path | None) -> list[str]:
    """The sampled sequences for ``section`` (see :func:`settings`), read from ``cache_dir/teacher_text.jsonl`` when
    an earlier run (e.g. before a resume) wrote them with the same settings, model and prompts, else sampled and
    written."""
    heads = prompts(tokenizer, docs, section["sequences"], section["prompt_tokens"])
    key = {**section, "model": getattr(model.config, "_name_or_path", None), "heads": heads}
    cache = Path(cache_dir, CACHE_NAME) if cache_dir else None
    if cache is not None and cache.is_file():
        lines = cache.read_text(encoding="utf-8").splitlines()
        try:
            if lines and json.loads(lines[0]).get("settings") == key:
                return [json.loads(line)["text"] for line in lines[1:]]
        except (json.JSONDecodeError, KeyError, AttributeError):
            pass
        logger.warning("%s was written with other settings or is damaged: sampling the teacher text again", cache)
    home = next(model.parameters()).device
    if home.type == "cpu" and torch.cuda.is_available():  # the recipe's models load on the CPU; sample on the GPU
        model.to(torch.device("cuda", torch.cuda.current_device()))
    try:
        rows = sample(model, tokenizer, heads, section["tokens"], section["temperature"], section["seed"])
    finally:
        model.to(home)
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text("\n".join(json.dumps(r) for r in [{"settings": key}] + [{"text": t} for t in texts]) + "\n",
                       encoding="utf-8")
        tmp.replace(cache)
    return texts
