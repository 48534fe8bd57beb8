"""``abs-llm`` console script. Each subcommand is an ``add_<name>(subparsers)`` function that sets ``func``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _bits_list(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 8,4,2, got {text!r}") from None


def _group_size(text: str):
    if text.lower() in ("none", "channel", "per-channel"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer or 'none', got {text!r}") from None


def prepare_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to write into a non-empty directory unless ``overwrite``: a user's files are never clobbered silently."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SystemExit(f"error: output directory {out} exists and is not empty; pass --overwrite to replace it")
    return out


def _load_float(model_id: str | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import default_model_path

    path = model_id or default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path), path


# ---- quantize ---------------------------------------------------------------------------------------------------------
def add_quantize(sub):
    p = sub.add_parser("quantize", help="float model (HF id/path, default: embedded SmolLM2) -> switchable checkpoint")
    p.add_argument("model", nargs="?", default=None, help="HF model id or local path (default: embedded SmolLM2-135M)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--bits", type=int, default=None, help="active bits saved in the checkpoint (default: highest)")
    p.add_argument("--candidate-bits", type=_bits_list, default=[8, 6, 4, 3, 2])
    p.add_argument("--master-bits", type=int, default=8, choices=[8, 4])
    p.add_argument("--group-size", type=_group_size, default=64, help="power of two in [16, 1024], or 'none'")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    from .ptq.cli import add_arguments  # --method gptq and its calibration flags (issue 16)

    add_arguments(p)
    p.set_defaults(func=run_quantize)


def run_quantize(args):
    from . import DoubleRoundingConfig, quantize

    cfg = DoubleRoundingConfig(bits=args.bits or max(args.candidate_bits), candidate_bits=args.candidate_bits,
                               master_bits=args.master_bits, group_size=args.group_size)
    out = prepare_output_dir(args.out, args.overwrite)  # checked before the slow part
    from .ptq.cli import quantize_kwargs

    kwargs = quantize_kwargs(args)  # flag mistakes and a missing calibration file fail before the model loads
    model, tok, src = _load_float(args.model)
    quantize(model, cfg, **kwargs | ({"tokenizer": tok} if kwargs else {}))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"wrote switchable checkpoint {out} (from {src}; {args.method} master INT{cfg.master_bits}, bits "
          f"{cfg.candidate_bits})")


# ---- eval -------------------------------------------------------------------------------------------------------------
def add_eval(sub):
    p = sub.add_parser("eval", help="perplexity of a switchable checkpoint at each bit-width")
    p.add_argument("checkpoint")
    p.add_argument("--bits", type=_bits_list, default=None, help="bit-widths to evaluate (default: all candidates)")
    p.add_argument("--split", default="eval", choices=["train", "train_fit", "validation", "eval", "test"],
                   help="corpus split (default: eval = held-out test)")
    p.add_argument("--corpus", default="lee", choices=["lee", "wiki"], help="Lee news (default) or the Wikipedia sample")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-chunks", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--tasks", type=lambda t: [x.strip() for x in t.split(",") if x.strip()], default=None,
                   help="run lm-evaluation-harness tasks (comma-separated; 'abs_local_ppl' works offline) instead of"
                        " the built-in perplexity")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: documents per task (int) or fraction (<1)")
    p.add_argument("--text-file", default=None, help="abs_local_ppl: score this text file (blank-line-separated docs)"
                                                      " instead of the Lee held-out split")
    p.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size")
    p.add_argument("--max-length", type=int, default=None, help="lm-eval context window (default: the model's)")
    p.set_defaults(func=run_eval)


def eval_bits(model, tokenizer, bits_list, texts, seq_len=512, max_chunks=None):
    from .evaluation import perplexity
    from .switching import model_bytes, set_bits

    rows = []
    for b in bits_list:
        set_bits(model, b)
        ppl = perplexity(model, tokenizer, texts, seq_len=seq_len, max_chunks=max_chunks)
        rows.append({"bits": b, "ppl": ppl, "bytes": model_bytes(model, b)})
    return rows


def run_eval(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import default_corpus
    from .switching import switchable_layers

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint)
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    layers = switchable_layers(model)
    if not layers:
        raise SystemExit(f"error: {args.checkpoint} is not a switchable (double_rounding) checkpoint")
    cands = next(iter(layers.values())).candidate_bits
    bits = args.bits or list(cands)
    bad = [b for b in bits if b not in cands]
    if bad:
        raise SystemExit(f"error: bits {bad} not in this checkpoint's candidate bits {sorted(cands)}")
    if args.tasks is not None:
        from .lm_eval_tasks import format_lm_eval_table, lm_eval_bits

        limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
        rows = lm_eval_bits(model, tok, bits, args.tasks, limit=limit, text_file=args.text_file,
                            batch_size=args.batch_size, max_length=args.max_length)
        print(json.dumps(rows, indent=2) if args.json else format_lm_eval_table(rows))
        return
    if args.text_file or args.limit is not None:
        raise SystemExit("error: --text-file and --limit apply to lm-eval tasks; add --tasks abs_local_ppl")
    rows = eval_bits(model, tok, bits, default_corpus(args.split, name=args.corpus), args.seq_len, args.max_chunks)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))


def format_table(rows, fp_ppl: float | None = None) -> str:
    lines = ["| bits | PPL | delta vs FP | bytes |", "|---|---|---|---|"]
    for r in rows:
        delta = "" if fp_ppl is None else f"{100 * (r['ppl'] / fp_ppl - 1):+.2f}%"
        lines.append(f"| {r['bits']} | {r['ppl']:.3f} | {delta} | {r['bytes'] / 1e6:.1f} MB |")
    return "\n".join(lines)


# ---- export -----------------------------------------------------------------------------------------------------------
def add_export(sub):
    p = sub.add_parser("export", help="fixed-bit snapshot for other runtimes (compressed-tensors pack-quantized, dense)")
    p.add_argument("checkpoint")
    p.add_argument("--bits", type=int, required=True, help="bit-width of the snapshot (a candidate of the checkpoint)")
    p.add_argument("--format", required=True, help="compressed-tensors (transformers/vLLM) or hf-dense (float)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=run_export)


def run_export(args):
    from transformers import AutoModelForCausalLM

    from .export import FORMATS, export

    if args.format not in FORMATS:  # checked before the slow load
        raise ValueError(f"unknown export format {args.format!r}; choose one of {list(FORMATS)}")
    out = prepare_output_dir(args.out, args.overwrite)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint)
    export(model, out, args.bits, args.format, source_dir=args.checkpoint)
    print(f"wrote {args.format} snapshot at {args.bits} bits to {out}")


# ---- push -------------------------------------------------------------------------------------------------------------
def add_push(sub):
    p = sub.add_parser("push", help="upload a switchable checkpoint + model card to the Hugging Face Hub")
    p.add_argument("checkpoint")
    p.add_argument("--repo-id", required=True, help="user/name on the Hub")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="write the upload folder to --out, upload nothing")
    p.add_argument("--out", default=None, help="with --dry-run: where the upload folder goes")
    p.add_argument("--results", default=None, help="JSON from `abs-llm eval --json` for the model card table")
    p.set_defaults(func=run_push)


def run_push(args):
    from .io import push

    where = push(args.checkpoint, args.repo_id, private=args.private, dry_run=args.dry_run, out=args.out,
                 results=args.results)
    print(f"dry run: wrote the upload folder {where} (nothing uploaded)" if args.dry_run else f"uploaded to {where}")


# ---- demo -------------------------------------------------------------------------------------------------------------
def add_demo(sub):
    p = sub.add_parser("demo", help="the main job: default model -> switchable checkpoint -> PPL + generation per bits")
    p.add_argument("--out", default="outputs/demo", help="where the checkpoint, table and plot go")
    p.add_argument("--group-size", type=_group_size, default=64)
    p.add_argument("--max-chunks", type=int, default=None, help="cap evaluation windows (default: full split)")
    p.add_argument("--prompt", action="append", default=None, help="a question for the chat template (repeatable)")
    p.add_argument("--method", default="gptq", choices=["gptq", "rtn"], help="how the master is chosen")
    p.add_argument("--calibration", default="lee", help="gptq calibration text: lee, wiki or a text file")
    p.add_argument("--no-contrast", action="store_true", help="skip the plain-rounding rows")
    p.set_defaults(func=run_demo)


def run_demo(args):
    from .demo import PROMPTS, demo

    demo(args.out, group_size=args.group_size, max_chunks=args.max_chunks, prompts=args.prompt or PROMPTS,
         method=args.method, calibration=args.calibration, contrast=not args.no_contrast)


# ---- train ------------------------------------------------------------------------------------------------------------
def add_train(sub):
    p = sub.add_parser("train", help="joint multi-bit QAT from a recipe YAML (also: accelerate launch -m abs_llm.cli train)")
    p.add_argument("recipe", help="recipe YAML (see recipes/ and abs_llm/recipe.py for the schema)")
    p.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    p.add_argument("--output-dir", default=None, help="override output_dir; receives the final switchable checkpoint")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if OUTPUT_DIR holds checkpoint-* dirs")
    p.add_argument("--resume-from", default=None, help="resume from this Trainer checkpoint directory")
    p.set_defaults(func=run_train)


def run_train(args):
    from .recipe import train

    resume = args.resume_from or (not args.no_resume)
    trainer = train(args.recipe, max_steps=args.max_steps, output_dir=args.output_dir, resume=resume)
    if trainer.args.should_save:
        print(f"wrote switchable checkpoint {trainer.args.output_dir} (trained on world_size={trainer.args.world_size})")


# ---- search -----------------------------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    try:
        return [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 2.5,3,4, got {text!r}") from None


def add_search(sub):
    p = sub.add_parser("search", help="HASB: Hessian traces on train docs, then per-layer bits under a budget (MILP)")
    p.add_argument("checkpoint", help="switchable (double_rounding) checkpoint directory")
    p.add_argument("--out", required=True, help="output dir: checkpoint with the chosen map + hasb.json")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--avg-bits", type=float, help="average weight bits budget")
    budget.add_argument("--size-bytes", type=int, help="model size budget in bytes (packed weights + scales + rest)")
    p.add_argument("--calib-docs", type=int, default=250, help="first N train-split documents for calibration")
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--calib-batch-size", type=int, default=1)
    p.add_argument("--calib-batches", type=int, default=1)
    p.add_argument("--n-samples", type=int, default=16, help="Rademacher vectors (hutchinson) or label draws (fisher) per batch")
    p.add_argument("--method", default="fisher", choices=["fisher", "hutchinson"],
                   help="trace estimator: Gauss-Newton/Fisher (default: never negative, one backward per sample; chosen"
                        " on validation docs, see BENCHMARKS.md) or Hutchinson on the exact Hessian (double backward)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--traces", default=None, help="reuse traces from a JSON file ({name: trace} or a hasb.json)")
    p.add_argument("--recompute", action="store_true", help="ignore traces stored in the checkpoint")
    p.add_argument("--sweep", action="store_true", help="also write sweep.json + sweep.png (PPL vs average bits)")
    p.add_argument("--sweep-bits", type=_floats, default=[2.5, 3, 3.5, 4, 5, 6])
    p.add_argument("--split", default="eval", choices=["train", "eval"], help="sweep PPL split (default held-out)")
    p.add_argument("--max-chunks", type=int, default=None, help="cap sweep PPL windows")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_search)


def _load_traces(args, model):
    if args.traces:
        from .training import load_traces

        return load_traces(args.traces), f"file {args.traces}"
    stored = getattr(model.config.quantization_config, "hessian_traces", None)
    if stored and not args.recompute:
        return stored, "checkpoint config"
    return None, None


def run_search(args):
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import hasb
    from .data import default_corpus
    from .hasb_eval import calibration_batches, layer_table, plot_sweep, sweep
    from .switching import model_bytes, set_bits, switchable_layers

    if args.avg_bits is None and args.size_bytes is None and not args.sweep:
        raise SystemExit("error: give --avg-bits or --size-bytes (or --sweep)")
    if args.calib_docs < 1 or args.calib_docs > 250:
        raise SystemExit(f"error: --calib-docs must be in [1, 250] (the train split), got {args.calib_docs}")
    out = prepare_output_dir(args.out, args.overwrite)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint)
    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    if not switchable_layers(model):
        raise SystemExit(f"error: {args.checkpoint} is not a switchable (double_rounding) checkpoint")
    report = {"checkpoint": str(args.checkpoint)}
    traces, source = _load_traces(args, model)
    if traces is None:
        batches = calibration_batches(tok, default_corpus("train")[: args.calib_docs], args.calib_seq_len,
                                      args.calib_batch_size, args.calib_batches)
        t = time.perf_counter()
        estimate = hasb.fisher_traces if args.method == "fisher" else hasb.hessian_traces
        traces = estimate(model, batches, n_samples=args.n_samples, seed=args.seed)
        report["trace_seconds"] = time.perf_counter() - t
        source = f"estimated ({args.method}, {args.n_samples} samples x {args.calib_batches} batch(es), seed {args.seed})"
        report["calibration"] = {k: getattr(args, k) for k in ("calib_docs", "calib_seq_len", "calib_batch_size",
                                                              "calib_batches", "n_samples", "seed", "method")}
    traces = hasb.check_traces(model, traces, clip=False)
    report["traces_source"] = source
    print(f"traces: {source}")
    out.mkdir(parents=True, exist_ok=True)
    if args.avg_bits is not None or args.size_bytes is not None:
        t = time.perf_counter()
        bit_map = hasb.search(model, traces, avg_bits=args.avg_bits, size_bytes=args.size_bytes)
        report["search_seconds"] = time.perf_counter() - t
        set_bits(model, bit_map)
        hasb.attach_traces(model, traces)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        report.update(avg_bits=hasb.average_bits(model), bytes=model_bytes(model),
                      budget={"avg_bits": args.avg_bits, "size_bytes": args.size_bytes},
                      layers=layer_table(model, traces, bit_map))
        print(f"wrote {out}: average {report['avg_bits']:.3f} bits, {report['bytes'] / 1e6:.1f} MB")
    report["traces"] = traces
    (out / "hasb.json").write_text(json.dumps(report, indent=2))
    if args.sweep:
        cands = sorted(next(iter(switchable_layers(model).values())).candidate_bits)
        table = sweep(model, tok, traces, default_corpus(args.split), args.sweep_bits, uniform_bits=cands,
                      max_chunks=args.max_chunks)
        (out / "sweep.json").write_text(json.dumps(table, indent=2))
        plot_sweep(table, out / "sweep.png")
        print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")


# ---- main -------------------------------------------------------------------------------------------------------------
COMMANDS = [add_demo, add_quantize, add_eval, add_train, add_search, add_export, add_push]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abs-llm", description="Adaptive Bit Switching for Hugging Face LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as e:  # our validation errors are written for humans: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
