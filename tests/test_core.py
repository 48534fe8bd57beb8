"""Exact and property tests of the Double Rounding math (abs_llm.core)."""

import math
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from abs_llm import core
from tests._report import RELIABILITY

# (master_bits, bits, q_master, q_derived): hand-computed, round half to even, then clamp.
DERIVE_CASES = [
    (8, 4, 8, 0),  # 0.5 -> 0 (even)
    (8, 4, 24, 2),  # 1.5 -> 2
    (8, 4, 40, 2),  # 2.5 -> 2
    (8, 4, 56, 4),  # 3.5 -> 4
    (8, 4, -8, 0),  # -0.5 -> 0; a shift (floor) would give -1
    (8, 4, -24, -2),
    (8, 4, 7, 0),
    (8, 4, 9, 1),
    (8, 4, 119, 7),
    (8, 4, 120, 7),  # 7.5 -> 8 -> clamp 7
    (8, 4, 127, 7),
    (8, 4, -120, -8),
    (8, 4, -128, -8),
    (8, 2, 32, 0),
    (8, 2, 96, 1),  # 1.5 -> 2 -> clamp 1
    (8, 2, -96, -2),
    (8, 2, -33, -1),
    (8, 2, 127, 1),
    (8, 2, -128, -2),
    (8, 6, 2, 0),
    (8, 6, 6, 2),
    (8, 6, -2, 0),
    (8, 6, 127, 31),
    (8, 6, -128, -32),
    (8, 3, 48, 2),
    (8, 3, 80, 2),
    (8, 3, 112, 3),  # 3.5 -> 4 -> clamp 3
    (8, 3, -112, -4),
    (8, 3, -128, -4),
    (8, 8, -128, -128),
    (8, 8, 127, 127),
    (4, 3, 7, 3),  # 3.5 -> 4 -> clamp 3
    (4, 3, 5, 2),  # 2.5 -> 2
    (4, 3, -5, -2),
    (4, 3, -8, -4),
    (4, 2, 7, 1),
    (4, 2, 2, 0),
    (4, 2, -6, -2),  # -1.5 -> -2
    (4, 2, -8, -2),
]


@pytest.mark.parametrize("h,l,q,expected", DERIVE_CASES)
def test_derive_table(h, l, q, expected):
    out = core.derive(torch.tensor([[q]], dtype=torch.int8), h, l)
    assert out.dtype == torch.int8
    assert out.item() == expected


@pytest.mark.parametrize("h", [8, 4])
def test_derive_exhaustive_matches_python_round(h):
    lo, hi = core.qrange(h)
    q = torch.arange(lo, hi + 1, dtype=torch.int8).reshape(1, -1)
    for l in core.allowed_candidates(h):
        llo, lhi = core.qrange(l)
        expected = [max(llo, min(lhi, round(v / 2 ** (h - l)))) for v in range(lo, hi + 1)]  # Python round: half-even
        assert core.derive(q, h, l).flatten().tolist() == expected


def test_derive_is_not_a_shift():
    q = torch.tensor([[-8, -24, 8]], dtype=torch.int8)
    assert core.derive(q, 8, 4).tolist() != (q >> 4).tolist()


def test_alrs_multipliers():
    assert [core.alrs_multiplier(8, b) for b in (8, 6, 4, 2)] == pytest.approx([1, 0.1, 0.01, 0.001])
    assert core.alrs_multiplier(8, 7) == pytest.approx(0.5)
    assert core.alrs_multiplier(8, 3) == pytest.approx(0.005)
    assert core.alrs_multiplier(4, 3) == pytest.approx(0.5)
    assert core.alrs_multiplier(4, 2) == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [0, 8, 15, 17, 2048, 96, 1.5, True, "64"])
def test_group_size_validation(bad):
    with pytest.raises(ValueError, match=r"power of two in \[16, 1024\]"):
        core.check_group_size(bad)


