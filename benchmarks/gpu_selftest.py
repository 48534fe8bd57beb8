"""Correctness of every Triton kernel on the device, before any timing: prints a compact pass/fail table.

For each shape, scale kind (per channel, group 128 -- 576 columns are 4.5 groups), width (8, 6, 4, 3, 2) and
activation dtype: the pack kernel's words must equal the torch packer's exactly, and ``y`` for M in {1, 4, 16, 64} must
match the fp32 reference ``x.float() @ W_l.T`` (``W_l`` the dequantized derived weight) within a relative error
(Frobenius) of 5e-3; one CUDA-graph replay must reproduce the eager output bit for bit. Then QAT's Triton fake
quantization against the eager path (:func:`fq_selftest`).

Usage: ``python benchmarks/gpu_selftest.py`` (also the first section of ``bench_gpu.py``).
"""

from __future__ import annotations

import math
import sys
import time

import torch

BITS = (8, 6, 4, 3, 2)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def graph_matches(lin, x) -> bool:
    eager = lin(x, None)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lin(x, None)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = lin(x, None)
    g.replay()
    torch.cuda.synchronize()
    return bool(torch.equal(out, eager))


def selftest(device, shapes=((320, 576), (512, 2048)), ms=(1, 4, 16, 64), fp16=True, log=print,
             tol=5e-3, deadline=None) -> list[dict]:
    """``fp16``: also float16 activations, with group-128 scales at 8, 4 and 3 bits (the code differs from bf16
    only in the dtype, and every case is one more set of compiles). Stops adding cases after ``deadline``."""
    from abs_llm import core
    from abs_llm.kernels import layouts, triton_linear, triton_pack

    rows = []
    for n, k in shapes:
        for g in (None, 128):
            gen = torch.Generator(device=device).manual_seed(n + k)
            w = torch.randn(n, k, generator=gen, device=device)
            s = core.init_scale(w, 8, g)
            q = core.quantize_master(w, s, 8, g)
            for bits in BITS:
                pack_ok = None
                if bits < 8:
                    try:
                        got = triton_pack.pack_planes_triton(q, 8, bits)
                        pack_ok = all(torch.equal(a, b) for a, b in zip(got, layouts.pack_planes(q, 8, bits)))
                    except Exception as e:  # noqa: BLE001 - recorded, never fatal
                        pack_ok = f"{type(e).__name__}: {e}"[:200]
                ref_w = core.derived_weight(q, s, 8, bits, g, torch.float32)
                for dt in (torch.bfloat16, torch.float16) if fp16 else (torch.bfloat16,):
                    if dt == torch.float16 and (g is None or bits not in (8, 4, 3)):
                        continue
                    if deadline is not None and time.time() > deadline:
                        log("  selftest: time is up, remaining cases skipped")
                        return rows
                    row = dict(shape=[n, k], scales="channel" if g is None else f"group{g}", bits=bits,
                               dtype=str(dt)[6:], pack_exact=pack_ok, errors={}, graph=None, failure=None)
                    tune_before = triton_linear.TUNE
                    triton_linear.TUNE = dt == torch.bfloat16  # bf16: run every candidate; fp16: the first only
                    try:
                        lin = triton_linear.TritonLinear(q, s, 8, bits, g)
                        for m in ms:
                            x = torch.randn(m, k, generator=gen, device=device).to(dt)
                            row["errors"][m] = rel_err(lin(x, None), x.float() @ ref_w.T)
                        if dt == torch.float16:  # the many-rows path (dense weight); the interpreter truncates bf16
                            exact = core.derived_weight(q, s, 8, bits, g, torch.float32).to(dt)
                            row["dense_exact"] = bool(torch.equal(lin.dense(dt), exact))
                        if device.type == "cuda":
                            row["graph"] = graph_matches(lin, torch.randn(1, k, device=device, dtype=dt)) and \
                                graph_matches(lin, torch.randn(16, k, device=device, dtype=dt))
                    except Exception as e:  # noqa: BLE001
                        row["failure"] = f"{type(e).__name__}: {e}"[:300]
                    finally:
                        triton_linear.TUNE = tune_before
                    errs = list(row["errors"].values())
                    row["ok"] = (row["failure"] is None and pack_ok in (None, True) and row["graph"] in (None, True)
                                 and row.get("dense_exact", True)
                                 and len(errs) == len(ms) and all(math.isfinite(e) and e <= tol for e in errs))
                    rows.append(row)
                    log(f"  selftest {n}x{k} {row['scales']:>8} w{bits} {row['dtype']}: "
                        f"{'PASS' if row['ok'] else 'FAIL'} {row['failure'] or ''}")
    return rows


