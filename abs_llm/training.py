"""Joint multi-bit quantization-aware training (paper Alg. A.2) as a ``transformers.Trainer`` subclass.

One optimisation step = one batch, run forward/backward once per bit-width of ``MultiBitConfig.bits`` (in that order),
all bit-widths sharing the latent float weights and the scales of every ``SwitchableLinear``.

Per-precision learning rate of the scales (ALRS, DESIGN.md). A scale tensor is shared by every bit-width, so "the
scale LR of precision b" can only mean "the update that precision b's gradient causes is scaled by eta_b":

- ``step_per_bit=True`` (the paper): the optimiser steps after every bit-width's backward, and during bit b's step
  the scale group's learning rate is ``scale_lr * eta_b`` (then restored). With SGD that is an exact per-precision LR.
  With Adam the moments of the scales are shared by the precisions, so bit 8's step (LR x 1) applies a direction
  averaged mostly from the low bits' large scale gradients: the low bits then move the scales at the 8-bit rate.
  ``per_bit_scale_state=True`` gives each precision its own optimiser state for the scales, so precision b's update
  uses only its own gradients at its own rate (the weights keep one shared state: they train jointly on purpose).
- ``step_per_bit=False`` (accumulate, one step per batch): a gradient hook multiplies bit b's contribution to each
  scale gradient by ``eta_b`` before it is accumulated (and before DDP all-reduces it). For SGD that is exactly a
  per-precision LR. For Adam the common factor is normalised away, so it acts as a *relative* weighting of the
  precisions on the scales (low bits, whose LSQ scale gradients carry a 2^d factor, no longer dominate them).

Distillation: the float teacher's logits are computed once per batch (no grad) and shared by every bit-width.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from .core import alrs_multiplier
from .switching import set_bits, switchable_layers

logger = logging.getLogger(__name__)

KD_MODES = ("teacher", "inplace", "none")
SCALE_GROUP = "abs_llm_scales"


@dataclass
class MultiBitConfig:
    """What a joint multi-bit step does.

    bits: bit-widths trained every step, in this order (None: every candidate, highest first).
    bit_weights: ``{bits: weight}`` multiplying each bit-width's loss (missing bits weigh 1).
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
    loss_norm: divide each bit-width's loss by a running mean of itself (detached), so every precision pushes the
        shared weights by its *relative* improvement. Without it a 2-bit KL of ~10 nats drowns an 8-bit KL of ~1e-3
        and the low bits drag the shared weights away from the high ones (issue 7's naive prototype).
    """

    bits: list[int] | None = None
    bit_weights: dict[int, float] | None = None
    step_per_bit: bool = False
    alrs: bool = True
    scale_lr: float | None = None
    grad_adaptive: bool = False
    grad_adaptive_clip: float = 1.0
    kd: str = "teacher"
    kd_alpha: float = 1.0
    kd_temperature: float = 1.0
    loss_norm: bool = False
    per_bit_scale_state: bool = False
    hasb: bool = False
    hasb_traces: dict[str, float] | str | None = None
    hasb_sigma_schedule: str = "linear"
    hasb_sigma_min: float = 0.0
    hasb_sigma_max: float = 1.0
    hasb_seed: int = 0


def load_traces(source) -> dict[str, float]:
    """HASB traces from a dict or a JSON file (``{name: trace}`` or a ``hasb.json`` with a ``traces`` key)."""
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read HASB traces from {source}: {e}") from None
        source = data.get("traces", data) if isinstance(data, dict) else data
    if not isinstance(source, dict) or not source:
        raise ValueError("HASB traces must be a non-empty {layer: trace} dict; estimate them with "
                         "abs_llm.hasb.hessian_traces or `abs-llm search`")
    return source


def kd_kl(student_logits, target_logits, mask, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(target/T) || softmax(student/T))`` averaged over the positions where ``mask`` is true."""
    t = temperature
    logp = F.log_softmax(student_logits.float() / t, dim=-1)
    logq = F.log_softmax(target_logits.float() / t, dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1) * t * t


def lm_loss(logits, labels) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts ``labels[t+1]``; -100 is ignored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


class MultiBitTrainer(Trainer):
    """``Trainer`` whose every step trains all bit-widths of a switchable model (see the module docstring).

    ``teacher`` is the frozen float model for distillation (required for ``kd="teacher"``). Everything is validated in
    ``__init__``, before any training starts.
    """

    def __init__(self, model=None, args=None, *, multibit: MultiBitConfig | None = None, teacher: nn.Module | None = None,
                 **kwargs):
        self.mb = multibit or MultiBitConfig()
        self.layers = self._validate(model, args, self.mb, teacher, kwargs.get("train_dataset"))
        first = next(iter(self.layers.values()))
        self.master_bits = first.master_bits
        self.bits_order = list(self.mb.bits or first.candidate_bits)
        self.bit_weights = {b: float((self.mb.bit_weights or {}).get(b, 1.0)) for b in self.bits_order}
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.hasb = self._hasb_sampler(model) if self.mb.hasb else None
        super().__init__(model=model, args=args, **kwargs)
        self._scale_mult = 1.0
        self._bit_loss = {b: [0.0, 0] for b in self.bits_order}
        self._loss_ema: dict[int, float] = {}  # loss_norm's running means (not checkpointed: re-seeded on resume)
        self._hasb_bits = [0.0, 0]
        self._scale_state: dict[int, dict] = {}
        self._in_checkpoint = False
        for layer in self.layers.values():  # why a hook: see "accumulate" in the module docstring
            layer.weight_scale.register_hook(lambda g: g * self._scale_mult if self._scale_mult != 1.0 else g)

    # ---- validation ---------------------------------------------------------------------------------------------
    @staticmethod
    def _validate(model, args, mb: MultiBitConfig, teacher, train_dataset) -> dict:
        if model is None:
            raise ValueError("MultiBitTrainer needs a model")
        layers = switchable_layers(model)
        if not layers:
            raise ValueError("model has no SwitchableLinear layers; quantize it first with "
                             "abs_llm.quantize(model, DoubleRoundingConfig(...), trainable=True)")
        for layer in layers.values():
            layer.to_trainable()  # a frozen (pre-quantized) model starts QAT from its master
        cands = set.intersection(*(set(m.candidate_bits) for m in layers.values()))
        bits = list(mb.bits) if mb.bits is not None else sorted(cands, reverse=True)
        bad = [b for b in bits if isinstance(b, bool) or b not in cands]
        if not bits or bad or len(set(bits)) != len(bits):
            raise ValueError(f"bits {bits} must be distinct candidate bit-widths of the model; allowed {sorted(cands)}")
        for b, w in (mb.bit_weights or {}).items():
            if b not in bits:
                raise ValueError(f"bit_weights has bits {b}, which is not trained (bits={bits})")
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"bit_weights[{b}]={w!r} must be a finite number >= 0")
        if all((mb.bit_weights or {}).get(b, 1.0) == 0 for b in bits):
            raise ValueError("all bit_weights are 0: nothing would be trained")
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
        if mb.kd == "inplace" and (bits[0] != max(bits) or (mb.bit_weights or {}).get(bits[0], 1.0) == 0):
            raise ValueError(f"kd='inplace' distills from the highest bit-width: it must come first with a weight > 0;"
                             f" got bits {bits}")
        if not 0.0 <= mb.kd_alpha <= 1.0 or not mb.kd_temperature > 0:
            raise ValueError("kd_alpha must be in [0, 1] and kd_temperature > 0")
        if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
            raise ValueError("the training dataset is empty")
        return layers

    def _hasb_sampler(self, model):
        from .hasb import HASBSampler, attach_traces

        source = self.mb.hasb_traces
        if source is None:
            source = getattr(getattr(model.config, "quantization_config", None), "hessian_traces", None)
            if not source:
                raise ValueError("hasb=True needs Hessian traces: pass multibit hasb_traces (a dict or a JSON file from "
                                 "`abs-llm search`), or quantize a model whose config stores them")
        traces = load_traces(source)
        sampler = HASBSampler(model, traces, candidate_bits=self.bits_order, sigma_schedule=self.mb.hasb_sigma_schedule,
                              seed=self.mb.hasb_seed, sigma_min=self.mb.hasb_sigma_min,
                              sigma_max=self.mb.hasb_sigma_max)
        attach_traces(model, traces)  # the final checkpoint records the sensitivities the supernet was trained with
        return sampler

    # ---- optimiser ----------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """Three groups: weights (base LR, weight decay), other params such as biases/norms (base LR, no decay), and
        the quantization scales (``scale_lr``, no decay; ALRS applied per bit-width at step time)."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        scale_ids = {id(m.weight_scale) for m in switchable_layers(opt_model).values()}
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = {"decay": [], "no_decay": [], SCALE_GROUP: []}
        for n, p in opt_model.named_parameters():
            if not p.requires_grad:
                continue
            key = SCALE_GROUP if id(p) in scale_ids else ("decay" if n in decay else "no_decay")
            groups[key].append(p)
        lr = self.args.learning_rate
        param_groups = [
            {"params": groups["decay"], "weight_decay": self.args.weight_decay, "lr": lr, "name": "decay"},
            {"params": groups["no_decay"], "weight_decay": 0.0, "lr": lr, "name": "no_decay"},
            {"params": groups[SCALE_GROUP], "weight_decay": 0.0, "lr": self.mb.scale_lr or lr, "name": SCALE_GROUP},
        ]
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = cls([g for g in param_groups if g["params"]], **kwargs)
        return self.optimizer

    def _alrs(self, bits: int) -> float:
        return alrs_multiplier(self.master_bits, bits) if self.mb.alrs else 1.0

    def _step_for_bit(self, model, bits: int) -> None:
        """Paper Alg. A.2: clip, step with the scale LR of this precision, zero the gradients."""
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        if self.mb.grad_adaptive:
            self._grad_adaptive()
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        scale_groups = [g for g in opt.param_groups if g.get("name") == SCALE_GROUP]
        saved = [g["lr"] for g in scale_groups]
        for g in scale_groups:
            g["lr"] = g["lr"] * self._alrs(bits)
            if self.mb.per_bit_scale_state:  # the optimiser fills an empty state dict in place on its first step
                per_bit = self._scale_state.setdefault(bits, {})
                for p in g["params"]:
                    opt.state[p] = per_bit.setdefault(p, {})
        self.optimizer.step()
        for g, lr in zip(scale_groups, saved):
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)

    def _grad_adaptive(self) -> None:
        """Gradient-adaptive term (off by default). DESIGN.md: "subtract the layer-mean of the clipped max-|grad| of the
        scales". Our reading: per layer ``c_l = min(max|g_l|, clip)``; each layer's scale gradient is shrunk towards
        zero by the mean ``c`` of the layers *relative to its own* ``c_l`` (``g_l * (1 - c / (c_l + c))``), so a layer
        whose scale gradient spikes above the others is damped most and no gradient changes sign."""
        grads = [m.weight_scale.grad for m in self.layers.values() if m.weight_scale.grad is not None]
        if not grads:
            return
        c = torch.stack([g.abs().max().clamp(max=self.mb.grad_adaptive_clip) for g in grads])
        mean = c.mean()
        for g, cl in zip(grads, c):
            g.mul_(1 - mean / (cl + mean).clamp(min=1e-12))

    # ---- the joint step -----------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            labels = inputs["input_ids"].masked_fill(inputs.get("attention_mask", 1) == 0, -100) \
                if "attention_mask" in inputs else inputs["input_ids"]
        mask = (labels[:, 1:] != -100).float()
        target = None
        if self.teacher is not None and self.mb.kd != "none":
            with torch.no_grad():  # once per batch, shared by every bit-width
                target = self.teacher.to(labels.device)(**inputs).logits[:, :-1]
        ga = self.args.gradient_accumulation_steps
        unwrapped = self.accelerator.unwrap_model(model)
        total = torch.zeros((), device=labels.device)
        inplace_target = None
        for i, b in enumerate(self.bits_order):
            w = self.bit_weights[b]
            if w == 0:
                continue
            set_bits(unwrapped, b)
            if self.hasb is not None:
                progress = self.state.global_step / max(self.state.max_steps, 1)
                bit_map = self.hasb.step(progress, base_bits=b, key=(self.state.global_step, i))
                self._hasb_bits[0] += sum(bit_map.values()) / len(bit_map)
                self._hasb_bits[1] += 1
            last = i == len(self.bits_order) - 1
            # accumulate mode: only the last backward of the batch all-reduces (as in gradient accumulation)
            sync = contextlib.nullcontext() if (last or self.mb.step_per_bit) else self.accelerator.no_sync(model)
            self._scale_mult = 1.0 if self.mb.step_per_bit else self._alrs(b)
            with sync, self.compute_loss_context_manager():
                logits = model(**inputs).logits
                teacher_b = inplace_target if (self.mb.kd == "inplace" and i > 0) else target
                loss = self._bit_loss_fn(logits, labels, mask, teacher_b)
                self.accelerator.backward(loss * (w / ga / self._norm(b, loss)))
            if self.mb.kd == "inplace" and b == self.bits_order[0]:
                inplace_target = logits[:, :-1].detach()
            self._bit_loss[b][0] += float(loss.detach())
            self._bit_loss[b][1] += 1
            total = total + loss.detach() * (w / ga)
            del logits
            if self.mb.step_per_bit:
                self._step_for_bit(model, b)
        self._scale_mult = 1.0
        set_bits(unwrapped, max(self.bits_order))
        if self.mb.grad_adaptive and not self.mb.step_per_bit and self.accelerator.sync_gradients:
            self._grad_adaptive()
        return total

    def _norm(self, bits: int, loss) -> float:
        if not self.mb.loss_norm:
            return 1.0
        value = max(float(loss.detach()), 1e-8)
        ema = self._loss_ema.get(bits, value)
        self._loss_ema[bits] = 0.9 * ema + 0.1 * value
        return ema

    def _bit_loss_fn(self, logits, labels, mask, target):
        a = self.mb.kd_alpha if target is not None else 0.0
        loss = lm_loss(logits, labels) if a < 1 else logits.new_zeros(())
        if a > 0:
            loss = (1 - a) * loss + a * kd_kl(logits[:, :-1], target, mask, self.mb.kd_temperature)
        return loss

    def log(self, logs, *args, **kwargs):
        """Add the mean loss of each bit-width since the last log (``loss_w8``, ``loss_w4``...)."""
        if "loss" in logs:
            for b, (s, n) in self._bit_loss.items():
                if n:
                    logs[f"loss_w{b}"] = round(s / n, 6)
                self._bit_loss[b] = [0.0, 0]
            if self._hasb_bits[1]:  # unweighted mean over layers of the sampled maps
                logs["hasb_mean_bits"] = round(self._hasb_bits[0] / self._hasb_bits[1], 4)
                self._hasb_bits = [0.0, 0]
        return super().log(logs, *args, **kwargs)

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        self._in_checkpoint = True
        try:
            return super()._save_checkpoint(model, trial)
        finally:
            self._in_checkpoint = False

    def _save(self, output_dir=None, state_dict=None):
        """Resumable checkpoints keep the *training-mode* state (latent float weights + scales) in
        ``model.safetensors``, which ``Trainer._load_from_checkpoint`` loads back; ``save_pretrained`` would write the
        rounded integer master and lose the latent weights. Outside checkpoints the normal (frozen-master) save runs."""
        if not self._in_checkpoint or not any(m.trainable for m in self.layers.values()):
            return super()._save(output_dir, state_dict)
        from safetensors.torch import save_file

        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        state, seen = {}, set()
        for k, v in self.model.state_dict().items():  # tied weights once, under their first name (the embedding)
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                state[k] = v.detach().contiguous()
        save_file(state, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
        self.model.config.to_json_file(os.path.join(output_dir, "config.json"))
        with open(os.path.join(output_dir, "ABS_LLM_TRAINING_STATE.json"), "w") as f:
            json.dump({"note": "training-mode state (latent weights) for resume_from_checkpoint; not a switchable "
                               "checkpoint: the final output directory holds that"}, f)

    def save_switchable(self, output_dir: str) -> None:
        """Freeze every layer (round to the integer master) and write a switchable checkpoint with ``save_pretrained``.
        Call once, after training: the model leaves training mode."""
        self.accelerator.wait_for_everyone()
        model = self.accelerator.unwrap_model(self.model)
        for layer in switchable_layers(model).values():
            layer.freeze()
        set_bits(model, max(self.bits_order))
        if self.args.should_save:
            model.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()
