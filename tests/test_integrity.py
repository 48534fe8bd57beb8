"""Tamper evidence, crash-safe saves, no pickle on load paths, determinism."""

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import abs_llm
from abs_llm import DoubleRoundingConfig, set_bits
from abs_llm.integrity import verification
from tests._report import RELIABILITY
from tests.conftest import tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.o_proj"


def quantized(bits=8, seed=0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config())
    abs_llm.quantize(model, DoubleRoundingConfig(bits=bits))
    return model


@pytest.fixture
def ckpt(tmp_path):
    out = tmp_path / "ckpt"
    quantized().save_pretrained(out)
    return out


def _flip_byte(path: Path, tensor: str):
    with safe_open(path, "pt"):
        pass
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8:8 + n])
    start = 8 + n + header[tensor]["data_offsets"][0]
    data = bytearray(path.read_bytes())
    data[start] ^= 0x01
    path.write_bytes(bytes(data))


def _resave(path: Path, fn_tensors=None, fn_meta=None):
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    save_file(fn_tensors(tensors) if fn_tensors else tensors, path, metadata=fn_meta(meta) if fn_meta else meta)


def _swap_scales(t):
    t = dict(t)
    t[f"{Q}.weight_scale"], t[f"{K}.weight_scale"] = t[f"{K}.weight_scale"], t[f"{Q}.weight_scale"]
    return t


TAMPER = {
    "truncated file": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated"),
    "flipped byte in a master": (lambda p: _flip_byte(p, f"{Q}.weight_master"), rf"\['{Q}.weight_master'\] do not match"),
    "flipped byte in a float tensor": (lambda p: _flip_byte(p, "model.norm.weight"), r"\['model.norm.weight'\] do not match"),
    "swapped scales": (lambda p: _resave(p, _swap_scales), rf"\['{K}.weight_scale', '{Q}.weight_scale'\] do not match"),
    "wrong dtype": (lambda p: _resave(p, lambda t: {**t, f"{Q}.weight_master": t[f"{Q}.weight_master"].to(torch.int16)}),
                    rf"{Q}.weight_master: dtype/shape I16"),
    "wrong shape": (lambda p: _resave(p, lambda t: {**t, f"{Q}.weight_master": t[f"{Q}.weight_master"][:-1].clone()}),
                    r"expected I8\[96, 96\]"),
    "missing digests": (lambda p: _resave(p, fn_meta=lambda m: {k: v for k, v in m.items() if k != "abs_llm.digests"}),
                        "no 'abs_llm.digests'"),
    "missing format metadata": (lambda p: _resave(p, fn_meta=lambda m: {"format": "pt"}), "lacks 'abs_llm.format_version'"),
    "future format version": (lambda p: _resave(p, fn_meta=lambda m: {**m, "abs_llm.format_version": "99"}),
                              "newer than supported"),
    "added tensor": (lambda p: _resave(p, lambda t: {**t, "extra.bias": torch.zeros(3)}), r"\['extra.bias'\] added or removed"),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_checkpoint_is_refused(ckpt, case):
    tamper, match = TAMPER[case]
    tamper(ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(ckpt)
    RELIABILITY["tamper cases detected"] += 1


def test_verification_can_be_skipped(ckpt, monkeypatch):
    _flip_byte(ckpt / "model.safetensors", "model.norm.weight")
    with verification(False):
        AutoModelForCausalLM.from_pretrained(ckpt)  # loads: the user opted out
    monkeypatch.setenv("ABS_LLM_VERIFY", "0")
    AutoModelForCausalLM.from_pretrained(ckpt)


def test_same_seed_same_checkpoint_bytes(tmp_path):
    digests = []
    for i in range(2):
        quantized(bits=4, seed=3).save_pretrained(tmp_path / str(i))
        digests.append(hashlib.sha256((tmp_path / str(i) / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_save_over_existing_keeps_user_files_and_drops_stale_shards(tmp_path):
    out = tmp_path / "ckpt"
    quantized(bits=8).save_pretrained(out)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-10").mkdir()
    (out / "checkpoint-10" / "state.json").write_text("{}")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    quantized(bits=4).save_pretrained(out)
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint-10" / "state.json").exists()
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert abs_llm.get_bits(AutoModelForCausalLM.from_pretrained(out)) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directories left behind


def test_deepcopy_saves_the_copy(tmp_path):
    import copy

    model = quantized(bits=8)
    clone = copy.deepcopy(model)
    set_bits(clone, 2)
    clone.save_pretrained(tmp_path / "c")
    assert abs_llm.get_bits(AutoModelForCausalLM.from_pretrained(tmp_path / "c")) == 2


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {root!r})
    import abs_llm, abs_llm.integrity as integ
    from transformers import LlamaForCausalLM
    from tests.conftest import tiny_llama_config
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    abs_llm.quantize(model, abs_llm.DoubleRoundingConfig(bits=2))
    stage = {stage!r}
    def stall(*a, **k):
        open({flag!r}, "w").close()
        time.sleep(120)
    if stage == "writing":
        import transformers.modeling_utils as mu
        real = mu.safe_save_file
        def partial(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(100)  # a half-written file on disk when the kill lands
            stall()
        mu.safe_save_file = partial
    else:
        integ.add_digests = stall
    model.save_pretrained({target!r})
    """
)


@pytest.mark.parametrize("stage", ["writing", "digesting"])
def test_kill_during_save_leaves_previous_checkpoint(tmp_path, stage):
    target = tmp_path / "ckpt"
    quantized(bits=8).save_pretrained(target)
    before = sorted(p.name for p in target.iterdir())
    flag = tmp_path / "flag"
    script = KILL_SCRIPT.format(root=str(ROOT), stage=stage, flag=str(flag), target=str(target))
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not flag.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "save never reached the kill point"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in target.iterdir()) == before
    assert abs_llm.get_bits(AutoModelForCausalLM.from_pretrained(target)) == 8  # the previous save, intact
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("ckpt", "flag")]
    assert all(n.startswith(".ckpt.abs_llm-saving-") for n in leftovers)  # hidden, never under the target name


def test_no_pickle_on_load_paths():
    """torch.load unpickles arbitrary code unless weights_only=True; our load paths use safetensors only."""
    offenders = []
    for path in (ROOT / "abs_llm").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{path.name}: {m.group(0)}")
        if re.search(r"^\s*import pickle|pickle\.loads?\(", text, re.M):
            offenders.append(f"{path.name}: pickle")
    assert not offenders, offenders
