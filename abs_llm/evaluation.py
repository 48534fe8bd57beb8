"""Evaluation: perplexity on a list of texts, and plots of perplexity against bit-width and checkpoint size.

Perplexity method (the numbers in BENCHMARKS.md and the CLI use exactly this):

1. The texts are joined with ``"\\n\\n"`` and tokenized once, **without special tokens** (no BOS/EOS is added;
   SmolLM2's tokenizer adds none by default either, so this matches how the model sees plain text).
2. The token stream is cut into **non-overlapping** windows of exactly ``seq_len`` tokens, from the start. The tail
   shorter than ``seq_len`` is dropped. If the whole stream is shorter than one window, it is used as one shorter
   window. ``max_chunks`` keeps only the first N windows.
3. Each window is scored independently (no context carried over), with labels = inputs: every token but the first
   of each window is predicted, so a window of ``L`` tokens contributes ``L - 1`` predictions.
4. ``PPL = exp(total NLL / total predicted tokens)``, the NLL summed in float32 over all windows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["perplexity", "evaluate_bits", "markdown_table", "ppl_table", "plot_ppl", "token_windows", "window_nll"]

_JOIN = "\n\n"


def _as_texts(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a string or a sequence of strings, got {type(texts).__name__}.")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: perplexity needs at least one non-empty text.")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must contain only strings.")
    if not any(t.strip() for t in texts):
        raise ValueError("texts contains only empty strings: perplexity needs at least one non-empty text.")
    return texts


def check_max_chunks(max_chunks) -> None:
    """Refuse a window count no evaluation can use; callers that evaluate after slow work check it first."""
    if max_chunks is not None and (not isinstance(max_chunks, int) or isinstance(max_chunks, bool) or max_chunks < 1):
        raise ValueError(f"max_chunks (evaluation windows) must be None (all) or an integer >= 1, got {max_chunks!r}; "
                         "to skip the evaluation, turn it off instead (evaluate=False, CLI --no-eval).")


def token_windows(tokenizer, texts: Sequence[str] | str, seq_len: int = 512, max_chunks: int | None = None):
    """The windows :func:`perplexity` scores, as a ``LongTensor [n_windows, window_len]`` (see the module doc)."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (a window needs a token to predict), got {seq_len!r}.")
    check_max_chunks(max_chunks)
    texts = _as_texts(texts)
    text = _JOIN.join(texts)
    try:  # verbose=False: the joined corpus may exceed model_max_length; that warning is irrelevant here
        encoded = tokenizer(text, add_special_tokens=False, verbose=False)
    except TypeError as e:
        if "verbose" not in str(e):  # only a tokenizer without the keyword is retried; any other error is the user's
            raise
        encoded = tokenizer(text, add_special_tokens=False)
    ids = torch.as_tensor(encoded["input_ids"], dtype=torch.long).flatten()
    n = ids.numel()
    if n < 2:
        raise ValueError(f"The texts tokenize to {n} token(s); perplexity needs at least 2.")
    if n < seq_len:
        return ids.unsqueeze(0)
    n_windows = n // seq_len
    if max_chunks is not None:
        n_windows = min(n_windows, max_chunks)
    return ids[: n_windows * seq_len].view(n_windows, seq_len)


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.inference_mode()
def window_nll(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> tuple[float, int]:
    """``(summed NLL, number of predicted tokens)`` of ``windows`` (each scored independently, labels = inputs)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    device = _device_of(model)
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64)
    total_tokens = 0
    try:
        for start in tqdm(
            range(0, windows.shape[0], batch_size), desc="perplexity", unit="batch", disable=not progress
        ):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1, :].float()
            targets = batch[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            total_nll += nll.double().cpu()
            total_tokens += targets.numel()
    finally:
        model.train(was_training)
    return total_nll.item(), total_tokens


def perplexity(
    model,
    tokenizer,
    texts: Sequence[str] | str,
    seq_len: int = 512,
    max_chunks: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``texts``: non-overlapping ``seq_len`` windows, ``exp(NLL / predicted tokens)``.

    See the module docstring for the exact method. The model runs in eval mode on its own device (its previous
    train/eval mode is restored afterwards); ``progress=False`` hides the progress bar.
    """
    windows = token_windows(tokenizer, texts, seq_len=seq_len, max_chunks=max_chunks)
    nll, n_tokens = window_nll(model, windows, batch_size=batch_size, progress=progress)
    return math.exp(nll / n_tokens)


def evaluate_bits(model, tokenizer, bits_list, texts, seq_len: int = 512, max_chunks: int | None = None,
                  progress: bool = True, each=None) -> list[dict]:
    """``[{bits, ppl, bytes}]``: perplexity and packed snapshot size at each width of a switchable model, the one loop
    behind ``abs-llm eval``, the demo, the HASB sweep, model cards and the benchmarks. ``each(model, bits)`` may return
    more fields for a row (e.g. a generation). The model's own bit setting is restored afterwards."""
    from .switching import check_bits, get_bits, model_bytes, set_bits

    if not bits_list:
        return []
    bits_list = check_bits(model, list(bits_list))
    before = get_bits(model)
    rows = []
    try:
        for b in bits_list:
            set_bits(model, b)
            row = {"bits": b, "ppl": perplexity(model, tokenizer, texts, seq_len=seq_len, max_chunks=max_chunks,
                                                progress=progress), "bytes": model_bytes(model, b)}
            rows.append(row | (each(model, b) if each else {}))
    finally:
        set_bits(model, before)
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured Markdown table (every table the toolkit prints or writes goes through here)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def ppl_table(rows: Sequence[dict], fp_ppl: float | None = None) -> str:
    """Rows of :func:`evaluate_bits` (``bits`` may be a label such as ``"fp32"``), highest width first, with the change
    against ``fp_ppl`` when given."""
    def order(r):
        return (0, 0) if isinstance(r["bits"], str) else (1, -r["bits"])

    out = []
    for r in sorted(rows, key=order):
        delta = [] if fp_ppl is None else [f"{100 * (r['ppl'] / fp_ppl - 1):+.2f}%"]
        out.append([r["bits"], f"{r['ppl']:.3f}", *delta, f"{r['bytes'] / 1e6:.1f} MB" if "bytes" in r else ""])
    header = ["bits", "PPL"] + ([] if fp_ppl is None else ["delta vs FP"]) + ["size at this width"]
    return markdown_table(header, out)


def _bits_label(bits) -> str:
    return "fp" if isinstance(bits, str) else f"{int(bits)}-bit"


def plot_ppl(rows: Sequence[dict], path: str | os.PathLike, title: str = "Perplexity by bit-width") -> str:
    """Write a PNG with two panels: PPL vs bits, and PPL vs checkpoint bytes (both log-y).

    ``rows``: dicts with ``bits`` (an int, or ``"fp"`` for the float reference), ``ppl`` and ``bytes``. The float
    row is drawn as a dashed reference line in the left panel. Returns ``str(path)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    if not rows:
        raise ValueError("plot_ppl needs at least one row.")
    for row in rows:
        missing = {"bits", "ppl", "bytes"} - set(row)
        if missing:
            raise ValueError(f"Row {row!r} lacks key(s) {sorted(missing)}.")
    int_rows = sorted((r for r in rows if not isinstance(r["bits"], str)), key=lambda r: r["bits"])
    fp_rows = [r for r in rows if isinstance(r["bits"], str)]

    fig, (ax_bits, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4.2))
    if int_rows:
        ax_bits.plot([r["bits"] for r in int_rows], [r["ppl"] for r in int_rows], "o-", label="switchable")
        ax_bits.set_xticks([r["bits"] for r in int_rows])
    for r in fp_rows:
        ax_bits.axhline(r["ppl"], color="gray", linestyle="--", label=f"{r['bits']} ({r['ppl']:.2f})")
    ax_bits.set_xlabel("bits")
    ax_bits.set_ylabel("perplexity (log scale)")
    ax_bits.set_yscale("log")
    ax_bits.set_title("PPL vs bit-width")
    ax_bits.grid(True, which="both", alpha=0.3)
    ax_bits.legend()

    # Markers only: several bit-widths may share one checkpoint (same bytes), so a joining line would mislead.
    seen: dict[float, int] = {}
    for r in sorted(rows, key=lambda r: (r["bytes"], r["ppl"])):
        x = r["bytes"] / 2**20
        k = seen[x] = seen.get(x, -1) + 1  # alternate label sides for points stacked at the same size
        fp = isinstance(r["bits"], str)
        ax_bytes.plot(x, r["ppl"], "s" if fp else "o", color="gray" if fp else "C0")
        ax_bytes.annotate(_bits_label(r["bits"]), (x, r["ppl"]), textcoords="offset points",
                          xytext=(6, 0) if k % 2 == 0 else (-6, 0), ha="left" if k % 2 == 0 else "right",
                          va="center")
    ax_bytes.margins(x=0.15, y=0.1)
    ax_bytes.set_xlabel("checkpoint size (MiB)")
    ax_bytes.set_ylabel("perplexity (log scale)")
    ax_bytes.set_yscale("log")
    ax_bytes.set_title("PPL vs checkpoint size")
    ax_bytes.grid(True, which="both", alpha=0.3)

    fig.suptitle(title)
    fig.tight_layout()
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
