"""abs_llm.row_attention: verifying K drafted tokens in one forward gives the logits of K one-token steps, bit for bit."""

import torch

from abs_llm import draft_model
from abs_llm.row_attention import PREFIX
from tests.conftest import prompt_ids as _prompt
from tests.conftest import varied_verifier as _verifier


def test_row_exact_attention_matches_one_token_steps():
    model, ids = _verifier(torch.bfloat16, hidden_size=128, intermediate_size=256), _prompt(30)
    draft_model(model, bits=4)
    draft = draft_model(model, bits=2)  # a second draft adds no second hook, and its own attention stays plain
    assert model.config._attn_implementation == PREFIX + "sdpa" and draft.config._attn_implementation == "sdpa"
    assert [type(h).__name__ for h in model._forward_pre_hooks.values()].count("function") == 1
    assert not draft._forward_pre_hooks
    with torch.no_grad():
        cache = model(ids[:, :20], use_cache=True).cache
        steps = torch.cat([model(ids[:, i:i + 1], cache=cache).logits for i in range(20, 30)], dim=1)
        cache = model(ids[:, :20], use_cache=True).cache
        chunk = model(ids[:, 20:30], cache=cache).logits
    assert torch.equal(steps, chunk)


def test_first_verification_step_matches_prefill_then_steps():
    # transformers' first assisted step is one no-cache forward over prompt + drafts, with logits_to_keep = drafts + 1
    model = _verifier(torch.bfloat16, hidden_size=128, intermediate_size=256, max_position_embeddings=512)
    draft_model(model, bits=4)
    ids = _prompt(194)
    with torch.no_grad():
        out = model(ids[:, :190], logits_to_keep=1)
        steps, cache = [out.logits], out.cache
        for i in range(190, 193):
            steps.append(model(ids[:, i:i + 1], cache=cache, logits_to_keep=1).logits)
        first = model(ids[:, :193], logits_to_keep=4).logits
        assert torch.equal(torch.cat(steps, dim=1), first)
        # a plain forward (no logits_to_keep hint) is still one ordinary prefill, and the hint does not linger
        assert torch.equal(model(ids[:, :190]).logits[:, -1:], steps[0])
