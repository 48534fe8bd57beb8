"""Joint multi-bit quantization-aware training (paper Alg. A.2) as a ``transformers.Trainer`` subclass.

One optimisation step = one batch, run forward/backward once per bit-width of ``MultiBitConfig.bits`` (in that order),
all bit-widths sharing the latent float weights and the scales of every ``SwitchableLinear``.

Per-precision learning rate of the scales (ALRS, docs/architecture.md). A scale tensor is shared by every bit-width, so "the
scale LR of precision b" can only mean "the update that precision b's gradient causes is scaled by eta_b":

- ``step_per_bit=True`` (the paper): the optimiser steps after every bit-width's backward, and during bit b's step
  the scale group's learning rate is ``scale_lr * eta_b`` (then restored). With SGD that is an exact per-precision LR.
  With Adam the moments of the scales are shared by the precisions, so bit 8's step (LR x 1) applies a direction
  averaged mostly from the low bits' large scale gradients: the low bits then move the scales at the 8-bit rate.
  ``per_bit_scale_state=True`` gives each precision its own optimiser state for the scales, so precision b's update
  uses only its own gradients at its own rate (the weights keep one shared state: they train jointly on purpose).
- ``step_per_bit=False`` (accumulate, one step per batch): bit b's contribution to each scale gradient is multiplied
  by ``eta_b`` inside the fake-quantize backward (``SwitchableLinear.scale_grad_mult``), before it is accumulated and
  before DDP all-reduces / FSDP2 reduce-scatters it (a tensor hook on the scale parameter would not survive FSDP2,
  which replaces the parameters). For SGD that is exactly a
  per-precision LR. For Adam the common factor is normalised away, so it acts as a *relative* weighting of the
  precisions on the scales (low bits, whose LSQ scale gradients carry a 2^d factor, no longer dominate them).

Distillation: the float teacher's logits and softmax are computed once per batch (no grad) and shared by every
bit-width. The teacher stays whole (not sharded) on every process.

Logs: ``loss_w<b>`` per width (averaged over processes); in step-per-bit mode ``grad_norm_w<b>``, the norm each
width's step saw (before clipping), and their mean as ``grad_norm`` (the Trainer's own value would be 0: it reads the
gradients after the last width's step zeroed them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import torch
from torch import nn
from transformers import Trainer

from . import distributed
from .core import alrs_multiplier
from .hasb import HASBSampler, attach_traces, load_traces
from .layers import SwitchableLinear, convert_all
from .multibit import (  # noqa: F401  (public here too)
    KD_MODES,
    MultiBitConfig,
    kd_kl,
    kd_kl_cached,
    kd_target,
    lm_loss,
    validate,
    widths_at,
)
from .switching import set_bits, switchable_layers

logger = logging.getLogger(__name__)

SCALE_GROUP = "abs_llm_scales"


class MultiBitTrainer(Trainer):
    """``Trainer`` whose every step trains all bit-widths of a switchable model (see the module docstring).

    ``teacher`` is the frozen float model for distillation (required for ``kd="teacher"``). Everything is validated in
    ``__init__``, before any training starts.
    """

    def __init__(self, model=None, args=None, *, multibit: MultiBitConfig | None = None, teacher: nn.Module | None = None,
                 **kwargs):
        self.mb = multibit or MultiBitConfig()
        self.layers = validate(model, args, self.mb, teacher, kwargs.get("train_dataset"))
        first = next(iter(self.layers.values()))
        self.master_bits = first.master_bits
        self.bits_order = list(self.mb.bits or first.candidate_bits)
        self.bit_weights = {b: float((self.mb.bit_weights or {}).get(b, 1.0)) for b in self.bits_order}
        traces = self._hasb_traces(model) if self.mb.hasb else None
        self.hasb = None if traces is None else HASBSampler(
            model, traces, candidate_bits=self.bits_order, sigma_schedule=self.mb.hasb_sigma_schedule,
            seed=self.mb.hasb_seed, sigma_min=self.mb.hasb_sigma_min, sigma_max=self.mb.hasb_sigma_max)
        super().__init__(model=model, args=args, **kwargs)
        # Every check has passed: only now is the model changed (a refused trainer leaves it as it was).
        convert_all(self.layers, trainable=True)  # a frozen (pre-quantized) model starts QAT from its master
        if traces is not None:
            attach_traces(model, traces)  # the final checkpoint records the sensitivities the supernet trained with
        if not self.mb.train_embeddings:
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                if emb is not None and not isinstance(emb, SwitchableLinear):  # a quantized head keeps training
                    emb.requires_grad_(False)
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self._bit_loss = {b: [0.0, 0] for b in self.bits_order}  # loss sums stay tensors: no device sync per width
        self._grad_norm = {b: [0.0, 0] for b in self.bits_order}  # step_per_bit: the norm each width's step saw
        self._loss_ema: dict[int, float] = {}  # loss_norm's running means (not checkpointed: re-seeded on resume)
        self._hasb_bits = [0.0, 0]
        self._scale_state: dict[int, dict] = {}
        self._in_checkpoint = False
        self._params = None  # the parameter list each width's clip walks, taken once after accelerator.prepare
        self._teacher_device = None
        for layer in self.layers.values():
            layer.fused = self.mb.fused

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        distributed.check_processes(self.accelerator)
        if distributed.enable_cpu_fsdp2(self.accelerator):
            self.is_fsdp_enabled = True

    def _set_scale_grad_mult(self, mult: float) -> None:
        """ALRS in accumulate mode (module docstring): bit b's share of every scale gradient is multiplied by eta_b
        inside the fake-quantize backward, before it is accumulated or all-reduced (DDP) / reduce-scattered (FSDP2)."""
        for layer in self.layers.values():
            layer.scale_grad_mult = mult

    def _hasb_traces(self, model) -> dict[str, float]:
        source = self.mb.hasb_traces
        if source is None:
            source = getattr(getattr(model.config, "quantization_config", None), "hessian_traces", None)
            if not source:
                raise ValueError("hasb=True needs Hessian traces: pass multibit hasb_traces (a dict or a JSON file from "
                                 "`abs-llm search`), or quantize a model whose config stores them")
        qcfg = getattr(getattr(model, "config", None), "quantization_config", None)
        if qcfg is None or isinstance(qcfg, dict):  # checked here: attach_traces runs after the model has changed
            raise ValueError("hasb=True records the traces in the model's DoubleRoundingConfig, and this model has none;"
                             " quantize it with abs_llm.quantize or from_pretrained(..., quantization_config=...)")
        return load_traces(source)

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
        # the Trainer's own clip runs after training_step has stepped and zeroed every gradient (and logs 0), so
        # the norm that each width's update saw is recorded here (clipped at max_grad_norm when set)
        # the clip scales with the width's loss weight: clipping each width's gradient to one norm would undo
        # bit_weights whenever the gradient is above the bound (the low widths' gradients always are)
        max_norm = self.args.max_grad_norm * self.bit_weights[bits] \
            if self.args.max_grad_norm and self.args.max_grad_norm > 0 else float("inf")
        if self._params is None:  # after accelerator.prepare (FSDP2 swaps in DTensor parameters); one module walk
            self._params = list(model.parameters())
        norm = self.accelerator.clip_grad_norm_(self._params, max_norm)
        if norm is not None:
            acc = self._grad_norm[bits]
            acc[0], acc[1] = acc[0] + norm.detach(), acc[1] + 1
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
        """Gradient-adaptive term (off by default). The paper (docs/architecture.md): "subtract the layer-mean of the
        clipped max-|grad| of the scales". Our reading: per layer ``c_l = min(max|g_l|, clip)``; each layer's scale gradient is shrunk towards
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
        temperature = self.mb.kd_temperature
        if self.teacher is not None and self.mb.kd != "none":
            with torch.no_grad():  # once per batch, shared by every bit-width (teacher softmax included)
                if self._teacher_device != labels.device:  # the teacher is whole on every process (not sharded)
                    self.teacher.to(labels.device)
                    self._teacher_device = labels.device
                target = kd_target(self.teacher(**inputs).logits[:, :-1], temperature)
        ga = self.args.gradient_accumulation_steps
        unwrapped = self.accelerator.unwrap_model(model)
        total = torch.zeros((), device=labels.device)
        inplace_target = None
        run = [(i, b) for i, b in widths_at(self.state.global_step, self.bits_order, self.mb.bit_every)
               if self.bit_weights[b] > 0]
        for i, b in run:
            w = self.bit_weights[b]
            for layer in self.layers.values():  # every width was validated in __init__; set_bits (module walks,
                layer.bits = b                  # config mirror) runs once at the end of the step
            if self.hasb is not None:
                progress = self.state.global_step / max(self.state.max_steps, 1)
                bit_map = self.hasb.step(progress, base_bits=b, key=(self.state.global_step, i))
                self._hasb_bits[0] += sum(bit_map.values()) / len(bit_map)
                self._hasb_bits[1] += 1
            last = i == run[-1][0]
            # accumulate mode: only the last backward of the batch all-reduces (as in gradient accumulation)
            sync = contextlib.nullcontext() if (last or self.mb.step_per_bit) else self.accelerator.no_sync(model)
            if not self.mb.step_per_bit:
                self._set_scale_grad_mult(self._alrs(b))
            with sync, self.compute_loss_context_manager():
                logits = model(**inputs).logits
                teacher_b = inplace_target if (self.mb.kd == "inplace" and i > 0) else target
                loss = self._bit_loss_fn(logits, labels, mask, teacher_b)
                self.accelerator.backward(loss * (w / ga / self._norm(b, loss)))
            if self.mb.kd == "inplace" and b == self.bits_order[0]:
                with torch.no_grad():
                    inplace_target = kd_target(logits[:, :-1].detach(), temperature)
            self._bit_loss[b][0] += loss.detach()
            self._bit_loss[b][1] += 1
            total = total + loss.detach() * (w / ga)
            del logits
            if self.mb.step_per_bit:
                self._step_for_bit(model, b)
        if not self.mb.step_per_bit:
            self._set_scale_grad_mult(1.0)
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
            loss = (1 - a) * loss + a * kd_kl_cached(logits[:, :-1], target, mask, self.mb.kd_temperature)
        return loss

    def log(self, logs, *args, **kwargs):
        """Add the mean loss of each bit-width since the last log (``loss_w8``, ``loss_w4``...; averaged over the
        processes, like ``loss``), and in step-per-bit mode the gradient norm each width's step saw
        (``grad_norm_w8``...) with their mean as ``grad_norm``. Called on every process (it all-reduces)."""
        if "loss" in logs:
            losses = distributed.mean_over_processes(self.accelerator, self._bit_loss)
            logs.update({f"loss_w{b}": round(v, 6) for b, v in losses.items()})
            self._bit_loss = {b: [0.0, 0] for b in self.bits_order}
            if self.mb.step_per_bit:  # gradients are all-reduced already: every process saw the same norms
                norms = {b: float(s) / n for b, (s, n) in self._grad_norm.items() if n}
                logs.update({f"grad_norm_w{b}": round(v, 6) for b, v in norms.items()})
                if norms:
                    logs["grad_norm"] = round(sum(norms.values()) / len(norms), 6)
                self._grad_norm = {b: [0.0, 0] for b in self.bits_order}
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
        # under FSDP the Trainer passes the gathered full state dict (the model's own holds DTensor shards)
        for k, v in (state_dict if state_dict is not None else self.model.state_dict()).items():
            # tied weights once, under their first name (the embedding)
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
        Call once, after training, on every process: the model leaves training mode (under FSDP2 a gathered copy is
        frozen and saved by the main process; the sharded model stays as it was). Returns the frozen model (None on
        the other FSDP2 processes)."""
        self.accelerator.wait_for_everyone()
        model = self.accelerator.unwrap_model(self.model)
        if distributed.is_fsdp2(self.accelerator):  # shards gathered into a plain copy; self.model stays sharded
            model = distributed.full_model_on_main(self.accelerator, model)
        if model is not None:
            convert_all(switchable_layers(model), trainable=False)  # all layers or none (a NaN names its layer)
            set_bits(model, max(self.bits_order))
        if self.args.should_save:
            model.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        self.accelerator.wait_for_everyone()
        return model
