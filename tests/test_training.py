"""MultiBitTrainer, recipes and the train CLI on a tiny random Llama with a tiny in-test BPE tokenizer."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast, TrainingArguments,
                          default_data_collator)

from abs_llm import DoubleRoundingConfig, get_bits, quantize, set_bits, switchable_layers
from abs_llm.core import alrs_multiplier
from abs_llm.recipe import load_recipe, pack_blocks
from abs_llm.training import SCALE_GROUP, MultiBitConfig, MultiBitTrainer

from tests.conftest import tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("The quick brown fox jumps over the lazy dog. Double rounding derives low bit-widths from an integer master. "
        "Switchable models change precision at run time without retraining. ") * 8


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       special_tokens=["<eos>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return tok, path


@pytest.fixture(scope="module")
def tiny_lm_dir(tiny_tok, tmp_path_factory):
    """Float tiny Llama + tokenizer saved together (what a recipe's ``model`` points at)."""
    tok, _ = tiny_tok
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=320))
    path = tmp_path_factory.mktemp("lm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


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
    with pytest.raises(ValueError, match="empty"):
        MultiBitTrainer(model=q, args=args, multibit=MultiBitConfig(kd="none"), train_dataset=[])
    with pytest.raises(ValueError, match="too short"):
        pack_blocks(tok, ["tiny"], 256)


def test_recipe_validation(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("modle: x\n")
    with pytest.raises(ValueError, match="unknown top level keys"):
        load_recipe(bad)
    bad.write_text("train: {learning_rate: -1}\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_recipe(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("train: {max_steps: 5}\n")
    r = load_recipe(ok, max_steps=3, output_dir=str(tmp_path / "o"))
    assert r["train"]["max_steps"] == 3 and r["output_dir"] == str(tmp_path / "o")


def _recipe(tmp_path, model_dir, **train):
    data = tmp_path / "data.txt"
    data.write_text("\n".join([TEXT] * 6))
    t = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "save_steps": 2,
         "use_cpu": True, **train}
    recipe = {"model": str(model_dir), "data": {"source": str(data), "block_size": 32},
              "quant": {"candidate_bits": [8, 4, 2], "group_size": None},
              "multibit": {"scale_lr": 1e-3, "kd": "teacher"}, "train": t}
    path = tmp_path / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_train_and_resume_roundtrips_latent_weights(tiny_lm_dir, tmp_path):
    from abs_llm.cli import main
    from abs_llm.recipe import build_trainer

    recipe = _recipe(tmp_path, tiny_lm_dir)
    out = tmp_path / "out"
    assert main(["train", str(recipe), "--max-steps", "2", "--output-dir", str(out)]) == 0
    ckpt = out / "checkpoint-2"
    assert (ckpt / "ABS_LLM_TRAINING_STATE.json").exists() and (out / "loss_per_bits.png").exists()
    re = AutoModelForCausalLM.from_pretrained(out)  # the final switchable checkpoint
    assert get_bits(re) == 8 and set(next(iter(switchable_layers(re).values())).candidate_bits) == {8, 4, 2}
    # the Trainer checkpoint holds the latent float weights and loads back into a training-mode model
    tr = build_trainer(load_recipe(recipe, 3, str(tmp_path / "out2")))
    tr._load_from_checkpoint(str(ckpt))
    from safetensors.torch import load_file

    saved = load_file(ckpt / "model.safetensors")
    name = next(n for n in saved if n.endswith("q_proj.weight"))
    torch.testing.assert_close(tr.model.state_dict()[name], saved[name])
    assert saved[name].dtype == torch.float32
    # resuming an interrupted run continues from the last checkpoint to max_steps
    assert main(["train", str(recipe), "--max-steps", "3", "--output-dir", str(out)]) == 0
    hist = json.loads((out / "log_history.json").read_text())
    assert [e["step"] for e in hist if "loss" in e] == [1, 2, 3]  # steps 1-2 restored from checkpoint-2, 3 new


def test_accelerate_launch_two_cpu_processes(tiny_lm_dir, tmp_path):
    recipe = _recipe(tmp_path, tiny_lm_dir, per_device_train_batch_size=1)
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate_cpu.yaml"),
           "--num_processes", "2", "-m", "abs_llm.cli", "train", str(recipe), "--output-dir", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "world_size=2" in res.stderr + res.stdout
    re = AutoModelForCausalLM.from_pretrained(out)
    set_bits(re, 2)
    assert torch.isfinite(re(torch.tensor([[1, 2, 3]])).logits).all()


def test_loss_norm_runs_and_shipped_recipes_validate(tiny_tok, tmp_path):
    tr = _setup(tiny_tok, tmp_path, max_steps=1, loss_norm=True)
    tr.train()
    assert set(tr._loss_ema) == {8, 4, 2}
    for name in ("qat_smollm2_cpu.yaml", "qat_smollm2_h100.yaml"):
        r = load_recipe(ROOT / "recipes" / name, max_steps=1, output_dir=str(tmp_path / name))
        MultiBitConfig(**r["multibit"])
        TrainingArguments(output_dir=r["output_dir"], **r["train"])


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


def test_recipe_with_hasb_estimates_traces(tiny_lm_dir, tmp_path):
    import yaml

    from abs_llm.recipe import build_trainer

    path = _recipe(tmp_path, tiny_lm_dir)
    r = yaml.safe_load(path.read_text())
    r["multibit"]["hasb"] = True
    path.write_text(yaml.safe_dump(r))
    tr = build_trainer(load_recipe(path, 1, str(tmp_path / "o")))
    traces = tr.model.config.quantization_config.hessian_traces
    assert set(traces) == set(switchable_layers(tr.model)) and all(map(lambda t: t == t, traces.values()))
    tr.train()
    assert "hasb_mean_bits" in tr.state.log_history[0]


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
