"""MultiBitTrainer (joint multi-bit QAT, ALRS, KD, HASB sampling) on a tiny random Llama with a tiny BPE tokenizer."""

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaForCausalLM, TrainingArguments,
                          default_data_collator)

from abs_llm import DoubleRoundingConfig, get_bits, quantize, set_bits, switchable_layers
from abs_llm.core import alrs_multiplier
from abs_llm.layers import SwitchableLinear
from abs_llm.recipe import pack_blocks
from abs_llm.training import SCALE_GROUP, MultiBitConfig, MultiBitTrainer

from tests.conftest import TEXT, tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]


def _setup(tiny_tok, tmp_path, bits=(8, 4, 2), kd="teacher", max_steps=2, **mb):
    tok, _ = tiny_tok
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=320))
    teacher = copy.deepcopy(model)
    quantize(model, DoubleRoundingConfig(candidate_bits=list(bits), group_size=64), trainable=True)
    ds = pack_blocks(tok, [TEXT] * 4, 32)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=max_steps, per_device_train_batch_size=2,
                             learning_rate=1e-3, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True)
    mbc = MultiBitConfig(kd=kd, scale_lr=1e-3, **mb)
    return MultiBitTrainer(model=model, args=args, multibit=mbc, teacher=teacher, train_dataset=ds, processing_class=tok,
                           data_collator=default_data_collator)


@pytest.mark.parametrize("step_per_bit", [True, False])
def test_joint_step_trains_every_bit(tiny_tok, tmp_path, step_per_bit):
    tr = _setup(tiny_tok, tmp_path, step_per_bit=step_per_bit)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    calls = []
    tr.teacher.register_forward_hook(lambda *a: calls.append(1))
    tr.train()
    logs = [e for e in tr.state.log_history if "loss" in e]
    assert len(logs) == 2 and all({"loss_w8", "loss_w4", "loss_w2"} <= set(e) for e in logs)
    assert len(calls) == 2  # teacher logits: once per batch, shared by all bit-widths
    changed = [n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.endswith("weight_scale") for n in changed) and any(n.endswith("proj.weight") for n in changed)
    assert get_bits(tr.model) == 8


def test_step_per_bit_steps_once_per_bit_with_alrs_lr(tiny_tok, tmp_path):
    tr = _setup(tiny_tok, tmp_path, max_steps=1, step_per_bit=True)
    tr.create_optimizer_and_scheduler(num_training_steps=1)
    seen = []
    inner = tr.optimizer.step

    def spy(*a, **k):
        seen.append([g["lr"] for g in tr.optimizer.param_groups if g.get("name") == SCALE_GROUP][0])
        return inner(*a, **k)

    tr.optimizer.step = spy
    batch = {k: torch.tensor(v) for k, v in tr.train_dataset[:2].items()}
    tr.training_step(tr.model, batch)
    assert seen == pytest.approx([1e-3 * alrs_multiplier(8, b) for b in (8, 4, 2)])
    assert all(p.grad is None for p in tr.model.parameters())  # the Trainer loop's own step then does nothing


@pytest.mark.parametrize("alrs", [True, False])
def test_accumulate_scales_each_bits_scale_gradient(tiny_tok, tmp_path, alrs):
    def scale_grad(**mb):
        tr = _setup(tiny_tok, tmp_path, bits=(8, 4), **mb)
        tr.training_step(tr.model, {k: torch.tensor(v) for k, v in tr.train_dataset[:2].items()})
        return next(iter(switchable_layers(tr.model).values())).weight_scale.grad.clone()

    g8 = scale_grad(alrs=False, bit_weights={8: 1.0, 4: 0.0})
    g4 = scale_grad(alrs=False, bit_weights={8: 0.0, 4: 1.0})
    both = scale_grad(alrs=alrs)  # one step over both bit-widths: ALRS scales bit 4's share of the scale gradient
    m4 = alrs_multiplier(8, 4) if alrs else 1.0
    torch.testing.assert_close(both, g8 + m4 * g4)


