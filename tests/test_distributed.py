"""Multi-process QAT: FSDP2 on 2 CPU processes (gloo) against 1 process, resume under FSDP2, the refusal of a launch
that would train N unconnected copies, and the per-width loss average over processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from abs_llm import DoubleRoundingConfig, quantize, set_bits
from abs_llm.recipe import train
from tests.conftest import write_recipe

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("loss", "loss_w8", "loss_w4", "loss_w2", "grad_norm")


def _recipe(tmp_path, model_dir, name, batch, **multibit):
    # SGD: Adam would turn float-summation differences in near-zero gradients into full-size updates, so runs that
    # sum in a different order (2 processes, DDP or FSDP2, vs 1) would drift apart for a reason unrelated to sharding
    path = write_recipe(tmp_path, model_dir, per_device_train_batch_size=batch, learning_rate=0.05, save_steps=1,
                        optim="sgd", optim_args="momentum=0.9")
    r = yaml.safe_load(path.read_text())
    r["multibit"].update(multibit)
    out = tmp_path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(r))
    return out


def _launch(config, recipe, out, steps, evaluate=False):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes" / config),
           "-m", "abs_llm.cli", "train", str(recipe), "--output-dir", str(out), "--max-steps", str(steps)]
    cmd += [] if evaluate else ["--no-eval"]  # the stored evaluation is checked once (it runs on the gathered copy)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def _logs(out):
    return [{k: e[k] for k in KEYS} for e in json.loads(Path(out, "log_history.json").read_text()) if "loss" in e]


def _assert_same_run(two, one, rtol):
    assert len(two) == len(one)
    for a, b in zip(two, one):
        for k in KEYS:
            assert a[k] == pytest.approx(b[k], rel=rtol, abs=1e-6), (k, two, one)


def _assert_same_checkpoint(a_dir, b_dir, start_dir, atol=1e-3):
    """Same logits at every width; training moved them far more than the tolerance (so a save that lost the training
    would fail)."""
    a, b = AutoModelForCausalLM.from_pretrained(a_dir), AutoModelForCausalLM.from_pretrained(b_dir)
    start = quantize(AutoModelForCausalLM.from_pretrained(start_dir),
                     DoubleRoundingConfig(candidate_bits=[8, 4, 2], group_size=None))
    ids = torch.arange(1, 30)[None]
    for bits in (8, 4, 2):
        for m in (a, b, start):
            set_bits(m, bits)
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=atol)
        assert (start(ids).logits - b(ids).logits).abs().max() > 10 * atol


def test_fsdp2_step_per_bit_matches_one_process_and_resumes(tiny_lm_dir, tmp_path):
    """Step per bit-width (ALRS by switching the scale group's LR) with KD, FSDP2 on 2 processes x batch 1 against
    1 process x batch 2; the second launch resumes from the first one's checkpoint-1 (FSDP model + optimiser state,
    SGD momentum buffers included); the final checkpoint is gathered from the shards."""
    two = _recipe(tmp_path, tiny_lm_dir, "two", 1, step_per_bit=True)
    out = tmp_path / "fsdp"
    log = _launch("accelerate_fsdp_cpu.yaml", two, out, 1)
    assert "FSDP2 on CPU" in log and "world_size=2" in log
    assert (out / "checkpoint-1" / "pytorch_model_fsdp.bin").is_file()  # accelerate's FSDP resume state
    log = _launch("accelerate_fsdp_cpu.yaml", two, out, 2, evaluate=True)
    assert "resuming from" in log and "checkpoint-1" in log
    assert {r["bits"] for r in json.loads((out / "eval_results.json").read_text())["ppl"]["rows"]} == {8, 4, 2}
    ref = tmp_path / "one"
    train(_recipe(tmp_path, tiny_lm_dir, "one", 2, step_per_bit=True), output_dir=str(ref), evaluate=False)
    logs = _logs(out)
    assert all(e["grad_norm"] > 0 for e in logs)  # the norm each width's step saw, not the Trainer's 0
    _assert_same_run(logs, _logs(ref), rtol=1e-4)
    _assert_same_checkpoint(out, ref, tiny_lm_dir)


def test_fsdp2_accumulate_alrs_matches_one_process(tiny_lm_dir, tmp_path):
    """Accumulate mode: ALRS is a factor inside the fake-quantize backward, which FSDP2's parameter swap keeps (a
    tensor hook on the original scale parameter did not fire under FSDP2)."""
    out = tmp_path / "fsdp"
    _launch("accelerate_fsdp_cpu.yaml", _recipe(tmp_path, tiny_lm_dir, "two", 1), out, 2)
    ref = tmp_path / "one"
    train(_recipe(tmp_path, tiny_lm_dir, "one", 2), output_dir=str(ref), evaluate=False)
    _assert_same_run(_logs(out), _logs(ref), rtol=1e-4)
    _assert_same_checkpoint(out, ref, tiny_lm_dir)


def test_launch_without_distributed_setup_is_refused(monkeypatch):
    from abs_llm.distributed import check_processes

    class Single:
        num_processes = 1

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="use_cpu: true"):
        check_processes(Single())
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_processes(Single())


def test_mean_over_processes_single_process():
    from abs_llm.distributed import mean_over_processes

    class Single:
        num_processes = 1

    got = mean_over_processes(Single(), {8: [torch.tensor(3.0), 2], 4: [0.0, 0]})
    assert got == {8: 1.5}
