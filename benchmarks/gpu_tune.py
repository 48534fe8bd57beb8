"""Sweep the Triton kernels' launch configs on a GPU: which (BN, columns per iteration, num_warps, num_stages) and
split-K the GEMV (1 row) and GEMM (16 rows) should offer the run-time tuner (``triton_linear.GEMV_CONFIGS`` /
``GEMM_CONFIGS``).

For each 8B-wide layer shape and width (group-128 scales, bf16 activations) every config x split is timed as in
bench_gpu.py (median of CUDA-graph replays cycling over enough copies of the layer to defeat L2), next to the configs
shipped today and bf16 ``F.linear``. Variants are compiled first in parallel worker processes (Triton's disk cache).
Prints per row the best config and its speed-up over the shipped pick, and a ranking of configs by geometric-mean
slowdown vs each row's best (what to ship: a few configs that are near-best everywhere).

Usage: python benchmarks/gpu_tune.py --out outputs/gpu_tune.json [--budget 240] [--workers 15]
"""

from __future__ import annotations

import argparse
import itertools
import os
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

if "--smoke" in sys.argv:  # CPU + Triton interpreter, tiny shapes, 2 configs per path: checks the script runs
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BITS = (8, 6, 4, 3, 2)
SHAPES = ((14336, 4096), (4096, 14336), (4096, 4096))
GROUP = 128
GEMV_SWEEP = [c for c in itertools.product((16, 32, 64, 128), (256, 512), (4, 8), (1, 2, 3))]
GEMM_SWEEP = [c for c in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (2, 3))]
PATHS = {"gemv": (1, GEMV_SWEEP), "gemm": (16, GEMM_SWEEP)}
DEV = "cuda"
SMOKE = "--smoke" in sys.argv
if "--smoke" in sys.argv:
    SHAPES, BITS, DEV = ((64, 256),), (8, 4, 3), "cpu"
    PATHS = {"gemv": (1, [(32, 256, 4, 2), (16, 256, 4, 1)]), "gemm": (16, [(64, 128, 4, 2)])}


def _layer(n, k, bits):
    import torch

    from abs_llm import core
    from abs_llm.kernels import triton_linear

    w = torch.randn(n, k, device=DEV) * 0.02
    s = core.init_scale(w, 8, GROUP)
    q = core.quantize_master(w, s, 8, GROUP)
    return q, s, triton_linear.TritonLinear(q, s, 8, bits, GROUP)


def compile_task(bits, path, cfgs):
    """Worker: launch each config once (split 1 and 2: SPLIT is not a specialisation key) so it lands in the cache."""
    t, failed = time.time(), 0
    try:
        import torch

        m = PATHS[path][0]
        _, _, lin = _layer(1024, 4096, bits)
        x = torch.randn(m, 4096, device=DEV, dtype=torch.bfloat16)
        y = torch.empty(m, 1024, device=DEV, dtype=torch.bfloat16)
        for cfg in cfgs:
            for split in (1, 2):
                try:
                    lin.launch(x, y, path, cfg, split)
                except Exception:  # noqa: BLE001 - recorded as a failed config in the timing pass
                    failed += 1
        if DEV == "cuda":
            torch.cuda.synchronize()
        return f"w{bits} {path} {len(cfgs)} cfgs", time.time() - t, f"ok ({failed} failed launches)"
    except Exception as e:  # noqa: BLE001
        return f"w{bits} {path}", time.time() - t, f"{type(e).__name__}: {e}"[:200]


def warm(workers, log):
    tasks = []
    for bits in BITS:
        for path, (_, sweep) in PATHS.items():
            for i in range(0, len(sweep), 12):
                tasks.append((bits, path, sweep[i:i + 12]))
    t = time.time()
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
        for f in as_completed([ex.submit(compile_task, *task) for task in tasks]):
            what, dt, msg = f.result()
            if not msg.startswith("ok (0"):
                log(f"  compile {what}: {dt:.0f} s {msg}")
    log(f"compiled {len(tasks)} tasks in {time.time() - t:.0f} s with {workers} processes")


def splits_for(lin, path, cfg, m, sms):
    programs = math.ceil(lin.n / cfg[0])
    auto = min(lin.nblk, max(1, math.ceil(3 * sms / programs)))
    return sorted({1, auto, min(lin.nblk, 2 * auto)})


