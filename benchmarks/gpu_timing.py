"""Timing helpers of bench_gpu.py: CUDA-graph medians, device copy bandwidth, L2-defeating layer copies."""

from __future__ import annotations

import statistics
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fns, device, smoke: bool, replays: int = 15) -> float:
    """Median microseconds per call of ``fns`` (called round-robin): CUDA graph of one pass over all of them."""
    for f in fns:  # eager warm-up: compiles and tunes (never inside a capture)
        f()
    sync(device)
    if smoke or device.type != "cuda":
        ts = []
        for _ in range(1 if smoke else 3):
            t = time.perf_counter()
            for f in fns:
                f()
            ts.append((time.perf_counter() - t) / len(fns))
        return statistics.median(ts) * 1e6
    reps = max(1, 20 // len(fns))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            for f in fns:
                f()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / (reps * len(fns)))
    return statistics.median(ts)


def copy_bandwidth(device, smoke) -> float:
    """Bytes moved (read + write) per second by a large device copy."""
    n = (16 if smoke else 1024) * 2**20
    a = torch.ones(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    us = time_calls([lambda: b.copy_(a)], device, smoke)
    return 2 * n / (us * 1e-6)


def copies_for(nbytes: int, device, smoke: bool) -> int:
    """Distinct copies of a layer to cycle over so that the working set is >= 4x L2 (weights stream from HBM)."""
    if smoke or device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(2, min(32, -(-4 * l2 // max(nbytes, 1))))
