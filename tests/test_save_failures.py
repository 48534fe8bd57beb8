"""save_pretrained when the disk fills up, when the target is read-only, and when two processes save to one folder:
the previous checkpoint stays intact, the error is an OSError naming the target, no partial folder is left, and racing
writers leave one complete checkpoint (never a mix). Each scenario runs in a subprocess (resource limits, another user
id, true concurrency)."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import abs_llm
from tests._report import RELIABILITY
from tests.conftest import tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534

PRELUDE = textwrap.dedent(
    """
    import json, os, sys, torch
    sys.path.insert(0, {root!r})
    import abs_llm, abs_llm.integrity as integ
    from transformers import LlamaForCausalLM
    from tests.conftest import tiny_llama_config
    torch.manual_seed({seed})
    model = LlamaForCausalLM(tiny_llama_config())
    abs_llm.quantize(model, abs_llm.DoubleRoundingConfig(bits={bits}))

    def attempt(target):
        try:
            model.save_pretrained(target)
            return {{"ok": True}}
        except Exception as e:
            return {{"type": type(e).__name__, "errno": getattr(e, "errno", None), "msg": str(e)}}
    """
)


def _model(seed, bits):
    torch.manual_seed(seed)
    return abs_llm.quantize(LlamaForCausalLM(tiny_llama_config()), abs_llm.DoubleRoundingConfig(bits=bits))


def _snapshot(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# Root ignores permission bits. The interpreter may live where an unprivileged user cannot read it (/root/.pyenv), so
# the child starts as root, saves once elsewhere (every module a save needs is then imported) and only then becomes
# the unprivileged user.
DROP = """
import shutil, tempfile
warm = tempfile.mkdtemp()
model.save_pretrained(warm + "/w")
shutil.rmtree(warm)
os.setgroups([]); os.setgid({user}); os.setuid({user})
"""


def _child(body: str, seed=1, bits=4, user=None, env=None, timeout=300) -> list:
    drop = DROP.format(user=user) if user is not None else ""
    script = PRELUDE.format(root=str(ROOT), seed=seed, bits=bits) + drop + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_refused(result, target: Path, code: int):
    assert result.get("type") in ("OSError", "PermissionError"), result
    assert result["errno"] == code, result
    assert str(target) in result["msg"] and "previous contents" in result["msg"], result["msg"]
    RELIABILITY["bad inputs tried"] += 1


def test_disk_full_keeps_the_previous_checkpoint(tmp_path):
    """RLIMIT_FSIZE makes every write past the limit fail with EFBIG, as a full disk fails with ENOSPC: once while
    transformers writes the weights, once while abs_llm rewrites them with their digests."""
    target = tmp_path / "ckpt"
    _model(0, 8).save_pretrained(target)
    before = _snapshot(target)
    _model(1, 4).save_pretrained(tmp_path / "scratch")  # the same bytes the child would write (deterministic saves)
    final = (tmp_path / "scratch" / "model.safetensors").stat().st_size
    shutil.rmtree(tmp_path / "scratch")
    results = _child(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        real, entered = integ.add_digests, []
        integ.add_digests = lambda f, extra=None: (entered.append(f), real(f, extra))[1]
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        out = []
        for limit in (4096, {final - 1}):
            entered.clear()
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
            r = attempt({str(target)!r})
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            out.append({{**r, "digesting": bool(entered)}})
        print(json.dumps(out))
    """)
    assert [r["digesting"] for r in results] == [False, True]  # failed in transformers' write, then in ours
    for r in results:
        _assert_refused(r, target, errno.EFBIG)
    assert _snapshot(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no partial or hidden folder left
    assert abs_llm.get_bits(AutoModelForCausalLM.from_pretrained(target)) == 8


def test_read_only_target_or_parent_keeps_the_previous_checkpoint():
    """Run as an unprivileged user (root ignores permission bits): a read-only parent folder (no room for the hidden
    copy) and a read-only target folder (which the atomic swap would otherwise replace) are both refused."""
    base = Path(tempfile.mkdtemp(prefix="abs_llm_ro_"))
    try:
        base.chmod(0o755)
        home = base / "home"
        home.mkdir(mode=0o777)
        home.chmod(0o777)
        ro_parent, rw_parent = base / "ro_parent", base / "rw_parent"
        for parent in (ro_parent, rw_parent):
            _model(0, 8).save_pretrained(parent / "ckpt")
        ro_parent.chmod(0o555)
        rw_parent.chmod(0o777)
        (rw_parent / "ckpt").chmod(0o555)
        before = {p: _snapshot(p / "ckpt") for p in (ro_parent, rw_parent)}
        results = _child(f"print(json.dumps([attempt({str(ro_parent / 'ckpt')!r}), attempt({str(rw_parent / 'ckpt')!r})]))",
                         user=NOBODY if os.geteuid() == 0 else None, env={"HOME": str(home), "HF_HOME": str(home)})
        for parent, r in zip((ro_parent, rw_parent), results):
            _assert_refused(r, parent / "ckpt", errno.EACCES)
            assert _snapshot(parent / "ckpt") == before[parent]
            assert [p.name for p in parent.iterdir()] == ["ckpt"]
            assert abs_llm.get_bits(AutoModelForCausalLM.from_pretrained(parent / "ckpt")) == 8
    finally:
        for p in base.rglob("*"):
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


RACER = """
    import time
    from pathlib import Path
    barrier, target = Path({barrier!r}), {target!r}
    real_rename = os.rename
    def rename(src, dst, _first=[True]):
        if _first[0] and str(dst) == target:  # both found no target: both now try to create it
            _first[0] = False
            (barrier / str(os.getpid())).touch()
            deadline = time.time() + 120
            while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
                time.sleep(0.001)
        return real_rename(src, dst)
    integ.os.rename = rename
    print(json.dumps([attempt(target) for _ in range({rounds})]))
"""


def test_two_processes_saving_to_one_folder_leave_one_complete_checkpoint(tmp_path):
    refs = {}
    for name, (seed, bits) in {"a": (0, 8), "b": (1, 4)}.items():
        _model(seed, bits).save_pretrained(tmp_path / name)
        refs[name] = _snapshot(tmp_path / name)
    target, barrier = tmp_path / "shared", tmp_path / "barrier"
    barrier.mkdir()
    body = RACER.format(barrier=str(barrier), target=str(target), rounds=4)
    script = {name: PRELUDE.format(root=str(ROOT), seed=seed, bits=bits) + textwrap.dedent(body)
              for name, (seed, bits) in {"a": (0, 8), "b": (1, 4)}.items()}
    procs = [subprocess.Popen([sys.executable, "-c", s], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in script.values()]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert all(r == {"ok": True} for r in json.loads(out.strip().splitlines()[-1])), out
    got = _snapshot(target)
    assert got in (refs["a"], refs["b"]), "the checkpoint mixes files of the two writers"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "barrier", "shared"]  # no hidden leftovers
    bits = 8 if got == refs["a"] else 4
    assert abs_llm.get_bits(AutoModelForCausalLM.from_pretrained(target)) == bits


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX only")
def test_save_error_names_the_target_and_keeps_its_errno():
    from abs_llm.saving import _save_error

    e = _save_error(Path("/x/ckpt"), Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and "/x/ckpt" in str(e)
