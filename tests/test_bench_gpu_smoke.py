"""benchmarks/bench_gpu.py --smoke (CPU, Triton interpreter, tiny shapes) runs end to end, so the script the lead runs
once on a GPU cannot rot. Its timings mean nothing; what is checked is that every section produced its rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "smoke.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--budget", "600",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["errors"] == [], res["errors"]
    assert res["selftest"] and all(r["ok"] for r in res["selftest"])
    assert len(res["fq_selftest"]) == 15 and all(r["ok"] for r in res["fq_selftest"])  # 3 scale kinds x 5 widths
    assert {r["kernel"] for r in res["layers"]} == {"triton"}
    assert {r["bits"] for r in res["layers"]} == {8, 4, 3} and {r["M"] for r in res["layers"]} == {1, 16}
    assert {r["setting"] for r in res["model"]} == {"bf16", "w8", "w4", "w4+head"}
    assert all(r["kernels"] == ["triton"] for r in res["model"] if r["setting"] != "bf16")
    assert res["switch"]["8->4"]["cold_s"] > 0
    tail = proc.stdout.rstrip().splitlines()[-4:]  # the table, the targets and the summary come last
    assert any(x.startswith("Targets (issue 12)") for x in tail) and tail[-1].startswith("one-token forward")


def test_gpu_tune_smoke(tmp_path):
    """benchmarks/gpu_tune.py --smoke: the config sweep runs end to end and ranks the configs it timed."""
    pytest.importorskip("triton")
    out = tmp_path / "tune.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_tune.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {(r["bits"], r["path"]) for r in res["rows"]} == {(b, p) for b in (8, 4, 3) for p in ("gemv", "gemm")}
    assert [r["cfg"] for r in res["ranking"]["gemv"]] and all(r["best"]["us"] > 0 for r in res["rows"])
