"""The benchmark scripts a GPU session runs unattended: their CPU smoke modes finish and report what they promise."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_qat_step_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_qat_step

    res = bench_qat_step.main(["--smoke", "--workdir", str(tmp_path), "--out", str(tmp_path / "r.jsonl")])
    assert res["device"] == "cpu" and res["model"] == "tiny"
    assert set(res["ratio_to_5_float"]) == {"joint accumulate", "joint step-per-bit"}
    assert all(v > 0 for v in res["ratio_to_5_float"].values())
    assert (tmp_path / "r.jsonl").read_text().count("\n") == 1
    sys.modules.pop("bench_qat_step", None)
