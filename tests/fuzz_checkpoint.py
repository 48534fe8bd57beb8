"""Seeded corruptions of a switchable checkpoint, and the runner that loads each one (tests/test_fuzz.py).

Every case mutates one file of a tiny checkpoint (``model.safetensors``: truncation, bit flips, header JSON edits of
dtypes, shapes, offsets, names and metadata values, data-section edits; ``config.json``: truncation, bit flips, edits of
field values and types), then loads it one of three ways:

- ``direct``: ``checkpoint.check_files`` (every header and digest check the loader runs before reading a tensor); when
  it passes, the tensors read by safetensors must equal the original ones exactly;
- ``load``: ``AutoModelForCausalLM.from_pretrained`` (safetensors cases) or ``pipeline.load_checkpoint`` (config
  cases: the CLI's loader, which checks the folder before transformers parses the config);
- ``plain``: ``from_pretrained`` on a corrupted config.json, where transformers' own config parsing may refuse it
  before any abs_llm code runs (counted apart: see docs/support.md).

Outcomes: ``refused`` (``ValueError``/``OSError`` whose message names the mutated file), ``identical`` (loaded, and the
model equals the original: same tensors, same logits at the loaded widths), ``transformers`` (plain mode only: refused
by transformers before abs_llm ran) or ``BAD ...`` (anything else: a silent load of a changed model, an unexpected
exception type, a message without the file, a case over ``CASE_TIMEOUT`` seconds). A crash (segfault) ends the
process: the parent test names the case that was running.

Run: ``python -m tests.fuzz_checkpoint direct:1:600 load:2:300`` (``MODE:SEED:N`` batches, one JSON line per case);
reproduce one case: ``python -m tests.fuzz_checkpoint load:2:300 --only 17``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import traceback
from pathlib import Path

CASE_TIMEOUT = 10
POOL = [None, True, False, 0, -1, 1, 2, 3, 4, 5, 7, 8, 9, 16, 64, 2**40, 10**400, 1.5, float("nan"), "8", "", "x",
        [], [8], [8, 4, 2], [9], [8, "4"], {}, {"a": 1}, "double_rounding", "gptq", "int8pack", "dequant", "llama"]
SPOOL = ["", "x", "0", "-1", "1", "2", "4", "8", "16", "99", "1.0", "null", "[]", "{}", "[8]", "[8,4,2]", "[2,4,8]",
         "[9]", '"8"', '{"a": 1}', "NaN", "true", "[8, 8]", "[8, \"4\"]", "\u00b2", "{", "double_rounding", "gptq"]
QKEYS = ["bits", "candidate_bits", "master_bits", "group_size", "modules_to_not_convert", "layer_bits", "format_version",
         "quant_method", "hessian_traces", "kernel", "extra_field"]
TKEYS = ["model_type", "architectures", "hidden_size", "vocab_size", "num_hidden_layers", "dtype", "tie_word_embeddings",
         "rms_norm_eps", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rope_parameters",
         "bos_token_id", "max_position_embeddings", "unknown_field"]
DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "X", "", 5, None]


# ---- mutations ------------------------------------------------------------------------------------------------------
def _split(b: bytes):
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    enc = json.dumps(header).encode()
    enc += b" " * (-len(enc) % 8)
    return struct.pack("<Q", len(enc)) + enc + data


def _flip(rng, b: bytes, lo: int = 0, hi: int | None = None) -> bytes:
    b = bytearray(b)
    i = rng.randrange(lo, hi if hi is not None else len(b))
    b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def mutate_safetensors(rng, b: bytes) -> tuple[str, bytes]:
    n = struct.unpack("<Q", b[:8])[0]
    kind = rng.choice(["truncate", "flip data", "flip header", "flip length", "append", "insert", "length prefix",
                       "header char", "dtype", "shape", "offsets", "drop tensor", "duplicate tensor", "swap names",
                       "zero tensor", "swap tensor bytes", "metadata value", "metadata drop", "metadata type",
                       "metadata add"])
    if kind == "truncate":
        return kind, b[: rng.randrange(len(b))]
    if kind == "flip data":
        return kind, _flip(rng, b, 8 + n)
    if kind == "flip header":
        return kind, _flip(rng, b, 8, 8 + n)
    if kind == "flip length":
        return kind, _flip(rng, b, 0, 8)
    if kind == "append":
        return kind, b + bytes(rng.randrange(1, 64))
    if kind == "insert":
        i = rng.randrange(8, len(b))
        return kind, b[:i] + bytes([rng.randrange(256)]) * rng.randrange(1, 9) + b[i:]
    if kind == "length prefix":
        m = rng.choice([0, 1, 7, n - 8, n + 8, n - 1, n + 1, len(b), 2**40, 2**63, 2**64 - 1])
        return kind, struct.pack("<Q", max(m, 0)) + b[8:]
    if kind == "header char":
        i = rng.randrange(8, 8 + n)
        return kind, b[:i] + bytes([rng.choice(b'{}[]",:0123456789-.eE ax\\')]) + b[i + 1:]
    header, data = _split(b)
    names = sorted(k for k in header if k != "__metadata__")
    t = rng.choice(names)
    if kind == "dtype":
        header[t]["dtype"] = rng.choice(DTYPES)
    elif kind == "shape":
        s = header[t]["shape"]
        header[t]["shape"] = rng.choice([[], s + [1], s[:-1], [x + 1 for x in s], [-1] + s[1:], [2**40] + s[1:], ["a"],
                                         None, s[::-1], [0] * len(s), [1] + s, [x * 2 for x in s]])
    elif kind == "offsets":
        a, c = header[t]["data_offsets"]
        header[t]["data_offsets"] = rng.choice([[c, a], [a, c + 1], [a, c - 1], [a + 1, c + 1], [0, c - a], [-1, c],
                                                [a, 2**62], [a], "x", [a + 8, c + 8], None, [a, c, c], [0, 0]])
    elif kind == "drop tensor":
        del header[t]
    elif kind == "duplicate tensor":
        header[t + rng.choice(["x", "_copy", ".weight"])] = dict(header[t])
    elif kind == "swap names":
        u = rng.choice(names)
        header[t], header[u] = header[u], header[t]
    elif kind in ("zero tensor", "swap tensor bytes"):
        a, c = header[t]["data_offsets"]
        data = bytearray(data)
        if kind == "zero tensor" or c == a:
            data[a:c] = bytes(c - a)
        else:
            same = [u for u in names if u != t and header[u]["data_offsets"][1] - header[u]["data_offsets"][0] == c - a]
            u = rng.choice(same) if same else t
            a2, c2 = header[u]["data_offsets"]
            data[a:c], data[a2:c2] = data[a2:c2], data[a:c]
        return kind, _join(header, bytes(data))
    else:
        meta = header.get("__metadata__") or {}
        key = rng.choice(sorted(meta)) if meta else "abs_llm.format_version"
        if kind == "metadata value":
            meta[key] = rng.choice(SPOOL) if rng.random() < 0.7 else _edit_json_string(rng, meta.get(key, ""))
        elif kind == "metadata drop":
            meta.pop(key, None)
        elif kind == "metadata add":
            meta[rng.choice(["abs_llm.extra", "format", "abs_llm.digests_v2", "note"])] = rng.choice(SPOOL)
        elif rng.random() < 0.3:
            header["__metadata__"] = rng.choice(POOL[:16])
            return kind, _join(header, data)
        else:
            meta[key] = rng.choice(POOL[:16])
        header["__metadata__"] = meta
    return kind, _join(header, data)


def _edit_json_string(rng, s: str) -> str:
    """Change one number or character inside a JSON-valued metadata string (e.g. one digest, one layer's bits)."""
    if not s:
        return "x"
    i = rng.randrange(len(s))
    return s[:i] + rng.choice("0123456789abcdef\",:{}[] ") + s[i + 1:]


def mutate_config(rng, b: bytes) -> tuple[str, bytes]:
    kind = rng.choice(["truncate", "flip", "char", "quant value", "quant drop", "quant type", "quant remove",
                       "top value", "top drop"])
    if kind == "truncate":
        return kind, b[: rng.randrange(len(b))]
    if kind == "flip":
        return kind, _flip(rng, b)
    if kind == "char":
        i = rng.randrange(len(b))
        return kind, b[:i] + bytes([rng.choice(b'{}[]",:0123456789-.eE ax')]) + b[i + 1:]
    c = json.loads(b)
    q = c["quantization_config"]
    if kind == "quant value":
        key = rng.choice(QKEYS)
        extra = [{"model.layers.0.mlp.up_proj": 4}, {"nope": 4}, {"model.layers.0.mlp.up_proj": 1.0},
                 ["lm_head"], ["model"], ["model.layers.0"], None]
        q[key] = rng.choice(POOL + extra)
    elif kind == "quant drop":
        q.pop(rng.choice(QKEYS), None)
    elif kind == "quant type":
        c["quantization_config"] = rng.choice(POOL)
    elif kind == "quant remove":
        del c["quantization_config"]
    elif kind == "top value":
        c[rng.choice(TKEYS)] = rng.choice(POOL + [["LlamaForCausalLM"], "float16", "bfloat16", "gpt2"])
    else:
        c.pop(rng.choice(TKEYS), None)
    return kind, json.dumps(c, allow_nan=True).encode()


# ---- the reference checkpoints --------------------------------------------------------------------------------------
def build_references(root: Path) -> list[Path]:
    """Two tiny checkpoints: INT8 master, group 16, a per-layer map and HASB traces in the metadata; INT4 master, per
    channel, an odd intermediate width (no group divides it, the packed nibbles have a half-filled last byte)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import abs_llm

    out = []
    for i, (q, extra) in enumerate([(dict(candidate_bits=[8, 4, 2], group_size=16), dict(intermediate_size=48)),
                                    (dict(master_bits=4, candidate_bits=[4, 3, 2], group_size=None),
                                     dict(intermediate_size=41))]):
        torch.manual_seed(i)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True, **extra)
        model = LlamaForCausalLM(cfg)
        abs_llm.quantize(model, abs_llm.DoubleRoundingConfig(**q))
        layers = list(abs_llm.switchable_layers(model))
        if i == 0:
            abs_llm.set_bits(model, {layers[0]: 2, layers[3]: 4})
            from abs_llm.hasb import attach_traces

            attach_traces(model, {n: float(k + 1) for k, n in enumerate(layers)})
        path = root / f"ref{i}"
        model.save_pretrained(path)
        out.append(path)
    return out


# ---- running the cases ----------------------------------------------------------------------------------------------
class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def _same_model(model, ref, ids) -> str | None:
    """Why ``model`` differs from ``ref`` (``None``: it does not)."""
    import torch

    from abs_llm import get_bits, set_bits

    a, b = model.state_dict(), ref.state_dict()
    if a.keys() != b.keys():
        return f"state dict keys differ: {sorted(set(a) ^ set(b))[:3]}"
    diff = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    if diff:
        return f"tensors differ: {diff[:3]}"
    bits = get_bits(model)  # the active widths are config.json's to choose: compare at the loaded ones
    set_bits(ref, bits, kernel="dequant")
    set_bits(model, bits, kernel="dequant")
    with torch.no_grad():
        if not torch.equal(model(ids).logits, ref(ids).logits):
            return "logits differ at the loaded widths (config changed the model?)"
    return None


def run(batches: list[tuple[str, int, int]], only: int | None = None, out=sys.stdout) -> None:
    """Run each ``(mode, seed, n)`` batch: ``n`` cases of ``mode`` (``direct``, ``load``, ``plain``) drawn from
    ``random.Random(seed)``; one JSON line per case on ``out``."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    signal.signal(signal.SIGALRM, _alarm)
    root = Path(tempfile.mkdtemp(prefix="abs_llm_fuzz_"))
    try:
        refs = build_references(root)
        models = [AutoModelForCausalLM.from_pretrained(r) for r in refs]
        for mode, seed, n in batches:
            _run_batch(mode, seed, n, only, refs, models, root / "case", out)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_batch(mode, seed, n, only, refs, models, work, out) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import abs_llm
    from abs_llm import checkpoint
    from abs_llm.pipeline import load_checkpoint

    tensors = [_tensors(r) for r in refs]
    shapes = [{k: (m.out_features, m.in_features) for k, m in abs_llm.switchable_layers(x).items()} for x in models]
    ids = torch.arange(12).view(1, 12)
    rng = random.Random(seed)
    for i in range(n):
        r = rng.randrange(len(refs))
        target = "config.json" if mode == "plain" else rng.choice(
            ["model.safetensors"] * (3 if mode == "direct" else 1) + ["config.json"] * (mode != "direct"))
        original = (refs[r] / target).read_bytes()
        kind, data = (mutate_config if target == "config.json" else mutate_safetensors)(rng, original)
        if only is not None and i != only:
            continue
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(refs[r], work)
        (work / target).write_bytes(data)
        rec = {"mode": mode, "seed": seed, "i": i, "ref": r, "file": target, "kind": kind}
        if data == original:
            rec["outcome"] = "identical"
            out.write(json.dumps(rec) + "\n")
            continue
        signal.alarm(CASE_TIMEOUT)
        try:
            if mode == "direct":
                checkpoint.check_files([work / target], models[r].config.quantization_config, shapes[r])
                got, want = _tensors(work), tensors[r]
                bad = got.keys() != want.keys() or any(
                    got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k]) for k in want)
                why = "accepted with other tensors" if bad else None
            elif target == "config.json" and mode == "load":
                why = _same_model(load_checkpoint(work, tokenizer=False)[0], models[r], ids)
            else:
                why = _same_model(AutoModelForCausalLM.from_pretrained(work), models[r], ids)
            signal.alarm(0)
            rec["outcome"] = "identical" if why is None else f"BAD silent load: {why}"
        except _Timeout:
            rec["outcome"] = f"BAD hang: over {CASE_TIMEOUT} s"
        except Exception as e:  # noqa: BLE001  (classifying every outcome is the point here)
            signal.alarm(0)
            frames = [f.filename for f in traceback.extract_tb(e.__traceback__)]
            ours = any(f"{os.sep}abs_llm{os.sep}" in f for f in frames)
            named = str(work / target) in str(e) or (target == "config.json" and "config.json" in str(e))
            if isinstance(e, (ValueError, OSError)) and named:
                rec["outcome"] = "refused"
            elif mode == "plain" and not ours:  # transformers' own config parser refused it before abs_llm ran
                rec["outcome"] = "transformers"
            elif isinstance(e, (ValueError, OSError)):
                rec["outcome"] = "BAD message does not name the file"
            else:
                rec["outcome"] = f"BAD {type(e).__name__}"
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        out.write(json.dumps(rec) + "\n")
        out.flush()


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("batches", nargs="+", help="MODE:SEED:N, MODE one of direct, load, plain")
    p.add_argument("--only", type=int, default=None, help="run only case I of each batch (same random stream)")
    a = p.parse_args()
    run([(m, int(s), int(n)) for m, s, n in (b.split(":") for b in a.batches)], a.only)
