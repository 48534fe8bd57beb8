"""Fused CPU switch: one compiled pass per layer from the int8 master to the bytes a CPU kernel reads (issue 12).

The eager path (:func:`.common.lookup`, then :func:`.cpu.pack_int4_cpu`) derives with six int8 passes
(:func:`.layouts.derive_int`) and packs with several more (nibble planes, the ``_blocked64`` byte transpose): a cold
whole-model switch costs 3-14 copies of the masters (BENCHMARKS.md). Here numba compiles loops that read each master
byte once and write the final bytes, bit-exact with the eager path:

- ``scaled_int8``: ``q_l * 2^d`` as int8 (the ``int8pack`` weight);
- ``int4_blocked``: the nibbles ``q_l + 8`` (``int4pack``, at most 4 bits) or the two halves of
  ``q_l = 16 * (hi - 8) + lo`` (``int4x2``), already in the ``_blocked64`` layout of ``_weight_int4pack_mm_for_cpu``;
- ``int4_scales``: that kernel's bf16 scales and zeros (``s * 2^d`` is an exponent add on the float32 bits).

The derivation runs on the unsigned byte ``u = q + 128``: round half to even of ``u / 2^d`` is
``(u + 2^(d-1) - 1 + ((u >> d) & 1)) >> d`` (as in ``derive_int``) and equals ``round(q / 2^d) + 2^(7-d)``, because
``128 / 2^d`` is an even integer for ``d <= 6``; clamping ``u`` first to ``128 + 2^(h-1) - 2^d`` (which maps to the top
value) keeps every intermediate in ``[0, 255]``. One kernel per shift ``d`` (a compile-time constant: with a run-time
shift LLVM widens the loop to 64-bit lanes and it runs ~5x slower); clamp and offsets are arguments. Kernels run on one
thread (``nogil``).

numba is optional (``pip install abs_llm[fast]``; the ``test`` extra has it): without it, or when a kernel fails to
compile or run, the eager path is used (logged once). Kernels compile on first use (~0.5-1 s each; 15 here, 8 in
:mod:`.cpu_inplace`) and are cached on disk by numba (``NUMBA_CACHE_DIR`` moves the cache). ``ABS_LLM_FUSED=0``
turns the fused path off; :data:`ENABLED` does the same in-process (the benchmark compares both).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from contextlib import contextmanager
from functools import cache

import numpy as np
import torch

from . import cpu_batch
from .common import say_once

ENABLED = os.environ.get("ABS_LLM_FUSED", "1") != "0"
PARTS = ("int8", "nib", "x2")  # outputs: int8pack weight, int4pack nibbles, int4x2 hi + lo nibbles
_lock = threading.Lock()
_kernels: dict = {}
_nb = None  # numba's njit once imported; False when numba is missing or broke


def _njit():
    global _nb
    if _nb is None:
        try:
            from numba import njit

            _nb = njit
        except Exception as e:  # ImportError, or a numba that does not load with this numpy
            _nb = False
            say_once(f"abs_llm kernels: numba unavailable ({type(e).__name__}: {e}); CPU switches derive and pack "
                     "with eager torch ops (several passes; `pip install abs_llm[fast]` for the fused path)")
    return _nb


def _disable(why: str) -> None:
    global _nb
    _nb = False
    say_once(f"abs_llm kernels: fused CPU packing failed ({why}); using the eager path", logging.WARNING)


@cache  # a switch asks once per layer
def constants(master_bits: int, bits: int, part: str) -> dict:
    """The numbers one kernel call needs (numpy uint8, so the loops stay in narrow lanes). ``d`` is compiled into
    the kernel; ``umax`` (the clamp, by master bits), ``off`` and ``planes`` (by output) are arguments."""
    d = master_bits - bits
    if not (0 <= d <= 6 and bits >= 1 and master_bits <= 8) or part not in PARTS:
        raise ValueError(f"no fused kernel for {bits} bits from a {master_bits}-bit master, part {part!r}")
    lift = 2 ** (7 - d)  # the u-domain result is q_l + lift; adding off makes it q_l + 8 (mod 16) or q_l + 128
    off = {"int8": 0, "nib": (8 - lift) % 16, "x2": 128 - lift}[part]
    return {"d": d, "umax": np.uint8(128 + 2 ** (master_bits - 1) - 2**d), "off": np.uint8(off),
            "planes": 2 if part == "x2" else 1}


def _build(d: int, layout: str):
    """Compile (or load from numba's disk cache) the ``"int8"`` or ``"blocked"`` kernel for one shift ``d``."""
    njit = _njit()
    u8 = np.uint8
    d, half, parity = u8(d), u8((2**d - 1) >> 1), u8(1 if d else 0)
    f15, four, flip = u8(15), u8(4), u8(128)
    sh16, sh32, sh48 = np.uint64(16), np.uint64(32), np.uint64(48)

    # explicit signatures: compile (or load from the cache) now, inside kernel()'s try, not at the first call
    if layout == "int8":
        @njit("void(uint8[::1], uint8, uint8[::1])", cache=True, nogil=True)
        def scaled(q, umax, out):  # flat uint8 views; out = q_l * 2^d as int8 bytes
            for i in range(q.shape[0]):
                u = min(q[i] ^ flip, umax)
                r = (u + half + ((u >> d) & parity)) >> d
                out[i] = np.uint8((r << d) ^ flip)

        return scaled

    @njit("void(uint8[:, ::1], uint8, uint8, int64, uint8[:, :, ::1])", cache=True, nogil=True)
    def blocked(q, umax, off, planes, out):
        # q (n, k) master bytes, n % 64 == 0; out (planes * n // 64, k, 32): in block b, byte j of column i holds the
        # nibble of row 64b + j (low) and of row 64b + j + 32 (high); int4x2 (planes 2) writes the hi blocks, then
        # the lo blocks. Per block of 64 rows: derive (one contiguous pass over the master), then the byte transpose
        # in widening steps (2 output bytes per uint16, then 8 per uint64), loops over cache-resident rows.
        n, k = q.shape
        nb = n // 64
        v = np.empty((64, k), np.uint8)  # the block's rows derived: q_l + 8 (mod 16), or q_l + 128 for int4x2
        t1 = np.empty((16, k), np.uint16)
        for b in range(nb):
            for j in range(64):
                src, dst = q[b * 64 + j], v[j]
                for i in range(k):
                    u = min(src[i] ^ flip, umax)
                    dst[i] = np.uint8(((u + half + ((u >> d) & parity)) >> d) + off)
            for h in range(planes):  # int4x2: the hi nibbles (v >> 4), then the lo ones (v & 15)
                for p in range(16):
                    a0, a1, c0, c1, row = v[2 * p], v[2 * p + 32], v[2 * p + 1], v[2 * p + 33], t1[p]
                    if planes == 2 and h == 0:
                        for i in range(k):
                            row[i] = (np.uint16((a0[i] >> four) | ((a1[i] >> four) << four))
                                      | (np.uint16((c0[i] >> four) | ((c1[i] >> four) << four)) << np.uint16(8)))
                    else:
                        for i in range(k):
                            row[i] = (np.uint16((a0[i] & f15) | ((a1[i] & f15) << four))
                                      | (np.uint16((c0[i] & f15) | ((c1[i] & f15) << four)) << np.uint16(8)))
                # 4 rows of uint16 into one uint64, stored straight into the column's 32 bytes: one loop with four
                # adjacent stores per column through a flat view (~20% faster than a (4, k) step then a scatter)
                o = out[b + h * nb].reshape(-1).view(np.uint64)  # column i: o[4i:4i+4] = 8 consecutive j each
                for i in range(k):
                    for p in range(4):
                        o[4 * i + p] = (np.uint64(t1[4 * p, i]) | (np.uint64(t1[4 * p + 1, i]) << sh16)
                                        | (np.uint64(t1[4 * p + 2, i]) << sh32) | (np.uint64(t1[4 * p + 3, i]) << sh48))

    return blocked


def _build_scales():
    njit = _njit()

    @njit("boolean(float32[:, ::1], int64, int64[::1], int64[::1], uint16[:, :, ::1])", cache=True, nogil=True)
    def scales(scale, rep, mexp, zexp, out):
        # out (in // g, planes * rows, 2) bf16 bits: plane h of kernel group c holds [s, z] with s = scale[r, c // rep]
        # * 2^mexp[h] and z = s * 2^zexp[h] (zexp < 0: z = s * 0), rounded to bf16 to nearest even as torch does.
        # Multiplying a normal float32 by a power of two adds to its exponent field: integer ops, exact, and the same
        # bits as pack_int4's eager float32 ops. False (use the eager path): a subnormal, inf or NaN scale, or a
        # result that would leave the normal range (checked first, in its own loop: a check inside the main loop
        # stops LLVM from vectorising it).
        rows, planes = scale.shape[0], mexp.shape[0]
        flat = scale.reshape(-1).view(np.uint32)
        emax, nsub = np.uint32(0), np.uint32(0)
        for i in range(flat.shape[0]):
            a = flat[i] & np.uint32(0x7FFFFFFF)
            emax = max(emax, a >> np.uint32(23))
            nsub += np.uint32((a - np.uint32(1)) < np.uint32(0x7FFFFF))
        for h in range(planes):
            if nsub or emax > 254 - mexp[h] - max(zexp[h], 0):
                return False
        st = scale.T.copy().view(np.uint32).reshape(-1)  # (n_groups, rows): contiguous reads below
        o = out.reshape(-1).view(np.uint32)  # one [s, z] pair per uint32 (little endian: s low)
        for c in range(out.shape[0]):
            s0 = (c // rep) * rows
            for h in range(planes):
                add, zadd = np.uint32(mexp[h] << 23), np.uint32(max(zexp[h], 0) << 23)
                keep = np.uint32(0xFFFFFFFF) if zexp[h] >= 0 else np.uint32(0x80000000)
                d0 = (c * planes + h) * rows
                src, dst = st[s0:s0 + rows], o[d0:d0 + rows]
                for r in range(rows):
                    x = src[r]
                    nz = np.uint32(0) - np.uint32((x & np.uint32(0x7FFFFFFF)) != np.uint32(0))  # +-0 stays itself
                    v = x + (add & nz)
                    z = (v + (zadd & nz)) & keep
                    hv = (v + np.uint32(0x7FFF) + ((v >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                    hz = (z + np.uint32(0x7FFF) + ((z >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
                    dst[r] = hv | hz
        return True

    return scales


def kernel(d: int, layout: str):
    """The compiled ``"int8"`` / ``"blocked"`` / ``"x2_from_master"`` kernel for shift ``d`` (or ``"scales"`` /
    ``"rescale"``, ``d`` unused); ``None`` when the fused path is off, numba is missing, or compiling failed."""
    if not ENABLED or _nb is False:
        return None
    key = (d, layout)
    fn = _kernels.get(key)
    if fn is None:
        with _lock:
            fn = _kernels.get(key)
            if fn is None and _njit():
                try:
                    if layout == "scales":
                        fn = _build_scales()
                    elif layout in ("rescale", "x2_from_master"):
                        from . import cpu_inplace  # it imports this module

                        fn = cpu_inplace.build_rescale(_njit()) if layout == "rescale" \
                            else cpu_inplace.build_x2_from_master(_njit(), d)
                    else:
                        fn = _build(d, layout)
                    _kernels[key] = fn
                except Exception as e:  # a numba/LLVM problem must not take the model down
                    _disable(f"{type(e).__name__}: {e}")
                    return None
    return fn


def _call(fn, args: tuple, fallback=None) -> bool:
    """Run ``fn(*args)`` now, or queue it when a switch's :func:`.cpu_batch.batch` is open (``fallback()`` then runs
    if ``fn`` returns ``False``). ``False``: it raised (the fused path is then off) or refused its input (the scales
    kernel: the caller takes the eager path)."""
    b = cpu_batch.current()
    if b is not None:
        b.submit(fn, args, fallback)
        return True
    try:
        return fn(*args) is not False
    except Exception as e:
        _disable(f"{type(e).__name__}: {e}")
        return False


@contextmanager
def switch_batch(threads: int):
    """:func:`.cpu_batch.batch`, turning the fused path off if a queued call failed. Yields the batch (``None``: not
    batched); after the block, a batch with ``errors`` wrote outputs that must not be used: pack them again."""
    with cpu_batch.batch(threads) as b:
        yield b
    if b is not None and b.errors:
        _disable(f"{type(b.errors[0]).__name__}: {b.errors[0]}")


def _bytes(q_master: torch.Tensor) -> np.ndarray:
    return q_master.detach().contiguous().view(torch.uint8).numpy()


def scaled_int8(q_master: torch.Tensor, master_bits: int, bits: int) -> torch.Tensor | None:
    """``q_l * 2^d`` as int8 ``(out, in)`` (what ``lookup(..., "int8")`` returns), or ``None``: use the eager path."""
    if q_master.device.type != "cpu" or q_master.dtype != torch.int8:
        return None
    c = constants(master_bits, bits, "int8")
    fn = kernel(c["d"], "int8")
    if fn is None:
        return None
    out = torch.empty(q_master.shape, dtype=torch.int8)
    args = (_bytes(q_master).reshape(-1), c["umax"], out.view(torch.uint8).numpy().reshape(-1))
    return out if _call(fn, args) else None


def _into(spare: torch.Tensor | None, shape, dtype) -> torch.Tensor:
    """``spare`` viewed as ``shape`` when it is a contiguous CPU tensor of that dtype and size, else a new tensor.
    Writing into the buffers of an evicted width skips the page faults of fresh memory: for a layout as large as the
    master (int4x2) they cost about half as much again as the kernel itself."""
    if (spare is not None and spare.dtype == dtype and spare.device.type == "cpu" and spare.is_contiguous()
            and spare.numel() == math.prod(shape)):
        return spare.view(shape)
    return torch.empty(shape, dtype=dtype)


def int4_blocked(q_master: torch.Tensor, master_bits: int, bits: int, kernel_name: str,
                 spare: torch.Tensor | None = None) -> torch.Tensor | None:
    """The packed weight of ``_weight_int4pack_mm_for_cpu`` in the ``_blocked64`` layout: the nibbles ``q_l + 8``
    (``int4pack``), or for ``int4x2`` the hi nibbles of every row followed by the lo nibbles (``2 * out`` rows).
    Written into ``spare`` when it fits (see :func:`_into`). ``None``: use the eager path (fused path off or
    unavailable, or ``out % 64 != 0``)."""
    n, k = q_master.shape
    if q_master.device.type != "cpu" or q_master.dtype != torch.int8 or n % 64 or k % 2 or n == 0:
        return None
    c = constants(master_bits, bits, "x2" if kernel_name == "int4x2" else "nib")
    fn = kernel(c["d"], "blocked")
    if fn is None:
        return None
    planes = c["planes"]
    out = _into(spare, (planes * n // 64, k, 32), torch.uint8)
    args = (_bytes(q_master), c["umax"], c["off"], planes, out.numpy())
    return out.view(planes * n, k // 2) if _call(fn, args) else None


@cache
def _scale_factors(d: int, x2: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per plane, as powers of two: the step multiplier and the zero as a multiple of the step (-1: zero 0).
    int4x2: hi = 16 * step, zero 0; lo = step, zero 8 * step."""
    if x2:
        return np.array([d + 4, d], np.int64), np.array([-1, 3], np.int64)
    return np.array([d], np.int64), np.array([-1], np.int64)


def int4_scales(scale: torch.Tensor, d: int, in_f: int, group_size, g: int, dtype, kernel_name: str,
                spare: torch.Tensor | None = None, eager=None):
    """``_weight_int4pack_mm_for_cpu``'s bf16 scales and zeros ``(in/g, rows, 2)`` (what
    :func:`.cpu.int4_scales_and_zeros` builds; for int4x2 both halves) in one pass, into ``spare`` when it fits;
    ``None``: use the eager path. In a switch's batch the kernel runs later, and ``eager(out)`` fills ``out`` instead
    if the scales turn out to need the eager path (without ``eager`` the eager path is taken now)."""
    if scale.device.type != "cpu" or scale.dtype != torch.float32 or dtype != torch.bfloat16:
        return None
    fn = kernel(0, "scales")
    if fn is None:
        return None
    mults, zeros = _scale_factors(d, kernel_name == "int4x2")
    if eager is None and cpu_batch.current() is not None:
        return None
    out = _into(spare, (in_f // g, len(mults) * scale.shape[0], 2), torch.bfloat16)
    args = (scale.detach().contiguous().numpy(), (in_f if group_size is None else group_size) // g, mults, zeros,
            out.view(torch.uint16).numpy())
    return out if _call(fn, args, None if eager is None else (lambda: _eager_into(eager, out))) else None


def _eager_into(eager, out: torch.Tensor) -> None:
    # inference mode is per thread, and `out` may be the buffer of a width packed inside it (an inference tensor,
    # which only inference mode may write); inside it, writing a normal tensor is allowed too
    with torch.inference_mode():
        eager(out)
