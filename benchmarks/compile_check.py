"""Compile every Triton kernel variant for a CUDA target without a GPU (triton ships ptxas) and report registers,
spills (stack/local bytes) and shared memory: what the interpreter cannot check (``tl.dot`` shapes and dtypes, layouts,
resource limits). Variants: those bench_gpu.py runs (widths 8/6/4/3/2, per-channel and group 128, bf16; GEMV configs,
GEMM row buckets 16 and 64, the dense kernel, the pack kernel, the split-K reduction, and QAT's fused fake
quantization forward and backward).

Usage: python benchmarks/compile_check.py [--arch 90] [--quick]   (``--quick``: a few variants, for CI)
Exit status 1 if a variant fails to compile or spills.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile for real (a test runs this in a subprocess of an interpreted session)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from abs_llm.kernels import layouts, triton_fq, triton_gemm, triton_gemv, triton_linear, triton_pack  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
PTRS = dict(x_ptr="*bf16", y_ptr="*bf16", part_ptr="*fp32", m_ptr="*i8", s_ptr="*fp32")


def usage(kernel) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    out = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", out)
    return dict(zip(("reg", "stack", "shared", "local"), map(int, m.groups()))) if m else {"raw": out[-300:]}


def build(fn, sig, consts, arch, warps):
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=2))


def variants(quick: bool):
    widths = (6, 3) if quick else (8, 6, 4, 3, 2)
    groups = (128,) if quick else (None, 128)
    for bits in widths:
        for g in groups:
            consts, lanes, _ = triton_linear.kernel_consts(bits, 8, g, 4096, 14336)
            pt = "*i8" if consts["MASTER"] else "*i32"
            planes = dict(p0=pt, p1=pt, p2=pt)
            tag = f"w{bits} {'channel' if g is None else f'group{g}'}"
            nb = lambda cols: max(1, cols // (lanes * consts["SEG_"]))  # noqa: E731
            for bn, cols, warps in triton_linear.GEMV_CONFIGS[:1] if quick else triton_linear.GEMV_CONFIGS:
                sig = {**PTRS, **planes, "N": "i32", "K": "i32", "NG": "i32", "NBLK": "i32", "BPS": "i32",
                       "SPLIT": "i32"}
                yield f"gemv {tag} BN={bn}", triton_gemv._gemv_kernel, sig, {**consts, "BN": bn, "NB": nb(cols)}, warps
            for bm in (16,) if quick else (16, 64):
                bn, cols, warps = triton_linear.GEMM_CONFIGS[bm][0]
                sig = {**PTRS, **planes, "M": "i32", "N": "i32", "K": "i32", "stride_x": "i32", "NG": "i32",
                       "NBLK": "i32", "BPS": "i32", "SPLIT": "i32"}
                yield (f"gemm {tag} BM={bm}", triton_gemm._gemm_kernel, sig,
                       {**consts, "BM": bm, "BN": bn, "NB": nb(cols)}, warps)
            if not quick:
                sig = {"w_ptr": "*bf16", "m_ptr": "*i8", "s_ptr": "*fp32", **planes, "N": "i32", "K": "i32",
                       "NG": "i32", "NBLK": "i32"}
                yield f"dense {tag}", triton_gemm._dequant_kernel, sig, {**consts, "BN": 32}, 4
        if bits < 8:
            lay = layouts.Layout(bits, 4096, 14336)
            w, sh = lay.planes3
            sig = {"m_ptr": "*i8", "p0_ptr": "*i32", "p1_ptr": "*i32", "p2_ptr": "*i32", "N": "i32", "K": "i32",
                   "NBLK": "i32"}
            consts = dict(BITS=bits, D=8 - bits, W0=w[0], W1=w[1], W2=w[2], SH0=sh[0], SH1=sh[1], SH2=sh[2],
                          L=lay.lanes, SEG_=layouts.SEG, BN=32)
            yield f"pack w{bits} (all planes)", triton_pack._pack_kernel, sig, consts, 4
    scalars = {k: "fp32" for k in ("inv", "lo_h", "lo", "hi", "step")}
    for cols in (64,) if quick else (64, 128, 4096):  # QAT fake quantization: group 64 / 128, per-channel rows
        br, bc = triton_fq._blocks(cols)
        sig = {"w_ptr": "*fp32", "s_ptr": "*fp32", "out_ptr": "*fp32", "rows": "i32", "cols": "i32", **scalars}
        yield f"fake-quant fwd cols {cols}", triton_fq._fq_fwd, sig, {"BR": br, "BC": bc}, 4
        sig = {"g_ptr": "*fp32", "w_ptr": "*fp32", "s_ptr": "*fp32", "gw_ptr": "*fp32", "gs_ptr": "*fp32",
               "rows": "i32", "cols": "i32", **scalars}
        yield f"fake-quant bwd cols {cols}", triton_fq._fq_bwd, sig, {"BR": br, "BC": bc}, 4
    yield ("reduce", triton_gemv._reduce_kernel, {"part_ptr": "*fp32", "y_ptr": "*bf16", "MN": "i32", "SPLIT": "i32"},
           {"BLOCK": 1024}, 4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    bad, t0 = 0, time.time()
    for name, fn, sig, consts, warps in variants(args.quick):
        t = time.time()
        try:
            u = usage(build(fn, sig, consts, args.arch, warps))
            spill = u.get("stack", 0) or u.get("local", 0)
            bad += bool(spill)
            print(f"{name:<32} {time.time() - t:5.1f} s  {u}{'  SPILLS' if spill else ''}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failing variant, then fail
            bad += 1
            print(f"{name:<32} FAILED: {type(e).__name__}: {str(e)[:400]}", flush=True)
    print(f"{'OK' if not bad else f'{bad} variant(s) failed or spill'}; sm_{args.arch}; {time.time() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
