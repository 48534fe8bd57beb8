"""Fixed-bit snapshots of a switchable model for consumers that do not know Double Rounding.

- ``compressed-tensors``: the ``pack-quantized`` layout that transformers' compressed-tensors loader and vLLM read:
  per quantized Linear ``weight_packed`` (int32, the derived integers ``q_l`` packed by compressed-tensors' own
  ``pack_to_int32``), ``weight_scale`` (``s_l = s_h * 2^(h-l)``, one per group) and ``weight_shape``; ``config.json``
  carries a ``compressed-tensors`` quantization config with one ``config_groups`` entry (symmetric int weights,
  ``group`` strategy, or ``channel`` for per-channel scales). Dequantization there is ``q_l * s_l``, exactly ours.
  compressed-tensors needs ``group_size`` to divide ``in_features``; our last group of a row may be shorter, so such
  layers are refused with a clear error rather than exported with misaligned scales.
- ``hf-dense``: plain float ``nn.Linear`` weights equal to the derived weights at the chosen bits (no quantization
  config at all), loadable anywhere.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from . import core, norms
from .hf_quantizer import replace_linears
from .switching import check_bits, require_layers

FORMATS = ("compressed-tensors", "hf-dense")
_AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model")


def _check(model, bits: int, fmt: str) -> dict:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}")
    layers = require_layers(model)
    check_bits(model, bits)
    if any(m.trainable for m in layers.values()):
        raise ValueError("model has SwitchableLinear layers in training mode; freeze() them before exporting")
    return layers


def _unique_state_dict(model) -> dict[str, torch.Tensor]:
    """State dict with tied/shared tensors kept once (transformers re-ties them from the config on load)."""
    out, seen = {}, set()
    for k, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[k] = t.detach().contiguous()
    return out


def _copy_aux(src, out: Path) -> None:
    if src is None:
        return
    for name in _AUX_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, out / name)


def compressed_tensors_config(model, layers: dict, bits: int) -> dict:
    """The ``quantization_config`` dict for ``config.json`` (validated by compressed-tensors' own pydantic model)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    group_sizes = {m.group_size for m in layers.values()}
    if len(group_sizes) != 1:
        raise ValueError(f"layers use different group sizes {sorted(map(str, group_sizes))}; cannot express as one group")
    gs = group_sizes.pop()
    args = dict(num_bits=bits, type="int", symmetric=True, dynamic=False)
    args.update(dict(strategy="channel") if gs is None else dict(strategy="group", group_size=gs))
    ignore = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)  # float layers stay float
    qc = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))},
        format="pack-quantized", quantization_status="compressed", ignore=ignore,
    )
    d = qc.model_dump(mode="json")
    d["quant_method"] = "compressed-tensors"
    return d


def export_compressed_tensors(model, out, bits: int, source_dir=None) -> Path:
    """Write ``model`` at ``bits`` as a compressed-tensors ``pack-quantized`` checkpoint in ``out``."""
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError as e:
        raise ImportError("--format compressed-tensors needs the compressed-tensors package: "
                          "pip install 'abs_llm[export]' (or pip install compressed-tensors)") from e
    from safetensors.torch import save_file

    layers = _check(model, bits, "compressed-tensors")
    conv = [n for n, m in layers.items() if getattr(m, "conv1d", False)]
    if conv:
        raise ValueError(f"compressed-tensors replaces nn.Linear layers, but {conv[0]} (and {len(conv) - 1} more) was a "
                         "GPT-2-style Conv1D; export this model with --format hf-dense")
    short = [n for n, m in layers.items() if m.group_size is not None and m.in_features % m.group_size]
    if short:
        m = layers[short[0]]
        raise ValueError(f"compressed-tensors needs group_size to divide in_features, but {short[0]} has in_features="
                         f"{m.in_features} and group_size={m.group_size} (a shorter last group); re-quantize with a "
                         "group size that divides every layer's width, or per-channel (--group-size none)")
    cfg = compressed_tensors_config(model, layers, bits)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    gains, drop = norms.fixed_width_state(model, bits)  # the snapshot's norms hold that width's own gains
    state = {k: v for k, v in _unique_state_dict(model).items()
             if (k.rpartition(".")[0] not in layers or k.endswith(".bias")) and k not in drop} | gains
    for name, m in layers.items():
        q = core.derive(m.master(), m.master_bits, bits)  # int8 holding q_l
        state[f"{name}.weight_packed"] = pack_to_int32(q.contiguous(), bits).contiguous()
        state[f"{name}.weight_scale"] = (m.weight_scale.float() * 2 ** (m.master_bits - bits)).to(dtype).contiguous()
        state[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features], dtype=torch.int64)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("auto_map", None)  # no abs_llm shim: this snapshot needs only compressed-tensors
    config["quantization_config"] = cfg
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _copy_aux(source_dir, out)
    return out


def dense_copy(model, bits: int):
    """A deep copy of ``model`` with every SwitchableLinear replaced by a float ``nn.Linear`` at ``bits``."""
    layers = _check(model, bits, "hf-dense")
    dense = copy.deepcopy(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def to_linear(name, m):
        w = m.derived_weight(bits, dtype).detach()
        if getattr(m, "conv1d", False):  # back to the module the model was built with (weight stored (in, out))
            from transformers.pytorch_utils import Conv1D

            with torch.device("meta"):
                lin = Conv1D(m.out_features, m.in_features)  # always has a bias, as did the layer it came from
            lin.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)
        else:
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight = nn.Parameter(w.clone(), requires_grad=False)
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach().clone().to(dtype), requires_grad=False)
        return lin

    replace_linears(dense, list(layers), to_linear)
    norms.fold(dense, bits)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(dense, attr):
            delattr(dense, attr)
    dense.is_quantized = False
    if hasattr(dense.config, "quantization_config"):
        del dense.config.quantization_config
    dense.config.__dict__.pop("auto_map", None)
    dense.__dict__.pop("save_pretrained", None)  # back to transformers' own save (no abs_llm digests/shim)
    return dense


def export_dense(model, out, bits: int, source_dir=None) -> Path:
    """Write ``model`` at ``bits`` as a plain float checkpoint (dequantized derived weights)."""
    dense = dense_copy(model, bits)
    out = Path(out)
    dense.save_pretrained(out)
    _copy_aux(source_dir, out)
    return out


def export(model, out, bits: int, fmt: str, source_dir=None) -> Path:
    _check(model, bits, fmt)
    fn = export_compressed_tensors if fmt == "compressed-tensors" else export_dense
    return fn(model, out, bits, source_dir=source_dir)


def export_checkpoint(checkpoint, out, bits: int, fmt: str, overwrite: bool = False) -> Path:
    """``abs-llm export``: load a switchable checkpoint and write its ``bits`` snapshot in ``fmt`` to ``out`` (the format
    and the output folder are checked before the slow load)."""
    from .saving import prepare_output_dir
    from .pipeline import load_checkpoint

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}")
    out = prepare_output_dir(out, overwrite)
    model, _ = load_checkpoint(checkpoint, tokenizer=False)
    return export(model, out, bits, fmt, source_dir=checkpoint)
