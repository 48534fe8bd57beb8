"""On-device switching: derive a width from the int8 master and pack its planes in one Triton pass (no host round trip).

Also holds the small ``@triton.jit`` helpers the matmul kernels share. Layout: :mod:`.layouts`. The kernels turn a
small unsigned integer into float with the exponent trick ``bitcast(u | 0x4B000000) - 2^23`` (one integer OR and one
float subtract; a real int-to-float conversion runs at a quarter of the ALU rate and bounds a low-bit GEMV).
"""

from __future__ import annotations

import torch

from .layouts import SEG, layout, pack_planes
from .triton_base import available, cdiv, tl, triton

available()  # under TRITON_INTERPRET=1, patch the interpreter before any kernel runs
MAGIC = 0x4B000000  # float32 bits of 2^23: OR-ing u < 2^23 into the mantissa gives the float 2^23 + u exactly


@triton.jit
def _derive_u(q, D: tl.constexpr, BITS: tl.constexpr):
    """int32 master values -> ``u = q_l + 2^(l-1)`` (round half to even, as layouts.derive_int)."""
    if D > 0:
        q = tl.minimum(q, ((1 << (BITS - 1)) - 1) << D)
        q = (q + ((1 << (D - 1)) - 1) + ((q >> D) & 1)) >> D
    return q + (1 << (BITS - 1))


@triton.jit
def _lane(words, s: tl.constexpr, W: tl.constexpr, SH: tl.constexpr):
    """Bits of segment ``s`` held by a plane of width ``W``, moved to their place ``SH`` inside ``u``."""
    pos: tl.constexpr = (s % (32 // W)) * W
    if pos >= SH:
        v = words >> (pos - SH)
    else:
        v = words << (SH - pos)
    return v & (((1 << W) - 1) << SH)


@triton.jit
def _to_float(u, OFF: tl.constexpr):
    """``u - OFF`` as float32 for ``0 <= u < 2^23``, without an int-to-float conversion."""
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFF)


@triton.jit
def _load_group(p, rows, row_words, blk, s: tl.constexpr, W: tl.constexpr, L: tl.constexpr, SEG_: tl.constexpr,
                t, mask):
    """The ``[BN, SEG]`` words of a plane that hold segment ``s`` of block ``blk``."""
    E: tl.constexpr = 32 // W
    WPB: tl.constexpr = (L // E) * SEG_
    ptrs = p + rows[:, None] * row_words + blk * WPB + (s // E) * SEG_ + t[None, :]
    return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def _plane_bits(word, u, s: tl.constexpr, W: tl.constexpr, SH: tl.constexpr):
    """``word`` with segment ``s``'s field of a plane of width ``W`` added (a new word at each group's first segment)."""
    E: tl.constexpr = 32 // W
    field = ((u >> SH) & ((1 << W) - 1)) << ((s % E) * W)
    if s % E == 0:
        return field
    return word | field


@triton.jit
def _store_plane(p_ptr, word, rows, blk, t, nmask, NBLK, s: tl.constexpr, W: tl.constexpr, L: tl.constexpr,
                 SEG_: tl.constexpr):
    """Store a plane's word after the last segment of its group."""
    E: tl.constexpr = 32 // W
    WPB: tl.constexpr = (L // E) * SEG_
    if s % E == E - 1:
        tl.store(p_ptr + rows[:, None] * (NBLK * WPB) + blk * WPB + (s // E) * SEG_ + t[None, :], word,
                 mask=nmask[:, None])


@triton.jit
def _pack_kernel(m_ptr, p0_ptr, p1_ptr, p2_ptr, N, K, NBLK,
                 BITS: tl.constexpr, D: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                 SH0: tl.constexpr, SH1: tl.constexpr, SH2: tl.constexpr, L: tl.constexpr, SEG_: tl.constexpr,
                 BN: tl.constexpr):
    # every plane of one block of one row tile in one pass: each master segment is loaded and derived once, and its
    # bits go into the word of each plane (W = 0: no such plane)
    pid_n = tl.program_id(0)
    blk = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows = offs_n.to(tl.int64)
    nmask = offs_n < N
    t = tl.arange(0, SEG_)
    w0 = tl.zeros((BN, SEG_), tl.int32)
    w1 = tl.zeros((BN, SEG_), tl.int32)
    w2 = tl.zeros((BN, SEG_), tl.int32)
    for s in tl.static_range(L):
        k = blk * (L * SEG_) + s * SEG_ + t
        q = tl.load(m_ptr + rows[:, None] * K + k[None, :], mask=nmask[:, None] & (k[None, :] < K), other=0)
        u = _derive_u(q.to(tl.int32), D, BITS)
        w0 = _plane_bits(w0, u, s, W0, SH0)
        _store_plane(p0_ptr, w0, rows, blk, t, nmask, NBLK, s, W0, L, SEG_)
        if W1 > 0:
            w1 = _plane_bits(w1, u, s, W1, SH1)
            _store_plane(p1_ptr, w1, rows, blk, t, nmask, NBLK, s, W1, L, SEG_)
        if W2 > 0:
            w2 = _plane_bits(w2, u, s, W2, SH2)
            _store_plane(p2_ptr, w2, rows, blk, t, nmask, NBLK, s, W2, L, SEG_)


def pack_planes_triton(q_master: torch.Tensor, master_bits: int, bits: int) -> tuple[torch.Tensor, ...]:
    """Same words as :func:`.layouts.pack_planes`, every plane in one launch that reads the master once (a switch is
    bound by the host's per-launch cost, not by the bytes: BENCHMARKS.md)."""
    q = q_master.contiguous()
    n, k = q.shape
    lay = layout(bits, n, k)
    planes = tuple(torch.empty(n, lay.row_words(w), dtype=torch.int32, device=q.device) for w in lay.widths)
    w, sh = lay.planes3
    p = planes + (planes[0],) * (3 - len(planes))
    _pack_kernel[(cdiv(n, 32), lay.nblocks)](q, *p, n, k, lay.nblocks, BITS=bits, D=master_bits - bits, W0=w[0],
                                             W1=w[1], W2=w[2], SH0=sh[0], SH1=sh[1], SH2=sh[2], L=lay.lanes,
                                             SEG_=SEG, BN=32, num_warps=4)
    return planes


__all__ = ["MAGIC", "pack_planes", "pack_planes_triton"]