def fq_selftest(device, shapes=((320, 576), (1024, 4096)), log=print) -> list[dict]:
    """QAT's Triton fake quantization (``kernels/triton_fq.py``) against the eager path, every width, per channel and
    group 64/128: forward values and weight gradients bit for bit, the scale gradient within float32 rounding of its
    terms. Calls the kernels directly, so a fallback to the eager path cannot pass for a success."""
    from abs_llm import core
    from abs_llm.kernels import triton_fq

    rows = []
    for n, k in shapes:
        for g in (None, 64, 128):
            gen = torch.Generator(device=device).manual_seed(n * k)
            w = torch.randn(n, k, generator=gen, device=device) * 0.02
            s = core.init_scale(w, 8, g) * 0.9
            w2 = core._grouped(w, g).reshape(-1, k if g is None else g).contiguous()
            s1 = s.reshape(-1).contiguous()
            g2 = torch.randn(w2.shape, generator=gen, device=device)
            for bits in BITS:
                row = dict(shape=[n, k], scales="channel" if g is None else f"group{g}", bits=bits, failure=None)
                try:
                    consts = core._consts(8, bits, w2.device, w2.dtype)
                    ref, q, inside = core._fq_forward(w2, s1.view(-1, 1), *consts)
                    ref_gw, ref_gs = core._fq_backward(g2, w2, s1, q, inside, consts[-1])
                    terms = (g2 * q).abs().sum(-1) * consts[-1] + (g2 * w2).abs().sum(-1) / s1
                    out = triton_fq.forward(w2, s1, 8, bits)
                    grads = triton_fq.backward(g2, w2, s1, 8, bits)
                    if out is None or grads is None:
                        raise RuntimeError("the Triton path fell back to eager (see the WARNING above)")
                    row["forward_exact"] = bool(torch.equal(out, ref))
                    row["grad_w_exact"] = bool(torch.equal(grads[0], ref_gw))
                    row["grad_s_rel"] = float(((grads[1] - ref_gs).abs() / terms.clamp_min(1e-30)).max())
                except Exception as e:  # noqa: BLE001 - recorded, never fatal
                    row["failure"] = f"{type(e).__name__}: {e}"[:300]
                row["ok"] = (row["failure"] is None and row["forward_exact"] and row["grad_w_exact"]
                             and row["grad_s_rel"] <= 1e-4)
                rows.append(row)
                log(f"  fake-quant {n}x{k} {row['scales']:>8} w{bits}: {'PASS' if row['ok'] else 'FAIL'} "
                    f"{row['failure'] or ''}")
    return rows


def table(rows) -> str:
    ms = "/".join(str(m) for m in (rows[0]["errors"] if rows else []))
    lines = [f"| shape | scales | width | dtype | pack exact | graph | rel. err M={ms} | result |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        errs = "/".join(f"{e:.1e}" for e in r["errors"].values()) or "-"
        result = "PASS" if r["ok"] else "FAIL " + (r["failure"] or "")
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['scales']} | w{r['bits']} | {r['dtype']} | "
                     f"{r['pack_exact']} | {r['graph']} | {errs} | {result} |")
    return "\n".join(lines)


def main():
    if not torch.cuda.is_available():
        sys.exit("gpu_selftest needs a CUDA device (CI runs the kernels in Triton's interpreter instead)")
    t = time.time()
    rows = selftest(torch.device("cuda"))
    print(table(rows))
    fq = fq_selftest(torch.device("cuda"))
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} kernel checks and {sum(r['ok'] for r in fq)}/{len(fq)} fake-quant "
          f"checks passed in {time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
