"""Self-speculative decoding from one master: a low-bit *draft* that shares the verifier's tensors.

``draft = draft_model(model, bits=4)`` returns a second model object for transformers' assisted generation
(``model.generate(ids, assistant_model=draft)``): the draft proposes tokens at a low bit-width, the verifier checks
them in one forward at its own bit-width, so greedy output is the verifier's own.

How the sharing works: the draft is a structural copy of the module tree. Every module is a new object with its own
``_modules``, hooks and plain attributes (``_bits``, ``_cache``, ``_act`` of a :class:`SwitchableLinear`), but its
``_parameters`` and ``_buffers`` dicts *are* the verifier's dicts. So the draft holds no copy of ``weight_master``,
``weight_scale``, embeddings or norms, and it follows the verifier if the verifier's tensors are replaced
(``model.to(...)``, ``set_master``): each draft layer re-packs when its master changed (checked per forward). What the
draft owns: its packed weights at its own bits, its config (so ``set_bits(draft, ...)`` never edits the verifier's
``quantization_config``), its generation config, and optionally a low-bit copy of a float ``lm_head``.

The draft cannot be saved, pickled, moved or cast (``save_pretrained``/``torch.save``/``to``/``float``... raise):
move or save the verifier and make a new draft.
"""

from __future__ import annotations

import copy
import logging
import types
import weakref

import torch
from torch import nn

from . import core, kernels, norms, row_attention
from .layers import SwitchableLinear
from .switching import check_bits, require_layers, set_bits

logger = logging.getLogger(__name__)

_SHARED = ("_parameters", "_buffers")  # the same dict objects as the verifier's: tensors are never copied
_MEMOS = ("_abs_llm_layers",)  # switching.switchable_layers' memo: it would name the verifier's layers to the draft
_OWN_METHODS = ("save_pretrained", "push_to_hub")  # instance-level overrides (atomic save) would save the verifier


class DraftLinearMixin:
    """A :class:`SwitchableLinear` view: same master/scale tensors as the verifier's layer, own bits and cache."""

    _source_stamp = None

    def packed(self, dtype, device):
        # the shared master may have been replaced or edited through the verifier: re-pack then
        m, s = self.weight_master, self.weight_scale
        stamp = (None if m is None else (m.data_ptr(), m._version), s.data_ptr(), s._version)
        if stamp != self._source_stamp:
            self._cache.clear()
            self._source_stamp = stamp
        return super().packed(dtype, device)


class LowBitHead(nn.Module):
    """The draft's own output layer for a float ``lm_head`` (often tied to the input embedding): the same weight
    quantized by Double Rounding (INT8 master with per-group scales, derived to ``bits``) and packed once for the
    integer kernels; the INT8 master is not kept. ``weight`` is the verifier's Parameter (not a copy); the packed
    weight is rebuilt when that weight or the activation dtype/device changes."""

    def __init__(self, source: nn.Linear, bits: int, group_size: int | None = 64):
        super().__init__()
        core.check_group_size(group_size)
        if isinstance(bits, bool) or bits not in core.allowed_candidates(8):
            raise ValueError(f"head_bits={bits!r} is not derivable from an INT8 master; choose one of 2..8")
        self.in_features, self.out_features = source.in_features, source.out_features
        self.bits, self.group_size = int(bits), group_size
        self.weight = source.weight
        self.bias = source.bias
        self._packed, self._stamp = None, None

    def packed(self, dtype, device) -> kernels.Packed:
        w = self.weight
        stamp = (w.data_ptr(), w._version, dtype, torch.device(device))
        if stamp != self._stamp:
            self._packed = None  # free the old one before building the new one
            with torch.no_grad():
                wf = w.detach().float()
                scale = core.init_scale(wf, 8, self.group_size)
                q = core.quantize_master(wf, scale, 8, self.group_size)
                del wf
                kernel = kernels.choose(self.out_features, self.in_features, self.bits, self.group_size, dtype, device)
                self._packed = kernels.pack_checked(q, scale, 8, self.bits, self.group_size, dtype, device, kernel)
            self._stamp = stamp
        return self._packed

    @property
    def packed_bytes(self) -> int:
        return 0 if self._packed is None else self._packed.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed(x.dtype, x.device)(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size}, shares weight with the verifier"


class DraftModelMixin:
    """Root of a draft: refuses what would treat it as an independent model (save, pickle, move, cast)."""

    is_abs_llm_draft = True

    @property
    def verifier(self):
        """The model this draft was made from (``None`` once it was garbage-collected)."""
        return self._verifier_ref() if self._verifier_ref is not None else None

    def _refuse(self, what: str):
        raise ValueError(
            f"cannot {what} a draft model: it is a low-bit view sharing its tensors with the verifier. "
            "Save/move/cast the verifier instead and make a new draft with abs_llm.draft_model(verifier, bits=...)"
        )

    def save_pretrained(self, *args, **kwargs):
        self._refuse("save")

    def push_to_hub(self, *args, **kwargs):
        self._refuse("push")

    def __reduce_ex__(self, protocol):
        self._refuse("pickle/copy")

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        here = next(iter(self.parameters()), None)
        if here is not None and (device is None or torch.device(device) == here.device) and (
            dtype is None or dtype == getattr(self, "dtype", here.dtype)
        ):
            return self  # already there: a no-op, as user code often calls draft.to(model.device)
        self._refuse("move or cast")

    def _apply(self, fn, recurse=True):
        self._refuse("move or cast")


