"""Checkpoint integrity: per-tensor digests recorded at save and verified at load (crash-safe saves: saving.py).

- Every ``*.safetensors`` file of a switchable checkpoint carries ``abs_llm.digests`` in its header: the SHA-256 of
  each tensor's raw bytes, so a flipped byte, a swapped scale or a replaced tensor is reported by name.
- The header also records a digest of its own tensor table (``abs_llm.header_digest``: names, dtypes, shapes,
  offsets), so a dtype edited in place (same bytes, other meaning) is caught, and the model-defining part of
  ``config.json`` (``abs_llm.config``: everything but the run-time choices in :data:`RUNTIME_QUANT_KEYS`), so a config
  edited or corrupted after save is refused with the differing fields named instead of building another model.

Verification is on by default; ``ABS_LLM_VERIFY=0`` or ``with abs_llm.integrity.verification(False):`` skips it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
from pathlib import Path


DIGESTS_KEY = "abs_llm.digests"
HEADER_KEY = "abs_llm.header_digest"
CONFIG_KEY = "abs_llm.config"
# quantization_config fields a user may change after save (they choose how the stored weights run, not what they are):
# left out of the config record, and validated by DoubleRoundingConfig / the loader instead.
RUNTIME_QUANT_KEYS = ("bits", "layer_bits", "kernel", "hessian_traces")
# top-level config.json fields that describe where a checkpoint came from, not what it computes (lineage.py)
LINEAGE_KEYS = ("abs_llm_source",)
_verify_override: bool | None = None
# Weight files that transformers itself removes when it re-saves into a folder: never carried over from the old copy.
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model|adapter_model).*\.(safetensors|bin)$|.*\.index\.json$")


def read_header(file) -> tuple[dict, int]:
    """The safetensors JSON header and the byte offset where the data section starts (``ValueError`` naming the file
    for anything that is not a readable header)."""
    size = os.path.getsize(file)
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: truncated safetensors file ({len(head)} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:  # checked before reading: a corrupted length must not allocate n bytes
            raise ValueError(f"{file}: truncated or corrupted safetensors header (declares {n} bytes; the file has {size})")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise ValueError(f"{file}: corrupted safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: corrupted safetensors header (not a JSON object)")
    return header, 8 + n


def table_digest(header: dict) -> str:
    """SHA-256 of a header's tensor table (every entry but ``__metadata__``), canonical JSON."""
    table = {k: v for k, v in header.items() if k != "__metadata__"}
    return hashlib.sha256(json.dumps(table, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def meta_json(file, header_meta: dict, key: str, kind: type):
    """``json.loads`` of one header metadata entry, which must decode to ``kind``; ``None`` when absent."""
    raw = header_meta.get(key)
    if raw is None:
        return None
    try:
        if not isinstance(raw, str):
            raise ValueError(f"a {type(raw).__name__}, not a string")
        value = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{file}: unreadable '{key}' in the safetensors metadata ({e})") from None
    if not isinstance(value, kind):
        raise ValueError(f"{file}: '{key}' in the safetensors metadata is a {type(value).__name__}, expected a "
                         f"{kind.__name__}")
    return value


# ---- config.json record ---------------------------------------------------------------------------------------------
def read_config(path) -> dict:
    """A ``config.json`` as a dict (``ValueError`` naming the file when it is not a JSON object)."""
    try:
        cfg = json.loads(Path(path).read_bytes())
    except ValueError as e:
        raise ValueError(f"{path}: not a valid JSON file ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(cfg).__name__}")
    return cfg


def config_record(cfg: dict) -> dict:
    """The part of a ``config.json`` that defines the model (see :data:`RUNTIME_QUANT_KEYS`)."""
    out = {k: v for k, v in cfg.items() if k not in LINEAGE_KEYS}
    q = out.get("quantization_config")
    if isinstance(q, dict):
        out["quantization_config"] = {k: v for k, v in q.items() if k not in RUNTIME_QUANT_KEYS}
    return out


def _differences(saved, now, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now)):
            if k not in saved or k not in now:
                out.append(prefix + k)
            else:
                out += _differences(saved[k], now[k], f"{prefix}{k}.")
        return out
    same = type(saved) is type(now) and saved == now  # 1 == 1.0 == True in Python, not in a config
    return [] if same else [prefix.rstrip(".")]


def verify_config(file, header_meta: dict, config_path=None) -> None:
    """Refuse a ``config.json`` (default: next to ``file``) whose model-defining fields differ from those recorded in
    ``file``'s header at save time. Checkpoints saved without a record are not checked."""
    saved = meta_json(file, header_meta, CONFIG_KEY, dict)
    path = Path(config_path) if config_path is not None else Path(file).parent / "config.json"
    if saved is None or not path.is_file():
        return
    diff = _differences(saved, config_record(read_config(path)))
    if diff:
        raise ValueError(f"{path} differs from the config recorded at save time in {file} ('{CONFIG_KEY}') in "
                         f"{diff[:5]}: one of them was edited or corrupted after save; re-save the model with "
                         "save_pretrained, or load with ABS_LLM_VERIFY=0 if the edit is intended")


def file_digests(file) -> dict[str, str]:
    """SHA-256 of each tensor's raw bytes as stored (read through mmap, no torch, no copy of the file)."""
    header, start = read_header(file)
    size = os.path.getsize(file)
    out = {}
    with open(file, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            if start + b > size:
                raise ValueError(f"{file}: truncated: tensor {name} ends past the end of the file")
            out[name] = hashlib.sha256(mm[start + a:start + b]).hexdigest()
    return out


def verify_enabled() -> bool:
    if _verify_override is not None:
        return _verify_override
    return os.environ.get("ABS_LLM_VERIFY", "1").lower() not in ("0", "false", "no")


@contextlib.contextmanager
def verification(enabled: bool):
    """Temporarily turn digest verification on or off for loads in this process."""
    global _verify_override
    old, _verify_override = _verify_override, enabled
    try:
        yield
    finally:
        _verify_override = old


def add_digests(file: Path, extra: dict[str, str] | None = None) -> None:
    """Record each tensor's digest, the tensor table's digest and ``extra`` metadata in the header of one safetensors
    file, and write the header canonically (sorted keys) so the same weights always give the same bytes. The data
    section is copied unchanged."""
    header, start = read_header(file)
    meta = dict(header.pop("__metadata__", None) or {})
    meta[DIGESTS_KEY] = json.dumps(file_digests(file), sort_keys=True)
    meta[HEADER_KEY] = table_digest(header)
    meta.update(extra or {})
    canonical = {"__metadata__": dict(sorted(meta.items())), **{k: header[k] for k in sorted(header)}}
    enc = json.dumps(canonical, separators=(",", ":")).encode()
    enc += b" " * (-len(enc) % 8)  # the format aligns the data section to 8 bytes
    tmp = file.with_name(file.name + ".digesting")
    with open(file, "rb") as src, open(tmp, "wb") as dst:
        dst.write(struct.pack("<Q", len(enc)) + enc)
        src.seek(start)
        shutil.copyfileobj(src, dst, 16 << 20)
    os.replace(tmp, file)


def verify_file(file, header_meta: dict) -> None:
    """Raise ``ValueError`` naming the tensors whose bytes differ from the digests written at save time."""
    raw = header_meta.get(DIGESTS_KEY)
    if raw is None:
        raise ValueError(
            f"{file}: no '{DIGESTS_KEY}' in the safetensors metadata, so its integrity cannot be checked; re-save it with"
            " abs_llm, or load with ABS_LLM_VERIFY=0 if you trust it"
        )
    expected = meta_json(file, header_meta, DIGESTS_KEY, dict)
    actual = file_digests(file)
    if set(actual) != set(expected):
        raise ValueError(f"{file}: tensors {sorted(set(actual) ^ set(expected))[:5]} added or removed since save")
    bad = sorted(k for k in actual if actual[k] != expected[k])
    if bad:
        raise ValueError(f"{file}: tensor(s) {bad[:5]} do not match their save-time digests (corrupted or tampered)")
    table = header_meta.get(HEADER_KEY)  # same bytes, but another dtype, shape or offset: another tensor
    if table is not None and table != table_digest(read_header(file)[0]):
        raise ValueError(f"{file}: the tensor table (names, dtypes, shapes, offsets) differs from the one written at "
                         "save time (corrupted or tampered)")
