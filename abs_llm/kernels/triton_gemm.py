"""Weight-only GEMM for two or more activation rows: each ``[BN, SEG]`` weight tile is unpacked and scaled in fp32
registers, cast to the activation dtype and fed to a tensor-core ``tl.dot`` against the ``[SEG, BM]`` activation
tile, accumulating in fp32. The product is computed transposed (``out^T = W x^T``): the weight is the wide operand,
so a handful of tokens still fills the MMA's 64-row side, and ``BM`` may stay 16 (the smallest ``tl.dot`` size) for
2..16 rows. Same constexprs and split-K scheme as :mod:`.triton_gemv`.

Dot constraints kept here (not checked by the interpreter): every dot dimension is >= 16 (``BN`` in {64, 128},
``SEG`` in {16, 32}, ``BM`` in {16, 32, 64}); both operands have the activation dtype (bf16 or fp16), the weight
is cast after all fp32 math; the accumulator is fp32.
"""

from __future__ import annotations

from .triton_base import tl, triton
from .triton_gemv import _mainloop, _segment


@triton.jit(do_not_specialize=["M", "NBLK", "BPS", "SPLIT"])
def _gemm_kernel(x_ptr, y_ptr, part_ptr, m_ptr, s_ptr, p0, p1, p2, M, N, K, stride_x, NG, NBLK, BPS, SPLIT,
                 MASTER: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr,
                 W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                 SH0: tl.constexpr, SH1: tl.constexpr, SH2: tl.constexpr,
                 L: tl.constexpr, SEG_: tl.constexpr, PER_GROUP: tl.constexpr, GS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    rows = offs_n.to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    mmask = offs_m < M
    xrows = offs_m.to(tl.int64) * stride_x
    acc = tl.zeros((BN, BM), tl.float32)
    b_lo = pid_k * BPS
    acc = _mainloop(acc, x_ptr, xrows, mmask, m_ptr, s_ptr, p0, p1, p2, rows, nmask, K, NG, NBLK, b_lo,
                    tl.minimum(b_lo + BPS, NBLK), MASTER, BITS, W0, W1, W2, SH0, SH1, SH2, L, SEG_, PER_GROUP, GS,
                    BN, NB, True)
    acc = acc * (1 << D)
    if not PER_GROUP:
        acc = acc * tl.load(s_ptr + rows * NG, mask=nmask, other=0.0)[:, None]
    out = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
    omask = mmask[None, :] & nmask[:, None]
    if SPLIT == 1:
        tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(part_ptr + pid_k.to(tl.int64) * M * N + out, acc, mask=omask)


@triton.jit(do_not_specialize=["NBLK"])
def _dequant_kernel(w_ptr, m_ptr, s_ptr, p0, p1, p2, N, K, NG, NBLK,
                    MASTER: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr,
                    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                    SH0: tl.constexpr, SH1: tl.constexpr, SH2: tl.constexpr,
                    L: tl.constexpr, SEG_: tl.constexpr, PER_GROUP: tl.constexpr, GS: tl.constexpr, BN: tl.constexpr):
    """``W_l`` in the activation dtype, one block of ``L * SEG`` columns per program: for many rows (prefill) a
    dense matmul on a transient dequantized weight beats unpacking every weight tile once per row tile."""
    pid_n = tl.program_id(0)
    blk = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    nmask = offs_n < N
    rows = offs_n.to(tl.int64)
    t = tl.arange(0, SEG_)
    wmask = nmask[:, None]
    w0 = tl.zeros((BN, SEG_), tl.int32)
    w1 = w0
    w2 = w0
    if not PER_GROUP:
        sc_row = tl.load(s_ptr + rows * NG, mask=nmask, other=0.0)
    for s in tl.static_range(L):
        k = blk * (L * SEG_) + s * SEG_ + t
        kmask = k < K
        wf, w0, w1, w2 = _segment(m_ptr, p0, p1, p2, w0, w1, w2, rows, K, NBLK, blk, s, t, k, wmask, kmask,
                                  MASTER, BITS, W0, W1, W2, SH0, SH1, SH2, L, SEG_)
        if PER_GROUP:
            if (s * SEG_) % GS == 0:
                k0 = blk * (L * SEG_) + s * SEG_
                sc = tl.load(s_ptr + rows * NG + k0 // GS, mask=nmask & (k0 < K), other=0.0)
        else:
            sc = sc_row
        wf = wf * (sc * (1 << D))[:, None]
        tl.store(w_ptr + rows[:, None] * K + k[None, :], wf.to(w_ptr.dtype.element_ty), mask=wmask & kmask[None, :])
