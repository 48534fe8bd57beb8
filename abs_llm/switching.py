"""Run-time bit switching, whole model or per layer, and the one answer to "which bits may this model/layer take"."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from . import kernels, norms
from .kernels import cpu_fused
from .layers import SwitchableLinear


_TREE_VERSION = [0]  # bumped whenever any module is registered anywhere (setattr of a Module, add_module, ...)


def _tree_changed(module, name, submodule):
    _TREE_VERSION[0] += 1


register_module_module_registration_hook(_tree_changed)


def switchable_layers(model: nn.Module) -> dict[str, SwitchableLinear]:
    """``{module_name: SwitchableLinear}`` in module order. Memoised on the model until a module is registered
    anywhere: walking ``named_modules`` costs more than switching 56 cached layers (issue 12's ping-pong target)."""
    memo = model.__dict__.get("_abs_llm_layers")
    if memo is not None and memo[0] == _TREE_VERSION[0]:
        return dict(memo[1])
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SwitchableLinear)}
    model.__dict__["_abs_llm_layers"] = (_TREE_VERSION[0], layers)
    return dict(layers)


def require_layers(model: nn.Module) -> dict[str, SwitchableLinear]:
    """:func:`switchable_layers`, refusing a model that has none (a float model passed where a quantized one belongs)."""
    layers = switchable_layers(model)
    if not layers:
        raise ValueError(
            "model has no SwitchableLinear layers; quantize it first with abs_llm.quantize(model, DoubleRoundingConfig())"
            " or from_pretrained(..., quantization_config=DoubleRoundingConfig())"
        )
    return layers


def allowed_bits(target: nn.Module) -> tuple[int, ...]:
    """Bit-widths ``target`` may switch to, highest first: a SwitchableLinear's candidates, or for a model the widths
    every one of its switchable layers shares."""
    if isinstance(target, SwitchableLinear):
        return target.candidate_bits
    common = set.intersection(*(set(m.candidate_bits) for m in require_layers(target).values()))
    return tuple(sorted(common, reverse=True))


def _is_int(b) -> bool:
    return isinstance(b, int) and not isinstance(b, bool)


def check_bits(target: nn.Module, bits, what: str = "bits", where: str = ""):
    """``bits`` (an int, or a list of ints) unchanged if every entry is an allowed width of ``target`` (see
    :func:`allowed_bits`); else a ``ValueError`` naming the offending value and the allowed widths."""
    many = isinstance(bits, (list, tuple))
    if not many and _is_int(bits):  # the common case, per switch: no set of the widths every layer shares
        layers = (target,) if isinstance(target, SwitchableLinear) else require_layers(target).values()
        if all(bits in m.candidate_bits for m in layers):
            return bits
    allowed = allowed_bits(target)
    bad = [b for b in (bits if many else [bits]) if not _is_int(b) or b not in allowed]
    if bad or (many and not bits):
        shown = bits if many else bad[0]
        raise ValueError(f"{what}={shown!r}{where} is not a candidate bit-width; allowed {sorted(allowed)}")
    return list(bits) if many else bits


