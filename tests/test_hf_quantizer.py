"""transformers integration: quantize on load, save, reload, switching, bad checkpoints (tiny random Llama)."""


import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import abs_llm
from abs_llm import DoubleRoundingConfig, SwitchableLinear, get_bits, set_bits, switchable_layers
from tests.conftest import CANDS, load_q, logits



def test_registration_is_idempotent():
    import importlib

    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    importlib.reload(abs_llm)
    abs_llm._register()
    assert AUTO_QUANTIZER_MAPPING["double_rounding"].__name__ == "DoubleRoundingHfQuantizer"


@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("master_bits,cands", [(8, CANDS), (4, [4, 3, 2])])
def test_quantize_on_load_save_reload_identical(tiny_llama, tiny_llama_dir, tmp_path, tokens, group_size, master_bits,
                                                cands):
    qm = load_q(tiny_llama_dir, bits=cands[0], candidate_bits=cands, master_bits=master_bits, group_size=group_size)
    layers = switchable_layers(qm)
    assert len(layers) == 14 and "lm_head" not in layers  # 7 Linear per block; the tied head stays float
    fp = logits(tiny_llama, tokens)
    err = {}
    for b in cands:
        set_bits(qm, b)
        err[b] = (logits(qm, tokens) - fp).abs().mean().item()
    assert err[cands[0]] < err[cands[-1]]
    if master_bits == 8:
        assert err[8] < 1e-2
    qm.save_pretrained(tmp_path / "q")
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(re.model.layers[1].mlp.down_proj, SwitchableLinear)
    for b in cands:
        set_bits(qm, b)
        set_bits(re, b)
        assert torch.equal(logits(re, tokens), logits(qm, tokens)), f"reload differs at {b} bits"


def test_per_layer_bits_round_trip(tiny_llama_dir, tmp_path, tokens):
    qm = load_q(tiny_llama_dir, bits=6)
    plan = {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.mlp.up_proj": 3}
    set_bits(qm, plan)
    bits = get_bits(qm)
    assert bits["model.layers.0.self_attn.q_proj"] == 2 and bits["model.layers.0.mlp.up_proj"] == 6
    qm.save_pretrained(tmp_path / "q")
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert get_bits(re) == bits
    assert torch.equal(logits(re, tokens), logits(qm, tokens))
    set_bits(re, 8)
    assert get_bits(re) == 8


def test_layer_bits_in_config_applied_on_load(tiny_llama_dir):
    qm = load_q(tiny_llama_dir, bits=8, layer_bits={"model.layers.1.self_attn.v_proj": 2})
    assert get_bits(qm)["model.layers.1.self_attn.v_proj"] == 2


def test_quantize_in_memory_matches_from_pretrained(tiny_llama, tiny_llama_dir, tmp_path, tokens):
    cfg = DoubleRoundingConfig(bits=4, candidate_bits=CANDS, group_size=64)
    abs_llm.quantize(tiny_llama, cfg)
    loaded = load_q(tiny_llama_dir, bits=4)
    assert torch.equal(logits(tiny_llama, tokens), logits(loaded, tokens))
    tiny_llama.save_pretrained(tmp_path / "q")
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert get_bits(re) == 4
    assert torch.equal(logits(re, tokens), logits(tiny_llama, tokens))
    with pytest.raises(ValueError, match="already quantized"):
        abs_llm.quantize(tiny_llama, cfg)


def test_trainable_model_saves_frozen_master(tiny_llama, tmp_path, tokens):
    abs_llm.quantize(tiny_llama, DoubleRoundingConfig(bits=4, candidate_bits=CANDS), trainable=True)
    assert any(p.requires_grad for n, p in tiny_llama.named_parameters() if n.endswith("weight_scale"))
    tiny_llama.save_pretrained(tmp_path / "q")
    keys = list(load_file(tmp_path / "q" / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.weight_master" in keys and "model.layers.0.mlp.up_proj.weight" not in keys
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(logits(re, tokens), logits(tiny_llama, tokens))


def test_modules_to_not_convert(tiny_llama_dir, caplog):
    qm = load_q(tiny_llama_dir, modules_to_not_convert=["model.layers.0", "does_not_exist"])
    names = list(switchable_layers(qm))
    assert names and not [n for n in names if n.startswith("model.layers.0.")]
    assert "matches no Linear layer" in caplog.text


# ---- bad input ------------------------------------------------------------------------------------------------------


def test_nan_weights_refused_and_model_untouched(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj has NaN or inf"):
        abs_llm.quantize(tiny_llama, DoubleRoundingConfig())
    assert not switchable_layers(tiny_llama)
