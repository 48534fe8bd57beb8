"""What a joint multi-bit QAT step does (:class:`MultiBitConfig`), its validation against a model and trainer
arguments, and the per-bit losses (KL to a teacher, next-token cross-entropy). The trainer is in training.py."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import norms
from .core import FUSED
from .switching import allowed_bits, require_layers

KD_MODES = ("teacher", "inplace", "none")


@dataclass
class MultiBitConfig:
    """What a joint multi-bit step does.

    bits: bit-widths trained, in this order within a step (None: every candidate, highest first).
    bit_weights: ``{bits: weight}`` multiplying each bit-width's loss (missing bits weigh 1); with ``step_per_bit``
        each width's gradient clip (``max_grad_norm``) is scaled by its weight too, so that clipping keeps the weights.
    bit_every: ``{bits: p}``: train that width on every ``p``-th step only (missing widths: every step), so that
        widths already near the float model (8/6 bits after ALRS) leave their share of the step to the low ones.
        Widths with the same period are staggered by their position in ``bits`` (8 on even steps, 6 on odd ones for
        ``{8: 2, 6: 2}``), so every step costs about the same; at least one trained width must run every step.
    step_per_bit: step the optimiser after each bit-width's backward (paper Alg. A.2) instead of once per batch.
    alrs: per-precision scale learning rate ``scale_lr * alrs_multiplier(master_bits, b)``; False: ``scale_lr`` for all.
    scale_lr: base learning rate of the scales (None: the weights' ``learning_rate``).
    grad_adaptive: the paper's optional gradient-adaptive term (see ``_grad_adaptive``).
    kd: "teacher" (KL to the frozen float model), "inplace" (lower bits distill from the highest bit-width, which
        itself distills from the teacher when one is given, else uses the LM loss) or "none" (LM loss only).
    kd_alpha: loss = kd_alpha * KL + (1 - kd_alpha) * LM cross-entropy (1.0: pure distillation).
    kd_temperature: softmax temperature of the KL (loss multiplied by T^2, as usual).
    per_bit_scale_state: with ``step_per_bit``, a separate optimiser state (e.g. Adam moments) for the scales per
        precision (see the module docstring); not saved in Trainer checkpoints (a resumed run restarts them).
    hasb: per step and bit-width, resample layers' bit-widths with the HASB roulette sampler (mixed-precision supernet
        training, ``abs_llm.hasb.HASBSampler``); layers not resampled train at the step's bit-width.
    hasb_traces: ``{layer: tr(H_l)/n_l}``, or a path to a JSON file holding them (``{name: trace}`` or the
        ``hasb.json`` of ``abs-llm search``); None: the traces stored in the model's quantization config.
    hasb_sigma_schedule, hasb_sigma_min, hasb_sigma_max: resampling probability sigma over training progress.
    hasb_seed: the maps are drawn from ``(hasb_seed, step, bit index)``, so resumed and DDP runs draw the same maps.
    fused: how the fake quantization runs. ``True`` / ``"compile"``: through ``torch.compile``
        (``core.fake_quantize(fused=True)``), one generated kernel per pass over the weights instead of ~10 eager
        ones; compiling takes a while on first use and needs a C++ compiler on CPU (without one: eager, one WARNING).
        ``"triton"``: one Triton pass forward and one backward, nothing saved but the latent weight and scale
        (CUDA; on CPU it falls back to the eager path). Off by default; the CPU recipe compiles (the compiled pass
        makes the weight in the autocast dtype and recomputes the mask in its backward: 1.4x cheaper bf16 steps on
        2 Xeon cores, BENCHMARKS.md stop 27), the GPU recipe does not (its former version measured slower than eager
        on an H200; BENCHMARKS.md, "QAT step").
    train_embeddings: False keeps the input embedding and an unquantized output head frozen: their gradients (a
        49k-vocabulary head's weight gradient and the embedding's scatter) are ~8% of the default model's CPU step.
    loss_norm: divide each bit-width's loss by a running mean of itself (detached), so every precision pushes the
        shared weights by its *relative* improvement. Without it a 2-bit KL of ~10 nats drowns an 8-bit KL of ~1e-3
        and the low bits drag the shared weights away from the high ones (issue 7's naive prototype).
    """

    bits: list[int] | None = None
    bit_weights: dict[int, float] | None = None
    bit_every: dict[int, int] | None = None
    step_per_bit: bool = False
    alrs: bool = True
    scale_lr: float | None = None
    grad_adaptive: bool = False
    grad_adaptive_clip: float = 1.0
    kd: str = "teacher"
    kd_alpha: float = 1.0
    kd_temperature: float = 1.0
    loss_norm: bool = False
    train_embeddings: bool = True
    fused: bool | str = False
    per_bit_scale_state: bool = False
    hasb: bool = False
    hasb_traces: dict[str, float] | str | None = None
    hasb_sigma_schedule: str = "linear"
    hasb_sigma_min: float = 0.0
    hasb_sigma_max: float = 1.0
    hasb_seed: int = 0


def kd_kl(student_logits, target_logits, mask, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(target/T) || softmax(student/T))`` averaged over the positions where ``mask`` is true."""
    return kd_kl_cached(student_logits, kd_target(target_logits, temperature), mask, temperature)


def kd_target(target_logits, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """What the KL needs from the teacher, computed once per batch and shared by every bit-width: the probabilities
    ``p = softmax(target/T)`` and log-probabilities ``log p``."""
    logq = F.log_softmax(target_logits.float() / temperature, dim=-1)
    return logq.exp(), logq


def kd_kl_cached(student_logits, target, mask, temperature: float = 1.0) -> torch.Tensor:
    """:func:`kd_kl` from a :func:`kd_target`: ``KL = sum p (log p - log_softmax(student/T))`` per position, with
    the teacher's softmax done once per batch. (Splitting it into ``sum p log p - sum p log q`` would save one more
    pass but loses the 8-bit KL, ~1e-6 nats, to float32 cancellation against the ~nats-sized entropy.)"""
    p, logq = target
    logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = torch.linalg.vecdot(p, logq - logp)
    return (kl * mask).sum() / mask.sum().clamp(min=1) * temperature * temperature


def lm_loss(logits, labels) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts ``labels[t+1]``; -100 is ignored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def widths_at(step: int, bits: list[int], every: dict[int, int] | None) -> list[tuple[int, int]]:
    """``(k, bits[k])`` of the widths a step trains, in ``bits`` order: width ``bits[k]`` with period ``p`` runs
    when ``(step + k) % p == 0`` (see ``MultiBitConfig.bit_every``)."""
    every = every or {}
    return [(k, b) for k, b in enumerate(bits) if (step + k) % every.get(b, 1) == 0]


def validate(model, args, mb: MultiBitConfig, teacher, train_dataset) -> dict:
    """Everything a MultiBitTrainer checks before it changes anything; returns the model's switchable layers."""
    if model is None:
        raise ValueError("MultiBitTrainer needs a model")
    layers = require_layers(model)
    tuned = norms.tuned_norms(model)
    if tuned:
        raise ValueError(f"the model carries per-width norm gains ({len(tuned)} norms, abs_llm.tune_norms): joint QAT "
                         "trains one set of norm gains, so start it from a checkpoint quantized without them and tune "
                         "the norms after training")
    cands = allowed_bits(model)
    bits = list(mb.bits) if mb.bits is not None else list(cands)
    bad = [b for b in bits if isinstance(b, bool) or b not in cands]
    if not bits or bad or len(set(bits)) != len(bits):
        raise ValueError(f"bits {bits} must be distinct candidate bit-widths of the model; allowed {sorted(cands)}")
    weights = mb.bit_weights or {}
    for b, w in weights.items():
        if b not in bits:
            raise ValueError(f"bit_weights has bits {b}, which is not trained (bits={bits})")
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"bit_weights[{b}]={w!r} must be a finite number >= 0")
    if all(weights.get(b, 1.0) == 0 for b in bits):
        raise ValueError("all bit_weights are 0: nothing would be trained")
    every = mb.bit_every or {}
    for b, p in every.items():
        if b not in bits:
            raise ValueError(f"bit_every has bits {b}, which is not trained (bits={bits})")
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"bit_every[{b}]={p!r} must be a whole number of steps >= 1")
    if not any(every.get(b, 1) == 1 and weights.get(b, 1.0) > 0 for b in bits):
        raise ValueError(f"bit_every {every} leaves no trained width running every step; give one width period 1")
    if args is not None:
        if not args.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {args.learning_rate}")
        if mb.step_per_bit and args.gradient_accumulation_steps != 1:
            raise ValueError("step_per_bit steps the optimiser inside each batch; use gradient_accumulation_steps=1")
    if mb.per_bit_scale_state and not mb.step_per_bit:
        raise ValueError("per_bit_scale_state needs step_per_bit=True (one optimiser step per bit-width)")
    if mb.scale_lr is not None and not mb.scale_lr > 0:
        raise ValueError(f"scale_lr must be > 0, got {mb.scale_lr}")
    if mb.kd not in KD_MODES:
        raise ValueError(f"kd must be one of {KD_MODES}, got {mb.kd!r}")
    if mb.kd == "teacher" and teacher is None:
        raise ValueError("kd='teacher' needs the frozen float model: MultiBitTrainer(..., teacher=float_model)")
    if mb.kd == "inplace" and (bits[0] != max(bits) or weights.get(bits[0], 1.0) == 0
                               or every.get(bits[0], 1) != 1):
        raise ValueError(f"kd='inplace' distills from the highest bit-width: it must come first with a weight > 0"
                         f" and run every step; got bits {bits}, bit_every {every}")
    if not 0.0 <= mb.kd_alpha <= 1.0 or not mb.kd_temperature > 0:
        raise ValueError("kd_alpha must be in [0, 1] and kd_temperature > 0")
    if mb.fused not in FUSED:
        raise ValueError(f"fused must be one of {FUSED} (True = 'compile'), got {mb.fused!r}")
    if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
        raise ValueError("the training dataset is empty")
    return layers
