"""One-shot post-training quantization of the INT8/INT4 master from calibration text (``method="gptq"``).

``abs_llm.quantize(model, cfg, method="gptq", calibration=texts, tokenizer=tok)`` calls :func:`gptq_masters` and then
builds the same ``SwitchableLinear`` layers as plain rounding does, from these masters and scales: the checkpoint
format and loading are unchanged. The math is in :mod:`abs_llm.ptq.gptq`, the block-by-block calibration plumbing in
:mod:`abs_llm.ptq.calibration`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import core
from .calibration import HessianCollector, calibration_windows, capture_inputs, cross_stats, find_blocks, run_block
from .gptq import SolverOptions, asymmetric_target, solve

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_BIT_WEIGHTS", "GPTQOptions", "METHODS", "check_method", "gptq_masters", "SolverOptions", "solve"]

METHODS = ("rtn", "gptq")


def check_method(method, calibration, tokenizer, options) -> None:
    """Fail before any work: an unknown method, or calibration arguments given to plain rounding (they would be
    silently ignored)."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {list(METHODS)}")
    if method == "rtn" and (calibration is not None or tokenizer is not None or options is not None):
        raise ValueError("calibration/tokenizer/gptq_options are only used by method='gptq'; pass method='gptq'")
    if method == "gptq":
        GPTQOptions.make(options).check()


# Chosen on validation (BENCHMARKS.md, "GPTQ options on validation"): 8 and 6 bits stay within +0.5% / +1.2% with a
# small weight, so the weight goes to 4 and 3 bits (w4 +20% -> +13%, w3 x3.7 -> x2.8 on Lee validation); 2 bits is
# unusable without training whatever the master, and pulling the master towards it costs 3 bits.
DEFAULT_BIT_WEIGHTS = {8: 0.5, 7: 0.5, 6: 0.25, 5: 1.0, 4: 4.0, 3: 2.0, 2: 0.0}


