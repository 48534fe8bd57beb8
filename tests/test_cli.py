"""The ``abs-llm`` command line, every verb on tiny models: it parses, calls one library function and prints; a
library ``ValueError`` is one line on stderr and exit code 2 (the bad-input catalogue has more refusals)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from abs_llm import get_bits, set_bits, switchable_layers
from abs_llm.cli import main
from abs_llm.lm_eval_tasks import LOCAL_TASK
from tests.conftest import char_tokenizer, varied_verifier, write_recipe

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"bits": 8, "ppl": 12.5, "bytes": 2_000_000}, {"bits": 4, "ppl": 14.25, "bytes": 1_000_000}]


def test_value_error_is_one_line_and_exit_code_2(qckpt, tmp_path, capsys):
    assert main(["eval", str(qckpt), "--bits", "6"]) == 2
    ours = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert ours == ["error: bits=[6] is not a candidate bit-width; allowed [2, 4, 8]"]  # no traceback
    with pytest.raises(SystemExit) as e:  # argparse's own refusals use the same code
        main(["eval", str(qckpt), "--bits", "x"])
    assert e.value.code == 2


def test_quantize_refuses_non_empty_output_before_loading(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("user data")
    assert main(["quantize", "some/model", "--out", str(tmp_path)]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_quantize_and_eval(tiny_llama_dir, tmp_path, capsys):
    from tests.conftest import char_tokenizer

    char_tokenizer().save_pretrained(tiny_llama_dir)
    out = tmp_path / "ckpt"
    assert main(["quantize", str(tiny_llama_dir), "--out", str(out), "--candidate-bits", "8,4", "--group-size",
                 "none"]) == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["candidate_bits"] == [8, 4] and cfg["group_size"] is None and cfg["bits"] == 8
    assert (out / "tokenizer.json").exists()
    capsys.readouterr()
    assert main(["eval", str(out), "--split", "train", "--max-chunks", "1", "--seq-len", "32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["bits"] for r in rows] == [8, 4] and all(r["ppl"] > 1 for r in rows)
    assert main(["eval", str(out), "--bits", "4", "--split", "train", "--max-chunks", "1", "--seq-len", "32"]) == 0
    assert "| 4 |" in capsys.readouterr().out


def test_eval_lm_eval_tasks_with_text_file(qckpt, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n\nDouble rounding derives low bits from a master.")
    rc = main(["eval", str(qckpt), "--bits", "8,4", "--tasks", LOCAL_TASK, "--text-file", str(text), "--limit", "2",
               "--max-length", "64"])
    out = capsys.readouterr().out
    assert rc == 0 and "8-bit | 4-bit" in out and "bits_per_byte" in out


def test_eval_bad_inputs(qckpt, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    assert main(["eval", str(qckpt), "--bits", "8", "--tasks", "abs_local_pp"]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
    assert main(["eval", str(qckpt), "--bits", "8,3", "--tasks", LOCAL_TASK]) == 2
    assert r"bits=[8, 3] is not a candidate bit-width; allowed [2, 4, 8]" in capsys.readouterr().err
    assert main(["eval", str(qckpt), "--bits", "8", "--tasks", LOCAL_TASK, "--text-file", str(tmp_path / "no")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(qckpt), "--bits", "8", "--limit", "2"]) == 2
    assert "add --tasks abs_local_ppl" in capsys.readouterr().err


def test_export(qckpt, tmp_path, capsys):
    assert main(["export", str(qckpt), "--bits", "4", "--format", "hf-dense", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "model.safetensors").is_file() and "hf-dense" in capsys.readouterr().out
    assert main(["export", str(qckpt), "--bits", "4", "--format", "compressed-tensors", "--out", str(tmp_path / "c")]) == 2
    assert "needs group_size to divide in_features" in capsys.readouterr().err  # 96 = 1.5 x 64
    assert main(["export", str(qckpt), "--bits", "4", "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert "unknown export format" in capsys.readouterr().err
    assert main(["export", str(qckpt), "--bits", "3", "--format", "hf-dense", "--out", str(tmp_path / "o")]) == 2
    assert "not a candidate" in capsys.readouterr().err


def test_push_dry_run_writes_exact_folder(qckpt, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda *a, **k: pytest.fail("uploaded"))
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    out = tmp_path / "upload"
    assert main(["push", str(qckpt), "--repo-id", "me/tiny", "--dry-run", "--out", str(out),
                 "--results", str(tmp_path / "rows.json")]) == 0
    assert "nothing uploaded" in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert {p.name for p in qckpt.iterdir()} | {"README.md", "ppl.png"} == files
    assert (out / "model.safetensors").read_bytes() == (qckpt / "model.safetensors").read_bytes()
    assert "modeling_abs_llm.py" in files  # the trust_remote_code shim travels with the upload


def test_push_bad_inputs(qckpt, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda *a, **k: pytest.fail("network"))
    assert main(["push", str(qckpt), "--repo-id", "me/tiny"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert main(["push", str(qckpt), "--repo-id", "me/tiny", "--dry-run"]) == 2
    assert "--out" in capsys.readouterr().err
    (tmp_path / "fp").mkdir()
    (tmp_path / "fp" / "config.json").write_text("{}")
    assert main(["push", str(tmp_path / "fp"), "--repo-id", "me/x", "--dry-run", "--out", str(tmp_path / "u")]) == 2
    assert "not a switchable" in capsys.readouterr().err


def test_search_and_sweep(qckpt, tmp_path, monkeypatch, capsys):
    import abs_llm.data

    # calibration and sweep texts from the embedded corpus would need its tokenizer vocabulary: any text will do
    monkeypatch.setattr(abs_llm.data, "default_corpus", lambda split="train": ["The quick brown fox. " * 30] * 8)
    out = tmp_path / "s"
    assert main(["search", str(qckpt), "--avg-bits", "3", "--calib-docs", "5", "--calib-seq-len", "16",
                 "--n-samples", "2", "--out", str(out), "--sweep", "--sweep-bits", "3,5", "--max-chunks", "1"]) == 0
    report = json.loads((out / "hasb.json").read_text())
    assert report["avg_bits"] <= 3 and len(report["layers"]) == len(report["traces"]) == 14
    back = AutoModelForCausalLM.from_pretrained(out)
    assert get_bits(back) == {r["name"]: r["bits"] for r in report["layers"]} or len({r["bits"] for r in report["layers"]}) == 1
    assert back.config.quantization_config.hessian_traces == pytest.approx(report["traces"])
    table = json.loads((out / "sweep.json").read_text())
    assert [r["avg_bits_budget"] for r in table["mixed"]] == [3, 5] and len(table["uniform"]) == 3
    assert (out / "sweep.png").stat().st_size > 1000
    capsys.readouterr()  # a second search reuses the traces stored in the checkpoint, and bad budgets are refused
    assert main(["search", str(out), "--avg-bits", "9", "--out", str(tmp_path / "t")]) == 2
    assert "feasible range [2, 8]" in capsys.readouterr().err
    assert main(["search", str(qckpt), "--avg-bits", "3", "--out", str(out)]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["search", str(qckpt), "--out", str(tmp_path / "nb")]) == 2
    assert "give --avg-bits or --size-bytes" in capsys.readouterr().err
    assert report["calibration"]["method"] == "fisher" and min(report["traces"].values()) >= 0  # the default
    hutch = tmp_path / "h"
    assert main(["search", str(qckpt), "--avg-bits", "4", "--calib-docs", "5", "--calib-seq-len", "16", "--method",
                 "hutchinson", "--n-samples", "2", "--out", str(hutch)]) == 0
    assert json.loads((hutch / "hasb.json").read_text())["calibration"]["method"] == "hutchinson"


def test_generate_with_draft(tmp_path, capsys):
    model = varied_verifier()
    names = list(switchable_layers(model))
    model.save_pretrained(tmp_path / "v")
    char_tokenizer().save_pretrained(tmp_path / "v")
    set_bits(model, 4)
    set_bits(model, {names[0]: 2})
    model.save_pretrained(tmp_path / "map")  # a per-layer map, as `abs-llm search --out` writes it
    argv = ["generate", str(tmp_path / "v"), "--prompt", "the cat sat", "--dtype", "float32", "--max-new-tokens", "24"]
    assert main(argv + ["--draft-bits", str(tmp_path / "map"), "--num-assistant-tokens", "3", "--compare",
                        "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["identical"] and r["new_tokens"] == r["rounds"] + r["accepted"] and r["drafted"] > 0
    assert 0 <= r["acceptance"] <= 1 and r["speedup"] > 0
    assert main(argv + ["--draft-bits", "4"]) == 0
    out, err = capsys.readouterr()
    assert "tokens/s" in err and "acceptance" in err and out.strip()
    assert main(argv + ["--draft-bits", "5"]) == 2
    err = capsys.readouterr().err
    assert "error: draft bits=5" in err and "is not a candidate bit-width" in err
    assert main(["generate", str(tmp_path / "map" / "nope"), "--prompt", "x"]) == 2


def test_train_and_resume_roundtrips_latent_weights(tiny_lm_dir, tmp_path):
    from safetensors.torch import load_file

    from abs_llm.recipe import build_trainer, load_recipe

    recipe = write_recipe(tmp_path, tiny_lm_dir)
    out = tmp_path / "out"
    assert main(["train", str(recipe), "--max-steps", "2", "--output-dir", str(out)]) == 0
    ckpt = out / "checkpoint-2"
    assert (ckpt / "ABS_LLM_TRAINING_STATE.json").exists() and (out / "loss_per_bits.png").exists()
    assert [r["bits"] for r in json.loads((out / "eval_results.json").read_text())["ppl"]["rows"]] == [8, 4, 2]
    re = AutoModelForCausalLM.from_pretrained(out)  # the final switchable checkpoint
    assert get_bits(re) == 8 and set(next(iter(switchable_layers(re).values())).candidate_bits) == {8, 4, 2}
    # the Trainer checkpoint holds the latent float weights and loads back into a training-mode model
    tr = build_trainer(load_recipe(recipe, 3, str(tmp_path / "out2")))
    tr._load_from_checkpoint(str(ckpt))
    saved = load_file(ckpt / "model.safetensors")
    name = next(n for n in saved if n.endswith("q_proj.weight"))
    torch.testing.assert_close(tr.model.state_dict()[name], saved[name])
    assert saved[name].dtype == torch.float32
    # resuming an interrupted run continues from the last checkpoint to max_steps
    assert main(["train", str(recipe), "--max-steps", "3", "--output-dir", str(out)]) == 0
    hist = json.loads((out / "log_history.json").read_text())
    assert [e["step"] for e in hist if "loss" in e] == [1, 2, 3]  # steps 1-2 restored from checkpoint-2, 3 new


def test_accelerate_launch_two_cpu_processes(tiny_lm_dir, tmp_path):
    recipe = write_recipe(tmp_path, tiny_lm_dir, per_device_train_batch_size=1)
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


# ---- quantize --method gptq (issue 16) --------------------------------------------------------------------------
def test_gptq_flags_become_quantize_arguments():
    from abs_llm.cli import build_parser
    from abs_llm.cli_args import gptq_kwargs as _gptq_kwargs

    args = build_parser().parse_args(["quantize", "--out", "x", "--method", "gptq", "--calibration", "wiki",
                                      "--calib-docs", "2", "--calib-tokens", "1024", "--gptq-bit-weights", "8=0.1,2=0",
                                      "--gptq-no-act-order", "--gptq-asymmetric"])
    assert _gptq_kwargs(args) == {"method": "gptq", "calibration": "wiki", "calib_docs": 2, "gptq_options": {
        "calib_tokens": 1024, "bit_weights": {8: 0.1, 2: 0.0}, "act_order": False, "asymmetric": True}}
    assert _gptq_kwargs(build_parser().parse_args(["quantize", "--out", "x"])) == {}
    lee = _gptq_kwargs(build_parser().parse_args(["quantize", "--out", "x", "--method", "gptq"]))
    assert lee["calibration"] == "lee" and lee["gptq_options"] == {}
    only = _gptq_kwargs(build_parser().parse_args(["quantize", "--out", "x", "--method", "gptq",
                                                   "--gptq-asymmetric", "4,3"]))
    assert only["gptq_options"] == {"asymmetric": [4, 3]}


def test_quantize_gptq_writes_a_checkpoint(tiny_lm_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"document {i} says hello to the tiny model {i}" for i in range(6)))
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_lm_dir), "--out", str(out), "--method", "gptq", "--calibration", str(calib),
                 "--calib-tokens", "64", "--calib-seq-len", "16", "--no-eval"]) == 0
    assert "gptq master INT8" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert switchable_layers(model)


@pytest.mark.parametrize("argv, match", [
    (["--calibration", "lee"], "--calibration only apply to --method gptq"),
    (["--gptq-asymmetric"], "--gptq-asymmetric only apply to --method gptq"),
    (["--method", "gptq", "--calibration", "nosuchfile.txt"], "neither 'lee', 'wiki', 'lee+wiki' nor an existing"),
])
def test_quantize_gptq_bad_flags(argv, match, tmp_path, capsys):
    assert main(["quantize", "--out", str(tmp_path / "o")] + argv) == 2
    assert match in capsys.readouterr().err
