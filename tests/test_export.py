"""Fixed-bit export: compressed-tensors pack-quantized (round trip through transformers' loader) and hf-dense."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import abs_llm
from abs_llm import DoubleRoundingConfig, set_bits
from abs_llm.export import export

pytest.importorskip("compressed_tensors")


@pytest.fixture
def qmodel(tiny_llama):
    # group 32 divides every width of the tiny model (96, 160)
    return abs_llm.quantize(tiny_llama, DoubleRoundingConfig(bits=8, candidate_bits=[8, 4, 2], group_size=32))


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("fmt", ["compressed-tensors", "hf-dense"])
def test_export_round_trips_through_transformers(qmodel, tokens, tmp_path, fmt, bits):
    out = export(qmodel, tmp_path / "x", bits, fmt)
    set_bits(qmodel, bits)
    with torch.no_grad():
        ref = qmodel(tokens).logits
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(m, abs_llm.SwitchableLinear) for m in loaded.modules())
    with torch.no_grad():
        assert torch.allclose(loaded(tokens).logits, ref, atol=1e-5, rtol=0)


def test_compressed_tensors_layout(qmodel, tmp_path):
    out = export(qmodel, tmp_path / "x", 4, "compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["type"], w["symmetric"], w["strategy"], w["group_size"]) == (4, "int", True, "group", 32)
    assert qc["ignore"] == ["lm_head"]
    with safe_open(out / "model.safetensors", "pt") as f:
        name = "model.layers.0.mlp.down_proj"  # in 160, out 96
        assert f.get_slice(f"{name}.weight_packed").get_dtype() == "I32"
        assert f.get_slice(f"{name}.weight_packed").get_shape() == [96, 160 * 4 // 32]
        assert f.get_slice(f"{name}.weight_scale").get_shape() == [96, 160 // 32]
        assert f.get_tensor(f"{name}.weight_shape").tolist() == [96, 160]
        assert not [k for k in f.keys() if k.endswith("proj.weight") or "weight_master" in k]


def test_export_refuses_bad_input(tiny_llama, qmodel, tmp_path):
    with pytest.raises(ValueError, match="unknown export format"):
        export(qmodel, tmp_path / "a", 4, "gguf")
    with pytest.raises(ValueError, match="not a candidate"):
        export(qmodel, tmp_path / "b", 6, "compressed-tensors")
    short = abs_llm.quantize(tiny_llama.__class__(tiny_llama.config),  # group 64 does not divide 96: short last group
                             DoubleRoundingConfig(bits=8, candidate_bits=[8, 4], group_size=64))
    with pytest.raises(ValueError, match="group_size to divide"):
        export(short, tmp_path / "c", 4, "compressed-tensors")
    export(short, tmp_path / "d", 4, "hf-dense")  # dense has no group constraint


