"""QAT recipes: YAML schema and validation, data loading and packing, the shipped recipes, a recipe with HASB."""

from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments

from abs_llm import switchable_layers
from abs_llm.recipe import build_trainer, load_recipe
from abs_llm.training import MultiBitConfig
from tests.conftest import write_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_validation(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("modle: x\n")
    with pytest.raises(ValueError, match="unknown top level keys"):
        load_recipe(bad)
    bad.write_text("train: {learning_rate: -1}\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_recipe(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("train: {max_steps: 5}\n")
    r = load_recipe(ok, max_steps=3, output_dir=str(tmp_path / "o"))
    assert r["train"]["max_steps"] == 3 and r["output_dir"] == str(tmp_path / "o")


def test_shipped_recipes_validate(tmp_path):
    for name in ("qat_smollm2_cpu.yaml", "qat_smollm2_h100.yaml"):
        r = load_recipe(ROOT / "recipes" / name, max_steps=1, output_dir=str(tmp_path / name))
        MultiBitConfig(**r["multibit"])
        TrainingArguments(output_dir=r["output_dir"], **r["train"])


def test_recipe_with_hasb_estimates_traces(tiny_lm_dir, tmp_path):
    path = write_recipe(tmp_path, tiny_lm_dir)
    r = yaml.safe_load(path.read_text())
    r["multibit"]["hasb"] = True
    path.write_text(yaml.safe_dump(r))
    tr = build_trainer(load_recipe(path, 1, str(tmp_path / "o")))
    traces = tr.model.config.quantization_config.hessian_traces
    assert set(traces) == set(switchable_layers(tr.model)) and all(map(lambda t: t == t, traces.values()))
    tr.train()
    assert "hasb_mean_bits" in tr.state.log_history[0]


@pytest.mark.parametrize("content,root_cause", [(b'{"text": "a"}\n{"text": \n', "ValueError"),
                                                (bytes(range(128, 256)) * 8, "UnicodeDecodeError")])
def test_unreadable_dataset_names_the_file_and_the_root_cause(tmp_path, content, root_cause):
    """datasets reports only "An error occurred while generating the dataset": the error names the file and the
    underlying parse error, and keeps datasets' exception as its cause."""
    from abs_llm.recipe import load_texts
    from tests._report import RELIABILITY

    f = tmp_path / ("d.jsonl" if content.startswith(b"{") else "d.txt")
    f.write_bytes(content)
    with pytest.raises(ValueError, match=rf"cannot read dataset {f} as .*\({root_cause}: ") as e:
        load_texts({"source": str(f)})
    assert type(e.value.__cause__).__name__ == "DatasetGenerationError"
    RELIABILITY["bad inputs tried"] += 1