def test_short_last_group_layout():
    w = torch.randn(3, 100)
    s = core.init_scale(w, 8, 64)
    assert s.shape == (3, 2)
    assert torch.allclose(s[:, 1], w[:, 64:].abs().amax(1) / 127)
    assert core.expand_scale(s, 100, 64).shape == (3, 100)


def test_zero_group_gets_unit_scale():
    w = torch.zeros(2, 32)
    w[0, :16] = 1.0
    s = core.init_scale(w, 8, 16)
    assert s[0, 1] == 1 and s[1, 0] == 1
    assert core.quantize_master(w, s, 8, 16)[1].abs().sum() == 0


shapes = st.tuples(st.integers(1, 6), st.integers(1, 200))
group_sizes = st.sampled_from([None, 16, 32, 64, 128])


@settings(max_examples=60, deadline=None)
@given(shape=shapes, group_size=group_sizes, seed=st.integers(0, 2**16), h=st.sampled_from([8, 4]),
       log_scale=st.floats(-4, 2))
def test_properties(shape, group_size, seed, h, log_scale):
    RELIABILITY["property examples run"] += 1
    torch.manual_seed(seed)
    w = torch.randn(*shape) * 10**log_scale
    s = core.init_scale(w, h, group_size)
    q = core.quantize_master(w, s, h, group_size)
    lo, hi = core.qrange(h)
    assert q.min() >= lo and q.max() <= hi
    w_h = core.dequantize(q, s, h, h, group_size)
    # inside the clipping range the master error is at most half a step
    step = core.expand_scale(s, shape[1], group_size)
    assert torch.all((w - w_h).abs() <= step / 2 * (1 + 1e-5) + 1e-12)
    # quantizing an already quantized weight is the identity (master round trip)
    assert torch.equal(core.quantize_master(w_h, s, h, group_size), q)
    for l in core.allowed_candidates(h):
        ql = core.derive(q, h, l)
        llo, lhi = core.qrange(l)
        assert ql.min() >= llo and ql.max() <= lhi
        # one stored scale serves every bit-width: s_l = s_h * 2^d
        wl = core.dequantize(ql, s, h, l, group_size)
        assert torch.equal(wl, ql.float() * step * 2 ** (h - l))
        assert torch.equal(core.derived_weight(q, s, h, l, group_size), wl)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 41), seed=st.integers(0, 1000))
def test_pack_int4_round_trip(rows, cols, seed):
    RELIABILITY["property examples run"] += 1
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, cols), generator=g, dtype=torch.int8)
    packed = core.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, math.ceil(cols / 2))
    assert torch.equal(core.unpack_int4(packed, cols), q)


def test_pack_int4_layout_and_range():
    packed = core.pack_int4(torch.tensor([[1, -1, 7]], dtype=torch.int8))
    assert packed.tolist() == [[0xF1, 0x07]]
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        core.pack_int4(torch.tensor([[8]], dtype=torch.int8))


