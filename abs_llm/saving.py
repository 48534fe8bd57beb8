"""Crash-safe saves and output folders.

- ``save_pretrained`` of a switchable model writes into a temporary sibling directory, digests it
  (:func:`abs_llm.integrity.add_digests`), then swaps it with the target in one atomic ``renameat2(RENAME_EXCHANGE)``
  (two renames where the kernel lacks it): a process killed mid-save leaves the previous checkpoint in place and no
  half-written directory under the target name. A full disk or a read-only target is an ``OSError`` naming the target,
  with the previous checkpoint untouched; two processes saving to one directory leave one complete checkpoint (the last
  to swap). ``push_to_hub=True`` makes the same save, then uploads that folder.
- :func:`prepare_output_dir` refuses to write into a non-empty folder unless asked to overwrite.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import types
import uuid
from pathlib import Path

from . import integrity
from .integrity import _WEIGHT_FILE, CONFIG_KEY, config_record, read_config


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
                integrity.add_digests(f, extra)  # through the module: tests stall or wrap it
            leftover = _install(tmp, target)
        except (OSError, SafetensorError) as e:
            raise _save_error(target, e) from e
    finally:
        if leftover is not None and leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)


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