def test_inplace_and_lm_loss_modes(tiny_tok, tmp_path):
    tr = _setup(tiny_tok, tmp_path, kd="inplace", max_steps=1)
    tr.train()
    tr = _setup(tiny_tok, tmp_path, kd="none", max_steps=1, bit_weights={2: 0.5})
    tr.train()
    assert "loss_w2" in tr.state.log_history[0]


def test_save_reload_switchable(tiny_tok, tmp_path):
    tr = _setup(tiny_tok, tmp_path, max_steps=1)
    tr.train()
    out = tmp_path / "final"
    tr.save_switchable(str(out))
    assert not any(m.trainable for m in switchable_layers(tr.model).values())
    re = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([tr.train_dataset[0]["input_ids"]])
    for b in (8, 4, 2):
        set_bits(tr.model, b)
        set_bits(re, b)
        torch.testing.assert_close(re(ids).logits, tr.model(ids).logits)


def test_bad_input_is_refused_before_training(tiny_tok, tmp_path):
    tok, _ = tiny_tok
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    float_model = LlamaForCausalLM(tiny_llama_config(vocab_size=320))
    with pytest.raises(ValueError, match="no SwitchableLinear"):
        MultiBitTrainer(model=float_model, args=args, multibit=MultiBitConfig(kd="none"))
    q = quantize(LlamaForCausalLM(tiny_llama_config(vocab_size=320)), DoubleRoundingConfig(candidate_bits=[8, 4]),
                 trainable=True)
    with pytest.raises(ValueError, match="candidate bit-widths"):
        MultiBitTrainer(model=q, args=args, multibit=MultiBitConfig(bits=[8, 3], kd="none"))
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        MultiBitTrainer(model=q, args=TrainingArguments(output_dir=str(tmp_path), learning_rate=0.0, report_to=[]),
                        multibit=MultiBitConfig(kd="none"))
    with pytest.raises(ValueError, match="scale_lr"):
        MultiBitTrainer(model=q, args=args, multibit=MultiBitConfig(kd="none", scale_lr=-1.0))
    with pytest.raises(ValueError, match="teacher"):
        MultiBitTrainer(model=q, args=args, multibit=MultiBitConfig())
    with pytest.raises(ValueError, match="fused must be one of"):
        MultiBitTrainer(model=q, args=args, multibit=MultiBitConfig(kd="none", fused="cuda"))
    with pytest.raises(ValueError, match="empty"):
        MultiBitTrainer(model=q, args=args, multibit=MultiBitConfig(kd="none"), train_dataset=[])
    with pytest.raises(ValueError, match="too short"):
        pack_blocks(tok, ["tiny"], 256)


def test_loss_norm_runs(tiny_tok, tmp_path):
    tr = _setup(tiny_tok, tmp_path, max_steps=1, loss_norm=True)
    tr.train()
    assert set(tr._loss_ema) == {8, 4, 2}


# ---- HASB supernet training ---------------------------------------------------------------------------------------
def _traces(model, hot="model.layers.0.self_attn.q_proj"):
    return {n: (10.0 if n == hot else 0.1) for n in switchable_layers(model)}


def _record_maps(tr, raw=None):
    maps = []

    def record(module, args):
        bits = get_bits(module)  # an int when every layer agrees, else {layer: bits}
        maps.append(set(bits.values()) if isinstance(bits, dict) else {bits})
        if raw is not None:
            raw.append(bits)

    tr.model.register_forward_pre_hook(record)
    return maps


def test_hasb_resamples_layers_within_the_joint_step(tiny_tok, tmp_path):
    probe = _setup(tiny_tok, tmp_path, hasb=False)
    traces = _traces(probe.model)
    runs, raws = [], []
    for _ in range(2):  # same seed: the same maps (they depend only on seed, step and bit index)
        tr = _setup(tiny_tok, tmp_path, hasb=True, hasb_traces=traces, hasb_sigma_min=1.0, hasb_sigma_max=1.0)
        raws.append([])
        maps = _record_maps(tr, raws[-1])
        tr.train()
        runs.append(maps)
    assert raws[0] == raws[1] and len(runs[0]) == 2 * 3  # 2 steps x 3 bit-widths
    assert all(m <= {8, 4, 2} for m in runs[0])
    assert any(len(m) > 1 for m in runs[0])  # sigma = 1: layers drawn independently
    assert "hasb_mean_bits" in tr.state.log_history[0]
    assert tr.model.config.quantization_config.hessian_traces == traces  # recorded for the saved checkpoint
    assert get_bits(tr.model) == 8


