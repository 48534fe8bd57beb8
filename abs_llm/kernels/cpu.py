"""CPU kernels from stock PyTorch ops (docs/architecture.md, "Kernels").

- ``int8pack`` (per-channel scales only): ``aten._weight_int8pack_mm`` on ``q_l * 2^d`` stored as int8 with the
  master's per-row scale -- exact, and at ``bits == master_bits`` of an 8-bit master it *is* the master (no copy).
- ``int4pack`` (bits <= 4): ``aten._weight_int4pack_mm_for_cpu``; nibble ``q_l + 8``, per-group scale ``s_h * 2^d``,
  zero 0. A kernel group ``g`` in {32..256} that divides both our group and ``in_features`` is used, so per-channel
  layers, groups of 512/1024 and the short last group all map exactly (scales repeated).
- ``int4x2`` (bits 5..8 with per-group scales, where int8pack cannot hold the scales): ``q_l = 16*hi + lo`` with ``hi``
  in [-8, 7] and ``lo`` in [0, 15]; both halves go through one int4pack call on a ``(2*out, in)`` weight and are summed.
  Same bytes as int8, exact up to float rounding of the two partial sums.

Traps measured on an AMD EPYC (AVX512-BF16), torch 2.13 CPU, and guarded in :mod:`.dispatch`:

- ``_weight_int8pack_mm`` with bf16 activations returns garbage/NaN (silently!) when ``in_features % 16 != 0``.
- with fp32 activations both int kernels are 5-25x *slower* than fp32 ``F.linear`` (no vectorised fp32 path), so
  ``auto`` uses ``dequant`` for fp32; bf16 decode with int kernels is ~3.5x faster than bf16 ``F.linear`` at 1B shapes.
- ``_convert_weight_to_int4pack_for_cpu`` raises unless ``out_features % 16 == 0``; ``_weight_int4pack_mm_for_cpu``
  raises unless the group is 32/64/128/256 and divides ``in_features``.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from . import cpu_fused, cpu_inplace
from .common import Packed, flat, lookup, say_once

INT4_GROUPS = (256, 128, 64, 32)


def int4_group(in_features: int, group_size: int | None) -> int | None:
    """Largest int4pack group that divides ``in_features`` and our group (so every kernel group has one scale)."""
    outer = in_features if group_size is None else group_size
    for g in INT4_GROUPS:
        if in_features % g == 0 and outer % g == 0:
            return g
    return None


def int4_scales_and_zeros(step: torch.Tensor, in_f: int, group_size, g: int, zero_mult: float, dtype,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group steps ``(out, n_groups)`` -> int4pack's ``(in/g, out, 2)`` [scale, zero] with zero = zero_mult*scale.
    ``g`` divides our group, so each of our groups becomes ``group/g`` kernel groups with the same step. Written
    into ``out`` when given; two strided writes instead of stack + transpose + copy + cast (a switch pays this per
    layer)."""
    n = in_f // g
    outer = in_f if group_size is None else group_size
    if step.shape[1] == 1:  # per channel
        s = step.expand(-1, n)
    else:
        s = (step if outer == g else step.repeat_interleave(outer // g, dim=1))[:, :n]
    if out is None:
        out = torch.empty(n, step.shape[0], 2, dtype=dtype, device=step.device)
    out[..., 0] = s.t()
    torch.mul(s.t(), zero_mult, out=out[..., 1])
    return out


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
        say_once("abs_llm kernels: torch's int4pack CPU layout changed; packing with the (slower) official converter")
    return ok


def pack_int4_cpu(nib: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles ``(out, in)`` in [0, 15] -> ``_weight_int4pack_mm_for_cpu``'s packed weight."""
    if nib.shape[0] % 64 == 0 and _blocked64_matches_torch():
        return _blocked64(nib)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(nib.to(torch.int32), 1)


def int4_nibbles(q_master, master_bits, bits, kernel) -> torch.Tensor:
    """Eager nibbles for the int4 kernel: ``q_l + 8`` (int4pack), or hi rows then lo rows (int4x2)."""
    if kernel != "int4x2":
        return lookup(q_master, master_bits, bits, "nib", torch.uint8)
    out_f = q_master.shape[0]
    nib = torch.empty(2 * out_f, q_master.shape[1], dtype=torch.uint8)
    lookup(q_master, master_bits, bits, "hi", torch.uint8, out=nib[:out_f])
    lookup(q_master, master_bits, bits, "lo", torch.uint8, out=nib[out_f:])
    return nib


def pack_int8(q_master, scale, master_bits, bits, dtype, device, kernel="int8pack") -> Packed:
    """``_weight_int8pack_mm`` on ``q_l * 2^d`` with the master's per-row step (CPU, and CUDA for ``cuda_int8``)."""
    d = master_bits - bits
    shared = d == 0 and q_master.dtype == torch.int8 and q_master.device == device
    w8 = q_master if shared else cpu_fused.scaled_int8(q_master, master_bits, bits) if device.type == "cpu" else None
    if w8 is None:  # not on CPU, or the fused path is off / unavailable
        w8 = lookup(q_master.to(device), master_bits, bits, "int8", torch.int8)
    s = scale[:, 0].to(device=device, dtype=dtype).contiguous()  # master step; q_l*2^d carries the 2^d
    fn = flat(lambda x: torch.ops.aten._weight_int8pack_mm(x, w8, s))
    return Packed(kernel, bits, fn, (w8, s), (0 if shared else w8.numel()) + s.numel() * s.element_size())


def int4_nbytes(out_f, in_f, group_size, dtype, kernel) -> int:
    """Bytes of what :func:`pack_int4` returns (its ``Packed.nbytes``): the same at every width."""
    planes = 2 if kernel == "int4x2" else 1
    return planes * out_f * in_f // 2 + (in_f // int4_group(in_f, group_size)) * planes * out_f * 2 * dtype.itemsize


def pack_int4(q_master, scale, master_bits, bits, group_size, dtype, kernel, spare=None) -> Packed:
    """``int4pack`` (nibbles ``q_l + 8``) or ``int4x2`` (hi/lo nibble halves, summed) for the CPU int4 kernel.
    ``spare``: an evicted :class:`Packed` of the same kernel that nothing else holds; its buffers are overwritten
    when they fit, rewritten in place where :mod:`.cpu_inplace` applies (fused path only)."""
    out_f, in_f = q_master.shape
    g = int4_group(in_f, group_size)
    q_master = q_master.cpu()
    spare_w4, spare_sz = spare.tensors if spare is not None and len(spare.tensors) == 2 else (None, None)

    def eager_scales(out=None):
        step = scale.float() * (2 ** (master_bits - bits))
        if kernel == "int4x2":  # q_l = 16*hi + lo: rows [0, out) carry hi (step 16s), rows [out, 2out) lo (zero 8s)
            out = torch.empty(in_f // g, 2 * out_f, 2, dtype=dtype) if out is None else out
            int4_scales_and_zeros(step * 16, in_f, group_size, g, 0.0, dtype, out=out[:, :out_f])
            int4_scales_and_zeros(step, in_f, group_size, g, 8.0, dtype, out=out[:, out_f:])
            return out
        return int4_scales_and_zeros(step, in_f, group_size, g, 0.0, dtype, out=out)

    planes = 2 if kernel == "int4x2" else 1
    sz = cpu_inplace.int4_scales(spare, bits, dtype, (in_f // g, planes * out_f, 2), eager_scales)
    if sz is None:
        sz = cpu_fused.int4_scales(scale, master_bits - bits, in_f, group_size, g, dtype, kernel, spare_sz,
                                   eager_scales)
    if sz is None:
        sz = eager_scales()
    w4 = None
    if _blocked64_matches_torch():
        if kernel == "int4x2":
            w4 = cpu_inplace.int4x2_weight(spare, master_bits, bits, q_master.shape)
        if w4 is None:
            w4 = cpu_fused.int4_blocked(q_master, master_bits, bits, kernel, spare_w4)
    if w4 is None:  # fused path off / unavailable, or out % 64 != 0
        w4 = pack_int4_cpu(int4_nibbles(q_master, master_bits, bits, kernel))
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    if kernel == "int4x2":
        fn = flat(lambda x: (lambda y: y[:, :out_f] + y[:, out_f:])(mm(x, w4, g, sz)))
    else:
        fn = flat(lambda x: mm(x, w4, g, sz))
    return Packed(kernel, bits, fn, (w4, sz), w4.numel() * w4.element_size() + sz.numel() * sz.element_size())
