"""kernels/cpu_inplace.py: a cold switch that rewrites the evicted width's int4 buffers in place packs exactly the
bytes that packing from the master does, and takes the master path wherever the shortcut would not be exact."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from abs_llm import DoubleRoundingConfig, quantize, set_bits
from abs_llm.kernels import cpu, cpu_fused
from abs_llm.layers import SwitchableLinear
from conftest import tiny_llama_config
from test_cpu_fused import master, needs_blocked64, needs_numba

BF16 = torch.bfloat16


def scales(n, k, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, 1 if group_size is None else k // group_size, generator=g) * 1e-2 + 1e-4
    s[0, 0] = 0.0  # an all-zero group: its scale stays zero
    return s


def layouts_called(monkeypatch):
    called, real = [], cpu_fused.kernel
    monkeypatch.setattr(cpu_fused, "kernel", lambda d, layout: called.append(layout) or real(d, layout))
    return called


def from_spare(monkeypatch, q, s, group_size, kernel, src, dst):
    """(pack at dst written over a pack at src, the same from the master, src's buffer addresses, the kernels the
    first one used)."""
    old = cpu.pack_int4(q, s, 8, src, group_size, BF16, kernel)
    ptrs = [t.data_ptr() for t in old.tensors]
    want = cpu.pack_int4(q, s, 8, dst, group_size, BF16, kernel)
    with monkeypatch.context() as m:
        called = layouts_called(m)
        got = cpu.pack_int4(q, s, 8, dst, group_size, BF16, kernel, spare=old)
    return got, want, ptrs, called


@needs_blocked64
@needs_numba
@pytest.mark.parametrize("n,k,group_size", [(64, 256, 64), (128, 576, 64), (192, 128, 128), (64, 512, None)])
def test_int4x2_from_the_master_width_is_rewritten_in_place_exactly(monkeypatch, n, k, group_size):
    q, s = master(n, k, 8, seed=n + k), scales(n, k, group_size)
    x = torch.randn(3, k, dtype=BF16)
    for dst in (7, 6, 5):
        got, want, ptrs, called = from_spare(monkeypatch, q, s, group_size, "int4x2", 8, dst)
        assert [t.data_ptr() for t in got.tensors] == ptrs, dst
        assert all(torch.equal(a, b) for a, b in zip(got.tensors, want.tensors)), dst
        assert torch.equal(got(x, None), want(x, None))
        assert "x2_from_master" in called and "rescale" in called and "blocked" not in called


@needs_blocked64
@needs_numba
@pytest.mark.parametrize("src,dst", [(4, 2), (2, 4), (3, 4), (4, 3), (2, 3)])
def test_int4pack_scales_are_rescaled_in_place_exactly(monkeypatch, src, dst):
    q, s = master(128, 256, 8), scales(128, 256, 64)
    got, want, ptrs, called = from_spare(monkeypatch, q, s, 64, "int4pack", src, dst)
    assert [t.data_ptr() for t in got.tensors] == ptrs
    assert all(torch.equal(a, b) for a, b in zip(got.tensors, want.tensors))
    assert "rescale" in called and "x2_from_master" not in called  # the nibbles come from the master


@needs_blocked64
@needs_numba
def test_a_width_below_the_master_is_not_a_source(monkeypatch):
    """From 7 bits, 6 bits would round twice (round(round(q/2)/2) != round(q/4)): the weight comes from the master."""
    q, s = master(64, 256, 8), scales(64, 256, 64)
    got, want, ptrs, called = from_spare(monkeypatch, q, s, 64, "int4x2", 7, 6)
    assert all(torch.equal(a, b) for a, b in zip(got.tensors, want.tensors))
    assert [t.data_ptr() for t in got.tensors] == ptrs  # still written into the evicted buffers
    assert "x2_from_master" not in called and "blocked" in called


@needs_numba
@pytest.mark.parametrize("bad", [1e-39, 2e37])
def test_scales_the_rescale_cannot_hold_take_the_full_path(monkeypatch, bad):
    """A subnormal source, or a result past bf16's range (2e37 * 2^6 = inf): the in-place rescale writes nothing and
    the scales come from the master's, as a fresh pack's do."""
    q, s = master(64, 256, 8), scales(64, 256, 64)
    s[3, 1] = bad
    got, want, _, called = from_spare(monkeypatch, q, s, 64, "int4pack", 4, 2)
    assert torch.equal(got.tensors[0], want.tensors[0])
    assert torch.equal(got.tensors[1].view(torch.int16), want.tensors[1].view(torch.int16))  # inf: zero = 0 * inf
    assert "rescale" in called and cpu_fused._nb is not False


@needs_numba
@settings(max_examples=25, deadline=None)
@given(blocks=st.integers(1, 3), k32=st.integers(1, 20), dst=st.integers(5, 7), seed=st.integers(0, 2**16))
def test_in_place_equals_master_property(blocks, k32, dst, seed):
    mp = pytest.MonkeyPatch()
    n, k = 64 * blocks, 32 * k32  # the int4 kernel's smallest group is 32
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    got, want, _, _ = from_spare(mp, q, scales(n, k, None, seed), None, "int4x2", 8, dst)
    assert all(torch.equal(a, b) for a, b in zip(got.tensors, want.tensors))


@needs_blocked64
@needs_numba
@pytest.mark.parametrize("threads", [1, 2])
def test_model_switch_from_8_bits_packs_what_a_fresh_model_does(monkeypatch, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=192)).eval()
        quantize(model, DoubleRoundingConfig(group_size=64))
        model.to(BF16)
        layers = [m for m in model.modules() if isinstance(m, SwitchableLinear)]
        x = torch.arange(9).view(1, 9)
        with torch.inference_mode():
            model(x)
            called = layouts_called(monkeypatch)
            set_bits(model, 6)  # from the cached 8-bit int4x2 packs
            got = [t.clone() for m in layers for p in m._cache.values() for t in p.tensors]
            logits = model(x).logits
            monkeypatch.setattr(cpu_fused, "ENABLED", False)
            for m in layers:
                m.invalidate_cache()
            set_bits(model, 6)
            want = [t for m in layers for p in m._cache.values() for t in p.tensors]
            assert torch.equal(logits, model(x).logits)
    finally:
        torch.set_num_threads(old)
    assert "x2_from_master" in called and len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
