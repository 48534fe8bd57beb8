"""Triton kernels, run in Triton's CPU interpreter (CI has no GPU): every width, both scale kinds, bf16/fp16, GEMV and
GEMM paths, split-K on and off, against the fp32 reference computed from the dequantized weight; the packed layouts
are checked exactly with torch ops.

Tolerances (max error / max|y_ref|): the integer weights are exact, so only float rounding differs. fp16 2e-3. bf16
1.5e-2: the interpreter converts fp32 to bf16 by truncation (the GPU rounds to nearest), so one output rounding costs
up to 2^-8, and per-group GEMM tiles are bf16 (the weight times its scale, like the bf16 dequant reference).
"""

import logging
import os

import pytest
import torch

from abs_llm import core
from abs_llm.kernels import layouts, triton_base

if os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py sets it before anything imports triton
    pytest.skip("TRITON_INTERPRET=1 is needed (no GPU in CI)", allow_module_level=True)
if not triton_base.available():
    pytest.skip("triton is not installed", allow_module_level=True)
from abs_llm.kernels import common, dispatch, triton_linear, triton_pack  # noqa: E402
from abs_llm.layers import SwitchableLinear  # noqa: E402

TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def master(n, k, group_size, master_bits=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    s = core.init_scale(w, master_bits, group_size)
    return core.quantize_master(w, s, master_bits, group_size), s


@pytest.mark.parametrize("master_bits", [8, 4])
def test_integer_derivation_equals_core_exactly(master_bits):
    lo, hi = core.qrange(master_bits)
    q = torch.arange(lo, hi + 1, dtype=torch.int8).view(1, -1)
    for bits in core.allowed_candidates(master_bits):
        assert torch.equal(layouts.derive_int(q, master_bits, bits), core.derive(q, master_bits, bits)), bits


def test_layout_word_order_and_size():
    # 4 bits, one block of 8 segments x 16 columns: lane j of word t holds column 16 * j + t
    q = torch.arange(128).remainder(16).sub(8).to(torch.int8).view(1, -1) * 16  # q_4 = column % 16 - 8
    (plane,) = layouts.pack_planes(q, 8, 4)
    assert plane.shape == (1, 16)
    words = plane[0].tolist()
    for t in range(16):
        for j in range(8):
            assert (words[t] >> (4 * j)) & 15 == (16 * j + t) % 16
    for bits, planes in [(6, (4, 2)), (3, (2, 1)), (2, (2,))]:
        lay = layouts.Layout(bits, 64, 4096)
        assert lay.widths == planes and lay.nbytes == 64 * 4096 * bits // 8  # no padding when K fills blocks


@pytest.mark.parametrize("master_bits", [8, 4])
@pytest.mark.parametrize("shape", [(3, 70), (33, 300)])
def test_pack_roundtrip_and_triton_pack_kernel_match(master_bits, shape):
    torch.manual_seed(0)
    lo, hi = core.qrange(master_bits)
    q = torch.randint(lo, hi + 1, shape, dtype=torch.int8)
    for bits in range(2, master_bits + (0 if master_bits == 8 else 1)):
        planes = layouts.pack_planes(q, master_bits, bits)
        assert torch.equal(layouts.unpack_planes(planes, bits, *shape), core.derive(q, master_bits, bits))
        got = triton_pack.pack_planes_triton(q, master_bits, bits)
        assert len(got) == len(planes) and all(torch.equal(a, b) for a, b in zip(got, planes)), bits


def run(q, s, bits, group_size, dtype, m, master_bits=8, force=None):
    lin = triton_linear.TritonLinear(q, s, master_bits, bits, group_size)
    triton_linear.FORCE.clear()
    triton_linear.FORCE.update(force or {})
    try:
        x = torch.randn(m, q.shape[1], generator=torch.Generator().manual_seed(m)).to(dtype)
        ref = x.float() @ core.derived_weight(q, s, master_bits, bits, group_size).T
        y = lin(x, None)
    finally:
        triton_linear.FORCE.clear()
    assert y.dtype == dtype and y.shape == ref.shape
    err = float((y.float() - ref).abs().max()) / float(ref.abs().max())
    assert err <= TOL[dtype], (bits, group_size, dtype, m, force, err)
    return lin


@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_width_gemv_and_gemm(group_size, dtype):
    q, s = master(32, 160, group_size)  # 160 = 2.5 groups of 64: the last group is short
    for bits in (8, 6, 4, 3, 2):
        for m in (1, 5):
            lin = run(q, s, bits, group_size, dtype, m)
        assert lin.nbytes == (0 if bits == 8 else layouts.Layout(bits, 32, 160).nbytes)


def test_odd_widths():
    q, s = master(32, 160, 32)
    for bits in (7, 5):
        run(q, s, bits, 32, torch.float16, 1)
        run(q, s, bits, 32, torch.float16, 5)


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_split_k_tiles_and_row_buckets(bits):
    q, s = master(40, 320, 128)  # 2.5 groups of 128, like SmolLM2's 576 = 4.5 x 128
    run(q, s, bits, 128, torch.bfloat16, 1, force={"gemv": (triton_linear.GEMV_CONFIGS[2], 1)})
    run(q, s, bits, 128, torch.bfloat16, 1, force={"gemv": (triton_linear.GEMV_CONFIGS[0], 3)})
    for m, split in ((2, 1), (17, 3), (40, 2)):  # row buckets 16 and 64 (the GEMM's BM)
        cfg = triton_linear.GEMM_CONFIGS[16 if m <= 16 else 64][0]
        run(q, s, bits, 128, torch.float16, m, force={"gemm": (cfg, split)})


def test_dense_candidate_of_the_gemm_path():
    """The tuner's cuBLAS fallback (transient dequantized weight) computes the same product as the GEMM."""
    q, s = master(40, 320, 64)
    for bits in (8, 3):
        run(q, s, bits, 64, torch.bfloat16, 5, force={"gemm": (triton_linear.DENSE, 1)})


def test_many_rows_use_a_transient_dense_weight(monkeypatch):
    monkeypatch.setattr(triton_linear, "DENSE_ROWS", 4)
    for bits, g in ((8, None), (4, 64), (3, 64)):
        q, s = master(32, 160, g)
        run(q, s, bits, g, torch.float16, 6)
        lin = triton_linear.TritonLinear(q, s, 8, bits, g)
        ref = core.derived_weight(q, s, 8, bits, g).to(torch.float16)
        assert torch.equal(lin.dense(torch.float16), ref)


def test_four_bit_master_and_group_16():
    q, s = master(32, 96, 16, master_bits=4)
    for bits in (4, 3, 2):
        run(q, s, bits, 16, torch.float16, 1, master_bits=4)
        run(q, s, bits, 16, torch.bfloat16, 3, master_bits=4)
    q8, s8 = master(32, 96, 16)
    run(q8, s8, 8, 16, torch.float16, 3)  # master path with 16-column segments


def layer(out_f=64, in_f=128, group_size=64):
    torch.manual_seed(0)
    return SwitchableLinear.from_linear(torch.nn.Linear(in_f, out_f), group_size=group_size)


def test_layer_uses_triton_reads_master_at_8_and_keeps_ping_pong():
    lay = layer()
    lay.kernel = "triton"
    x = torch.randn(2, 3, 128, dtype=torch.bfloat16)
    for bits in (8, 4, 8, 4):
        lay.bits = bits
        ref = torch.nn.functional.linear(x.float(), lay.derived_weight(bits), lay.bias.float())
        y = lay(x)
        assert float((y.float() - ref).abs().max()) <= TOL[torch.bfloat16] * float(ref.abs().max())
    p8 = lay._cache[(8, torch.bfloat16, torch.device("cpu"))]
    p4 = lay._cache[(4, torch.bfloat16, torch.device("cpu"))]
    assert p8.kernel == p4.kernel == "triton"
    assert p8.fn.master is lay.weight_master and p8.nbytes == 0  # zero copy at the master's width
    assert p4.nbytes == 64 * 128 // 2  # 4 bits per weight, no float copy
    again = lay._cache[(4, torch.bfloat16, torch.device("cpu"))]
    assert again is p4  # 8 <-> 4 re-derived nothing


def test_failed_self_check_falls_back_to_dequant_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(triton_linear, "_compare", lambda *a: "1 rows: max error 1 of max|y|")
    monkeypatch.setattr(triton_linear, "CHECKED", {})
    common._said.clear()
    q, s = master(32, 64, None)
    with caplog.at_level(logging.WARNING, logger="abs_llm.kernels"):
        for _ in range(2):
            p = dispatch.pack_checked(q, s, 8, 4, None, torch.bfloat16, torch.device("cpu"), "triton")
            assert p.kernel == "dequant"
    assert sum("triton failed" in r.message for r in caplog.records) == 1


def test_requirements_without_gpu_or_interpreter(monkeypatch):
    cpu = torch.device("cpu")
    assert triton_base.requirements(64, 128, 4, 64, torch.bfloat16, cpu) is None  # interpreter on
    assert "float16" in triton_base.requirements(64, 128, 4, 64, torch.float32, cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in triton_base.requirements(64, 128, 4, 64, torch.bfloat16, cpu)
    assert dispatch.choose(64, 128, 4, 64, torch.bfloat16, cpu) == "int4pack"  # CPU auto never picks triton


# ---- fused fake quantization for QAT (kernels/triton_fq.py) -------------------------------------------------------
@pytest.mark.parametrize("shape, group_size", [((64, 128), 64), ((48, 100), 64), ((32, 96), None), ((16, 40), 16)])
def test_triton_fake_quantize_matches_eager(shape, group_size):
    """Forward values and weight gradients bit for bit at every width (incl. clipped weights, a short last group and
    per-channel scales); the scale gradient up to float32 summation order; ALRS's scale_grad_mult and LSQ's gradient
    scale apply alike."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, :5] = torch.tensor([1.0, -1.0, 0.5, -0.7, 3.0])  # beyond the clipped scale's range at every width
    s = core.init_scale(w, 8, group_size) * 0.9
    for bits in (8, 6, 4, 3, 2):
        for kw in ({}, {"scale_grad_mult": 0.01, "lsq_grad_scale": True}):
            res = []
            for fused in (False, "triton"):
                wv, sv = w.clone().requires_grad_(True), s.clone().requires_grad_(True)
                out = core.fake_quantize(wv, sv, 8, bits, group_size, fused=fused, **kw)
                out.backward(torch.randn(shape, generator=torch.Generator().manual_seed(bits)))
                res.append((out.detach(), wv.grad, sv.grad))
            (o0, gw0, gs0), (o1, gw1, gs1) = res
            assert torch.equal(o0, o1) and torch.equal(gw0, gw1), (bits, kw)
            torch.testing.assert_close(gs1, gs0, rtol=0, atol=1e-5 * float(gs0.abs().max()))


def test_triton_fake_quantize_in_a_training_step(tmp_path, monkeypatch):
    """A step-per-bit QAT step with ``fused="triton"`` gives the eager step's losses and moves the weights the same
    (SGD: Adam would turn the scale gradients' float32 rounding on near-zero gradients into full-size steps)."""
    from transformers import LlamaForCausalLM, TrainingArguments

    from abs_llm import DoubleRoundingConfig, quantize
    from abs_llm.kernels import triton_fq
    from abs_llm.multibit import MultiBitConfig
    from abs_llm.training import MultiBitTrainer
    from tests.conftest import tiny_llama_config

    monkeypatch.setattr(triton_fq, "_state", {})  # the first-use self-checks run here, on real training gradients
    calls = []
    monkeypatch.setattr(triton_fq, "backward", lambda *a, f=triton_fq.backward: calls.append(1) or f(*a))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    runs = []
    for fused in (False, "triton"):
        torch.manual_seed(0)
        q = quantize(LlamaForCausalLM(tiny_llama_config()), DoubleRoundingConfig(candidate_bits=[8, 4, 2]),
                     trainable=True)
        args = TrainingArguments(output_dir=str(tmp_path / str(fused)), report_to=[], use_cpu=True, learning_rate=1e-3,
                                 optim="sgd")
        tr = MultiBitTrainer(model=q, args=args, multibit=MultiBitConfig(kd="none", step_per_bit=True, fused=fused))
        tr.create_optimizer_and_scheduler(num_training_steps=10)
        loss = tr.training_step(tr.model, {"input_ids": ids, "labels": ids})
        runs.append((float(loss), {n: p.detach().clone() for n, p in tr.model.named_parameters()}))
    assert len(calls) == 3 * 14  # every width's backward went through the Triton pass (14 layers)
    assert triton_fq._state == {(torch.device("cpu"), "fwd"): True, (torch.device("cpu"), "bwd"): True}
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    for n, p in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][n], p, rtol=1e-5, atol=1e-6, msg=n)


def test_fused_mode_is_checked():
    with pytest.raises(ValueError, match="fused must be one of"):
        core.fake_quantize(torch.randn(4, 8), torch.ones(4, 1), 8, 4, None, fused="cuda")


def test_triton_fake_quantize_failure_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    """A Triton kernel that raises (or fails its first-use check) leaves training on the eager path: same values and
    gradients, one WARNING, and the kernel is not tried again on that device."""
    from abs_llm.kernels import triton_fq

    monkeypatch.setattr(triton_fq, "_state", {})
    common._said.clear()
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("simulated compile error")

    monkeypatch.setattr(triton_fq, "_fq_fwd", type("K", (), {"__getitem__": lambda self, grid: broken})())
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    s = core.init_scale(w, 8, 64)
    with caplog.at_level(logging.WARNING, logger="abs_llm.kernels"):
        for _ in range(2):
            wv, sv = w.clone().requires_grad_(True), s.clone().requires_grad_(True)
            out = core.fake_quantize(wv, sv, 8, 4, 64, fused="triton")
            out.sum().backward()
            assert torch.equal(out, core.fake_quantize(w, s, 8, 4, 64))
    assert len(calls) == 1 and sum("fake quantization failed" in r.message for r in caplog.records) == 1
    assert wv.grad is not None and sv.grad is not None


def test_triton_backward_failure_falls_back_to_the_eager_gradients(monkeypatch):
    from abs_llm.kernels import triton_fq

    monkeypatch.setattr(triton_fq, "_state", {})
    common._said.clear()

    def broken(*a, **k):
        raise RuntimeError("simulated launch error")

    monkeypatch.setattr(triton_fq, "_fq_bwd", type("K", (), {"__getitem__": lambda self, grid: broken})())
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    s = core.init_scale(w, 8, 64) * 0.8
    grads = []
    for fused in (False, "triton"):
        wv, sv = w.clone().requires_grad_(True), s.clone().requires_grad_(True)
        core.fake_quantize(wv, sv, 8, 3, 64, fused=fused).backward(torch.ones_like(w))
        grads.append((wv.grad, sv.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert triton_fq._state[(w.device, "bwd")] is False
