"""Tests for abs_llm.ptq: the multi-bit-aware GPTQ solver (exact math on small matrices) and method="gptq" end to
end on tiny random Llama models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import abs_llm
from abs_llm import DoubleRoundingConfig, core, set_bits, switchable_layers
from abs_llm.ptq import DEFAULT_BIT_WEIGHTS, GPTQOptions, gptq_masters
from abs_llm.ptq.calibration import HessianCollector, calibration_windows, capture_inputs, run_block
from abs_llm.ptq.gptq import SolverOptions, solve, width_errors
from tests.conftest import char_tokenizer, tiny_llama_config

BITS = [8, 6, 4, 3, 2]
TEXT = ("Double rounding keeps one integer master and derives every lower width by a second rounding. " * 12).strip()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: OpenMP hand-offs cost more than the ops (10x more on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def char_tok():
    return char_tokenizer()


def _model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=128)).eval()


def _correlated(n_in=96, n=512, seed=0, rank=8):
    """Inputs with strongly correlated features (a rank-8 signal plus noise), as LLM activations tend to have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, n_in, generator=g) + 0.1 * torch.randn(n, n_in, generator=g)
    return x, 2 * x.t() @ x / n


OPTS = dict(seq_len=32, calib_tokens=256)


# ---- solver math -------------------------------------------------------------------------------------------------
def test_identity_hessian_single_width_is_rounding():
    """No correlation between inputs and one width: the best master of every element is its rounding."""
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(0))
    for master, gs in ((8, 64), (8, None), (4, 32)):
        opts = SolverOptions(clip_grid=(1.0,), act_order=False)
        q, s, _ = solve(w, torch.eye(96), master, [master], [1.0], gs, opts)
        s0 = core.init_scale(w, master, gs)
        assert torch.equal(s, s0)
        assert torch.equal(q, core.quantize_master(w, s0, master, gs))


def test_width_errors_are_output_errors():
    x, H = _correlated()
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(1))
    s = core.init_scale(w, 8, 64)
    q = core.quantize_master(w, s, 8, 64)
    err = width_errors(w, q, s, H, 8, BITS, 64)
    for i, b in enumerate(BITS):
        direct = 2 * ((x @ (w - core.derived_weight(q, s, 8, b, 64)).t()) ** 2).sum(0) / x.shape[0]
        torch.testing.assert_close(err[i], direct, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("feedback", ["per_width", "mean"])
def test_joint_objective_beats_rounding(feedback):
    """On correlated inputs the error feedback lowers the weighted joint error well below plain rounding's, without
    the fallback to rounding (keep_best_of_rtn=False), at every group layout."""
    _, H = _correlated()
    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(2))
    for gs in (64, None):
        opts = SolverOptions(feedback=feedback, keep_best_of_rtn=False)
        q, s, info = solve(w, H, 8, BITS, [1.0] * 5, gs, opts)
        lam = info["lam"]
        joint, rtn = (lam * info["gptq"]).sum(), (lam * info["rtn"]).sum()
        assert joint < 0.8 * rtn, (gs, joint, rtn)
        torch.testing.assert_close(info["gptq"], width_errors(w, q, s, H, 8, BITS, gs))


