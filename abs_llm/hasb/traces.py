"""Per-layer sensitivities ``t_l / n_l`` for HASB: Hutchinson on the exact Hessian, or the Gauss-Newton/Fisher trace.

Both estimators share one loop (:func:`_estimate`): model in eval mode, gradients only for a float leaf copy of each
layer's derived weight, a seeded generator, a progress bar, an optional per-sample history; they differ only in what
one sample contributes per layer. docs/architecture.md ("HASB") says why Fisher is the default.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..layers import SwitchableLinear
from ..switching import require_layers, switchable_layers


def numel(layer: SwitchableLinear) -> int:
    return layer.out_features * layer.in_features


@contextlib.contextmanager
def _float_weights(layers: dict[str, SwitchableLinear], bits: int | None):
    """Run each layer on a float leaf tensor (its derived weight, detached) that autograd can differentiate twice.

    Frozen layers hold integers, and training-mode layers go through round/clamp (STE); neither gives a usable second
    derivative, so the Hessian is taken w.r.t. the dequantized weight itself, at ``bits`` (default: master bits).
    """
    weights = {}
    for name, layer in layers.items():
        with torch.no_grad():
            w = layer.derived_weight(layer.master_bits if bits is None else bits).detach().clone()
        weights[name] = w.requires_grad_(True)

        def fwd(x, _w=w, _layer=layer):
            bias = None if _layer.bias is None else _layer.bias.to(x.dtype)
            return F.linear(x, _w.to(x.dtype), bias)

        layer.forward = fwd  # instance attribute shadows the class method; removed below
    try:
        yield weights
    finally:
        for layer in layers.values():
            layer.__dict__.pop("forward", None)


@contextlib.contextmanager
def _estimation(model: nn.Module, layers: dict[str, SwitchableLinear], bits: int | None):
    """Eval mode, gradients only for the layers' float weights (this also keeps a double backward small); the model's
    mode and ``requires_grad`` flags are restored afterwards. Yields ``(names, weights)``."""
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        with _float_weights(layers, bits) as weights, torch.enable_grad():
            yield list(weights), list(weights.values())
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)


SampleFn = Callable[[nn.Module, object, list, int, torch.Generator], Iterator[list[float]]]


def _estimate(model: nn.Module, batches: Iterable, n_samples, seed: int, bits: int | None, samples: SampleFn,
              desc: str, progress: bool, history: list | None, math_sdpa: bool = False) -> dict[str, float]:
    """Average over batches and samples of what ``samples(model, batch, weights, n_samples, gen)`` yields (one list of
    per-layer totals per sample), divided by each layer's parameter count."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    layers = require_layers(model)
    batches = list(batches)
    if not batches:
        raise ValueError(f"{desc} needs at least one calibration batch")
    gen = torch.Generator().manual_seed(seed)
    sums = {n: 0.0 for n in layers}
    # the fused SDPA kernels have no double backward; the math kernel does (same values up to rounding)
    backend = sdpa_kernel(SDPBackend.MATH) if math_sdpa else contextlib.nullcontext()
    with _estimation(model, layers, bits) as (names, ws), backend:
        bar = tqdm(total=len(batches) * n_samples, desc=desc, unit="sample", disable=not progress)
        for batch in batches:
            for values in samples(model, batch, ws, n_samples, gen):
                for n, v in zip(names, values):
                    sums[n] += v
                if history is not None:
                    history.append({n: v / numel(layers[n]) for n, v in zip(names, values)})
                bar.update(1)
        bar.close()
    count = len(batches) * n_samples
    return {n: sums[n] / count / numel(layers[n]) for n in names}


def _default_loss(model: nn.Module, batch) -> torch.Tensor:
    """Causal-LM loss of a batch: a LongTensor of token ids (labels = inputs) or a dict of model kwargs."""
    if isinstance(batch, dict):
        return model(**batch).loss
    return model(input_ids=batch, labels=batch, use_cache=False).loss


def _default_logits(model: nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).logits
    return model(input_ids=batch, use_cache=False).logits


def hessian_traces(model: nn.Module, batches: Iterable, n_samples: int = 8, seed: int = 0, bits: int | None = None,
                   loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None, progress: bool = True,
                   history: list | None = None) -> dict[str, float]:
    """Hutchinson estimate of the mean Hessian diagonal ``tr(H_l) / n_l`` of the loss w.r.t. each layer's weight.

    ``tr(H) = E_v[v^T H v]`` for Rademacher ``v`` (entries +-1); ``Hv`` comes from a double backward
    (``d/dW <grad L, v>``). For each batch the gradient graph is built once and ``n_samples`` vectors are drawn
    (one per layer per sample, jointly, so one Hessian-vector product serves every layer); the estimate is averaged
    over samples and batches. Deterministic for fixed batches and ``seed``.

    Args:
        batches: token-id LongTensors ``[B, T]`` (loss = causal LM loss with labels = inputs) or dicts of model
            kwargs, or anything ``loss_fn(model, batch)`` accepts.
        bits: weight point at which the Hessian is taken (default: each layer's master bits, i.e. ~float).
        history: a list that receives one ``{name: v^T H v / n_l}`` dict per Hessian-vector product (batch-major), so
            the estimate from the first k samples can be studied without recomputing.
    Returns ``{module_name: tr(H_l) / n_l}`` for every SwitchableLinear.
    """
    loss_fn = loss_fn or _default_loss

    def samples(model, batch, ws, n, gen):
        loss = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise ValueError(f"calibration loss is {loss.item()}; cannot estimate Hessian traces")
        grads = torch.autograd.grad(loss, ws, create_graph=True)
        for _ in range(n):
            vs = [torch.empty(w.shape).bernoulli_(0.5, generator=gen).mul_(2).sub_(1).to(w) for w in ws]
            hvs = torch.autograd.grad(grads, ws, grad_outputs=vs, retain_graph=True)
            yield [float((v * hv).sum(dtype=torch.float64)) for v, hv in zip(vs, hvs)]

    return _estimate(model, batches, n_samples, seed, bits, samples, "hessian trace", progress, history,
                     math_sdpa=True)


