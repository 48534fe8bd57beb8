"""Packed layouts of the derived widths for the Triton kernels, plus the integer derivation they start from.

Bytes read per weight are what a memory-bound matmul costs, so a width ``l`` is stored in ``l`` bits: it is split into
bit-planes of 4, 2 and 1 bits (6 = 4+2, 5 = 4+1, 3 = 2+1, 7 = 4+2+1), each plane packed into int32 words. At the
master's own width (8) nothing is packed: the kernels read the int8 master itself (zero copy).

Each plane stores the unsigned value ``u = q_l + 2^(l-1)`` (in ``[0, 2^l)``); plane ``p`` of width ``w`` holds bits
``[sh, sh + w)`` of ``u``. Word order, identical for every plane of a layout, so that one weight's bits are found at the
same (row, segment) in each plane: the input dimension ``K`` is cut into blocks of ``L * SEG`` columns (``L = 32 /
w_min`` segments of ``SEG`` consecutive columns). A plane with ``E = 32 / w`` lanes stores a block as ``L / E`` word
groups of ``SEG`` words; lane ``j`` (bits ``[j*w, (j+1)*w)``) of word ``t`` of group ``g`` holds column
``block * L * SEG + (g * E + j) * SEG + t``. So a kernel unpacks a whole segment (``SEG`` consecutive columns, one scale
group when ``SEG`` divides the group size) with one shift and one mask per plane, and multiplies it with a contiguous
slice of the activations. ``K`` is padded to whole blocks with ``u = 2^(l-1)`` (i.e. ``q_l = 0``).

All functions here are plain torch ops on any device: the reference for the Triton pack kernel and its fallback.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .. import core

SEG = 16  # columns per segment: the K of one tensor-core dot, and a divisor of every allowed group size (>= 16)
PLANES = {7: (4, 2, 1), 6: (4, 2), 5: (4, 1), 4: (4,), 3: (2, 1), 2: (2,), 1: (1,)}


@dataclass(frozen=True)
class Layout:
    bits: int
    out_features: int
    in_features: int

    @functools.cached_property  # a switch asks several times per layer
    def widths(self) -> tuple[int, ...]:
        return PLANES[self.bits]

    @functools.cached_property
    def shifts(self) -> tuple[int, ...]:
        """Bit offset of each plane inside ``u`` (the first plane holds the top bits)."""
        out, sh = [], self.bits
        for w in self.widths:
            sh -= w
            out.append(sh)
        return tuple(out)

    @functools.cached_property
    def planes3(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(widths, shifts)`` padded with zeros to three planes: the kernels' ``W0..W2`` / ``SH0..SH2``."""
        pad = (0,) * (3 - len(self.widths))
        return self.widths + pad, self.shifts + pad

    @functools.cached_property
    def lanes(self) -> int:
        """Segments per block (``L``): the lane count of the narrowest plane."""
        return 32 // min(self.widths)

    @functools.cached_property
    def block(self) -> int:
        return self.lanes * SEG

    @functools.cached_property
    def nblocks(self) -> int:
        return math.ceil(self.in_features / self.block)

    def words_per_block(self, w: int) -> int:
        return (self.lanes // (32 // w)) * SEG

    def row_words(self, w: int) -> int:
        return self.nblocks * self.words_per_block(w)

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(self.out_features * self.row_words(w) * 4 for w in self.widths)


@functools.cache
def layout(bits: int, out_features: int, in_features: int) -> Layout:
    """The :class:`Layout` of a shape, made once: a switch asks for it per layer, and its properties are cached on it."""
    return Layout(bits, out_features, in_features)


def derive_int(q_master: torch.Tensor, master_bits: int, bits: int, scaled: bool = False) -> torch.Tensor:
    """:func:`abs_llm.core.derive` in integer arithmetic on int8 (no float pass, no comparison, no lookup): round half
    to even of ``q / 2^d`` is ``(q + 2^(d-1) - 1 + p) >> d`` with ``p = (q >> d) & 1`` the parity of the floor
    (``>>`` is a floor). Clamping ``q`` first to ``C = (2^(l-1) - 1) * 2^d`` (which maps to the top value ``2^(l-1) -
    1`` exactly, and every larger ``q`` maps there too) keeps every intermediate inside int8 and makes the result's own
    clamp unnecessary; the bottom cannot leave the range (``-128 >> d`` is the bottom value). Six int8 passes.
    ``scaled``: return ``q_l * 2^d`` (the last shift becomes a mask). At ``d == 0`` the master itself is returned."""
    d = master_bits - bits
    if d < 0 or bits < 1 or d > 6:
        raise ValueError(f"cannot derive {bits} bits from a {master_bits}-bit master")
    q = q_master.to(torch.int8)
    if d == 0:
        return q
    q = q.clamp_max((2 ** (bits - 1) - 1) * 2**d)
    p = (q >> d).bitwise_and_(1).add_(2 ** (d - 1) - 1).add_(q)
    return p.bitwise_and_(-(2**d)) if scaled else p.bitwise_right_shift_(d)


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def pack_planes(q_master: torch.Tensor, master_bits: int, bits: int) -> tuple[torch.Tensor, ...]:
    """Derive ``bits`` from the int8 master ``(out, in)`` and pack it: one int32 tensor ``(out, row_words(w))`` per
    plane. Torch ops only (works on any device); the Triton pack kernel produces the same words in one pass."""
    n, k = q_master.shape
    lay = layout(bits, n, k)
    u = derive_int(q_master, master_bits, bits).to(torch.int64) + 2 ** (bits - 1)
    pad = lay.nblocks * lay.block - k
    if pad:
        u = torch.nn.functional.pad(u, (0, pad), value=2 ** (bits - 1))
    planes = []
    for w, sh in zip(lay.widths, lay.shifts):
        e = 32 // w
        part = ((u >> sh) & (2**w - 1)).view(n, lay.nblocks, lay.lanes // e, e, SEG)
        lane_shift = (torch.arange(e, device=u.device) * w).view(1, 1, 1, e, 1)
        planes.append(_to_int32((part << lane_shift).sum(dim=3)).reshape(n, lay.row_words(w)).contiguous())
    return tuple(planes)


def unpack_planes(planes, bits: int, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_planes`: ``q_l`` as int8 ``(out, in)``."""
    lay = layout(bits, out_features, in_features)
    n = out_features
    u = torch.zeros(n, lay.nblocks * lay.block, dtype=torch.int64, device=planes[0].device)
    for p, w, sh in zip(planes, lay.widths, lay.shifts):
        e = 32 // w
        words = p.to(torch.int64).view(n, lay.nblocks, lay.lanes // e, 1, SEG)
        lane_shift = (torch.arange(e, device=p.device) * w).view(1, 1, 1, e, 1)
        u |= (((words >> lane_shift) & (2**w - 1)) << sh).reshape(n, -1)
    return (u[:, :in_features] - 2 ** (bits - 1)).to(torch.int8)


def dequantize_planes(planes, scale, master_bits, bits, group_size, out_features, in_features, dtype=torch.float32):
    """Float weight from packed planes (test reference): ``q_l * s_h * 2^d``."""
    q = unpack_planes(planes, bits, out_features, in_features)
    return core.dequantize(q, scale, master_bits, bits, group_size, dtype)