_TYPES: dict[tuple[type, type], type] = {}


def _with_mixin(cls: type, mixin: type) -> type:
    """``cls`` with ``mixin`` in front, under the same name (transformers dispatches on some class names)."""
    if issubclass(cls, mixin):
        return cls
    key = (cls, mixin)
    if key not in _TYPES:
        _TYPES[key] = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _TYPES[key]


def _view(module: nn.Module, memo: dict, swap: dict, root: nn.Module) -> nn.Module:
    """New module object sharing ``module``'s parameter/buffer dicts, with copied children, hooks and attributes."""
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if module is root:
        cls = _with_mixin(cls, DraftModelMixin)
    elif isinstance(module, SwitchableLinear):
        cls = _with_mixin(cls, DraftLinearMixin)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = {}
    for key, value in module.__dict__.items():
        if key in _MEMOS:
            continue
        if key in _SHARED:
            # a norm with per-width gains re-binds its weight on every switch: the draft binds its own
            state[key] = copy.copy(value) if key == "_parameters" and norms.gain_bits(module) else value
        elif key == "_modules":
            state[key] = {k: None if v is None else _view(v, memo, swap, root) for k, v in value.items()}
        elif id(value) in swap:
            state[key] = swap[id(value)]
        elif isinstance(value, types.MethodType) and value.__self__ is module:
            if key in _OWN_METHODS:
                continue
            state[key] = types.MethodType(value.__func__, new)
        elif key == "forward":  # e.g. accelerate's device-map hooks: a closure over the verifier's own module
            raise ValueError(f"module {type(module).__name__} has a replaced forward ({value!r}), e.g. from a "
                             "device_map/offload hook; draft_model needs a model loaded without device_map")
        elif isinstance(value, dict) and key.endswith("hooks"):  # own hook dicts, without the verifier-only ones
            state[key] = type(value)((k, h) for k, h in value.items() if not getattr(h, "abs_llm_internal", False))
        elif isinstance(value, (dict, list, set)):  # OrderedDict cache, ...: never shared
            state[key] = copy.copy(value)
        else:
            state[key] = value
    if isinstance(module, SwitchableLinear):
        state["_cache"] = type(module._cache)()  # packed weights are per model: the draft packs its own bits
        state["_act"] = module._act
    new.__dict__.update(state)
    return new


