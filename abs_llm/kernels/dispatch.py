"""Which kernel runs a layer: chosen per (bits, group size, device, activation dtype); packing with a safety net.

A :class:`~.common.Packed` holds one layer's weight prepared for one kernel at one bit-width; calling it computes
``x @ W_l^T`` where ``W_l = q_l * s_h * 2^d`` (docs/architecture.md). ``dequant`` (derive, dequantize to the
activation dtype, ``F.linear``) is always correct and is the reference every other kernel is checked against.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .. import core
from .common import Packed, say_once
from .cpu import INT4_GROUPS, int4_group, int4_nbytes, pack_int4, pack_int8
from .cuda import pack_cuda_int4, pack_cuda_int8

KERNELS = ("auto", "dequant", "int8pack", "int4pack", "int4x2", "cuda_int4", "cuda_int8", "triton")


def check_kernel(kernel) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not known; choose one of {list(KERNELS)}")
    return kernel


def requirements(kernel, out_f, in_f, bits, group_size, dtype, device) -> str | None:
    """Why ``kernel`` cannot run this layer (``None``: it can)."""
    cuda = device.type == "cuda"
    if kernel == "dequant":
        return None
    if kernel == "triton":  # Triton kernels (triton_*.py): every width, both scale kinds, bf16/fp16, CUDA
        from .triton_base import requirements as triton_requirements  # imports no kernel (see triton_base)

        return triton_requirements(out_f, in_f, bits, group_size, dtype, device)
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
    """The kernel to use. An explicit request that cannot run falls back to ``dequant`` with one WARNING saying why
    (the user asked for it, so they must see it); ``auto`` falls back quietly (INFO)."""
    check_kernel(kernel)
    device = torch.device(device)
    if kernel != "auto":
        why = requirements(kernel, out_f, in_f, bits, group_size, dtype, device)
        if why is None:
            return kernel
        say_once(f"abs_llm kernels: {kernel} unavailable for {out_f}x{in_f} at {bits} bits: {why}; using dequant",
                 logging.WARNING)
        return "dequant"
    if device.type == "cuda":
        # not cuda_int4/cuda_int8 (aten tinygemm): measured slower than bf16 F.linear at M >= 16 (int4) and at every M
        # (int8) on an H200 (issue 12); they stay available by name
        order = ("triton",)
    elif dtype != torch.bfloat16:
        # fp32: the integer kernels have no fast fp32 path on CPU (measured 5-25x slower than F.linear)
        say_once(f"abs_llm kernels: {dtype} activations on CPU run dequant + F.linear; int kernels are fast only in bf16")
        return "dequant"
    elif bits <= 4:
        order = ("int4pack", "int8pack")
    else:
        order = ("int8pack", "int4x2")
    whys = []
    for k in order:
        why = requirements(k, out_f, in_f, bits, group_size, dtype, device)
        if why is None:
            return k
        whys.append(why)
    say_once(f"abs_llm kernels: {out_f}x{in_f} at {bits} bits uses dequant: {'; '.join(whys)}")
    return "dequant"


def packed_nbytes(kernel, out_f, in_f, group_size, dtype) -> int | None:
    """``Packed.nbytes`` of ``kernel`` for this layer when it is the same at every width (``None``: it is not, or
    not known before packing): what a layer's cache must make room for before packing, so that it can hand the
    evicted buffers to :func:`pack` as ``spare``."""
    if kernel in ("int4pack", "int4x2"):
        return int4_nbytes(out_f, in_f, group_size, dtype, kernel)
    return None


def pack(q_master, scale, master_bits, bits, group_size, dtype, device, kernel, spare=None) -> Packed:
    """Derive ``bits`` from the master and prepare it for ``kernel`` (already chosen by :func:`choose`).
    ``q_master`` is the unpacked int8 master ``(out, in)``. ``spare``: an evicted :class:`Packed` of the same
    kernel that nothing else references; a CPU int4 pack writes into its buffers instead of allocating."""
    device = torch.device(device)
    if kernel == "dequant":
        w = core.derived_weight(q_master.to(device), scale.to(device), master_bits, bits, group_size, dtype)
        return Packed(kernel, bits, lambda x, b: F.linear(x, w, None if b is None else b.to(x.dtype)), (w,),
                      w.numel() * w.element_size())
    if kernel == "int8pack":
        return pack_int8(q_master, scale, master_bits, bits, dtype, device)
    if kernel in ("int4pack", "int4x2"):
        return pack_int4(q_master, scale, master_bits, bits, group_size, dtype, kernel, spare)
    if kernel == "cuda_int8":
        return pack_cuda_int8(q_master, scale, master_bits, bits, dtype, device)
    if kernel == "cuda_int4":
        return pack_cuda_int4(q_master, scale, master_bits, bits, group_size, dtype, device)
    if kernel == "triton":  # checks itself once per (width, scales, dtype, shape): a switch must not pay a matmul
        from .triton_linear import pack_triton

        return pack_triton(q_master, scale, master_bits, bits, group_size, dtype, device)
    raise ValueError(f"no packer for kernel {kernel!r}")


def pack_checked(q_master, scale, master_bits, bits, group_size, dtype, device, kernel, spare=None) -> Packed:
    """:func:`pack`, falling back to ``dequant`` if packing raises; CUDA packs are also checked against dequant
    (the ``triton`` kernel inside :func:`pack`, once per width and shape)."""
    try:
        p = pack(q_master, scale, master_bits, bits, group_size, dtype, device, kernel, spare)
        if kernel.startswith("cuda_"):
            ref = pack(q_master, scale, master_bits, bits, group_size, dtype, device, "dequant")
            x = torch.randn(2, q_master.shape[1], dtype=dtype, device=device)
            want, got = ref(x, None).float(), p(x, None).float()
            if not torch.allclose(got, want, rtol=3e-2, atol=3e-2 * float(want.abs().max()) + 1e-6):
                raise RuntimeError("self-check against dequant failed")
        return p
    except Exception as e:  # a kernel problem must never take the model down; the WARNING carries the real error
        say_once(f"abs_llm kernels: {kernel} failed for {tuple(q_master.shape)} at {bits} bits ({type(e).__name__}: "
                 f"{e}); using dequant", logging.WARNING)
        return pack(q_master, scale, master_bits, bits, group_size, dtype, device, "dequant")
