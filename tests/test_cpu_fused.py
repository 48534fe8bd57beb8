"""kernels/cpu_fused.py: the fused (numba) CPU derive + pack writes exactly the bytes of the eager torch-ops path it
replaces, for every width and output layout, and the eager path takes over when the fused one is off or broken."""

import importlib.util
import logging
import os
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from _report import RELIABILITY
from abs_llm import DoubleRoundingConfig, core, quantize, set_bits
from abs_llm.kernels import common, cpu, cpu_batch, cpu_fused, lookup, pack_int4_cpu
from abs_llm.layers import SwitchableLinear
from conftest import tiny_llama_config

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")
# torch packs int4 for its CPU matmul in a layout that depends on the ISA; the fused kernels write the AVX-512 one
# (``_blocked64``), and the library takes the fused int4 path only where torch's layout is that one
needs_blocked64 = pytest.mark.skipif(not cpu._blocked64_matches_torch(), reason="torch's CPU int4pack layout here is "
                                     "not _blocked64 (no AVX-512): the fused int4 path is off on this CPU")


def master(n, k, master_bits, seed=0):
    """A random master that holds every value of the range (the extremes -128/-127/127 and, for every shift, the
    exact ties ``q / 2^d = m + 1/2``) in shuffled positions."""
    lo, hi = core.qrange(master_bits)
    g = torch.Generator().manual_seed(seed)
    vals = torch.arange(lo, hi + 1, dtype=torch.int8).repeat(n * k // (hi - lo + 1) + 1)[: n * k]
    return vals[torch.randperm(n * k, generator=g)].view(n, k).contiguous()


def eager(q, master_bits, bits, part):
    if part == "int8":
        return lookup(q, master_bits, bits, "int8", torch.int8)
    return pack_int4_cpu(cpu.int4_nibbles(q, master_bits, bits, "int4x2" if part == "x2" else "int4pack"))


def fused(q, master_bits, bits, part):
    if part == "int8":
        return cpu_fused.scaled_int8(q, master_bits, bits)
    return cpu_fused.int4_blocked(q, master_bits, bits, "int4x2" if part == "x2" else "int4pack")


def parts(master_bits, bits):
    """The outputs the CPU kernels take at this width: int8pack any width, int4pack <= 4 bits, int4x2 >= 5 bits."""
    return ("int8",) + (("nib",) if bits <= 4 else ("x2",))


@needs_blocked64
@needs_numba
@pytest.mark.parametrize("master_bits", [8, 4])
@pytest.mark.parametrize("n,k", [(64, 256), (128, 96), (192, 576), (64, 2), (320, 130)])
def test_fused_bytes_equal_eager_at_every_width(master_bits, n, k):
    q = master(n, k, master_bits, seed=n + k)
    for bits in core.allowed_candidates(master_bits):
        for part in parts(master_bits, bits):
            got, want = fused(q, master_bits, bits, part), eager(q, master_bits, bits, part)
            assert got is not None and got.dtype == want.dtype and torch.equal(got, want), (bits, part)


@needs_numba
def test_extremes_and_ties_derive_like_core():
    # every int8 value once per row: the fused int8pack weight is q_l * 2^d with q_l from core.derive (half to even)
    q = torch.arange(-128, 128, dtype=torch.int8).repeat(64, 1)
    for bits in range(2, 9):
        want = core.derive(q, 8, bits) * 2 ** (8 - bits)
        assert torch.equal(cpu_fused.scaled_int8(q, 8, bits), want.to(torch.int8))
    # ties go to even: 8 -> 4 divides by 16; 24/16 = 1.5 -> 2, 40/16 = 2.5 -> 2, -24/16 -> -2, 127 clamps to 7
    got = cpu_fused.scaled_int8(torch.tensor([[24, 40, -24, -128, -127, 127]], dtype=torch.int8), 8, 4)
    assert got.tolist() == [[32, 32, -32, -128, -128, 112]]


@needs_numba
@pytest.mark.parametrize("n", [64, 48, 96, 192])
def test_odd_widths_int8_and_unblockable_rows(n):
    q = master(n, 33, 8, seed=n)
    for bits in range(2, 9):
        assert torch.equal(cpu_fused.scaled_int8(q, 8, bits), eager(q, 8, bits, "int8"))
    # blocked64 needs out % 64 == 0 and an even in: otherwise the eager path packs (torch's converter)
    assert cpu_fused.int4_blocked(master(48, 64, 8), 8, 4, "int4pack") is None
    assert cpu_fused.int4_blocked(master(96, 64, 8), 8, 6, "int4x2") is None
    assert cpu_fused.int4_blocked(master(64, 33, 8), 8, 4, "int4pack") is None


@needs_blocked64
@needs_numba
@settings(max_examples=40, deadline=None)
@given(n=st.sampled_from([64, 128, 192]), k=st.integers(1, 160), master_bits=st.sampled_from([8, 4]),
       bits=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_fused_equals_eager_property(n, k, master_bits, bits, seed):
    RELIABILITY["property examples run"] += 1
    bits, k = min(bits, master_bits), 2 * k  # the int4 layouts pack column pairs; odd widths: the test above
    lo, hi = core.qrange(master_bits)
    q = torch.randint(lo, hi + 1, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    for part in parts(master_bits, bits):
        assert torch.equal(fused(q, master_bits, bits, part), eager(q, master_bits, bits, part)), part


def packed_both_ways(monkeypatch, q, scale, master_bits, bits, group_size, kernel):
    out = []
    for on in (True, False):
        monkeypatch.setattr(cpu_fused, "ENABLED", on)
        if kernel == "int8pack":
            p = cpu.pack_int8(q, scale, master_bits, bits, torch.bfloat16, torch.device("cpu"))
        else:
            p = cpu.pack_int4(q, scale, master_bits, bits, group_size, torch.bfloat16, kernel)
        out.append([t.view(torch.int16) if t.dtype == torch.bfloat16 else t for t in p.tensors])
    return out


@needs_numba
@pytest.mark.parametrize("out_f,in_f,group_size", [
    (64, 256, None), (128, 576, 64), (64, 576, 128), (192, 96, 32), (64, 512, 256), (64, 1024, 512), (48, 64, 32)])
def test_packed_weights_and_scales_identical_with_fused_on_and_off(monkeypatch, out_f, in_f, group_size):
    q = master(out_f, in_f, 8, seed=in_f)
    ng = 1 if group_size is None else -(-in_f // group_size)
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(out_f, ng, generator=g) * 1e-2 * torch.randint(-1, 2, (out_f, ng), generator=g)  # +-, zeros
    for bits in range(2, 9):
        kernels = ["int4pack"] if bits <= 4 else ["int4x2"] + (["int8pack"] if group_size is None else [])
        for kernel in kernels:
            on, off = packed_both_ways(monkeypatch, q, scale, 8, bits, group_size, kernel)
            assert len(on) == len(off) and all(torch.equal(a, b) for a, b in zip(on, off)), (bits, kernel)


@needs_numba
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 1e-40, 3e38])
def test_scales_outside_the_normal_range_use_the_eager_conversion(monkeypatch, bad):
    scale = torch.full((64, 2), 0.01)
    scale[5, 1] = bad
    assert cpu_fused.int4_scales(scale, 2, 128, 64, 64, torch.bfloat16, "int4x2") is None
    on, off = packed_both_ways(monkeypatch, master(64, 128, 8), scale, 8, 6, 64, "int4x2")
    assert all(torch.equal(a, b) for a, b in zip(on, off))


@needs_blocked64
@needs_numba
@pytest.mark.parametrize("group_size", [None, 64])
def test_model_switch_uses_fused_path_and_packs_the_same_bytes(monkeypatch, group_size):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=192)).eval()
    quantize(model, DoubleRoundingConfig(group_size=group_size))
    model.to(torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, SwitchableLinear)]
    calls, real = [], cpu_fused.int4_blocked

    def spy(*args):
        out = real(*args)
        if out is not None:
            calls.append(args[3])
        return out

    monkeypatch.setattr(cpu_fused, "int4_blocked", spy)
    ids = torch.randint(0, 128, (1, 5))
    with torch.inference_mode():
        model(ids)
        for bits in (4, 6, 2, 8, 3):
            packed = {}
            for on in (True, False):
                monkeypatch.setattr(cpu_fused, "ENABLED", on)
                for m in layers:
                    m.invalidate_cache()
                set_bits(model, bits)
                packed[on] = [t for m in layers for p in m._cache.values() for t in p.tensors]
            assert all(torch.equal(a, b) for a, b in zip(packed[True], packed[False])), bits
    assert "int4pack" in calls and ("int4x2" in calls) == (group_size is not None)


