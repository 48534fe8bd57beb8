"""Issue 12, CPU part: cold whole-model switch vs a memcpy of the masters, integer derivation vs the former table.

SmolLM2-135M-Instruct (embedded default), bf16 activations, per-channel and group 64. "cold": the target width is not
cached, so ``set_bits`` derives and packs every layer; "memcpy": ``clone()`` of every INT8 master (as in
bench_speed.py; the copy into preallocated buffers, without page faults, is reported too). Both derivations run in
the same process, round-robin over the repeats (the machine is shared); "table" is the 256-entry gather with an int32
index that ``kernels.common.lookup`` used before (kept here to compare).

Usage: python benchmarks/bench_switch_cpu.py [--repeats 5] [--threads N] [--out benchmarks/results/switch_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from abs_llm import DoubleRoundingConfig, core, quantize, set_bits, switchable_layers  # noqa: E402
from abs_llm.kernels import common, cpu  # noqa: E402

PAIRS = ((8, 4), (4, 2), (2, 8), (8, 6), (6, 3))


@lru_cache(maxsize=None)
def _table(master_bits, bits, part, dtype):
    u = torch.arange(256)
    lo, hi = core.qrange(master_bits)
    q = core.derive(torch.where(u >= 128, u - 256, u).clamp(lo, hi).view(1, -1), master_bits, bits).view(-1).long()
    out = {"int8": q * 2 ** (master_bits - bits), "nib": q + 8, "hi": torch.div(q, 16, rounding_mode="floor") + 8,
           "lo": q - 16 * torch.div(q, 16, rounding_mode="floor")}[part]
    return out.to(dtype=dtype)


def table_lookup(q_master, master_bits, bits, part, dtype, out=None):
    idx = q_master.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    res = torch.index_select(_table(master_bits, bits, part, dtype), 0, idx, out=None if out is None else out.view(-1))
    return res.view(q_master.shape)


def cold_switch(model, layers, src, dst) -> float:
    set_bits(model, src)
    for m in layers:
        m._cache = OrderedDict((k, v) for k, v in m._cache.items() if k[0] == src)
    t = time.perf_counter()
    set_bits(model, dst)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/switch_cpu.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from abs_llm.data import load_default_model
    from bench_speed import cpu_name

    base, _ = load_default_model()
    base = base.to(torch.bfloat16)
    ids = torch.zeros(1, 4, dtype=torch.long)
    res = {"machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"{res['machine']}, {res['threads']} threads, torch {torch.__version__}", flush=True)
    for g in (None, 64):
        import copy

        model = quantize(copy.deepcopy(base), DoubleRoundingConfig(group_size=g))
        with torch.inference_mode():
            model(ids)  # layers learn their activation dtype (bf16): set_bits packs eagerly
        layers = list(switchable_layers(model).values())
        masters = [m.weight_master for m in layers]
        dsts = [torch.empty_like(m) for m in masters]
        raw = {"memcpy": [], "copy_into": [], **{f"{v} {s}->{d}": [] for v in ("integer", "table") for s, d in PAIRS}}
        with torch.inference_mode():
            for _ in range(args.repeats):
                t = time.perf_counter()
                [m.clone() for m in masters]
                raw["memcpy"].append(time.perf_counter() - t)
                t = time.perf_counter()
                for a, b in zip(masters, dsts):
                    b.copy_(a)
                raw["copy_into"].append(time.perf_counter() - t)
                for variant, fn in (("integer", common.lookup), ("table", table_lookup)):
                    cpu.lookup = fn
                    for s, d in PAIRS:
                        raw[f"{variant} {s}->{d}"].append(cold_switch(model, layers, s, d))
                cpu.lookup = common.lookup
        med = {k: statistics.median(v) for k, v in raw.items()}
        key = f"group{g or 'none'}"
        res[key] = {"layers": len(layers), "master_MB": sum(m.numel() for m in masters) / 1e6,
                    "seconds": med, "vs_memcpy": {k: v / med["memcpy"] for k, v in med.items()}}
        print(f"\n{key}: {len(layers)} layers, memcpy of masters {med['memcpy'] * 1e3:.1f} ms (clone; "
              f"{med['copy_into'] * 1e3:.1f} ms into preallocated buffers), median of {args.repeats}\n"
              "| switch | integer ms | x memcpy | table ms | x memcpy |\n|---|---:|---:|---:|---:|")
        for s, d in PAIRS:
            a, b = med[f"integer {s}->{d}"], med[f"table {s}->{d}"]
            print(f"| {s} -> {d} | {a * 1e3:.1f} | {a / med['memcpy']:.1f} | {b * 1e3:.1f} | "
                  f"{b / med['memcpy']:.1f} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
