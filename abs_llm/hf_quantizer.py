"""transformers hooks for ``quant_method="double_rounding"``, the in-memory ``quantize`` verb, and ``replace_linears``.

Lifecycle (transformers 5.x ``from_pretrained``), the way ``quantizer_finegrained_fp8.py`` reads:

- float checkpoint + ``DoubleRoundingConfig`` (quantize on load): the float weights load into ``nn.Linear`` as usual;
  after loading, the selected Linears are replaced by ``SwitchableLinear`` layers holding their INT8/INT4 master.
- pre-quantized checkpoint: before loading, the safetensors headers are checked against the config
  (:func:`abs_llm.checkpoint.check_files`) so a mismatched checkpoint fails before any tensor is read, and the Linear
  skeletons (meta device) become ``SwitchableLinear``; ``weight_master``/``weight_scale`` then load like any buffer.
- save: :func:`abs_llm.checkpoint.state_dict_and_metadata` decides what is written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module

from . import checkpoint, norms
from .config import DoubleRoundingConfig
from .saving import install_atomic_save
from .layers import SwitchableLinear
from .switching import set_bits, switchable_layers

logger = logging.getLogger(__name__)


def resolve_modules_to_not_convert(model: nn.Module, config: DoubleRoundingConfig) -> list[str]:
    """The user's skip list plus transformers' default skips (output embedding, tied weights, keep-in-fp32)."""
    skips = HfQuantizer.get_modules_to_not_convert(
        model, config.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None), add_default_skips=True
    )
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D, SwitchableLinear))]
    for pattern in config.modules_to_not_convert or []:
        if all(should_convert_module(n, [pattern]) for n in names):
            logger.warning("modules_to_not_convert entry %r matches no Linear layer of the model; ignored", pattern)
    return sorted(set(skips))


def linears_to_convert(model: nn.Module, skips: list[str]) -> list[str]:
    """Names of the ``nn.Linear`` layers, and GPT-2-style ``Conv1D`` layers (a Linear with a transposed weight), that
    ``skips`` leaves to convert."""
    return [n for n, m in model.named_modules() if type(m) in (nn.Linear, Conv1D) and should_convert_module(n, skips)]


def in_out(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or a ``Conv1D`` (weight ``(in, out)``)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def as_linear(module: nn.Module) -> nn.Module:
    """A ``Conv1D`` as the ``nn.Linear`` it computes (``x @ W + b`` = ``x @ (W^T)^T + b``): its weight transposed into
    a copy. Anything else unchanged."""
    if not isinstance(module, Conv1D):
        return module
    w = module.weight.detach()
    lin = nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, device="meta")
    lin.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)
    if module.bias is not None:
        lin.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return lin


def _switchable(name: str, old: nn.Module, layer: SwitchableLinear) -> SwitchableLinear:
    layer.conv1d = isinstance(old, Conv1D)  # export writes such a layer back as a Conv1D
    return layer


def layer_kwargs(config: DoubleRoundingConfig) -> dict:
    return dict(master_bits=config.master_bits, candidate_bits=tuple(config.candidate_bits), group_size=config.group_size)


def replace_linears(model: nn.Module, names: list[str], make: Callable[[str, nn.Module], nn.Module]) -> dict:
    """Replace each module ``names[i]`` by ``make(name, old)``; returns ``{name: old module}`` (pass it back here to
    undo). Every replacement is built before the first one is installed, so an error in ``make`` leaves the model
    untouched. Serves quantize-on-load, ``quantize``, loading a pre-quantized checkpoint (meta skeletons) and export
    (back to ``nn.Linear``)."""
    new = {name: make(name, model.get_submodule(name)) for name in names}
    old = {name: model.get_submodule(name) for name in names}
    for name, module in new.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    return old


def check_config_names(config: DoubleRoundingConfig, targets: list[str], where: str = "config") -> None:
    """``layer_bits`` and ``hessian_traces`` may only name layers that are converted."""
    for field in ("layer_bits", "hessian_traces"):
        unknown = sorted(set(getattr(config, field, None) or {}) - set(targets))
        if unknown:
            raise ValueError(f"{where} {field} names {len(unknown)} layer(s) that are not converted, e.g. {unknown[:3]};"
                             f" converted layers are e.g. {targets[:3]} ({len(targets)} in all)")


def _check_float_linears(model: nn.Module, targets: list[str]) -> None:
    for name in targets:
        lin = model.get_submodule(name)
        for what, t in (("weights", lin.weight), ("bias", lin.bias)):
            if t is None:
                continue
            if t.is_meta:
                raise ValueError(f"layer {name} is on the meta device; load real weights before quantizing")
            if not torch.isfinite(t).all():
                raise ValueError(f"layer {name} has NaN or inf {what}; refusing to quantize")


def mark_offloaded(model: nn.Module) -> list[str]:
    """Flag every SwitchableLinear under an accelerate offload hook (``device_map`` with "cpu"/"disk" next to an
    accelerator, or ``accelerate.cpu_offload``): it then packs its width at each forward and caches nothing, so the
    offloaded tensors are not kept in memory between forwards. ``from_pretrained`` calls this; call it yourself after
    attaching hooks by hand. Returns the flagged layer names."""
    hooked = [n for n, m in model.named_modules() if getattr(getattr(m, "_hf_hook", None), "offload", False)]
    flagged = []
    for name, layer in switchable_layers(model).items():
        layer.offloaded = any(not h or name == h or name.startswith(h + ".") for h in hooked)
        if layer.offloaded:
            layer.invalidate_cache()
            flagged.append(name)
    return flagged


def _warn_unconverted_weights(model: nn.Module) -> None:
    """Fused MoE experts (Mixtral, Qwen-MoE...) are 3-D parameters, not Linear layers: they stay float. Say so."""
    fused = {n: p.numel() for n, p in model.named_parameters() if p.dim() >= 3}
    if fused:
        share = sum(fused.values()) / sum(p.numel() for p in model.parameters())
        logger.warning("%d weight tensor(s) of 3 or more dimensions (fused MoE experts, e.g. %s: %.0f%% of the "
                       "parameters) stay in floating point: abs_llm converts Linear and Conv1D layers only",
                       len(fused), next(iter(fused)), 100 * share)


def _apply_config_bits(model: nn.Module, config: DoubleRoundingConfig) -> None:
    bits, layer_bits = config.bits, config.layer_bits  # read both first: set_bits rewrites the model's config
    set_bits(model, bits, kernel=getattr(config, "kernel", "auto"))
    if layer_bits:
        set_bits(model, layer_bits)


def quantize(model: nn.Module, config: DoubleRoundingConfig | None = None, trainable: bool = False,
             method: str = "rtn", calibration=None, tokenizer=None, gptq_options=None) -> nn.Module:
    """Quantize a float model in memory, in place (torchao's ``quantize_(model, config)`` shape): every selected
    ``nn.Linear`` (and GPT-2 ``Conv1D``) becomes a ``SwitchableLinear``. The model then saves and reloads like one
    loaded with ``from_pretrained(..., quantization_config=config)``. ``trainable=True`` keeps float latent weights
    for QAT. All or nothing: every layer is checked and converted before the model is changed, and a later failure puts the
    original layers back.

    ``method="rtn"`` rounds each master to nearest with abs-max scales. ``method="gptq"`` chooses the masters and scales
    block by block on ``calibration`` texts (tokenized with ``tokenizer``) to minimise the layer-output error summed
    over all candidate widths (:mod:`abs_llm.ptq`; knobs in ``gptq_options``, a dict or ``abs_llm.ptq.GPTQOptions``).
    """
    config = config or DoubleRoundingConfig()
    if not isinstance(config, DoubleRoundingConfig):
        raise TypeError(f"config must be a DoubleRoundingConfig, got {type(config).__name__}")
    if switchable_layers(model):
        raise ValueError("model is already quantized (it has SwitchableLinear layers); use set_bits to switch")
    skips = resolve_modules_to_not_convert(model, config)
    targets = linears_to_convert(model, skips)
    if not targets:
        raise ValueError("no nn.Linear layer left to quantize after modules_to_not_convert; nothing was changed")
    _check_float_linears(model, targets)
    check_config_names(config, targets)
    _warn_unconverted_weights(model)
    # method="gptq" (issue 16): the masters are chosen on calibration text first; the layers are then built the same way
    from .ptq import check_method, gptq_masters

    check_method(method, calibration, tokenizer, gptq_options)
    masters = gptq_masters(model, config, targets, calibration, tokenizer, gptq_options) if method == "gptq" else {}
    kw = layer_kwargs(config)

    def make(name, lin):
        layer = SwitchableLinear.from_linear(as_linear(lin), trainable=trainable and name not in masters, name=name, **kw)
        if name in masters:
            layer.weight_scale.data.copy_(masters[name][1])
            layer.set_master(masters[name][0])
            if trainable:
                layer.to_trainable()
        return _switchable(name, lin, layer)

    old = replace_linears(model, targets, make)
    saved = {k: getattr(config, k) for k in ("modules_to_not_convert", "bits", "layer_bits", "kernel")}
    try:
        config.modules_to_not_convert = skips
        _apply_config_bits(model, config)
        _attach(model, config)
    except BaseException:  # nothing above is expected to fail after the checks; if it does, undo the conversion
        replace_linears(model, list(old), lambda name, new: old[name])
        for key, value in saved.items():
            setattr(config, key, value)
        raise
    return model


def _attach(model: nn.Module, config: DoubleRoundingConfig) -> None:
    """Make an in-memory quantized model look like one from ``from_pretrained`` so ``save_pretrained`` works."""
    if not hasattr(model, "config"):
        return
    model.config.quantization_config = config
    if not getattr(model.config, "abs_llm_source", None):  # lineage: what this model was quantized from
        from .lineage import describe_source, record_source

        name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        record_source(model, describe_source(name) if name else {"base_model": None, "path": None})
    model.hf_quantizer = DoubleRoundingHfQuantizer(config, pre_quantized=False)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    install_atomic_save(model)


class DoubleRoundingHfQuantizer(HfQuantizer):
    """Loads, quantizes and saves Double Rounding switchable checkpoints."""

    requires_calibration = False
    quantization_config: DoubleRoundingConfig

    def validate_environment(self, *args, **kwargs):
        # CPU and disk offload both work (accelerate hooks load the master and scales per forward; mark_offloaded):
        # tests/test_offload.py. Quantize-on-load needs every float weight in memory first.
        device_map = kwargs.get("device_map")
        if not self.pre_quantized and isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("quantize-on-load cannot disk-offload (every float weight is needed in memory); quantize "
                             "first (abs-llm quantize), then load the switchable checkpoint with the device_map")

    def update_attn_implementation(self, config):
        # The one quantizer hook that sees config.json before transformers builds the model: a config edited or
        # corrupted after save is named here, not by a crash in the model's constructor.
        if self.pre_quantized:
            checkpoint.check_config_file(getattr(config, "_name_or_path", None))
        return config

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # quantize-on-load happens after loading, see _process_model_after_weight_loading

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return model
        cfg = self.quantization_config
        skips = cfg.modules_to_not_convert or resolve_modules_to_not_convert(model, cfg)
        targets = linears_to_convert(model, skips)
        check_config_names(cfg, targets, "config.json quantization_config")
        if checkpoint_files:
            shapes = {n: in_out(model.get_submodule(n))[::-1] for n in targets}
            checkpoint.check_files(checkpoint_files, cfg, shapes)
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | \
            checkpoint.guard_patterns(targets)

        def skeleton(name, old):
            with torch.device("meta"):
                return _switchable(name, old, SwitchableLinear(*in_out(old), old.bias is not None,
                                                               dtype=old.weight.dtype, **layer_kwargs(cfg)))

        replace_linears(model, targets, skeleton)
        if cfg.norm_bits:  # empty per-width gains for the loader to fill, each one checked to be in the files
            names = [f"{n}.{norms.PREFIX}{b}" for n in norms.add_gains(model, cfg.norm_bits, init="meta")
                     for b in cfg.norm_bits]
            if checkpoint_files:
                checkpoint.check_tensors_present(checkpoint_files, names, "norm gains named by norm_bits")
        for name in targets:
            # A parent's _init_weights may reach for child.weight by name (GPT-2 re-initialises c_proj.weight), which a
            # frozen layer does not have. A parent holding no tensor of its own has nothing to initialise: skip it.
            parent = model.get_submodule(name.rpartition(".")[0])
            if next(parent.parameters(recurse=False), None) is None and next(parent.buffers(recurse=False), None) is None:
                parent._is_hf_initialized = True
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if not self.pre_quantized:
            quantize(model, cfg)
            return model
        mark_offloaded(model)
        for name, layer in switchable_layers(model).items():
            if (layer.weight_master.is_meta or layer.weight_scale.is_meta) and not layer.offloaded:
                raise ValueError(f"checkpoint is missing the master or scale of {name}")
            layer.invalidate_cache()
        norms.finish_load(model)
        _apply_config_bits(model, cfg)
        install_atomic_save(model)
        return model

    def get_state_dict_and_metadata(self, model):
        return checkpoint.state_dict_and_metadata(model, switchable_layers(model), self.quantization_config,
                                                  norms.float_gains(model))

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True