def _model_at(group_size, bits=8):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=192)).eval()
    quantize(model, DoubleRoundingConfig(group_size=group_size))
    model.to(torch.bfloat16)
    with torch.inference_mode():
        model(torch.randint(0, 128, (1, 5)))  # the layers learn the activation dtype a switch packs for
    set_bits(model, bits)
    return model, [m for m in model.modules() if isinstance(m, SwitchableLinear)]


def _packs(layers, bits):
    return [t for m in layers for k, p in m._cache.items() if k[0] == bits for t in p.tensors]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def switch_threads(request):
    """One thread (the queue runs after the switch's Python, on the calling thread) and two (a worker too)."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@needs_numba
@pytest.mark.parametrize("switch_threads", [2], indirect=True)
@pytest.mark.parametrize("group_size", [None, 64])
def test_a_switch_runs_its_kernels_on_torchs_threads_and_packs_the_same_bytes(monkeypatch, switch_threads, group_size):
    """set_bits queues every layer's compiled packing, which worker threads run while the next layers' Python goes
    on; the bytes are those of the eager path."""
    model, layers = _model_at(group_size)
    where, real, on_worker, batches = set(), cpu_fused.kernel, threading.Event(), []
    submit = cpu_batch.Batch.submit
    monkeypatch.setattr(cpu_batch.Batch, "submit", lambda self, *a: batches.append(self) or submit(self, *a))

    def run(fn, *a):
        name = threading.current_thread().name
        where.add(name)
        if name.startswith("abs_llm_switch"):
            on_worker.set()
        elif not on_worker.is_set() and batches and not batches[-1]._jobs.empty():
            # a loaded machine may not schedule the worker before the calling thread drains the queue: hold this
            # call until the worker has taken one of the calls still queued (what is tested is that it can)
            on_worker.wait(30)
        return fn(*a)

    def spy(d, layout):
        fn = real(d, layout)
        return fn and (lambda *a: run(fn, *a))

    for bits in (6, 4, 2, 8, 3):
        monkeypatch.setattr(cpu_fused, "kernel", spy)
        set_bits(model, bits)
        threaded = [t.clone() for t in _packs(layers, bits)]
        monkeypatch.setattr(cpu_fused, "ENABLED", False)
        for m in layers:
            m.invalidate_cache()
        set_bits(model, bits)
        assert len(threaded) == len(_packs(layers, bits))
        assert all(torch.equal(a, b) for a, b in zip(threaded, _packs(layers, bits))), bits
        monkeypatch.setattr(cpu_fused, "ENABLED", True)
        assert cpu_fused._nb, bits  # nothing failed on the way (a failure turns the fused path off)
    assert any(n.startswith("abs_llm_switch") for n in where), where


@needs_numba
@pytest.mark.parametrize("switch_threads", [1], indirect=True)
def test_on_one_thread_a_switch_runs_its_kernels_after_every_layers_python(monkeypatch, switch_threads):
    """With one torch thread the queue has no worker: the calling thread first goes through every layer, then runs
    the queued kernels (all the Python, then all the kernels, measured faster than alternating them)."""
    model, layers = _model_at(64)
    events, real_kernel, real_prepare = [], cpu_fused.kernel, SwitchableLinear.prepare

    def spy(d, layout):
        fn = real_kernel(d, layout)
        return fn and (lambda *a: events.append(("kernel", threading.current_thread().name)) or fn(*a))

    def prepare(self):
        events.append(("layer", threading.current_thread().name))
        return real_prepare(self)

    monkeypatch.setattr(cpu_fused, "kernel", spy)
    monkeypatch.setattr(SwitchableLinear, "prepare", prepare)
    set_bits(model, 4)
    kinds = [k for k, _ in events]
    assert kinds.count("layer") == len(layers) and "kernel" in kinds
    assert kinds == sorted(kinds, key=lambda k: k == "kernel"), kinds  # every layer before the first kernel
    assert {t for _, t in events} == {threading.main_thread().name}
    monkeypatch.setattr(cpu_fused, "ENABLED", False)
    queued = [t.clone() for t in _packs(layers, 4)]
    for m in layers:
        m.invalidate_cache()
    set_bits(model, 4)
    assert all(torch.equal(a, b) for a, b in zip(queued, _packs(layers, 4))) and len(queued) == len(_packs(layers, 4))


@needs_blocked64
@needs_numba
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("switch_threads", [2], indirect=True)
def test_a_threaded_switch_works_in_a_forked_child(switch_threads):
    """A child forked after a threaded switch has the parent's worker pool object but none of its threads."""
    model, layers = _model_at(64)
    set_bits(model, 4)
    pid = os.fork()
    if pid == 0:  # child: must finish the switch (a hang here is caught by the parent's timeout below)
        try:
            set_bits(model, 6)
            os._exit(0 if layers[0].packed(torch.bfloat16, torch.device("cpu")).kernel == "int4x2" else 1)
        except BaseException:
            os._exit(2)
    for _ in range(600):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the switch in the forked child hung")
    assert os.waitstatus_to_exitcode(status) == 0