def set_bits(model: nn.Module, bits: int | dict[str, int], kernel: str | None = None, prepare: bool = True) -> nn.Module:
    """Switch the active bit-width of every SwitchableLinear (``int``) or of the named ones (``{name: bits}``).

    ``kernel`` (``"auto"``, ``"dequant"``, ``"int8pack"``, ... see :mod:`abs_llm.kernels`) sets the matmul of every
    layer; ``None`` keeps each layer's choice. With ``prepare`` the switched layers derive and pack the new width now,
    for the activation dtype/device of their last forward (layers that never ran pack lazily on first use); already
    cached widths cost a dictionary lookup. Everything is validated before anything changes, so a bad request leaves
    the model as it was. The choice is mirrored into ``model.config.quantization_config`` so that ``save_pretrained``
    records it.
    """
    layers = require_layers(model)
    if kernel is not None:
        kernels.check_kernel(kernel)
    if isinstance(bits, dict):
        unknown = [n for n in bits if n not in layers]
        if unknown:
            sample = list(layers)[:3]
            raise ValueError(
                f"unknown layer names {unknown[:5]}{'...' if len(unknown) > 5 else ''}; expected SwitchableLinear names"
                f" such as {sample} (see abs_llm.get_bits(model) for all {len(layers)})"
            )
        plan = dict(bits)
        for name, b in plan.items():
            check_bits(layers[name], b, where=f" for {name}")
    else:
        check_bits(model, bits)
        plan = {n: bits for n in layers}
    kernels_before = {n: m.kernel for n, m in layers.items()} if kernel is not None else {}
    bits_before = []  # (layer, its bits) in switching order: what an exception puts back
    try:
        if kernel is not None:
            for layer in layers.values():
                layer.kernel = kernel
        # the layers' compiled packing is queued: torch's other threads run it while this one goes on with the next
        # layer, and this one runs what is left once every layer is queued
        with cpu_fused.switch_batch(torch.get_num_threads()) as batch:  # without prepare nothing is queued
            for name, b in plan.items():
                layer = layers[name]
                bits_before.append((layer, layer._bits))
                layer.__dict__["_bits"] = int(b)  # validated above; the property setter would check again per layer
                if prepare:
                    layer.prepare()  # may run out of memory half-way: then every layer goes back
        if batch is not None and batch.errors:
            for name, b in plan.items():  # the fused path is off now: pack what this switch packed again, eagerly
                layers[name].invalidate_width(b)
                layers[name].prepare()
    except BaseException:
        for name, b in plan.items():  # packs queued by this switch may be unwritten
            layers[name].invalidate_width(b)
        for layer, b in bits_before:
            layer.__dict__["_bits"] = b
        for name, k in kernels_before.items():
            layers[name].kernel = k
        raise
    _sync_config(model, layers, kernel, None if isinstance(bits, dict) else int(bits))
    norms.apply(model)  # per-width norm gains follow their layers' width (a no-op without them)
    return model


def get_bits(model: nn.Module) -> int | dict[str, int]:
    """The common bit-width when all layers agree, else ``{module_name: bits}``."""
    per_layer = {n: m.bits for n, m in require_layers(model).items()}
    values = set(per_layer.values())
    return values.pop() if len(values) == 1 else per_layer


def _sync_config(model: nn.Module, layers: dict[str, SwitchableLinear], kernel: str | None = None,
                 uniform: int | None = None) -> None:
    qcfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if qcfg is None or isinstance(qcfg, dict):
        return
    if kernel is not None:
        qcfg.kernel = kernel
    if uniform is not None:  # every layer was just set to it: no need to count
        qcfg.bits, qcfg.layer_bits = uniform, None
        return
    counts: dict[int, int] = {}
    for m in layers.values():
        counts[m.bits] = counts.get(m.bits, 0) + 1
    common = max(counts, key=lambda b: (counts[b], b))
    qcfg.bits = common
    qcfg.layer_bits = {n: m.bits for n, m in layers.items() if m.bits != common} or None


def packed_weight_bytes(n_weights: int, bits: int) -> int:
    """Bytes of ``n_weights`` integers packed at ``bits`` (rounded up to a whole byte)."""
    return -(-n_weights * bits // 8)


def model_bytes(model: nn.Module, bits: int | None = None) -> int:
    """Bytes of the model's tensors if every SwitchableLinear were stored packed at ``bits`` (default: the active
    bits of each layer) with its float32 scales; every other parameter/buffer counted at its own dtype. This is the
    size a fixed-bit snapshot needs; the switchable checkpoint itself stores the master (``bits = master_bits``)."""
    layers = switchable_layers(model)
    total = 0
    for m in layers.values():
        b = m.bits if bits is None else bits
        total += packed_weight_bytes(m.out_features * m.in_features, b) + m.weight_scale.numel() * 4
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        owner = name.rpartition(".")[0]
        if owner in layers and not name.endswith(".bias"):
            continue
        if id(t) not in seen:  # tied weights count once
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