def fisher_traces(model: nn.Module, batches: Iterable, n_samples: int = 1, seed: int = 0, bits: int | None = None,
                  logits_fn: Callable[[nn.Module, object], torch.Tensor] | None = None, progress: bool = True,
                  history: list | None = None) -> dict[str, float]:
    """``tr(G_l) / n_l`` for each SwitchableLinear, ``G`` the Gauss-Newton (= Fisher) matrix of the mean token loss.

    For cross-entropy on logits ``z``, ``G = J^T (diag(p) - p p^T) J`` is the Hessian with the term that needs the
    loss at its minimum dropped: it is positive semi-definite, so unlike a Hutchinson estimate of ``H`` (often
    negative per layer at affordable sample counts on an LLM, see BENCHMARKS.md) it never ranks a layer below zero; where
    the logits are linear in the weight (the output layer), ``G = H`` exactly. Estimator: draw a label ``y_t`` from the
    model's own ``p_t`` at every position, ``S = sum_t -log p_t(y_t)``; the per-position gradients have zero mean and
    are independent given the input, so ``E ||dS/dW||^2 / N = tr(G)`` for ``N`` positions. One backward per sample.
    Labels come from a generator seeded with ``seed``: deterministic for fixed batches.
    """
    logits_fn = logits_fn or _default_logits

    def samples(model, batch, ws, n, gen):
        logits = logits_fn(model, batch).float()
        logp = F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
        if not torch.isfinite(logp).all():
            raise ValueError("calibration logits are not finite; cannot estimate Fisher traces")
        probs = logp.detach().exp().cpu()
        for i in range(n):
            y = torch.multinomial(probs, 1, generator=gen).to(logp.device)
            grads = torch.autograd.grad(-logp.gather(1, y).sum(), ws, retain_graph=i < n - 1)
            yield [float(g.double().pow(2).sum()) / logp.shape[0] for g in grads]

    return _estimate(model, batches, n_samples, seed, bits, samples, "fisher trace", progress, history)


def check_traces(model: nn.Module, traces: dict[str, float], clip: bool = True) -> dict[str, float]:
    """Validate ``traces`` against the model's SwitchableLinear layers: every layer present, no unknown names, finite.

    Negative values (Hutchinson noise on a non-convex loss) are clipped to zero with a warning: a layer whose curvature
    estimate is not positive gets no weight in the search and is treated as insensitive by the sampler.
    """
    layers = switchable_layers(model)
    if not isinstance(traces, dict) or not traces:
        raise ValueError("traces must be a non-empty dict {module_name: trace}")
    unknown = sorted(set(traces) - set(layers))
    if unknown:
        raise ValueError(f"traces name {len(unknown)} unknown layer(s), e.g. {unknown[:3]}; the model's SwitchableLinear"
                         f" layers are e.g. {list(layers)[:3]} ({len(layers)} in all)")
    missing = [n for n in layers if n not in traces]
    if missing:
        raise ValueError(f"traces miss {len(missing)} layer(s), e.g. {missing[:3]}; estimate them with hessian_traces")
    bad = [n for n, t in traces.items() if not isinstance(t, (int, float)) or not math.isfinite(t)]
    if bad:
        raise ValueError(f"traces must be finite numbers; NaN/inf/non-number for {bad[:3]}")
    if not clip:
        return {n: float(traces[n]) for n in layers}
    neg = [n for n in layers if traces[n] < 0]
    if neg:
        warnings.warn(f"{len(neg)} negative trace estimate(s) clipped to 0 (e.g. {neg[:2]}); more samples/batches "
                      "reduce the noise", stacklevel=3)
    return {n: max(float(traces[n]), 0.0) for n in layers}


def attach_traces(model: nn.Module, traces: dict[str, float]) -> None:
    """Record the traces in ``model.config.quantization_config`` so ``save_pretrained`` writes them into config.json
    and the safetensors header (``abs_llm.hessian_traces``), and ``from_pretrained`` restores them."""
    traces = check_traces(model, traces, clip=False)  # the raw estimates: a reader may average more runs in
    qcfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if qcfg is None or isinstance(qcfg, dict):
        raise ValueError("model has no DoubleRoundingConfig to record traces in")
    qcfg.hessian_traces = dict(traces)


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
