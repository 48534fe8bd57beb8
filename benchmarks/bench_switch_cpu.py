"""Issue 12, CPU part: cold whole-model switch vs a copy of the masters, fused (numba) vs eager derive + pack.

SmolLM2-135M-Instruct (embedded default), bf16 activations, per-channel and group 64. "cold": the target width is not
cached, so ``set_bits`` derives and packs every layer. "fused": ``kernels/cpu_fused.py`` (one compiled pass per layer);
"eager": the torch-ops path it falls back to (``cpu_fused.ENABLED = False``). Both run in the same process, round-robin
over the repeats (the machine is shared), medians reported; the packed tensors of both are compared (torch.equal) for
every pair. Baselines: "copy" = ``copy_`` of every INT8 master into preallocated buffers, timed right before each
switch (the ratio "x copy" is the median of these paired ratios, so both sides see the same machine load), and
"clone" = ``clone()`` of every master kept alive (allocation + page faults, as a switch pays them too). The first fused
switch of the process (kernels loaded from numba's disk cache) and the compile cost in a fresh process with an empty
cache are reported apart. "ping-pong": switching back and forth between two widths that are both cached (Python
only; median of 101 switches, against the same copy).

Usage: python benchmarks/bench_switch_cpu.py [--repeats 5] [--threads 1,2] [--cache-size N] [--timed fused]
    [--out benchmarks/results/switch_cpu.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from abs_llm import DoubleRoundingConfig, quantize, set_bits, switchable_layers  # noqa: E402
from abs_llm.kernels import cpu_fused  # noqa: E402
from common import machine_info  # noqa: E402

PAIRS = ((8, 4), (4, 2), (2, 8), (8, 6), (6, 3))
VARIANTS = ("fused", "eager")
# cached ping-pong: a pair whose two packs fit the default cache cap together (CACHE_FACTOR)
PING_PONG = {"groupnone": (8, 4), "group64": (4, 2)}
PING_PONG_SWITCHES = 101


def cold_switch(model, layers, src, dst) -> float:
    set_bits(model, src)
    for m in layers:
        m._cache = OrderedDict((k, v) for k, v in m._cache.items() if k[0] == src)
    t = time.perf_counter()
    set_bits(model, dst)
    return time.perf_counter() - t


def packed_tensors(layers, bits):
    return [t for m in layers for k, p in m._cache.items() if k[0] == bits for t in p.tensors]


def copy_all(masters, dsts) -> float:
    t = time.perf_counter()
    for a, b in zip(masters, dsts):
        b.copy_(a)
    return time.perf_counter() - t


def compile_costs(keys) -> dict:
    """Seconds to import numba and to build ``keys`` in a fresh process: with an empty cache (compile) and again with
    the cache it wrote (load)."""
    code = ("import json, sys, time; import abs_llm; from abs_llm.kernels import cpu_fused\n"
            "t = time.perf_counter(); import numba; i = time.perf_counter() - t\n"
            "t = time.perf_counter()\n"
            "for k in json.loads(sys.argv[1]): assert cpu_fused.kernel(*k) is not None\n"
            "print(json.dumps({'numba_import_s': i, 'kernels_s': time.perf_counter() - t}))")
    out = {"kernels": len(keys)}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("compile", "cache_load"):
            r = subprocess.run([sys.executable, "-c", code, json.dumps(keys)], env=env, cwd=ROOT, capture_output=True,
                               text=True, check=True)
            out[label] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def bench(models, repeats: int, cache_size: int | None = None, timed=VARIANTS) -> dict:
    res = {"load_before": os.getloadavg(), "cache_size": cache_size, "timed": list(timed)}
    for key, model in models.items():
        layers = list(switchable_layers(model).values())
        for m in layers if cache_size else ():
            m.cache_size = cache_size
        masters = [m.weight_master for m in layers]
        dsts = [torch.empty_like(m) for m in masters]
        raw = {"clone": [], "copy": [], **{f"{v} {s}->{d}": [] for v in timed for s, d in PAIRS}}
        ratios = {k: [] for k in raw if " " in k}
        exact = {}
        with torch.inference_mode():
            for s, d in PAIRS:  # warm-up, and exactness of fused vs eager on the real model
                got = {}
                for v in VARIANTS:
                    cpu_fused.ENABLED = v == "fused"
                    cold_switch(model, layers, s, d)
                    got[v] = packed_tensors(layers, d)
                exact[f"{s}->{d}"] = len(got["fused"]) == len(got["eager"]) and all(
                    torch.equal(a, b) for a, b in zip(got["fused"], got["eager"]))
            for _ in range(repeats):
                t = time.perf_counter()
                clones = [m.clone() for m in masters]
                raw["clone"].append(time.perf_counter() - t)
                del clones
                for v in timed:
                    cpu_fused.ENABLED = v == "fused"
                    for s, d in PAIRS:  # each switch next to its own copy: the ratio sees the same machine load
                        c = copy_all(masters, dsts)
                        raw["copy"].append(c)
                        raw[f"{v} {s}->{d}"].append(cold_switch(model, layers, s, d))
                        ratios[f"{v} {s}->{d}"].append(raw[f"{v} {s}->{d}"][-1] / c)
            cpu_fused.ENABLED = True
            pair = PING_PONG[key]
            set_bits(model, pair[0])
            set_bits(model, pair[1])
            pp = []
            for i in range(PING_PONG_SWITCHES):
                t = time.perf_counter()
                set_bits(model, pair[i % 2])
                pp.append(time.perf_counter() - t)
            cached = all(any(k[0] == b for k in m._cache) for m in layers for b in pair)
        med = {k: statistics.median(v) for k, v in raw.items()}
        res[key] = {"layers": len(layers), "master_MB": sum(m.numel() for m in masters) / 1e6, "exact": exact,
                    "seconds": med, "x_copy": {k: statistics.median(v) for k, v in ratios.items()},
                    "x_clone": {k: v / med["clone"] for k, v in med.items()}, "raw_seconds": raw,
                    "ping_pong": {"pair": pair, "both_cached": cached, "seconds": statistics.median(pp),
                                  "x_copy": statistics.median(pp) / med["copy"]}}
    res["load_after"] = os.getloadavg()
    return res


def table(res: dict, threads: int) -> str:
    g = [res["groupnone"], res["group64"]]
    head = (f"{threads} thread(s), load average {res['load_before'][0]:.1f} -> {res['load_after'][0]:.1f}"
            + (f", cache size {res['cache_size']}" if res.get("cache_size") else "") + "\n"
            "| switch | per-channel fused | eager | group 64 fused | eager |\n|---|---:|---:|---:|---:|\n"
            + "| copy of the masters | " + " | ".join(
                f"{r['seconds']['copy'] * 1e3:.1f} ms (clone {r['seconds']['clone'] * 1e3:.1f} ms) | " for r in g)
            + " |\n")
    rows = []
    for s, d in PAIRS:
        cells = []
        for r in g:
            for v in VARIANTS:
                k = f"{v} {s}->{d}"
                if k not in r["seconds"]:  # not timed (--timed)
                    cells.append("-")
                    continue
                cells.append(f"{r['seconds'][k] * 1e3:.1f} ms ({r['x_copy'][k]:.1f}x)"
                             + ("" if v == "eager" or r["exact"][f"{s}->{d}"] else " NOT EXACT"))
        rows.append(f"| {s} -> {d} | " + " | ".join(cells) + " |")
    pp = [r["ping_pong"] for r in g]
    rows.append("| ping-pong (both widths cached) | " + " | ".join(
        f"{p['pair'][0]} <-> {p['pair'][1]}: {p['seconds'] * 1e6:.0f} us ({p['x_copy']:.3f}x)"
        f"{'' if p['both_cached'] else ' NOT CACHED'} | " for p in pp) + " |")
    return head + "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, each run in turn")
    ap.add_argument("--out", default="benchmarks/results/switch_cpu.json")
    ap.add_argument("--cache-size", type=int, default=None,
                    help="packed widths each layer keeps (default: SwitchableLinear's, 2); with 1 every cold switch "
                         "evicts the width it leaves before packing")
    ap.add_argument("--timed", default="fused,eager",
                    help="paths timed in the loop (both are still run once and compared for exactness first); "
                         "'fused' alone keeps the eager path's allocations out of the heap the fused switches see")
    args = ap.parse_args()
    timed = [v for v in args.timed.split(",") if v]
    if not timed or set(timed) - set(VARIANTS):
        ap.error(f"--timed takes a comma-separated subset of {','.join(VARIANTS)}, got {args.timed!r}")
    from abs_llm.data import load_default_model

    base, _ = load_default_model()
    base = base.to(torch.bfloat16)
    ids = torch.zeros(1, 4, dtype=torch.long)
    models, first = {}, []
    for g in (None, 64):
        models[f"group{g or 'none'}"] = m = quantize(copy.deepcopy(base), DoubleRoundingConfig(group_size=g))
        with torch.inference_mode():
            m(ids)  # layers learn their activation dtype (bf16): set_bits packs eagerly
            t = time.perf_counter()
            set_bits(m, 4)  # the process's first fused switch: numba import + kernel from numba's disk cache
            first.append(time.perf_counter() - t)
    res = {**machine_info(), "first_switch_8to4_s": first[0], "numba": cpu_fused.kernel(4, "blocked") is not None}
    print(f"{res['machine']}, torch {torch.__version__}, fused path available: {res['numba']}", flush=True)
    for n in (int(x) for x in args.threads.split(",")):
        torch.set_num_threads(n)
        res[f"threads{n}"] = r = bench(models, args.repeats, args.cache_size, timed)
        print(f"\nmedian of {args.repeats}, ms (median of paired ratios to a copy)\n" + table(r, n), flush=True)
    res["compile"] = compile_costs(sorted(cpu_fused._kernels))
    c = res["compile"]
    print(f"\n{c['kernels']} kernels in a fresh process: numba import {c['compile']['numba_import_s']:.2f} s, compile "
          f"{c['compile']['kernels_s']:.2f} s; with the disk cache: {c['cache_load']['kernels_s']:.2f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
