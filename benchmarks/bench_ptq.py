"""Issue 2 benchmark: post-training Double Rounding vs plain round-to-nearest on the embedded default model.

PPL on the Lee held-out split (docs 250-299, full split, seq 512, non-overlapping windows) at FP and at 8/6/4/3/2 bits:
  (a) RTN: each bit-width quantized straight from the float weights with its own abs-max scale;
  (b) DR:  each bit-width derived from the single INT8 master (scale s_8 * 2^(8-l)).
for per-channel scales and group sizes 128, 64, 32. Plus checkpoint bytes, quantize time and whole-model switch time.

Usage: python benchmarks/bench_ptq.py [--max-chunks N] [--groups none,128,64,32] [--out benchmarks/results/ptq.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_name
from transformers import AutoModelForCausalLM

import abs_llm
from abs_llm import DoubleRoundingConfig, core, set_bits, switchable_layers
from abs_llm.data import default_corpus, default_model_path
from abs_llm.evaluation import perplexity

BITS = [8, 6, 4, 3, 2]


def _set_weights(model, originals, fn):
    with torch.no_grad():
        for name, w in originals.items():
            model.get_submodule(name).weight.copy_(fn(w))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-chunks", type=int, default=None, help="cap windows (default: full held-out split)")
    ap.add_argument("--groups", default="none,128,64,32")
    ap.add_argument("--out", default="benchmarks/results/ptq.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    groups = [None if g == "none" else int(g) for g in args.groups.split(",")]
    path = default_model_path()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    texts = default_corpus("eval")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg0 = DoubleRoundingConfig()
    from abs_llm.hf_quantizer import linears_to_convert, resolve_modules_to_not_convert

    names = linears_to_convert(model, resolve_modules_to_not_convert(model, cfg0))
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}

    def ppl():
        return perplexity(model, tok, texts, max_chunks=args.max_chunks, progress=False)

    results = {"machine": cpu_name(), "torch_threads": torch.get_num_threads(), "max_chunks": args.max_chunks,
               "fp32": ppl(), "ppl": {}}
    print(f"FP32 PPL {results['fp32']:.3f}")
    for g in groups:
        key = "per-channel" if g is None else f"g{g}"
        row = {"rtn": {}, "dr": {}}
        for b in BITS:
            _set_weights(model, originals, lambda w: core.quantize_rtn(w, b, g))
            row["rtn"][b] = ppl()

            def dr(w, b=b):
                s = core.init_scale(w, 8, g)
                return core.derived_weight(core.quantize_master(w, s, 8, g), s, 8, b, g)

            if b == 8:  # identical by construction: the master is RTN at 8 bits
                row["dr"][b] = row["rtn"][b]
            else:
                _set_weights(model, originals, dr)
                row["dr"][b] = ppl()
            print(f"{key:12s} {b} bits: RTN {row['rtn'][b]:.3f}  DR {row['dr'][b]:.3f}", flush=True)
        results["ppl"][key] = row
    _set_weights(model, originals, lambda w: w)

    # Checkpoint size, quantize time, switch time (group 64, the demo's setting).
    cfg = DoubleRoundingConfig(bits=8, candidate_bits=BITS, group_size=64)
    times = []
    for _ in range(3):
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        t = time.perf_counter()
        abs_llm.quantize(m, DoubleRoundingConfig(bits=8, candidate_bits=BITS, group_size=64))
        times.append(time.perf_counter() - t)
    results["quantize_seconds_median"] = statistics.median(times)
    with tempfile.TemporaryDirectory() as d:
        m.save_pretrained(d)
        results["checkpoint_bytes"] = sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
    fp32 = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    results["fp32_checkpoint_bytes"] = fp32
    unique = {p.data_ptr(): p for p in model.state_dict().values()}  # the tied embedding/lm_head counts once
    results["bf16_checkpoint_bytes"] = sum(p.numel() * 2 for p in unique.values())
    x = torch.randint(0, 1000, (1, 8))
    switch = {}
    for src, dst in [(8, 4), (4, 2), (2, 8)]:
        ts = []
        for _ in range(5):
            set_bits(m, src)
            with torch.no_grad():
                m(x)  # materialise the source width's cache
            t = time.perf_counter()
            set_bits(m, dst)
            with torch.no_grad():
                for layer in switchable_layers(m).values():
                    layer.packed(torch.float32, x.device)  # the derivation a forward would trigger
            ts.append(time.perf_counter() - t)
        switch[f"{src}->{dst}"] = statistics.median(ts)
    results["switch_seconds_median"] = switch
    results["config"] = cfg.to_dict()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "ppl"}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
