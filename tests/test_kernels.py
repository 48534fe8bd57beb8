"""Kernel dispatch: every path agrees with the dequantize reference; guarded shapes fall back instead of crashing.

Tolerances (relative to ``max|y_ref|``, reference = fp32 ``F.linear`` with the fp32 derived weight on the same
activations): fp32 activations 1e-5 (only float summation order differs; the integer weights are exact);
bf16 activations 2e-2 (bf16 has an 8-bit mantissa: rounding the scales, the weight or the output each costs up to
2^-9 relative, summed over the terms; the dequant path in bf16 shows the same order of error).
"""

import logging

import pytest
import torch
from transformers import LlamaForCausalLM

from abs_llm import DoubleRoundingConfig, core, kernels, quantize, set_bits
from abs_llm.layers import SwitchableLinear
from conftest import tiny_llama_config

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make(out_f, in_f, group_size, master_bits=8, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    cands = tuple(core.allowed_candidates(master_bits))
    return SwitchableLinear.from_linear(lin, master_bits=master_bits, candidate_bits=cands, group_size=group_size)


def check(layer, bits, dtype, kernel, m=3):
    layer.bits, layer.kernel = bits, kernel
    x = torch.randn(2, m, layer.in_features).to(dtype)
    ref = torch.nn.functional.linear(x.float(), layer.derived_weight(bits), layer.bias.float())
    y = layer(x)
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.float() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), (kernel, bits, dtype, err)
    return layer._cache[(bits, dtype, x.device)].kernel


SHAPES = [  # (out, in, group_size)
    (32, 64, None), (48, 96, 64), (32, 256, 128), (16, 512, 512), (64, 128, 32),
    (24, 100, None), (24, 64, 32), (40, 72, 16), (32, 96, None),  # guarded: out%16, in%16, group 16, in%32
]