def test_hasb_sigma_zero_is_the_plain_joint_step(tiny_tok, tmp_path):
    probe = _setup(tiny_tok, tmp_path)
    tr = _setup(tiny_tok, tmp_path, hasb=True, hasb_traces=_traces(probe.model), hasb_sigma_min=0.0,
                hasb_sigma_max=0.0)
    maps = _record_maps(tr)
    tr.train()
    assert maps == [{8}, {4}, {2}] * 2


def test_hasb_traces_from_file_and_bad_traces(tiny_tok, tmp_path):
    probe = _setup(tiny_tok, tmp_path)
    path = tmp_path / "hasb.json"
    path.write_text(json.dumps({"traces": _traces(probe.model)}))
    tr = _setup(tiny_tok, tmp_path, hasb=True, hasb_traces=str(path))
    assert tr.hasb.sensitive["model.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match="needs Hessian traces"):
        _setup(tiny_tok, tmp_path, hasb=True)
    with pytest.raises(ValueError, match="unknown layer"):
        _setup(tiny_tok, tmp_path, hasb=True, hasb_traces={**_traces(probe.model), "nope.q_proj": 1.0})
    with pytest.raises(ValueError, match="cannot read HASB traces"):
        _setup(tiny_tok, tmp_path, hasb=True, hasb_traces=str(tmp_path / "missing.json"))


def test_same_seed_gives_identical_losses_and_checkpoint(tiny_tok, tmp_path):
    runs = []
    for i in range(2):
        tr = _setup(tiny_tok, tmp_path / str(i), max_steps=2)
        tr.train()
        tr.save_switchable(str(tmp_path / f"ck{i}"))
        runs.append([{k: v for k, v in e.items() if k.startswith("loss")} for e in tr.state.log_history if "loss" in e])
    assert runs[0] == runs[1] and len(runs[0]) == 2  # exact: same seed, same CPU kernels
    assert (tmp_path / "ck0/model.safetensors").read_bytes() == (tmp_path / "ck1/model.safetensors").read_bytes()


def test_per_bit_scale_state_keeps_one_adam_state_per_precision(tiny_tok, tmp_path):
    tr = _setup(tiny_tok, tmp_path, max_steps=2, step_per_bit=True, per_bit_scale_state=True)
    tr.train()
    scale = next(iter(switchable_layers(tr.model).values())).weight_scale
    states = {b: tr._scale_state[b][scale] for b in (8, 4, 2)}
    assert all(int(st["step"]) == 2 for st in states.values())  # each precision stepped its own moments twice
    assert not torch.equal(states[8]["exp_avg"], states[2]["exp_avg"])
    weight = next(iter(switchable_layers(tr.model).values())).weight
    assert int(tr.optimizer.state[weight]["step"]) == 6  # the weights share one state over 2 steps x 3 bit-widths
    with pytest.raises(ValueError, match="per_bit_scale_state needs step_per_bit=True"):
        _setup(tiny_tok, tmp_path, per_bit_scale_state=True)


def test_step_per_bit_logs_the_real_gradient_norm(tiny_tok, tmp_path):
    """The Trainer's own clip runs after the per-width steps zeroed every gradient (it logs 0); the norms each width's
    step saw are logged instead, with their mean as ``grad_norm``."""
    tr = _setup(tiny_tok, tmp_path, step_per_bit=True)
    tr.train()
    logs = [e for e in tr.state.log_history if "loss" in e]
    for e in logs:
        per_width = [e[f"grad_norm_w{b}"] for b in (8, 4, 2)]
        assert all(v > 0 for v in per_width)
        assert e["grad_norm"] == pytest.approx(sum(per_width) / 3, rel=1e-4)



@pytest.mark.parametrize("step_per_bit", [True, False])
def test_train_embeddings_false_keeps_the_tied_embedding_and_head(tiny_tok, tmp_path, step_per_bit):
    tr = _setup(tiny_tok, tmp_path, step_per_bit=step_per_bit, train_embeddings=False)
    emb = tr.model.get_input_embeddings().weight
    assert tr.model.get_output_embeddings().weight is emb  # tied: one tensor for both
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    assert torch.equal(emb, before["model.embed_tokens.weight"]) and emb.grad is None
    changed = {n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.endswith("proj.weight") for n in changed) and any(n.endswith("weight_scale") for n in changed)
    assert any(n.endswith("norm.weight") for n in changed)  # only the embeddings are frozen


def test_train_embeddings_false_still_trains_a_quantized_head(tiny_tok, tmp_path):
    tok, _ = tiny_tok
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=320, tie_word_embeddings=False))
    teacher = copy.deepcopy(model)
    quantize(model, DoubleRoundingConfig(candidate_bits=[8, 4], group_size=64), trainable=True)
    model.lm_head = SwitchableLinear.from_linear(model.lm_head, candidate_bits=(8, 4), trainable=True)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True)
    tr = MultiBitTrainer(model=model, args=args, multibit=MultiBitConfig(scale_lr=1e-3, train_embeddings=False),
                         teacher=teacher, train_dataset=pack_blocks(tok, [TEXT] * 4, 32),
                         data_collator=default_data_collator)
    head = tr.model.get_output_embeddings()
    assert isinstance(head, SwitchableLinear) and head.weight.requires_grad
    assert not tr.model.get_input_embeddings().weight.requires_grad


