"""Weight-only integer matmuls from stock PyTorch ops, chosen per (bits, group size, device, activation dtype).

A :class:`Packed` holds one layer's weight prepared for one kernel at one bit-width; calling it computes
``x @ W_l^T`` where ``W_l = q_l * s_h * 2^d`` (DESIGN.md). Kernels:

- ``int8pack`` (CPU, per-channel scales only): ``aten._weight_int8pack_mm`` on ``q_l * 2^d`` stored as int8 with the
  master's per-row scale -- exact, and at ``bits == master_bits`` of an 8-bit master it *is* the master (no copy).
- ``int4pack`` (CPU, bits <= 4): ``aten._weight_int4pack_mm_for_cpu``; nibble ``q_l + 8``, per-group scale
  ``s_h * 2^d``, zero 0. A kernel group ``g`` in {32..256} that divides both our group and ``in_features`` is used, so
  per-channel layers, groups of 512/1024 and the short last group all map exactly (scales repeated).
- ``int4x2`` (CPU, bits 5..8 with per-group scales, where int8pack cannot hold the scales): ``q_l = 16*hi + lo``
  with ``hi`` in [-8, 7] and ``lo`` in [0, 15]; both halves go through one int4pack call on a ``(2*out, in)`` weight
  and are summed. Same bytes as int8, exact up to float rounding of the two partial sums.
- ``cuda_int4`` / ``cuda_int8``: ``aten._weight_int4pack_mm`` (bf16, sm80+) / ``aten._weight_int8pack_mm`` on CUDA.
  Not testable on the CPU-only dev machines, so every CUDA pack is checked once against the dequantized reference
  and falls back to ``dequant`` on any error or mismatch.
- ``dequant``: derive, dequantize to the activation dtype, ``F.linear`` (always correct; the reference).

Traps measured on an AMD EPYC (AVX512-BF16), torch 2.13 CPU, and guarded here (fallback + one log line, no crash):

- ``_weight_int8pack_mm`` with bf16 activations returns garbage/NaN (silently!) when ``in_features % 16 != 0``.
- with fp32 activations both int kernels are 5-25x *slower* than fp32 ``F.linear`` (no vectorised fp32 path), so
  ``auto`` uses ``dequant`` for fp32; bf16 decode with int kernels is ~3.5x faster than bf16 ``F.linear`` at 1B shapes.
- ``_convert_weight_to_int4pack_for_cpu`` raises unless ``out_features % 16 == 0``; ``_weight_int4pack_mm_for_cpu``
  raises unless the group is 32/64/128/256 and divides ``in_features``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

from . import core

logger = logging.getLogger(__name__)

KERNELS = ("auto", "dequant", "int8pack", "int4pack", "int4x2", "cuda_int4", "cuda_int8")
INT4_GROUPS = (256, 128, 64, 32)
_said: set[str] = set()


def check_kernel(kernel) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not known; choose one of {list(KERNELS)}")
    return kernel


def _say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        logger.info(msg)


@dataclass
class Packed:
    """A weight ready for one kernel. ``nbytes`` counts only memory *not* shared with the master."""

    kernel: str
    bits: int
    fn: object
    tensors: tuple = field(default_factory=tuple)
    nbytes: int = 0

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.fn(x, bias)


def int4_group(in_features: int, group_size: int | None) -> int | None:
    """Largest int4pack group that divides ``in_features`` and our group (so every kernel group has one scale)."""
    outer = in_features if group_size is None else group_size
    for g in INT4_GROUPS:
        if in_features % g == 0 and outer % g == 0:
            return g
    return None


def _requirements(kernel, out_f, in_f, bits, group_size, dtype, device) -> str | None:
    """Why ``kernel`` cannot run this layer (``None``: it can)."""
    cuda = device.type == "cuda"
    if kernel == "dequant":
        return None
    if kernel.startswith("cuda_") != cuda:
        return f"{kernel} needs a {'CUDA' if kernel.startswith('cuda_') else 'CPU'} tensor, got {device.type}"
    if kernel in ("int8pack", "cuda_int8"):
        if group_size is not None:
            return "int8pack has one scale per output channel; this layer has per-group scales"
        if dtype not in (torch.float32, torch.bfloat16):
            return f"int8pack supports float32/bfloat16 activations, got {dtype}"
        if dtype == torch.bfloat16 and in_f % 16:
            return f"int8pack with bf16 activations returns wrong values when in_features % 16 != 0 (in={in_f})"
        return None
    if kernel == "cuda_int4":
        if bits > 4:
            return f"cuda_int4 holds at most 4 bits, asked for {bits}"
        if dtype != torch.bfloat16 or torch.cuda.get_device_capability(device)[0] < 8:
            return "cuda_int4 needs bf16 activations on sm80+"
        if out_f % 8 or in_f % 128 or int4_group(in_f, group_size) is None:
            return f"cuda_int4 needs out % 8 == 0, in % 128 == 0 and a 32..256 group (out={out_f}, in={in_f})"
        return None
    # int4pack / int4x2 on CPU
    if kernel == "int4pack" and bits > 4:
        return f"int4pack holds at most 4 bits, asked for {bits}"
    if kernel == "int4x2" and bits < 5:
        # at <= 4 bits the two halves nearly cancel (-1 = -16 + 15), which costs bf16 precision; int4pack is exact
        return f"int4x2 is for 5..8 bits, asked for {bits}"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"{kernel} supports float32/bfloat16 activations, got {dtype}"
    rows = out_f * (2 if kernel == "int4x2" else 1)
    if rows % 16:
        return f"int4 packing needs out_features % 16 == 0 (packed rows {rows})"
    if int4_group(in_f, group_size) is None:
        return f"no int4pack group in {INT4_GROUPS} divides in_features={in_f} and group_size={group_size}"
    return None


def choose(out_f, in_f, bits, group_size, dtype, device, kernel="auto") -> str:
    """The kernel to use; an explicit request that cannot run falls back to ``dequant`` (said once, with why)."""
    check_kernel(kernel)
    device = torch.device(device)
    if kernel != "auto":
        why = _requirements(kernel, out_f, in_f, bits, group_size, dtype, device)
        if why is None:
            return kernel
        _say_once(f"abs_llm kernels: {kernel} unavailable for {out_f}x{in_f} at {bits} bits: {why}; using dequant")
        return "dequant"
    if device.type == "cuda":
        order = ("cuda_int4", "cuda_int8")
    elif dtype != torch.bfloat16:
        # fp32: the integer kernels have no fast fp32 path on CPU (measured 5-25x slower than F.linear)
        _say_once(f"abs_llm kernels: {dtype} activations on CPU run dequant + F.linear; int kernels are fast only in bf16")
        return "dequant"
    elif bits <= 4:
        order = ("int4pack", "int8pack")
    else:
        order = ("int8pack", "int4x2")
    whys = []
    for k in order:
        why = _requirements(k, out_f, in_f, bits, group_size, dtype, device)
        if why is None:
            return k
        whys.append(why)
    _say_once(f"abs_llm kernels: {out_f}x{in_f} at {bits} bits uses dequant: {'; '.join(whys)}")
    return "dequant"


def _flat(fn):
    """Wrap a 2-D kernel so it takes ``(..., in)`` activations and adds the bias."""

    def call(x, bias):
        shape = x.shape
        y = fn(x.reshape(-1, shape[-1]).contiguous())
        y = y.reshape(*shape[:-1], y.shape[-1])
        return y if bias is None else y + bias.to(y.dtype)

    return call


def _int4_scales_and_zeros(step: torch.Tensor, in_f: int, group_size, g: int, zero_mult: float, dtype) -> torch.Tensor:
    """Per-group steps ``(out, n_groups)`` -> int4pack's ``(in/g, out, 2)`` [scale, zero] with zero = zero_mult*scale.
    ``g`` divides our group, so each of our groups becomes ``group/g`` kernel groups with the same step."""
    outer = in_f if group_size is None else group_size
    s = step.repeat_interleave(outer // g, dim=1)[:, : in_f // g]
    return torch.stack([s, s * zero_mult], dim=-1).transpose(0, 1).contiguous().to(dtype)


@lru_cache(maxsize=None)
def _table(master_bits: int, bits: int, part: str, dtype) -> torch.Tensor:
    """256-entry lookup: master byte (as uint8) -> packed integer. Switching cost is dominated by this derivation, and a
    gather from a 256-entry table is ~5x faster than the float round-trip of :func:`core.derive` (same values)."""
    u = torch.arange(256)
    lo, hi = core.qrange(master_bits)
    q = core.derive(torch.where(u >= 128, u - 256, u).clamp(lo, hi).view(1, -1), master_bits, bits).view(-1).long()
    d = master_bits - bits
    out = {"int8": q * 2**d, "nib": q + 8, "hi": torch.div(q, 16, rounding_mode="floor") + 8,
           "lo": q - 16 * torch.div(q, 16, rounding_mode="floor")}[part]
    return out.to(dtype)


def _lookup(q_master: torch.Tensor, master_bits: int, bits: int, part: str, dtype, out=None) -> torch.Tensor:
    idx = q_master.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    table = _table(master_bits, bits, part, dtype)
    res = torch.index_select(table, 0, idx, out=None if out is None else out.view(-1))
    return res.view(q_master.shape)


def _blocked64(nib: torch.Tensor) -> torch.Tensor:
    """The CPU int4pack layout for ``out % 64 == 0``, built from uint8 nibbles: in each block of 64 rows, byte ``j`` of
    column ``k`` holds row ``j`` (low nibble) and row ``j + 32`` (high nibble). Measured 5x faster than
    ``_convert_weight_to_int4pack_for_cpu``, which also needs an int32 copy of the whole weight."""
    n, k = nib.shape
    t = nib.view(n // 64, 64, k).transpose(1, 2)
    return (t[..., :32] | (t[..., 32:] << 4)).contiguous().view(n, k // 2)


@lru_cache(maxsize=None)
def _blocked64_matches_torch() -> bool:
    """The layout is a torch internal: check it once per process against the official converter."""
    probe = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    ok = torch.equal(_blocked64(probe.to(torch.uint8)), torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1))
    if not ok:
        _say_once("abs_llm kernels: torch's int4pack CPU layout changed; packing with the (slower) official converter")
    return ok


def pack_int4_cpu(nib: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles ``(out, in)`` in [0, 15] -> ``_weight_int4pack_mm_for_cpu``'s packed weight."""
    if nib.shape[0] % 64 == 0 and _blocked64_matches_torch():
        return _blocked64(nib)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(nib.to(torch.int32), 1)


