"""peft LoRA on ``SwitchableLinear``, through peft's custom-module dispatch (``LoraConfig._register_custom_module``).

Training: the switchable model stays frozen (integer master + scales); the LoRA ``A``/``B`` matrices are float and
are added to the output of the base layer at whatever bit-width is active, so ``set_bits(peft_model, 4)`` trains or
evaluates the adapter on top of the 4-bit derived weight.

Merging (``merge_and_unload``/``merge_adapter``): an integer master cannot absorb a float delta, so the merge
dequantizes the master (``W = q_h * s_h``), adds the delta, and re-quantizes a new master. Because every lower
bit-width is derived from that one master, **a merge changes the weights at every bit-width**, not only the one
active when merging. The scale of a group is kept where the merged group still fits its old range (so a zero delta
is an exact no-op and learned QAT scales survive) and grown in proportion to the group's abs-max where it does not.
``unmerge`` restores the exact pre-merge master and scales from a snapshot (kept until ``merge_and_unload`` drops the
wrapper). Only vanilla LoRA merges; DoRA and other variants are refused rather than merged wrongly.

Loading a saved adapter: the LoRA config read from disk lacks the custom-module registration, so use
:func:`load_adapter` instead of ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, PeftModel
from peft import get_peft_model as _peft_get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge, check_target_module_exists

from . import core
from .layers import SwitchableLinear
from .switching import require_layers, switchable_layers

__all__ = ["SwitchableLoraLinear", "register", "lora_config", "get_peft_model", "load_adapter", "merge_delta"]

_SNAPSHOT = "abs_llm_premerge"


@torch.no_grad()
def merge_delta(layer: SwitchableLinear, delta: torch.Tensor) -> None:
    """Re-quantize ``layer``'s master so it represents ``q_h * s_h + delta`` (the float delta never touches int8)."""
    if layer.trainable:
        raise ValueError("cannot merge into a SwitchableLinear in training mode; call freeze() first")
    if delta.shape != (layer.out_features, layer.in_features):
        raise ValueError(f"delta shape {tuple(delta.shape)} != {(layer.out_features, layer.in_features)}")
    hb, gs = layer.master_bits, layer.group_size
    old_scale = layer.weight_scale.detach().float()
    w = core.dequantize(layer.master(), old_scale, hb, hb, gs)
    merged = w + delta.to(w.device, torch.float32)
    if not torch.isfinite(merged).all():
        raise ValueError("NaN or inf in the merged weight; the adapter seems broken")
    amax_old = core._grouped(w, gs).abs().amax(dim=-1)
    amax_new = core._grouped(merged, gs).abs().amax(dim=-1)
    grown = old_scale * (amax_new / amax_old.clamp(min=torch.finfo(torch.float32).tiny)).clamp(min=1.0)
    scale = torch.where(amax_old > 0, grown, core.init_scale(merged, hb, gs))
    q = core.quantize_master(merged, scale, hb, gs)
    layer.weight_scale.data.copy_(scale)
    layer.set_master(q)


class SwitchableLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` around a ``SwitchableLinear`` base; only the merge path differs."""

    def _get_in_out_features(self, module):
        return module.in_features, module.out_features

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            if name in self.lora_variant:
                raise ValueError(f"adapter {name!r} is a LoRA variant (e.g. DoRA); only plain LoRA can be merged into a"
                                 " switchable master")
            if _SNAPSHOT not in self._caches:
                bias = None if base.bias is None else base.bias.detach().clone()
                self._caches[_SNAPSHOT] = (base.weight_master.clone(), base.weight_scale.detach().clone(), bias)
            merge_delta(base, self.get_delta_weight(name).float())
            if self.lora_bias[name]:
                if base.bias is None:
                    raise RuntimeError("cannot merge LoRA with lora_bias=True: the base layer has no bias")
                base.bias.data += (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        master, scale, bias = self._caches.pop(_SNAPSHOT)
        base = self.get_base_layer()
        with torch.no_grad():
            base.weight_scale.data.copy_(scale)
            if bias is not None:
                base.bias.data.copy_(bias)
        base.weight_master = master
        base.invalidate_cache()
        self.merged_adapters.clear()


def register(config: LoraConfig) -> LoraConfig:
    """Route ``SwitchableLinear`` targets of ``config`` to :class:`SwitchableLoraLinear` (returns ``config``)."""
    config._register_custom_module({SwitchableLinear: SwitchableLoraLinear})
    return config


def lora_config(**kwargs) -> LoraConfig:
    """``LoraConfig(**kwargs)`` already registered for switchable layers (default ``task_type="CAUSAL_LM"``)."""
    kwargs.setdefault("task_type", "CAUSAL_LM")
    return register(LoraConfig(**kwargs))


def _check_targets(model, config: LoraConfig) -> None:
    if config.target_modules is None or config.target_modules == "all-linear":
        return  # peft resolves these itself
    names = [n for n, _ in model.named_modules() if n]
    hits = [n for n in names if check_target_module_exists(config, n)]
    if not hits:
        sample = sorted({n.rpartition(".")[2] for n in switchable_layers(model)})
        raise ValueError(f"LoRA target_modules {config.target_modules!r} match no module of the model; switchable "
                         f"layer names end in {sample}")


def get_peft_model(model, config: LoraConfig, adapter_name: str = "default", **kwargs):
    """``peft.get_peft_model`` with the switchable dispatch registered and the target names checked first."""
    trainable = [n for n, m in require_layers(model).items() if m.trainable]
    if trainable:
        raise ValueError(f"LoRA expects a frozen switchable model, but {trainable[:3]} are in training mode;"
                         " call freeze() on them (or reload the checkpoint)")
    if getattr(config, "use_dora", False):
        raise ValueError("DoRA is not supported on switchable layers (it needs a float base weight); use plain LoRA")
    _check_targets(model, config)
    return _peft_get_peft_model(model, register(config), adapter_name=adapter_name, **kwargs)


def load_adapter(model, adapter_dir, adapter_name: str = "default", is_trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained`` for a switchable model (re-registers the dispatch the saved config lacks)."""
    config = register(LoraConfig.from_pretrained(str(adapter_dir)))
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=config)