@pytest.mark.parametrize("h,l", [(8, 8), (8, 4), (8, 2), (4, 3)])
@pytest.mark.parametrize("group_size", [None, 16])
def test_fake_quantize_forward_and_lsq_gradients(h, l, group_size):
    torch.manual_seed(0)
    w = torch.randn(3, 40)
    s = core.init_scale(w, h, group_size) * 0.6  # shrink so that some weights clip
    wv = w.clone().requires_grad_(True)
    sv = s.clone().requires_grad_(True)
    out = core.fake_quantize(wv, sv, h, l, group_size)
    ref = core.derived_weight(core.quantize_master(w, s, h, group_size), s, h, l, group_size)
    assert torch.equal(out.detach(), ref)
    upstream = torch.randn_like(w)
    out.backward(upstream)
    # analytic STE / LSQ gradients
    d = h - l
    step = core.expand_scale(s, 40, group_size)
    q_h_raw = torch.round(w / step)
    q_l_raw = torch.round(q_h_raw.clamp(*core.qrange(h)) / 2**d)
    inside = (q_h_raw >= core.qrange(h)[0]) & (q_h_raw <= core.qrange(h)[1])
    inside &= (q_l_raw >= core.qrange(l)[0]) & (q_l_raw <= core.qrange(l)[1])
    assert not inside.all(), "test needs clipped weights"
    assert torch.all(wv.grad[~inside] == 0)  # clipped weights get no gradient
    assert torch.allclose(wv.grad, upstream * inside, rtol=1e-6, atol=0)  # STE: identity inside (s * 1/s, 1 ulp)
    q_l = core.derive(core.quantize_master(w, s, h, group_size), h, l).float()
    per_elem = torch.where(inside, 2**d * q_l - w / step, 2**d * q_l)
    g = 40 if group_size is None else group_size
    expected = torch.nn.functional.pad(upstream * per_elem, (0, -40 % g)).reshape(3, -1, g).sum(-1)
    assert torch.allclose(sv.grad, expected, rtol=1e-4, atol=1e-4)


def test_lsq_grad_scale_only_scales_the_gradient():
    torch.manual_seed(0)
    w = torch.randn(2, 32)
    s1 = core.init_scale(w, 8, 16).requires_grad_(True)
    s2 = s1.detach().clone().requires_grad_(True)
    a = core.fake_quantize(w, s1, 8, 4, 16)
    b = core.fake_quantize(w, s2, 8, 4, 16, lsq_grad_scale=True)
    assert torch.equal(a, b)
    a.sum().backward()
    b.sum().backward()
    assert torch.allclose(s2.grad, s1.grad / math.sqrt(16 * 7))


def test_rtn_baseline_differs_from_double_rounding_but_both_in_range():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    rtn = core.quantize_rtn(w, 4, 32)
    s = core.init_scale(w, 8, 32)
    dr = core.derived_weight(core.quantize_master(w, s, 8, 32), s, 8, 4, 32)
    assert rtn.shape == dr.shape == w.shape
    assert (w - rtn).abs().max() < w.abs().max() / 7


@settings(max_examples=40, deadline=None)
@given(shape=shapes, group_size=group_sizes, seed=st.integers(0, 2**16), h=st.sampled_from([8, 4]))
def test_error_grows_as_bits_shrink(shape, group_size, seed, h):
    """Mean |W - W_l| is non-increasing in l on average (a single group can buck the trend by a rounding tie)."""
    RELIABILITY["property examples run"] += 1
    torch.manual_seed(seed)
    w = torch.randn(shape[0], max(shape[1], 16))
    s = core.init_scale(w, h, group_size)
    q = core.quantize_master(w, s, h, group_size)
    errs = [(w - core.derived_weight(q, s, h, l, group_size)).abs().mean().item() for l in core.allowed_candidates(h)]
    # errs is ordered 2..h bits: allow ties within float noise only
    assert all(a >= b - 1e-6 for a, b in zip(errs, errs[1:])), errs


@settings(max_examples=30, deadline=None)
@given(shape=shapes, group_size=group_sizes, seed=st.integers(0, 2**16))
def test_derived_error_bound(shape, group_size, seed):
    """Inside the l-bit clipping range, |W - W_l| <= s_l / 2 + s_h / 2 (one rounding at each level)."""
    RELIABILITY["property examples run"] += 1
    torch.manual_seed(seed)
    w = torch.randn(*shape)
    s = core.init_scale(w, 8, group_size)
    q = core.quantize_master(w, s, 8, group_size)
    step = core.expand_scale(s, shape[1], group_size)
    for l in (6, 4, 3, 2):
        s_l = step * 2 ** (8 - l)
        lo, hi = core.qrange(l)
        inside = (w / s_l >= lo) & (w / s_l <= hi)
        err = (w - core.derived_weight(q, s, 8, l, group_size)).abs()
        assert torch.all(err[inside] <= (s_l / 2 + step / 2)[inside] * (1 + 1e-5))


