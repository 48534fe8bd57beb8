import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abs_llm import SwitchableLinear, core


def make(master_bits=8, cands=(8, 6, 4, 3, 2), group_size=32, bias=True, in_f=72, out_f=24):
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias)
    return lin, SwitchableLinear.from_linear(lin, master_bits, cands, group_size)


@pytest.mark.parametrize("master_bits,cands", [(8, (8, 6, 4, 3, 2)), (4, (4, 3, 2))])
@pytest.mark.parametrize("group_size", [None, 32])
def test_forward_matches_math(master_bits, cands, group_size):
    lin, layer = make(master_bits, cands, group_size)
    x = torch.randn(5, 72)
    scale = core.init_scale(lin.weight, master_bits, group_size)
    q = core.quantize_master(lin.weight, scale, master_bits, group_size)
    assert torch.equal(layer.master(), q)
    for b in cands:
        layer.bits = b
        ref = F.linear(x, core.derived_weight(q, scale, master_bits, b, group_size), lin.bias)
        assert torch.equal(layer(x), ref)


def test_int4_master_is_packed():
    _, layer = make(4, (4, 3, 2), 32, in_f=71)
    assert layer.weight_master.dtype == torch.uint8 and layer.weight_master.shape == (24, 36)
    assert layer.master().shape == (24, 71)


def test_cache_reuses_derived_weight_and_invalidates_on_switch():
    _, layer = make()
    x = torch.randn(2, 72)
    layer(x)
    cached = layer._cache[(8, torch.float32, x.device)]
    layer(x)
    assert layer._cache[(8, torch.float32, x.device)] is cached  # no re-derivation
    layer.bits = 4
    layer(x)
    assert list(layer._cache) == [(4, torch.float32, x.device)]  # bounded: only the active width is kept
    layer.to(torch.bfloat16)
    assert not layer._cache


def test_bits_validation():
    _, layer = make(cands=(8, 4))
    with pytest.raises(ValueError, match=r"allowed \[8, 4\]"):
        layer.bits = 6
    with pytest.raises(ValueError, match="not derivable from a 4-bit master"):
        SwitchableLinear(16, 16, master_bits=4, candidate_bits=(8, 4))


def test_nan_weights_refused():
    lin = nn.Linear(16, 4)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        SwitchableLinear.from_linear(lin, name="blk.q")


def test_training_mode_and_freeze():
    lin, layer = make(group_size=None)
    master = layer.master().clone()
    layer.to_trainable()
    assert layer.trainable and layer.weight_master is None and layer.weight_scale.requires_grad
    assert torch.equal(layer.master(), master)  # latent = q_h * s_h re-quantizes to the same master
    x = torch.randn(3, 72)
    for b in (8, 4, 2):
        layer.bits = b
        layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight_scale.grad is not None
    layer.freeze()
    assert not layer.trainable and layer.weight is None and torch.equal(layer.master(), master)
    assert "weight" not in layer.state_dict()


def test_trainable_layer_evaluated_in_inference_mode_still_trains(monkeypatch):
    """An evaluation under torch.inference_mode (abs_llm.perplexity, a Trainer eval callback) before the first training
    step must not leave inference tensors behind: the next backward would fail."""
    monkeypatch.setattr(core, "_CONSTS", {})  # the per-width constants are made on first use: make it happen below
    torch.manual_seed(0)
    layer = SwitchableLinear.from_linear(nn.Linear(64, 16), group_size=32).to_trainable()
    x = torch.randn(3, 64)
    for bits in (8, 4):
        layer.bits = bits
        with torch.inference_mode():
            want = layer(x)
        out = layer(x)
        out.sum().backward()
        assert torch.equal(out.detach(), want)
        assert layer.weight.grad is not None and layer.weight_scale.grad is not None


@pytest.mark.parametrize("fused", [False, "compile"])
def test_trainable_layer_under_cpu_autocast_matches_a_bf16_weight(fused):
    """Under bf16 autocast the layer makes its weight in bf16 itself: the same output and gradients as multiplying by
    the float32 fake-quantized weight cast to bf16 (what autocast did with it before)."""
    if fused and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("torch.compile needs a C++ compiler on CPU")
    torch.manual_seed(0)
    layer = SwitchableLinear.from_linear(nn.Linear(64, 24), group_size=32).to_trainable()
    layer.fused = fused
    layer.bits = 4
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    w, s = layer.weight.detach().clone().requires_grad_(True), layer.weight_scale.detach().clone().requires_grad_(True)
    ref = F.linear(x.bfloat16(), core.fake_quantize(w, s, 8, 4, 32).bfloat16(), layer.bias.detach().bfloat16())
    ref.float().square().sum().backward()
    assert torch.equal(out, ref) and torch.equal(layer.weight.grad, w.grad)
    # the scale gradient differs only by summation order (a difference of two sums: cancellation)
    torch.testing.assert_close(layer.weight_scale.grad, s.grad, rtol=1e-3, atol=1e-5 * float(s.grad.abs().max()))
