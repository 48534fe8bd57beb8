"""Every call that changes a model is all or nothing: a refusal leaves it bit-identical (conftest.model_digest: every
tensor, module type, bits, kernel and mode). Also the fixes made on main during the restructure, each checked here."""

import copy
import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM, TrainingArguments

import abs_llm
from abs_llm import DoubleRoundingConfig, SwitchableLinear, get_bits, set_bits, switchable_layers
from abs_llm.layers import convert_all
from abs_llm.multibit import MultiBitConfig
from abs_llm.training import MultiBitTrainer
from tests._report import RELIABILITY
from tests.conftest import model_digest, tiny_llama_config

LAST = "model.layers.1.mlp.down_proj"  # the 14th and last converted Linear


def float_model(**cfg):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(**cfg)).eval()


def quantized(trainable=False, **cfg):
    return abs_llm.quantize(float_model(), DoubleRoundingConfig(candidate_bits=[8, 4, 2], **cfg), trainable=trainable)


def refused(model, fn, exc=ValueError, match=None):
    """``fn()`` raises ``exc`` and leaves ``model`` bit-identical."""
    before = model_digest(model)
    with pytest.raises(exc, match=match):
        fn()
    assert model_digest(model) == before, "a refused call changed the model"
    RELIABILITY["bad inputs tried"] += 1


def _poison(model, name, what="weight"):
    with torch.no_grad():
        getattr(model.get_submodule(name), what).view(-1)[0] = float("nan")


# ---- quantize -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("what", ["weight", "bias"])
def test_quantize_refuses_nan_in_the_last_layer_before_any_change(trainable, what):
    model = float_model(mlp_bias=True)
    _poison(model, LAST, what)
    refused(model, lambda: abs_llm.quantize(model, DoubleRoundingConfig(), trainable=trainable),
            match=f"{LAST} has NaN or inf {what}")
    assert not switchable_layers(model)


@pytest.mark.parametrize("field,value", [("layer_bits", {"model.layers.0.mlp.up_proj": 4, "model.nope": 2}),
                                         ("layer_bits", {"lm_head": 4}),  # kept in float: not a converted layer
                                         ("hessian_traces", {"model.nope": 1.0})])
def test_quantize_refuses_config_naming_unconverted_layers_before_any_change(field, value):
    model = float_model()
    cfg = DoubleRoundingConfig(candidate_bits=[8, 4, 2], **{field: value})
    saved = cfg.to_dict()
    refused(model, lambda: abs_llm.quantize(model, cfg), match=f"config {field} names 1 layer")
    assert cfg.to_dict() == saved and not hasattr(model.config, "quantization_config")


def test_quantize_undoes_the_conversion_if_a_late_step_fails(monkeypatch):
    from abs_llm import hf_quantizer

    def boom(model, config):
        raise RuntimeError("simulated failure after the layers were swapped")

    monkeypatch.setattr(hf_quantizer, "_apply_config_bits", boom)
    model = float_model()
    cfg = DoubleRoundingConfig(candidate_bits=[8, 4, 2])
    refused(model, lambda: abs_llm.quantize(model, cfg), RuntimeError, "simulated")
    assert cfg.modules_to_not_convert is None and not switchable_layers(model)


def test_switchable_linear_with_no_candidates_is_a_clear_error():
    with pytest.raises(ValueError, match=r"candidate_bits must be a non-empty list drawn from \[2, 3, 4, 5, 6, 7, 8\]"):
        SwitchableLinear(64, 64, candidate_bits=())
    RELIABILITY["bad inputs tried"] += 1


# ---- training mode across a model -----------------------------------------------------------------------------------
def test_freeze_all_refuses_a_nan_latent_weight_before_any_layer_changes():
    model = quantized(trainable=True)
    _poison(model, LAST)
    refused(model, lambda: convert_all(switchable_layers(model), trainable=False), match=f"cannot freeze {LAST}")
    assert all(m.trainable for m in switchable_layers(model).values())


