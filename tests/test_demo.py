"""The demo's side-by-side table and plot (the full run needs the real model: `make demo`)."""

from __future__ import annotations

from abs_llm.demo import _delta, _table, plot_methods

ROWS = [{"method": "fp32", "bits": "fp32", "ppl": 30.0, "bytes": 500e6, "answers": ["Paris."]}] + [
    {"method": m, "bits": b, "ppl": p, "bytes": b * 20e6, "answers": None}
    for m, pp in (("gptq", (30.1, 30.5, 33.0)), ("rtn", (30.1, 31.2, 300.0))) for b, p in zip((8, 4, 3), pp)]


def test_table_puts_methods_side_by_side():
    lines = _table(ROWS, 30.0, [8, 4, 3]).splitlines()
    assert lines[0] == "| bits | gptq PPL | gptq vs FP | rtn PPL | rtn vs FP | size at this width |"
    assert lines[2] == "| fp32 | 30.00 | - | 30.00 | - | 500.0 MB |"
    assert lines[4] == "| 4 | 30.50 | +1.7% | 31.20 | +4.0% | 80.0 MB |"
    assert lines[5] == "| 3 | 33.00 | +10.0% | 300.00 | x10.0 | 60.0 MB |"


def test_delta_formats():
    assert (_delta(33.0, 30.0), _delta(90.0, 30.0), _delta(3e6, 30.0)) == ("+10.0%", "x3.0", "x1.0e+05")


def test_plot_is_written(tmp_path):
    path = plot_methods(ROWS, tmp_path / "p.png", title="t")
    assert (tmp_path / "p.png").stat().st_size > 1000 and path.endswith("p.png")
