"""peft LoRA on ``SwitchableLinear``, through peft's custom-module dispatch (``LoraConfig._register_custom_module``).

Plain peft works after ``import abs_llm``: :func:`install` makes every ``LoraConfig`` carry the mapping
``SwitchableLinear -> SwitchableLoraLinear`` (its ``__post_init__`` calls peft's own ``_register_custom_module``), so
``peft.get_peft_model``, ``PeftModel.from_pretrained``, transformers' ``model.load_adapter`` and TRL's
``SFTTrainer(peft_config=...)`` dispatch switchable layers the way peft dispatches bitsandbytes/HQQ/torchao layers.
``abs_llm/__init__`` installs it when peft is first imported (importing peft costs seconds, so not before);
``tests/test_peft_plain.py`` fails loudly if a peft release moves the hook.

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

All or nothing: a merge pass (peft calls ``_check_merge_allowed`` before it merges layer by layer) first computes and
checks the merged master of *every* switchable layer, and only then lets the layers commit, so a broken adapter leaves
the model bit-identical. Every merge refuses NaN/inf in the merged float weight (an integer master cannot hold it);
``safe_merge=True`` also dequantizes the merged master at every candidate width and refuses a non-finite one (a scale
grown near the float32 limit overflows at low widths).
"""

from __future__ import annotations

import warnings
import weakref

import torch
from peft import LoraConfig, PeftModel
from peft import get_peft_model as _peft_get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import check_adapters_to_merge, check_target_module_exists

from . import core
from .layers import SwitchableLinear
from .switching import require_layers, switchable_layers

__all__ = ["SwitchableLoraLinear", "install", "register", "lora_config", "get_peft_model", "load_adapter",
           "merge_delta", "merged_master"]

_SNAPSHOT = "abs_llm_premerge"
_MARK = "_abs_llm_hook"


@torch.no_grad()
def merged_master(layer: SwitchableLinear, delta: torch.Tensor, check_widths: bool = False):
    """``(q, scale)``: the master and scales representing ``q_h * s_h + delta`` (nothing is changed). Raises
    ``ValueError`` for a non-finite merged weight, or with ``check_widths`` a non-finite weight at any candidate width."""
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
    # old_scale / amax_old first: the ratio amax_new / amax_old alone can overflow where the grown scale does not
    grown = torch.where(amax_new > amax_old, amax_new * (old_scale / amax_old.clamp(min=torch.finfo(torch.float32).tiny)),
                        old_scale)
    scale = torch.where(amax_old > 0, grown, core.init_scale(merged, hb, gs))
    if not torch.isfinite(scale).all():
        raise ValueError("the merged weight overflows its float32 scales; the adapter seems broken")
    q = core.quantize_master(merged, scale, hb, gs)
    if check_widths:
        for b in layer.candidate_bits:
            if not torch.isfinite(core.dequantize(q, scale, hb, b, gs)).all():
                raise ValueError(f"the merged weight is not finite at {b} bits (scale overflow); the adapter seems broken")
    return q, scale


def merge_delta(layer: SwitchableLinear, delta: torch.Tensor) -> None:
    """Re-quantize ``layer``'s master so it represents ``q_h * s_h + delta`` (the float delta never touches int8)."""
    q, scale = merged_master(layer, delta)
    layer.weight_scale.data.copy_(scale)
    layer.set_master(q)


class _MergePass:
    """One model-level merge: the switchable LoRA layers to check before the first one commits (weak references,
    emptied by that first check, so nothing is kept alive or pickled with the model)."""

    def __init__(self, layers):
        self.layers = [weakref.ref(m) for m in layers]

    def __getstate__(self):
        return {"layers": []}


class SwitchableLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` around a ``SwitchableLinear`` base; only the merge path differs."""

    def __init__(self, base_layer, adapter_name, config=None, **kwargs):
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.abs_llm_name = kwargs.get("target_name") or ""  # for error messages
        self._abs_llm_pass = None

    def _get_in_out_features(self, module):
        return module.in_features, module.out_features

    def _to_merge(self, adapter_names) -> list[str]:
        names = self.active_adapters if adapter_names is None else adapter_names
        return [n for n in names if n in self.lora_A and n not in self.merged_adapters]

    def _merged_state(self, names: list[str], safe_merge: bool):
        """What the base layer holds after merging ``names``: ``(q, scale, bias)``; raises before anything changes."""
        base = self.get_base_layer()
        where = f"layer {self.abs_llm_name or type(base).__name__}"
        delta, bias = None, None if base.bias is None else base.bias.detach().clone()
        for name in names:
            if name in self.lora_variant:
                raise ValueError(f"adapter {name!r} is a LoRA variant (e.g. DoRA); only plain LoRA can be merged into a"
                                 " switchable master")
            d = self.get_delta_weight(name).float()
            delta = d if delta is None else delta + d
            if self.lora_bias[name]:
                if bias is None:
                    raise ValueError(f"{where}: cannot merge LoRA with lora_bias=True: the base layer has no bias")
                bias += (self.lora_B[name].bias * self.scaling[name]).to(bias.dtype)
                if not torch.isfinite(bias).all():
                    raise ValueError(f"{where}: NaN or inf in the merged bias of adapter {name!r}")
        try:
            q, scale = merged_master(base, delta, check_widths=safe_merge)
        except ValueError as e:
            raise ValueError(f"{where}, adapter(s) {names}: {e}") from None
        return q, scale, bias

    def _check_pass(self, adapter_names, safe_merge: bool) -> None:
        p = self._abs_llm_pass
        if p is None or not p.layers:
            return
        refs, p.layers = p.layers, []  # first layer of the pass: check every layer before any commits
        for ref in refs:
            layer = ref()
            if layer is not None and layer._to_merge(adapter_names):
                layer._merged_state(layer._to_merge(adapter_names), safe_merge)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        self._check_pass(adapter_names, safe_merge)
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
        if not names:
            return
        q, scale, bias = self._merged_state(names, safe_merge)
        base = self.get_base_layer()
        if _SNAPSHOT not in self._caches:
            old_bias = None if base.bias is None else base.bias.detach().clone()
            self._caches[_SNAPSHOT] = (base.weight_master.clone(), base.weight_scale.detach().clone(), old_bias)
        with torch.no_grad():
            base.weight_scale.data.copy_(scale)
            base.set_master(q)
            if bias is not None:
                base.bias.data.copy_(bias)
        self.merged_adapters.extend(names)

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


def install() -> None:
    """Make plain peft handle switchable layers (idempotent): every ``LoraConfig`` registers the switchable dispatch
    when it is built, and every LoRA merge pass checks all switchable layers before the first one changes."""
    post_init = LoraConfig.__post_init__
    if not getattr(post_init, _MARK, False):
        def __post_init__(self, *args, **kwargs):
            post_init(self, *args, **kwargs)
            register(self)

        setattr(__post_init__, _MARK, True)
        LoraConfig.__post_init__ = __post_init__
    check = LoraModel._check_merge_allowed
    if not getattr(check, _MARK, False):
        def _check_merge_allowed(self, *args, **kwargs):
            check(self, *args, **kwargs)
            layers = [m for m in self.model.modules() if isinstance(m, SwitchableLoraLinear)]
            merge_pass = _MergePass(layers)
            for m in layers:
                m._abs_llm_pass = merge_pass

        setattr(_check_merge_allowed, _MARK, True)
        LoraModel._check_merge_allowed = _check_merge_allowed


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
    """``peft.get_peft_model`` with the target names and the model's mode checked first (plain peft works too)."""
    trainable = [n for n, m in require_layers(model).items() if m.trainable]
    if trainable:
        raise ValueError(f"LoRA expects a frozen switchable model, but {trainable[:3]} are in training mode;"
                         " call freeze() on them (or reload the checkpoint)")
    if getattr(config, "use_dora", False):
        raise ValueError("DoRA is not supported on switchable layers (it needs a float base weight); use plain LoRA")
    _check_targets(model, config)
    return _peft_get_peft_model(model, register(config), adapter_name=adapter_name, **kwargs)


def load_adapter(model, adapter_dir, adapter_name: str = "default", is_trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained`` for a switchable model (kept for older code; plain peft works the same now)."""
    config = register(LoraConfig.from_pretrained(str(adapter_dir)))
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=config)


install()
