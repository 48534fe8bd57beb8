"""HASB budgeted search: exact MILP (brute force on small cases), sensitivity ordering, budgets, persistence."""

import itertools
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from abs_llm import (
    DoubleRoundingConfig,
    SwitchableLinear,
    get_bits,
    hasb,
    quantize,
    set_bits,
    switchable_layers,
)


def identical_layers(k=6, cands=(8, 6, 4, 3, 2)):
    torch.manual_seed(0)
    lin = nn.Linear(64, 16, bias=False)
    model = nn.ModuleDict({f"l{i}": SwitchableLinear.from_linear(lin, candidate_bits=cands) for i in range(k)})
    return model


@pytest.mark.parametrize("avg", [2.0, 2.5, 3.0, 4.0, 5.5, 8.0])
def test_sensitive_layers_get_more_bits(avg):
    model = identical_layers()
    traces = {f"l{i}": 10.0 ** i for i in range(6)}
    bits = hasb.search(model, traces, avg_bits=avg)
    seq = [bits[f"l{i}"] for i in range(6)]
    assert seq == sorted(seq), seq  # more sensitive (later) never fewer bits
    assert hasb.average_bits(model, bits) <= avg + 1e-9


def test_search_matches_brute_force():
    torch.manual_seed(1)
    model = nn.ModuleDict({f"l{i}": SwitchableLinear.from_linear(nn.Linear(32 * (i + 1), 8), candidate_bits=(8, 4, 3, 2))
                           for i in range(3)})
    traces = {"l0": 5.0, "l1": 0.3, "l2": 1.0}
    names, cands, delta = hasb.perturbations(model)
    n = [8 * 32 * (i + 1) for i in range(3)]
    for avg in [2.4, 3.1, 4.7]:
        best = min((c for c in itertools.product(cands, repeat=3) if np.dot(n, c) <= avg * sum(n)),
                   key=lambda c: sum(traces[k] * delta[i, cands.index(b)] for i, (k, b) in enumerate(zip(names, c))))
        got = hasb.search(model, traces, avg_bits=avg)
        assert tuple(got[k] for k in names) == best


def test_search_bad_input(tiny_llama):
    quantize(tiny_llama, DoubleRoundingConfig(bits=8, candidate_bits=[8, 4, 2]))
    tr = {n: 1.0 for n in switchable_layers(tiny_llama)}
    with pytest.raises(ValueError, match=r"outside the feasible range \[2, 8\]"):
        hasb.search(tiny_llama, tr, avg_bits=1.5)
    with pytest.raises(ValueError, match=r"outside the feasible range \[2, 8\]"):
        hasb.search(tiny_llama, tr, avg_bits=9)
    rng = hasb.feasible_range(tiny_llama)
    with pytest.raises(ValueError, match=rf"feasible range is \[{rng['min_bytes']}, {rng['max_bytes']}\] bytes"):
        hasb.search(tiny_llama, tr, size_bytes=rng["min_bytes"] - 1)
    with pytest.raises(ValueError, match="exactly one budget"):
        hasb.search(tiny_llama, tr)
    with pytest.raises(ValueError, match="unknown layer"):
        hasb.search(tiny_llama, {**tr, "model.nope": 1.0}, avg_bits=4)
    with pytest.raises(ValueError, match="NaN"):
        hasb.search(tiny_llama, {**tr, next(iter(tr)): float("nan")}, avg_bits=4)
    with pytest.raises(ValueError, match="miss 1 layer"):
        hasb.search(tiny_llama, dict(list(tr.items())[1:]), avg_bits=4)
    with pytest.warns(UserWarning, match="negative"):
        hasb.search(tiny_llama, {**tr, next(iter(tr)): -1.0}, avg_bits=4)


def test_search_size_budget_and_persistence(tiny_llama, tokens, tmp_path):
    from abs_llm.switching import model_bytes

    quantize(tiny_llama, DoubleRoundingConfig(bits=8))
    tr = hasb.hessian_traces(tiny_llama, [tokens], n_samples=2, progress=False)
    rng = hasb.feasible_range(tiny_llama)
    size = (rng["min_bytes"] + rng["max_bytes"]) // 2
    bits = hasb.search(tiny_llama, tr, size_bytes=size)
    set_bits(tiny_llama, bits)
    assert model_bytes(tiny_llama) <= size
    hasb.attach_traces(tiny_llama, tr)
    with torch.no_grad():
        ref = tiny_llama(tokens).logits
    tiny_llama.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["abs_llm.hessian_traces"]) == pytest.approx(tr)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert get_bits(back) == get_bits(tiny_llama)
    assert back.config.quantization_config.hessian_traces == pytest.approx(tr)
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, ref)