@pytest.mark.parametrize("out_f,in_f,group_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_matches_dequant_reference(out_f, in_f, group_size, dtype):
    layer = make(out_f, in_f, group_size)
    for kernel in kernels.KERNELS:
        if kernel == "triton":
            continue  # interpreted on CPU: tests/test_triton_kernels.py covers it at smaller cost
        for bits in (8, 6, 5, 4, 3, 2):
            used = check(layer, bits, dtype, kernel)
            if kernel not in ("auto", "dequant") and used != kernel:
                assert used == "dequant"  # an unavailable explicit kernel falls back, never crashes
                assert kernels.requirements(kernel, out_f, in_f, bits, group_size, dtype, torch.device("cpu"))


@pytest.mark.parametrize("group_size", [None, 32])
def test_four_bit_master(group_size):
    layer = make(32, 64, group_size, master_bits=4)
    for kernel in ("auto", "int8pack", "int4pack", "dequant"):
        for bits in (4, 3, 2):
            check(layer, bits, torch.bfloat16, kernel)
            check(layer, bits, torch.float32, kernel)


def test_auto_dispatch_rules():
    c = lambda out_f, in_f, bits, g, dt: kernels.choose(out_f, in_f, bits, g, dt, "cpu")  # noqa: E731
    bf, f32 = torch.bfloat16, torch.float32
    assert c(64, 128, 8, None, bf) == "int8pack"
    assert c(64, 128, 6, None, bf) == "int8pack"
    assert c(64, 128, 8, 64, bf) == "int4x2"  # per-group scales do not fit int8pack's per-row scale
    assert c(64, 128, 4, 64, bf) == "int4pack"
    assert c(64, 128, 2, None, bf) == "int4pack"
    assert c(64, 128, 8, None, f32) == "dequant"  # int kernels are slow with fp32 activations
    assert c(64, 100, 8, None, bf) == "dequant"  # int8pack + bf16 + in % 16 != 0 gives wrong values
    assert c(24, 128, 4, 32, bf) == "dequant"  # out % 16 != 0: no int4 packing, and per-group scales
    assert c(24, 128, 4, None, bf) == "int8pack"
    assert c(64, 128, 4, 16, bf) == "dequant"  # group 16: per-group scales and no int4pack group


def test_unavailable_kernel_logs_once(caplog):
    layer = make(24, 100, None)
    kernels.common._said.clear()
    with caplog.at_level(logging.INFO, logger="abs_llm.kernels"):
        for bits in (8, 8):
            layer.invalidate_cache()
            check(layer, bits, torch.bfloat16, "int8pack")
    assert sum("int8pack unavailable" in r.message for r in caplog.records) == 1


def test_int8pack_at_master_width_shares_the_master():
    layer = make(32, 64, None)
    layer(torch.randn(1, 64, dtype=torch.bfloat16))
    p = layer._cache[(8, torch.bfloat16, torch.device("cpu"))]
    assert p.kernel == "int8pack" and p.tensors[0] is layer.weight_master and p.nbytes == 32 * 2


def test_ping_pong_is_cached_and_memory_is_capped():
    layer = make(32, 64, 32)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    layer.bits = 8
    layer(x)
    layer.bits = 4
    layer(x)
    first = dict(layer._cache)
    for b in (8, 4, 8, 4):
        layer.bits = b
        layer(x)
    assert all(layer._cache[k] is v for k, v in first.items())  # 8<->4 re-packs nothing
    layer.cache_bytes = 0  # cap below any entry: only the newest survives
    layer.bits = 2
    layer(x)
    assert list(layer._cache) == [(2, torch.bfloat16, torch.device("cpu"))]


@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_every_width_and_int_kernels_match_dequant(group_size, dtype):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval().to(dtype)
    quantize(model, DoubleRoundingConfig(group_size=group_size))
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    gen = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    for bits in (8, 6, 4, 3, 2):
        set_bits(model, bits, kernel="auto")
        out = model.generate(prompt, **gen)
        assert out.shape == (1, 17)
    # fp32 has no int kernel under auto, so force the integer kernels; they must reproduce dequant exactly enough
    int_kernel = "int8pack" if group_size is None else "int4x2"
    set_bits(model, 8, kernel=int_kernel)
    fast = model.generate(prompt, **gen)
    used = {p.kernel for m in model.modules() if isinstance(m, SwitchableLinear) for p in m._cache.values()}
    assert used == {int_kernel}
    set_bits(model, 8, kernel="dequant")
    assert torch.equal(fast, model.generate(prompt, **gen))


@pytest.mark.parametrize("master_bits", [8, 4])
def test_lookup_tables_equal_core_derive_exactly(master_bits):
    lo, hi = core.qrange(master_bits)
    q = torch.arange(lo, hi + 1, dtype=torch.int8).view(1, -1)
    for bits in core.allowed_candidates(master_bits):
        ql = core.derive(q, master_bits, bits)
        d = master_bits - bits
        assert torch.equal(kernels.lookup(q, master_bits, bits, "int8", torch.int8), ql * 2**d)
        if bits <= 4:
            assert torch.equal(kernels.lookup(q, master_bits, bits, "nib", torch.int32), ql.int() + 8)
        h, l8 = (kernels.lookup(q, master_bits, bits, p, torch.int32) for p in ("hi", "lo"))
        assert torch.equal(16 * (h - 8) + l8, ql.int()) and int(l8.min()) >= 0 and int(l8.max()) <= 15


def test_casting_the_model_keeps_fp32_scales():
    layer = make(32, 64, 32)
    before = layer.weight_scale.detach().clone()
    layer.to(torch.bfloat16)
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, before)
    assert layer.bias.dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(64, 64), (128, 96), (192, 576), (48, 64)])
def test_fast_int4_layout_equals_torch_converter(shape):
    nib = torch.randint(0, 16, shape, dtype=torch.int32)
    assert torch.equal(kernels.pack_int4_cpu(nib.to(torch.uint8)),
                       torch.ops.aten._convert_weight_to_int4pack_for_cpu(nib, 1))


def test_layer_with_packed_cache_pickles():
    import io

    layer = make(32, 64, None)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    y = layer(x)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    assert not again._cache and torch.equal(again(x), y)
