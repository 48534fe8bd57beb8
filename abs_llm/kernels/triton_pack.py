"""On-device switching: derive a width from the int8 master and pack its planes in one Triton pass (no host round trip).

Also holds the small ``@triton.jit`` helpers the matmul kernels share. Layout: :mod:`.layouts`. The kernels turn a
small unsigned integer into float with the exponent trick ``bitcast(u | 0x4B000000) - 2^23`` (one integer OR and one
float subtract; a real int-to-float conversion runs at a quarter of the ALU rate and bounds a low-bit GEMV).
"""

from __future__ import annotations

import torch

from .layouts import SEG, Layout, pack_planes
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
def _pack_kernel(m_ptr, p_ptr, N, K, NBLK,
                 BITS: tl.constexpr, D: tl.constexpr, W: tl.constexpr, SH: tl.constexpr, L: tl.constexpr,
                 SEG_: tl.constexpr, BN: tl.constexpr):
    pid_n = tl.program_id(0)
    blk = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rows = offs_n.to(tl.int64)
    nmask = offs_n < N
    t = tl.arange(0, SEG_)
    E: tl.constexpr = 32 // W
    WPB: tl.constexpr = (L // E) * SEG_
    for g in tl.static_range(L // E):
        word = tl.zeros((BN, SEG_), tl.int32)
        for j in tl.static_range(E):
            k = blk * (L * SEG_) + (g * E + j) * SEG_ + t
            q = tl.load(m_ptr + rows[:, None] * K + k[None, :], mask=nmask[:, None] & (k[None, :] < K), other=0)
            u = _derive_u(q.to(tl.int32), D, BITS)
            word = word | (((u >> SH) & ((1 << W) - 1)) << (j * W))
        tl.store(p_ptr + rows[:, None] * (NBLK * WPB) + blk * WPB + g * SEG_ + t[None, :], word, mask=nmask[:, None])


def pack_planes_triton(q_master: torch.Tensor, master_bits: int, bits: int) -> tuple[torch.Tensor, ...]:
    """Same words as :func:`.layouts.pack_planes`, one launch per plane, each reading the master once."""
    q = q_master.contiguous()
    n, k = q.shape
    lay = Layout(bits, n, k)
    planes = []
    for w, sh in zip(lay.widths, lay.shifts):
        p = torch.empty(n, lay.row_words(w), dtype=torch.int32, device=q.device)
        grid = (cdiv(n, 32), lay.nblocks)
        _pack_kernel[grid](q, p, n, k, lay.nblocks, BITS=bits, D=master_bits - bits, W=w, SH=sh, L=lay.lanes,
                           SEG_=SEG, BN=32, num_warps=4)
        planes.append(p)
    return tuple(planes)


__all__ = ["MAGIC", "pack_planes", "pack_planes_triton"]
