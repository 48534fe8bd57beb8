"""Training data for QAT recipes without the ``datasets`` package: local text/JSON files read directly, and packed
token blocks as a plain ``torch.utils.data.Dataset`` (a GPU box may have torch + transformers + accelerate only).
``datasets`` is needed only for Hub datasets (and then the network)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def read_text_file(path: Path, field: str = "text") -> list[str]:
    """Rows of a local file, as ``datasets.load_dataset("text"|"json")`` would give them: a ``.txt`` file one row
    per line; a ``.json``/``.jsonl`` file a JSON list of records or one record per line, the text in ``field``."""
    kind = "json" if path.suffix in (".json", ".jsonl") else "text"
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot read dataset {path} as {kind}: not UTF-8 text ({type(e).__name__}: {e})") from e
    if kind == "text":
        return raw.splitlines()
    try:
        records = json.loads(raw)
        if isinstance(records, dict):
            records = [records]
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"cannot read dataset {path} as json: bad JSON ({type(e).__name__}: {e})") from e
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"dataset {path} must hold a JSON list of records or one JSON record per line")
    columns = sorted({k for r in records for k in r})
    if field not in columns:
        raise ValueError(f"dataset {path} has no column {field!r}; columns {columns} (set data.text_field)")
    return [r.get(field) for r in records]


class Blocks(torch.utils.data.Dataset):
    """Equal-length token blocks for causal-LM training: ``ds[i]`` is ``{"input_ids", "attention_mask", "labels"}``
    (lists of ints, collated by ``default_data_collator``); ``ds[a:b]`` gives each column as a list of rows, like a
    ``datasets.Dataset`` slice."""

    column_names = ["input_ids", "attention_mask", "labels"]

    def __init__(self, blocks: list[list[int]]):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i):
        if isinstance(i, slice):
            rows = self.blocks[i]
            return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows}
        row = self.blocks[i]
        return {"input_ids": row, "attention_mask": [1] * len(row), "labels": row}
