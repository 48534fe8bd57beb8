"""accelerate offload on the CPU: device_map with "disk", device_map="auto" under max_memory, and cpu_offload hooks
give the logits of the in-memory model at every width; offloaded layers keep no packed copy between forwards."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import abs_llm
from abs_llm import DoubleRoundingConfig, set_bits
from abs_llm.hf_quantizer import mark_offloaded
from abs_llm.switching import switchable_layers

BITS = [8, 4, 2]
MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
       "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture
def saved(tiny_llama, tmp_path, tokens):
    abs_llm.quantize(tiny_llama, DoubleRoundingConfig(bits=8, candidate_bits=BITS))
    tiny_llama.save_pretrained(tmp_path / "q")
    ref = {}
    for b in BITS:
        set_bits(tiny_llama, b)
        with torch.no_grad():
            ref[b] = tiny_llama(tokens).logits
    return tmp_path / "q", ref


def _check_every_width(model, tokens, ref):
    for b in BITS:
        set_bits(model, b)  # between forwards the offloaded masters are on the meta device: nothing may be packed
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, ref[b]), b


@pytest.mark.parametrize("offload_buffers", [False, True])
def test_disk_offload_device_map(saved, tokens, tmp_path, offload_buffers):
    path, ref = saved
    model = AutoModelForCausalLM.from_pretrained(path, device_map=MAP, offload_folder=str(tmp_path / "off"),
                                                 offload_buffers=offload_buffers)
    layers = switchable_layers(model)
    flagged = {n for n, m in layers.items() if m.offloaded}
    assert flagged == {n for n in layers if n.startswith("model.layers.1.")}
    q = layers["model.layers.1.self_attn.q_proj"]
    assert q.weight_scale.is_meta and q.weight_master.is_meta == offload_buffers  # the master is a buffer
    _check_every_width(model, tokens, ref)
    assert all(not m._cache for n, m in layers.items() if n in flagged)  # no packed copy kept
    assert all(m._cache for n, m in layers.items() if n not in flagged)


def test_auto_device_map_under_max_memory(saved, tokens, tmp_path):
    path, ref = saved
    model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", max_memory={"cpu": "60KB"},
                                                 offload_folder=str(tmp_path / "off"), offload_buffers=True)
    assert "disk" in set(model.hf_device_map.values())
    _check_every_width(model, tokens, ref)


def test_accelerate_cpu_offload_hooks(saved, tokens):
    from accelerate import cpu_offload

    path, ref = saved
    model = AutoModelForCausalLM.from_pretrained(path)
    cpu_offload(model, execution_device="cpu", offload_buffers=True)  # the hooks used for GPU execution + CPU RAM
    assert len(mark_offloaded(model)) == len(switchable_layers(model))
    _check_every_width(model, tokens, ref)


def test_quantize_on_load_with_disk_offload_is_refused_up_front(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="quantize-on-load cannot disk-offload"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, device_map=MAP, offload_folder=str(tmp_path / "o"),
                                             quantization_config=DoubleRoundingConfig())
