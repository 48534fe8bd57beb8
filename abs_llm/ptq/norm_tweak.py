"""Norm tweaking: fit each width's own norm gains (:mod:`abs_llm.norms`) by distillation from the float model.

Only the gains move, so one width's fit never changes another width or the integer master. Measured on the default
model (BENCHMARKS.md, stop 37): 100 steps of 2 x 256 tokens roughly halve the 3-bit PPL excess of the GPTQ master.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..norms import PREFIX, add_gains, apply, gain_bits, tuned_norms
from ..switching import get_bits, set_bits, switchable_layers


def tune_norms(model: nn.Module, tokenizer, bits, teacher: nn.Module, texts, steps: int = 100, lr: float = 3e-3,
               batch_size: int = 2, block_size: int = 256, seed: int = 0,
               progress: bool = True) -> dict[int, list[float]]:
    """Fit the gains of each width in ``bits`` by KL to ``teacher`` (the float model) on random ``block_size``-token
    blocks of ``texts``; only the gains move (Adam, constant then cosine decay over the last 30% of steps). The
    frozen ``model`` is left at the width it was at. Returns the KL per step for each width."""
    layers = switchable_layers(model)
    if not layers or any(m.trainable for m in layers.values()):
        raise ValueError("tune_norms needs a frozen switchable model (abs_llm.quantize / from_pretrained), not one in "
                         "training mode")
    bits = _check_bits(layers[next(iter(layers))].candidate_bits, bits, steps)
    ids = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    if len(ids) <= block_size:
        raise ValueError(f"tune_norms needs more than {block_size} tokens of text, got {len(ids)}")
    before = get_bits(model)
    kernels_before = {n: m.kernel for n, m in layers.items()}
    qcfg = getattr(getattr(model, "config", None), "quantization_config", None)
    kernel_cfg = getattr(qcfg, "kernel", None)  # set_bits mirrors the tuning's kernel into it: put it back after
    have = {b for m in tuned_norms(model).values() for b in gain_bits(m)}
    norms = add_gains(model, [b for b in bits if b not in have])
    if qcfg is not None:
        qcfg.norm_bits = sorted(set(qcfg.norm_bits or []) | set(bits), reverse=True)
    device = next(model.parameters()).device
    teacher.eval()
    log: dict[int, list[float]] = {}
    try:
        for b in bits:
            set_bits(model, b, kernel="dequant", prepare=False)  # a cached float weight: no derive per forward
            for m in norms.values():  # start every width from the float gains; train the bound tensors in place
                m._buffers[f"{PREFIX}{b}"].copy_(m._buffers["weight_float"])
            apply(model)
            params = [m._parameters["weight"] for m in norms.values()]
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=lr)
            hold = int(0.7 * steps)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < hold else 0.5 * (
                1 + math.cos(math.pi * (s - hold) / max(steps - hold, 1))))
            rng = random.Random(seed)
            log[b] = []
            for _ in tqdm(range(steps), desc=f"norm gains, {b} bits", unit="step", disable=not progress):
                starts = [rng.randrange(0, len(ids) - block_size) for _ in range(batch_size)]
                x = torch.stack([ids[s:s + block_size] for s in starts]).to(device)
                with torch.no_grad():
                    target = F.log_softmax(teacher(x).logits.float(), -1)
                out = F.log_softmax(model(x).logits.float(), -1)
                loss = F.kl_div(out, target, log_target=True, reduction="none").sum(-1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                log[b].append(loss.item())
            for p in params:
                p.requires_grad_(False)
    finally:
        for n, k in kernels_before.items():
            layers[n].kernel = k
        set_bits(model, before, prepare=False)
        if kernel_cfg is not None:
            qcfg.kernel = kernel_cfg
    return log


def _check_bits(candidates, bits, steps) -> list[int]:
    if not isinstance(bits, (list, tuple)) or not bits or not all(
            isinstance(b, int) and not isinstance(b, bool) and b in candidates for b in bits):
        raise ValueError(f"tune_norms bits must be a non-empty list of candidate widths {sorted(candidates)}, "
                         f"got {bits!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"tune_norms steps must be a positive integer, got {steps!r}")
    return sorted(set(bits), reverse=True)


def check_tune_args(config, bits, steps) -> None:
    """The checks :func:`tune_norms` makes on its arguments, before a pipeline does the slow part."""
    _check_bits(config.candidate_bits, bits, steps)

