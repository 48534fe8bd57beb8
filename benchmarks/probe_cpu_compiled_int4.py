"""CPU probe (not a library path): torch's int4 weight-only matmul with many rows, eager vs inductor's AMX template.

``aten._weight_int4pack_mm_for_cpu`` (what ``kernel="int4"`` runs on the CPU) is a GEMV kernel: at M >= 16 it runs at
0.1-0.5x a bf16 ``F.linear`` (BENCHMARKS.md, "CPU with many rows"). torch.compile's max-autotune has a C++ template
for the same op (``CppMicroGemmWoQInt4Amx``: int4 -> bf16 in registers, AMX tiles) that it only picks when the packed
weight is a constant of the graph (``freezing``). This probe times, in one process, bf16 ``F.linear``, the eager op
and the compiled op on one layer per shape and M, and the relative error of both against the fp32 product.

    python benchmarks/probe_cpu_compiled_int4.py --out benchmarks/results/cpu_compiled_int4.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from bench_speed import median_time
from common import machine_info

GROUP = 64


class _Layer(torch.nn.Module):
    def __init__(self, packed, scales_zeros):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)

    def forward(self, x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)


def probe(n: int, k: int, m: int, repeats: int) -> dict:
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    s = torch.rand(k // GROUP, n) * 0.01 + 0.001
    layer = _Layer(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
                   torch.stack([s, torch.zeros_like(s)], -1).to(torch.bfloat16).contiguous()).eval()
    w = ((q.float() - 8) * s.t().to(torch.bfloat16).float().repeat_interleave(GROUP, 1)).to(torch.bfloat16)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(layer, dynamic=False)
    t = time.perf_counter()
    y = compiled(x)
    compile_s = time.perf_counter() - t
    ref = F.linear(x.float(), w.float())

    def rel(z):
        return float((z.float() - ref).norm() / ref.norm())

    bf16 = median_time(lambda: F.linear(x, w), repeats, warmup=3)
    eager = median_time(lambda: layer(x), repeats, warmup=3)
    comp = median_time(lambda: compiled(x), repeats, warmup=3)
    return {"n": n, "k": k, "m": m, "bf16_us": bf16 * 1e6, "eager_us": eager * 1e6, "compiled_us": comp * 1e6,
            "eager_x_bf16": bf16 / eager, "compiled_x_bf16": bf16 / comp, "compile_s": compile_s,
            "rel_err_eager": rel(layer(x)), "rel_err_compiled": rel(y)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1536x576,576x1536,4096x4096,14336x4096", help="out x in, comma list")
    ap.add_argument("--ms", default="1,4,16,64,256", help="rows of the input, comma list")
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import torch._inductor.config as inductor

    inductor.max_autotune = True
    inductor.max_autotune_gemm_backends = "CPP,ATEN"
    inductor.freezing = True  # the template needs the packed weight as a constant of the graph
    # with freezing, a graph cached on disk by an earlier process came back with that process's weights baked in
    # (rel. err. 1.4 at every M that took the template; torch 2.13): compile afresh
    inductor.fx_graph_cache = False
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for m in (int(v) for v in args.ms.split(",")):
            r = probe(n, k, m, args.repeats)
            rows.append(r)
            print(f"{n}x{k} M={m}: bf16 {r['bf16_us']:.0f} us; eager int4 {r['eager_x_bf16']:.2f}x, compiled "
                  f"{r['compiled_x_bf16']:.2f}x bf16 (compile {r['compile_s']:.1f} s); rel. err. "
                  f"{r['rel_err_eager']:.1e} / {r['rel_err_compiled']:.1e}", flush=True)
    res = {**machine_info(), "group_size": GROUP, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
