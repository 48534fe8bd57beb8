"""What every benchmark shares: the machine it ran on, the data splits (choose on validation, report held-out once),
and PPL at every width through the library's one per-bit helper."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

# Lee corpus: QAT/calibration data is train docs 0-224, choices are made on 225-249, 250-299 is held out.
SPLITS = {"train_fit": (0, 225), "val": (225, 250)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """CPU, threads, torch, and the GPU when there is one: recorded with every result."""
    info = {"machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def texts(split: str) -> list[str]:
    """``train_fit`` / ``val`` (slices of the Lee train split) or ``eval`` (the held-out split)."""
    from abs_llm.data import default_corpus

    if split == "eval":
        return default_corpus("eval")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS) + ['eval']}")
    lo, hi = SPLITS[split]
    return default_corpus("train")[lo:hi]


def ppl_per_width(model, tok, split: str, bits, max_chunks=None) -> dict[str, float]:
    """``{"w8": ppl, ...}`` for a switchable model, ``{"fp": ppl}`` for a float one (seq_len 512 windows)."""
    from abs_llm.evaluation import evaluate_bits, perplexity
    from abs_llm.switching import switchable_layers

    model.eval()
    with torch.no_grad():
        if not switchable_layers(model):
            return {"fp": perplexity(model, tok, texts(split), seq_len=512, max_chunks=max_chunks)}
        rows = evaluate_bits(model, tok, bits, texts(split), seq_len=512, max_chunks=max_chunks)
    return {f"w{r['bits']}": r["ppl"] for r in rows}