def _float_head(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is nn.Linear:
        for name, m in model.named_modules():
            if m is head:
                return name, head
    return None, None


def draft_model(model: nn.Module, bits: int | dict[str, int] = 4, head_bits: int | None = None,
                num_assistant_tokens: int | None = None, schedule: str | None = None,
                confidence_threshold: float | None = None, exact: bool = True) -> nn.Module:
    """A draft for self-speculative decoding that shares ``model``'s integer masters, scales, embeddings and norms.

    Args:
        model: a quantized model (``SwitchableLinear`` layers), the verifier.
        bits: the draft's bit-width, for every layer (``int``) or per layer (``{name: bits}``, e.g. a HASB search
            map; layers not named start at the verifier's current bits). Must be candidates of each layer.
        head_bits: also give the draft its own ``head_bits`` copy of a float ``lm_head`` (the tied 49k x 576
            embedding is the largest matmul of a small model); ``None`` shares the verifier's ``lm_head``.
            Costs about ``vocab * hidden * head_bits / 8`` bytes; worth it only with integer kernels (bf16 on CPU).
        num_assistant_tokens, schedule, confidence_threshold: the draft's ``generation_config`` fields
            ``num_assistant_tokens``, ``num_assistant_tokens_schedule`` (``"constant"``, ``"heuristic"``,
            ``"heuristic_transient"``) and ``assistant_confidence_threshold`` (``0`` turns it off); ``None`` keeps
            transformers' defaults.
        exact: route the verifier's attention through :mod:`abs_llm.row_attention` so that verifying ``K`` tokens in
            one forward gives bit-for-bit the logits of ``K`` one-token steps (the verifier's own decoding is unchanged;
            without it, bf16 rounding differences flip a greedy token every few dozen tokens).

    Returns a model of the same class, for ``model.generate(ids, assistant_model=draft)``. ``set_bits(draft, b)``
    and ``set_bits(model, b)`` are independent. The draft refuses ``save_pretrained``, pickling and ``to()``.
    """
    layers = require_layers(model)
    if getattr(model, "is_abs_llm_draft", False):
        raise ValueError("model is already a draft; pass the verifier to draft_model")
    if any(m.trainable for m in layers.values()):
        raise ValueError("model is in training mode (latent float weights); freeze it before making a draft")
    if schedule is not None and schedule not in ("constant", "heuristic", "heuristic_transient"):
        raise ValueError(f"schedule={schedule!r}; choose 'constant', 'heuristic' or 'heuristic_transient'")
    if num_assistant_tokens is not None and (isinstance(num_assistant_tokens, bool) or num_assistant_tokens < 1):
        raise ValueError(f"num_assistant_tokens must be a positive integer, got {num_assistant_tokens!r}")
    _check_plan(model, layers, bits)
    head_name, head = _float_head(model) if head_bits is not None else (None, None)
    if head_bits is not None and head is None:
        raise ValueError("head_bits needs a float nn.Linear lm_head (get_output_embeddings()); this model has none. "
                         "A quantized lm_head already runs at the draft's bits")
    own = tuple(getattr(model, k, None) for k in ("config", "generation_config", "hf_quantizer"))
    copies = copy.deepcopy(own)  # one call: the hf_quantizer's config stays the copied config's
    swap = {id(a): b for a, b in zip(own, copies) if a is not None}
    draft = _view(model, {}, swap, model)
    draft._verifier_ref = weakref.ref(model)
    if head is not None:
        parent, _, child = head_name.rpartition(".")
        group = getattr(next(iter(layers.values())), "group_size", 64)
        new_head = LowBitHead(head, head_bits, 64 if group is None else group)
        (draft.get_submodule(parent) if parent else draft)._modules[child] = new_head
        new_head.packed(head.weight.dtype, head.weight.device)  # pack now, not inside the first timed token
    set_bits(draft, bits)
    row_attention.make_plain(draft)  # the draft needs no exactness, only speed
    if exact and not row_attention.make_rowwise(model):
        logger.warning("abs_llm draft_model: attention implementation %r has no row-exact wrapper; assisted greedy "
                       "output may differ from plain greedy by float rounding",
                       getattr(getattr(model, "config", None), "_attn_implementation", None))
    gen = getattr(draft, "generation_config", None)
    if gen is not None:
        if num_assistant_tokens is not None:
            gen.num_assistant_tokens = int(num_assistant_tokens)
        if schedule is not None:
            gen.num_assistant_tokens_schedule = schedule
        if confidence_threshold is not None:
            gen.assistant_confidence_threshold = float(confidence_threshold)
    return draft


def _check_plan(model: nn.Module, layers: dict[str, SwitchableLinear], bits) -> None:
    """Validate before building anything, with the draft's wording (set_bits would say the same later)."""
    if not isinstance(bits, dict):
        check_bits(model, bits, what="draft bits")
        return
    for name, b in bits.items():
        if name not in layers:
            raise ValueError(f"draft bits name an unknown layer {name!r}; see abs_llm.get_bits(model) for the names")
        check_bits(layers[name], b, what="draft bits", where=f" for {name}")


def draft_extra_bytes(draft: nn.Module) -> int:
    """Bytes the draft holds that its verifier does not: its packed weights (those not aliasing the master) and a
    low-bit head, each counted once."""
    seen, total = set(), 0
    for m in draft.modules():
        tensors = []
        if isinstance(m, SwitchableLinear):
            for p in m._cache.values():
                tensors += [t for t in p.tensors if isinstance(t, torch.Tensor)]
            shared = {m.weight_master.data_ptr()} if m.weight_master is not None else set()
        elif isinstance(m, LowBitHead) and m._packed is not None:
            tensors, shared = [t for t in m._packed.tensors if isinstance(t, torch.Tensor)], set()
        else:
            continue
        for t in tensors:
            if t.data_ptr() not in seen and t.data_ptr() not in shared:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def generate_with_stats(model: nn.Module, input_ids: torch.Tensor, draft: nn.Module | None = None,
                        max_new_tokens: int = 128, **kwargs) -> tuple[torch.Tensor, dict]:
    """Greedy ``model.generate`` (assisted by ``draft`` when given), timed, with the draft's acceptance counted.

    Each verification round is one forward of the verifier and yields ``accepted + 1`` tokens; each drafted token is one
    forward of the draft. So ``accepted = new_tokens - rounds`` and ``acceptance = accepted / drafted``.
    Returns ``(sequences, stats)``; extra ``kwargs`` go to ``generate`` (e.g. ``min_new_tokens``, ``attention_mask``).
    """
    import time

    counts = {"verifier": 0, "draft": 0}

    def counter(key):
        return lambda *_: counts.__setitem__(key, counts[key] + 1)

    hooks = [model.register_forward_pre_hook(counter("verifier"))]
    if draft is not None:
        hooks.append(draft.register_forward_pre_hook(counter("draft")))
        kwargs["assistant_model"] = draft
    try:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
        seconds = time.perf_counter() - start
    finally:
        for h in hooks:
            h.remove()
    new = out.shape[1] - input_ids.shape[1]
    stats = {"new_tokens": new, "seconds": seconds, "tokens_per_s": new / seconds, "rounds": counts["verifier"]}
    if draft is not None:
        accepted = new - counts["verifier"]
        stats |= {"drafted": counts["draft"], "accepted": accepted,
                  "acceptance": accepted / counts["draft"] if counts["draft"] else 0.0,
                  "tokens_per_round": new / max(counts["verifier"], 1)}
    return out, stats


__all__ = ["LowBitHead", "draft_extra_bytes", "draft_model", "generate_with_stats"]
