"""The transformers HfQuantizer for ``quant_method="double_rounding"`` and the in-memory ``quantize`` verb.

Lifecycle (transformers 5.x ``from_pretrained``):

- float checkpoint + ``DoubleRoundingConfig`` (quantize on load): the float weights load into ``nn.Linear`` as usual;
  after loading, each selected Linear is replaced by a ``SwitchableLinear`` holding its INT8/INT4 master. Replacing
  layer by layer keeps the extra memory to one layer's float copy.
- pre-quantized checkpoint: before loading, Linear skeletons (on the meta device) become ``SwitchableLinear`` and the
  safetensors headers are checked against the config (names, shapes, dtypes, metadata), so a mismatched checkpoint
  fails before any tensor is read; then ``weight_master``/``weight_scale`` load like any buffer/parameter.
"""

from __future__ import annotations

import json
import logging
import re

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module

from . import core
from .config import FORMAT_VERSION, DoubleRoundingConfig
from .integrity import install_atomic_save, verify_enabled, verify_file
from .layers import SwitchableLinear
from .remote_code import GUARD_META_KEY
from .switching import set_bits, switchable_layers

logger = logging.getLogger(__name__)

META_PREFIX = "abs_llm."


def resolve_modules_to_not_convert(model: nn.Module, config: DoubleRoundingConfig) -> list[str]:
    """The user's skip list plus transformers' default skips (output embedding, tied weights, keep-in-fp32)."""
    skips = HfQuantizer.get_modules_to_not_convert(
        model, config.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None), add_default_skips=True
    )
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, SwitchableLinear))]
    for pattern in config.modules_to_not_convert or []:
        if all(should_convert_module(n, [pattern]) for n in names):
            logger.warning("modules_to_not_convert entry %r matches no Linear layer of the model; ignored", pattern)
    return sorted(set(skips))


def linears_to_convert(model: nn.Module, skips: list[str]) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and should_convert_module(n, skips)]


def _layer_kwargs(config: DoubleRoundingConfig) -> dict:
    return dict(master_bits=config.master_bits, candidate_bits=tuple(config.candidate_bits), group_size=config.group_size)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _apply_config_bits(model: nn.Module, config: DoubleRoundingConfig) -> None:
    bits, layer_bits = config.bits, config.layer_bits  # read both first: set_bits rewrites the model's config
    set_bits(model, bits, kernel=getattr(config, "kernel", "auto"))
    if layer_bits:
        set_bits(model, layer_bits)


