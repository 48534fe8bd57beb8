"""abs_llm.speculative: a low-bit draft that shares the verifier's master, for transformers' assisted generation."""

import gc
import pickle
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from abs_llm import DoubleRoundingConfig, draft_model, get_bits, quantize, set_bits, switchable_layers
from abs_llm.row_attention import PREFIX
from abs_llm.speculative import LowBitHead, draft_extra_bytes, generate_with_stats
from tests.conftest import prompt_ids as _prompt
from tests.conftest import tiny_llama_config
from tests.conftest import varied_verifier as _verifier


@pytest.mark.parametrize("draft_bits, k", [(4, 3), (2, 1)])
def test_assisted_greedy_equals_plain_greedy(draft_bits, k):
    model, ids = _verifier(), _prompt()
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=40, do_sample=False)
    draft = draft_model(model, bits=draft_bits, num_assistant_tokens=k, schedule="constant", confidence_threshold=0)
    out, stats = generate_with_stats(model, ids, draft, max_new_tokens=40)
    assert torch.equal(out, plain)
    assert stats["drafted"] > 0 and stats["new_tokens"] == 40
    # the draft was really used, and really wrong sometimes (else the rejection path would be untested)
    assert 0 <= stats["accepted"] < stats["drafted"]
    with torch.no_grad():  # the verifier's own decoding is unchanged by the row-exact attention it now uses
        assert torch.equal(model.generate(ids, max_new_tokens=40, do_sample=False), plain)


def test_assisted_greedy_equals_plain_in_bf16_with_integer_kernels():
    # hidden 128 / intermediate 256 / vocab 256 fit the CPU int4/int8 kernels; bf16 is where attention rounding
    # differs between one-row and many-row calls, which the row-exact wrapper removes
    model = _verifier(torch.bfloat16, hidden_size=128, intermediate_size=256, vocab_size=256,
                      max_position_embeddings=512)
    assert {m.packed(torch.bfloat16, torch.device("cpu")).kernel for m in switchable_layers(model).values()} == {"int4x2"}
    ids = _prompt(190)  # long enough for sdpa's prefill blocking to depend on the prefill length
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=48, do_sample=False)
    for bits, head in [(4, None), (3, 4)]:
        draft = draft_model(model, bits=bits, head_bits=head, num_assistant_tokens=4, schedule="constant",
                            confidence_threshold=0)
        out, stats = generate_with_stats(model, ids, draft, max_new_tokens=48)
        assert torch.equal(out, plain), (bits, head)
        assert stats["drafted"] > 0


def test_draft_shares_tensors_and_owns_only_packed_weights():
    model = _verifier(torch.bfloat16, hidden_size=128, intermediate_size=256, vocab_size=256)
    draft = draft_model(model, bits=4)
    v, d = switchable_layers(model), switchable_layers(draft)
    assert list(v) == list(d)
    for name in v:
        assert v[name] is not d[name]
        assert d[name].weight_master.data_ptr() == v[name].weight_master.data_ptr()
        assert d[name].weight_scale is v[name].weight_scale
    assert draft.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert draft.model.norm.weight is model.model.norm.weight
    assert draft.lm_head.weight is model.model.embed_tokens.weight  # still tied, still shared
    vp = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    dp = {t.data_ptr() for t in list(draft.parameters()) + list(draft.buffers())}
    assert dp == vp
    assert draft_extra_bytes(draft) == 0  # packs lazily: the verifier never ran, so no activation dtype is known
    with torch.no_grad():
        draft(_prompt())
    # its own: 4-bit packed weights only (int4 nibbles + bf16 scales/zeros), about half of the int8 masters
    masters = sum(m.weight_master.numel() for m in v.values())
    assert 0.4 * masters < draft_extra_bytes(draft) < 0.8 * masters


def test_bit_state_is_independent():
    model = _verifier()
    set_bits(model, 6)
    draft = draft_model(model, bits=4)
    assert get_bits(model) == 6 and get_bits(draft) == 4
    set_bits(model, 8)
    assert get_bits(draft) == 4
    set_bits(draft, 2)
    assert get_bits(model) == 8
    assert model.config.quantization_config.bits == 8 and draft.config.quantization_config.bits == 2
    name = "model.layers.0.mlp.down_proj"
    set_bits(draft, {name: 3})
    assert get_bits(model) == 8 and get_bits(draft)[name] == 3


def test_per_layer_bit_map():
    model = _verifier()
    names = list(switchable_layers(model))
    draft = draft_model(model, bits={names[0]: 2, names[1]: 3})
    bits = get_bits(draft)
    assert bits[names[0]] == 2 and bits[names[1]] == 3 and bits[names[2]] == 8  # unnamed: the verifier's
    assert get_bits(model) == 8


