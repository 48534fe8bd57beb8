"""The ``triton`` kernel: packs a width on the device and runs the GEMV (1 row) or GEMM (2+ rows) kernel.

- Switching costs one Triton pass over the master for all planes (:func:`.triton_pack.pack_planes_triton`); at 8 bits
  nothing is packed (the kernels read the int8 master: zero copy), and the scales are never copied (the kernels read
  the master's fp32 scales and apply ``2^d`` themselves). Resident bytes: master + ``bits/8`` per weight.
- Configs are chosen by measurement, once per (path, rows bucket, shape, layout, dtype), among a few candidates that
  also differ in split-K (which changes the buffers, hence a small tuner of our own instead of ``triton.autotune``).
  Nothing is timed while a CUDA graph is being captured or under the interpreter: the first candidate runs.
- Each (width, scales, dtype, shape) is checked once per process against the dequantized reference for 1, 5 and 40
  rows (both kernels, two GEMM tiles); a mismatch raises, so :func:`.dispatch.pack_checked` falls back to ``dequant``.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from .common import Packed, say_once
from .layouts import SEG, layout, pack_planes
from .triton_base import cdiv, interpreting, triton
from .triton_gemm import _dequant_kernel, _gemm_kernel
from .triton_gemv import _gemv_kernel, _reduce_kernel
from .triton_pack import pack_planes_triton

# (BN, input columns per loop iteration, num_warps). Few on purpose: each is one more compile (~1-3 s) per width,
# scale kind and dtype; the split-K candidates that double them are free (a runtime argument). Register use was
# checked by compiling for sm_90 without a GPU (benchmarks/compile_check.py): <= 168 per thread, no spills, except
# the 8-bit master GEMV with BN=64 (211-255), which the tuner can reject for BN=32 (115-128).
# benchmarks/gpu_tune.py swept 48 GEMV and 36 GEMM configs (x 3 splits) on an H200 (benchmarks/results/
# gpu_tune_h200.json): these are the best by geometric mean over 8B-wide shapes and widths (within 4% of each row's
# best); num_stages made no measurable difference; twice the occupancy split was often the best split.
GEMV_CONFIGS = ((64, 256, 4), (64, 512, 4), (32, 512, 4))
GEMM_CONFIGS = {16: ((64, 64, 4), (64, 128, 4)), 64: ((64, 128, 8),)}  # per row bucket (BM); 8 warps: 64x64 acc
DENSE = "dense"  # a GEMM-path candidate: dequantize to a transient weight, then one cuBLAS matmul
DENSE_ROWS = 1024  # above this many rows: transient dequantized weight + F.linear (compute-bound, cuBLAS wins)
# Timing candidates at first use (do_bench on one copy of the layer, which sits in L2 for a 4096x4096 layer) picked
# configs 2-3x slower than the sweep's streaming-from-HBM best on an H200; the first candidate, fixed from the sweep,
# is within 5% (GEMV) / 2% (GEMM) of each shape's best by geometric mean. True: time the candidates anyway.
TUNE = False
TUNED: dict = {}  # key -> (config, split)
CHECKED: dict = {}  # (bits, master_bits, group_size, dtype, n, k, device type) -> None (passed) or error text
FORCE: dict = {}  # tests: {"gemv": (cfg, split), "gemm": (cfg, split)} bypasses the tuner


def _dummy(device) -> torch.Tensor:
    """A float32 pointer for the split-K partials when there is no split (never read or written then): one per device,
    not one allocation per layer per switch."""
    t = _DUMMIES.get(device)
    if t is None:
        t = _DUMMIES[device] = torch.empty(1, dtype=torch.float32, device=device)
    return t


_DUMMIES: dict = {}


@functools.cache  # a switch asks once per layer; callers only read the dict
def kernel_consts(bits, master_bits, group_size, n, k) -> tuple[dict, int, int]:
    """The kernels' constexprs for a layer (see triton_gemv's glossary), its segments per block and block count."""
    if bits == master_bits == 8:  # read the int8 master: 128-column blocks of 32-column segments (16 for group 16)
        seg = 32 if group_size is None or group_size % 32 == 0 else 16
        lanes, nblk, (w, sh) = 128 // seg, math.ceil(k / 128), ((0, 0, 0), (0, 0, 0))
    else:
        lay = layout(bits, n, k)
        seg, lanes, nblk, (w, sh) = SEG, lay.lanes, lay.nblocks, lay.planes3
    consts = dict(MASTER=not w[0], BITS=bits, D=master_bits - bits, W0=w[0], W1=w[1], W2=w[2], SH0=sh[0],
                  SH1=sh[1], SH2=sh[2], L=lanes, SEG_=seg, PER_GROUP=group_size is not None, GS=group_size or 0)
    return consts, lanes, nblk


def _rows_bucket(m: int) -> int:
    """GEMM tile rows (BM). Two buckets only: each is a separate compile."""
    return 1 if m == 1 else 16 if m <= 16 else 64


class TritonLinear:
    """Callable ``(x, bias) -> x @ W_l^T + bias`` over the packed planes (or the master at 8 bits)."""

    def __init__(self, q_master, scale, master_bits, bits, group_size):
        self.n, self.k = q_master.shape
        self.master_bits, self.bits, self.group_size = master_bits, bits, group_size
        self.scale = scale.float().contiguous()
        self.device = q_master.device
        self.consts, self.lanes, self.nblk = kernel_consts(bits, master_bits, group_size, self.n, self.k)
        if self.consts["MASTER"]:
            self.master, self.planes = q_master.contiguous(), ()
        else:
            self.planes = _pack(q_master, master_bits, bits)
            self.master = self.planes[0]  # unused by the kernels at this width; any int pointer will do
        p = self.planes + (self.master,) * (3 - len(self.planes))
        self.ptrs = (self.master, self.scale, p[0], p[1], p[2])
        self.nbytes = sum(t.numel() * t.element_size() for t in self.planes)
        self.sig = (bits, master_bits, group_size, self.n, self.k)
        self.dummy = _dummy(self.device)
        self.chosen: dict = {}
        self.untuned: dict = {}

    # ---- launching ----------------------------------------------------------------------------------------------
    def _split_plan(self, split, nb):
        bps = math.ceil(math.ceil(self.nblk / split) / nb) * nb
        return bps, math.ceil(self.nblk / bps)

    def launch(self, x2, y, path, cfg, split):
        m = x2.shape[0]
        if cfg == DENSE:  # transient dequantized weight + cuBLAS: the tuner's fallback where the GEMM loses to it
            torch.mm(x2, self.dense(x2.dtype).t(), out=y)
            return
        bn, cols_per_iter, warps, *rest = cfg  # (BN, columns per iteration, num_warps[, num_stages])
        stages = rest[0] if rest else 2
        nb = max(1, cols_per_iter // (self.lanes * self.consts["SEG_"]))
        bps, split = self._split_plan(split, nb)
        part = torch.empty(split, m, self.n, dtype=torch.float32, device=x2.device) if split > 1 else self.dummy
        ng = self.scale.shape[1]
        if path == "gemv":
            grid = (cdiv(self.n, bn), split)
            _gemv_kernel[grid](x2, y, part, *self.ptrs, self.n, self.k, ng, self.nblk, bps, split, **self.consts,
                               BN=bn, NB=nb, num_warps=warps, num_stages=stages)
        else:
            bm = _rows_bucket(m)
            grid = (cdiv(self.n, bn), split, cdiv(m, bm))
            _gemm_kernel[grid](x2, y, part, *self.ptrs, m, self.n, self.k, x2.stride(0), ng, self.nblk, bps,
                               split, **self.consts, BM=bm, BN=bn, NB=nb, num_warps=warps, num_stages=stages)
        if split > 1:
            _reduce_kernel[(cdiv(m * self.n, 1024),)](part, y, m * self.n, split, BLOCK=1024, num_warps=4)

    def dense(self, dtype) -> torch.Tensor:
        """``W_l`` in ``dtype`` (transient: not cached, so no float copy stays resident)."""
        w = torch.empty(self.n, self.k, dtype=dtype, device=self.device)
        grid = (cdiv(self.n, 32), self.nblk)
        _dequant_kernel[grid](w, *self.ptrs, self.n, self.k, self.scale.shape[1], self.nblk, **self.consts, BN=32,
                              num_warps=4)
        return w

    def candidates(self, path, m):
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 4
        out = []
        for cfg in GEMV_CONFIGS if path == "gemv" else GEMM_CONFIGS[_rows_bucket(m)]:
            programs = cdiv(self.n, cfg[0]) * (1 if path == "gemv" else cdiv(m, _rows_bucket(m)))
            split = min(self.nblk, max(1, math.ceil(3 * sms / programs)))
            out += [(cfg, s) for s in dict.fromkeys((min(self.nblk, 2 * split), split, 1))]
        return out + ([(DENSE, 1)] if path == "gemm" and self.device.type == "cuda" else [])

    def choose(self, x2, y, path):
        m = x2.shape[0]
        if path in FORCE:
            return FORCE[path]
        mine = (path, _rows_bucket(m), x2.dtype)
        best = self.chosen.get(mine)  # per-layer memo: a decode step must not rebuild and hash the global key
        if best is not None:
            return best
        key = mine + (self.device, self.lanes) + self.sig
        best = TUNED.get(key)
        if best is not None:
            self.chosen[mine] = best
            return best
        if not TUNE or interpreting() or (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            # the first candidate, remembered apart from `chosen` so that turning TUNE on later still times them;
            # not rebuilt per call: candidates() asks the device for its SM count
            first = self.untuned.get(mine)
            if first is None:
                first = self.untuned[mine] = self.candidates(path, m)[0]
            return first
        cands = self.candidates(path, m)
        from triton.testing import do_bench

        timed = []
        for cfg, split in cands:
            try:
                self.launch(x2, y, path, cfg, split)
                timed.append((do_bench(lambda: self.launch(x2, y, path, cfg, split), warmup=2, rep=8), cfg, split))
            except Exception as e:  # a config that does not compile or run (e.g. out of shared memory) is skipped
                say_once(f"abs_llm kernels: triton config {path} {cfg} split {split} failed: {e}", logging.DEBUG)
        if not timed:
            raise RuntimeError(f"no triton {path} config ran for {self.sig}")
        best = min(timed, key=lambda r: r[0])[1:]
        TUNED[key] = self.chosen[mine] = best
        return best

    def __call__(self, x, bias):
        shape = x.shape
        x2 = x.reshape(-1, self.k)
        if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) != self.k):
            x2 = x2.contiguous()
        m = x2.shape[0]
        if m > DENSE_ROWS:
            y = torch.nn.functional.linear(x2, self.dense(x.dtype))
        else:
            y = torch.empty(m, self.n, dtype=x.dtype, device=x.device)
            if m:
                path = "gemv" if m == 1 else "gemm"
                self.launch(x2, y, path, *self.choose(x2, y, path))
        y = y.view(*shape[:-1], self.n)
        return y if bias is None else y + bias.to(y.dtype)


def _pack(q_master, master_bits, bits):
    try:
        return pack_planes_triton(q_master, master_bits, bits)
    except Exception as e:  # the torch packer makes the same words (several passes, still on the device)
        say_once(f"abs_llm kernels: triton pack kernel failed ({e}); packing with torch ops", logging.WARNING)
        return pack_planes(q_master, master_bits, bits)


def self_check(lin: TritonLinear, q_master, dtype) -> None:
    """Compare with the dequantized reference once per (width, scales, dtype, shape); raise on a mismatch."""
    key = lin.sig + (dtype, lin.device.type)
    if key not in CHECKED:
        try:
            CHECKED[key] = _compare(lin, q_master, dtype)
        except Exception as e:
            CHECKED[key] = f"{type(e).__name__}: {e}"
    if CHECKED[key]:
        raise RuntimeError(f"self-check against dequant failed ({CHECKED[key]})")


def _compare(lin, q_master, dtype) -> str | None:
    from .. import core

    w = core.derived_weight(q_master, lin.scale, lin.master_bits, lin.bits, lin.group_size, torch.float32)
    gen = torch.Generator(device=lin.device).manual_seed(0)
    errs = []
    for m in (1, 5, 40):
        x = torch.randn(m, lin.k, generator=gen, device=lin.device).to(dtype)
        ref = x.float() @ w.T
        err = float((lin(x, None).float() - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)
        if not math.isfinite(err) or err > 2e-2:
            errs.append(f"{m} rows: max error {err:.3g} of max|y|")
    return "; ".join(errs) or None


def pack_triton(q_master, scale, master_bits, bits, group_size, dtype, device) -> Packed:
    q = q_master.to(device)
    lin = TritonLinear(q, scale.to(device), master_bits, bits, group_size)
    self_check(lin, q, dtype)
    return Packed("triton", bits, lin, lin.planes, lin.nbytes)
