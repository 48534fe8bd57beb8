"""Issue 3 benchmark: HASB mixed precision on the embedded default model (PTQ checkpoint, before supernet training).

1. Hutchinson traces on the Lee *train* split (first ``--calib-batches x --calib-batch`` windows of ``--calib-seq``
   tokens), ``--samples`` Rademacher vectors; wall time. The estimates from the first 4 and 8 vectors are prefixes of
   the same run, so the stability numbers compare n=4, 8, 16 on identical calibration data.
2. Search wall time (perturbation table once, then the MILP per budget) and the fraction of layers whose bits change
   between the maps from n=4, 8 and 16 samples, at average 3 and 4 bits.
3. Held-out PPL (docs 250-299, seq 512, full split unless --max-chunks): uniform vs searched mixed at 3 and 4 average
   bits, the unweighted ablation (all traces equal: plain perturbation-minimising allocation) at the same budgets,
   and with --sweep the Pareto points for the plot. Nothing here is chosen by looking at the held-out numbers.

Usage: python benchmarks/bench_hasb.py [--samples 16] [--sweep] [--out benchmarks/results/hasb.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import abs_llm
from abs_llm import DoubleRoundingConfig, hasb, set_bits
from abs_llm.evaluation import perplexity
from abs_llm.hasb import calibration_batches, plot_sweep, sweep
from abs_llm.switching import model_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--calib-seq", type=int, default=128)
    ap.add_argument("--calib-batch", type=int, default=2)
    ap.add_argument("--calib-batches", type=int, default=1)
    ap.add_argument("--max-chunks", type=int, default=None)
    ap.add_argument("--method", default="hutchinson", choices=["hutchinson", "fisher"],
                    help="trace estimator: Hutchinson on H (double backward) or Gauss-Newton/Fisher (sampled labels)")
    ap.add_argument("--split", default="eval", choices=["val", "eval"],
                    help="PPL texts: val = Lee train docs 225-249 (for choosing), eval = held-out docs 250-299")
    ap.add_argument("--checkpoint", default=None, help="switchable checkpoint (e.g. after QAT); default: PTQ on load")
    ap.add_argument("--sweep", action="store_true", help="also the Pareto sweep + PNG")
    ap.add_argument("--out", default="benchmarks/results/hasb.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"torch_threads": torch.get_num_threads(), "args": vars(args)}

    def save():
        out.write_text(json.dumps(res, indent=2))

    path = args.checkpoint or abs_llm.default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    cfg = DoubleRoundingConfig(bits=8, candidate_bits=[8, 6, 4, 3, 2], group_size=64)
    model = AutoModelForCausalLM.from_pretrained(path, **({} if args.checkpoint else {"quantization_config": cfg}))
    model.eval()
    set_bits(model, 8)
    res["config"] = {"candidate_bits": cfg.candidate_bits, "group_size": cfg.group_size, "master_bits": 8}
    batches = calibration_batches(tok, common.texts("train_fit"), args.calib_seq, args.calib_batch,
                                  args.calib_batches)

    hist: list[dict] = []
    t = time.perf_counter()
    estimate = hasb.fisher_traces if args.method == "fisher" else hasb.hessian_traces
    traces = estimate(model, batches, n_samples=args.samples, seed=0, history=hist)
    res["trace_seconds"] = time.perf_counter() - t
    res["trace_samples"] = len(hist)
    names = list(traces)
    arr = np.array([[h[n] for n in names] for h in hist])
    ns = [k for k in (4, 8, 16) if k <= len(hist)] or [len(hist)]
    est = {k: dict(zip(names, arr[:k].mean(0).tolist())) for k in ns}
    res["traces"] = est[ns[-1]]
    res["negative_traces"] = {k: int((arr[:k].mean(0) < 0).sum()) for k in ns}
    print(f"traces ({args.method}): {len(hist)} samples in {res['trace_seconds']:.1f} s", flush=True)
    save()

    t = time.perf_counter()
    pert = hasb.perturbations(model)
    res["perturbation_seconds"] = time.perf_counter() - t
    maps, res["milp_seconds"] = {}, {}
    for k in ns:
        for avg in (3, 4):
            t = time.perf_counter()
            maps[k, avg] = hasb.search(model, est[k], avg_bits=avg, perturbation=pert)
            res["milp_seconds"][f"n{k}_avg{avg}"] = time.perf_counter() - t
    res["stability"] = {}
    for avg in (3, 4):
        for a, b in [(x, y) for i, x in enumerate(ns) for y in ns[i + 1:]]:
            changed = np.mean([maps[a, avg][n] != maps[b, avg][n] for n in names])
            res["stability"][f"avg{avg}_n{a}_vs_n{b}"] = float(changed)
    print(json.dumps({k: res[k] for k in ("perturbation_seconds", "milp_seconds", "stability")}, indent=1), flush=True)
    save()

    texts = common.texts(args.split)

    def ppl():
        return perplexity(model, tok, texts, max_chunks=args.max_chunks, progress=False)

    res[f"ppl_{args.split}"] = {}
    final = ns[-1]
    flat = {n: 1.0 for n in names}  # ablation: the same MILP without Hessian weights
    for avg in (3, 4):
        row = {}
        set_bits(model, avg)
        row["uniform"] = {"ppl": ppl(), "bytes": model_bytes(model)}
        set_bits(model, maps[final, avg])
        row["hasb_mixed"] = {"ppl": ppl(), "bytes": model_bytes(model), "avg_bits": hasb.average_bits(model),
                             "bits_histogram": {b: list(maps[final, avg].values()).count(b) for b in (8, 6, 4, 3, 2)}}
        set_bits(model, hasb.search(model, flat, avg_bits=avg, perturbation=pert))
        row["unweighted_mixed"] = {"ppl": ppl(), "avg_bits": hasb.average_bits(model)}
        res[f"ppl_{args.split}"][f"avg{avg}"] = row
        print(f"avg {avg}: {json.dumps(row)}", flush=True)
        save()
    res["bit_maps"] = {f"avg{avg}": maps[final, avg] for avg in (3, 4)}
    save()

    if args.sweep:
        res["sweep"] = sweep(model, tok, res["traces"], texts, [2.5, 3, 3.5, 4, 5, 6], uniform_bits=[2, 3, 4, 6, 8],
                             max_chunks=args.max_chunks, progress=False)
        save()
        plot_sweep(res["sweep"], out.with_suffix(".png"), title="SmolLM2-135M, Lee held-out PPL (PTQ, no supernet)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
