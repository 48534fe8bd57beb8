"""HASB: Hessian-aware stochastic bit switching (paper: Huang et al., "Nearly Lossless Adaptive Bit Switching").

- :mod:`.traces`: per-layer sensitivity ``t_l / n_l`` (Hutchinson :func:`hessian_traces`, Gauss-Newton
  :func:`fisher_traces`), validated by :func:`check_traces`, stored with :func:`attach_traces`.
- :mod:`.sampler`: :class:`HASBSampler` / :class:`HASBCallback`, the roulette for mixed-precision supernet training.
- :mod:`.search`: :func:`search`, the exact MILP for the per-layer bit map that minimises
  ``sum_l (t_l/n_l) * ||W_l(b_l) - W_l||^2`` subject to ``sum_l n_l * b_l <= budget``.
- :mod:`.sweep`: calibration batches, the PPL-per-budget sweep and its plot, and :func:`search_checkpoint`
  (the whole ``abs-llm search`` pipeline).
"""

from .sampler import HASBCallback, HASBSampler
from .search import average_bits, feasible_range, perturbations, search
from .sweep import calibration_batches, layer_table, plot_sweep, search_checkpoint, sweep
from .traces import attach_traces, check_traces, fisher_traces, hessian_traces, load_traces

__all__ = ["hessian_traces", "fisher_traces", "check_traces", "attach_traces", "load_traces", "HASBSampler",
           "HASBCallback", "search", "feasible_range", "average_bits", "perturbations", "calibration_batches", "sweep",
           "plot_sweep", "layer_table", "search_checkpoint"]
