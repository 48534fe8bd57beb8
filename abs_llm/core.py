"""Pure tensor math of Double Rounding (no transformers, no modules).

Notation (docs/architecture.md, "The math"): a weight ``W`` of shape ``(out, in)`` is cut into groups of ``group_size`` consecutive input
columns per row (``group_size=None``: one group per row, i.e. per-channel). Master bits ``h``, target bits ``l``,
``d = h - l``.

- master:      ``q_h = clamp(round(W / s_h), -2^(h-1), 2^(h-1) - 1)``
- derive:      ``q_l = clamp(round(q_h / 2^d), -2^(l-1), 2^(l-1) - 1)``
- dequantize:  ``W_l = q_l * (s_h * 2^d)``, i.e. ``s_l = s_h * 2^d``.

Rounding is round-half-to-even everywhere (``torch.round``): it is unbiased on the halves that the derivation hits
constantly (``q_h / 2^d`` is a half whenever the low ``d`` bits of ``q_h`` are ``10...0``), and it is exact in float32
because ``q_h / 2^d`` is a small dyadic rational. A bare arithmetic shift would be a floor and is *not* used.

Group layout when ``group_size`` does not divide ``in``: ``n_groups = ceil(in / group_size)``; the last group of every
row holds the ``in - (n_groups - 1) * group_size`` remaining columns, and ``scale`` has shape ``(out, n_groups)``. The
master integers are stored unpadded with shape ``(out, in)`` (8-bit) or packed two per byte (4-bit master, see
:func:`pack_int4`).
"""

from __future__ import annotations

import functools
import math

import torch

MASTER_BITS = (8, 4)
MIN_GROUP, MAX_GROUP = 16, 1024
# The defaults of DoubleRoundingConfig, SwitchableLinear, the CLI and the recipes: defined here only.
DEFAULT_MASTER_BITS = 8
DEFAULT_CANDIDATE_BITS = (8, 6, 4, 3, 2)
DEFAULT_GROUP_SIZE = 64


def qrange(bits: int) -> tuple[int, int]:
    """Signed symmetric integer range ``[-2^(b-1), 2^(b-1) - 1]``."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def allowed_candidates(master_bits: int) -> tuple[int, ...]:
    """Bit-widths derivable from a master: 2..8 for INT8, 2..4 for INT4."""
    if master_bits not in MASTER_BITS:
        raise ValueError(f"master_bits must be one of {MASTER_BITS}, got {master_bits!r}")
    return tuple(range(2, master_bits + 1))


def check_group_size(group_size: int | None) -> None:
    if group_size is None:
        return
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, int)
        or group_size < MIN_GROUP
        or group_size > MAX_GROUP
        or group_size & (group_size - 1)
    ):
        raise ValueError(
            f"group_size must be None (per channel) or a power of two in [{MIN_GROUP}, {MAX_GROUP}], got {group_size!r}"
        )


def num_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(in_features / group_size)


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``(out, in)`` -> ``(out, n_groups, g)``, zero-padding the short last group (zeros never change a max-abs)."""
    out, cols = w.shape
    g = cols if group_size is None else group_size
    n = num_groups(cols, group_size)
    pad = n * g - cols
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out, n, g)


