"""Loading a switchable checkpoint in a process where abs_llm was never imported: loud error, or self-registration."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import abs_llm
from abs_llm import DoubleRoundingConfig, set_bits
from abs_llm.remote_code import AUTO_MAP, REMOTE_MODULE

ROOT = Path(__file__).resolve().parents[1]

# Makes `import abs_llm` fail the way it does when the package is not installed (the editable install would find it).
BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "abs_llm" or name.startswith("abs_llm."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Block())
"""


def _run(code: str, ckpt, tmp_path, block=False):
    script = (BLOCK if block else "") + "import sys\nassert 'abs_llm' not in sys.modules\n" + code
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_MODULES_CACHE=str(tmp_path / "hf_modules"), ABS_LLM_CKPT=str(ckpt))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def qckpt(tiny_llama, tokens, tmp_path):
    abs_llm.quantize(tiny_llama, DoubleRoundingConfig(bits=4, candidate_bits=[8, 4, 2]))
    set_bits(tiny_llama, 4)
    with torch.no_grad():
        ref = tiny_llama(tokens).logits
    path = tmp_path / "q"
    tiny_llama.save_pretrained(path)
    torch.save({"tokens": tokens, "logits": ref}, tmp_path / "ref.pt")
    return path


def test_checkpoint_carries_auto_map_and_shim(qckpt):
    cfg = json.loads((qckpt / "config.json").read_text())
    assert cfg["auto_map"] == AUTO_MAP
    assert "import abs_llm" in (qckpt / f"{REMOTE_MODULE}.py").read_text()


def test_plain_load_without_abs_llm_fails_loudly(qckpt, tmp_path):
    r = _run(
        "import os\nfrom transformers import AutoModelForCausalLM\n"
        "AutoModelForCausalLM.from_pretrained(os.environ['ABS_LLM_CKPT'])\nprint('LOADED')",
        qckpt, tmp_path,
    )
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "RuntimeError" in r.stderr and "ignore_mismatched_sizes" in r.stderr
    assert "double_rounding" in r.stderr  # transformers' warning names the unknown quant method
    assert "MISSING" in r.stderr  # and the load report lists the float weights it did not find


def test_trust_remote_code_self_registers(qckpt, tmp_path):
    r = _run(
        "import os, torch\nfrom transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(os.environ['ABS_LLM_CKPT'], trust_remote_code=True)\n"
        "assert 'abs_llm' in sys.modules\n"
        "from abs_llm import SwitchableLinear, get_bits\n"
        "assert isinstance(m.model.layers[0].self_attn.q_proj, SwitchableLinear) and get_bits(m) == 4\n"
        "ref = torch.load(os.path.join(os.path.dirname(os.environ['ABS_LLM_CKPT']), 'ref.pt'))\n"
        "with torch.no_grad():\n    out = m(ref['tokens']).logits\n"
        "assert torch.equal(out, ref['logits'])\nprint('OK')",
        qckpt, tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK" in r.stdout


def test_trust_remote_code_without_package_names_it(qckpt, tmp_path):
    r = _run(
        "import os\nfrom transformers import AutoModelForCausalLM\n"
        "AutoModelForCausalLM.from_pretrained(os.environ['ABS_LLM_CKPT'], trust_remote_code=True)",
        qckpt, tmp_path, block=True,
    )
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "abs_llm" in r.stderr.splitlines()[-1]
