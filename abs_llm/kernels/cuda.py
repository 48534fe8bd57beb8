"""CUDA kernels: ``cuda_int4`` (``aten._weight_int4pack_mm``, tinygemm, bf16, sm80+) and ``cuda_int8``
(``aten._weight_int8pack_mm``). Not testable on the CPU-only dev machines, so every CUDA pack is checked once against
the dequantized reference and falls back to ``dequant`` (see :func:`.dispatch.pack_checked`)."""

from __future__ import annotations

import torch

from .common import Packed, flat, lookup
from .cpu import int4_group, int4_scales_and_zeros, pack_int8


def pack_cuda_int8(q_master, scale, master_bits, bits, dtype, device) -> Packed:
    return pack_int8(q_master, scale, master_bits, bits, dtype, device, kernel="cuda_int8")


def pack_cuda_int4(q_master, scale, master_bits, bits, group_size, dtype, device) -> Packed:
    out_f, in_f = q_master.shape
    g = int4_group(in_f, group_size)
    step = scale.float() * (2 ** (master_bits - bits))
    u = lookup(q_master.to(device), master_bits, bits, "nib", torch.uint8)
    sz = int4_scales_and_zeros(step.to(device), in_f, group_size, g, 0.0, dtype)
    w4 = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).contiguous(), 8)
    fn = flat(lambda x: torch.ops.aten._weight_int4pack_mm(x, w4, g, sz))
    return Packed("cuda_int4", bits, fn, (w4, sz), w4.numel() * w4.element_size() + sz.numel() * sz.element_size())
