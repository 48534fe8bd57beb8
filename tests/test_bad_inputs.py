"""Bad-input catalogue: every entry point refuses bad input with the exception type and a message that names the
offending value and what is allowed. Table-driven; the run prints how many cases were tried."""

import contextlib
import io

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

import abs_llm
from abs_llm import DoubleRoundingConfig, SwitchableLinear, core, get_bits, set_bits
from abs_llm.cli import main as cli
from tests._report import RELIABILITY
from tests.conftest import tiny_llama_config


class CLIError(Exception):
    pass


def run_cli(*argv):
    """Run the CLI; argparse errors (exit 2) and our SystemExit messages become CLIError(stderr text)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = cli(list(argv))
        except SystemExit as e:
            raise CLIError(f"{err.getvalue()} {e.code}") from None
    if rc:
        raise CLIError(err.getvalue())


def tiny_q(bits=8, cands=(8, 4, 2)):
    torch.manual_seed(0)
    m = LlamaForCausalLM(tiny_llama_config())
    return abs_llm.quantize(m, DoubleRoundingConfig(bits=bits, candidate_bits=list(cands)))


def nan_model():
    m = LlamaForCausalLM(tiny_llama_config())
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight[3, 3] = float("nan")
    return m


def layer(cands=(8, 4)):
    return SwitchableLinear(32, 16, master_bits=8, candidate_bits=cands, group_size=16)


def _a_file():
    import tempfile

    return tempfile.NamedTemporaryFile(delete=False, suffix=".txt").name


def _setattr(obj, name, value):
    setattr(obj, name, value)


def trainer(model=None, lr=1e-3, teacher="copy", rows=4, **mb):
    """A MultiBitTrainer on the tiny model (built only to be refused: validation runs before any training)."""
    import copy

    import datasets
    from transformers import TrainingArguments

    from abs_llm.training import MultiBitConfig, MultiBitTrainer

    model = model if model is not None else tiny_q(cands=(8, 4, 2))
    for m in abs_llm.switchable_layers(model).values():
        m.to_trainable()
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * rows, "labels": [[1, 2, 3, 4]] * rows})
    args = TrainingArguments(output_dir="unused", learning_rate=lr, report_to=[], use_cpu=True)
    t = copy.deepcopy(model) if teacher == "copy" else teacher
    return MultiBitTrainer(model=model, args=args, multibit=MultiBitConfig(**mb), teacher=t, train_dataset=ds)


def recipe(tmp_text: str):
    import tempfile

    from abs_llm.recipe import load_recipe

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(tmp_text)
    return load_recipe(f.name)


def traces(**override):
    return {**{n: 1.0 for n in abs_llm.switchable_layers(tiny_q())}, **override}


def search(**kw):
    from abs_llm import hasb

    return hasb.search(tiny_q(), kw.pop("t", None) or traces(), **kw)


Q = "model.layers.0.self_attn.q_proj"
CASES = {
    # ---- config -------------------------------------------------------------------------------------------------
    "config master_bits 6": (lambda: DoubleRoundingConfig(master_bits=6), ValueError, r"master_bits=6 .*\[4, 8\]"),
    "config master_bits '8'": (lambda: DoubleRoundingConfig(master_bits="8"), ValueError, r"master_bits='8' .*\[4, 8\]"),
    "config bits not candidate": (lambda: DoubleRoundingConfig(bits=5, candidate_bits=[8, 4]), ValueError, r"bits=5 .*\[4, 8\]"),
    "config bits bool": (lambda: DoubleRoundingConfig(bits=True), ValueError, r"bits=True .*\[2, 3, 4, 6, 8\]"),
    "config candidate 9": (lambda: DoubleRoundingConfig(candidate_bits=[8, 9]), ValueError, r"entry=9 .*\[2, 3, 4, 5, 6, 7, 8\]"),
    "config candidate 1": (lambda: DoubleRoundingConfig(candidate_bits=[8, 1]), ValueError, r"entry=1 .*\[2, 3, 4, 5, 6, 7, 8\]"),
    "config 8 from int4 master": (lambda: DoubleRoundingConfig(master_bits=4, bits=4, candidate_bits=[8, 4]), ValueError,
                                  r"entry=8 .*\[2, 3, 4\]"),
    "config empty candidates": (lambda: DoubleRoundingConfig(candidate_bits=[]), ValueError, r"non-empty .*\[2, 3, 4, 5, 6, 7, 8\]"),
    "config duplicate candidates": (lambda: DoubleRoundingConfig(candidate_bits=[8, 4, 4]), ValueError, r"duplicates: \[8, 4, 4\]"),
    "config group 48": (lambda: DoubleRoundingConfig(group_size=48), ValueError, r"power of two in \[16, 1024\], got 48"),
    "config group 8": (lambda: DoubleRoundingConfig(group_size=8), ValueError, r"power of two in \[16, 1024\], got 8"),
    "config group 2048": (lambda: DoubleRoundingConfig(group_size=2048), ValueError, r"\[16, 1024\], got 2048"),
    "config group -64": (lambda: DoubleRoundingConfig(group_size=-64), ValueError, r"\[16, 1024\], got -64"),
    "config layer_bits value": (lambda: DoubleRoundingConfig(candidate_bits=[8, 4], bits=8, layer_bits={"a.b": 3}), ValueError,
                                r"layer_bits\['a.b'\]=3 .*\[4, 8\]"),
    "config layer_bits type": (lambda: DoubleRoundingConfig(layer_bits=[("a", 4)]), ValueError, r"layer_bits must be a dict .*list"),
    "config skip list is a str": (lambda: DoubleRoundingConfig(modules_to_not_convert="lm_head"), ValueError,
                                  r"list of names, got 'lm_head'"),
    "config future format": (lambda: DoubleRoundingConfig(format_version=9), ValueError, r"format_version 9 .*supports \(1\)"),
    "config unknown field": (lambda: DoubleRoundingConfig(bitz=4), ValueError, r"unknown fields \['bitz'\]"),
    # ---- layer / math -------------------------------------------------------------------------------------------
    "layer bits not candidate": (lambda: _setattr(layer(), "bits", 6), ValueError, r"bits=6 .*allowed \[8, 4\]"),
    "layer candidate above master": (lambda: SwitchableLinear(16, 16, master_bits=4, candidate_bits=(8, 4)), ValueError,
                                     r"\[8\] not derivable from a 4-bit master; allowed \[2, 3, 4\]"),
    "layer group size": (lambda: SwitchableLinear(16, 16, group_size=100), ValueError, r"\[16, 1024\], got 100"),
    "layer NaN weights": (lambda: SwitchableLinear.from_linear(nn.Linear(4, 4).requires_grad_(False).apply(
        lambda m: m.weight.fill_(float("inf"))), name="blk"), ValueError, "blk has NaN or inf weights"),
    "layer master shape": (lambda: layer().set_master(torch.zeros(3, 3, dtype=torch.int8)), ValueError,
                           r"master shape \(3, 3\) != \(16, 32\)"),
    "layer master range": (lambda: SwitchableLinear(32, 16, master_bits=4, candidate_bits=(4,), group_size=16).set_master(
        torch.full((16, 32), 9, dtype=torch.int8)), ValueError, r"outside \[-8, 7\]"),
    "derive above master": (lambda: core.derive(torch.zeros(1, 1, dtype=torch.int8), 4, 6), ValueError,
                            "cannot derive 6 bits from a 4-bit master"),
    "pack int4 range": (lambda: core.pack_int4(torch.tensor([[-9]])), ValueError, r"\[-8, 7\]"),
    "alrs bits above master": (lambda: core.alrs_multiplier(4, 8), ValueError, "bits 8 exceed master bits 4"),
    # ---- switching ----------------------------------------------------------------------------------------------
    "set_bits not candidate": (lambda: set_bits(tiny_q(), 6), ValueError, r"bits=6 .*allowed \[2, 4, 8\]"),
    "set_bits string": (lambda: set_bits(tiny_q(), "4"), ValueError, r"bits='4' .*allowed \[2, 4, 8\]"),
    "set_bits bool": (lambda: set_bits(tiny_q(), True), ValueError, r"bits=True .*allowed \[2, 4, 8\]"),
    "set_bits unknown layer": (lambda: set_bits(tiny_q(), {"model.layers.7.mlp": 4}), ValueError,
                               r"unknown layer names \['model.layers.7.mlp'\]; expected .* such as \['model.layers.0"),
    "set_bits per-layer value": (lambda: set_bits(tiny_q(), {Q: 3}), ValueError, rf"bits=3 for {Q} .*allowed \[2, 4, 8\]"),
    "set_bits float model": (lambda: set_bits(LlamaForCausalLM(tiny_llama_config()), 4), ValueError,
                             "no SwitchableLinear layers; quantize it first"),
    "get_bits float model": (lambda: get_bits(LlamaForCausalLM(tiny_llama_config())), ValueError, "no SwitchableLinear"),
    # ---- quantize / save / load ---------------------------------------------------------------------------------
    "quantize NaN weights": (lambda: abs_llm.quantize(nan_model()), ValueError,
                             "model.layers.0.mlp.down_proj has NaN or inf weights"),
    "quantize twice": (lambda: abs_llm.quantize(tiny_q()), ValueError, "already quantized .* use set_bits"),
    "quantize wrong config type": (lambda: abs_llm.quantize(LlamaForCausalLM(tiny_llama_config()), {"bits": 4}), TypeError,
                                   "must be a DoubleRoundingConfig, got dict"),
    "quantize skips everything": (lambda: abs_llm.quantize(LlamaForCausalLM(tiny_llama_config()),
                                                           DoubleRoundingConfig(modules_to_not_convert=["model"])),
                                  ValueError, "no nn.Linear layer left to quantize"),
    "save onto a file": (lambda: tiny_q().save_pretrained(_a_file()), ValueError, "exists and is not a directory"),
    # ---- CLI ----------------------------------------------------------------------------------------------------
    "cli master bits": (lambda: run_cli("quantize", "--out", "x", "--master-bits", "6"), CLIError,
                        r"invalid choice: 6 \(choose from 8, 4\)"),
    "cli group size word": (lambda: run_cli("quantize", "--out", "x", "--group-size", "big"), CLIError,
                            r"integer or 'none', got 'big'"),
    "cli candidate list": (lambda: run_cli("quantize", "--out", "x", "--candidate-bits", "8,x"), CLIError,
                           r"comma-separated integers like 8,4,2, got '8,x'"),
    "cli config check before loading": (lambda: run_cli("quantize", "--out", "x", "--group-size", "96"), CLIError,
                                        r"\[16, 1024\], got 96"),
    "cli unknown command": (lambda: run_cli("quantise"), CLIError, r"invalid choice: 'quantise'"),
    "cli search without budget": (lambda: run_cli("search", "ckpt", "--out", "x"), CLIError,
                                  "give --avg-bits or --size-bytes"),
    "cli train missing recipe": (lambda: run_cli("train", "no/such/recipe.yaml"), CLIError,
                                 "recipe no/such/recipe.yaml does not exist"),
    # ---- training (all refused in MultiBitTrainer.__init__, before any step) ------------------------------------
    "train float model": (lambda: trainer(LlamaForCausalLM(tiny_llama_config())), ValueError,
                          "no SwitchableLinear layers; quantize it first"),
    "train bits not candidate": (lambda: trainer(bits=[8, 6]), ValueError, r"bits \[8, 6\] .*allowed \[2, 4, 8\]"),
    "train learning rate 0": (lambda: trainer(lr=0.0), ValueError, "learning_rate must be > 0, got 0"),
    "train scale lr negative": (lambda: trainer(scale_lr=-1e-4), ValueError, "scale_lr must be > 0, got -0.0001"),
    "train kd mode": (lambda: trainer(kd="self"), ValueError, r"kd must be one of \('teacher', 'inplace', 'none'\), got 'self'"),
    "train kd without teacher": (lambda: trainer(teacher=None), ValueError, "needs the frozen float model"),
    "train empty dataset": (lambda: trainer(rows=0), ValueError, "training dataset is empty"),
    "train bit weight of untrained bits": (lambda: trainer(bits=[8, 4], bit_weights={2: 1.0}), ValueError,
                                           r"bit_weights has bits 2, which is not trained \(bits=\[8, 4\]\)"),
    "train all bit weights 0": (lambda: trainer(bit_weights={8: 0, 4: 0, 2: 0}), ValueError, "all bit_weights are 0"),
    "train per-bit state without step_per_bit": (lambda: trainer(per_bit_scale_state=True), ValueError,
                                                 "per_bit_scale_state needs step_per_bit=True"),
    "train hasb without traces": (lambda: trainer(hasb=True), ValueError, "hasb=True needs Hessian traces"),
    "recipe unknown key": (lambda: recipe("modle: x\n"), ValueError, r"unknown top level keys \['modle'\]"),
    "recipe max_steps 0": (lambda: recipe("train: {max_steps: 0}\n"), ValueError,
                           "max_steps must be an integer >= 1, got 0"),
    "recipe learning rate 0": (lambda: recipe("train: {learning_rate: 0}\n"), ValueError,
                               "learning_rate must be > 0, got 0"),
    "recipe empty text file": (lambda: __import__("abs_llm.recipe").recipe.load_texts({"source": _a_file()}), ValueError,
                               "holds no non-empty text"),
    # ---- HASB search ----------------------------------------------------------------------------------------------
    "search budget below minimum": (lambda: search(avg_bits=1.5), ValueError,
                                    r"avg_bits=1.5 is outside the feasible range \[2, 8\]"),
    "search budget above maximum": (lambda: search(avg_bits=9), ValueError, r"avg_bits=9 is outside the feasible range \[2, 8\]"),
    "search size infeasible": (lambda: search(size_bytes=10), ValueError,
                               r"size_bytes=10 is infeasible; the feasible range is \[\d+, \d+\]"),
    "search unknown layer trace": (lambda: search(t=traces(**{"model.layers.9.mlp.up_proj": 1.0}), avg_bits=4), ValueError,
                                   "unknown layer"),
    "search NaN trace": (lambda: search(t=traces(**{Q: float("nan")}), avg_bits=4), ValueError, f"NaN/inf/non-number for \\['{Q}'\\]"),
    "hessian samples 0": (lambda: __import__("abs_llm.hasb").hasb.hessian_traces(tiny_q(), [torch.ones(1, 4).long()],
                                                                               n_samples=0),
                          ValueError, "n_samples must be an integer >= 1, got 0"),
    "hasb sigma range": (lambda: __import__("abs_llm.hasb").hasb.HASBSampler(tiny_q(), traces(), sigma_min=0.5,
                                                                            sigma_max=0.2),
                         ValueError, r"0 <= sigma_min <= sigma_max <= 1, got 0.5, 0.2"),
    # ---- self-speculative draft (issue 13) -------------------------------------------------------------------------
    "draft bits not candidate": (lambda: abs_llm.draft_model(tiny_q(), bits=3), ValueError,
                                 r"draft bits=3 is not a candidate bit-width; allowed \[2, 4, 8\]"),
    "draft layer bits not candidate": (lambda: abs_llm.draft_model(tiny_q(), bits={Q: 6}), ValueError,
                                       f"draft bits=6 for {Q} is not a candidate bit-width; allowed \\[2, 4, 8\\]"),
    "draft unknown layer": (lambda: abs_llm.draft_model(tiny_q(), bits={"model.nope": 4}), ValueError,
                            r"unknown layer 'model.nope'"),
    "draft of a float model": (lambda: abs_llm.draft_model(LlamaForCausalLM(tiny_llama_config()), bits=4), ValueError,
                               "no SwitchableLinear layers; quantize it first"),
    "draft K 0": (lambda: abs_llm.draft_model(tiny_q(), bits=4, num_assistant_tokens=0), ValueError,
                  "num_assistant_tokens must be a positive integer, got 0"),
    "draft head bits 9": (lambda: abs_llm.draft_model(tiny_q(), bits=4, head_bits=9), ValueError,
                          r"head_bits=9 is not derivable from an INT8 master"),
    "generate dtype": (lambda: run_cli("generate", "/nonexistent", "--prompt", "x", "--dtype", "int8"), CLIError,
                       r"dtype='int8'; choose one of"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case):
    fn, exc, match = CASES[case]
    with pytest.raises(exc, match=match):
        fn()
    RELIABILITY["bad inputs tried"] += 1


def test_cli_refuses_non_empty_output_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(CLIError, match=rf"{tmp_path} exists and is not empty; pass --overwrite"):
        run_cli("quantize", "--out", str(tmp_path))
    assert (tmp_path / "keep.txt").read_text() == "user data"
    RELIABILITY["bad inputs tried"] += 1


def test_demo_refuses_foreign_output_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(CLIError, match="holds something other than a previous demo"):
        run_cli("demo", "--out", str(tmp_path))
    assert (tmp_path / "keep.txt").read_text() == "user data"
    RELIABILITY["bad inputs tried"] += 1


def test_catalogue_size():
    assert len(CASES) >= 40
