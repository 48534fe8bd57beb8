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
