"""Triton import guard and the interpreter fixes that let CI (no GPU) run the kernels on CPU tensors.

``TRITON_INTERPRET=1`` must be set before triton is imported; then every kernel runs in numpy. Two gaps of Triton
3.6's interpreter are patched here (interpreter only; compiled kernels are untouched):

- with numpy >= 2.4, a runtime integer used as a loop bound (``range(0, K, ...)``) fails: numpy refuses ``int()`` of a
  one-element array;
- bfloat16 is held as raw uint16 bits, so ``tl.dot`` on bf16 operands multiplies bit patterns. Our kernels do all
  elementwise math in fp32 (bf16 only at loads, the dot and the final store), so converting bf16 dot operands to fp32
  is the only fix needed.
"""

from __future__ import annotations

import os
from functools import lru_cache

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton is optional (Linux x86_64 extra)
    triton = None
    tl = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def available() -> bool:
    """Triton importable (and the interpreter patched when it is in use)."""
    if triton is None:
        return False
    if interpreting():
        _patch_interpreter()
    return True


def _patch_interpreter() -> None:
    import numpy as np
    from triton.runtime import interpreter as it

    if getattr(it, "_abs_llm_patched", False):
        return
    orig_tensor = it._patch_lang_tensor

    def patch_tensor(tensor, scope):
        orig_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    builder = it.InterpreterBuilder
    orig_dot = builder.create_dot

    def to_f32(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        data = it._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32).reshape(h.data.shape)
        return it.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig_dot(self, to_f32(a), to_f32(b), d, input_precision, max_num_imprecise_acc)

    it._patch_lang_tensor = patch_tensor
    builder.create_dot = create_dot
    it._abs_llm_patched = True
