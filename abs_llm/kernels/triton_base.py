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

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton is optional (Linux x86_64 extra)
    triton = None
    tl = None


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for grids: ``triton.cdiv`` is a constexpr function, ~5 us per call from host code, paid per
    launch (a layer's forward outside a CUDA graph, every layer of a switch)."""
    return -(-a // b)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def requirements(out_f, in_f, bits, group_size, dtype, device) -> str | None:
    from .layouts import SEG

    if not available():
        return "triton is not installed"
    if device.type != "cuda" and not (interpreting() and device.type == "cpu"):
        return f"the triton kernel needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU), got {device.type}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"the triton kernel supports bfloat16/float16 activations, got {dtype}"
    if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] < 8:
        return "bfloat16 tensor-core dots need sm80+"
    if group_size is not None and group_size % SEG:
        return f"group_size {group_size} is not a multiple of {SEG}"
    if bits < 2:
        return f"the triton kernel runs 2..8 bits, asked for {bits}"
    return None
