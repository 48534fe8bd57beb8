"""Checkpoint integrity: per-tensor digests recorded at save and verified at load, and crash-safe saves.

- Every ``*.safetensors`` file of a switchable checkpoint carries ``abs_llm.digests`` in its header: the SHA-256 of
  each tensor's raw bytes, so a flipped byte, a swapped scale or a replaced tensor is reported by name.
- The header also records a digest of its own tensor table (``abs_llm.header_digest``: names, dtypes, shapes,
  offsets), so a dtype edited in place (same bytes, other meaning) is caught, and the model-defining part of
  ``config.json`` (``abs_llm.config``: everything but the run-time choices in :data:`RUNTIME_QUANT_KEYS`), so a config
  edited or corrupted after save is refused with the differing fields named instead of building another model.
- ``save_pretrained`` writes into a temporary sibling directory, digests it, then swaps it with the target in one
  atomic ``renameat2(RENAME_EXCHANGE)`` (two renames where the kernel lacks it): a process killed mid-save leaves the
  previous checkpoint in place and no half-written directory under the target name. A full disk or a read-only target
  is an ``OSError`` naming the target, with the previous checkpoint untouched; two processes saving to one directory
  leave one complete checkpoint (the last to swap).

Verification is on by default; ``ABS_LLM_VERIFY=0`` or ``with abs_llm.integrity.verification(False):`` skips it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import types
import uuid
from pathlib import Path


DIGESTS_KEY = "abs_llm.digests"
HEADER_KEY = "abs_llm.header_digest"
CONFIG_KEY = "abs_llm.config"
# quantization_config fields a user may change after save (they choose how the stored weights run, not what they are):
# left out of the config record, and validated by DoubleRoundingConfig / the loader instead.
RUNTIME_QUANT_KEYS = ("bits", "layer_bits", "kernel", "hessian_traces")
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
    out = dict(cfg)
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


def prepare_output_dir(path, overwrite: bool) -> Path:
    """Refuse to write into a non-empty directory unless ``overwrite``: a user's files are never clobbered silently."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output directory {out} exists and is not empty; pass --overwrite to replace it")
    return out


# ---- crash-safe save ------------------------------------------------------------------------------------------------
def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def _carry_over(old: Path, new: Path) -> None:
    """Keep the user's other files (tokenizer, trainer checkpoints...) by hard-linking them into the new copy, so the
    old directory is untouched until the swap."""
    for entry in old.iterdir():
        dst = new / entry.name
        if dst.exists() or _WEIGHT_FILE.match(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, dst)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _save_error(target: Path, e: BaseException) -> OSError:
    """An ``OSError`` naming the target for a failed write (safetensors reports a full disk as its own error type,
    with the errno only in the text)."""
    code = getattr(e, "errno", None)
    if code is None:
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else None
    err = OSError(f"could not save to {target}: {e}; the previous contents of {target} are unchanged")
    err.errno = code  # set after: OSError(code, msg) would print the code twice
    return err


def _install(tmp: Path, target: Path) -> Path | None:
    """Put the finished copy ``tmp`` at ``target``; returns what is left to delete (the previous checkpoint)."""
    if not target.exists():
        try:
            os.rename(tmp, target)
            return None
        except OSError as e:  # another process created the target meanwhile: swap with it like any other
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    _carry_over(target, tmp)
    if _exchange(tmp, target):
        return tmp
    old = target.parent / f".{target.name}.abs_llm-old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)
        raise
    return old


def atomic_save(save_fn, save_directory, **kwargs) -> None:
    """``save_fn(hidden sibling, **kwargs)``, then digests and the config record into every shard's header, then the
    swap into ``save_directory`` (see the module docstring); a failed write is an ``OSError`` naming the target."""
    from safetensors import SafetensorError

    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_pretrained target {target} exists and is not a directory")
    if target.is_dir() and not os.access(target, os.W_OK):
        # the swap would replace it anyway (only the parent is written): respect the user's read-only folder
        raise _save_error(target, PermissionError(errno.EACCES, "the target directory is read-only"))
    tmp = target.parent / f".{target.name}.abs_llm-saving-{uuid.uuid4().hex[:8]}"
    leftover = tmp
    try:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            save_fn(tmp, **kwargs)
            extra = {}
            if (tmp / "config.json").is_file():
                record = config_record(read_config(tmp / "config.json"))
                extra[CONFIG_KEY] = json.dumps(record, sort_keys=True, separators=(",", ":"))
            for f in sorted(tmp.glob("*.safetensors")):
                add_digests(f, extra)
            leftover = _install(tmp, target)
        except (OSError, SafetensorError) as e:
            raise _save_error(target, e) from e
    finally:
        if leftover is not None and leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)


def _atomic_save_pretrained(self, save_directory, **kwargs):
    original = type(self).save_pretrained
    if kwargs.get("push_to_hub") or kwargs.get("is_main_process", True) is False:
        # Hub uploads keep transformers' own flow; non-main DDP ranks write nothing anyway.
        return original(self, save_directory, **kwargs)
    def save(d, **kw):
        original(self, d, **kw)
        from .remote_code import write_remote_code

        write_remote_code(d)  # auto_map + loader shim, so trust_remote_code=True works without `import abs_llm`

    return atomic_save(save, save_directory, **kwargs)


def install_atomic_save(model) -> None:
    """Route this model instance's ``save_pretrained`` through :func:`atomic_save` (idempotent). A bound method, not a
    closure, so ``copy.deepcopy(model)`` saves the copy, not the original."""
    if getattr(model.save_pretrained, "__func__", None) is _atomic_save_pretrained:
        return
    model.save_pretrained = types.MethodType(_atomic_save_pretrained, model)
