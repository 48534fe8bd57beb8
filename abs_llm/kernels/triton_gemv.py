"""Weight-only GEMV for one activation row (decode): memory-bound, so it reads the packed planes (``bits/8`` bytes per
weight; at 8 bits the int8 master itself), unpacks a ``[BN, SEG]`` tile per segment in registers and accumulates
``w * x`` in fp32 (no tensor cores: with one row they would idle). Split-K (``SPLIT > 1``) writes fp32 partial sums
that :func:`_reduce_kernel` adds and casts; it exists because ``out_features / BN`` programs alone do not fill a GPU
when ``out_features`` is small and ``in_features`` large (e.g. 4096 x 14336).

Constexpr glossary (shared with :mod:`.triton_gemm`): ``MASTER`` read the int8 master (8 bits); ``BITS`` the width,
``D = master_bits - BITS``; ``W0..W2`` plane widths (0 = absent) and ``SH0..SH2`` their bit offsets in ``u``; ``L``
segments per block; ``SEG_`` columns per segment; ``PER_GROUP`` one scale per ``GS`` input columns (else per row;
``GS`` is a constexpr so that a group's scales are loaded once, at its first segment);
``NB`` blocks per loop iteration. The scale applied is ``s_h * 2^D`` (``q_l * s_h * 2^d``, docs/architecture.md).
"""

from __future__ import annotations

from .triton_base import tl, triton
from .triton_pack import _lane, _load_group, _to_float


@triton.jit
def _segment(m_ptr, p0, p1, p2, w0, w1, w2, rows, K, NBLK, blk, s: tl.constexpr, t, k, wmask, kmask,
             MASTER: tl.constexpr, BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
             SH0: tl.constexpr, SH1: tl.constexpr, SH2: tl.constexpr, L: tl.constexpr, SEG_: tl.constexpr):
    """``(q_l as float [BN, SEG], w0, w1, w2)``: the plane words are reloaded only at the first segment they hold."""
    if MASTER:
        q = tl.load(m_ptr + rows[:, None] * K + k[None, :], mask=wmask & kmask[None, :], other=0)
        wf = _to_float(q.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x80, 128)
    else:
        if s % (32 // W0) == 0:
            w0 = _load_group(p0, rows, NBLK * ((L // (32 // W0)) * SEG_), blk, s, W0, L, SEG_, t, wmask)
        u = _lane(w0, s, W0, SH0)
        if W1 > 0:
            if s % (32 // W1) == 0:
                w1 = _load_group(p1, rows, NBLK * ((L // (32 // W1)) * SEG_), blk, s, W1, L, SEG_, t, wmask)
            u = u | _lane(w1, s, W1, SH1)
        if W2 > 0:
            if s % (32 // W2) == 0:
                w2 = _load_group(p2, rows, NBLK * ((L // (32 // W2)) * SEG_), blk, s, W2, L, SEG_, t, wmask)
            u = u | _lane(w2, s, W2, SH2)
        wf = _to_float(u, 1 << (BITS - 1))
    return wf, w0, w1, w2


@triton.jit
def _mainloop(acc, x_ptr, xrows, mmask, m_ptr, s_ptr, p0, p1, p2, rows, nmask, K, NG, NBLK, b_lo, b_hi,
              MASTER: tl.constexpr, BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
              SH0: tl.constexpr, SH1: tl.constexpr, SH2: tl.constexpr, L: tl.constexpr, SEG_: tl.constexpr,
              PER_GROUP: tl.constexpr, GS: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr, DOT: tl.constexpr):
    """The K loop both kernels share: for every segment, unpack and scale the ``[BN, SEG]`` weight tile, then
    ``acc += w * x`` (GEMV, ``acc [BN, SEG]``, one activation row) or ``acc = tl.dot(w, x^T, acc)`` (GEMM,
    ``acc [BN, BM]``; ``xrows``/``mmask`` address the ``BM`` activation rows)."""
    t = tl.arange(0, SEG_)
    for b0 in range(b_lo, b_hi, NB):
        for i in tl.static_range(NB):
            blk = b0 + i
            live = blk < b_hi
            wmask = nmask[:, None] & live
            w0 = tl.zeros((BN, SEG_), tl.int32)
            w1 = w0
            w2 = w0
            for s in tl.static_range(L):
                k = blk * (L * SEG_) + s * SEG_ + t
                kmask = (k < K) & live
                if DOT:  # the activations first: their load is in flight while the weight tile is unpacked
                    xt = tl.load(x_ptr + xrows[None, :] + k[:, None], mask=mmask[None, :] & kmask[:, None], other=0.0)
                else:
                    xs = tl.load(x_ptr + k, mask=kmask, other=0.0).to(tl.float32)
                wf, w0, w1, w2 = _segment(m_ptr, p0, p1, p2, w0, w1, w2, rows, K, NBLK, blk, s, t, k, wmask, kmask,
                                          MASTER, BITS, W0, W1, W2, SH0, SH1, SH2, L, SEG_)
                if PER_GROUP:  # a segment lies in one group (SEG divides GS); load a group's scales once
                    if (s * SEG_) % GS == 0:
                        k0 = blk * (L * SEG_) + s * SEG_
                        sc = tl.load(s_ptr + rows * NG + k0 // GS, mask=nmask & live & (k0 < K), other=0.0)
                    wf = wf * sc[:, None]
                if DOT:
                    acc = tl.dot(wf.to(xt.dtype), xt, acc)
                else:
                    acc += wf * xs[None, :]
    return acc


@triton.jit(do_not_specialize=["NBLK", "BPS", "SPLIT"])
def _gemv_kernel(x_ptr, y_ptr, part_ptr, m_ptr, s_ptr, p0, p1, p2, N, K, NG, NBLK, BPS, SPLIT,
                 MASTER: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr,
                 W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                 SH0: tl.constexpr, SH1: tl.constexpr, SH2: tl.constexpr,
                 L: tl.constexpr, SEG_: tl.constexpr, PER_GROUP: tl.constexpr, GS: tl.constexpr,
                 BN: tl.constexpr, NB: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    rows = offs_n.to(tl.int64)
    acc = tl.zeros((BN, SEG_), tl.float32)
    b_lo = pid_k * BPS
    acc = _mainloop(acc, x_ptr, 0, True, m_ptr, s_ptr, p0, p1, p2, rows, nmask, K, NG, NBLK, b_lo,
                    tl.minimum(b_lo + BPS, NBLK), MASTER, BITS, W0, W1, W2, SH0, SH1, SH2, L, SEG_, PER_GROUP, GS,
                    BN, NB, False)
    y = tl.sum(acc, axis=1) * (1 << D)
    if not PER_GROUP:
        y = y * tl.load(s_ptr + rows * NG, mask=nmask, other=0.0)
    if SPLIT == 1:
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.store(part_ptr + pid_k * N + offs_n, y, mask=nmask)


@triton.jit(do_not_specialize=["MN", "SPLIT"])
def _reduce_kernel(part_ptr, y_ptr, MN, SPLIT, BLOCK: tl.constexpr):
    """``y = sum over splits of the fp32 partials``, cast to the output dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
