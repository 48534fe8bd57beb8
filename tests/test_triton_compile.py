"""The Triton kernels compile for sm_90 (H100/H200) without a GPU: triton ships ptxas, so CI catches what the
interpreter cannot (``tl.dot`` shapes and dtypes, layouts, register spills). A subprocess, because tests/conftest.py
puts this session in interpreter mode. The full set of variants: ``python benchmarks/compile_check.py``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90_without_spills():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), "--quick", "--arch", "90"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("OK")
