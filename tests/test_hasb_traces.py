"""HASB sensitivities: Hutchinson exact on quadratics, Fisher exact on softmax regression, models left unchanged."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abs_llm import (
    DoubleRoundingConfig,
    SwitchableLinear,
    get_bits,
    hasb,
    quantize,
    switchable_layers,
)


class Quadratic(nn.Module):
    """loss = sum_k 0.5 * c_k * ||W_k x||^2 summed over the rows x of X: the Hessian w.r.t. W_k is
    c_k * (I_out kron X^T X), so tr(H_k) = c_k * out * ||X||_F^2 exactly."""

    def __init__(self, coeffs, out=8, inp=32, trainable=False):
        super().__init__()
        torch.manual_seed(0)
        self.coeffs = coeffs
        self.lins = nn.ModuleList(
            SwitchableLinear.from_linear(nn.Linear(inp, out, bias=False), group_size=None, trainable=trainable)
            for _ in coeffs
        )

    @staticmethod
    def loss(model, x):
        return sum(0.5 * c * lin(x).pow(2).sum() for c, lin in zip(model.coeffs, model.lins))


def exact(coeffs, x, out=8, inp=32):
    return {f"lins.{k}": c * out * float(x.pow(2).sum()) / (out * inp) for k, c in enumerate(coeffs)}


def test_hutchinson_exact_for_diagonal_hessian():
    # X^T X diagonal -> v^T H v = tr(H) for every Rademacher v: one sample is exact
    x = torch.diag(torch.linspace(0.5, 2.0, 32))
    model = Quadratic([1.0, 3.0])
    got = hasb.hessian_traces(model, [x], n_samples=1, loss_fn=Quadratic.loss, progress=False)
    for k, v in exact([1.0, 3.0], x).items():
        assert got[k] == pytest.approx(v, rel=1e-5)


@pytest.mark.parametrize("trainable", [False, True])
def test_hutchinson_converges_on_dense_quadratic(trainable):
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(64, 32, generator=g) for _ in range(2)]
    model = Quadratic([0.5, 2.0], trainable=trainable)
    got = hasb.hessian_traces(model, batches, n_samples=64, seed=1, loss_fn=Quadratic.loss, progress=False)
    want = [exact([0.5, 2.0], b) for b in batches]
    for k in got:
        assert got[k] == pytest.approx(np.mean([w[k] for w in want]), rel=0.05)
    again = hasb.hessian_traces(model, batches, n_samples=64, seed=1, loss_fn=Quadratic.loss, progress=False)
    other = hasb.hessian_traces(model, batches, n_samples=64, seed=2, loss_fn=Quadratic.loss, progress=False)
    assert again == got and other != got


def test_traces_on_tiny_llama_leave_model_unchanged(tiny_llama, tokens):
    quantize(tiny_llama, DoubleRoundingConfig(bits=4))
    with torch.no_grad():
        before = tiny_llama(tokens).logits
    tr = hasb.hessian_traces(tiny_llama, [tokens], n_samples=2, progress=False)
    assert list(tr) == list(switchable_layers(tiny_llama)) and all(math.isfinite(v) for v in tr.values())
    assert all("forward" not in m.__dict__ for m in switchable_layers(tiny_llama).values())
    with torch.no_grad():
        assert torch.equal(tiny_llama(tokens).logits, before)
    assert get_bits(tiny_llama) == 4
    with pytest.raises(ValueError, match="n_samples"):
        hasb.hessian_traces(tiny_llama, [tokens], n_samples=0)
    with pytest.raises(ValueError, match="at least one"):
        hasb.hessian_traces(tiny_llama, [], n_samples=1)


class SoftmaxRegression(nn.Module):
    """logits = W x: cross-entropy's Hessian w.r.t. W equals its Gauss-Newton matrix, with
    tr = mean_t (1 - ||p_t||^2) ||x_t||^2 exactly."""

    def __init__(self, classes=10, inp=32):
        super().__init__()
        torch.manual_seed(0)
        self.head = SwitchableLinear.from_linear(nn.Linear(inp, classes, bias=False), group_size=None)

    @staticmethod
    def logits(model, x):
        return model.head(x)


def test_fisher_trace_matches_exact_gauss_newton_and_hutchinson():
    g = torch.Generator().manual_seed(5)
    x = 3 * torch.randn(256, 32, generator=g)
    model = SoftmaxRegression()
    with torch.no_grad():
        p = torch.softmax(model.head(x), -1)
        exact_tr = float(((1 - p.pow(2).sum(-1)) * x.pow(2).sum(-1)).mean()) / (10 * 32)
    fisher = hasb.fisher_traces(model, [x], n_samples=256, seed=0, logits_fn=SoftmaxRegression.logits, progress=False)
    assert fisher["head"] == pytest.approx(exact_tr, rel=0.1)
    labels = torch.randint(0, 10, (256,), generator=g)  # the Hessian of a linear softmax model ignores the labels
    hutch = hasb.hessian_traces(model, [x], n_samples=64, seed=0, progress=False,
                                loss_fn=lambda m, b: F.cross_entropy(m.head(b), labels))
    assert hutch["head"] == pytest.approx(exact_tr, rel=0.1)
    again = hasb.fisher_traces(model, [x], n_samples=256, seed=0, logits_fn=SoftmaxRegression.logits, progress=False)
    assert again == fisher


def test_fisher_traces_on_tiny_llama_are_positive_and_leave_model_unchanged(tiny_llama, tokens):
    quantize(tiny_llama, DoubleRoundingConfig(bits=4))
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    bits = get_bits(tiny_llama)
    got = hasb.fisher_traces(tiny_llama, [tokens], n_samples=2, seed=0, progress=False)
    assert set(got) == set(switchable_layers(tiny_llama)) and all(v > 0 for v in got.values())
    assert all(torch.equal(v, tiny_llama.state_dict()[k]) for k, v in before.items()) and get_bits(tiny_llama) == bits
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1, got 0"):
        hasb.fisher_traces(tiny_llama, [tokens], n_samples=0)