def test_step_per_bit_clip_keeps_the_bit_weights(tiny_tok, tmp_path):
    """Each width's gradient is clipped to ``max_grad_norm x its bit weight``: one bound for all would undo the
    weights whenever the gradients exceed it (with SGD the update is then exactly lr x bound)."""
    tok, _ = tiny_tok
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=320))
    teacher = copy.deepcopy(model)
    quantize(model, DoubleRoundingConfig(candidate_bits=[8, 4, 2], group_size=64), trainable=True)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, optim="sgd",
                             max_grad_norm=1e-4)
    weights = {8: 1.0, 4: 3.0, 2: 0.5}
    tr = MultiBitTrainer(model=model, args=args, teacher=teacher, train_dataset=pack_blocks(tok, [TEXT] * 4, 32),
                         multibit=MultiBitConfig(step_per_bit=True, alrs=False, bit_weights=weights),
                         data_collator=default_data_collator)
    tr.create_optimizer_and_scheduler(num_training_steps=1)
    seen, inner = [], tr.optimizer.step

    def spy(*a, **k):
        grads = [p.grad for p in tr.model.parameters() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return inner(*a, **k)

    tr.optimizer.step = spy
    tr.training_step(tr.model, {k: torch.tensor(v) for k, v in tr.train_dataset[:2].items()})
    assert seen == pytest.approx([1e-4 * weights[b] for b in (8, 4, 2)], rel=1e-3)


def test_bit_every_trains_a_width_on_every_pth_step_staggered(tiny_tok, tmp_path):
    tr = _setup(tiny_tok, tmp_path, max_steps=4, step_per_bit=True, bit_every={8: 2, 4: 2})
    seen = []
    inner = tr._step_for_bit
    tr._step_for_bit = lambda model, b: (seen.append((tr.state.global_step, b)), inner(model, b))
    tr.train()
    # 8 (position 0) on even steps, 4 (position 1) on odd ones, 2 on every step
    assert seen == [(0, 8), (0, 2), (1, 4), (1, 2), (2, 8), (2, 2), (3, 4), (3, 2)]
    logs = [e for e in tr.state.log_history if "loss" in e]
    assert ["loss_w8" in e for e in logs] == [True, False, True, False]
    assert all("loss_w2" in e for e in logs)


def test_bit_every_is_checked_before_training(tiny_tok, tmp_path):
    for every, match in (({3: 2}, "not trained"), ({8: 0}, "whole number"), ({8: 1.5}, "whole number"),
                         ({8: 2, 4: 2, 2: 3}, "no trained width running every step")):
        with pytest.raises(ValueError, match=match):
            _setup(tiny_tok, tmp_path, bit_every=every)
    with pytest.raises(ValueError, match="run every step"):
        _setup(tiny_tok, tmp_path, kd="inplace", bit_every={8: 2})
