"""The on-disk format (abs_llm/checkpoint.py): what a checkpoint holds, format-v1 checkpoints from before the
restructure still load bit-identically, and a header that disagrees with config.json fails before any tensor loads."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from abs_llm import DoubleRoundingConfig, checkpoint, core, get_bits, set_bits

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CANDS = [8, 6, 4, 3, 2]
TOKENS = torch.arange(24).remainder(128).view(2, 12)  # as in fixtures/make_v1_checkpoints.py


def load_q(path, **cfg):
    cfg = {"bits": 8, "candidate_bits": CANDS, "group_size": 64, **cfg}
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=DoubleRoundingConfig(**cfg))


@pytest.mark.parametrize("name", ["v1_int8_g64", "v1_int4_channel"])
def test_format_v1_checkpoints_load_with_identical_logits(name):
    """Checkpoints written by the abs_llm of commit c7fe1a8 load, at every width, to the same logits (up to the float
    rounding of the CPU's own GEMM kernels: an AMD EPYC differs from the Xeon that wrote them by ~3e-7)."""
    want = load_file(FIXTURES / f"{name}.logits.safetensors")
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / name)

    def same(a, b):
        return torch.allclose(a, b, rtol=0, atol=2e-6)

    with torch.no_grad():
        assert same(model(TOKENS).logits, want["saved_bits"])
        if name == "v1_int8_g64":
            assert get_bits(model)["model.layers.0.mlp.down_proj"] == 3
            assert model.config.quantization_config.hessian_traces["model.layers.0.self_attn.q_proj"] == 1.0
        for key, expected in want.items():
            if key.startswith("bits_"):
                set_bits(model, int(key[5:]))
                assert same(model(TOKENS).logits, expected), f"{name} differs at {key}"


@pytest.mark.parametrize("master_bits", [8, 4])
def test_master_encoding_round_trip(master_bits):
    lo, hi = core.qrange(master_bits)
    q = torch.randint(lo, hi + 1, (6, 13), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    stored = checkpoint.encode_master(q, master_bits)
    dtype, shape = checkpoint.master_layout(6, 13, master_bits)
    assert stored.dtype == dtype and tuple(stored.shape) == shape
    assert torch.equal(checkpoint.decode_master(stored, master_bits, 13), q)


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


@pytest.mark.parametrize(
    "fn_meta,match",
    [
        (lambda m: {**m, "abs_llm.candidate_bits": "[8, 4]"}, r"candidate_bits=\[8, 4\] disagrees"),
        (lambda m: {**m, "abs_llm.quant_method": "gptq"}, "quant_method=gptq disagrees"),
        (lambda m: {**m, "abs_llm.layer_bits": json.dumps({k: v for k, v in json.loads(m["abs_llm.layer_bits"]).items()
                                                           if k != KEY})}, f"converted but not in the header: \\['{KEY}'\\]"),
        (lambda m: {**m, "abs_llm.layer_bits": json.dumps({**json.loads(m["abs_llm.layer_bits"]), KEY: 5})},
         "are not candidate bit-widths"),
        (lambda m: {**m, "abs_llm.layer_bits": "{not json"}, "unreadable .abs_llm.layer_bits. in the safetensors metadata"),
    ],
)
def test_header_metadata_is_checked_against_config(saved, fn_meta, match):
    _rewrite(saved, None, fn_meta)
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(saved)
