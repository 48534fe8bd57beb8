"""Issue 16 benchmark: one multi-bit-aware GPTQ master vs plain rounding (RTN Double Rounding) vs per-bit GPTQ.

Every setting is applied to the float model as fake-quantized weights (the derived weight of each width copied into
the Linear layers; the same numbers as a SwitchableLinear checkpoint on the fp32 dequant path), then scored with
:func:`abs_llm.perplexity` (seq 512, non-overlapping windows). Methods:

- ``rtn``: today's Double Rounding from the abs-max INT8 master (``abs_llm.quantize(model, cfg)``);
- ``gptq``: ``method="gptq"``, ONE INT8 master for every width (options from ``--options`` JSON);
- ``perbit``: plain GPTQ run separately for each width ``b`` (a ``b``-bit master, abs-max-and-clip scale, the same
  solver with one width): a separate model per width, the price of not sharing one master.

Splits: ``--split val`` = Lee validation (docs 225-249, 10 windows) + Wikipedia validation (first ``--wiki-chunks``
windows); ``--split test`` = Lee held-out (docs 250-299, 25 windows) + Wikipedia test (first ``--wiki-chunks``
windows). Calibration text: ``--calibration lee`` = Lee docs 0-224 (train without the validation docs), ``wiki`` =
the Wikipedia train articles, ``lee+wiki`` = both, interleaved by length (``abs_llm.data.calibration_texts``).

Usage: python benchmarks/bench_gptq.py --split val --methods rtn,gptq --groups 64 --tag NAME [--options '{...}']
Appends one JSON line per (setting, group) to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from common import cpu_name
from transformers import AutoModelForCausalLM, AutoTokenizer

import abs_llm
from abs_llm import DoubleRoundingConfig, core
from abs_llm.data import calibration_texts, default_corpus, default_model_path
from abs_llm.evaluation import perplexity
from abs_llm.hf_quantizer import linears_to_convert, resolve_modules_to_not_convert
from abs_llm.ptq import gptq_masters

BITS = [8, 6, 4, 3, 2]


def eval_sets(split: str, wiki_chunks: int):
    if split == "val":
        return {"lee": (default_corpus("validation"), None), "wiki": (default_corpus("validation", name="wiki"), wiki_chunks)}
    return {"lee": (default_corpus("eval"), None), "wiki": (default_corpus("test", name="wiki"), wiki_chunks)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="val", choices=["val", "test"])
    ap.add_argument("--methods", default="rtn,gptq", help="comma list of rtn, gptq, perbit")
    ap.add_argument("--groups", default="64", help="comma list: 64, none, ...")
    ap.add_argument("--bits", default="8,6,4,3,2")
    ap.add_argument("--perbit-bits", default=None, help="widths of the perbit method (default: --bits)")
    ap.add_argument("--options", default="{}", help="JSON dict of abs_llm.ptq.GPTQOptions fields")
    ap.add_argument("--calibration", default="lee", choices=["lee", "wiki", "lee+wiki"])
    ap.add_argument("--wiki-chunks", type=int, default=20)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default="benchmarks/results/gptq.jsonl")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bits = [int(b) for b in args.bits.split(",")]
    opts = json.loads(args.options)
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sets = eval_sets(args.split, args.wiki_chunks)
    calib = calibration_texts(args.calibration)
    names = linears_to_convert(model, resolve_modules_to_not_convert(model, DoubleRoundingConfig()))
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}

    def set_weights(weights):
        with torch.no_grad():
            for n, w in weights.items():
                model.get_submodule(n).weight.copy_(w)

    def ppl_all():
        return {k: perplexity(model, tok, texts, max_chunks=mc, progress=False) for k, (texts, mc) in sets.items()}

    base = {"machine": cpu_name(), "threads": torch.get_num_threads(), "split": args.split, "tag": args.tag,
            "calibration": args.calibration, "wiki_chunks": args.wiki_chunks, "options": opts}
    fp = ppl_all()
    print(f"fp {fp}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for g in [None if x == "none" else int(x) for x in args.groups.split(",")]:
        for method in args.methods.split(","):
            rec = base | {"method": method, "group_size": g, "fp": fp, "ppl": {}, "seconds": {}}
            t = time.perf_counter()
            if method == "rtn":
                cfg = DoubleRoundingConfig(candidate_bits=bits, group_size=g)
                masters = {n: (core.quantize_master(w, s := core.init_scale(w, 8, g), 8, g), s)
                           for n, w in originals.items()}
                per_width = {b: masters for b in bits}
            elif method == "gptq":
                cfg = DoubleRoundingConfig(candidate_bits=bits, group_size=g)
                report = {}
                masters = gptq_masters(model, cfg, names, calib, tok, opts, progress=False, report=report)
                rec["layers"] = report["layers"]
                per_width = {b: masters for b in bits}
            elif method == "perbit":
                per_width = {}
                for b in [int(x) for x in (args.perbit_bits or args.bits).split(",")]:
                    cfg_b = SimpleNamespace(master_bits=b, candidate_bits=[b], group_size=g)
                    per_width[b] = gptq_masters(model, cfg_b, names, calib, tok, opts, progress=False)
            else:
                raise ValueError(method)
            rec["seconds"]["quantize"] = time.perf_counter() - t
            for b in per_width:
                mb = b if method == "perbit" else 8
                set_weights({n: core.derived_weight(q, s, mb, b, g) for n, (q, s) in per_width[b].items()})
                rec["ppl"][b] = ppl_all()
                print(f"{args.tag} {method} g{g} w{b}: " + ", ".join(f"{k} {v:.3f} ({v / fp[k]:.3f}x)"
                                                                     for k, v in rec["ppl"][b].items()), flush=True)
            set_weights(originals)
            rec["seconds"]["total"] = time.perf_counter() - t
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
