"""HASB: Hessian-aware stochastic bit switching (paper: Huang et al., "Nearly Lossless Adaptive Bit Switching").

Three pieces, all on the SwitchableLinear layers of a model:

1. :func:`hessian_traces`: Hutchinson estimate of ``tr(H_l)``, the trace of the loss Hessian w.r.t. each layer's weight,
   divided by the layer's parameter count ``n_l``. The value returned per layer is therefore ``t_l / n_l`` (the mean
   Hessian diagonal), the sensitivity both the sampler and the search use. :func:`fisher_traces` estimates the same
   quantity through the Gauss-Newton (Fisher) approximation of the Hessian: never negative and one plain backward per
   sample instead of a double backward.
2. :class:`HASBSampler`: roulette bit sampling for mixed-precision supernet training.
3. :func:`search`: exact MILP (scipy HiGHS) for the per-layer bit map that minimises
   ``sum_l (t_l/n_l) * ||W_l(b_l) - W_l||^2`` subject to ``sum_l n_l * b_l <= budget``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from .layers import SwitchableLinear
from .switching import set_bits, switchable_layers

__all__ = ["hessian_traces", "fisher_traces", "check_traces", "HASBSampler", "HASBCallback", "search", "feasible_range",
           "average_bits", "attach_traces"]


# ---- 1. Hessian traces ------------------------------------------------------------------------------------------------
def _default_loss(model: nn.Module, batch) -> torch.Tensor:
    """Causal-LM loss of a batch: a LongTensor of token ids (labels = inputs) or a dict of model kwargs."""
    if isinstance(batch, dict):
        return model(**batch).loss
    return model(input_ids=batch, labels=batch, use_cache=False).loss


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


def _calibration_inputs(model: nn.Module, batches: Iterable, n_samples, who: str):
    """Validated ``(layers, batches)`` for a trace estimator."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    layers = switchable_layers(model)
    if not layers:
        raise ValueError("model has no SwitchableLinear layers; quantize it first (abs_llm.quantize)")
    batches = list(batches)
    if not batches:
        raise ValueError(f"{who} needs at least one calibration batch")
    return layers, batches


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


def hessian_traces(
    model: nn.Module,
    batches: Iterable,
    n_samples: int = 8,
    seed: int = 0,
    bits: int | None = None,
    loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
    progress: bool = True,
    history: list | None = None,
) -> dict[str, float]:
    """Hutchinson estimate of the mean Hessian diagonal ``tr(H_l) / n_l`` of the loss w.r.t. each layer's weight.

    ``tr(H) = E_v[v^T H v]`` for Rademacher ``v`` (entries +-1); ``Hv`` comes from a double backward
    (``d/dW <grad L, v>``). For each batch the gradient graph is built once and ``n_samples`` vectors are drawn
    (one per layer per sample, jointly, so one Hessian-vector product serves every layer); the estimate is averaged
    over samples and batches. The model runs in eval mode (no dropout) and the vectors come from a generator seeded
    with ``seed``, so the result is deterministic for fixed batches.

    Args:
        batches: token-id LongTensors ``[B, T]`` (loss = causal LM loss with labels = inputs) or dicts of model
            kwargs, or anything ``loss_fn(model, batch)`` accepts.
        bits: weight point at which the Hessian is taken (default: each layer's master bits, i.e. ~float).
        history: a list that receives one ``{name: v^T H v / n_l}`` dict per Hessian-vector product (batch-major), so
            the estimate from the first k samples can be studied without recomputing.
    Returns ``{module_name: tr(H_l) / n_l}`` for every SwitchableLinear.
    """
    layers, batches = _calibration_inputs(model, batches, n_samples, "hessian_traces")
    loss_fn = loss_fn or _default_loss
    gen = torch.Generator().manual_seed(seed)
    sums = {n: 0.0 for n in layers}
    # the fused SDPA kernels have no double backward; the math kernel does (same values up to rounding)
    with _estimation(model, layers, bits) as (names, ws), sdpa_kernel(SDPBackend.MATH):
        bar = tqdm(total=len(batches) * n_samples, desc="hessian trace", unit="hvp", disable=not progress)
        for batch in batches:
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise ValueError(f"calibration loss is {loss.item()}; cannot estimate Hessian traces")
            grads = torch.autograd.grad(loss, ws, create_graph=True)
            for _ in range(n_samples):
                vs = [torch.empty(w.shape).bernoulli_(0.5, generator=gen).mul_(2).sub_(1).to(w) for w in ws]
                hvs = torch.autograd.grad(grads, ws, grad_outputs=vs, retain_graph=True)
                vhv = {n: float((v * hv).sum(dtype=torch.float64)) for n, v, hv in zip(names, vs, hvs)}
                for n in names:
                    sums[n] += vhv[n]
                if history is not None:
                    history.append({n: vhv[n] / _numel(layers[n]) for n in names})
                bar.update(1)
            del grads, loss
        bar.close()
    count = len(batches) * n_samples
    return {n: sums[n] / count / _numel(layers[n]) for n in names}


