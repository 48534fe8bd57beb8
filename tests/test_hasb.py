"""HASB: Hutchinson traces (exact on quadratics), roulette sampler, MILP search, persistence (tiny models)."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from abs_llm import DoubleRoundingConfig, SwitchableLinear, get_bits, quantize, set_bits, switchable_layers
from abs_llm import hasb


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


# ---- sampler ----------------------------------------------------------------------------------------------------------
def _model_and_traces(tiny_llama):
    quantize(tiny_llama, DoubleRoundingConfig(bits=8, candidate_bits=[8, 4, 2]))
    names = list(switchable_layers(tiny_llama))
    return tiny_llama, {n: float(i) for i, n in enumerate(names)}  # mean = (L-1)/2: the later half is sensitive


def test_sampler_probabilities_and_schedule(tiny_llama):
    model, tr = _model_and_traces(tiny_llama)
    s = hasb.HASBSampler(model, tr, sigma_schedule="linear", seed=0)
    names = list(tr)
    assert s.probabilities(names[-1]) == pytest.approx({8: 8 / 14, 4: 4 / 14, 2: 2 / 14})
    assert s.probabilities(names[0]) == pytest.approx({8: 1 / 3, 4: 1 / 3, 2: 1 / 3})
    assert s.step(0.0) == {n: 8 for n in names}  # sigma(0) = 0: nothing resampled
    assert set(s.sample(0.0, base_bits=2).values()) == {2}
    counts = {n: {8: 0, 4: 0, 2: 0} for n in names}
    for _ in range(3000):
        for n, b in s.sample(1.0).items():
            counts[n][b] += 1
    for n in names:
        freq = {b: c / 3000 for b, c in counts[n].items()}
        assert freq == pytest.approx(s.probabilities(n), abs=0.04)
    applied = s.step(1.0)
    assert get_bits(model) == applied or len(set(applied.values())) == 1
    assert hasb.HASBSampler(model, tr, seed=5).sample(0.7) == hasb.HASBSampler(model, tr, seed=5).sample(0.7)


def test_sampler_bad_input_and_callback(tiny_llama):
    model, tr = _model_and_traces(tiny_llama)
    with pytest.raises(ValueError, match="not a candidate bit-width"):
        hasb.HASBSampler(model, tr, candidate_bits=[8, 3])
    with pytest.raises(ValueError, match="sigma_schedule"):
        hasb.HASBSampler(model, tr, sigma_schedule="exp")
    s = hasb.HASBSampler(model, tr, sigma_schedule=1.0)
    cb = hasb.HASBCallback(s)

    class State:
        global_step, max_steps = 5, 10

    cb.on_step_begin(None, State(), None)
    assert get_bits(model) == s.current or len(set(s.current.values())) == 1


# ---- search -----------------------------------------------------------------------------------------------------------
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


# ---- CLI --------------------------------------------------------------------------------------------------------------
class FakeTok:
    """Character-level stand-in for the tiny model's 128-token vocabulary."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) % 128 for c in text]}

    def save_pretrained(self, path):
        pass


def test_cli_search_and_sweep(tiny_llama, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import transformers

    from abs_llm.cli import main as cli

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: FakeTok())
    ckpt = tmp_path / "q"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=DoubleRoundingConfig(bits=8))
    model.save_pretrained(ckpt)
    out = tmp_path / "s"
    assert cli(["search", str(ckpt), "--avg-bits", "3", "--calib-docs", "5", "--calib-seq-len", "16",
                "--n-samples", "2", "--out", str(out), "--sweep", "--sweep-bits", "3,5", "--max-chunks", "1"]) == 0
    report = json.loads((out / "hasb.json").read_text())
    assert report["avg_bits"] <= 3 and len(report["layers"]) == len(report["traces"]) == 14
    back = AutoModelForCausalLM.from_pretrained(out)
    assert get_bits(back) == {r["name"]: r["bits"] for r in report["layers"]} or len({r["bits"] for r in report["layers"]}) == 1
    assert back.config.quantization_config.hessian_traces == pytest.approx(report["traces"])
    table = json.loads((out / "sweep.json").read_text())
    assert [r["avg_bits_budget"] for r in table["mixed"]] == [3, 5] and len(table["uniform"]) == 5
    assert (out / "sweep.png").stat().st_size > 1000
    capsys.readouterr()  # a second search reuses the traces stored in the checkpoint, and bad budgets are refused
    assert cli(["search", str(out), "--avg-bits", "9", "--out", str(tmp_path / "t")]) == 2
    assert "feasible range [2, 8]" in capsys.readouterr().err
    assert cli(["search", str(ckpt), "--avg-bits", "3", "--out", str(out)]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert report["calibration"]["method"] == "fisher" and min(report["traces"].values()) >= 0  # the default
    hutch = tmp_path / "h"
    assert cli(["search", str(ckpt), "--avg-bits", "4", "--calib-docs", "5", "--calib-seq-len", "16", "--method",
                "hutchinson", "--n-samples", "2", "--out", str(hutch)]) == 0
    assert json.loads((hutch / "hasb.json").read_text())["calibration"]["method"] == "hutchinson"


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
