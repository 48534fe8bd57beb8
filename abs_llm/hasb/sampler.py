"""HASB's roulette: per-step, per-layer bit sampling for mixed-precision supernet training (paper: Huang et al.)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from torch import nn
from transformers import TrainerCallback

from ..switching import allowed_bits, check_bits, set_bits, switchable_layers
from .traces import check_traces

__all__ = ["HASBSampler", "HASBCallback"]


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
        self.candidates = sorted(check_bits(model, list(candidate_bits or allowed_bits(model)), "candidate bits"),
                                 reverse=True)
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


class HASBCallback(TrainerCallback):
    """``transformers.Trainer`` callback: resample the bit map at the start of every optimisation step, with
    ``progress = global_step / max_steps``. For a trainer that itself calls ``set_bits`` inside ``training_step``
    (MultiBitTrainer), call ``sampler.step(progress, base_bits=b)`` right after its ``set_bits`` instead."""

    def __init__(self, sampler: HASBSampler):
        self.sampler = sampler

    def on_step_begin(self, args, state, control, **kwargs):
        self.sampler.step(state.global_step / max(state.max_steps, 1))
        return control
