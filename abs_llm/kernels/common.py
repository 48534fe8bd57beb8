"""What every kernel backend shares: the packed-weight record, the activation reshaping, the derivation lookup table
and the once-only log line."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .. import core

logger = logging.getLogger("abs_llm.kernels")
_said: set[str] = set()


def say_once(msg: str, level: int = logging.INFO) -> None:
    if msg not in _said:
        _said.add(msg)
        logger.log(level, msg)


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


def flat(fn):
    """Wrap a 2-D kernel so it takes ``(..., in)`` activations and adds the bias."""

    def call(x, bias):
        shape = x.shape
        y = fn(x.reshape(-1, shape[-1]).contiguous())
        y = y.reshape(*shape[:-1], y.shape[-1])
        return y if bias is None else y + bias.to(y.dtype)

    return call


@lru_cache(maxsize=None)
def _table(master_bits: int, bits: int, part: str, dtype, device=None) -> torch.Tensor:
    """256-entry lookup: master byte (as uint8) -> packed integer. Switching cost is dominated by this derivation, and a
    gather from a 256-entry table is ~5x faster than the float round-trip of :func:`core.derive` (same values)."""
    u = torch.arange(256)
    lo, hi = core.qrange(master_bits)
    q = core.derive(torch.where(u >= 128, u - 256, u).clamp(lo, hi).view(1, -1), master_bits, bits).view(-1).long()
    d = master_bits - bits
    out = {"int8": q * 2**d, "nib": q + 8, "hi": torch.div(q, 16, rounding_mode="floor") + 8,
           "lo": q - 16 * torch.div(q, 16, rounding_mode="floor")}[part]
    return out.to(dtype=dtype, device=device)


def lookup(q_master: torch.Tensor, master_bits: int, bits: int, part: str, dtype, out=None) -> torch.Tensor:
    """Derive through the table, on the master's own device: ``"int8"`` = ``q_l * 2^d``, ``"nib"`` = ``q_l + 8``,
    ``"hi"``/``"lo"`` = the two nibbles of ``q_l = 16 * (hi - 8) + lo``."""
    idx = q_master.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    table = _table(master_bits, bits, part, dtype, q_master.device if q_master.device.type != "cpu" else None)
    res = torch.index_select(table, 0, idx, out=None if out is None else out.view(-1))
    return res.view(q_master.shape)
