"""Per-width norm gains (abs_llm.norms) and their fit by distillation (abs_llm.tune_norms)."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import abs_llm
from abs_llm import DoubleRoundingConfig, norms, set_bits
from abs_llm.export import dense_copy

from conftest import TEXT, char_tokenizer, logits, tiny_llama_config


@pytest.fixture
def tuned():
    """A quantized tiny Llama with 4- and 2-bit norm gains fitted for 3 steps, its float teacher and tokenizer."""
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config()).eval()
    model = copy.deepcopy(teacher)
    abs_llm.quantize(model, DoubleRoundingConfig(bits=8, candidate_bits=[8, 4, 2]))
    tok = char_tokenizer()
    log = abs_llm.tune_norms(model, tok, [4, 2], teacher, [TEXT], steps=3, lr=1e-2, block_size=32, progress=False)
    return model, teacher, tok, log


def gains(model, name, bits):
    return model.get_submodule(name)._buffers[f"weight_w{bits}"]


def test_tuning_moves_only_the_tuned_widths_gains(tuned):
    model, teacher, _, log = tuned
    assert sorted(log) == [2, 4] and all(len(v) == 3 for v in log.values())
    assert model.config.quantization_config.norm_bits == [4, 2]
    assert abs_llm.get_bits(model) == 8  # left at the width and kernels it was at
    assert model.config.quantization_config.kernel == "auto"
    assert {m.kernel for m in abs_llm.switchable_layers(model).values()} == {"auto"}
    for name, m in norms.tuned_norms(model).items():
        float_gains = teacher.get_submodule(name).weight
        assert torch.equal(m._buffers["weight_float"], float_gains)
        assert torch.equal(m.weight, float_gains)  # 8 bits has no gains of its own: the float ones
        assert not torch.equal(gains(model, name, 4), float_gains)
        assert not torch.equal(gains(model, name, 4), gains(model, name, 2))
    assert len(norms.tuned_norms(model)) == 5  # 2 layers x 2 norms + the final norm


def test_switching_binds_each_widths_gains(tuned, tokens):
    model, _, _, _ = tuned
    name = "model.layers.0.input_layernorm"
    set_bits(model, 4)
    assert torch.equal(model.get_submodule(name).weight, gains(model, name, 4))
    out4 = logits(model, tokens)
    set_bits(model, 2)
    assert torch.equal(model.get_submodule(name).weight, gains(model, name, 2))
    set_bits(model, 4)
    assert torch.equal(logits(model, tokens), out4)
    # a decoder layer with mixed widths keeps the float gains; the other layer and the final norm follow their widths
    set_bits(model, {"model.layers.0.self_attn.q_proj": 2})
    m0 = model.get_submodule(name)
    assert torch.equal(m0.weight, m0._buffers["weight_float"])
    assert torch.equal(model.get_submodule("model.layers.1.input_layernorm").weight,
                       gains(model, "model.layers.1.input_layernorm", 4))
    assert torch.equal(model.get_submodule("model.norm").weight, model.get_submodule("model.norm").weight_float)


def test_tuned_gains_lower_the_distillation_loss(tokens):
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config()).eval()
    model = copy.deepcopy(teacher)
    abs_llm.quantize(model, DoubleRoundingConfig(bits=2, candidate_bits=[8, 2]))
    log = abs_llm.tune_norms(model, char_tokenizer(), [2], teacher, [TEXT], steps=40, lr=3e-2, block_size=32,
                             progress=False)
    assert sum(log[2][-5:]) < sum(log[2][:5])


def test_save_and_reload_keeps_every_widths_gains(tuned, tmp_path, tokens):
    model, teacher, tok, _ = tuned
    set_bits(model, 4)  # saved while 4 bits is active: the file still holds the float gains as the norms' weight
    want = {b: (set_bits(model, b), logits(model, tokens))[1] for b in (8, 4, 2)}
    model.save_pretrained(tmp_path / "q")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert torch.equal(f.get_tensor("model.layers.0.input_layernorm.weight"),
                           teacher.get_submodule("model.layers.0.input_layernorm").weight)
    assert {"model.norm.weight_w4", "model.norm.weight_w2"} <= keys and "model.norm.weight_float" not in keys
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["norm_bits"] == [4, 2]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert abs_llm.get_bits(back) == 2  # the width active at save time
    for b in (8, 4, 2):
        set_bits(back, b)
        assert torch.equal(logits(back, tokens), want[b]), b


def test_checkpoint_without_the_named_gains_is_refused(tuned, tmp_path, monkeypatch):
    model, _, _, _ = tuned
    monkeypatch.setenv("ABS_LLM_VERIFY", "0")  # the digests refuse any config edit first; this checks the files
    model.save_pretrained(tmp_path / "q")
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["norm_bits"] = [4, 2, 8]  # 8 was never tuned: its gains are not in the file
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="norm gains.*weight_w8"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_plain_checkpoints_have_no_norm_bits(qckpt):
    assert "norm_bits" not in json.loads((qckpt / "config.json").read_text())["quantization_config"]
    assert not norms.tuned_norms(AutoModelForCausalLM.from_pretrained(qckpt))


def test_dense_snapshot_holds_that_widths_gains(tuned, tokens):
    model, _, _, _ = tuned
    set_bits(model, 4)
    want = logits(model, tokens)
    set_bits(model, 8)
    dense = dense_copy(model, 4)
    assert torch.allclose(logits(dense, tokens), want, atol=1e-5)
    assert not any(k.endswith(("weight_w4", "weight_w2", "weight_float")) for k in dense.state_dict())
    assert abs_llm.get_bits(model) == 8 and torch.equal(
        model.get_submodule("model.norm").weight, model.get_submodule("model.norm").weight_float)


def test_draft_binds_its_own_gains(tuned, tokens):
    model, _, _, _ = tuned
    want8 = logits(model, tokens)
    draft = abs_llm.draft_model(model, bits=2)
    name = "model.layers.0.input_layernorm"
    assert torch.equal(draft.get_submodule(name).weight, gains(model, name, 2))
    assert torch.equal(model.get_submodule(name).weight, model.get_submodule(name).weight_float)
    assert torch.equal(logits(model, tokens), want8)


def test_qat_refuses_a_model_with_norm_gains(tuned):
    from abs_llm.multibit import MultiBitConfig, validate

    model, teacher, _, _ = tuned
    with pytest.raises(ValueError, match="per-width norm gains"):
        validate(model, None, MultiBitConfig(kd="none"), None, None)


def test_bad_arguments_are_refused_before_any_change(tiny_llama):
    abs_llm.quantize(tiny_llama, DoubleRoundingConfig(bits=8, candidate_bits=[8, 4]))
    teacher = copy.deepcopy(tiny_llama)
    for bits, steps, match in (([3], 2, "candidate widths"), ([], 2, "candidate widths"), ([4], 0, "positive")):
        with pytest.raises(ValueError, match=match):
            abs_llm.tune_norms(tiny_llama, char_tokenizer(), bits, teacher, [TEXT], steps=steps, progress=False)
    with pytest.raises(ValueError, match="more than 256 tokens"):
        abs_llm.tune_norms(tiny_llama, char_tokenizer(), [4], teacher, ["short"], steps=1, progress=False)
    assert not norms.tuned_norms(tiny_llama)
    with pytest.raises(ValueError, match="norm_bits entry"):
        DoubleRoundingConfig(candidate_bits=[8, 4], norm_bits=[3])
