"""Training text sampled from the float teacher (``data.teacher_text``): settings, sampling, caching, recipe mixing."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from abs_llm import teacher_text as tt
from abs_llm.blocks import load_texts, pack_blocks
from abs_llm.data import interleave
from abs_llm.recipe import build_trainer, load_recipe
from tests.conftest import write_recipe


def _recipe(tmp_path, model_dir, section):
    tmp_path.mkdir(exist_ok=True)
    path = write_recipe(tmp_path, model_dir, max_steps=1, save_strategy="no")
    r = yaml.safe_load(path.read_text())
    r["data"]["teacher_text"] = section
    path.write_text(yaml.safe_dump(r))
    return path


@pytest.mark.parametrize("section, match", [
    ({"sequnces": 3}, "unknown keys"),
    ({"tokens": 0}, "tokens must be an integer >= 1"),
    ({"prompt_tokens": 1.5}, "prompt_tokens must be an integer"),
    ({"temperature": 0}, "temperature must be a number > 0"),
    ({"mix": "replace"}, "mix must be one of"),
    ([200], "must be a mapping"),
])
def test_bad_settings_are_refused_when_the_recipe_loads(tmp_path, tiny_lm_dir, section, match):
    with pytest.raises(ValueError, match=match):
        load_recipe(_recipe(tmp_path, tiny_lm_dir, section))


def test_settings_fill_defaults_and_can_be_switched_off():
    assert tt.settings(None) == {} and tt.settings(False) == {}
    assert tt.settings(True) == tt.DEFAULTS
    assert tt.settings({"sequences": 3}) == {**tt.DEFAULTS, "sequences": 3}


def test_sampling_is_seeded_fills_its_length_and_leaves_the_global_rng_alone(tiny_lm_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).train()
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    heads = tt.prompts(tok, ["The quick brown fox", "Double rounding derives"], 3, prompt_tokens=2)
    assert heads[2] == heads[0] and len(heads[0]) == 2  # cycles through the documents
    state = torch.get_rng_state()
    a = tt.sample(model, tok, heads, tokens=12, seed=0, batch=2)
    assert torch.equal(torch.get_rng_state(), state) and model.training  # caller's RNG and mode given back
    assert tt.sample(model, tok, heads, tokens=12, seed=0, batch=2) == a
    assert tt.sample(model, tok, heads, tokens=12, seed=1, batch=2) != a
    # each row: its prompt, then 12 new tokens, none of them special (suppressed: every row fills its length)
    assert [r[:2] for r in a] == heads and all(len(r) == 14 and not set(r) & set(tok.all_special_ids) for r in a)


def test_recipe_trains_on_the_sampled_text_and_caches_it(tmp_path, tiny_lm_dir, monkeypatch):
    out = tmp_path / "o"
    path = _recipe(tmp_path, tiny_lm_dir, {"sequences": 3, "tokens": 40, "prompt_tokens": 2, "mix": "only"})
    tr = build_trainer(load_recipe(path, 1, str(out)))
    lines = (out / tt.CACHE_NAME).read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines[1:]]
    header = json.loads(lines[0])["settings"]
    assert len(texts) == 3 and header["sequences"] == 3 and header["model"] == str(tiny_lm_dir)
    tok = tr.processing_class
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    ids = [i for t in texts for i in tok(t, add_special_tokens=False)["input_ids"] + sep]
    assert tr.train_dataset.blocks == [ids[i * 32:(i + 1) * 32] for i in range(len(ids) // 32)]
    tr.train()
    assert tr.state.global_step == 1

    def no_sampling(*a, **k):
        raise AssertionError("the cached text should have been reused")

    monkeypatch.setattr(tt, "sample", no_sampling)
    again = build_trainer(load_recipe(path, 1, str(out)))  # e.g. a resumed run: same settings, no sampling
    assert again.train_dataset.blocks == tr.train_dataset.blocks
    monkeypatch.undo()
    mixed = _recipe(tmp_path / "add", tiny_lm_dir, {"sequences": 3, "tokens": 40, "prompt_tokens": 2, "mix": "add"})
    both = build_trainer(load_recipe(mixed, 1, str(out)))  # same sampled text (cached), now beside the file's text
    docs = interleave([load_texts(yaml.safe_load(mixed.read_text())["data"]), texts])
    assert both.train_dataset.blocks == pack_blocks(tok, docs, 32).blocks
    assert len(both.train_dataset) > len(tr.train_dataset)