def _default_logits(model: nn.Module, batch) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).logits
    return model(input_ids=batch, use_cache=False).logits


def fisher_traces(
    model: nn.Module,
    batches: Iterable,
    n_samples: int = 1,
    seed: int = 0,
    bits: int | None = None,
    logits_fn: Callable[[nn.Module, object], torch.Tensor] | None = None,
    progress: bool = True,
    history: list | None = None,
) -> dict[str, float]:
    """``tr(G_l) / n_l`` for each SwitchableLinear, ``G`` the Gauss-Newton (= Fisher) matrix of the mean token loss.

    For cross-entropy on logits ``z``, ``G = J^T (diag(p) - p p^T) J`` is the Hessian with the term that needs the
    loss at its minimum dropped: it is positive semi-definite, so unlike a Hutchinson estimate of ``H`` (often
    negative per layer at affordable sample counts on an LLM, see BENCHMARKS.md) it never ranks a layer below zero; where
    the logits are linear in the weight (the output layer), ``G = H`` exactly. Estimator: draw a label ``y_t`` from the
    model's own ``p_t`` at every position, ``S = sum_t -log p_t(y_t)``; the per-position gradients have zero mean and
    are independent given the input, so ``E ||dS/dW||^2 / N = tr(G)`` for ``N`` positions. One backward per sample.
    Labels come from a generator seeded with ``seed``: deterministic for fixed batches.
    """
    layers, batches = _calibration_inputs(model, batches, n_samples, "fisher_traces")
    logits_fn = logits_fn or _default_logits
    gen = torch.Generator().manual_seed(seed)
    sums = {n: 0.0 for n in layers}
    with _estimation(model, layers, bits) as (names, ws):
        bar = tqdm(total=len(batches) * n_samples, desc="fisher trace", unit="sample", disable=not progress)
        for batch in batches:
            logits = logits_fn(model, batch).float()
            logp = F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
            if not torch.isfinite(logp).all():
                raise ValueError("calibration logits are not finite; cannot estimate Fisher traces")
            probs = logp.detach().exp().cpu()
            for i in range(n_samples):
                y = torch.multinomial(probs, 1, generator=gen).to(logp.device)
                total = -logp.gather(1, y).sum()
                grads = torch.autograd.grad(total, ws, retain_graph=i < n_samples - 1)
                sq = {n: float(g.double().pow(2).sum()) / logp.shape[0] for n, g in zip(names, grads)}
                for n in names:
                    sums[n] += sq[n]
                if history is not None:
                    history.append({n: sq[n] / _numel(layers[n]) for n in names})
                bar.update(1)
            del logits, logp
        bar.close()
    count = len(batches) * n_samples
    return {n: sums[n] / count / _numel(layers[n]) for n in names}


def _numel(layer: SwitchableLinear) -> int:
    return layer.out_features * layer.in_features


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


