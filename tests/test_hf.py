"""transformers integration: quantize on load, save, reload, switching, bad checkpoints (tiny random Llama)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import abs_llm
from abs_llm import DoubleRoundingConfig, SwitchableLinear, get_bits, set_bits, switchable_layers
from tests.conftest import tiny_llama_config

CANDS = [8, 6, 4, 3, 2]


def load_q(path, **cfg):
    cfg = {"bits": 8, "candidate_bits": CANDS, "group_size": 64, **cfg}
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=DoubleRoundingConfig(**cfg))


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


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


def test_checkpoint_holds_only_integers_and_metadata(tiny_llama_dir, tmp_path):
    qm = load_q(tiny_llama_dir)
    set_bits(qm, 4)
    qm.save_pretrained(tmp_path / "q")
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        q_key = "model.layers.0.self_attn.q_proj"
        assert f.get_slice(f"{q_key}.weight_master").get_dtype() == "I8"
        assert f.get_slice(f"{q_key}.weight_scale").get_shape() == [96, 2]  # 96 = 64 + a short group of 32
        # no float copy of converted layers; the one "weight" is the empty int8 load guard (remote_code.py)
        proj = [k for k in keys if k.endswith("proj.weight")]
        assert proj == [meta["abs_llm.load_guard"]] and f.get_slice(proj[0]).get_shape() == [0]
        assert f.get_slice(proj[0]).get_dtype() == "I8"
    assert meta["abs_llm.format_version"] == "1"
    assert meta["abs_llm.master_bits"] == "8"
    assert json.loads(meta["abs_llm.candidate_bits"]) == CANDS
    assert json.loads(meta["abs_llm.group_size"]) == 64
    assert set(json.loads(meta["abs_llm.layer_bits"]).values()) == {4}
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "double_rounding" and qc["bits"] == 4


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
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"master_bits": 6}, r"master_bits=6 .* \[4, 8\]"),
        ({"bits": 5, "candidate_bits": [8, 4]}, r"bits=5 .* \[4, 8\]"),
        ({"candidate_bits": [8, 9]}, r"candidate_bits entry=9 .* \[2, 3, 4, 5, 6, 7, 8\]"),
        ({"master_bits": 4, "candidate_bits": [8, 4], "bits": 4}, r"candidate_bits entry=8 .* \[2, 3, 4\]"),
        ({"candidate_bits": []}, "non-empty"),
        ({"candidate_bits": [8, 8]}, "duplicates"),
        ({"group_size": 48}, r"power of two in \[16, 1024\]"),
        ({"group_size": 2048}, r"power of two in \[16, 1024\]"),
        ({"layer_bits": {"x": 5}, "candidate_bits": [8, 4]}, r"layer_bits\['x'\]=5"),
        ({"modules_to_not_convert": "lm_head"}, "list of names"),
        ({"format_version": 99}, "newer than this abs_llm supports"),
        ({"nonsense": 1}, "unknown fields"),
    ],
)
def test_config_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DoubleRoundingConfig(**kwargs)


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


def test_nan_weights_refused_and_model_untouched(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj has NaN or inf"):
        abs_llm.quantize(tiny_llama, DoubleRoundingConfig())
    assert not switchable_layers(tiny_llama)


@pytest.fixture
def saved(tiny_llama_dir, tmp_path):
    qm = load_q(tiny_llama_dir)
    out = tmp_path / "q"
    qm.save_pretrained(out)
    return out


def _rewrite(path, fn_tensors=None, fn_meta=None):
    file = path / "model.safetensors"
    with safe_open(file, "pt") as f:
        meta = f.metadata()
    tensors = load_file(file)
    tensors = fn_tensors(tensors) if fn_tensors else tensors
    meta = fn_meta(meta) if fn_meta else meta
    save_file(tensors, file, metadata=meta)


KEY = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "fn_tensors,fn_meta,match",
    [
        (lambda t: {k: v for k, v in t.items() if k != f"{KEY}.weight_scale"}, None, f"missing tensor {KEY}.weight_scale"),
        (lambda t: {**t, f"{KEY}.weight_master": t[f"{KEY}.weight_master"].float()}, None, "dtype/shape F32"),
        (lambda t: {**t, f"{KEY}.weight_scale": t[f"{KEY}.weight_scale"][:, :1].contiguous()}, None, r"expected F32\[96, 2\]"),
        (None, lambda m: {k: v for k, v in m.items() if k != "abs_llm.format_version"}, "not an abs_llm checkpoint"),
        (None, lambda m: {**m, "abs_llm.format_version": "7"}, "newer than supported"),
        (None, lambda m: {**m, "abs_llm.group_size": "128"}, "group_size=128 disagrees"),
    ],
)
def test_bad_checkpoints_fail_before_loading(saved, fn_tensors, fn_meta, match):
    _rewrite(saved, fn_tensors, fn_meta)
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(saved)