def sweep_rows(run_left, log, out):
    import torch
    import torch.nn.functional as F
    from gpu_timing import copies_for, time_calls

    from abs_llm.kernels import triton_linear

    dev = torch.device(DEV)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if DEV == "cuda" else 4
    for (n, k), bits in itertools.product(SHAPES, BITS):
        if not run_left():
            log("budget spent: stopping")
            return
        q, s, lin = _layer(n, k, bits)
        copies = [lin] + [triton_linear.TritonLinear(q.clone(), s, 8, bits, GROUP)
                          for _ in range(copies_for(max(lin.nbytes, q.numel()), dev, SMOKE) - 1)]
        wb = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        wcs = [wb] + [wb.clone() for _ in range(copies_for(wb.numel() * 2, dev, SMOKE) - 1)]
        for path, (m, sweep) in PATHS.items():
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            y = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            bf16 = time_calls([lambda c=c: F.linear(x, c) for c in wcs], dev, SMOKE, replays=7)
            shipped = {(tuple(c), sp) for c, sp in lin.candidates(path, m)}
            timed = []
            for cfg in sweep:
                for split in splits_for(lin, path, cfg, m, sms):
                    try:
                        us = time_calls([lambda c=c: c.launch(x, y, path, cfg, split) for c in copies], dev, SMOKE,
                                        replays=7)
                    except Exception:  # noqa: BLE001 - e.g. out of shared memory / registers
                        if DEV == "cuda":
                            torch.cuda.synchronize()
                        continue
                    timed.append({"cfg": list(cfg), "split": split, "us": us, "shipped": (cfg[:3], split) in
                                  {(c[:3], sp) for c, sp in shipped} and cfg[3] == 2})
            if not timed:
                continue
            best = min(timed, key=lambda r: r["us"])
            ship = min((r for r in timed if r["shipped"]), key=lambda r: r["us"], default=None)
            row = {"shape": [n, k], "bits": bits, "path": path, "M": m, "bf16_us": bf16, "best": best,
                   "shipped_us": ship["us"] if ship else None, "timed": timed}
            out.append(row)
            log(f"{n}x{k} w{bits} {path}: best {best['cfg']} split {best['split']} {best['us']:.1f} us "
                f"(shipped {row['shipped_us'] or float('nan'):.1f} us, bf16 {bf16:.1f} us -> "
                f"{bf16 / best['us']:.2f}x)")
        del copies, wcs
        if DEV == "cuda":
            torch.cuda.empty_cache()


def ranking(rows, path, top=8):
    """Configs ordered by the geometric mean over rows of (its best split's time / the row's best time)."""
    per = {}
    for r in (r for r in rows if r["path"] == path):
        best = r["best"]["us"]
        mine = {}
        for t in r["timed"]:
            key = tuple(t["cfg"])
            mine[key] = min(mine.get(key, math.inf), t["us"] / best)
        for key, v in mine.items():
            per.setdefault(key, []).append(v)
    n = max((len(v) for v in per.values()), default=0)
    scored = [(math.exp(statistics.fmean(math.log(x) for x in v)), max(v), key) for key, v in per.items()
              if len(v) == n]
    return sorted(scored)[:top]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/gpu_tune.json")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds after which no new layer starts")
    ap.add_argument("--workers", type=int, default=15)
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes (CI)")
    args = ap.parse_args()
    import torch

    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu (Triton interpreter)"
    log(f"device {name}")
    if not args.smoke:
        warm(args.workers, log)
    rows: list = []
    sweep_rows(lambda: time.time() - t0 < args.budget, log, rows)
    result = {"device": name, "rows": rows,
              "ranking": {p: [dict(cfg=list(k), geomean=g, worst=w) for g, w, k in ranking(rows, p)] for p in PATHS}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for p in PATHS:
        print(f"\n## {p}: configs by geometric-mean slowdown vs each row's best (worst row)")
        for r in result["ranking"][p]:
            print(f"{r['cfg']}: {r['geomean']:.3f} (worst {r['worst']:.3f})")
    print("\n| shape | width | path | best cfg, split | best us | shipped us | bf16 us | best vs bf16 |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape'][0]}x{r['shape'][1]} | w{r['bits']} | {r['path']} | {r['best']['cfg']}, "
              f"{r['best']['split']} | {r['best']['us']:.1f} | {r['shipped_us'] or float('nan'):.1f} | "
              f"{r['bf16_us']:.1f} | {r['bf16_us'] / r['best']['us']:.2f}x |")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