@needs_blocked64
@needs_numba
def test_a_kernel_failing_in_a_switch_repacks_eagerly(monkeypatch, caplog, switch_threads):
    model, layers = _model_at(64)
    monkeypatch.setattr(cpu_fused, "_nb", cpu_fused._njit())  # restored after the test: the failure turns it off
    monkeypatch.setattr(common, "_said", set())
    real = cpu_fused.kernel

    def crashing(*a):
        raise RuntimeError("kernel crashed")

    monkeypatch.setattr(cpu_fused, "kernel", lambda d, layout: crashing if layout == "blocked" else real(d, layout))
    with caplog.at_level(logging.WARNING, logger="abs_llm.kernels"), torch.inference_mode():
        set_bits(model, 4)
        got = model(torch.arange(9).view(1, 9)).logits
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and "kernel crashed" in caplog.records[0].message
    want = [pack_int4_cpu(cpu.int4_nibbles(m.master(), 8, 4, "int4pack")) for m in layers]
    assert all(torch.equal(p.tensors[0], w) for p, w in zip((m.packed(torch.bfloat16, torch.device("cpu"))
                                                             for m in layers), want))
    assert torch.isfinite(got).all()


@needs_numba
@pytest.mark.parametrize("cold", [True, False], ids=["from_master", "rescaled_in_place"])
def test_scales_a_switch_cannot_convert_are_converted_eagerly(monkeypatch, switch_threads, cold):
    model, layers = _model_at(64)
    layers[3].weight_scale.data[0, 0] = 1e-40  # subnormal: the fused conversion refuses it, in a worker thread
    layers[3].invalidate_cache()
    with torch.inference_mode():
        layers[3].prepare()  # the 8-bit pack with that scale, which the in-place rescale refuses too
    if cold:
        for m in layers:
            m.invalidate_cache()
    set_bits(model, 6)
    assert cpu_fused._nb is not False  # the eager conversion ran in the worker, nothing failed
    got = layers[3].packed(torch.bfloat16, torch.device("cpu")).tensors[1]
    monkeypatch.setattr(cpu_fused, "ENABLED", False)
    layers[3].invalidate_cache()
    assert torch.equal(got, layers[3].packed(torch.bfloat16, torch.device("cpu")).tensors[1])


