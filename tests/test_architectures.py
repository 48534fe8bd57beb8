"""Model variety: tiny random configs of each supported architecture (built here, nothing from the Hub) quantize, and
save -> from_pretrained gives bit-identical logits at every width, with either master; source weights in fp32, fp16
or bf16; tied and untied heads; widths that no group divides (hidden 96 with group 64, an MLP width of 97 that no
group size and no nibble pair divides). docs/support.md is the table of what this covers."""

import logging

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import abs_llm
from abs_llm import DoubleRoundingConfig, SwitchableLinear, set_bits, switchable_layers
from tests._report import RELIABILITY

COMMON = dict(vocab_size=128, hidden_size=96, intermediate_size=97, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)

# name: (config, converted layers, of which with a bias)
ARCHS = {
    "llama": (lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=False), 14, 0),
    "llama-tied": (lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True), 14, 0),
    "qwen2": (lambda: transformers.Qwen2Config(**COMMON), 14, 6),  # q/k/v biases
    "mistral": (lambda: transformers.MistralConfig(**COMMON, sliding_window=8), 14, 0),  # window < sequence
    "gemma": (lambda: transformers.GemmaConfig(**COMMON, head_dim=24), 14, 0),  # tied head, scaled embeddings
    "phi": (lambda: transformers.PhiConfig(**COMMON, partial_rotary_factor=0.5), 12, 12),  # dense biases, biased head
    "phi3": (lambda: transformers.Phi3Config(**{**COMMON, "num_key_value_heads": 4}, partial_rotary_factor=0.5,
                                             pad_token_id=0), 8, 0),  # fused qkv_proj / gate_up_proj
    "gpt2": (lambda: transformers.GPT2Config(vocab_size=128, n_embd=96, n_layer=2, n_head=4, n_inner=97,
                                             n_positions=64), 8, 8),  # Conv1D layers, converted (transposed)
}
MASTERS = {"int8-g64": dict(master_bits=8, candidate_bits=[8, 6, 4, 3, 2], group_size=64),
           "int4-g32": dict(master_bits=4, candidate_bits=[4, 3, 2], group_size=32)}
DTYPES = [("llama", torch.bfloat16), ("qwen2", torch.float16), ("gemma", torch.bfloat16), ("phi", torch.float16),
          ("gpt2", torch.bfloat16), ("phi3", torch.float16)]


def _build(arch, dtype=torch.float32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(ARCHS[arch][0]()).to(dtype).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _round_trip(arch, master, dtype, tmp_path):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    model = _build(arch, dtype)
    cfg = MASTERS[master]
    if dtype != torch.float32:
        # Half-precision sources come from a checkpoint stored in that dtype: `model.to(bf16)` would also round
        # buffers (the rotary inv_freq) that from_pretrained keeps exact, a transformers difference, not ours.
        model.save_pretrained(tmp_path / "fp")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp").eval()
        on_load = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=DoubleRoundingConfig(**cfg))
    fp = _logits(model, ids).float()
    abs_llm.quantize(model, DoubleRoundingConfig(**cfg))
    if dtype != torch.float32:  # quantize-on-load and in-memory quantize agree
        assert torch.equal(_logits(on_load, ids), _logits(model, ids))
    layers = switchable_layers(model)
    assert (len(layers), sum(m.bias is not None for m in layers.values())) == ARCHS[arch][1:]
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert next(again.parameters()).dtype == dtype
    err = {}
    for b in cfg["candidate_bits"]:
        set_bits(model, b)
        set_bits(again, b)
        want = _logits(model, ids)
        assert torch.equal(_logits(again, ids), want), f"{arch} {master} {dtype}: reload differs at {b} bits"
        err[b] = (want.float() - fp).abs().mean().item() / fp.abs().mean().item()
    top, low = cfg["candidate_bits"][0], cfg["candidate_bits"][-1]
    assert err[top] < err[low]  # the widths really differ, and the master is the most accurate
    assert err[top] < (0.05 if top == 8 else 0.5), err
    RELIABILITY["architectures round-tripped"] += 1
    return model


