"""Issue 13 benchmark: self-speculative decoding, a low-bit draft of the same INT8 master checking against itself.

Default model (SmolLM2-135M-Instruct) quantized with ``abs_llm.quantize`` (group 64 or per channel), bf16 activations,
CPU, batch 1, greedy, ``--new-tokens`` new tokens (EOS suppressed so every run has the same length), prompts built with
the chat template from Lee news documents ("Summarize this news story ..." + the first 700 characters).

- ``tune``: on validation docs 225-249, verifier at 8 bits, 4-bit drafts: tokens/s and acceptance for fixed numbers
  of draft tokens K (confidence stop off), transformers' default (K = 20 with its adaptive confidence threshold 0.4)
  and its ``heuristic`` schedule. Picks K for ``main``.
- ``main``: on held-out docs 250-299 used only as prompts (nothing is tuned on them): verifier at 8 and 6 bits alone
  vs with drafts at 2/3/4/6 bits (with the draft's own 4-bit lm_head, and a 4-bit draft sharing the bf16 head).

All settings run in one process, round-robin over ``--repeats``; per setting and repeat the times of all prompts are
summed; medians are reported. ``tok/s`` is end to end (prefill included); ``decode tok/s`` = (N - 1) / (t(N) - t1) with
t1 the verifier's own ``generate`` of one token on the same prompt, so the draft's prefill is charged to decoding.
Every assisted run is compared token for token with the verifier's own greedy output.

Usage (from benchmarks/, the repository root on PYTHONPATH): python bench_speculative.py {costs,tune,main}
[--group 64|none] [--repeats 3] [--threads 1] [--k 1]; the commands of the reported runs are in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from common import cpu_name
from transformers import AutoModelForCausalLM, AutoTokenizer

import abs_llm
from abs_llm import DoubleRoundingConfig, quantize, row_attention, set_bits, switchable_layers
from abs_llm.generate import prompt_ids
from abs_llm.speculative import draft_extra_bytes, draft_model, generate_with_stats

RESULTS = Path(__file__).parent / "results"
TASK = "Summarize this news story in a few sentences:\n\n"


def build(group):
    path = abs_llm.default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    quantize(model, DoubleRoundingConfig(bits=8, group_size=group))
    return model.to(torch.bfloat16), tok


def prompts(tok, docs):
    texts = abs_llm.default_corpus("train" if max(docs) < 250 else "eval")
    first = 0 if max(docs) < 250 else 250  # default_corpus("eval") is docs 250-299
    return [prompt_ids(tok, TASK + texts[d - first][:700]) for d in docs]


def tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def verifier_packed_bytes(model) -> int:
    """Packed weights of the active width only (the LRU may also hold the other verifier width of this run)."""
    total = 0
    for m in switchable_layers(model).values():
        total += sum(p.nbytes for p in m._cache.values() if p.bits == m.bits)
    return total


class Run:
    """One setting: verifier bits + optional draft. ``go(ids)`` returns (sequences, stats)."""

    def __init__(self, name, model, bits, draft=None, n=128):
        self.name, self.model, self.bits, self.draft, self.n = name, model, bits, draft, n

    def go(self, ids):
        set_bits(self.model, self.bits)
        return generate_with_stats(self.model, ids, self.draft, max_new_tokens=self.n, min_new_tokens=self.n)


def measure(runs, plain_of, ids_list, repeats):
    """Round-robin, interleaved per prompt (load on the shared machine drifts over minutes): for each repeat and
    prompt every setting runs once. ``plain_of[name]`` names the verifier-alone run to compare with. Besides the ratio
    of medians, ``paired_speedup`` is the median over (repeat, prompt) of t(verifier alone) / t(assisted) from runs
    seconds apart, which is what the load noise disturbs least."""
    t = {r.name: [[0.0] * len(ids_list) for _ in range(repeats)] for r in runs}
    t1 = {r.bits: [[0.0] * len(ids_list) for _ in range(repeats)] for r in runs if r.draft is None}
    stats = {r.name: {"new_tokens": 0, "rounds": 0, "drafted": 0, "accepted": 0} for r in runs}
    identical = {r.name: True for r in runs}
    ref = {}
    for r in runs:  # warm-up: packs every width once
        r.go(ids_list[0][:, :16])
    for rep in range(repeats):
        for i, ids in enumerate(ids_list):
            for r in runs:
                out, st = r.go(ids)
                t[r.name][rep][i] = st["seconds"]
                if rep == 0:  # greedy: the same tokens, rounds and drafts every repeat
                    for k in stats[r.name]:
                        stats[r.name][k] += st.get(k, 0)
                if r.draft is None:
                    ref[(r.name, i)] = out
                    set_bits(r.model, r.bits)
                    t1[r.bits][rep][i] = generate_with_stats(r.model, ids, None, max_new_tokens=1)[1]["seconds"]
                else:
                    identical[r.name] &= bool(torch.equal(out, ref[(plain_of[r.name], i)]))
                print(f"    rep {rep} prompt {i} {r.name}: {st['seconds']:.2f} s, {st['new_tokens']} tokens"
                      + (f", accepted {st['accepted']}/{st['drafted']}, identical {identical[r.name]}"
                         if r.draft is not None else ""), flush=True)
        print(f"  rep {rep}: " + ", ".join(f"{r.name} {stats[r.name]['new_tokens'] / sum(t[r.name][rep]):.2f}"
                                         for r in runs), flush=True)
    res = {}
    for r in runs:
        agg, sums = stats[r.name], [sum(x) for x in t[r.name]]
        tm = statistics.median(sums)
        prefill = statistics.median([sum(x) for x in t1[r.bits]])
        row = {"verifier_bits": r.bits, "seconds": tm, "tokens_per_s": agg["new_tokens"] / tm,
               "decode_tokens_per_s": (agg["new_tokens"] - len(ids_list)) / max(tm - prefill, 1e-9),
               "new_tokens": agg["new_tokens"], "rounds": agg["rounds"], "repeats_s": sums}
        if r.draft is not None:
            cfg = r.draft.generation_config
            row |= {"draft_bits": abs_llm.get_bits(r.draft), "draft_head_bits": getattr(r.draft.lm_head, "bits", None),
                    "K": cfg.num_assistant_tokens, "schedule": cfg.num_assistant_tokens_schedule,
                    "confidence_threshold": cfg.assistant_confidence_threshold,
                    "drafted": agg["drafted"], "accepted": agg["accepted"],
                    "acceptance": agg["accepted"] / max(agg["drafted"], 1),
                    "tokens_per_round": agg["new_tokens"] / max(agg["rounds"], 1), "identical": identical[r.name],
                    "draft_extra_bytes": draft_extra_bytes(r.draft)}
        res[r.name] = row
    for r in runs:
        if r.draft is not None:
            base, row, p = res[plain_of[r.name]], res[r.name], t[plain_of[r.name]]
            row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
            row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            row["paired_speedup"] = statistics.median(
                p[rep][i] / t[r.name][rep][i] for rep in range(repeats) for i in range(len(ids_list)))
    return res


def memory(model, draft_rows):
    """Resident bytes: verifier alone (tensors + its packed active width), + each draft (its extra bytes), and two
    separate models (a second, independent copy of every tensor plus the draft's packed weights)."""
    tensors = tensor_bytes(model)
    out = {}
    for bits in (8, 6):
        set_bits(model, bits)
        alone = tensors + verifier_packed_bytes(model)
        out[f"verifier{bits}"] = alone
        for row in draft_rows.values():
            if row.get("verifier_bits") == bits and "draft_extra_bytes" in row:
                row["resident_bytes"] = alone + row["draft_extra_bytes"]
                row["resident_ratio"] = row["resident_bytes"] / alone
                row["two_models_ratio"] = (alone + tensors + row["draft_extra_bytes"]) / alone
    out["tensors"] = tensors
    return out


def forward_costs(model, ids, repeats=15, rows=(2, 3, 4, 5)):
    """Median ms of one cached forward: each draft and verifier width at one token, the verifiers at ``rows`` tokens
    (a verification step of K = rows - 1 drafts), with the row-exact attention and with plain sdpa ("plain").
    Round-robin over settings."""
    nets = {}
    for vb in (8, 6):
        nets[f"v{vb}"] = (model, vb)
    for db in (6, 4, 3, 2):
        for head in (None, 4):
            nets[f"d{db} h{head or 'shared'}"] = (draft_model(model, bits=db, head_bits=head, exact=False), None)
    times = {k: [] for k in nets} | {f"v{vb} x{m}{p}": [] for vb in (8, 6) for m in rows for p in ("", " plain")}
    with torch.no_grad():
        caches = {}
        for k, (m, b) in nets.items():
            if b is not None:
                set_bits(m, b)
            caches[k] = m(ids, use_cache=True).cache
        for _ in range(repeats):
            for k, (m, b) in nets.items():
                if b is not None:
                    set_bits(m, b)
                for n in (1,) + (rows if b is not None else ()):
                    for exact in ((True, False) if n > 1 else (True,)):
                        (row_attention.make_rowwise if exact else row_attention.make_plain)(m)
                        t = time.perf_counter()
                        m(ids[:, :n], cache=caches[k])
                        times[k if n == 1 else f"{k} x{n}" + ("" if exact else " plain")].append(
                            time.perf_counter() - t)
                        caches[k].crop(-n)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["tune", "main", "costs"])
    ap.add_argument("--group", default="64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--k", type=int, default=2, help="main: draft tokens per step (chosen by tune)")
    ap.add_argument("--schedule", default="constant")
    ap.add_argument("--confidence", type=float, default=0.0,
                    help="main: the draft's assistant_confidence_threshold (0: always draft K tokens)")
    ap.add_argument("--drafts", default="2,3,4,6")
    ap.add_argument("--verifiers", default="8,6")
    ap.add_argument("--shared-head-drafts", default="4", help="main: drafts that share the verifier's bf16 lm_head "
                                                                  "('' for none)")
    ap.add_argument("--tune-k", default="1,2,3,4")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    group = None if args.group.lower() in ("none", "channel") else int(args.group)
    model, tok = build(group)
    n = args.new_tokens
    runs, plain_of = [], {}

    def add(name, vbits, dbits=None, head=None, **kw):
        d = None if dbits is None else draft_model(model, bits=dbits, head_bits=head, **kw)
        runs.append(Run(name, model, vbits, d, n))
        if d is not None:
            plain_of[name] = f"v{vbits}"

    if args.phase == "costs":
        ids = prompts(tok, [225])[0]
        start = time.time()
        ms = forward_costs(model, ids, args.repeats)
        report = {"phase": "costs", "group_size": group, "threads": args.threads, "prompt_tokens": int(ids.shape[1]),
                  "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}",
                  "wall_s": time.time() - start, "load_avg": os.getloadavg(), "forward_ms": ms}
        out = Path(args.out or RESULTS / f"speculative_costs_g{args.group}.json")
        out.write_text(json.dumps(report, indent=2))
        for k, v in ms.items():
            print(f"{k:16s} {v:7.2f} ms  {v / ms['v8']:.2f} x v8")
        return
    if args.phase == "tune":
        ids_list = prompts(tok, [225, 230, 235, 240, 245][: args.prompts])
        add("v8", 8)
        for head in (4, None):
            for k in [int(x) for x in args.tune_k.split(",")]:
                add(f"v8 d4 h{head} K{k}", 8, 4, head, num_assistant_tokens=k, schedule="constant",
                    confidence_threshold=0)
            add(f"v8 d4 h{head} hf-default", 8, 4, head)  # K=20, constant, confidence threshold 0.4 (adaptive)
            add(f"v8 d4 h{head} heuristic", 8, 4, head, num_assistant_tokens=5, schedule="heuristic_transient",
                confidence_threshold=0)
    else:
        ids_list = prompts(tok, [250, 260, 270, 280, 290][: args.prompts])
        for vb in [int(x) for x in args.verifiers.split(",")]:
            add(f"v{vb}", vb)
            for db in [int(x) for x in args.drafts.split(",")]:
                add(f"v{vb} d{db} h4", vb, db, 4, num_assistant_tokens=args.k, schedule=args.schedule,
                    confidence_threshold=args.confidence)
            for db in [int(x) for x in args.shared_head_drafts.split(",") if x.strip()]:
                add(f"v{vb} d{db} hshared", vb, db, None, num_assistant_tokens=args.k, schedule=args.schedule,
                    confidence_threshold=args.confidence)
    start = time.time()
    res = measure(runs, plain_of, ids_list, args.repeats)
    mem = memory(model, res)
    report = {"phase": args.phase, "group_size": group, "new_tokens": n, "repeats": args.repeats,
              "threads": args.threads, "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "prompt_tokens": [int(i.shape[1]) for i in ids_list], "wall_s": time.time() - start,
              "load_avg": os.getloadavg(), "memory": mem, "results": res}
    out = Path(args.out or RESULTS / f"speculative_{args.phase}_g{args.group}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for name, r in res.items():
        extra = "" if "acceptance" not in r else (
            f" speedup {r['speedup']:.2f} paired {r['paired_speedup']:.2f} decode {r['decode_speedup']:.2f} acc {r['acceptance']:.2f} "
            f"tok/round {r['tokens_per_round']:.2f} identical {r['identical']} mem x{r.get('resident_ratio', 0):.2f}")
        print(f"{name:24s} {r['tokens_per_s']:6.2f} tok/s decode {r['decode_tokens_per_s']:6.2f}{extra}")
    print("wrote", out)


if __name__ == "__main__":
    main()
