"""abs_llm.multibit: the losses of a joint step, and validation that refuses a trainer before the model changes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

from abs_llm import DoubleRoundingConfig, quantize, switchable_layers
from abs_llm.multibit import MultiBitConfig, kd_kl, lm_loss
from abs_llm.training import MultiBitTrainer
from tests.conftest import tiny_llama_config


def test_kd_kl_is_the_masked_mean_kl_times_t_squared():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 1]]).float()
    per = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kd_kl(s, t, mask, temperature=2.0), (per * mask).sum() / mask.sum() * 4)
    assert kd_kl(t, t, mask) == pytest.approx(0.0, abs=1e-6)


def test_lm_loss_predicts_the_next_token_and_ignores_minus_100():
    logits = torch.randn(1, 4, 6)
    labels = torch.tensor([[1, 2, -100, 3]])
    want = F.cross_entropy(logits[0, [0, 2]], torch.tensor([2, 3]))
    torch.testing.assert_close(lm_loss(logits, labels), want)


def _digest(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bad", [dict(bits=[8, 6]), dict(hasb=True), dict(kd="self"), dict(per_bit_scale_state=True)])
def test_refused_trainer_leaves_the_model_bit_identical(bad):
    import datasets
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = quantize(LlamaForCausalLM(tiny_llama_config()), DoubleRoundingConfig(candidate_bits=[8, 4, 2]))
    before = _digest(model)
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 4, "labels": [[1, 2, 3, 4]] * 4})
    args = TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    with pytest.raises(ValueError):
        MultiBitTrainer(model=model, args=args, multibit=MultiBitConfig(**bad), teacher=copy.deepcopy(model),
                        train_dataset=ds)
    assert not any(m.trainable for m in switchable_layers(model).values())
    after = _digest(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model.config.quantization_config.hessian_traces is None
