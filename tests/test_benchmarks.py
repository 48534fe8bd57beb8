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


def test_bench_qat_plot_draws_every_run_from_its_start(tmp_path, monkeypatch):
    """``bench_qat.py plot``: one panel per width, one line per tagged run, the ``ptq --init`` line of the same
    checkpoint as step 0; a tag with no curve is refused by name."""
    import json

    import pytest

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_qat

    knobs_b = ["lr_scheduler_type=warmup_stable_decay",
               "lr_scheduler_kwargs={num_stable_steps: 70, num_decay_steps: 30}"]
    label_b = ("b: lr_scheduler_type=warmup_stable_decay,\n"  # wrapped: a long label must not run off the image
               "    lr_scheduler_kwargs={num_stable_steps: 70, num_decay_steps: 30}")
    lines = [{"what": "ptq", "init": "M", "tag": "START", "w8": 30.0, "w4": 40.0},
             {"what": "qat", "tag": "a", "init": "M", "set": ["train.learning_rate=3e-6", "train.save_strategy='no'"],
              "curve": [{"step": 20, "w8": 29.0, "w4": 35.0}, {"step": 40, "w8": 28.9, "w4": 34.0}]},
             {"what": "qat", "tag": "b", "init": None, "set": [f"train.{k}" for k in knobs_b],
              "curve": [{"step": 20, "w8": 29.5, "w4": 36.0}]}]
    res = tmp_path / "r.jsonl"
    res.write_text("".join(json.dumps(x) + "\n" for x in lines))
    drawn = []  # (label, points) per line, panels in order 8-bit then 4-bit
    import matplotlib.axes

    orig = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: (
        drawn.append((k.get("label"), list(zip(*a)))), orig(ax, *a, **k))[1])
    bench_qat.plot_curves(str(res), ["a", "b"], str(tmp_path / "c.png"), fp=28.0)
    assert (tmp_path / "c.png").stat().st_size > 0
    assert drawn == [("a: learning_rate=3e-6", [(0, 30.0), (20, 29.0), (40, 28.9)]),  # the start, then the curve
                     (label_b, [(20, 29.5)]),  # no start line for its checkpoint
                     ("a: learning_rate=3e-6", [(0, 40.0), (20, 35.0), (40, 34.0)]), (label_b, [(20, 36.0)])]
    with pytest.raises(SystemExit, match=r"\['c'\]"):
        bench_qat.plot_curves(str(res), ["a", "c"], str(tmp_path / "c.png"))
    sys.modules.pop("bench_qat", None)


def test_bench_switch_cpu_cold_switches_pack_the_same_bytes_both_ways(monkeypatch):
    """``bench_switch_cpu.bench`` on tiny models (one per scale kind; a 128-wide MLP so that int4x2 and the fused
    kernels run): every pair's fused packs equal the eager ones, ``--cache-size 1`` keeps one width per layer, so the
    cached ping-pong is reported as not cached, and ``--timed fused`` times only the fused path."""
    import torch
    from transformers import LlamaForCausalLM

    from abs_llm import DoubleRoundingConfig, quantize, switchable_layers
    from conftest import tiny_llama_config

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_switch_cpu

    models = {}
    for g in (None, 64):
        torch.manual_seed(0)
        base = LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=192)).to(torch.bfloat16)
        models[f"group{g or 'none'}"] = m = quantize(base, DoubleRoundingConfig(group_size=g))
        with torch.inference_mode():
            m(torch.zeros(1, 4, dtype=torch.long))  # the layers learn their activation dtype, as in main()
    monkeypatch.setattr(bench_switch_cpu, "PING_PONG_SWITCHES", 3)
    for size in (None, 1):
        res = bench_switch_cpu.bench(models, repeats=1, cache_size=size)
        for key in models:
            assert all(res[key]["exact"].values()), (size, key, res[key]["exact"])
            assert res[key]["ping_pong"]["both_cached"] == (size is None), (size, key)
        assert res["cache_size"] == size
        assert ("cache size 1" in bench_switch_cpu.table(res, 1)) == (size == 1)
    assert {lay.cache_size for m in models.values() for lay in switchable_layers(m).values()} == {1}
    # --timed fused: both paths still run once for the exactness check, only the fused one is timed
    res = bench_switch_cpu.bench(models, repeats=1, timed=("fused",))
    assert all(all(res[key]["exact"].values()) for key in models)
    assert not any(k.startswith("eager") for k in res["group64"]["seconds"])
    rows = [row for row in bench_switch_cpu.table(res, 1).splitlines() if row.startswith("| 8 -> 4")]
    assert len(rows) == 1 and rows[0].split(" | ")[2] == "-" and rows[0].endswith("| - |"), rows
    sys.modules.pop("bench_switch_cpu", None)