def test_to_trainable_all_changes_no_layer_when_one_fails(monkeypatch):
    model = quantized()
    calls = []

    def latent(self):
        calls.append(self)
        if len(calls) == 3:
            raise MemoryError("simulated: no memory for the third latent weight")
        return real(self)

    real = SwitchableLinear._latent
    monkeypatch.setattr(SwitchableLinear, "_latent", latent)
    refused(model, lambda: convert_all(switchable_layers(model), trainable=True), MemoryError)
    assert not any(m.trainable for m in switchable_layers(model).values())


def test_freeze_all_then_to_trainable_all_round_trips_the_master():
    model = quantized()
    before = {n: m.weight_master.clone() for n, m in switchable_layers(model).items()}
    convert_all(switchable_layers(model), trainable=True)
    convert_all(switchable_layers(model), trainable=False)
    assert all(torch.equal(m.weight_master, before[n]) for n, m in switchable_layers(model).items())


# ---- trainer set-up -------------------------------------------------------------------------------------------------
def _trainer(model, **kw):
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 4, "labels": [[1, 2, 3, 4]] * 4})
    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    mb = kw.pop("multibit", MultiBitConfig())
    return MultiBitTrainer(model=model, args=args, multibit=mb, teacher=copy.deepcopy(model), train_dataset=ds, **kw)


def test_trainer_refused_by_transformers_itself_leaves_the_model_unchanged():
    model = quantized()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    refused(model, lambda: _trainer(model, optimizers=(opt, None), optimizer_cls_and_kwargs=(torch.optim.SGD, {})),
            RuntimeError, "Passing both")  # Trainer.__init__'s own check, after it has run its own set-up


def test_trainer_hasb_without_a_config_to_record_traces_is_refused_before_any_change():
    model = quantized()
    traces = {n: 1.0 for n in switchable_layers(model)}
    del model.config.quantization_config
    refused(model, lambda: _trainer(model, multibit=MultiBitConfig(hasb=True, hasb_traces=traces)),
            match="records the traces in the model's DoubleRoundingConfig")


def test_save_switchable_refuses_a_nan_layer_and_leaves_every_layer_training(tmp_path):
    model = quantized()
    trainer = _trainer(model)
    _poison(model, LAST)
    refused(model, lambda: trainer.save_switchable(str(tmp_path / "out")), match=f"cannot freeze {LAST}")
    assert all(m.trainable for m in switchable_layers(model).values()) and not (tmp_path / "out").exists()


# ---- set_bits -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,kernel,match", [
    ({"model.layers.0.mlp.up_proj": 2, "model.layers.1.mlp.up_proj": 3}, None, "bits=3 for model.layers.1.mlp.up_proj"),
    ({"model.layers.0.mlp.up_proj": 2, "model.nope": 4}, None, r"unknown layer names \['model.nope'\]"),
    ({"model.layers.0.mlp.up_proj": 2}, "fastest", "kernel='fastest' is not known"),
    ({"model.layers.0.mlp.up_proj": True}, None, "bits=True"),
])
def test_set_bits_map_with_one_bad_entry_changes_nothing(bits, kernel, match):
    model = quantized()
    set_bits(model, {"model.layers.1.self_attn.q_proj": 4})
    refused(model, lambda: set_bits(model, bits, kernel=kernel), match=match)


def test_set_bits_puts_every_layer_back_when_packing_fails_half_way(monkeypatch, tokens):
    model = quantized()
    with torch.no_grad():
        model(tokens)  # layers remember the activation dtype, so set_bits packs eagerly
    calls = []

    def prepare(self):
        calls.append(self)
        if len(calls) == 5:
            raise MemoryError("simulated: out of memory packing the fifth layer")
        return real(self)

    real = SwitchableLinear.prepare
    monkeypatch.setattr(SwitchableLinear, "prepare", prepare)
    refused(model, lambda: set_bits(model, 2, kernel="dequant"), MemoryError)
    assert get_bits(model) == 8 and {m.kernel for m in switchable_layers(model).values()} == {"auto"}
    assert model.config.quantization_config.bits == 8


