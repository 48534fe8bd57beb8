"""Fake quantization for QAT through ``torch.compile`` (``MultiBitConfig.fused="compile"``; issue 16).

Two functions over the weight viewed as rows of one group each, built from :func:`abs_llm.core._fq_forward` /
``_fq_backward`` so the math is the eager one:

- forward: only ``W_l``, rounded to the output dtype (bf16 under autocast) in the same generated pass;
- backward: ``q_l`` and the clipping mask recomputed from ``W`` and ``s`` (read anyway for the scale's gradient)
  instead of saved, the incoming gradient widened to float32 in the same pass.

On a 2-core AMX Xeon one width over the default model's 210 layers took 256 ms against 770 ms eager (BENCHMARKS.md,
stop 27). A compiler failure (e.g. no C++ compiler on a CPU) is logged once at WARNING and the same functions then
run eagerly.
"""

from __future__ import annotations

import logging

import torch

from ..core import _fq_backward, _fq_forward
from .common import say_once


def forward_to(w2, s2, inv, lo_h, lo, hi, step, dtype):
    return _fq_forward(w2, s2, inv, lo_h, lo, hi, step)[0].to(dtype)


def backward_again(g2, w2, s1, inv, lo_h, lo, hi, step):
    _, q, inside = _fq_forward(w2, s1.unsqueeze(-1), inv, lo_h, lo, hi, step)
    return _fq_backward(g2.float(), w2, s1, q, inside, step)


def kernels():
    """``(forward, backward)``, each compiled lazily on its first call."""
    return _compiled(forward_to), _compiled(backward_again)


def _compiled(fn):
    compiled = [torch.compile(fn, fullgraph=True)]

    def call(*args):
        try:
            return compiled[0](*args)
        except Exception as e:  # torch._dynamo/_inductor wrap compiler errors in several exception types
            if compiled[0] is fn or not _is_compile_error(e):
                raise
            say_once(f"abs_llm: fused fake quantization: torch.compile failed ({type(e).__name__}); running it "
                     "eagerly", logging.WARNING)
            compiled[0] = fn
            return fn(*args)

    return call


def _is_compile_error(e: Exception) -> bool:
    """Dynamo's and Inductor's own exceptions (BackendCompilerFailed, InductorError, CppCompileError, ...); a real
    error in the math would raise again from the eager run."""
    return type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))
