"""Plain peft / transformers / TRL on switchable models after ``import abs_llm`` (no abs_llm.peft_lora calls), and the
merge guarantees: all or nothing across layers, ``safe_merge`` checks every width."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import abs_llm
from abs_llm import DoubleRoundingConfig, SwitchableLinear, set_bits
from abs_llm.peft_lora import SwitchableLoraLinear
from abs_llm.switching import switchable_layers

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "v_proj"]


def digest(model) -> str:
    """SHA-256 over every tensor of the state dict (name, dtype, shape, bytes) and the module types."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(str([type(m).__name__ for m in model.modules()]).encode())
    return h.hexdigest()


@pytest.fixture
def qmodel(tiny_llama):
    return abs_llm.quantize(tiny_llama, DoubleRoundingConfig(bits=8, candidate_bits=[8, 6, 4, 2]))


def _randomize(pm, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_peft_hook_is_in_place():
    """Fails loudly when a peft release changes the custom-module hook that plain peft support relies on."""
    cfg = LoraConfig(r=8, target_modules=TARGETS)
    assert cfg._custom_modules == {SwitchableLinear: SwitchableLoraLinear}, (
        f"peft {peft.__version__}: LoraConfig no longer carries abs_llm's custom-module mapping; "
        "abs_llm.peft_lora.install() must be adapted to this peft release")
    layer = SwitchableLinear(64, 32, candidate_bits=(8, 4))
    new = peft.tuners.lora.model.LoraModel._create_new_module(cfg, "default", layer, r=8, lora_alpha=8,
                                                              target_name="x")
    assert isinstance(new, SwitchableLoraLinear), (
        f"peft {peft.__version__}: LoraModel._create_new_module no longer dispatches LoraConfig._custom_modules")
    merge_check = peft.tuners.lora.model.LoraModel._check_merge_allowed
    assert getattr(merge_check, "_abs_llm_hook", False), (
        f"peft {peft.__version__}: LoraModel._check_merge_allowed is not abs_llm's wrapper (renamed?); merges would no"
        " longer be checked across layers before the first one commits")
    src = __import__("inspect").getsource(peft.tuners.tuners_utils.BaseTuner._unload_and_optionally_merge)
    assert "self._check_merge_allowed()" in src, f"peft {peft.__version__}: merge passes no longer start with it"


def test_plain_peft_after_import_abs_llm_in_a_fresh_process(tmp_path):
    """``import abs_llm`` before ``import peft`` (the lazy hook), plain get_peft_model, save, PeftModel.from_pretrained."""
    script = f"""
import copy, torch, abs_llm, sys
assert "peft" not in sys.modules
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
m = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).eval()
abs_llm.quantize(m, abs_llm.DoubleRoundingConfig(candidate_bits=[8, 4]))
fresh = copy.deepcopy(m)
pm = get_peft_model(m, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
with torch.no_grad():
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.05)
abs_llm.set_bits(pm, 4)
pm.save_pretrained(r"{tmp_path / 'adapter'}")
back = PeftModel.from_pretrained(fresh, r"{tmp_path / 'adapter'}")
abs_llm.set_bits(back, 4)
x = torch.tensor([[1, 2, 3, 4, 5]])
with torch.no_grad():
    assert torch.equal(back(x).logits, pm(x).logits)
print(sorted({{type(mod).__name__ for mod in back.modules() if "LoraLinear" in type(mod).__name__}}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "['SwitchableLoraLinear']"


def test_plain_merge_requantizes_master(qmodel, tokens):
    pm = get_peft_model(qmodel, LoraConfig(r=8, target_modules=TARGETS))
    _randomize(pm)
    masters = {id(m): m.weight_master.clone() for m in switchable_layers(pm).values()}
    with torch.no_grad():
        ref = pm(tokens).logits
    merged = pm.merge_and_unload()
    layers = switchable_layers(merged)
    changed = [n for n, m in layers.items() if not torch.equal(m.weight_master, masters[id(m)])]
    assert changed and all(n.endswith(("q_proj", "v_proj")) for n in changed)
    assert all(m.weight_master.dtype == torch.int8 for m in layers.values())
    with torch.no_grad():  # one re-rounding of W + delta at 8 bits: close to the unmerged adapter
        torch.testing.assert_close(merged(tokens).logits, ref, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("how", ["merge_and_unload", "merge_adapter"])
def test_refused_merge_leaves_model_bit_identical(qmodel, how):
    pm = get_peft_model(qmodel, LoraConfig(r=4, target_modules=TARGETS + ["down_proj"]))
    _randomize(pm)
    last = [m for m in pm.modules() if isinstance(m, SwitchableLoraLinear)][-1]  # merged last: a late failure
    with torch.no_grad():
        last.lora_B["default"].weight[0, 0] = float("nan")
    before = digest(pm)
    with pytest.raises(ValueError, match=r"down_proj.*NaN or inf in the merged weight"):
        getattr(pm, how)()
    assert digest(pm) == before
    assert not any(m.merged for m in pm.modules() if isinstance(m, SwitchableLoraLinear))


def test_safe_merge_checks_every_width(qmodel, tokens):
    pm = get_peft_model(qmodel, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]))
    layer = next(m for m in pm.modules() if isinstance(m, SwitchableLoraLinear))
    with torch.no_grad():  # delta[0, 0] = -3.39e38: finite at 8 bits, but rounds to -128 * s (overflow) below 8 bits
        layer.lora_A["default"].weight.zero_()
        layer.lora_A["default"].weight[0, 0] = 1.0
        layer.lora_B["default"].weight.zero_()
        layer.lora_B["default"].weight[0, 0] = -3.39e38
    before = digest(pm)
    with pytest.raises(ValueError, match=r"not finite at [2-6] bits"):
        pm.merge_and_unload(safe_merge=True)
    assert digest(pm) == before
    pm.merge_adapter(safe_merge=False)  # without safe_merge only the 8-bit merged weight is checked
    base = layer.get_base_layer()
    assert torch.isfinite(base.derived_weight(8)).all() and not torch.isfinite(base.derived_weight(2)).all()


def test_transformers_trainer_with_plain_peft_model(qmodel, tokens, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    pm = get_peft_model(qmodel, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"))
    set_bits(pm, 4)
    masters = {id(m): m.weight_master.clone() for m in switchable_layers(pm).values()}
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 16] * 8, "labels": ids})
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = Trainer(model=pm, args=args, train_dataset=ds, data_collator=default_data_collator)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all(torch.equal(m.weight_master, masters[id(m)]) for m in switchable_layers(pm).values())
    trainer.save_model(str(tmp_path / "adapter"))
    fresh = abs_llm.quantize(_tiny(), DoubleRoundingConfig(bits=8, candidate_bits=[8, 6, 4, 2]))
    back = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    set_bits(back, 4)
    pm.eval()
    other = abs_llm.quantize(_tiny(), DoubleRoundingConfig(bits=8, candidate_bits=[8, 6, 4, 2]))
    other.load_adapter(str(tmp_path / "adapter"))  # transformers' own adapter API goes through peft's dispatch too
    set_bits(other, 4)
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, pm(tokens).logits)
        assert torch.equal(other(tokens).logits, pm(tokens).logits)


def _tiny():
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def test_trl_sft_trainer_with_peft_config(tiny_lm_dir, tiny_tok, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from tests.conftest import TEXT

    model = AutoModelForCausalLM.from_pretrained(
        tiny_lm_dir, quantization_config=DoubleRoundingConfig(bits=4, candidate_bits=[8, 4], group_size=None))
    masters = {id(m): m.weight_master.clone() for m in switchable_layers(model).values()}
    ds = Dataset.from_dict({"text": [TEXT[i:i + 120] for i in range(0, 960, 120)]})
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=2, max_length=32,
                         learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tiny_tok[0],
                             peft_config=LoraConfig(r=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    assert isinstance(trainer.model, PeftModel)
    assert any(isinstance(m, SwitchableLoraLinear) for m in trainer.model.modules())
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    assert all(torch.equal(m.weight_master, masters[id(m)]) for m in switchable_layers(trainer.model).values())


def test_lora_backward_through_integer_kernels_in_bf16(qmodel, tokens):
    """bf16 activations pick the int4pack/int8pack kernels, which have no autograd: LoRA layers upstream still train."""
    pm = get_peft_model(qmodel.to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"]))
    _randomize(pm)
    set_bits(pm, 4)
    with torch.no_grad():
        pm(tokens)  # the eval forward packs and uses the integer kernel
    kernels = {m.packed(torch.bfloat16, torch.device("cpu")).kernel for m in switchable_layers(pm).values()}
    assert kernels - {"dequant"}, kernels
    loss = pm(input_ids=tokens, labels=tokens).loss
    loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if "lora_A" in n and "layers.0." in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_two_adapters_merge_as_one_rounding(qmodel):
    from abs_llm.peft_lora import merged_master

    pm = get_peft_model(qmodel, LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="a")
    pm.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"]))
    _randomize(pm, seed=1)
    layer = next(m for m in pm.modules() if isinstance(m, SwitchableLoraLinear))
    base = layer.get_base_layer()
    q, scale = merged_master(base, layer.get_delta_weight("a") + layer.get_delta_weight("b"))
    pm.base_model.merge_adapter(adapter_names=["a", "b"])
    assert torch.equal(base.master(), q) and torch.equal(base.weight_scale, scale)
    assert layer.merged_adapters == ["a", "b"]
