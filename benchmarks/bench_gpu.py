"""Issue 12 benchmark: low-bit Triton kernels vs bf16 ``F.linear``, device bit switching, 8-layer 8B-wide model.

One process, one run (the GPU time is scarce): a self-test of every kernel first (benchmarks/gpu_selftest.py), then

- per layer: every width (8, 6, 4, 3, 2) x scales (per channel, group 128) x M in {1, 4, 16, 64} on 14336x4096,
  4096x14336 and 4096x4096, the kernel ``auto`` picks vs bf16 ``F.linear`` in the same run: median of CUDA-graph
  replays, each graph cycling over enough copies of the layer to exceed 4x the L2 cache (weights come from HBM, as in
  a real model); rel. error (Frobenius) vs the fp32 reference of the derived weight; bandwidth floor = bytes the call
  must read / measured device copy bandwidth; resident bytes per weight (master + packed);
- switching a whole 8-layer model (cold: packed caches dropped; ping-pong: both widths cached) vs a device memcpy of
  every master;
- an 8-layer 8B-wide random Llama (hidden 4096, intermediate 14336, 32/8 heads, vocab 128256; random weights, no
  download): one-token forward in a CUDA graph and HF ``generate`` at w8/w4/w2 vs bf16 (lm_head stays bf16, as
  ``quantize`` leaves it; a ``+head`` row quantizes it too).

A failing row is recorded and the run goes on; after ``--budget`` seconds no new row starts, and the table (printed
last) and the JSON (``--out``) hold what was measured. ``--smoke``: CPU, Triton interpreter, tiny shapes, no CUDA
graphs (checks that the script runs; its timings mean nothing).

Usage: python benchmarks/bench_gpu.py --out outputs/gpu.json   |   python benchmarks/bench_gpu.py --smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

if "--smoke" in sys.argv:  # before anything imports triton (transformers does)
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_gpu_model import head_rows, model_rows, switch_rows  # noqa: E402
from gpu_timing import copies_for, copy_bandwidth, time_calls  # noqa: E402
from gpu_selftest import fq_selftest, selftest  # noqa: E402
from gpu_selftest import table as selftest_table  # noqa: E402

from abs_llm import core, kernels  # noqa: E402

BITS = (8, 6, 4, 3, 2)


class Run:
    """Progress, time guard and failure capture shared by every section."""

    def __init__(self, budget_s: float, device):
        self.t0, self.budget, self.device = time.time(), budget_s, device
        self.errors: list[dict] = []

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.1f}s] {msg}", flush=True)

    def time_left(self) -> bool:
        return time.time() - self.t0 < self.budget

    def guard(self, what: str, fn, *args, **kw):
        if not self.time_left():
            self.errors.append({"row": what, "error": "skipped: time budget spent"})
            return None
        try:
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - one failing row must not end the run
            self.errors.append({"row": what, "error": f"{type(e).__name__}: {e}"[:500],
                                "trace": traceback.format_exc()[-1500:]})
            self.log(f"FAILED {what}: {type(e).__name__}: {e}"[:300])
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            return None


def layer_rows(run: Run, shape, group_size, bw, ms, smoke, results):
    dev, dt = run.device, torch.bfloat16
    request = "triton" if smoke else "auto"  # on CPU auto never picks triton; the smoke run is there to exercise it
    n, k = shape
    gen = torch.Generator(device=dev).manual_seed(n * 7 + k)
    w = torch.randn(n, k, generator=gen, device=dev, dtype=torch.float32) * 0.02
    s = core.init_scale(w, 8, group_size)
    q = core.quantize_master(w, s, 8, group_size)
    xs = {m: torch.randn(m, k, generator=gen, device=dev).to(dt) for m in ms}
    wb = w.to(dt)
    nb = copies_for(wb.numel() * 2, dev, smoke)
    wcopies = [wb] + [wb.clone() for _ in range(nb - 1)]
    base = {m: time_calls([lambda c=c, x=xs[m]: F.linear(x, c) for c in wcopies], dev, smoke) for m in ms}
    del wcopies
    scales = "channel" if group_size is None else f"group{group_size}"
    for bits in (8, 4, 3) if smoke else BITS:
        def one_width(bits=bits):
            kern = kernels.choose(n, k, bits, group_size, dt, dev, request)
            p = kernels.pack_checked(q, s, 8, bits, group_size, dt, dev, kern)
            used = p.kernel
            packed_bytes = p.nbytes
            per_call = packed_bytes if packed_bytes else q.numel()
            copies = [p] + [kernels.pack(q.clone() if bits == 8 else q, s, 8, bits, group_size, dt, dev, used)
                            for _ in range(copies_for(per_call, dev, smoke) - 1)]
            ref_w = core.derived_weight(q, s, 8, bits, group_size, torch.float32)
            for m in ms:
                x = xs[m]
                y = p(x, None)
                err = float((y.float() - x.float() @ ref_w.T).norm() / (x.float() @ ref_w.T).norm())
                us = time_calls([lambda c=c, x=x: c(x, None) for c in copies], dev, smoke)
                read = n * k * (bits / 8 if used == "triton" else 2) + s.numel() * 4 + x.numel() * 2 + m * n * 2
                results["layers"].append(dict(
                    shape=[n, k], scales=scales, bits=bits, M=m, kernel=used, us=us, bf16_us=base[m],
                    speedup=base[m] / us, rel_err=err, floor_us=read / bw * 1e6,
                    resident_bytes_per_weight=(q.numel() + packed_bytes) / q.numel()))
                run.log(f"{n}x{k} {scales} w{bits} M={m}: {used} {us:.1f} us vs bf16 {base[m]:.1f} us "
                        f"= {base[m] / us:.2f}x, err {err:.1e}")
            del copies
        run.guard(f"layer {n}x{k} {scales} w{bits}", one_width)


def summary_table(results) -> str:
    rows = results["layers"]
    ms = sorted({r["M"] for r in rows})
    out = ["| shape | width, scales -> kernel | " + " | ".join(f"M={m} vs bf16" for m in ms) +
           " | M=1 us (floor) | rel. err max | resident B/weight |",
           "|---|---|" + "---:|" * (len(ms) + 3)]
    keys = []
    for r in rows:
        key = (tuple(r["shape"]), r["bits"], r["scales"])
        if key not in keys:
            keys.append(key)
    for shape, bits, scales in keys:
        rs = {r["M"]: r for r in rows if (tuple(r["shape"]), r["bits"], r["scales"]) == (shape, bits, scales)}
        r1 = rs.get(1) or next(iter(rs.values()))
        cells = " | ".join(f"{rs[m]['speedup']:.2f}x" if m in rs else "-" for m in ms)
        out.append(f"| {shape[0]}x{shape[1]} | w{bits} {scales} -> {r1['kernel']} | {cells} | {r1['us']:.1f} "
                   f"({r1['floor_us']:.1f}) | {max(r['rel_err'] for r in rs.values()):.1e} | "
                   f"{r1['resident_bytes_per_weight']:.3f} |")
    return "\n".join(out)


TARGET_M1 = {8: 1.8, 6: 2.1, 4: 3.0, 3: 3.6, 2: 4.5}  # issue 12, M=1 on 14336x4096 and 4096x14336


def targets(results) -> list[str]:
    """The issue's targets against what this run measured (worst case over the two big shapes and both scales)."""
    big = [r for r in results["layers"] if tuple(r["shape"]) in ((14336, 4096), (4096, 14336))]
    out = []
    for bits, goal in TARGET_M1.items():
        m1 = [r["speedup"] for r in big if r["bits"] == bits and r["M"] == 1]
        if m1:
            out.append(f"w{bits} M=1 >= {goal}x: worst {min(m1):.2f}x ({'met' if min(m1) >= goal else 'NOT met'})")
    m16 = [r["speedup"] for r in big if r["M"] == 16]
    if m16:
        out.append(f"M=16 >= 1.0x at every width: worst {min(m16):.2f}x ({'met' if min(m16) >= 1 else 'NOT met'})")
    res = [r["resident_bytes_per_weight"] for r in results["layers"]]
    if res:
        out.append(f"resident bytes/weight < 2 (bf16): worst {max(res):.3f} ({'met' if max(res) < 2 else 'NOT met'})")
    errs = [r["rel_err"] for r in results["layers"]]
    if errs:
        out.append(f"rel. error <= 5e-3: worst {max(errs):.1e} ({'met' if max(errs) <= 5e-3 else 'NOT met'})")
    sw = results.get("switch", {})
    cold = [v["cold_vs_memcpy"] for v in sw.values() if isinstance(v, dict)]
    pp = [v["ping_pong_vs_memcpy"] for v in sw.values() if isinstance(v, dict)]
    if cold:
        out.append(f"switch <= 3x device memcpy: worst {max(cold):.2f}x ({'met' if max(cold) <= 3 else 'NOT met'}); "
                   f"ping-pong <= 0.1x: worst {max(pp):.3f}x ({'met' if max(pp) <= 0.1 else 'NOT met'})")
    for name, goal in (("w4", 2.2), ("w8", 1.6)):
        r = next((r for r in results.get("model", []) if r["setting"] == name and "forward_vs_bf16" in r), None)
        if r:
            out.append(f"one-token forward {name} >= {goal}x: {r['forward_vs_bf16']:.2f}x ({r['timing']}; "
                       f"{'met' if r['forward_vs_bf16'] >= goal else 'NOT met'})")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/bench_gpu.json")
    ap.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes (CI)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds after which no new row starts (default 330; smoke 80)")
    ap.add_argument("--no-model", action="store_true", help="skip the 8-layer model sections")
    ap.add_argument("--warm-workers", type=int, default=12,
                    help="compile the Triton variants in this many processes first (0: compile on first use)")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: threads only add wake-up stalls on a shared machine
    run = Run(args.budget or (80.0 if args.smoke else 330.0), dev)
    import triton
    import transformers

    results = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (Triton interpreter)",
               "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
               "smoke": args.smoke, "layers": [], "errors": run.errors}
    run.log(f"device {results['device']}, torch {torch.__version__}, triton {triton.__version__}")
    torch.manual_seed(0)

    shapes = [(64, 160)] if args.smoke else [(14336, 4096), (4096, 14336), (4096, 4096)]
    ms = (1, 16) if args.smoke else (1, 4, 16, 64)
    st_shapes = ((64, 160),) if args.smoke else ((320, 576), (1024, 4096))
    if dev.type == "cuda" and args.warm_workers > 0:
        from gpu_warm import warm

        results["warm"] = run.guard("warm", warm, shapes, st_shapes, ms, args.warm_workers, run.log)
    st = run.guard("selftest", selftest, dev, shapes=st_shapes, ms=ms, fp16=not args.smoke, log=run.log,
                   tol=1e-2 if args.smoke else 5e-3,  # the interpreter truncates to bf16 (the GPU rounds)
                   deadline=run.t0 + 0.45 * run.budget) or []
    results["selftest"] = st
    fq = run.guard("fake-quant selftest", fq_selftest, dev, shapes=st_shapes, log=run.log) or []
    results["fq_selftest"] = fq
    bw = run.guard("copy bandwidth", copy_bandwidth, dev, args.smoke) or float("nan")
    results["copy_bandwidth_GBps"] = bw / 1e9
    run.log(f"device copy bandwidth {bw / 1e9:.0f} GB/s")
    for shape in shapes:
        for g in (None, 128 if not args.smoke else 64):
            run.guard(f"layer {shape} {g}", layer_rows, run, shape, g, bw, ms, args.smoke, results)
    if not args.no_model:
        run.guard("model", model_rows, run, results, args.smoke)
        run.guard("switch", switch_rows, run, results, args.smoke)
        run.guard("lm_head", head_rows, run, results, args.smoke)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print("\n## Self-test\n" + (selftest_table(st) if st else "(did not run)"))
    print(f"{sum(r['ok'] for r in st)}/{len(st)} kernel checks passed; QAT fake quantization (Triton vs eager): "
          f"{sum(r['ok'] for r in fq)}/{len(fq)}")
    for e in run.errors:
        print(f"ERROR {e['row']}: {e['error']}")
    print(f"\nwrote {args.out}; total {time.time() - run.t0:.0f} s")
    print(f"\n## {results['device']}: per-layer kernels vs bf16 F.linear (median of CUDA-graph replays, same run); "
          f"copy bandwidth {bw / 1e9:.0f} GB/s\n")
    print(summary_table(results))
    results["targets"] = targets(results)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print("\nTargets (issue 12): " + "; ".join(results["targets"]))
    for line in results.get("summary", []):
        print(line)


if __name__ == "__main__":
    main()