def test_never_worse_than_rounding_per_row():
    """With the default fallback every row's joint error is <= plain rounding's, even on a Hessian where the greedy
    feedback is poor (a nearly singular, badly scaled one)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 96, generator=g) * torch.logspace(-3, 1, 96)
    H = 2 * x.t() @ x / 40
    w = torch.randn(24, 96, generator=g)
    _, _, info = solve(w, H, 8, BITS, [1.0, 1.0, 1.0, 1.0, 0.1], 64, SolverOptions(damp=1e-4))
    lam = info["lam"]
    assert ((lam * info["gptq"]).sum(0) <= (lam * info["rtn"]).sum(0) * (1 + 1e-6)).all()


def test_local_candidates_close_to_exhaustive():
    _, H = _correlated(seed=4)
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(5))
    res = {}
    for mode in ("local", "all"):
        _, _, info = solve(w, H, 8, BITS, [1.0] * 5, 64, SolverOptions(candidates=mode, keep_best_of_rtn=False))
        res[mode] = float((info["lam"] * info["gptq"]).sum())
    assert res["local"] <= 1.05 * res["all"], res


def test_bit_weights_steer_the_master():
    """Putting all weight on 8 bits gives a better 8-bit error and a worse 3-bit error than all weight on 3 bits."""
    _, H = _correlated(seed=6)
    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(7))
    hi = solve(w, H, 8, BITS, [1, 0, 0, 0, 0], 64, SolverOptions(keep_best_of_rtn=False))[2]["gptq"].sum(1)
    lo = solve(w, H, 8, BITS, [0, 0, 0, 1, 0], 64, SolverOptions(keep_best_of_rtn=False))[2]["gptq"].sum(1)
    assert hi[0] < lo[0] and lo[3] < hi[3]


# ---- calibration plumbing ----------------------------------------------------------------------------------------
def test_hessian_collector_shares_inputs_and_is_exact(char_tok):
    m = _model()
    windows = calibration_windows(char_tok, [TEXT], 32, 128)
    blk = m.model.layers[0]
    batches = capture_inputs(m, blk, windows, 2)
    layers = {n: mod for n, mod in blk.named_modules() if isinstance(mod, torch.nn.Linear)}
    seen = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: seen.setdefault(n, []).append(i[0].detach()))
             for n, mod in layers.items()]
    with HessianCollector(layers) as hc:
        run_block(blk, batches)
    for h in hooks:
        h.remove()
    groups = {tuple(names): H for names, H in hc.groups()}
    assert list(groups) == [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]
    for names, H in groups.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[names[0]]])
        torch.testing.assert_close(H, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-5)


# ---- quantize(method="gptq") end to end --------------------------------------------------------------------------
def test_gptq_checkpoint_is_int8_and_reloads_bit_exactly(char_tok, tmp_path, tokens):
    m = _model()
    cfg = DoubleRoundingConfig(bits=8, candidate_bits=BITS, group_size=64)
    abs_llm.quantize(m, cfg, method="gptq", calibration=[TEXT], tokenizer=char_tok, gptq_options=OPTS)
    layers = switchable_layers(m)
    assert len(layers) == 14
    rtn = _model()
    abs_llm.quantize(rtn, DoubleRoundingConfig(bits=8, candidate_bits=BITS, group_size=64))
    differ = 0
    for name, layer in layers.items():
        q = layer.master()
        assert q.dtype == torch.int8 and int(q.min()) >= -128 and int(q.max()) <= 127
        differ += int((q != switchable_layers(rtn)[name].master()).sum())
    assert differ > 0  # the masters are not plain rounding's
    m.save_pretrained(tmp_path / "ckpt")
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    for name, layer in switchable_layers(re).items():
        assert torch.equal(layer.master(), layers[name].master())
        assert torch.equal(layer.weight_scale, layers[name].weight_scale)
    for b in BITS:
        set_bits(m, b)
        set_bits(re, b)
        with torch.no_grad():
            assert torch.equal(m(tokens).logits, re(tokens).logits)


def test_gptq_lowers_the_calibration_error_and_restores_float_weights(char_tok):
    """Each layer's joint error (on the Hessians seen during calibration) is never above rounding's; the float model
    is left untouched by gptq_masters."""
    m = _model()
    before = {n: p.clone() for n, p in m.state_dict().items()}
    cfg = DoubleRoundingConfig(candidate_bits=BITS, group_size=64)
    targets = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"]
    report = {}
    masters = gptq_masters(m, cfg, targets, [TEXT], char_tok, OPTS, progress=False, report=report)
    assert set(masters) == set(targets)
    for n, p in m.state_dict().items():
        assert torch.equal(p, before[n]), n
    total_g = total_r = 0.0
    for stats in report["layers"].values():
        rel_g = sum(stats["gptq"][b] / stats["rtn"][b] for b in BITS)
        assert rel_g <= len(BITS) * (1 + 1e-6)
        total_g, total_r = total_g + rel_g, total_r + len(BITS)
    assert total_g < 0.95 * total_r  # and clearly lower overall


def test_thread_pool_gives_the_same_masters(char_tok):
    """The groups of a block are solved on a pool of threads when torch has several: same masters as one thread."""
    cfg = DoubleRoundingConfig(candidate_bits=BITS, group_size=64)
    runs = []
    for threads in (1, 2):
        m = _model()
        targets = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"]
        torch.set_num_threads(threads)
        try:
            runs.append(gptq_masters(m, cfg, targets, [TEXT], char_tok, OPTS, progress=False))
        finally:
            torch.set_num_threads(1)
    for name, (q, s) in runs[0].items():
        assert torch.equal(q, runs[1][name][0]) and torch.equal(s, runs[1][name][1]), name


def test_trainable_gptq_starts_from_the_master(char_tok):
    m = _model()
    cfg = DoubleRoundingConfig(candidate_bits=BITS, group_size=64)
    abs_llm.quantize(m, cfg, trainable=True, method="gptq", calibration=[TEXT], tokenizer=char_tok, gptq_options=OPTS)
    frozen = _model()
    abs_llm.quantize(frozen, DoubleRoundingConfig(candidate_bits=BITS, group_size=64), method="gptq",
                     calibration=[TEXT], tokenizer=char_tok, gptq_options=OPTS)
    for name, layer in switchable_layers(m).items():
        assert layer.trainable
        assert torch.equal(layer.master(), switchable_layers(frozen)[name].master())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="gptq", tokenizer="tok"), "needs calibration"),
        (dict(method="gptq", calibration=[]), "needs calibration"),
        (dict(method="gptq", calibration=["  "], tokenizer="tok"), "needs calibration"),
        (dict(method="gptq", calibration=[TEXT]), "needs tokenizer"),
        (dict(method="awq"), "unknown quantization method"),
        (dict(method="rtn", calibration=[TEXT]), "only used by method='gptq'"),
        (dict(method="gptq", calibration=["too short"], tokenizer="tok"), "too short"),
        (dict(method="gptq", calibration=[TEXT], tokenizer="tok", gptq_options={"dampening": 0.1}), "unknown gptq"),
        (dict(method="gptq", calibration=[TEXT], tokenizer="tok", gptq_options={"bit_weights": {5: 1.0}}),
         "not candidate bits"),
        (dict(method="gptq", calibration=[TEXT], tokenizer="tok", gptq_options={"damp": 0}), "damp"),
        (dict(method="gptq", calibration=[TEXT], tokenizer="tok", gptq_options={"feedback": "sum"}), "feedback"),
        (dict(method="gptq", calibration=[TEXT], tokenizer="tok", gptq_options={"asymmetric": [8]}), "asymmetric names"),
    ],
)
def test_bad_inputs(char_tok, kwargs, match):
    m = _model()
    if kwargs.get("tokenizer") == "tok":
        kwargs = kwargs | {"tokenizer": char_tok}
    if kwargs.get("method") == "gptq":
        kwargs.setdefault("gptq_options", OPTS)
    before = {n: p.clone() for n, p in m.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        abs_llm.quantize(m, DoubleRoundingConfig(candidate_bits=BITS, group_size=64), **kwargs)
    assert not switchable_layers(m)
    assert all(torch.equal(p, before[n]) for n, p in m.state_dict().items())


def test_options_object_and_validation():
    o = GPTQOptions.make({"bit_weights": {8: 2.0, 2: 0.0}, "act_order": False})
    assert o.weights_for(BITS) == [2.0, 1.0, 1.0, 1.0, 0.0] and o.act_order is False
    with pytest.raises(ValueError, match="at least one positive"):
        GPTQOptions(bit_weights={b: 0 for b in BITS}).weights_for(BITS)
    # defaults: the validated weights for the widths present; a lone 2-bit width (per-bit GPTQ) still gets weight
    assert GPTQOptions().weights_for(BITS) == [DEFAULT_BIT_WEIGHTS[b] for b in BITS]
    assert GPTQOptions().weights_for([2]) == [1.0]
    assert GPTQOptions().weights_for([4, 2]) == [DEFAULT_BIT_WEIGHTS[4], 0.0]


# ---- asymmetric calibration (GPTAQ) -----------------------------------------------------------------------------
def test_asymmetric_target_splits_the_output_error_exactly():
    """|X W^T - X_q Q^T|^2 = const + tr((W* - Q) H_q (W* - Q)^T) for every Q: quantizing towards W* with H_q is the
    same problem as matching the float outputs from the quantized inputs."""
    from abs_llm.ptq.gptq import asymmetric_target

    g = torch.Generator().manual_seed(3)
    x, _ = _correlated(n_in=24, n=400, seed=1)
    x = x.double()
    xq = x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    w = torch.randn(10, 24, generator=g, dtype=torch.float64)
    n = x.shape[0]
    C, Hq = 2 * x.t() @ xq / n, 2 * xq.t() @ xq / n
    ws = asymmetric_target(w, C, Hq, damp=1e-12)

    def direct(q):
        return 2 * ((x @ w.t() - xq @ q.t()) ** 2).sum() / n

    def split(q):
        e = ws - q
        return ((e @ Hq) * e).sum()

    qs = [torch.randn(10, 24, generator=g, dtype=torch.float64) for _ in range(3)] + [w, ws]
    const = direct(qs[0]) - split(qs[0])
    for q in qs[1:]:
        assert torch.allclose(direct(q) - split(q), const, rtol=1e-8, atol=1e-8)
    assert split(ws) == 0 and direct(ws) <= direct(w)


def test_solver_targets_are_what_each_width_approaches():
    """With per-width targets equal to ``w`` the solver is unchanged; the errors it reports are against the targets."""
    x, H = _correlated()
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(2))
    base = solve(w, H, 8, BITS, [1.0] * 5, 32)
    same = solve(w, H, 8, BITS, [1.0] * 5, 32, targets=w.unsqueeze(0).repeat(5, 1, 1))
    assert torch.equal(base[0], same[0]) and torch.equal(base[1], same[1])
    shifted = w.unsqueeze(0).repeat(5, 1, 1)
    shifted[3] = w * 0.9  # 3 bits aims elsewhere
    q, s, info = solve(w, H, 8, BITS, [1.0] * 5, 32, targets=shifted)
    assert torch.allclose(info["gptq"], width_errors(shifted, q, s, H, 8, BITS, 32))
    with pytest.raises(ValueError, match="targets must be"):
        solve(w, H, 8, BITS, [1.0] * 5, 32, targets=w)
    with pytest.raises(ValueError, match="feedback='per_width'"):
        solve(w, H, 8, BITS, [1.0] * 5, 32, SolverOptions(feedback="mean"), targets=shifted)


def test_asymmetric_gptq_runs_end_to_end(char_tok):
    """On a tiny model: every layer gets a master, the float weights come back untouched, and the widths' own input
    streams change the masters (whether they help is measured in BENCHMARKS.md, not asserted on a random model)."""
    runs = {}
    for asym in (False, True):
        m = _model()
        before = {n: p.clone() for n, p in m.state_dict().items()}
        targets = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"]
        cfg = DoubleRoundingConfig(candidate_bits=BITS, group_size=64)
        runs[asym] = gptq_masters(m, cfg, targets, [TEXT], char_tok, OPTS | {"asymmetric": asym}, progress=False)
        assert set(runs[asym]) == set(targets)
        assert all(torch.equal(p, before[n]) for n, p in m.state_dict().items())
    first = "model.layers.0.self_attn.q_proj"  # same inputs in both runs: only later layers see other streams
    assert torch.equal(runs[True][first][0], runs[False][first][0])
    assert any(not torch.equal(runs[True][n][0], runs[False][n][0]) for n in runs[True])
    with pytest.raises(ValueError, match="asymmetric=True needs"):
        GPTQOptions(asymmetric=True, true_sequential=True).check()


def test_asymmetric_accepts_one_width_as_an_int(char_tok):
    """``asymmetric=3`` means ``[3]`` (it used to pass validation and then be ignored)."""
    cfg = DoubleRoundingConfig(candidate_bits=BITS, group_size=64)
    runs = {}
    for asym in (3, [3], False):
        m = _model()
        targets = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n != "lm_head"]
        runs[str(asym)] = gptq_masters(m, cfg, targets, [TEXT], char_tok, OPTS | {"asymmetric": asym}, progress=False)
    assert all(torch.equal(runs["3"][n][0], runs["[3]"][n][0]) for n in runs["3"])
    assert any(not torch.equal(runs["3"][n][0], runs["False"][n][0]) for n in runs["3"])