def pack(q_master, scale, master_bits, bits, group_size, dtype, device, kernel) -> Packed:
    """Derive ``bits`` from the master and prepare it for ``kernel`` (already chosen by :func:`choose`).
    ``q_master`` is the unpacked int8 master ``(out, in)``."""
    device = torch.device(device)
    out_f, in_f = q_master.shape
    d = master_bits - bits
    if kernel == "dequant":
        w = core.derived_weight(q_master, scale, master_bits, bits, group_size, dtype).to(device)
        return Packed(kernel, bits, lambda x, b: F.linear(x, w, None if b is None else b.to(x.dtype)), (w,),
                      w.numel() * w.element_size())
    if kernel in ("int8pack", "cuda_int8"):
        shared = d == 0 and q_master.dtype == torch.int8 and q_master.device == device
        w8 = q_master if shared else _lookup(q_master.cpu(), master_bits, bits, "int8", torch.int8).to(device)
        s = scale[:, 0].to(device=device, dtype=dtype).contiguous()  # master step; q_l*2^d carries the 2^d
        fn = _flat(lambda x: torch.ops.aten._weight_int8pack_mm(x, w8, s))
        return Packed(kernel, bits, fn, (w8, s), (0 if shared else w8.numel()) + s.numel() * s.element_size())
    g = int4_group(in_f, group_size)
    step = scale.float() * (2**d)
    q_master = q_master.cpu()
    if kernel == "int4x2":  # q_l = 16*hi + lo: rows [0, out) carry hi (step 16s), rows [out, 2out) carry lo (zero 8s)
        nib = torch.empty(2 * out_f, in_f, dtype=torch.uint8)
        _lookup(q_master, master_bits, bits, "hi", torch.uint8, out=nib[:out_f])
        _lookup(q_master, master_bits, bits, "lo", torch.uint8, out=nib[out_f:])
        sz = torch.cat([_int4_scales_and_zeros(step * 16, in_f, group_size, g, 0.0, dtype),
                        _int4_scales_and_zeros(step, in_f, group_size, g, 8.0, dtype)], dim=1)
    else:
        nib = _lookup(q_master, master_bits, bits, "nib", torch.uint8)
        sz = _int4_scales_and_zeros(step, in_f, group_size, g, 0.0, dtype)
    sz = sz.to(device)
    if kernel == "cuda_int4":
        u = nib.to(torch.uint8)
        w4 = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).to(device), 8)
        mm = torch.ops.aten._weight_int4pack_mm
    else:
        w4 = pack_int4_cpu(nib)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    if kernel == "int4x2":
        fn = _flat(lambda x: (lambda y: y[:, :out_f] + y[:, out_f:])(mm(x, w4, g, sz)))
    else:
        fn = _flat(lambda x: mm(x, w4, g, sz))
    return Packed(kernel, bits, fn, (w4, sz), w4.numel() * w4.element_size() + sz.numel() * sz.element_size())


def pack_checked(q_master, scale, master_bits, bits, group_size, dtype, device, kernel) -> Packed:
    """:func:`pack`, falling back to ``dequant`` if packing raises; CUDA packs are also checked against dequant."""
    try:
        p = pack(q_master, scale, master_bits, bits, group_size, dtype, device, kernel)
        if kernel.startswith("cuda_"):
            ref = pack(q_master, scale, master_bits, bits, group_size, dtype, device, "dequant")
            x = torch.randn(2, q_master.shape[1], dtype=dtype, device=device)
            want, got = ref(x, None).float(), p(x, None).float()
            if not torch.allclose(got, want, rtol=3e-2, atol=3e-2 * float(want.abs().max()) + 1e-6):
                raise RuntimeError("self-check against dequant failed")
        return p
    except Exception as e:  # a kernel problem must never take the model down
        _say_once(f"abs_llm kernels: {kernel} failed for {tuple(q_master.shape)} at {bits} bits ({e}); using dequant")
        return pack(q_master, scale, master_bits, bits, group_size, dtype, device, "dequant")
