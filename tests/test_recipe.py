"""QAT recipes: YAML schema and validation, data loading and packing, the shipped recipes, a recipe with HASB."""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainingArguments

from abs_llm import switchable_layers
from abs_llm.recipe import build_trainer, load_recipe
from abs_llm.training import MultiBitConfig
from tests.conftest import write_recipe

ROOT = Path(__file__).resolve().parents[1]


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


def test_shipped_recipes_validate(tmp_path):
    for name in ("qat_smollm2_cpu.yaml", "qat_smollm2_h100.yaml", "qat_smollm2_gpu.yaml"):
        r = load_recipe(ROOT / "recipes" / name, max_steps=1, output_dir=str(tmp_path / name))
        MultiBitConfig(**r["multibit"])
        TrainingArguments(output_dir=r["output_dir"], **r["train"])


@pytest.mark.parametrize("max_steps, decay", [(100, 30), (200, 60), (10, 3), (2, 1), (1, 1)])
def test_a_decay_fraction_follows_max_steps(tmp_path, max_steps, decay):
    """The CPU recipe decays over its last 30% of steps whatever --max-steps says: the scheduler keeps the LR flat
    up to the first decay step, lowers it at every step after, and reaches 0 when the run ends."""
    from transformers import get_scheduler

    r = load_recipe(ROOT / "recipes" / "qat_smollm2_cpu.yaml", max_steps=max_steps, output_dir=str(tmp_path))
    assert r["train"]["lr_scheduler_kwargs"]["num_decay_steps"] == decay
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler("warmup_stable_decay", opt, num_warmup_steps=0, num_training_steps=max_steps,
                          scheduler_specific_kwargs=r["train"]["lr_scheduler_kwargs"])
    lrs = []  # lrs[i]: the LR of step i
    for _ in range(max_steps):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    stable = max_steps - decay
    assert lrs[:stable + 1] == [1.0] * (stable + 1)
    assert all(a > b for a, b in zip(lrs[stable:], lrs[stable + 1:]))
    assert sched.get_last_lr()[0] == 0.0


