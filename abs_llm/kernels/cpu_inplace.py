"""A cold CPU switch that rewrites the evicted width's buffers in place instead of packing again from the master.

When a layer's cache evicts an int4 pack of the same kernel to make room (:meth:`.layers.SwitchableLinear._make_room`),
two parts of the new pack follow from the evicted one without the master (issue 12: a cold switch <= 3x a copy):

- **scales**: the int4 kernels' bf16 scales and zeros at width ``l`` are ``round_bf16(s * 2^(h - l) * c)``; multiplying
  a normal number by a power of two and rounding commute, so the new ones are the evicted ones with ``b_old - l``
  added to each exponent field (exact; zeros stay zero; anything that would leave the normal range -> the full path).
- **int4x2 weight from the master width**: the evicted pack at ``bits == master_bits`` holds every master byte as the
  nibble pair ``u = q_h + 128 = 16 * hi + lo``, the hi plane and the lo plane at the same byte offsets of the
  ``_blocked64`` layout. Deriving is elementwise, so the new planes are written over the old ones byte for byte, with
  the same rounding as :func:`.cpu_fused._build`: one streaming pass and no byte transpose (from any other width the
  derivation would round twice, so it starts from the master as before).

Both are bit-exact with packing from the master (tested); either returns ``None`` where it does not apply, and the
caller packs from the master.
"""

from __future__ import annotations

import numpy as np
import torch

from . import cpu_fused


def build_x2_from_master(njit, d: int):
    u8 = np.uint8
    d, half, parity = u8(d), u8((2**d - 1) >> 1), u8(1 if d else 0)
    f15, f240, four = u8(15), u8(240), u8(4)

    @njit("void(uint8[::1], uint8[::1], uint8, uint8)", cache=True, nogil=True)
    def x2_from_master(hi, lo, umax, off):
        # byte i of each plane holds the nibbles of two rows (low nibble: row j, high: row j + 32)
        for i in range(hi.shape[0]):
            h, el = hi[i], lo[i]
            a = min(u8((h << four) | (el & f15)), umax)
            b = min(u8((h & f240) | (el >> four)), umax)
            ra = u8(((a + half + ((a >> d) & parity)) >> d) + off)
            rb = u8(((b + half + ((b >> d) & parity)) >> d) + off)
            hi[i] = u8((ra >> four) | (rb & f240))
            lo[i] = u8((ra & f15) | (rb << four))

    return x2_from_master


def build_rescale(njit):
    u16 = np.uint16

    @njit("boolean(uint16[::1], int64)", cache=True, nogil=True)
    def rescale(x, delta):
        # x: bf16 bits. False (nothing written): a subnormal, inf or NaN, or a result outside the normal range
        # (checked in its own loop: a check inside the writing loop stops LLVM from vectorising it)
        bad = 0
        for i in range(x.shape[0]):
            a = np.int64(x[i] & u16(0x7FFF))
            e = a >> 7
            bad += (a != 0) & ((e == 0) | (e == 255) | (e + delta < 1) | (e + delta > 254))
        if bad:
            return False
        add = u16((delta << 7) & 0xFFFF)  # a negative delta wraps: adding it subtracts from the exponent
        for i in range(x.shape[0]):
            nz = u16(0) - u16((x[i] & u16(0x7FFF)) != u16(0))
            x[i] = u16(x[i] + (add & nz))
        return True

    return rescale


def int4_scales(spare, bits: int, dtype, shape, eager) -> torch.Tensor | None:
    """The evicted pack's scales and zeros (``shape``) rescaled in place to ``bits``; ``None``: not applicable (use
    the full path). ``eager(out)`` fills ``out`` instead if a queued call refuses its input."""
    if spare is None or len(spare.tensors) != 2 or dtype != torch.bfloat16:
        return None
    sz = spare.tensors[1]
    if sz.dtype != dtype or sz.device.type != "cpu" or not sz.is_contiguous() or tuple(sz.shape) != tuple(shape):
        return None
    fn = cpu_fused.kernel(0, "rescale")
    if fn is None:
        return None
    args = (sz.view(torch.uint16).numpy().reshape(-1), spare.bits - bits)
    return sz if cpu_fused._call(fn, args, lambda: cpu_fused._eager_into(eager, sz)) else None


def int4x2_weight(spare, master_bits: int, bits: int, shape) -> torch.Tensor | None:
    """The int4x2 weight at ``bits`` written over the evicted pack of the master width (``shape``: the master's
    ``(out, in)``; the caller has checked that the pack is in the ``_blocked64`` layout); ``None``: not applicable
    (use the full path)."""
    n, k = shape
    if spare is None or spare.kernel != "int4x2" or spare.bits != master_bits or n % 64 or k % 2 or n == 0:
        return None
    w4 = spare.tensors[0]
    if w4.dtype != torch.uint8 or w4.device.type != "cpu" or not w4.is_contiguous() or w4.numel() != n * k:
        return None
    c = cpu_fused.constants(master_bits, bits, "x2")
    fn = cpu_fused.kernel(c["d"], "x2_from_master")
    if fn is None:
        return None
    planes = w4.view(2, n * k // 2).numpy()
    return w4 if cpu_fused._call(fn, (planes[0], planes[1], c["umax"], c["off"])) else None

