"""Fake quantization for QAT in two Triton passes (issue 16: the per-width overhead of a multi-bit training step).

The eager math (:func:`abs_llm.core._fq_forward` / ``_fq_backward``) runs ~10 passes over the weights per width and
keeps an int8 ``q_l`` and a bool mask alive until the backward. Here, on the weight viewed as rows of one group each
(``(rows, g)``, one scale per row):

- forward: one pass reads ``W`` and writes the dequantized ``W_l``; nothing is saved but ``W`` and ``s``;
- backward: one pass reads the output gradient and ``W``, recomputes ``q_l`` and the mask, writes the STE gradient
  of ``W`` and reduces each row's LSQ scale gradient ``2^d sum(g q_l) - sum(g W inside) / s``.

Forward values are bit-identical to the eager path: ``W / s`` is IEEE division (``div_rn``), rounding is half to even
by the ``1.5 * 2^23`` trick (exact for ``|x| < 2^22``; anything larger clamps to the same bound), and the multiply
order is the eager one. The scale gradient is a sum in another order (equal within float32 rounding). Runs on CUDA,
or on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, how CI tests it).
"""

from __future__ import annotations

import logging

import torch

from ..core import fq_values
from .common import say_once
from .triton_base import available, cdiv, interpreting, tl, triton

if triton is not None:
    _MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: x + M - M rounds x to an integer, half to even, for |x| < 2^22

    @triton.jit
    def _rint(x):
        return (x + _MAGIC) - _MAGIC

    @triton.jit
    def _levels(w, s, inv, lo_h, lo, hi):
        q = _rint(tl.math.div_rn(w, s))
        inside = q >= lo_h
        q = _rint(q * inv)  # exact: an integer times a power of two
        inside = inside & (q <= hi)
        return tl.minimum(tl.maximum(q, lo), hi), inside

    @triton.jit
    def _fq_fwd(w_ptr, s_ptr, out_ptr, rows, cols, inv, lo_h, lo, hi, step,
                BR: tl.constexpr, BC: tl.constexpr):
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        rmask = r < rows
        s = tl.load(s_ptr + r, mask=rmask, other=1.0)
        sl = s * step
        for c0 in range(0, cols, BC):
            c = c0 + tl.arange(0, BC)
            m = rmask[:, None] & (c < cols)[None, :]
            off = r[:, None].to(tl.int64) * cols + c[None, :]
            w = tl.load(w_ptr + off, mask=m, other=0.0)
            q, _ = _levels(w, s[:, None], inv, lo_h, lo, hi)
            tl.store(out_ptr + off, q * sl[:, None], mask=m)

    @triton.jit
    def _fq_bwd(g_ptr, w_ptr, s_ptr, gw_ptr, gs_ptr, rows, cols, inv, lo_h, lo, hi, step,
                BR: tl.constexpr, BC: tl.constexpr):
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        rmask = r < rows
        s = tl.load(s_ptr + r, mask=rmask, other=1.0)
        acc_q = tl.zeros((BR,), dtype=tl.float32)
        acc_w = tl.zeros((BR,), dtype=tl.float32)
        for c0 in range(0, cols, BC):
            c = c0 + tl.arange(0, BC)
            m = rmask[:, None] & (c < cols)[None, :]
            off = r[:, None].to(tl.int64) * cols + c[None, :]
            w = tl.load(w_ptr + off, mask=m, other=0.0)
            g = tl.load(g_ptr + off, mask=m, other=0.0)
            q, inside = _levels(w, s[:, None], inv, lo_h, lo, hi)
            gw = tl.where(inside, g, 0.0)
            tl.store(gw_ptr + off, gw, mask=m)
            acc_q += tl.sum(g * q, axis=1)
            acc_w += tl.sum(gw * w, axis=1)
        tl.store(gs_ptr + r, acc_q * step - tl.math.div_rn(acc_w, s), mask=rmask)


_state: dict = {}  # (device, pass) -> True once checked against the eager path, False once it failed


def usable(w: torch.Tensor) -> bool:
    """The Triton path can run on ``w``: float32 on CUDA, or on the CPU in Triton's interpreter, and it has not
    failed on this device."""
    return (available() and w.dtype == torch.float32 and _state.get((w.device, "fwd")) is not False
            and (w.is_cuda or (interpreting() and w.device.type == "cpu")))


def _blocks(cols: int) -> tuple[int, int]:
    bc = min(triton.next_power_of_2(cols), 256)
    return max(1, 1024 // bc), bc  # ~1024 elements per step of a program


def _eager(w2, s, master_bits, bits):
    from .. import core

    return core._fq_forward(w2, s.view(-1, 1), *core._consts(master_bits, bits, w2.device, w2.dtype))


def _checked(key, run, reference, same) -> object | None:
    """``run()``; on this device's first call also ``reference()``, which it must match (``same``). ``None``: it
    raised or did not match (logged once at WARNING): the caller takes the eager path, from then on too."""
    try:
        got = run()
        if key not in _state:
            if not same(got, reference()):
                raise RuntimeError("self-check against the eager fake quantization failed")
            _state[key] = True
        return got
    except Exception as e:  # a kernel problem must not stop training: the eager path computes the same thing
        _state[(key[0], "fwd")] = _state[key] = False
        say_once(f"abs_llm kernels: Triton fake quantization failed on {key[0]} ({type(e).__name__}: {e}); "
                 "using the eager path", logging.WARNING)
        return None


def forward(w2: torch.Tensor, s: torch.Tensor, master_bits: int, bits: int) -> torch.Tensor | None:
    """Dequantized ``W_l`` of ``w2`` (rows, g) with one scale per row ``s`` (rows,); ``None``: use the eager path."""
    w2, s = w2.contiguous(), s.contiguous()
    rows, cols = w2.shape

    def run():
        out = torch.empty_like(w2)
        br, bc = _blocks(cols)
        _fq_fwd[(cdiv(rows, br),)](w2, s, out, rows, cols, *fq_values(master_bits, bits), BR=br, BC=bc)
        return out

    return _checked((w2.device, "fwd"), run, lambda: _eager(w2, s, master_bits, bits)[0], torch.equal)


def backward(g2: torch.Tensor, w2: torch.Tensor, s: torch.Tensor, master_bits: int,
             bits: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """STE gradient of ``w2`` and LSQ gradient of ``s`` (rows,) from the output gradient ``g2`` (rows, g); ``None``:
    use the eager path."""
    g2, w2, s = g2.contiguous(), w2.contiguous(), s.contiguous()
    rows, cols = w2.shape

    def run():
        gw, gs = torch.empty_like(w2), torch.empty_like(s)
        br, bc = _blocks(cols)
        _fq_bwd[(cdiv(rows, br),)](g2, w2, s, gw, gs, rows, cols, *fq_values(master_bits, bits), BR=br, BC=bc)
        return gw, gs

    def reference():
        from ..core import _consts as consts, _fq_backward

        _, q, inside = _eager(w2, s, master_bits, bits)
        step = consts(master_bits, bits, w2.device, w2.dtype)[-1]
        # the scale gradient is a difference of two sums that nearly cancel at high widths: summed in another order
        # it differs by float32 rounding of the terms, not of the result
        terms = (g2 * q).abs().sum(-1) * step + (g2 * w2).abs().sum(-1) / s
        return (*_fq_backward(g2, w2, s, q, inside, step), terms)

    def same(got, ref):
        return torch.equal(got[0], ref[0]) and bool(((got[1] - ref[1]).abs() <= 1e-4 * ref[2] + 1e-30).all())

    return _checked((w2.device, "bwd"), run, reference, same)
