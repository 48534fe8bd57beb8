"""``abs-llm`` console script: each subcommand is an ``add_<name>(subparsers)`` that parses, and a ``run_<name>(args)``
that calls one library function and prints. A library ``ValueError`` becomes one line on stderr and exit code 2, the
same code argparse uses for a malformed command line."""

from __future__ import annotations

import argparse
import json
import sys

from .cli_args import bits_list, eval_flags, gptq_flags, gptq_kwargs, group_size_arg
from .core import DEFAULT_CANDIDATE_BITS, DEFAULT_GROUP_SIZE, DEFAULT_MASTER_BITS


# ---- quantize ---------------------------------------------------------------------------------------------------------
def add_quantize(sub):
    p = sub.add_parser("quantize", help="float model (HF id/path, default: embedded SmolLM2) -> switchable checkpoint")
    p.add_argument("model", nargs="?", default=None, help="HF model id or local path (default: embedded SmolLM2-135M)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--bits", type=int, default=None, help="active bits saved in the checkpoint (default: highest)")
    p.add_argument("--candidate-bits", type=bits_list, default=list(DEFAULT_CANDIDATE_BITS))
    p.add_argument("--master-bits", type=int, default=DEFAULT_MASTER_BITS, choices=[8, 4])
    p.add_argument("--group-size", type=group_size_arg, default=DEFAULT_GROUP_SIZE,
                   help="power of two in [16, 1024], or 'none'")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    eval_flags(p)
    gptq_flags(p)
    p.set_defaults(func=run_quantize)


def run_quantize(args):
    from . import DoubleRoundingConfig
    from .pipeline import quantize_to_dir

    cfg = DoubleRoundingConfig(bits=args.bits, candidate_bits=args.candidate_bits, master_bits=args.master_bits,
                               group_size=args.group_size)
    gptq = gptq_kwargs(args)
    out = quantize_to_dir(args.model, args.out, cfg, overwrite=args.overwrite, tokenizer=args.tokenizer,
                          evaluate=not args.no_eval, eval_chunks=args.eval_chunks, **gptq)
    print(f"wrote switchable checkpoint {out} (from {args.model or 'the embedded SmolLM2-135M-Instruct'}; "
          f"{args.method} master INT{cfg.master_bits}, bits {cfg.candidate_bits})")


# ---- eval -------------------------------------------------------------------------------------------------------------
def add_eval(sub):
    p = sub.add_parser("eval", help="perplexity of a switchable checkpoint at each bit-width")
    p.add_argument("checkpoint")
    p.add_argument("--bits", type=bits_list, default=None, help="bit-widths to evaluate (default: all candidates)")
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
    p.add_argument("--save", action="store_true", help="also store the results in CHECKPOINT/eval_results.json + .md"
                                                       " (the model card uses them)")
    eval_flags(p, tokenizer_only=True)
    p.set_defaults(func=run_eval)


def run_eval(args):
    from .pipeline import evaluate_checkpoint

    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    rows, table = evaluate_checkpoint(args.checkpoint, args.bits, args.split, args.seq_len, args.max_chunks,
                                      tasks=args.tasks, limit=limit, text_file=args.text_file,
                                      batch_size=args.batch_size, max_length=args.max_length, tokenizer=args.tokenizer,
                                      save=args.save, corpus=args.corpus)
    print(json.dumps(rows, indent=2) if args.json else table)
    if args.save:
        print(f"stored in {args.checkpoint}/eval_results.json and eval_results.md", file=sys.stderr)


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
    from .export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, args.bits, args.format, overwrite=args.overwrite)
    print(f"wrote {args.format} snapshot at {args.bits} bits to {out}")


# ---- push -------------------------------------------------------------------------------------------------------------
def add_push(sub):
    p = sub.add_parser("push", help="upload a switchable checkpoint + model card to the Hugging Face Hub")
    p.add_argument("checkpoint")
    p.add_argument("--repo-id", required=True, help="user/name on the Hub")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="write the upload folder to --out, upload nothing")
    p.add_argument("--out", default=None, help="with --dry-run: where the upload folder goes")
    p.add_argument("--results", default=None, help="JSON from `abs-llm eval --json` for the model card table (default:"
                                                   " the checkpoint's eval_results.json, else measured on the copy)")
    eval_flags(p)
    p.set_defaults(func=run_push)


def run_push(args):
    from .hub import push

    where = push(args.checkpoint, args.repo_id, private=args.private, dry_run=args.dry_run, out=args.out,
                 results=args.results, evaluate=not args.no_eval, tokenizer=args.tokenizer,
                 eval_chunks=args.eval_chunks)
    print(f"dry run: wrote the upload folder {where} (nothing uploaded)" if args.dry_run else f"uploaded to {where}")


