"""What every kernel backend shares: the packed-weight record, the activation reshaping, the integer derivation
(``lookup``) and the once-only log line."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

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


def lookup(q_master: torch.Tensor, master_bits: int, bits: int, part: str, dtype, out=None) -> torch.Tensor:
    """Derive on the master's own device, in integer arithmetic (:func:`.layouts.derive_int`, bit-exact with
    :func:`core.derive`): ``"int8"`` = ``q_l * 2^d``, ``"nib"`` = ``q_l + 8``, ``"hi"``/``"lo"`` = the two nibbles of
    ``q_l = 16 * (hi - 8) + lo``. (It was a 256-entry table gather; the gather and its int32 index cost ~35 copies of
    the master on CPU, the integer ops ~6.)"""
    from .layouts import derive_int

    q = derive_int(q_master, master_bits, bits, scaled=part == "int8")
    if q.data_ptr() == q_master.data_ptr():  # d == 0 returns the master itself; the ops below work in place
        q = q.clone()
    if part == "int8":
        res = q
    elif part == "nib":
        res = q.add_(8)
    elif part == "hi":
        res = q.bitwise_right_shift_(4).add_(8)
    elif part == "lo":
        res = q.bitwise_and_(15)
    else:
        raise ValueError(f"unknown lookup part {part!r}")
    if out is not None:
        return out.copy_(res.view(out.dtype) if out.dtype == torch.uint8 else res)
    return res.view(torch.uint8) if dtype == torch.uint8 else res.to(dtype)  # nib/hi/lo are >= 0: a view is exact