@dataclass
class GPTQOptions(SolverOptions):
    """Knobs of ``method="gptq"`` (solver knobs: see :class:`abs_llm.ptq.gptq.SolverOptions`).

    bit_weights: ``{bits: weight}`` of each candidate width in the joint objective (missing widths: 1.0; 0 drops a
        width from the objective, it is still derived). With ``normalize`` (default) each width's error is measured
        relative to plain rounding's on the same layer. ``None``: :data:`DEFAULT_BIT_WEIGHTS` for the widths present
        (all 1.0 if none of them has a positive default).
    seq_len / calib_tokens / batch_size: calibration windows (non-overlapping, from the joined texts).
    propagate_bits: width at which an already quantized block feeds the next one (``None``: the master width;
        ``0``: the float weights, i.e. every layer is calibrated on the float model's activations).
    true_sequential: re-collect the Hessians inside a block after each group of layers (q/k/v, o, gate/up, down) is
        quantized (one extra block pass per group), instead of once per block.
    asymmetric: each width below the master (with a positive weight; or the widths listed) aims at the float model's
        output *given the inputs the model quantized at that width sees*, not at the float weights
        (:func:`.gptq.asymmetric_target`): one more block pass per such width and one for the float model, per block.
    """

    bit_weights: dict | None = None
    seq_len: int = 512
    calib_tokens: int = 16384
    batch_size: int = 4
    propagate_bits: int | None = None
    true_sequential: bool = False
    asymmetric: bool | list = False

    def check(self) -> None:
        super().check()
        if self.asymmetric and (self.true_sequential or self.feedback != "per_width"):
            raise ValueError("asymmetric=True needs true_sequential=False and feedback='per_width'")

    @classmethod
    def make(cls, options) -> "GPTQOptions":
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, dict):
            raise ValueError(f"gptq options must be a dict or GPTQOptions, got {type(options).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown gptq option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    def solver(self) -> SolverOptions:
        return SolverOptions(**{f.name: getattr(self, f.name) for f in fields(SolverOptions)})

    def weights_for(self, bits) -> list[float]:
        if self.bit_weights is None:
            w = [DEFAULT_BIT_WEIGHTS.get(b, 1.0) for b in bits]
            return w if any(w) else [1.0] * len(bits)
        try:  # JSON/YAML may give the widths as strings
            given = {int(b): w for b, w in dict(self.bit_weights).items()}
        except (TypeError, ValueError):
            raise ValueError(f"bit_weights must map bit-widths to weights, got {self.bit_weights!r}") from None
        bad = sorted(set(given) - set(bits))
        if bad:
            raise ValueError(f"bit_weights names widths {bad} that are not candidate bits {sorted(bits)}")
        w = [float(given.get(b, 1.0)) for b in bits]
        if any(x < 0 or x != x for x in w) or not any(w):
            raise ValueError(f"bit_weights must be >= 0 with at least one positive, got {given}")
        return w


def gptq_masters(model: nn.Module, config, targets: list[str], calibration, tokenizer, options=None,
                 progress: bool = True, report: dict | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer name: (master int8 (out, in), scale float32 (out, n_groups))}`` for the target Linear layers inside
    the decoder blocks, chosen block by block on the calibration text. The model's float weights are restored before
    returning (they are swapped for derived weights while later blocks are calibrated). Targets outside the blocks
    are not in the result (the caller rounds them)."""
    opts = GPTQOptions.make(options)
    opts.check()
    bits = list(config.candidate_bits)
    weights = opts.weights_for(bits)
    prop = config.master_bits if opts.propagate_bits is None else opts.propagate_bits
    if not (prop == 0 or 2 <= prop <= config.master_bits):
        raise ValueError(f"propagate_bits={prop} is neither 0 (float) nor derivable from a {config.master_bits}-bit "
                         "master")
    windows = calibration_windows(tokenizer, calibration, opts.seq_len, opts.calib_tokens)
    prefix, blocks = find_blocks(model, targets)
    outside = [t for t in targets if not t.startswith(prefix + ".")]
    if outside:
        logger.warning("gptq: %d layer(s) outside the decoder blocks are rounded to nearest: %s", len(outside),
                       outside[:3])
    t0 = time.perf_counter()
    originals: dict[str, torch.Tensor] = {}
    masters: dict = {}
    stats: dict = {}
    was_training = model.training
    model.eval()
    low = [b for b in bits if b < config.master_bits]
    if isinstance(opts.asymmetric, bool):
        named = low if opts.asymmetric else []
    else:
        named = list(opts.asymmetric) if isinstance(opts.asymmetric, (list, tuple)) else [opts.asymmetric]
        bad = [b for b in named if b not in low]
        if bad:
            raise ValueError(f"asymmetric names {bad}: give True/False or widths among the candidates below the "
                             f"master ({low})")
    asym = [k for k, b in enumerate(bits) if b in named and weights[k] > 0]
    try:
        batches = capture_inputs(model, blocks[0], windows, opts.batch_size)
        float_batches, streams = batches, {k: batches for k in asym}  # the float model's and each width's inputs
        bar = tqdm(range(len(blocks)), desc="gptq", unit="block", disable=not progress)
        for i in bar:
            block = blocks[i]
            names = [t for t in targets if t.startswith(f"{prefix}.{i}.")]
            todo = {n[len(f"{prefix}.{i}.") :]: block.get_submodule(n[len(f"{prefix}.{i}.") :]) for n in names}
            local = list(todo)
            while todo:
                with HessianCollector(todo) as hc:
                    run_block(block, batches)
                unreached = sorted(n for n in todo if n not in hc.owner)
                if unreached:
                    raise ValueError(f"block {i}: layers {unreached} are not called by the block's forward; "
                                     "list them in modules_to_not_convert or use method='rtn'")
                groups = hc.groups()[:1] if opts.true_sequential else hc.groups()
                bar.set_postfix_str(", ".join("+".join(m.rsplit(".", 1)[-1] for m in g) for g, _ in groups))
                goals = _asymmetric_targets(block, groups, float_batches, streams, len(bits), opts.damp) if asym else None
                for (members, _), res in zip(groups, _solve_groups(block, groups, config, bits, weights, opts, goals)):
                    _apply(block, members, res, config, bits, prop, originals, f"{prefix}.{i}.", masters, stats)
                    for m in members:
                        todo.pop(m)
            if asym:
                float_batches, streams = _next_streams(block, local, f"{prefix}.{i}.", masters, originals, config, bits,
                                                       float_batches, streams)
            batches = run_block(block, batches)
    finally:
        for name, w in originals.items():
            model.get_submodule(name).weight.data = w
        model.train(was_training)
    if report is not None:
        report.update(seconds=time.perf_counter() - t0, windows=list(windows.shape), layers=stats,
                      options={f.name: getattr(opts, f.name) for f in fields(opts)})
    return masters


def _group_weight(block, members) -> torch.Tensor:
    """The float weights of layers sharing one input, stacked by rows (what one :func:`.gptq.solve` call takes)."""
    return torch.cat([block.get_submodule(m).weight.detach().float() for m in members])


def _asymmetric_targets(block, groups, float_batches, streams, n_bits, damp) -> list[torch.Tensor]:
    """Per layer group, ``(widths, out, in)``: the float weights, and for each width with a stream the weights that
    map that stream's inputs onto the float model's outputs (:func:`.gptq.asymmetric_target`)."""
    owners = {members[0]: block.get_submodule(members[0]) for members, _ in groups}
    stats = cross_stats(block, owners, float_batches, streams)
    out = []
    for members, _ in groups:
        w = _group_weight(block, members)
        t = w.unsqueeze(0).repeat(n_bits, 1, 1)
        for k in streams:
            C, Hq = stats[(members[0], k)]
            t[k] = asymmetric_target(w, C, Hq, damp)
        out.append(t)
    return out


def _next_streams(block, local, prefix, masters, originals, config, bits, float_batches, streams):
    """The next block's inputs of the float model and of the model at each stream's width."""
    mods = {n: block.get_submodule(n) for n in local}
    current = {n: m.weight.data for n, m in mods.items()}
    try:
        for n, m in mods.items():
            m.weight.data = originals.get(prefix + n, current[n])
        float_next = run_block(block, float_batches)
        nxt = {}
        for k, batches in streams.items():
            for n, m in mods.items():
                q, s = masters[prefix + n]
                m.weight.data = core.derived_weight(q, s, config.master_bits, bits[k], config.group_size).to(
                    current[n].dtype)
            nxt[k] = run_block(block, batches)
    finally:
        for n, m in mods.items():
            m.weight.data = current[n]
    return float_next, nxt


def _solve_groups(block, groups, config, bits, weights, opts, goals=None) -> list:
    """Solve the layer groups of one block (independent given their Hessians) on a pool of ``torch.get_num_threads()``
    Python threads with one intra-op thread each: the column loop is thousands of small ops, which one thread runs
    faster than two, so the cores are better used one group each (the ops release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(k):
        members, H = groups[k]
        w = _group_weight(block, members)
        bounds = [0, *torch.tensor([block.get_submodule(m).out_features for m in members]).cumsum(0).tolist()]
        rows = list(zip(bounds[:-1], bounds[1:]))
        goal = None if goals is None else goals[k]
        return solve(w, H, config.master_bits, bits, weights, config.group_size, opts.solver(), rows, goal), rows

    threads = torch.get_num_threads()
    workers = max(1, min(threads, len(groups)))
    if workers == 1:
        return [one(k) for k in range(len(groups))]
    torch.set_num_threads(1)
    try:
        # largest first, so the pool ends together (gate+up is a third of a Llama block)
        order = sorted(range(len(groups)), key=lambda k: -sum(block.get_submodule(m).weight.numel() for m in groups[k][0]))
        with ThreadPoolExecutor(workers) as pool:
            futures = {k: pool.submit(one, k) for k in order}
            return [futures[k].result() for k in range(len(groups))]
    finally:
        torch.set_num_threads(threads)


def _apply(block, members, result, config, bits, prop, originals, prefix, masters, stats) -> None:
    """Record the masters, and let the following layers see the derived weights at ``prop`` bits."""
    (q, scale, info), rows = result
    for name, (r0, r1) in zip(members, rows):
        m, full = block.get_submodule(name), prefix + name
        masters[full] = (q[r0:r1].contiguous(), scale[r0:r1].contiguous())
        stats[full] = {k: dict(zip(bits, info[k][:, r0:r1].sum(1).tolist())) for k in ("gptq", "rtn")}
        stats[full]["kept_rtn_rows"] = int(info["kept_rtn"][r0:r1].sum())
        if prop:
            originals.setdefault(full, m.weight.data)
            derived = core.derived_weight(q[r0:r1], scale[r0:r1], config.master_bits, prop, config.group_size)
            m.weight.data = derived.to(m.weight.dtype)
