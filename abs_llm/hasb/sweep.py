"""HASB drivers: calibration batches, the Pareto sweep (PPL per budget) and its plot, and the whole ``abs-llm search``
pipeline (:func:`search_checkpoint`)."""

from __future__ import annotations

import json
import os
import time

import torch

from ..results import DEFAULT_EVAL_CHUNKS
from ..evaluation import evaluate_bits, perplexity, token_windows
from ..switching import allowed_bits, get_bits, model_bytes, require_layers, set_bits, switchable_layers
from .search import average_bits, perturbations, search
from .traces import attach_traces, check_traces, fisher_traces, hessian_traces, load_traces

__all__ = ["calibration_batches", "sweep", "plot_sweep", "layer_table", "search_checkpoint"]

ESTIMATORS = {"fisher": fisher_traces, "hutchinson": hessian_traces}


def calibration_batches(tokenizer, texts, seq_len: int = 128, batch_size: int = 2, n_batches: int = 4):
    """The first ``n_batches * batch_size`` non-overlapping ``seq_len``-token windows of ``texts`` (same tokenization as
    perplexity), as ``n_batches`` LongTensors ``[batch_size, seq_len]``. Short sequences keep the double backward
    affordable on a CPU; pass train-split texts only (calibration must not see the held-out split)."""
    for name, v in (("seq_len", seq_len), ("batch_size", batch_size), ("n_batches", n_batches)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    windows = token_windows(tokenizer, texts, seq_len=seq_len, max_chunks=n_batches * batch_size)
    if windows.shape[0] < n_batches * batch_size:
        raise ValueError(f"calibration texts give {windows.shape[0]} windows of {seq_len} tokens; need "
                         f"{n_batches * batch_size} (use more documents or fewer/shorter batches)")
    return list(windows.split(batch_size))


def sweep(model, tokenizer, traces, texts, avg_bits_list, uniform_bits=None, seq_len: int = 512,
          max_chunks: int | None = None, progress: bool = True) -> dict:
    """Search a map at each average-bits budget and measure its PPL on ``texts``; also PPL of uniform bit-widths.

    Returns ``{"mixed": [{avg_bits_budget, avg_bits, bytes, ppl, search_seconds, bits}], "uniform": [{bits, bytes,
    ppl}], "layers": [names]}``. The model's own bit setting is restored afterwards.
    """
    before = get_bits(model)
    names = list(switchable_layers(model))
    out = {"layers": names, "mixed": [], "uniform": []}
    pert = perturbations(model)  # shared by every budget
    try:
        out["uniform"] = evaluate_bits(model, tokenizer, uniform_bits or [], texts, seq_len, max_chunks, progress)
        for avg in avg_bits_list:
            t = time.perf_counter()
            bit_map = search(model, traces, avg_bits=avg, perturbation=pert)
            secs = time.perf_counter() - t
            set_bits(model, bit_map)
            ppl = perplexity(model, tokenizer, texts, seq_len=seq_len, max_chunks=max_chunks, progress=progress)
            out["mixed"].append({"avg_bits_budget": avg, "avg_bits": average_bits(model, bit_map),
                                 "bytes": model_bytes(model), "ppl": ppl, "search_seconds": secs,
                                 "bits": [bit_map[n] for n in names]})
            if progress:
                print(f"avg bits <= {avg}: achieved {out['mixed'][-1]['avg_bits']:.3f}, PPL {ppl:.3f}", flush=True)
    finally:
        set_bits(model, before)
    return out


def _short(name: str) -> str:
    return name.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")


def plot_sweep(result: dict, path: str | os.PathLike, title: str = "HASB mixed precision") -> str:
    """PNG: PPL vs average bits (mixed curve, uniform markers; log-y) above a heat strip of the per-layer bits of
    each mixed point (rows = budgets, columns = layers in model order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixed, uniform = result["mixed"], result["uniform"]
    if not mixed and not uniform:
        raise ValueError("plot_sweep needs at least one mixed or uniform point")
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(12, 7.5), gridspec_kw={"height_ratios": [3, 2]})
    if mixed:
        ax.plot([r["avg_bits"] for r in mixed], [r["ppl"] for r in mixed], "o-", label="HASB mixed (searched)")
    if uniform:
        ax.plot([r["bits"] for r in uniform], [r["ppl"] for r in uniform], "s--", color="gray", label="uniform")
    ax.set_xlabel("average weight bits")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title)
    if mixed:
        grid = [r["bits"] for r in mixed]
        im = ax2.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax2.set_yticks(range(len(mixed)), [f"{r['avg_bits']:.2f}" for r in mixed])
        ax2.set_ylabel("average bits")
        names = result["layers"]
        step = max(1, len(names) // 30)
        ax2.set_xticks(range(0, len(names), step), [_short(n) for n in names[::step]], rotation=90, fontsize=6)
        ax2.set_title("per-layer bits (model order)")
        fig.colorbar(im, ax=ax2, label="bits")
    else:
        ax2.axis("off")
    fig.tight_layout()
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def layer_table(model, traces, bit_map) -> list[dict]:
    """Rows ``{name, params, trace, bits}`` for the JSON written next to a searched checkpoint."""
    return [{"name": n, "params": m.out_features * m.in_features, "trace": traces[n], "bits": bit_map[n]}
            for n, m in switchable_layers(model).items()]


def search_checkpoint(checkpoint, out, avg_bits: float | None = None, size_bytes: int | None = None,
                      traces=None, recompute: bool = False, method: str = "fisher", calib_docs: int = 250,
                      calib_seq_len: int = 128, calib_batch_size: int = 1, calib_batches: int = 1, n_samples: int = 16,
                      seed: int = 0, sweep_bits=None, split: str = "eval", max_chunks: int | None = None,
                      overwrite: bool = False, tokenizer=None, evaluate: bool = True,
                      eval_chunks: int | None = DEFAULT_EVAL_CHUNKS) -> dict:
    """``abs-llm search``: load a switchable checkpoint, get its layer sensitivities (a traces file, the ones stored in
    the checkpoint, or estimated on the first ``calib_docs`` Lee train documents), search the per-layer map under the
    budget and save it as a checkpoint in ``out`` with ``hasb.json``; with ``sweep_bits`` also ``sweep.json`` and
    ``sweep.png``. The saved checkpoint also gets its own ``eval_results.json`` (PPL of the map and of every width)
    unless ``evaluate`` is False; ``tokenizer`` overrides the checkpoint's (:func:`abs_llm.lineage.load_tokenizer`).
    Returns the report written to ``hasb.json``."""
    from transformers import AutoModelForCausalLM

    from ..data import default_corpus
    from ..saving import prepare_output_dir
    from ..lineage import load_tokenizer

    if avg_bits is None and size_bytes is None and not sweep_bits:
        raise ValueError("give --avg-bits or --size-bytes (or --sweep)")
    if not 1 <= calib_docs <= 250:
        raise ValueError(f"--calib-docs must be in [1, 250] (the train split), got {calib_docs}")
    if method not in ESTIMATORS:
        raise ValueError(f"unknown trace method {method!r}; choose one of {sorted(ESTIMATORS)}")
    out = prepare_output_dir(out, overwrite)
    tok = load_tokenizer(checkpoint, tokenizer)  # a missing tokenizer fails before the model loads
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    require_layers(model)
    report = {"checkpoint": str(checkpoint)}
    stored = getattr(model.config.quantization_config, "hessian_traces", None)
    if traces is not None:
        traces, report["traces_source"] = load_traces(traces), f"file {traces}"
    elif stored and not recompute:
        traces, report["traces_source"] = stored, "checkpoint config"
    else:
        batches = calibration_batches(tok, default_corpus("train")[:calib_docs], calib_seq_len, calib_batch_size,
                                      calib_batches)
        t = time.perf_counter()
        traces = ESTIMATORS[method](model, batches, n_samples=n_samples, seed=seed)
        report["trace_seconds"] = time.perf_counter() - t
        report["traces_source"] = f"estimated ({method}, {n_samples} samples x {calib_batches} batch(es), seed {seed})"
        report["calibration"] = dict(calib_docs=calib_docs, calib_seq_len=calib_seq_len,
                                     calib_batch_size=calib_batch_size, calib_batches=calib_batches,
                                     n_samples=n_samples, seed=seed, method=method)
    traces = check_traces(model, traces, clip=False)
    out.mkdir(parents=True, exist_ok=True)
    if avg_bits is not None or size_bytes is not None:
        t = time.perf_counter()
        bit_map = search(model, traces, avg_bits=avg_bits, size_bytes=size_bytes)
        report["search_seconds"] = time.perf_counter() - t
        set_bits(model, bit_map)
        attach_traces(model, traces)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        report.update(avg_bits=average_bits(model), bytes=model_bytes(model),
                      budget={"avg_bits": avg_bits, "size_bytes": size_bytes},
                      layers=layer_table(model, traces, bit_map))
        if evaluate:
            from ..results import evaluate_and_store

            evaluate_and_store(out, model, tok, eval_chunks)
    report["traces"] = traces
    (out / "hasb.json").write_text(json.dumps(report, indent=2))
    if sweep_bits:
        table = sweep(model, tok, traces, default_corpus(split), sweep_bits, uniform_bits=sorted(allowed_bits(model)),
                      max_chunks=max_chunks)
        (out / "sweep.json").write_text(json.dumps(table, indent=2))
        plot_sweep(table, out / "sweep.png")
    return report
