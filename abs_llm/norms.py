"""Per-width norm gains: each tuned bit-width carries its own copy of every RMSNorm / LayerNorm gain vector.

Below 6 bits much of a Double Rounding model's loss is a drift of the activation magnitudes, which the
norm gains in front of every block can undo ("norm tweaking", Li et al. 2023; switchable normalisation per width as in
slimmable and AdaBits networks). The gains are ~0.03% of the parameters per width, so a width gets its own without
costing any other width anything; the integer master is untouched.

State, per norm module with gains (``norm_bits`` in the config names the widths):

- ``weight_w{b}``: persistent buffers, the gains of width ``b`` (saved as ``<norm>.weight_w{b}``);
- ``weight_float``: non-persistent buffer, the model's own gains, used by every other width and saved as
  ``<norm>.weight`` (:func:`abs_llm.checkpoint.state_dict_and_metadata`);
- ``weight``: the active gains, re-bound by :func:`apply` after every switch. It is re-bound, never written into: a
  draft model (:mod:`abs_llm.speculative`) keeps its own ``_parameters`` for these modules and its own width.

A norm takes width ``b``'s gains when every switchable layer under the norm's parent module (its decoder layer; the
whole model for a final norm) is at ``b`` and ``b`` was tuned; a mixed per-layer map leaves it at the float gains.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import SwitchableLinear

PREFIX = "weight_w"


def _is_norm(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return type(module).__name__.endswith(("RMSNorm", "LayerNorm")) and isinstance(w, torch.Tensor) and w.dim() == 1


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of the norms that can carry per-width gains (RMSNorm / LayerNorm with a gain vector)."""
    return {n: m for n, m in model.named_modules() if _is_norm(m)}


def gain_bits(module: nn.Module) -> list[int]:
    """Widths with their own gains on one norm module (empty for a plain norm)."""
    return sorted((int(k[len(PREFIX):]) for k in module._buffers if k.startswith(PREFIX)), reverse=True)


def tuned_norms(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in norm_modules(model).items() if gain_bits(m)}


def add_gains(model: nn.Module, bits, init: str = "float") -> dict[str, nn.Module]:
    """Give every norm its own gains for each width in ``bits`` (copies of the float gains, or empty tensors on the
    meta device with ``init="meta"``, for a checkpoint about to be loaded)."""
    norms = norm_modules(model)
    if not norms:
        raise ValueError("per-width norm gains need RMSNorm / LayerNorm modules with a gain vector; this model has none")
    for m in norms.values():
        float_gains = m._buffers.get("weight_float")
        if float_gains is None and init != "meta":
            float_gains = m.weight.detach().clone()
            m.register_buffer("weight_float", float_gains, persistent=False)
        for b in bits:
            t = torch.empty_like(m.weight, device="meta") if init == "meta" else float_gains.clone()
            m.register_buffer(f"{PREFIX}{int(b)}", t, persistent=True)
    return norms


def finish_load(model: nn.Module) -> None:
    """After a checkpoint's tensors are in: the loaded ``weight`` is the float gains; every tuned width must be there."""
    for name, m in tuned_norms(model).items():
        for b in gain_bits(m):
            if m._buffers[f"{PREFIX}{b}"].is_meta:
                raise ValueError(f"checkpoint lacks {name}.{PREFIX}{b} (the {b}-bit norm gains its config names); "
                                 "re-save it with abs_llm, or drop norm_bits from config.json to load the float gains")
        if "weight_float" not in m._buffers:
            m.register_buffer("weight_float", m.weight.detach().clone(), persistent=False)


def _layer_widths(model: nn.Module) -> dict[str, set[int]]:
    """``{parent module name: widths of the switchable layers under it}``, one walk over the layers."""
    widths: dict[str, set[int]] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, SwitchableLinear):
            continue
        parts = name.split(".")
        for i in range(len(parts)):
            widths.setdefault(".".join(parts[:i]), set()).add(layer.bits)
    return widths


def apply(model: nn.Module) -> None:
    """Bind each tuned norm's ``weight`` to the gains of the width its parent's layers are at."""
    qcfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if qcfg is not None and not isinstance(qcfg, dict) and not getattr(qcfg, "norm_bits", None):
        return  # the common case, without a walk over the modules on every switch
    norms = tuned_norms(model)
    if not norms:
        return
    widths = _layer_widths(model)
    for name, m in norms.items():
        under = widths.get(name.rpartition(".")[0], set())
        b = next(iter(under)) if len(under) == 1 else None
        src = m._buffers.get(f"{PREFIX}{b}") if b is not None else None
        src = m._buffers["weight_float"] if src is None else src
        if m._parameters["weight"].data_ptr() != src.data_ptr():  # a ping-pong to the bound width costs nothing
            m._parameters["weight"] = nn.Parameter(src, requires_grad=False)


def float_gains(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<norm>.weight": float gains}`` for every tuned norm: what a checkpoint stores as the norm's weight."""
    return {f"{n}.weight": m._buffers["weight_float"] for n, m in tuned_norms(model).items()}


def fixed_width_state(model: nn.Module, bits: int) -> tuple[dict[str, torch.Tensor], set[str]]:
    """For a fixed-width snapshot (:mod:`abs_llm.export`): ``({"<norm>.weight": gains at bits}, {keys to drop})``."""
    gains, drop = {}, set()
    for n, m in tuned_norms(model).items():
        gains[f"{n}.weight"] = m._buffers.get(f"{PREFIX}{bits}", m._buffers["weight_float"]).detach().clone()
        drop |= {f"{n}.{k}" for k in m._buffers if k.startswith(PREFIX) or k == "weight_float"}
    return gains, drop


def fold(model: nn.Module, bits: int) -> None:
    """Make every tuned norm a plain one holding the gains of ``bits`` (for a dense copy at that width)."""
    gains, _ = fixed_width_state(model, bits)
    for key, g in gains.items():
        m = model.get_submodule(key.rpartition(".")[0])
        for k in [k for k in m._buffers if k.startswith(PREFIX) or k == "weight_float"]:
            del m._buffers[k]
        m._parameters["weight"] = nn.Parameter(g, requires_grad=False)