@needs_numba
def test_a_switch_that_fails_half_way_keeps_no_unwritten_pack(monkeypatch):
    """The kernels of a switch run after every layer's Python: if a layer raises (e.g. out of memory), the packs
    already queued were never written, and none of them may stay cached."""
    model, layers = _model_at(64)
    x = torch.arange(9).view(1, 9)
    with torch.inference_mode():
        want = model(x).logits
    real = SwitchableLinear.prepare

    def prepare(self):
        if self is layers[5]:
            raise MemoryError("out of memory")
        return real(self)

    monkeypatch.setattr(SwitchableLinear, "prepare", prepare)
    with pytest.raises(MemoryError):
        set_bits(model, 3)
    assert all(m.bits == 8 and all(k[0] != 3 for k in m._cache) for m in layers)
    monkeypatch.setattr(SwitchableLinear, "prepare", real)
    fresh, _ = _model_at(64, bits=3)
    with torch.inference_mode():
        assert torch.equal(model(x).logits, want)
        set_bits(model, 3)
        assert torch.equal(model(x).logits, fresh(x).logits)


def test_disabled_fused_path_returns_nothing(monkeypatch):
    monkeypatch.setattr(cpu_fused, "ENABLED", False)
    q = master(64, 64, 8)
    assert cpu_fused.scaled_int8(q, 8, 4) is None and cpu_fused.int4_blocked(q, 8, 4, "int4pack") is None
    p = cpu.pack_int4(q, torch.ones(64, 1), 8, 4, None, torch.bfloat16, "int4pack")
    assert torch.equal(p.tensors[0], eager(q, 8, 4, "nib"))


def test_without_numba_the_eager_path_packs_and_says_so(monkeypatch, caplog):
    monkeypatch.setitem(__import__("sys").modules, "numba", None)  # `import numba` now raises ImportError
    monkeypatch.setattr(cpu_fused, "_nb", None)
    monkeypatch.setattr(cpu_fused, "_kernels", {})
    monkeypatch.setattr(common, "_said", set())
    q = master(64, 64, 8)
    with caplog.at_level(logging.INFO, logger="abs_llm.kernels"):
        p = cpu.pack_int4(q, torch.ones(64, 1), 8, 4, None, torch.bfloat16, "int4pack")
        cpu.pack_int4(q, torch.ones(64, 1), 8, 3, None, torch.bfloat16, "int4pack")
    assert torch.equal(p.tensors[0], eager(q, 8, 4, "nib"))
    assert [r.message for r in caplog.records].count(next(r.message for r in caplog.records)) == 1
    assert "numba unavailable" in caplog.records[0].message and caplog.records[0].levelno == logging.INFO