def test_a_decay_longer_than_the_run_is_refused(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train: {lr_scheduler_type: warmup_stable_decay, lr_scheduler_kwargs: {num_decay_steps: 30}}\n")
    assert load_recipe(p, max_steps=30)["train"]["lr_scheduler_kwargs"] == {"num_decay_steps": 30}
    with pytest.raises(ValueError, match=r"num_decay_steps=30 does not fit max_steps=20 .*fraction of max_steps"):
        load_recipe(p, max_steps=20)
    p.write_text("train: {lr_scheduler_type: warmup_stable_decay, lr_scheduler_kwargs: {num_decay_steps: 2.5}}\n")
    with pytest.raises(ValueError, match="whole number of steps"):
        load_recipe(p, max_steps=20)


def test_recipe_with_hasb_estimates_traces(tiny_lm_dir, tmp_path):
    path = write_recipe(tmp_path, tiny_lm_dir)
    r = yaml.safe_load(path.read_text())
    r["multibit"]["hasb"] = True
    path.write_text(yaml.safe_dump(r))
    tr = build_trainer(load_recipe(path, 1, str(tmp_path / "o")))
    traces = tr.model.config.quantization_config.hessian_traces
    assert set(traces) == set(switchable_layers(tr.model)) and all(map(lambda t: t == t, traces.values()))
    tr.train()
    assert "hasb_mean_bits" in tr.state.log_history[0]


def test_recipe_runs_without_the_datasets_package(tiny_lm_dir, tmp_path):
    """A GPU box may have torch + transformers + accelerate only: local files and packing need no `datasets`."""
    import os
    import subprocess
    import sys

    path = write_recipe(tmp_path, tiny_lm_dir, max_steps=1, save_strategy="no")
    code = ("import sys; sys.modules['datasets'] = None\n"  # import datasets -> ImportError; transformers sees none
            "from abs_llm.recipe import train\n"
            f"tr = train({str(path)!r}, output_dir={str(tmp_path / 'o')!r})\n"
            "assert 'datasets' not in type(tr.train_dataset).__module__\n"
            "print('steps', tr.state.global_step)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "steps 1" in res.stdout, res.stderr[-3000:]


def test_hub_dataset_without_the_datasets_package_is_refused(monkeypatch):
    import sys

    from abs_llm.recipe import load_texts

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match="needs the `datasets` package"):
        load_texts({"source": "some-user/some-hub-dataset"})


def test_lee_plus_wiki_trains_on_as_much_of_each_and_never_on_validation_text():
    from abs_llm.data import default_corpus
    from abs_llm.recipe import load_texts

    texts = load_texts({"source": "lee+wiki", "split": "train_fit"})
    lee_fit, lee_val = set(default_corpus("train_fit")), set(default_corpus("validation"))
    lee = [t for t in texts if t in lee_fit]
    wiki = [t for t in texts if t not in lee_fit]
    assert lee == default_corpus("train_fit")  # every Lee train document, in order
    assert not lee_val & set(texts)
    wiki_val = "\n".join(default_corpus("validation", name="wiki"))
    assert wiki and all(w not in wiki_val for w in wiki)
    share = sum(map(len, lee)) / sum(map(len, texts))
    assert 0.4 < share < 0.6, share
    with pytest.raises(ValueError, match="use split: train_fit"):
        load_texts({"source": "lee+wiki", "docs": [0, 225]})


def test_local_json_and_text_files(tmp_path):
    from abs_llm.recipe import load_texts

    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two", "id": 2}\n')
    (tmp_path / "b.json").write_text('[{"body": "x"}, {"body": "y"}]')
    (tmp_path / "c.txt").write_text("first line\n\nsecond line\n")
    assert load_texts({"source": str(tmp_path / "a.jsonl")}) == ["one", "two"]
    assert load_texts({"source": str(tmp_path / "b.json"), "text_field": "body"}) == ["x", "y"]
    assert load_texts({"source": str(tmp_path / "c.txt")}) == ["first line", "second line"]
    with pytest.raises(ValueError, match=r"no column 'text'; columns \['body'\]"):
        load_texts({"source": str(tmp_path / "b.json")})
    (tmp_path / "d.json").write_text('{"text": "x"}\n{broken')
    with pytest.raises(ValueError, match="cannot read dataset"):
        load_texts({"source": str(tmp_path / "d.json")})


def test_recipe_numbers_without_a_dot_and_init_checkpoint(tiny_lm_dir, qckpt, tmp_path):
    """PyYAML reads ``3e-5`` as a string: the recipe means a number. ``init`` starts the student from a switchable
    checkpoint (its master becomes the latent weights), the float ``model`` stays the teacher."""
    from abs_llm.recipe import load_init

    path = tmp_path / "r.yaml"
    path.write_text("train: {learning_rate: 3e-5}\nmultibit: {scale_lr: 1e-4}\n")
    r = load_recipe(path)
    assert r["train"]["learning_rate"] == 3e-5 and r["multibit"]["scale_lr"] == 1e-4
    model = load_init(qckpt, {})
    assert set(model.config.quantization_config.candidate_bits) == {8, 4, 2}
    with pytest.raises(ValueError, match="contradicts the init checkpoint"):
        load_init(qckpt, {"candidate_bits": [8, 6, 4, 3, 2]})
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        load_init(tmp_path, {})


@pytest.mark.parametrize("content,root_cause", [(b'{"text": "a"}\n{"text": \n', "JSONDecodeError"),
                                                (bytes(range(128, 256)) * 8, "UnicodeDecodeError")])
def test_unreadable_dataset_names_the_file_and_the_root_cause(tmp_path, content, root_cause):
    """The error names the file and the underlying parse error, and keeps that error as its cause (local files are
    read without `datasets`, whose own message was only "An error occurred while generating the dataset")."""
    from abs_llm.recipe import load_texts
    from tests._report import RELIABILITY

    f = tmp_path / ("d.jsonl" if content.startswith(b"{") else "d.txt")
    f.write_bytes(content)
    with pytest.raises(ValueError, match=rf"cannot read dataset {f} as .*\({root_cause}: ") as e:
        load_texts({"source": str(f)})
    assert type(e.value.__cause__).__name__ == root_cause
    RELIABILITY["bad inputs tried"] += 1


@pytest.mark.parametrize("name", ["qat_smollm2_gpu.yaml", "qat_smollm2_cpu.yaml"])
def test_shipped_recipe_runs_in_tiny_form(tiny_lm_dir, tmp_path, name):
    """The shipped recipes as they are (GPTQ master first, step per bit, ALRS, KD, the CPU one's compiled fake
    quantization, the GPU one's cosine schedule and data workers), with only the model, data and sizes shrunk: a
    session finds no unknown key or broken knob."""
    import yaml

    from abs_llm.recipe import train

    r = yaml.safe_load((ROOT / "recipes" / name).read_text())
    tiny = yaml.safe_load(write_recipe(tmp_path, tiny_lm_dir).read_text())
    r.update(model=tiny["model"], quant=tiny["quant"])
    assert r["init"]["method"] == "gptq"
    r["init"].update(calibration=tiny["data"]["source"], calib_tokens=64, seq_len=16)
    r["data"] = {**r["data"], "source": tiny["data"]["source"], "docs": None, "block_size": 32}
    r["multibit"]["bits"] = tiny["quant"]["candidate_bits"]
    for key in ("bit_weights", "bit_every"):  # the shipped settings, restricted to the tiny model's widths
        if r["multibit"].get(key):
            r["multibit"][key] = {b: v for b, v in r["multibit"][key].items() if b in r["multibit"]["bits"]}
    r["train"].update(max_steps=2, per_device_train_batch_size=2, warmup_steps=1, logging_steps=1, save_steps=2,
                      use_cpu=True)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(r))
    tr = train(path, output_dir=str(tmp_path / "out"), evaluate=False)
    # GPU: eager, measured faster on an H200; CPU: the compiled pass (1.4x cheaper bf16 steps, BENCHMARKS stop 27)
    assert tr.state.global_step == 2 and tr.mb.fused == ("compile" if "cpu" in name else False)
    logs = [e for e in tr.state.log_history if "loss_w2" in e]
    assert len(logs) == 2 and all(e["grad_norm_w2"] > 0 and e["grad_norm"] > 0 for e in logs)


