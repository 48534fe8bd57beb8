"""peft LoRA on a frozen switchable model: dispatch, training at a low bit-width, merge into the integer master."""

import pytest
import torch

import abs_llm
from abs_llm import DoubleRoundingConfig, SwitchableLinear, set_bits
from abs_llm import core
from abs_llm.peft_lora import SwitchableLoraLinear, get_peft_model, load_adapter, lora_config
from abs_llm.switching import switchable_layers

CANDS = [8, 6, 4, 2]
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def qmodel(tiny_llama):
    return abs_llm.quantize(tiny_llama, DoubleRoundingConfig(bits=8, candidate_bits=CANDS))


def _randomize_lora(pm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _loss(model, tokens):
    return model(input_ids=tokens, labels=tokens).loss.item()


def test_dispatch_wraps_switchable_layers(qmodel):
    pm = get_peft_model(qmodel, lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    wrapped = [m for m in pm.modules() if isinstance(m, SwitchableLoraLinear)]
    assert len(wrapped) == 2 * len(TARGETS)
    assert all(isinstance(m.base_layer, SwitchableLinear) for m in wrapped)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_trains_at_4_bits(qmodel, tokens):
    pm = get_peft_model(qmodel, lora_config(r=8, lora_alpha=16, target_modules=TARGETS))
    set_bits(pm, 4)
    masters = {n: m.weight_master.clone() for n, m in switchable_layers(pm).items()}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    first = None
    for _ in range(15):
        loss = pm(input_ids=tokens, labels=tokens).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    assert _loss(pm, tokens) < 0.9 * first
    for n, m in switchable_layers(pm).items():  # the frozen master is untouched by training
        assert torch.equal(m.weight_master, masters[n]) and m.bits == 4


def test_zero_delta_merge_is_exact(qmodel):
    before = {n: (m.weight_master.clone(), m.weight_scale.clone()) for n, m in switchable_layers(qmodel).items()}
    pm = get_peft_model(qmodel, lora_config(r=4, target_modules=TARGETS))  # fresh LoRA: B = 0
    merged = pm.merge_and_unload()
    for n, m in switchable_layers(merged).items():
        assert torch.equal(m.weight_master, before[n][0]) and torch.equal(m.weight_scale, before[n][1])


def test_merge_requantizes_master_and_holds_at_8_and_4_bits(qmodel, tokens, tmp_path):
    pm = get_peft_model(qmodel, lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    _randomize_lora(pm)
    expected, with_lora = {}, {}
    for m in pm.modules():
        if isinstance(m, SwitchableLoraLinear):
            base = m.base_layer
            expected[id(base)] = base.derived_weight(8) + m.get_delta_weight("default")
    with torch.no_grad():
        for b in (8, 4):
            set_bits(pm, b)
            with_lora[b] = _loss(pm, tokens)
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, SwitchableLoraLinear) for m in merged.modules())
    layers = switchable_layers(merged)
    for name, m in layers.items():
        if id(m) not in expected:
            continue
        assert m.weight_master.dtype == torch.int8
        target = expected[id(m)]
        s = core.expand_scale(m.weight_scale, m.in_features, m.group_size)
        # 8-bit: one rounding of W + delta; 4-bit: the double rounding of the new master (d = 4), clamp included.
        assert ((m.derived_weight(8) - target).abs() <= 0.5 * s + 1e-6).all()
        assert ((m.derived_weight(4) - target).abs() <= (0.5 + 2**4) * s + 1e-6).all()
    with torch.no_grad():
        for b in (8, 4):
            set_bits(merged, b)
            assert _loss(merged, tokens) == pytest.approx(with_lora[b], rel=0.02 if b == 8 else 0.1)
    merged.save_pretrained(tmp_path / "merged")  # the merged model is an ordinary switchable checkpoint
    from transformers import AutoModelForCausalLM

    re = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    set_bits(merged, 4)
    set_bits(re, 4)
    with torch.no_grad():
        assert torch.equal(re(tokens).logits, merged(tokens).logits)


def test_unmerge_restores_exact_master(qmodel, tokens):
    pm = get_peft_model(qmodel, lora_config(r=4, target_modules=TARGETS))
    _randomize_lora(pm)
    with torch.no_grad():
        ref = pm(tokens).logits
    masters = {n: m.weight_master.clone() for n, m in switchable_layers(pm).items()}
    pm.merge_adapter()
    assert any(not torch.equal(m.weight_master, masters[n]) for n, m in switchable_layers(pm).items())
    pm.unmerge_adapter()
    assert all(torch.equal(m.weight_master, masters[n]) for n, m in switchable_layers(pm).items())
    with torch.no_grad():
        assert torch.equal(pm(tokens).logits, ref)


def test_saved_adapter_reloads(qmodel, tiny_llama_dir, tokens, tmp_path):
    import copy

    fresh = copy.deepcopy(qmodel)
    pm = get_peft_model(qmodel, lora_config(r=4, target_modules=TARGETS))
    _randomize_lora(pm)
    set_bits(pm, 4)
    pm.save_pretrained(tmp_path / "adapter")
    loaded = load_adapter(fresh, tmp_path / "adapter")
    set_bits(loaded, 4)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, pm(tokens).logits)


def test_bad_lora_inputs(qmodel, tiny_llama):
    with pytest.raises(ValueError, match="match no module"):
        get_peft_model(qmodel, lora_config(r=4, target_modules=["qq_proj"]))
    with pytest.raises(ValueError, match="no SwitchableLinear"):
        from transformers import LlamaForCausalLM
        from tests.conftest import tiny_llama_config

        get_peft_model(LlamaForCausalLM(tiny_llama_config()), lora_config(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="DoRA"):
        get_peft_model(qmodel, lora_config(r=4, target_modules=TARGETS, use_dora=True))