# ---- 2. roulette sampler ----------------------------------------------------------------------------------------------
def _sigma_fn(schedule, sigma_min: float, sigma_max: float) -> Callable[[float], float]:
    if callable(schedule):
        return schedule
    if isinstance(schedule, (int, float)) and not isinstance(schedule, bool):
        return lambda p: float(schedule)
    if schedule == "linear":
        return lambda p: sigma_min + (sigma_max - sigma_min) * p
    if schedule == "cosine":  # slow start, slow finish
        return lambda p: sigma_min + (sigma_max - sigma_min) * (1 - math.cos(math.pi * p)) / 2
    raise ValueError(f"sigma_schedule must be 'linear', 'cosine', a number or a callable, got {schedule!r}")


class HASBSampler:
    """Per-step, per-layer roulette bit sampling (paper's HASB).

    At training progress ``p`` in [0, 1], each layer is resampled with probability ``sigma(p)`` (growing over
    training); otherwise it keeps ``base_bits`` (when given, e.g. the precision a joint multi-bit step is training) or
    its previous bit-width. A resampled layer whose sensitivity ``t_l/n_l`` is below the mean over layers draws
    uniformly from the candidates; a sensitive one draws bit ``b`` with probability ``b / sum(candidates)``, so
    sensitive layers spend more steps at high precision.
    """

    def __init__(self, model: nn.Module, traces: dict[str, float], candidate_bits=None, sigma_schedule="linear",
                 seed: int = 0, sigma_min: float = 0.0, sigma_max: float = 1.0):
        self.model = model
        self.traces = check_traces(model, traces)
        layers = switchable_layers(model)
        allowed = set.intersection(*(set(m.candidate_bits) for m in layers.values()))
        self.candidates = sorted(candidate_bits or allowed, reverse=True)
        bad = [b for b in self.candidates if b not in allowed]
        if bad:
            raise ValueError(f"candidate bits {bad} are not candidates of every layer; allowed {sorted(allowed)}")
        if not 0 <= sigma_min <= sigma_max <= 1:
            raise ValueError(f"need 0 <= sigma_min <= sigma_max <= 1, got {sigma_min}, {sigma_max}")
        self.sigma = _sigma_fn(sigma_schedule, sigma_min, sigma_max)
        self.names = list(layers)
        mean = float(np.mean(list(self.traces.values())))
        self.sensitive = {n: self.traces[n] >= mean for n in self.names}
        bits = np.array(self.candidates, dtype=np.float64)
        self._p_sensitive = bits / bits.sum()
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.current = {n: m.bits for n, m in layers.items()}

    def probabilities(self, name: str) -> dict[int, float]:
        """The roulette distribution of one layer (used when it is resampled)."""
        if self.sensitive[name]:
            return dict(zip(self.candidates, self._p_sensitive.tolist()))
        return {b: 1 / len(self.candidates) for b in self.candidates}

    def sample(self, progress: float, base_bits: int | None = None, key: tuple[int, ...] | None = None) -> dict[str, int]:
        """Draw the next per-layer map (not applied). ``progress`` is clamped to [0, 1].

        ``key`` (e.g. ``(step, bit_index)``) draws from a generator seeded with ``(seed, *key)`` instead of the running
        one, so the map depends only on where training is: a resumed run or every DDP rank draws the same maps.
        """
        rng = self._rng if key is None else np.random.default_rng([self.seed, *map(int, key)])
        sigma = min(max(float(self.sigma(min(max(progress, 0.0), 1.0))), 0.0), 1.0)
        if base_bits is not None and base_bits not in self.candidates:
            raise ValueError(f"base_bits={base_bits} is not a candidate; allowed {self.candidates}")
        out = {}
        uniform = np.full(len(self.candidates), 1 / len(self.candidates))
        for n in self.names:
            if rng.random() < sigma:
                p = self._p_sensitive if self.sensitive[n] else uniform
                out[n] = int(rng.choice(self.candidates, p=p))
            else:
                out[n] = self.current[n] if base_bits is None else base_bits
        return out

    def step(self, progress: float, base_bits: int | None = None, key: tuple[int, ...] | None = None) -> dict[str, int]:
        """Sample the next map and apply it to the model with ``set_bits``; returns the map."""
        self.current = self.sample(progress, base_bits, key)
        set_bits(self.model, self.current)
        return self.current


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class HASBCallback(_trainer_callback_base()):
    """``transformers.Trainer`` callback: resample the bit map at the start of every optimisation step, with
    ``progress = global_step / max_steps``. For a trainer that itself calls ``set_bits`` inside ``training_step``
    (MultiBitTrainer), call ``sampler.step(progress, base_bits=b)`` right after its ``set_bits`` instead."""

    def __init__(self, sampler: HASBSampler):
        self.sampler = sampler

    def on_step_begin(self, args, state, control, **kwargs):
        self.sampler.step(state.global_step / max(state.max_steps, 1))
        return control


