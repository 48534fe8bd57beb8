"""Run-time switching (set_bits / get_bits) and the one answer to "which bits may this model/layer take"."""

import pytest
import torch
from transformers import LlamaForCausalLM

from abs_llm import DoubleRoundingConfig, SwitchableLinear, get_bits, quantize, set_bits
from abs_llm.switching import allowed_bits, check_bits, model_bytes, packed_weight_bytes, require_layers
from tests.conftest import load_q, tiny_llama_config


def test_allowed_bits_of_layer_and_model():
    layer = SwitchableLinear(32, 16, candidate_bits=(8, 4, 2), group_size=16)
    assert allowed_bits(layer) == (8, 4, 2)
    model = quantize(LlamaForCausalLM(tiny_llama_config()), DoubleRoundingConfig(candidate_bits=[8, 6, 4]))
    assert allowed_bits(model) == (8, 6, 4)
    assert check_bits(model, 6) == 6 and check_bits(model, [4, 8]) == [4, 8]
    for bad, shown in ((3, "bits=3"), ([8, 3], r"bits=\[8, 3\]"), ([], r"bits=\[\]"), (True, "bits=True"),
                       ("4", "bits='4'")):
        with pytest.raises(ValueError, match=rf"{shown} is not a candidate bit-width; allowed \[4, 6, 8\]"):
            check_bits(model, bad)
    with pytest.raises(ValueError, match="no SwitchableLinear layers"):
        require_layers(LlamaForCausalLM(tiny_llama_config()))


def test_model_bytes_counts_packed_widths_once():
    model = quantize(LlamaForCausalLM(tiny_llama_config()), DoubleRoundingConfig(candidate_bits=[8, 4, 2]))
    at8, at4, at2 = (model_bytes(model, b) for b in (8, 4, 2))
    weights = sum(m.out_features * m.in_features for m in require_layers(model).values())
    assert at8 - at4 == weights // 2 and at4 - at2 == weights // 4
    assert packed_weight_bytes(3, 3) == 2 and packed_weight_bytes(8, 2) == 2
    set_bits(model, 4)
    assert model_bytes(model) == at4 and get_bits(model) == 4


def test_set_bits_bad_input_changes_nothing(tiny_llama_dir):
    qm = load_q(tiny_llama_dir, candidate_bits=[8, 4, 2])
    with pytest.raises(ValueError, match=r"allowed \[2, 4, 8\]"):
        set_bits(qm, 6)
    with pytest.raises(ValueError, match="unknown layer names"):
        set_bits(qm, {"model.layers.0.self_attn.q_proj": 4, "model.layers.9.nope": 4})
    with pytest.raises(ValueError, match=r"allowed \[2, 4, 8\]"):
        set_bits(qm, {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.k_proj": 3})
    assert get_bits(qm) == 8  # validated before anything changed
    with pytest.raises(ValueError, match="no SwitchableLinear"):
        set_bits(LlamaForCausalLM(tiny_llama_config()), 4)



def test_set_bits_kernel_knob_packs_eagerly_and_validates():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    quantize(model, DoubleRoundingConfig(group_size=None))
    model(torch.zeros(1, 4, dtype=torch.long))  # layers learn their activation dtype
    set_bits(model, 4, kernel="dequant")
    layer = model.model.layers[0].mlp.up_proj
    assert layer.kernel == "dequant" and [k[0] for k in layer._cache] == [4]  # packed in set_bits, not lazily
    assert model.config.quantization_config.kernel == "dequant"
    with pytest.raises(ValueError, match="kernel"):
        set_bits(model, 8, kernel="magic")
    assert layer.bits == 4 and layer.kernel == "dequant"



def test_switch_mirrors_the_widths_into_the_config_and_refuses_a_width_one_layer_lacks():
    model = quantize(LlamaForCausalLM(tiny_llama_config()), DoubleRoundingConfig(candidate_bits=[8, 4, 2]))
    qcfg, names = model.config.quantization_config, list(require_layers(model))
    set_bits(model, {names[0]: 2})
    assert (qcfg.bits, qcfg.layer_bits) == (8, {names[0]: 2})
    set_bits(model, 4)  # a whole-model switch leaves no per-layer exceptions behind
    assert (qcfg.bits, qcfg.layer_bits) == (4, None) and get_bits(model) == 4
    set_bits(model, {n: 2 for n in names[1:]})
    assert (qcfg.bits, qcfg.layer_bits) == (2, {names[0]: 4})
    odd = require_layers(model)[names[3]]
    odd.candidate_bits = (8, 4)  # one layer without 2 bits: the model as a whole cannot take 2
    with pytest.raises(ValueError, match=r"bits=2 is not a candidate bit-width; allowed \[4, 8\]"):
        set_bits(model, 2)
    assert get_bits(model)[names[3]] == 2 and qcfg.layer_bits == {names[0]: 4}  # nothing changed