def test_scale_grad_mult_only_scales_the_scale_gradient():
    torch.manual_seed(0)
    w = torch.randn(4, 48)
    s = core.init_scale(w, 8, 16) * 0.7
    grads = []
    for mult in (1.0, 0.01):
        wv, sv = w.clone().requires_grad_(True), s.clone().requires_grad_(True)
        core.fake_quantize(wv, sv, 8, 3, 16, scale_grad_mult=mult).backward(torch.ones_like(w))
        grads.append((wv.grad, sv.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[1][1], grads[0][1] * 0.01)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile needs a C++ compiler on CPU")
def test_fused_fake_quantize_matches_eager():
    """torch.compile'd kernels: the same forward values and weight gradients bit for bit, the scale gradient up to
    summation order; one compiled graph serves every width (the width enters as 0-dim tensors)."""
    torch.manual_seed(0)
    w = torch.randn(3, 40)
    s = core.init_scale(w, 8, 16) * 0.6
    g = torch.randn_like(w)
    for bits in (4, 2):
        res = []
        for fused in (False, True):
            wv, sv = w.clone().requires_grad_(True), s.clone().requires_grad_(True)
            out = core.fake_quantize(wv, sv, 8, bits, 16, fused=fused)
            out.backward(g)
            res.append((out.detach(), wv.grad, sv.grad))
        assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
        torch.testing.assert_close(res[0][2], res[1][2], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile needs a C++ compiler on CPU")
def test_fused_fake_quantize_in_bf16_matches_eager_then_cast():
    """``out_dtype``: the compiled pass rounds ``W_l`` to bf16 itself (the same bits as casting the float32 result,
    round to nearest even) and its backward, which recomputes ``q_l`` and the mask, gives the eager weight gradient
    bit for bit from a bf16 output gradient."""
    torch.manual_seed(1)
    w = torch.randn(6, 48) * 0.05
    s = core.init_scale(w, 8, 16) * 0.7  # some weights clip at every width
    g = torch.randn(6, 48).bfloat16()
    for bits in (8, 6, 3, 2):
        res = []
        for fused in (False, "compile"):
            wv, sv = w.clone().requires_grad_(True), s.clone().requires_grad_(True)
            out = core.fake_quantize(wv, sv, 8, bits, 16, fused=fused, out_dtype=torch.bfloat16)
            assert out.dtype == torch.bfloat16
            out.backward(g)
            res.append((out.detach(), wv.grad, sv.grad))
        assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
        torch.testing.assert_close(res[0][2], res[1][2], rtol=1e-5, atol=1e-6)


def test_fused_fake_quantize_falls_back_to_eager_when_compiling_fails(monkeypatch, caplog):
    """No C++ compiler (or any compiler failure): one WARNING, then the same math eagerly; training goes on."""
    from abs_llm.kernels import common

    failure = type("InductorError", (RuntimeError,), {"__module__": "torch._inductor.exc"})

    def broken_compile(fn, **kwargs):
        def call(*args):
            raise failure("C++ compile error: no compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(common, "_said", set())
    core._kernels.cache_clear()
    try:
        w = torch.randn(4, 32)
        s = core.init_scale(w, 8, 16)
        wv, sv = w.clone().requires_grad_(True), s.clone().requires_grad_(True)
        with caplog.at_level("WARNING", logger="abs_llm.kernels"):
            out = core.fake_quantize(wv, sv, 8, 4, 16, fused="compile")
            out.sum().backward()
        assert torch.equal(out, core.fake_quantize(w, s, 8, 4, 16))
        assert wv.grad is not None and sv.grad is not None
        assert sum("torch.compile failed" in r.getMessage() for r in caplog.records) == 1  # once, for both passes
    finally:
        core._kernels.cache_clear()