def quantize(model: nn.Module, config: DoubleRoundingConfig | None = None, trainable: bool = False,
             method: str = "rtn", calibration=None, tokenizer=None, gptq_options=None) -> nn.Module:
    """Quantize a float model in memory, in place (torchao's ``quantize_(model, config)`` shape): every selected
    ``nn.Linear`` becomes a ``SwitchableLinear``. The model then saves and reloads like one loaded with
    ``from_pretrained(..., quantization_config=config)``. ``trainable=True`` keeps float latent weights for QAT.

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
    for name in targets:  # validate everything first: a bad layer must not leave a half-converted model
        w = model.get_submodule(name).weight
        if w.is_meta:
            raise ValueError(f"layer {name} is on the meta device; load real weights before quantizing")
        if not torch.isfinite(w).all():
            raise ValueError(f"layer {name} has NaN or inf weights; refusing to quantize")
    # ---- method="gptq" (issue 16): masters chosen on calibration text; the layers below are built the same way
    from .ptq import check_method, gptq_masters

    check_method(method, calibration, tokenizer, gptq_options)
    masters = gptq_masters(model, config, targets, calibration, tokenizer, gptq_options) if method == "gptq" else {}
    for name in targets:
        layer = SwitchableLinear.from_linear(model.get_submodule(name), trainable=trainable and name not in masters,
                                             name=name, **_layer_kwargs(config))
        if name in masters:
            layer.weight_scale.data.copy_(masters[name][1])
            layer.set_master(masters[name][0])
            if trainable:
                layer.to_trainable()
        _replace(model, name, layer)
    config.modules_to_not_convert = skips
    _apply_config_bits(model, config)
    _attach(model, config)
    return model


def _attach(model: nn.Module, config: DoubleRoundingConfig) -> None:
    """Make an in-memory quantized model look like one from ``from_pretrained`` so ``save_pretrained`` works."""
    if not hasattr(model, "config"):
        return
    model.config.quantization_config = config
    model.hf_quantizer = DoubleRoundingHfQuantizer(config, pre_quantized=False)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    install_atomic_save(model)


def checkpoint_metadata(model: nn.Module, config: DoubleRoundingConfig) -> dict[str, str]:
    layers = switchable_layers(model)
    extra = {}
    if getattr(config, "hessian_traces", None):  # HASB sensitivities travel with the weights they were measured on
        extra[META_PREFIX + "hessian_traces"] = json.dumps(config.hessian_traces, sort_keys=True)
    return extra | {
        META_PREFIX + "format_version": str(FORMAT_VERSION),
        META_PREFIX + "quant_method": config.quant_method,
        META_PREFIX + "master_bits": str(config.master_bits),
        META_PREFIX + "candidate_bits": json.dumps(list(config.candidate_bits)),
        META_PREFIX + "group_size": json.dumps(config.group_size),
        META_PREFIX + "layer_bits": json.dumps({n: m.bits for n, m in layers.items()}, sort_keys=True),
    }


class DoubleRoundingHfQuantizer(HfQuantizer):
    """Loads, quantizes and saves Double Rounding switchable checkpoints."""

    requires_calibration = False
    quantization_config: DoubleRoundingConfig

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("disk offload is not supported for double_rounding checkpoints; use device_map=None/'cpu'")

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # quantize-on-load happens after loading, see _process_model_after_weight_loading

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not self.pre_quantized:
            return model
        cfg = self.quantization_config
        skips = cfg.modules_to_not_convert or resolve_modules_to_not_convert(model, cfg)
        targets = linears_to_convert(model, skips)
        if checkpoint_files:
            check_checkpoint(checkpoint_files, model, targets, cfg)
        # The empty load-guard tensor (remote_code.py) is expected in our checkpoints: not worth an UNEXPECTED line.
        guards = {rf"^{re.escape(n)}\.weight$" for n in targets}
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | guards
        for name in targets:
            old = model.get_submodule(name)
            with torch.device("meta"):
                new = SwitchableLinear(old.in_features, old.out_features, old.bias is not None,
                                       dtype=old.weight.dtype, **_layer_kwargs(cfg))
            _replace(model, name, new)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        if not self.pre_quantized:
            quantize(model, cfg)
            return model
        for name, layer in switchable_layers(model).items():
            if layer.weight_master.is_meta or layer.weight_scale.is_meta:
                raise ValueError(f"checkpoint is missing the master or scale of {name}")
            layer.invalidate_cache()
        _apply_config_bits(model, cfg)
        install_atomic_save(model)
        return model

    def get_state_dict_and_metadata(self, model):
        """Frozen masters for layers still in training mode, the load-guard tensor, and the bit-switch metadata for
        the safetensors header."""
        layers = switchable_layers(model)
        state_dict = model.state_dict()
        for name, layer in layers.items():
            if layer.trainable:
                q = layer.master().detach()
                state_dict.pop(f"{name}.weight")
                state_dict[f"{name}.weight_master"] = core.pack_int4(q) if layer.master_bits == 4 else q
                state_dict[f"{name}.weight_scale"] = layer.weight_scale.detach().clamp(min=torch.finfo(torch.float32).tiny)
        metadata = checkpoint_metadata(model, self.quantization_config)
        if layers:
            # An empty tensor where a plain float model expects a Linear weight: loading without abs_llm then fails
            # with a size mismatch instead of returning random weights (see remote_code.py).
            guard = f"{next(iter(layers))}.weight"
            state_dict[guard] = torch.zeros(0, dtype=torch.int8)
            metadata[GUARD_META_KEY] = guard
        return state_dict, metadata

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def check_checkpoint(files, model, targets: list[str], cfg: DoubleRoundingConfig) -> None:
    """Compare safetensors headers with what the config implies, before any tensor is loaded."""
    from safetensors import safe_open

    header: dict[str, tuple[str, list[int]]] = {}
    meta: dict[str, str] = {}
    file_meta = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            raise ValueError(f"double_rounding checkpoints must be safetensors; got {f}")
        try:
            with safe_open(f, framework="pt") as sf:
                file_meta[f] = sf.metadata() or {}
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    header[k] = (sl.get_dtype(), list(sl.get_shape()))
        except Exception as e:  # safetensors raises its own error type for truncated/garbled files
            raise ValueError(f"{f}: unreadable safetensors file (truncated or corrupted?): {e}") from e
        meta.update(file_meta[f])
    version = meta.get(META_PREFIX + "format_version")
    if version is None:
        raise ValueError(f"{files[0]}: safetensors metadata lacks '{META_PREFIX}format_version'; not an abs_llm checkpoint")
    if int(version) > FORMAT_VERSION:
        raise ValueError(f"checkpoint format_version {version} is newer than supported ({FORMAT_VERSION}); upgrade abs_llm")
    for key, expected in (("master_bits", str(cfg.master_bits)), ("group_size", json.dumps(cfg.group_size))):
        got = meta.get(META_PREFIX + key)
        if got != expected:
            raise ValueError(f"checkpoint metadata {key}={got} disagrees with config.json ({expected})")
    want_dtype = "I8" if cfg.master_bits == 8 else "U8"
    problems = []
    for name in targets:
        lin = model.get_submodule(name)
        cols = lin.in_features if cfg.master_bits == 8 else (lin.in_features + 1) // 2
        expect = {
            f"{name}.weight_master": (want_dtype, [lin.out_features, cols]),
            f"{name}.weight_scale": ("F32", [lin.out_features, core.num_groups(lin.in_features, cfg.group_size)]),
        }
        for key, (dt, shape) in expect.items():
            got = header.get(key)
            if got is None:
                problems.append(f"missing tensor {key}")
            elif got != (dt, shape):
                problems.append(f"{key}: dtype/shape {got[0]}{got[1]}, expected {dt}{shape}")
    guard = meta.get(GUARD_META_KEY)
    stray = [k for k in header
             if re.search(r"\.weight$", k) and k[: -len(".weight")] in set(targets) and not (k == guard and header[k][1] == [0])]
    problems += [f"unexpected float weight {k} for a quantized layer" for k in stray]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise ValueError(f"checkpoint does not match its double_rounding config: {shown}")
    if verify_enabled():
        for f, m in file_meta.items():
            verify_file(f, m)