# ---- demo -------------------------------------------------------------------------------------------------------------
def add_demo(sub):
    p = sub.add_parser("demo", help="the main job: default model -> switchable checkpoint -> PPL + generation per bits")
    p.add_argument("--out", default="outputs/demo", help="where the checkpoint, table and plot go")
    p.add_argument("--group-size", type=group_size_arg, default=DEFAULT_GROUP_SIZE)
    p.add_argument("--max-chunks", type=int, default=8, help="evaluation windows per width (0: the full split)")
    p.add_argument("--calib-tokens", type=int, default=2048, help="GPTQ calibration tokens (library default 16384)")
    p.add_argument("--prompt", action="append", default=None, help="a question for the chat template (repeatable)")
    p.add_argument("--method", default="gptq", choices=["gptq", "rtn"], help="how the master is chosen")
    p.add_argument("--calibration", default="lee", help="gptq calibration text: lee, wiki or a text file")
    p.add_argument("--no-contrast", action="store_true", help="skip the plain-rounding rows")
    p.set_defaults(func=run_demo)


def run_demo(args):
    from .demo import PROMPTS, demo

    demo(args.out, group_size=args.group_size, max_chunks=args.max_chunks or None, prompts=args.prompt or PROMPTS,
         method=args.method, calibration=args.calibration, calib_tokens=args.calib_tokens,
         contrast=not args.no_contrast)


# ---- train ------------------------------------------------------------------------------------------------------------
def add_train(sub):
    p = sub.add_parser("train", help="joint multi-bit QAT from a recipe YAML (also: accelerate launch -m abs_llm.cli train)")
    p.add_argument("recipe", help="recipe YAML (see recipes/ and abs_llm/recipe.py for the schema)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="override train.max_steps (a num_decay_steps below 1 is a share of it)")
    p.add_argument("--output-dir", default=None, help="override output_dir; receives the final switchable checkpoint")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if OUTPUT_DIR holds checkpoint-* dirs")
    p.add_argument("--resume-from", default=None, help="resume from this Trainer checkpoint directory")
    eval_flags(p)
    p.set_defaults(func=run_train)


def run_train(args):
    from .recipe import train

    resume = args.resume_from or (not args.no_resume)
    trainer = train(args.recipe, max_steps=args.max_steps, output_dir=args.output_dir, resume=resume,
                    tokenizer=args.tokenizer, evaluate=not args.no_eval, eval_chunks=args.eval_chunks)
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
    eval_flags(p)
    p.set_defaults(func=run_search)


def run_search(args):
    from .hasb import search_checkpoint

    report = search_checkpoint(
        args.checkpoint, args.out, avg_bits=args.avg_bits, size_bytes=args.size_bytes, traces=args.traces,
        recompute=args.recompute, method=args.method, calib_docs=args.calib_docs, calib_seq_len=args.calib_seq_len,
        calib_batch_size=args.calib_batch_size, calib_batches=args.calib_batches, n_samples=args.n_samples,
        seed=args.seed, sweep_bits=args.sweep_bits if args.sweep else None, split=args.split,
        max_chunks=args.max_chunks, overwrite=args.overwrite, tokenizer=args.tokenizer, evaluate=not args.no_eval,
        eval_chunks=args.eval_chunks)
    print(f"traces: {report['traces_source']}")
    if "avg_bits" in report:
        print(f"wrote {args.out}: average {report['avg_bits']:.3f} bits, {report['bytes'] / 1e6:.1f} MB")
    if args.sweep:
        print(f"wrote {args.out}/sweep.json and {args.out}/sweep.png")


# ---- generate (issue 13: self-speculative decoding) ------------------------------------------------------------------
def add_generate(sub):
    p = sub.add_parser("generate", help="greedy text from a switchable checkpoint, optionally drafted at low bits "
                                        "from the same master (self-speculative decoding)")
    p.add_argument("checkpoint", help="switchable (double_rounding) checkpoint directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--bits", default=None, help="verifier bits: an integer or a search output dir (default: saved)")
    p.add_argument("--draft-bits", default=None, help="draft bits (integer or search output dir); omit: no draft")
    p.add_argument("--draft-head-bits", type=int, default=None,
                   help="give the draft its own low-bit copy of a float lm_head (e.g. 4)")
    p.add_argument("--num-assistant-tokens", type=int, default=None, help="draft tokens per step K")
    p.add_argument("--schedule", default=None, choices=["constant", "heuristic", "heuristic_transient"],
                   help="how K changes (transformers' num_assistant_tokens_schedule)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", help="activations: bfloat16 (fast integer kernels) or float32")
    p.add_argument("--no-chat-template", dest="chat", action="store_false", default=None,
                   help="use the prompt as raw text even if the tokenizer has a chat template")
    p.add_argument("--compare", action="store_true", help="also run the verifier alone: speed-up, identical text")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    eval_flags(p, tokenizer_only=True)
    p.set_defaults(func=run_generate)


def run_generate(args):
    from .generate import generate, summary_line

    r = generate(args.checkpoint, args.prompt, bits=args.bits, draft_bits=args.draft_bits,
                 head_bits=args.draft_head_bits, num_assistant_tokens=args.num_assistant_tokens,
                 schedule=args.schedule, max_new_tokens=args.max_new_tokens, compare=args.compare, dtype=args.dtype,
                 chat=args.chat, tokenizer=args.tokenizer)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(r["text"])
    print(summary_line(r), file=sys.stderr)


# ---- main -------------------------------------------------------------------------------------------------------------
COMMANDS = [add_demo, add_quantize, add_eval, add_train, add_search, add_export, add_push, add_generate]


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