def test_a_kernel_that_fails_to_build_falls_back_with_one_warning(monkeypatch, caplog):
    def broken(d, layout):
        raise RuntimeError("LLVM says no")

    monkeypatch.setattr(cpu_fused, "_build", broken)
    monkeypatch.setattr(cpu_fused, "_build_scales", lambda: broken(0, "scales"))
    monkeypatch.setattr(cpu_fused, "_kernels", {})
    monkeypatch.setattr(cpu_fused, "_nb", None)
    monkeypatch.setattr(common, "_said", set())
    q = master(64, 64, 8)
    with caplog.at_level(logging.INFO, logger="abs_llm.kernels"):
        for bits in (4, 3, 2):
            p = cpu.pack_int4(q, torch.ones(64, 1), 8, bits, None, torch.bfloat16, "int4pack")
            assert torch.equal(p.tensors[0], eager(q, 8, bits, "nib"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    if importlib.util.find_spec("numba") is not None:
        assert len(warnings) == 1 and "LLVM says no" in warnings[0].message
    assert cpu_fused.kernel(4, "blocked") is None  # stays off for the process


def test_constants_refuse_what_no_kernel_computes():
    with pytest.raises(ValueError, match="no fused kernel"):
        cpu_fused.constants(8, 1, "int8")  # d = 7: the unsigned-offset rounding needs d <= 6
    with pytest.raises(ValueError, match="no fused kernel"):
        cpu_fused.constants(8, 4, "planes")


def _layer(group_size, out_f=128, in_f=256):
    torch.manual_seed(1)
    m = SwitchableLinear(in_f, out_f, bias=False, group_size=group_size)
    w = torch.randn(out_f, in_f)
    s = core.init_scale(w, 8, group_size)
    m.weight_scale.data = s
    m.set_master(core.quantize_master(w, s, 8, group_size))
    return m


@needs_blocked64
@needs_numba
def test_cold_switch_writes_the_new_width_into_the_evicted_one():
    """Group-64 widths 8 and 6 both run int4x2 (one master's worth of bytes each) and the cache cap holds one of
    them: switching 8 -> 6 reuses the 8-bit buffers (no fresh pages, never both at once) and computes exactly what
    a fresh layer does."""
    m, x = _layer(64), torch.randn(3, 256, dtype=torch.bfloat16)
    m.bits = 8
    m(x)
    ptrs = [t.data_ptr() for t in m.packed(x.dtype, x.device).tensors]
    m.bits = 6
    y = m(x)
    p6 = m.packed(x.dtype, x.device)
    assert p6.kernel == "int4x2" and [t.data_ptr() for t in p6.tensors] == ptrs
    assert [k[0] for k in m._cache] == [6]
    fresh = _layer(64)
    fresh.bits = 6
    assert torch.equal(y, fresh(x))


@needs_numba
def test_a_pack_someone_holds_is_never_overwritten():
    m, x = _layer(64), torch.randn(3, 256, dtype=torch.bfloat16)
    m.bits = 8
    y8 = m(x)
    held = m.packed(x.dtype, x.device)
    m.bits = 6
    m(x)
    assert m.packed(x.dtype, x.device).tensors[0].data_ptr() != held.tensors[0].data_ptr()
    assert torch.equal(held(x, None), y8)


@pytest.mark.parametrize("kernel,group_size,shape", [("int4pack", None, (64, 96)), ("int4pack", 64, (128, 256)),
                                                     ("int4x2", 64, (128, 256)), ("int4x2", 128, (64, 384))])
def test_packed_nbytes_is_what_packing_holds(kernel, group_size, shape):
    from abs_llm.kernels import packed_nbytes

    q = master(*shape, 8)
    scale = torch.rand(shape[0], 1 if group_size is None else shape[1] // group_size) + 0.5
    for bits in (4, 2) if kernel == "int4pack" else (8, 6):
        p = cpu.pack_int4(q, scale, 8, bits, group_size, torch.bfloat16, kernel)
        assert p.nbytes == packed_nbytes(kernel, *shape, group_size, torch.bfloat16)