def test_bad_bits_raise_clear_errors():
    model = _verifier()
    model2 = _verifier()
    quantize_cands = DoubleRoundingConfig(bits=8, candidate_bits=[8, 4], group_size=64)
    torch.manual_seed(0)
    small = LlamaForCausalLM(tiny_llama_config()).eval()
    quantize(small, quantize_cands)
    with pytest.raises(ValueError, match=r"not a candidate.*allowed \[4, 8\]"):
        draft_model(small, bits=2)
    with pytest.raises(ValueError, match=r"^draft bits=5 is not a candidate bit-width; allowed \[2, 3, 4, 6, 8\]$"):
        draft_model(model, bits=5)
    with pytest.raises(ValueError, match=r"draft bits=7 for model.layers.0.mlp.up_proj is not a candidate"):
        draft_model(model, bits={"model.layers.0.mlp.up_proj": 7})
    with pytest.raises(ValueError, match="unknown layer"):
        draft_model(model, bits={"model.layers.0.nope": 4})
    with pytest.raises(ValueError, match="no SwitchableLinear"):
        draft_model(LlamaForCausalLM(tiny_llama_config()), bits=4)
    with pytest.raises(ValueError, match="already a draft"):
        draft_model(draft_model(model2, bits=4), bits=2)
    with pytest.raises(ValueError, match="head_bits"):
        draft_model(model, bits=4, head_bits=9)
    draft = draft_model(model, bits=4)
    with pytest.raises(ValueError, match="not a candidate"):
        set_bits(draft, 7)
    assert get_bits(draft) == 4


def test_draft_refuses_save_pickle_and_move(tmp_path):
    model = _verifier()
    draft = draft_model(model, bits=4)
    with pytest.raises(ValueError, match="cannot save a draft"):
        draft.save_pretrained(tmp_path / "d")
    with pytest.raises(ValueError, match="cannot pickle"):
        pickle.dumps(draft)
    with pytest.raises(ValueError, match="cannot move or cast"):
        draft.to(torch.bfloat16)
    with pytest.raises(ValueError, match="cannot move or cast"):
        draft.bfloat16()
    assert draft.to("cpu") is draft and draft.to(torch.float32) is draft  # no-ops are fine
    assert not (tmp_path / "d").exists()


def test_verifier_still_saves_and_reloads_its_own_state(tmp_path):
    model, ids = _verifier(), _prompt()
    draft = draft_model(model, bits=2)
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "v")
    cfg = (tmp_path / "v" / "config.json").read_text()
    assert PREFIX not in cfg and '"bits": 8' in cfg  # neither the draft's bits nor the wrapper leak into the checkpoint
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "v")
    assert get_bits(back) == 8
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want)
    assert get_bits(draft) == 2


def test_draft_follows_the_verifier_when_its_tensors_change():
    model, ids = _verifier(), _prompt()
    draft = draft_model(model, bits=4)
    with torch.no_grad():
        before = draft(ids).logits
        layer = switchable_layers(model)["model.layers.0.mlp.down_proj"]
        layer.set_master(torch.zeros_like(layer.master()))  # replaces the shared buffer
        dl = switchable_layers(draft)["model.layers.0.mlp.down_proj"]
        assert dl.weight_master is layer.weight_master
        after = draft(ids).logits
        set_bits(model, 4)
        assert torch.equal(model(ids).logits, after)  # same master, same bits: same model
    assert not torch.equal(before, after)


def test_garbage_collection():
    model = _verifier()
    draft = draft_model(model, bits=4, head_bits=4)
    ref = weakref.ref(draft)
    assert draft.verifier is model
    del draft
    gc.collect()
    assert ref() is None
    draft = draft_model(model, bits=4)
    vref = weakref.ref(model)
    del model
    gc.collect()
    assert vref() is None and draft.verifier is None  # the draft keeps tensors alive, not the verifier object
    with torch.no_grad():
        assert draft(_prompt()).logits.isfinite().all()


def test_low_bit_head_shares_the_weight_and_tracks_it():
    model = _verifier(torch.bfloat16, hidden_size=128, intermediate_size=256, vocab_size=256)
    draft = draft_model(model, bits=4, head_bits=4)
    head = draft.lm_head
    assert isinstance(head, LowBitHead) and head.weight is model.lm_head.weight
    assert model.lm_head is not head and type(model.lm_head) is torch.nn.Linear  # the verifier keeps its own
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    p = head.packed(torch.bfloat16, torch.device("cpu"))
    assert p.kernel == "int4pack" and head.packed_bytes == p.nbytes
    ref = model.lm_head(x).float()
    err = (head(x).float() - ref).norm() / ref.norm()
    assert err < 0.2  # a 4-bit copy of the head: close, not equal
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    assert head.packed(torch.bfloat16, torch.device("cpu")) is not p  # rebuilt from the changed weight
    with pytest.raises(ValueError, match="float nn.Linear lm_head"):
        m = _verifier()
        m.lm_head = torch.nn.Identity()
        draft_model(m, bits=4, head_bits=4)


@pytest.mark.integration
def test_default_model_assisted_equals_plain_greedy():
    import abs_llm
    from abs_llm.generate import prompt_ids

    path = abs_llm.default_model_path()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    quantize(model, DoubleRoundingConfig(bits=8, group_size=64))
    model.to(torch.bfloat16)
    doc = abs_llm.default_corpus("train")[240]  # a validation document, used as a prompt only
    ids = prompt_ids(tok, "Summarize this news story in a few sentences:\n\n" + doc[:700])
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    draft = draft_model(model, bits=4, head_bits=4, num_assistant_tokens=3, schedule="constant",
                        confidence_threshold=0)
    out, stats = generate_with_stats(model, ids, draft, max_new_tokens=64, min_new_tokens=64)
    assert torch.equal(out, plain)
    assert stats["acceptance"] > 0.3  # measured ~0.5-0.65: the 4-bit derivation often agrees with INT8
