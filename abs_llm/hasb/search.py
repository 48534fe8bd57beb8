"""HASB's budgeted search: the per-layer bit map minimising the trace-weighted weight perturbation, as an exact MILP."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from ..switching import allowed_bits, check_bits, model_bytes, packed_weight_bytes, require_layers, switchable_layers
from .traces import check_traces, numel

__all__ = ["search", "feasible_range", "average_bits", "perturbations"]


def _candidates(model: nn.Module, candidate_bits) -> list[int]:
    """The widths the search may pick, ascending: ``candidate_bits`` checked against the model, else all it allows."""
    return sorted(set(check_bits(model, list(candidate_bits), "candidate bits") if candidate_bits
                      else allowed_bits(model)))


def feasible_range(model: nn.Module, candidate_bits=None) -> dict[str, float]:
    """Smallest and largest average bits and model bytes (``model_bytes`` accounting) any per-layer map can reach."""
    layers = require_layers(model)
    cands = _candidates(model, candidate_bits)
    fixed = model_bytes(model) - sum(packed_weight_bytes(numel(m), m.bits) for m in layers.values())
    return {"min_avg_bits": float(cands[0]), "max_avg_bits": float(cands[-1]),
            "min_bytes": fixed + sum(packed_weight_bytes(numel(m), cands[0]) for m in layers.values()),
            "max_bytes": fixed + sum(packed_weight_bytes(numel(m), cands[-1]) for m in layers.values()),
            "fixed_bytes": fixed}


def average_bits(model: nn.Module, bit_map: dict[str, int] | None = None) -> float:
    """Parameter-weighted average bit-width ``sum n_l b_l / sum n_l`` of ``bit_map`` (default: the active bits)."""
    layers = switchable_layers(model)
    bit_map = bit_map or {n: m.bits for n, m in layers.items()}
    return sum(numel(m) * bit_map[n] for n, m in layers.items()) / sum(numel(m) for m in layers.values())


@torch.no_grad()
def perturbations(model: nn.Module, candidate_bits=None) -> tuple[list[str], list[int], np.ndarray]:
    """``||W_l(b) - W_l||^2`` for every layer and candidate; ``W_l`` is the float latent weight of a training-mode
    layer, else the dequantized master (the best weight a frozen checkpoint knows)."""
    layers = require_layers(model)
    cands = _candidates(model, candidate_bits)
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
    n = np.array([numel(layers[k]) for k in names], dtype=np.float64)
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
        wb = np.array([[packed_weight_bytes(int(k), b) for b in cands] for k in n], dtype=np.float64)
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
