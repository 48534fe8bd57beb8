"""lm-evaluation-harness at every bit-width, plus the bundled offline task ``abs_local_ppl``.

``abs_local_ppl`` is a rolling-loglikelihood perplexity task (like lm-eval's ``wikitext``) over the Lee corpus
held-out split (documents 250-299), or over a user text file (one document per blank-line-separated paragraph). It
reports ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte``. The task YAML, its data (JSON lines) and its
``process_results`` helper are written to a temporary folder at run time, so every path in the YAML is absolute and
valid on this machine; nothing is downloaded (the data loads through the ``datasets`` JSON builder).

Note this differs from :func:`abs_llm.perplexity`: lm-eval scores each document on its own with rolling windows of
the model's full context, and normalises by words/bytes, not tokens.
"""

from __future__ import annotations

import difflib
import json
import math
import tempfile
from pathlib import Path

LOCAL_TASK = "abs_local_ppl"

_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
process_results: !function abs_local_ppl_utils.process_results
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
  source: {source}
"""

_UTILS = '''import re


def process_results(doc, results):
    (loglikelihood,) = results
    text = doc["text"]
    n_bytes = len(text.encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, len(re.split(r"\\s+", text.strip()))),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
'''


def _read_text_file(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--text-file {path} does not exist")
    docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"--text-file {path} holds no text")
    return docs


def write_local_task(directory, texts: list[str] | None = None, text_file=None) -> Path:
    """Write the ``abs_local_ppl`` task (YAML + helper + data) into ``directory``; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if text_file is not None:
        texts, source = _read_text_file(text_file), str(Path(text_file).resolve())
    elif texts is None:
        from .data import default_corpus

        texts, source = default_corpus("eval"), "Lee corpus held-out split (docs 250-299)"
    else:
        source = "in-memory texts"
    data = directory / f"{LOCAL_TASK}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    (directory / f"{LOCAL_TASK}_utils.py").write_text(_UTILS, encoding="utf-8")
    (directory / f"{LOCAL_TASK}.yaml").write_text(
        _YAML.format(task=LOCAL_TASK, data=json.dumps(str(data.resolve())), source=json.dumps(source)), encoding="utf-8"
    )
    return directory


def task_manager(include_path=None, include_defaults: bool = True):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)


def check_tasks(tasks: list[str], manager) -> None:
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        shown = "; ".join(f"{t!r} (did you mean {h}?)" if h else repr(t) for t, h in hints.items())
        raise ValueError(f"unknown lm-eval task(s): {shown}. The offline task is {LOCAL_TASK!r}; Hub tasks need network")


def _metrics(task_result: dict) -> dict[str, float]:
    out = {}
    for key, value in task_result.items():
        metric, _, _filter = key.partition(",")
        if _filter and "stderr" not in metric and isinstance(value, (int, float)):
            out[metric] = float(value)
    return out


def lm_eval_bits(model, tokenizer, bits_list, tasks, limit=None, text_file=None, texts=None, batch_size: int = 1,
                 max_length: int | None = None, include_defaults: bool | None = None) -> list[dict]:
    """Run lm-eval ``tasks`` on ``model`` once per bit-width. Returns ``[{bits, task, metric: value...}]``.

    ``limit`` caps documents per task (lm-eval's ``--limit``); ``max_length`` caps the context window (default: the
    model's). lm-eval's built-in task index is only built when a task other than ``abs_local_ppl`` is asked for
    (``include_defaults`` overrides).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from .switching import check_bits, set_bits

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("no lm-eval task given")
    bits_list = check_bits(model, list(bits_list))
    if include_defaults is None:
        include_defaults = any(t != LOCAL_TASK for t in tasks)
    with tempfile.TemporaryDirectory(prefix="abs_llm_tasks_") as tmp:
        if LOCAL_TASK in tasks:
            write_local_task(tmp, texts=texts, text_file=text_file)
        manager = task_manager(tmp if LOCAL_TASK in tasks else None, include_defaults=include_defaults)
        check_tasks(tasks, manager)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        rows = []
        for b in bits_list:
            set_bits(model, b)
            res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                          log_samples=False, bootstrap_iters=0, verbosity="WARNING")
            for task in tasks:
                rows.append({"bits": b, "task": task, **_metrics(res["results"][task])})
    return rows


def format_lm_eval_table(rows: list[dict]) -> str:
    """One Markdown table: a row per (task, metric), a column per bit-width."""
    from .evaluation import markdown_table

    bits = sorted({r["bits"] for r in rows}, reverse=True)
    keys = []
    for r in rows:
        keys += [(r["task"], m) for m in r if m not in ("bits", "task") and (r["task"], m) not in keys]
    table = []
    for task, metric in keys:
        vals = {r["bits"]: r.get(metric) for r in rows if r["task"] == task}
        table.append([task, metric] + ["" if vals.get(b) is None or math.isnan(vals[b]) else f"{vals[b]:.4g}"
                                        for b in bits])
    return markdown_table(["task", "metric"] + [f"{b}-bit" for b in bits], table)
