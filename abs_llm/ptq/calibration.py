"""Calibration plumbing for one-shot PTQ: token windows, the decoder blocks, their inputs, and per-layer Hessians.

The model runs block by block (as GPTQ does): the inputs of the first decoder block are captured once for every
calibration window, then each block is run on them with hooks on its Linear layers that accumulate
``H = 2 X^T X / N`` of each layer's inputs; after the block is quantized it runs again to produce the next block's
inputs, so later blocks see the quantized earlier blocks' outputs. Layers that receive the very same input tensor
(q/k/v, gate/up) share one Hessian.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..evaluation import token_windows


def calibration_windows(tokenizer, texts, seq_len: int, n_tokens: int) -> torch.Tensor:
    """``LongTensor (n, seq_len)``: the first ``ceil(n_tokens / seq_len)`` non-overlapping windows of the texts joined
    as :func:`abs_llm.perplexity` joins them. Raises ``ValueError`` for missing or too little text."""
    if calibration_missing(texts):
        raise ValueError("method='gptq' needs calibration=[text, ...] (e.g. abs_llm.default_corpus('train')); got "
                         f"{'nothing' if texts is None else repr(texts)[:60]}")
    if tokenizer is None:
        raise ValueError("method='gptq' needs tokenizer=... (the model's tokenizer) to tokenize the calibration text")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"calibration seq_len must be an integer >= 2, got {seq_len!r}")
    if not isinstance(n_tokens, int) or n_tokens < seq_len:
        raise ValueError(f"calib_tokens must be an integer >= seq_len ({seq_len}), got {n_tokens!r}")
    windows = token_windows(tokenizer, texts, seq_len=seq_len, max_chunks=-(-n_tokens // seq_len))
    if windows.shape[1] < seq_len:
        raise ValueError(f"calibration text is too short: {windows.numel()} tokens, fewer than one window of "
                         f"seq_len={seq_len}; give more text or a smaller seq_len")
    return windows


def calibration_missing(texts) -> bool:
    if texts is None:
        return True
    if isinstance(texts, str):
        return not texts.strip()
    texts = list(texts) if isinstance(texts, Sequence) else None
    return not texts or not all(isinstance(t, str) for t in texts) or not any(t.strip() for t in texts)


def find_blocks(model: nn.Module, targets: Sequence[str]) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` holding most of the target layers (the decoder blocks) and its qualified name."""
    best, best_n = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n = sum(t.startswith(name + ".") for t in targets)
            if n > best_n:
                best, best_n = (name, mod), n
    if best is None:
        raise ValueError("found no decoder blocks (an nn.ModuleList holding the Linear layers) for method='gptq'")
    return best


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_inputs(model: nn.Module, first_block: nn.Module, windows: torch.Tensor, batch_size: int):
    """``[(hidden_states, kwargs), ...]`` seen by ``first_block`` for each batch of windows."""
    batches = []

    def hook(module, args, kwargs):
        kw = dict(kwargs)
        h = args[0] if args else kw.pop("hidden_states")
        batches.append((h.detach(), {"args": args[1:], **kw}))
        raise _Captured

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for i in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return batches


@torch.no_grad()
def run_block(block: nn.Module, batches) -> list:
    """The block's outputs for every captured batch, with the same keyword arguments."""
    out = []
    for h, kw in batches:
        kw = dict(kw)
        args = kw.pop("args", ())
        y = block(h, *args, **kw)
        out.append((y[0] if isinstance(y, tuple) else y, kw | {"args": args}))
    return out


class HessianCollector:
    """Forward hooks on ``layers`` (``{name: nn.Linear}``) accumulating ``X^T X``; a layer called right after another
    with the very same input tensor is recorded as sharing that layer's Hessian (``owner``)."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self.sums: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.owner: dict[str, str] = {}
        self.order: list[str] = []
        self._last = None
        self._handles = []

    def _hook(self, name):
        def fn(module, inputs, output):
            x = inputs[0]
            if self._last is not None and self._last[0] is x:
                self.owner.setdefault(name, self.owner.get(self._last[1], self._last[1]))
            else:
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                if name not in self.sums:
                    self.sums[name] = torch.zeros(x2.shape[1], x2.shape[1], device=x2.device)
                    self.count[name] = 0
                self.sums[name].addmm_(x2.t(), x2)
                self.count[name] += x2.shape[0]
                self.owner.setdefault(name, name)
            if name not in self.order:
                self.order.append(name)
            self._last = (x, name)

        return fn

    def __enter__(self):
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._last = None

    def groups(self) -> list[tuple[list[str], torch.Tensor]]:
        """``[(names sharing one input, H), ...]`` in call order, ``H = 2 X^T X / N``."""
        out = []
        for name in self.order:
            if self.owner[name] != name:
                continue
            members = [n for n in self.order if self.owner[n] == name]
            out.append((members, self.sums[name] * (2.0 / max(self.count[name], 1))))
        return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(-1, x.shape[-1]).float()


def _run_hooked(block: nn.Module, owners: dict[str, nn.Module], hook, batches) -> None:
    """Run ``block`` on ``batches`` with ``hook(name, rows of the input)`` on the forward of each of ``owners``."""
    handles = [m.register_forward_hook(lambda m, inputs, out, n=n: hook(n, _rows(inputs[0]))) for n, m in owners.items()]
    try:
        run_block(block, batches)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def cross_stats(block: nn.Module, owners: dict[str, nn.Module], float_batches, streams: dict) -> dict:
    """``{(owner, key): (C, H_q)}`` for each layer in ``owners`` (one per group sharing an input) and each quantized
    stream ``streams[key]`` (block inputs of the model quantized at one width): ``C = 2 X^T X_q / N`` and
    ``H_q = 2 X_q^T X_q / N``, ``X`` the layer's inputs when ``float_batches`` run through the block, ``X_q`` when
    the stream does (the same tokens, row for row). The block's weights are whatever it holds now."""
    seen: dict[str, list] = {n: [] for n in owners}
    _run_hooked(block, owners, lambda n, x: seen[n].append(x), float_batches)
    out = {}
    for key, batches in streams.items():
        sums = {n: {"C": 0, "H": 0, "calls": 0} for n in owners}

        def accumulate(name, xq):
            acc = sums[name]
            acc["C"] = acc["C"] + seen[name][acc["calls"]].t() @ xq
            acc["H"] = acc["H"] + xq.t() @ xq
            acc["calls"] += 1

        _run_hooked(block, owners, accumulate, batches)
        for n, acc in sums.items():
            f = 2.0 / max(sum(x.shape[0] for x in seen[n]), 1)
            out[(n, key)] = (acc["C"] * f, acc["H"] * f)
    return out