# ---- 3. budgeted search -----------------------------------------------------------------------------------------------
def _layer_candidates(layers: dict[str, SwitchableLinear], candidate_bits) -> list[int]:
    allowed = set.intersection(*(set(m.candidate_bits) for m in layers.values()))
    cands = sorted(set(candidate_bits) if candidate_bits else allowed)
    bad = [b for b in cands if b not in allowed]
    if bad or not cands:
        raise ValueError(f"candidate bits {bad or cands} are not candidates of every layer; allowed {sorted(allowed)}")
    return cands


def _weight_bytes(n: int, bits: int) -> int:
    return -(-n * bits // 8)  # packed, as model_bytes counts it


def feasible_range(model: nn.Module, candidate_bits=None) -> dict[str, float]:
    """Smallest and largest average bits and model bytes (``model_bytes`` accounting) any per-layer map can reach."""
    from .switching import model_bytes

    layers = switchable_layers(model)
    if not layers:
        raise ValueError("model has no SwitchableLinear layers; quantize it first (abs_llm.quantize)")
    cands = _layer_candidates(layers, candidate_bits)
    fixed = model_bytes(model) - sum(_weight_bytes(_numel(m), m.bits) for m in layers.values())
    return {"min_avg_bits": float(cands[0]), "max_avg_bits": float(cands[-1]),
            "min_bytes": fixed + sum(_weight_bytes(_numel(m), cands[0]) for m in layers.values()),
            "max_bytes": fixed + sum(_weight_bytes(_numel(m), cands[-1]) for m in layers.values()),
            "fixed_bytes": fixed}


def average_bits(model: nn.Module, bit_map: dict[str, int] | None = None) -> float:
    """Parameter-weighted average bit-width ``sum n_l b_l / sum n_l`` of ``bit_map`` (default: the active bits)."""
    layers = switchable_layers(model)
    bit_map = bit_map or {n: m.bits for n, m in layers.items()}
    return sum(_numel(m) * bit_map[n] for n, m in layers.items()) / sum(_numel(m) for m in layers.values())


@torch.no_grad()
def perturbations(model: nn.Module, candidate_bits=None) -> tuple[list[str], list[int], np.ndarray]:
    """``||W_l(b) - W_l||^2`` for every layer and candidate; ``W_l`` is the float latent weight of a training-mode
    layer, else the dequantized master (the best weight a frozen checkpoint knows)."""
    layers = switchable_layers(model)
    cands = _layer_candidates(layers, candidate_bits)
    delta = np.zeros((len(layers), len(cands)))
    for i, m in enumerate(layers.values()):
        ref = m.weight.detach().float() if m.trainable else m.derived_weight(m.master_bits)
        for j, b in enumerate(cands):
            delta[i, j] = float((m.derived_weight(b).float() - ref).pow(2).sum(dtype=torch.float64))
    return list(layers), cands, delta


def search(model: nn.Module, traces: dict[str, float], avg_bits: float | None = None, size_bytes: int | None = None,
           candidate_bits=None, time_limit: float = 120.0, perturbation=None) -> dict[str, int]:
    """Per-layer bit map minimising ``sum_l (t_l/n_l) ||W_l(b_l) - W_l||^2`` under a budget, solved exactly.

    Budget: ``avg_bits`` (``sum_l n_l b_l <= avg_bits * sum_l n_l``) or ``size_bytes`` (the ``model_bytes`` of the
    mixed model, i.e. packed weights at their bits + scales + every unquantized tensor). Multiple-choice knapsack as a
    MILP: binary ``x[l, b]``, one bit-width per layer, one budget row; HiGHS with zero optimality gap. At the exact
    optimum a more sensitive layer never gets fewer bits than a less sensitive one with the same weights (swapping
    their bits would lower the objective at equal cost). The map is returned, not applied (see :func:`set_bits`).
    ``perturbation``: the result of :func:`perturbations` for this model, to reuse across budgets (it costs one
    derivation per layer and candidate; the MILP itself takes well under a second).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    if (avg_bits is None) == (size_bytes is None):
        raise ValueError("give exactly one budget: avg_bits or size_bytes")
    traces = check_traces(model, traces)
    names, cands, delta = perturbation or perturbations(model, candidate_bits)
    if names != list(switchable_layers(model)):
        raise ValueError("perturbation was computed for a different set of layers")
    layers = switchable_layers(model)
    n = np.array([_numel(layers[k]) for k in names], dtype=np.float64)
    rng = feasible_range(model, cands)
    if avg_bits is not None:
        if not rng["min_avg_bits"] <= avg_bits <= rng["max_avg_bits"]:
            raise ValueError(f"avg_bits={avg_bits} is outside the feasible range [{rng['min_avg_bits']:g}, "
                             f"{rng['max_avg_bits']:g}] of candidate bits {cands}")
        cost = np.outer(n / n.sum(), cands)  # average-bits units keep the row O(1) for the solver
        limit = float(avg_bits)
    else:
        if not rng["min_bytes"] <= size_bytes <= rng["max_bytes"]:
            raise ValueError(f"size_bytes={size_bytes} is infeasible; the feasible range is [{rng['min_bytes']}, "
                             f"{rng['max_bytes']}] bytes (all layers at {cands[0]} .. {cands[-1]} bits)")
        wb = np.array([[_weight_bytes(int(k), b) for b in cands] for k in n], dtype=np.float64)
        scale = wb.sum()
        cost, limit = wb / scale, (size_bytes - rng["fixed_bytes"]) / scale
    t = np.array([traces[k] for k in names])
    obj = (t[:, None] * delta).ravel()
    if obj.max() > 0:
        obj = obj / obj.max()
    L, K = len(names), len(cands)
    one_per_layer = LinearConstraint(np.kron(np.eye(L), np.ones(K)), 1, 1)
    for _ in range(3):  # the solver's feasibility tolerance may overshoot the budget by ~1e-9: verify, tighten
        budget = LinearConstraint(cost.ravel()[None, :], -np.inf, limit)
        res = milp(obj, constraints=[one_per_layer, budget], integrality=np.ones(L * K), bounds=Bounds(0, 1),
                   options={"mip_rel_gap": 0.0, "time_limit": time_limit})
        if res.x is None:
            raise ValueError(f"MILP found no solution ({res.message}); feasible range {rng}")
        choice = np.asarray(res.x).reshape(L, K).argmax(axis=1)
        used = float(cost[np.arange(L), choice].sum())
        if used <= (avg_bits if avg_bits is not None else (size_bytes - rng["fixed_bytes"]) / scale) + 1e-12:
            break
        limit -= used - limit + 1e-12
    else:
        raise ValueError("MILP solution kept exceeding the budget by the solver tolerance; try a slightly larger budget")
    if res.status != 0:
        warnings.warn(f"MILP stopped before proving optimality ({res.message}); the map is the best found", stacklevel=2)
    return {k: cands[j] for k, j in zip(names, choice)}