def _ungrouped(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    out = wg.shape[0]
    return wg.reshape(out, -1)[:, :in_features]


def expand_scale(scale: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """Per-group ``(out, n_groups)`` scale -> per-element ``(out, in)``."""
    g = in_features if group_size is None else group_size
    return scale.repeat_interleave(g, dim=1)[:, :in_features]


def init_scale(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Abs-max scale per group, ``s = max|W_g| / (2^(b-1) - 1)``, float32 of shape ``(out, n_groups)``.

    An all-zero group gets scale 1 (any positive value quantizes it to zero exactly) so nothing divides by zero.
    """
    amax = _grouped(w.detach().float(), group_size).abs().amax(dim=-1)
    scale = amax / qrange(bits)[1]
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def quantize_master(w: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """``q_h = clamp(round(W / s_h), qmin, qmax)`` as int8, shape ``(out, in)``."""
    lo, hi = qrange(bits)
    q = torch.round(w.float() / expand_scale(scale.float(), w.shape[1], group_size)).clamp_(lo, hi)
    return q.to(torch.int8)


def derive(q_master: torch.Tensor, master_bits: int, bits: int) -> torch.Tensor:
    """Second rounding: ``q_l = clamp(round(q_h / 2^d), -2^(l-1), 2^(l-1) - 1)`` (half to even), int8 out."""
    if bits > master_bits or bits < 1:
        raise ValueError(f"cannot derive {bits} bits from a {master_bits}-bit master")
    d = master_bits - bits
    if d == 0:
        return q_master.to(torch.int8)
    lo, hi = qrange(bits)
    q = torch.round(q_master.to(torch.float32) / (2**d)).clamp_(lo, hi)
    return q.to(torch.int8)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, master_bits: int, bits: int, group_size: int | None, dtype=torch.float32
) -> torch.Tensor:
    """``W_l = q_l * s_h * 2^d`` for integers ``q`` already at ``bits``."""
    step = expand_scale(scale.float() * 2 ** (master_bits - bits), q.shape[1], group_size)
    return (q.to(torch.float32) * step).to(dtype)


def derived_weight(
    q_master: torch.Tensor, scale: torch.Tensor, master_bits: int, bits: int, group_size: int | None, dtype=torch.float32
) -> torch.Tensor:
    """Float weight at ``bits`` derived from the integer master (derive, then dequantize)."""
    return dequantize(derive(q_master, master_bits, bits), scale, master_bits, bits, group_size, dtype)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Baseline: plain round-to-nearest at ``bits`` straight from the float weight (abs-max scale), dequantized."""
    scale = init_scale(w, bits, group_size)
    return dequantize(quantize_master(w, scale, bits, group_size), scale, bits, bits, group_size, w.dtype)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round`` in the forward pass, identity gradient in the backward pass (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Value of ``x``, gradient multiplied by ``factor`` (LSQ's step-size gradient scaling)."""
    return x * factor + (x - x * factor).detach()


FUSED = (False, True, "compile", "triton")  # True = "compile"


def fake_quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    master_bits: int,
    bits: int,
    group_size: int | None,
    lsq_grad_scale: bool = False,
    scale_grad_mult: float = 1.0,
    fused: bool | str = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Differentiable Double Rounding for training: the forward value equals
    ``derived_weight(quantize_master(w, scale))`` exactly; gradients are STE for ``w`` (1 inside the clipping range,
    0 outside) and LSQ for ``scale``: per element ``2^d (q_l - W / s_l)`` inside the range and ``2^d * q_l`` (the
    clipped bound) outside, summed over the group. ``lsq_grad_scale`` multiplies the scale gradient by LSQ's
    ``1 / sqrt(n_group * qmax_l)``; ``scale_grad_mult`` multiplies it too (ALRS in accumulate mode: applied inside the
    backward, so it holds wherever the scale lives, DDP bucket or FSDP2 shard). ``fused=True`` (``"compile"``) runs
    the same math through ``torch.compile`` (one generated kernel per pass instead of ~10 eager ones; see
    :func:`_kernels`); ``"triton"`` runs one Triton pass forward and one backward (:mod:`abs_llm.kernels.triton_fq`;
    CUDA float32, else the eager path). ``out_dtype``: the returned weight's dtype (None: float32); the compiled
    path rounds to it inside its one pass and its backward takes that dtype's gradient and recomputes ``q_l`` and the
    mask from ``w`` and ``s`` instead of saving them (BENCHMARKS.md "QAT (issue 16)", stop 27: bf16 autocast on CPU).
    """
    if w.dtype in (torch.float16, torch.bfloat16):  # the grid of freeze()/quantize_master is computed in float32
        w = w.float()
    s = scale if scale.dtype == w.dtype else scale.to(w.dtype)
    if lsq_grad_scale:
        cols = w.shape[1]
        g = cols if group_size is None else min(group_size, cols)
        s = grad_scale(s, 1.0 / math.sqrt(g * max(qrange(bits)[1], 1)))
    if fused not in FUSED:
        raise ValueError(f"fused must be one of {FUSED}, got {fused!r}")
    out = _FakeQuantize.apply(w, s, master_bits, bits, group_size, float(scale_grad_mult), fused, out_dtype)
    return out if out_dtype is None or out.dtype == out_dtype else out.to(out_dtype)


def _fq_forward(w2: torch.Tensor, s2: torch.Tensor, inv: torch.Tensor, lo_h: torch.Tensor, lo: torch.Tensor,
                hi: torch.Tensor, step: torch.Tensor):
    """Groups as rows: weight ``(out * n_groups, g)``, scale ``(out * n_groups, 1)``; the width enters through 0-dim
    tensors (``inv = 2^-d``, the bounds, ``step = 2^d``) so one compiled graph serves every width. Returns
    (dequantized ``W_l``, int8 ``q_l``, mask of the elements inside both clipping ranges). The master clamp needs no
    pass of its own: for ``round(W/s)`` above the master range ``round(q / 2^d)`` is above ``hi_l`` too, and the
    master's lower bound ``lo_h = lo_l 2^d`` maps onto ``lo_l``, so clamping once at ``l`` gives the same integers
    and the mask is ``q_h >= lo_h`` and ``round(q_h / 2^d) <= hi_l`` (which implies the upper master bound)."""
    q = torch.round(w2 / s2)
    inside = q >= lo_h
    q = torch.round(q * inv)  # exact: a power-of-two scaling of an integer (a no-op at d = 0)
    inside = inside & (q <= hi)
    q = torch.clamp(q, lo, hi)
    return q * (s2 * step), q.to(torch.int8), inside


def _fq_backward(g2: torch.Tensor, w2: torch.Tensor, s: torch.Tensor, q: torch.Tensor, inside: torch.Tensor,
                 step: torch.Tensor):
    """STE gradient of the weight and LSQ gradient of the (flat, one per group) scale from the output gradient in
    rows of groups. ``sum(g * (2^d q_l - (W/s) inside))`` is computed as ``2^d sum(g q_l) - sum(grad_w W) / s``
    (``s`` is constant over a group), which never divides the full weight by the scale."""
    grad_w = g2 * inside
    grad_s = (g2 * q).sum(-1) * step - (grad_w * w2).sum(-1) / s
    return grad_w, grad_s


_CONSTS: dict = {}


def fq_values(master_bits: int, bits: int) -> tuple[float, ...]:
    """``(2^-d, lo_h, lo_l, hi_l, 2^d)`` of a width, the numbers the fake quantization needs, as Python floats."""
    d = master_bits - bits
    return 2.0**-d, float(qrange(master_bits)[0]), *map(float, qrange(bits)), 2.0**d


def _consts(master_bits: int, bits: int, device, dtype) -> tuple[torch.Tensor, ...]:
    """``(2^-d, lo_h, lo_l, hi_l, 2^d)`` as 0-dim tensors (exact in any float dtype), made once per width, device and
    dtype: a training step asks ~ layers x widths times, so nothing is built or converted per call."""
    key = (master_bits, bits, device, dtype)
    consts = _CONSTS.get(key)
    if consts is None:
        # outside inference mode: made during an evaluation (torch.inference_mode) they would be inference tensors,
        # which autograd refuses to save, so every later training step would fail
        with torch.inference_mode(False):
            consts = _CONSTS[key] = tuple(torch.tensor(v, device=device, dtype=dtype)
                                          for v in fq_values(master_bits, bits))
    return consts


def _triton_fq():
    from .kernels import triton_fq  # imports triton: only when asked for

    return triton_fq


@functools.cache
def _kernels(fused: bool):
    """The forward/backward math: eager (saving ``q_l`` and the mask), or compiled (:mod:`abs_llm.kernels.
    compiled_fq`: the weight made in the output dtype, ``q_l`` and the mask recomputed in the backward)."""
    if not fused:
        return _fq_forward, _fq_backward
    from .kernels import compiled_fq

    return compiled_fq.kernels()


def _rows_dynamic(fused: bool, *tensors) -> None:
    """One compiled graph for every layer shape: the row count (``out * n_groups``) is dynamic from the first call,
    the group length stays static (CPU code generation needs it static to vectorise)."""
    if fused:
        for t in tensors:
            torch._dynamo.mark_dynamic(t, 0)


class _FakeQuantize(torch.autograd.Function):
    """:func:`fake_quantize` with its STE/LSQ gradients written out. Composing ``round_ste``/``clamp`` with autograd
    gives the same gradients (up to a few ulps: it multiplies by ``s * (1/s)``) but keeps ~6 float copies of every
    weight per bit-width alive until the backward; this keeps an int8 ``q_l`` and a bool mask (2 bytes per weight) and
    runs fewer passes over the weights, which dominate a multi-bit QAT step's overhead."""

    @staticmethod
    def forward(ctx, w, s, master_bits, bits, group_size, scale_grad_mult=1.0, fused=False, out_dtype=None):
        cols = w.shape[1]
        wg = _grouped(w, group_size)
        w2 = wg.reshape(-1, wg.shape[-1])
        inv, lo_h, lo, hi, step = _consts(master_bits, bits, w.device, w.dtype)
        s2 = s.reshape(-1, 1)
        triton_out = None
        if fused == "triton" and _triton_fq().usable(w2):  # one pass; the backward recomputes q_l and the mask
            triton_out = _triton_fq().forward(w2, s2.view(-1), master_bits, bits)  # None: it failed (logged once)
        fused = "triton" if triton_out is not None else fused is True or fused == "compile"
        ctx.meta = (group_size, cols, scale_grad_mult, fused, master_bits, bits)
        if triton_out is not None:
            ctx.save_for_backward(w, s)
            return _ungrouped(triton_out.view(wg.shape), cols)
        _rows_dynamic(fused, w2, s2)
        if fused:
            ctx.save_for_backward(w, s)
            out = _kernels(fused)[0](w2, s2, inv, lo_h, lo, hi, step, out_dtype or w.dtype)
            return _ungrouped(out.view(wg.shape), cols)
        out, q, inside = _kernels(fused)[0](w2, s2, inv, lo_h, lo, hi, step)
        ctx.save_for_backward(w, s, q, inside, step)
        return _ungrouped(out.view(wg.shape), cols)

    @staticmethod
    def backward(ctx, grad):
        group_size, cols, mult, fused, master_bits, bits = ctx.meta
        gg = _grouped(grad, group_size)  # the padded tail of a short last group gets zero gradient
        g2 = gg.reshape(-1, gg.shape[-1])
        if fused == "triton":
            w, s = ctx.saved_tensors
            w2 = _grouped(w, group_size).reshape(g2.shape)
            grads = _triton_fq().backward(g2, w2, s.reshape(-1), master_bits, bits)
            if grads is None:  # it failed (logged once): the eager backward, from q_l and the mask computed again
                consts = _consts(master_bits, bits, w.device, w.dtype)
                _, q, inside = _fq_forward(w2, s.reshape(-1, 1), *consts)
                grads = _fq_backward(g2, w2, s.reshape(-1), q, inside, consts[-1])
            grad_w, grad_s = grads
        elif fused:
            w, s = ctx.saved_tensors
            w2, s1 = _grouped(w, group_size).reshape(g2.shape), s.reshape(-1)
            _rows_dynamic(fused, g2, w2, s1)
            grad_w, grad_s = _kernels(fused)[1](g2, w2, s1, *_consts(master_bits, bits, w.device, w.dtype))
        else:
            w, s, q, inside, step = ctx.saved_tensors
            w2 = _grouped(w, group_size).reshape(g2.shape)
            s1 = s.reshape(-1)
            _rows_dynamic(fused, g2, w2, s1, q, inside)
            grad_w, grad_s = _kernels(fused)[1](g2, w2, s1, q, inside, step)
        grad_s = grad_s.view(s.shape) if ctx.needs_input_grad[1] else None
        if grad_s is not None and mult != 1.0:
            grad_s = grad_s * mult
        grad_w = _ungrouped(grad_w.view(gg.shape), cols) if ctx.needs_input_grad[0] else None
        return grad_w, grad_s, None, None, None, None, None, None


def alrs_multiplier(master_bits: int, bits: int) -> float:
    """ALRS learning-rate multiplier of the scales for precision ``bits`` (paper Eq. 6-7), ``d = h - l``:
    ``10^(-d/2)`` for even ``d``, ``5 * 10^(-(d+1)/2)`` for odd ``d``."""
    d = master_bits - bits
    if d < 0:
        raise ValueError(f"bits {bits} exceed master bits {master_bits}")
    return 10 ** (-d / 2) if d % 2 == 0 else 5 * 10 ** (-(d + 1) / 2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int values in [-8, 7] two per byte: column ``2j`` in the low nibble, ``2j+1`` in the high nibble (two's
    complement nibbles). An odd column count is padded with one zero column. Shape ``(out, ceil(in/2))`` uint8."""
    lo, hi = qrange(4)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError("pack_int4 needs values in [-8, 7]")
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    u = q.to(torch.int16) & 0xF
    return (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 of shape ``(out, in_features)``."""
    p = packed.to(torch.int16)
    nib = torch.stack([p & 0xF, (p >> 4) & 0xF], dim=-1).reshape(packed.shape[0], -1)[:, :in_features]
    return torch.where(nib >= 8, nib - 16, nib).to(torch.int8)
