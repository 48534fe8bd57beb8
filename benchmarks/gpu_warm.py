"""Compile every Triton kernel variant bench_gpu.py will launch, in parallel worker processes, before it starts.

Triton compiles a kernel variant on its first launch (one to a few seconds each, single-threaded); bench_gpu.py
launches ~100 variants (widths x scale kinds x dtypes x GEMV/GEMM configs), which would spend minutes of scarce GPU
time compiling in one process. Each worker here launches, on the same shapes and row counts, every config the tuner
and the self-check will try, so the variants land in Triton's on-disk cache (``~/.triton/cache`` or
``$TRITON_CACHE_DIR``) with the same specialisation keys; the benchmark process then loads them instead of compiling.
Purely an optimisation: a failure here is reported and ignored (the benchmark compiles what is missing).
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

BITS = (8, 6, 4, 3, 2)


def warm_one(shapes, group_size, bits, dtype_names, ms) -> tuple[str, float, str]:
    """Launch every candidate config of one (width, scale kind) on each shape, dtype and row count (worker side)."""
    t = time.time()
    what = f"w{bits} {'channel' if group_size is None else f'group{group_size}'}"
    try:
        import torch

        from abs_llm import core
        from abs_llm.kernels import triton_linear

        dev = torch.device("cuda")
        for n, k in shapes:
            w = torch.randn(n, k, device=dev) * 0.02
            s = core.init_scale(w, 8, group_size)
            q = core.quantize_master(w, s, 8, group_size)
            lin = triton_linear.TritonLinear(q, s, 8, bits, group_size)  # compiles the pack kernel
            for name in dtype_names:
                dt = getattr(torch, name)
                for m in ms:
                    x = torch.randn(m, k, device=dev, dtype=dt)
                    y = torch.empty(m, n, device=dev, dtype=dt)
                    path = "gemv" if m == 1 else "gemm"
                    for cfg, split in lin.candidates(path, m):
                        lin.launch(x, y, path, cfg, split)
                lin.dense(dt)
            torch.cuda.synchronize()
        return what, time.time() - t, "ok"
    except Exception as e:  # noqa: BLE001 - an optimisation only
        return what, time.time() - t, f"{type(e).__name__}: {e}"[:200]


def warm(layer_shapes, selftest_shapes, ms, workers: int = 12, log=print) -> list[tuple[str, float, str]]:
    """Warm-compile in ``workers`` processes: bf16 on every shape; fp16 on the self-test shapes (as it checks)."""
    ms = tuple(sorted(set(ms) | {1, 5, 40}))  # the per-shape self-check runs 1, 5 and 40 rows
    tasks = []
    for g in (None, 128):
        for bits in BITS:
            tasks.append((tuple(layer_shapes), g, bits, ("bfloat16",), ms))
            tasks.append((tuple(selftest_shapes), g, bits, ("bfloat16", "float16"), ms))
    t = time.time()
    out = []
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=get_context("spawn")) as ex:
        futures = [ex.submit(warm_one, *task) for task in tasks]
        for f in as_completed(futures):
            out.append(f.result())
            log(f"  warm {out[-1][0]}: {out[-1][1]:.0f} s {out[-1][2]}")
    log(f"warm-up: {len(tasks)} tasks in {time.time() - t:.0f} s with {min(workers, len(tasks))} processes")
    return out
