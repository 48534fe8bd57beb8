"""Checkpoint integrity: per-tensor digests recorded at save and verified at load, and crash-safe saves.

- Every ``*.safetensors`` file of a switchable checkpoint carries ``abs_llm.digests`` in its header: the SHA-256 of
  each tensor's raw bytes, so a flipped byte, a swapped scale or a replaced tensor is reported by name.
- ``save_pretrained`` writes into a temporary sibling directory, digests it, then swaps it with the target in one
  atomic ``renameat2(RENAME_EXCHANGE)`` (two renames where the kernel lacks it): a process killed mid-save leaves the
  previous checkpoint in place and no half-written directory under the target name.

Verification is on by default; ``ABS_LLM_VERIFY=0`` or ``with abs_llm.integrity.verification(False):`` skips it.
"""

from __future__ import annotations

import contextlib
import ctypes
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
_verify_override: bool | None = None
# Weight files that transformers itself removes when it re-saves into a folder: never carried over from the old copy.
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model|adapter_model).*\.(safetensors|bin)$|.*\.index\.json$")


def read_header(file) -> tuple[dict, int]:
    """The safetensors JSON header and the byte offset where the data section starts."""
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{file}: truncated safetensors file ({len(head)} bytes)")
        n = struct.unpack("<Q", head)[0]
        raw = fh.read(n)
    if len(raw) < n:
        raise ValueError(f"{file}: truncated safetensors header")
    return json.loads(raw), 8 + n


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


def add_digests(file: Path) -> None:
    """Record each tensor's digest in the header of one safetensors file, and write the header canonically (sorted
    keys) so the same weights always give the same bytes. The data section is copied unchanged."""
    header, start = read_header(file)
    meta = dict(header.pop("__metadata__", None) or {})
    meta[DIGESTS_KEY] = json.dumps(file_digests(file), sort_keys=True)
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
    expected = json.loads(raw)
    actual = file_digests(file)
    if set(actual) != set(expected):
        raise ValueError(f"{file}: tensors {sorted(set(actual) ^ set(expected))[:5]} added or removed since save")
    bad = sorted(k for k in actual if actual[k] != expected[k])
    if bad:
        raise ValueError(f"{file}: tensor(s) {bad[:5]} do not match their save-time digests (corrupted or tampered)")


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


def atomic_save(save_fn, save_directory, **kwargs) -> None:
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_pretrained target {target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.abs_llm-saving-{uuid.uuid4().hex[:8]}"
    try:
        save_fn(tmp, **kwargs)
        for f in sorted(tmp.glob("*.safetensors")):
            add_digests(f)
        if not target.exists():
            os.rename(tmp, target)
            return
        _carry_over(target, tmp)
        if not _exchange(tmp, target):
            old = target.parent / f".{target.name}.abs_llm-old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            tmp = old
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_HUB_KEYS = ("repo_id", "commit_message", "create_pr", "private", "revision", "commit_description")


def _save_and_push(self, save_directory, **kwargs):
    """``save_pretrained(..., push_to_hub=True)``: the normal abs_llm save (digests, loader shim) into
    ``save_directory``, then transformers' own upload steps (repo, card, changed files), so the upload is exactly what a
    local save writes. transformers' flow would write without the digests and the shim."""
    from transformers.utils.hub import create_and_tag_model_card, hf_api

    hub = {k: kwargs.pop(k) for k in _HUB_KEYS if k in kwargs}
    token = kwargs.get("token")
    repo_id = hub.pop("repo_id", os.fspath(save_directory).rstrip(os.sep).split(os.sep)[-1])
    create_kw = {k: hub[k] for k in ("private",) if k in hub}
    repo_id = hf_api().create_repo(repo_id, exist_ok=True, token=token, **create_kw).repo_id
    Path(save_directory).mkdir(parents=True, exist_ok=True)
    before = self._get_files_timestamps(save_directory)
    self.save_pretrained(save_directory, **kwargs)
    create_and_tag_model_card(repo_id, self.model_tags, token=token).save(os.path.join(save_directory, "README.md"))
    self._upload_modified_files(save_directory, repo_id, before, commit_message=hub.get("commit_message"),
                                token=token, create_pr=hub.get("create_pr", False), revision=hub.get("revision"),
                                commit_description=hub.get("commit_description"))


def _atomic_save_pretrained(self, save_directory, **kwargs):
    original = type(self).save_pretrained
    if kwargs.get("is_main_process", True) is False:
        return original(self, save_directory, **kwargs)  # non-main DDP ranks write nothing anyway
    if kwargs.pop("push_to_hub", False):
        return _save_and_push(self, save_directory, **kwargs)
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