@pytest.mark.parametrize("master", list(MASTERS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture_round_trips_exactly_at_every_width(arch, master, tmp_path):
    _round_trip(arch, master, torch.float32, tmp_path)


@pytest.mark.parametrize("arch,dtype", DTYPES, ids=[f"{a}-{str(d)[6:]}" for a, d in DTYPES])
def test_half_precision_source_weights_round_trip(arch, dtype, tmp_path):
    model = _round_trip(arch, "int8-g64", dtype, tmp_path)
    layer = next(iter(switchable_layers(model).values()))
    assert layer.weight_scale.dtype == torch.float32  # scales stay fp32 whatever the model's dtype


def test_gpt2_conv1d_layers_export_back_to_conv1d(tmp_path):
    """The converted Conv1D layers keep their meaning outside abs_llm: the hf-dense snapshot is a plain GPT-2 whose
    Conv1D weights are the derived weights, transposed back."""
    from transformers.pytorch_utils import Conv1D

    from abs_llm.export import export

    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    model = _build("gpt2")
    abs_llm.quantize(model, DoubleRoundingConfig(candidate_bits=[8, 4, 2], group_size=64))
    set_bits(model, 4)
    export(model, tmp_path / "dense", 4, "hf-dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert isinstance(dense.transformer.h[0].attn.c_attn, Conv1D) and not switchable_layers(dense)
    torch.testing.assert_close(_logits(dense, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="was a GPT-2-style Conv1D; export this model with --format hf-dense"):
        export(model, tmp_path / "ct", 4, "compressed-tensors")
    RELIABILITY["bad inputs tried"] += 1


def test_moe_experts_left_in_float_are_announced(tmp_path, caplog):
    """Mixtral-style fused experts are 3-D parameters, not Linear layers: attention is converted, the experts stay
    float, and quantize says so instead of leaving the user to find out from the checkpoint size."""
    torch.manual_seed(0)
    # intermediate 96: transformers' grouped-mm experts need 16-byte strides (a float Mixtral of width 97 fails too)
    cfg = transformers.MixtralConfig(**{**COMMON, "intermediate_size": 96}, num_local_experts=4, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with caplog.at_level(logging.WARNING, logger="abs_llm"):
        abs_llm.quantize(model, DoubleRoundingConfig(candidate_bits=[8, 4]))
    assert all(".self_attn." in n for n in switchable_layers(model))
    assert "stay in floating point" in caplog.text and "experts" in caplog.text
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(3))
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    for b in (8, 4):
        set_bits(model, b)
        set_bits(again, b)
        assert torch.equal(_logits(again, ids), _logits(model, ids))


@settings(max_examples=80, deadline=None)
@given(out_f=st.integers(1, 24), in_f=st.integers(1, 200), group=st.sampled_from([None, 16, 32, 64, 128]),
       master=st.sampled_from([8, 4]), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_any_layer_shape_round_trips_through_the_checkpoint_format(out_f, in_f, group, master, dtype, bias, seed):
    """Any width (odd, prime, shorter than a group, a half-filled last nibble byte), any group, either master, any
    source dtype: stored -> safetensors bytes -> a fresh layer gives the same weight at every width."""
    from safetensors.torch import load, save

    from abs_llm import checkpoint, core

    RELIABILITY["property examples run"] += 1
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias).to(dtype)
    cands = core.allowed_candidates(master)
    layer = SwitchableLinear.from_linear(lin, master_bits=master, candidate_bits=cands, group_size=group)
    stored = load(save({k: v.contiguous() for k, v in layer.state_dict().items()}))
    dt, shape = checkpoint.master_layout(out_f, in_f, master)
    assert (stored["weight_master"].dtype, tuple(stored["weight_master"].shape)) == (dt, shape)
    assert tuple(stored["weight_scale"].shape) == checkpoint.scale_shape(out_f, in_f, group)
    fresh = SwitchableLinear(in_f, out_f, bias, master_bits=master, candidate_bits=cands, group_size=group, dtype=dtype)
    fresh.load_state_dict(stored)
    for b in cands:
        assert torch.equal(fresh.derived_weight(b, dtype), layer.derived_weight(b, dtype))
