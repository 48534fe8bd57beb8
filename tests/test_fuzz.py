"""Fuzzed checkpoints: 1,000 seeded corruptions of a tiny checkpoint's safetensors header, tensor bytes and config.json
each end in a clear error naming the file or load a model identical to the original; never a crash, a hang or a
silently changed model. The cases run in one subprocess (tests/fuzz_checkpoint.py), so a segfault or a hang in native
code fails this test naming the case instead of taking pytest down."""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

from tests._report import RELIABILITY

ROOT = Path(__file__).resolve().parents[1]
# direct: header/digest checks only (fast); load: real from_pretrained / load_checkpoint; plain: from_pretrained on a
# corrupted config.json, where transformers' own config parser may refuse it first
BATCHES = {"direct": (1, 600), "load": (2, 300), "plain": (3, 100)}
TOTAL_TIMEOUT = 600  # the whole batch; each case has its own 10 s alarm inside the subprocess


def _run():
    specs = [f"{m}:{s}:{n}" for m, (s, n) in BATCHES.items()]
    env = {**os.environ, "ABS_LLM_VERIFY": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.fuzz_checkpoint", *specs]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TOTAL_TIMEOUT)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = (e.output or b"").decode() if isinstance(e.output, bytes) else (e.output or ""), "", "timeout"
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if rc != 0:
        last = records[-1] if records else None
        raise AssertionError(f"fuzz subprocess ended with {rc} after {len(records)} cases (last finished: {last}); the "
                             f"next case crashed or hung. Reproduce: {' '.join(cmd[1:])} --only N\n{err[-3000:]}")
    return records


def test_fuzzed_checkpoints_are_refused_or_identical():
    records = _run()
    per_mode = collections.Counter(r["mode"] for r in records)
    assert per_mode == {m: n for m, (_, n) in BATCHES.items()}
    bad = [r for r in records if r["outcome"] not in ("refused", "identical", "transformers")]
    assert not bad, "\n".join(json.dumps(r) for r in bad[:10])
    # transformers' own config parser may refuse a corrupted config.json before abs_llm runs, only in plain mode
    assert all(r["mode"] == "plain" for r in records if r["outcome"] == "transformers")
    outcomes = collections.Counter(r["outcome"] for r in records)
    assert outcomes["refused"] >= 0.8 * len(records), outcomes  # the mutations really corrupt: few are harmless
    kinds = collections.Counter((r["file"], r["kind"]) for r in records)
    assert len(kinds) >= 25, kinds  # every family of mutation is drawn
    RELIABILITY["fuzz cases"] += len(records)


def test_sharded_checkpoint_loads_and_a_corrupted_shard_is_named(tmp_path):
    """Every shard carries the metadata, the digests of its own tensors and the config record: a sharded checkpoint
    loads exactly, and a flipped byte in one shard is reported with that shard's path."""
    import pytest
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    import abs_llm
    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    model = abs_llm.quantize(LlamaForCausalLM(tiny_llama_config()), abs_llm.DoubleRoundingConfig(bits=4))
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) == 3
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)
    data = bytearray(shards[1].read_bytes())
    data[-1] ^= 0x10
    shards[1].write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{shards[1]}: tensor\\(s\\) .* do not match their save-time digests"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    RELIABILITY["tamper cases detected"] += 1