def test_loss_plot_without_matplotlib_is_skipped(tmp_path, monkeypatch, caplog):
    import sys

    from abs_llm.recipe import plot_losses

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    plot_losses([{"step": 1, "loss_w8": 0.1}], tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists() and "matplotlib is not installed" in caplog.text


def test_recipe_reads_the_wikipedia_sample():
    """`data: {source: wiki}` trains on the embedded Wikipedia articles, split by article like default_corpus."""
    from abs_llm.data import default_corpus
    from abs_llm.recipe import load_texts

    texts = load_texts({"source": "wiki", "split": "validation"})
    assert texts == default_corpus("validation", name="wiki") and len(texts) > 0


def test_recipe_init_gptq_starts_from_the_gptq_master(tiny_lm_dir, tmp_path):
    """``init: {method: gptq, ...}`` makes the GPTQ master of the float model first: the student's latent weights are
    exactly the master that ``abs_llm.quantize(method="gptq")`` chooses on the same text, not plain rounding's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import abs_llm
    from abs_llm import DoubleRoundingConfig

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"document {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(8)))
    init = {"method": "gptq", "calibration": str(calib), "calib_tokens": 96, "seq_len": 32, "batch_size": 1}
    path = write_recipe(tmp_path, tiny_lm_dir)
    r = yaml.safe_load(path.read_text())
    r["init"] = init
    path.write_text(yaml.safe_dump(r))
    tr = build_trainer(load_recipe(path, 1, str(tmp_path / "o")))

    ref = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    rtn = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)
    cfg = DoubleRoundingConfig(**r["quant"])
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    abs_llm.quantize(ref, cfg, trainable=True, method="gptq", tokenizer=tok, calibration=[calib.read_text()],
                     gptq_options={k: v for k, v in init.items() if k not in ("method", "calibration")})
    abs_llm.quantize(rtn, cfg, trainable=True)
    got, want, plain = (switchable_layers(m) for m in (tr.model, ref, rtn))
    assert set(got) == set(want)
    assert all(torch.equal(got[n].weight, want[n].weight) for n in got)
    assert any(not torch.equal(got[n].weight, plain[n].weight) for n in got)
    tr.train()  # and it trains from there

    # resuming replaces every latent weight and scale from the Trainer checkpoint: GPTQ is not run again
    import abs_llm.recipe as recipe_mod

    out = tmp_path / "run"
    recipe_mod.train(path, max_steps=2, output_dir=str(out), evaluate=False)
    calls = []
    real = recipe_mod.gptq_init
    recipe_mod.gptq_init = lambda *a: calls.append(a) or real(*a)
    try:
        tr2 = recipe_mod.train(path, max_steps=3, output_dir=str(out), evaluate=False)
    finally:
        recipe_mod.gptq_init = real
    assert not calls and tr2.state.global_step == 3

    for bad, msg in (({"method": "gptq", "calib_tokenz": 5}, "unknown gptq option"),
                     ({"method": "awq"}, "init must be a checkpoint path or a mapping with method: gptq"),
                     (3, "init must be a checkpoint path")):
        r["init"] = bad
        path.write_text(yaml.safe_dump(r))
        with pytest.raises(ValueError, match=msg):
            load_recipe(path)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_follows_the_cpu(tmp_path, monkeypatch, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    p = tmp_path / "r.yaml"
    p.write_text("train: {bf16: auto}\n")
    t = load_recipe(p)["train"]
    assert t["bf16"] is native and t.get("use_cpu", False) is native
    TrainingArguments(output_dir=str(tmp_path / "o"), **t)  # accepted as resolved


def test_bf16_autocast_recipe_trains_on_the_cpu(tiny_lm_dir, tmp_path):
    """bf16 autocast on the CPU: matmuls in bf16, latent weights, scales and the fake quantization stay float32."""
    from abs_llm.recipe import train

    tr = train(write_recipe(tmp_path, tiny_lm_dir, bf16=True), output_dir=str(tmp_path / "out"), evaluate=False)
    assert tr.args.bf16 and tr.state.global_step == 2
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    logs = [e for e in tr.state.log_history if "loss_w2" in e]
    assert len(logs) == 2 and all(0 < e[f"loss_w{b}"] < 100 for e in logs for b in (8, 4, 2))


def test_bf16_auto_is_fp32_under_fsdp_on_gpus(tmp_path, monkeypatch):
    """A bf16 FSDP policy all-gathers the latent weights in bf16, which rounds them before the fake quantization."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    p = tmp_path / "r.yaml"
    p.write_text("train: {bf16: auto}\n")
    assert load_recipe(p)["train"]["bf16"] is True
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert load_recipe(p)["train"]["bf16"] is False