# ---- the fixes made on main, each checked ---------------------------------------------------------------------------
def test_explicit_kernel_that_cannot_run_warns(monkeypatch, caplog, tokens):
    from abs_llm.kernels import common

    monkeypatch.setattr(common, "_said", set())
    model = quantized()  # group 64: int8pack takes per-channel scales only
    set_bits(model, 8, kernel="int8pack")
    with caplog.at_level(logging.WARNING, logger="abs_llm"), torch.no_grad():
        model(tokens.clamp(max=127))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "int8pack unavailable" in r.message]
    assert warnings and "using dequant" in warnings[0].message


@pytest.mark.parametrize("quant", [{"master_bits": 4, "candidate_bits": [4, 3, 2], "group_size": None},
                                   {"candidate_bits": [6, 4, 2], "group_size": None}])
def test_recipe_without_8_bit_candidate_builds_and_trains_one_step(tmp_path, tiny_lm_dir, quant):
    import yaml

    from abs_llm import recipe
    from tests.conftest import write_recipe

    path = write_recipe(tmp_path, tiny_lm_dir, max_steps=1, save_steps=1)
    spec = yaml.safe_load(path.read_text())
    spec["quant"] = quant
    path.write_text(yaml.safe_dump(spec))
    trainer = recipe.train(path, output_dir=str(tmp_path / "out"))
    assert trainer.state.global_step == 1
    from abs_llm.pipeline import load_checkpoint

    model = load_checkpoint(tmp_path / "out", tokenizer=False)[0]
    assert get_bits(model) == quant["candidate_bits"][0]
    assert model.config.quantization_config.master_bits == quant.get("master_bits", 8)


# ---- property: any map with one bad entry changes nothing; any valid map applies exactly ----------------------------
_SHARED = {}


def _shared_model():
    if "m" not in _SHARED:
        _SHARED["m"] = quantized()
    return _SHARED["m"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_set_bits_property_all_or_nothing(data):
    RELIABILITY["property examples run"] += 1
    model = _shared_model()
    names = list(switchable_layers(model))
    chosen = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    plan = {n: data.draw(st.sampled_from([8, 4, 2])) for n in chosen}
    bad = data.draw(st.sampled_from(["none", "unknown layer", "bits 6", "bits bool", "bits str", "bits float", "kernel"]))
    kernel = None
    if bad == "unknown layer":
        plan["model.layers.9.mlp.up_proj"] = 4
    elif bad == "kernel":
        kernel = "fastest"
    elif bad != "none":
        plan[data.draw(st.sampled_from(names))] = {"bits 6": 6, "bits bool": True, "bits str": "4", "bits float": 4.0}[bad]
    before, bits_before = model_digest(model), get_bits(model)
    if bad == "none":
        set_bits(model, plan)
        after = get_bits(model)
        after = after if isinstance(after, dict) else {n: after for n in names}
        base = bits_before if isinstance(bits_before, dict) else {n: bits_before for n in names}
        assert after == {**base, **plan}
        set_bits(model, 8)
    else:
        with pytest.raises(ValueError):
            set_bits(model, plan, kernel=kernel)
        assert model_digest(model) == before


def test_a_failing_kernel_falls_back_with_the_real_error_in_the_warning(monkeypatch, caplog):
    """pack_checked catches every exception on purpose (a kernel must never take the model down); the WARNING names
    the exception type and message so the real error is not hidden, and the result is the dequant reference."""
    from abs_llm.kernels import common, dispatch

    monkeypatch.setattr(common, "_said", set())
    real = dispatch.pack

    def pack(q, s, h, b, g, dtype, device, kernel, spare=()):
        if kernel != "dequant":
            raise IndexError("simulated packer bug")
        return real(q, s, h, b, g, dtype, device, kernel)

    monkeypatch.setattr(dispatch, "pack", pack)
    q = torch.randint(-128, 128, (8, 32), dtype=torch.int8)
    s = torch.rand(8, 1) + 0.1
    with caplog.at_level(logging.WARNING, logger="abs_llm"):
        p = dispatch.pack_checked(q, s, 8, 4, None, torch.float32, "cpu", "int8pack")
    assert p.kernel == "dequant"
    assert "int8pack failed for (8, 32) at 4 bits (IndexError: simulated packer bug)" in caplog.text
