"""Argument types and the flag groups ``abs-llm`` verbs share (evaluation after writing a checkpoint; the one-shot
GPTQ master of ``quantize``), kept out of :mod:`.cli` so that each verb there stays an ``add_``/``run_`` pair."""

from __future__ import annotations

import argparse

from .results import DEFAULT_EVAL_CHUNKS


def bits_list(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 8,4,2, got {text!r}") from None


def group_size_arg(text: str):
    if text.lower() in ("none", "channel", "per-channel"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer or 'none', got {text!r}") from None


def eval_flags(p, tokenizer_only: bool = False):
    """--tokenizer for every verb that needs one; --no-eval / --eval-chunks for those that store eval_results.json."""
    p.add_argument("--tokenizer", default=None, help="tokenizer path or HF id (default: the checkpoint's, else its source"
                                                     " model's)")
    if tokenizer_only:
        return
    p.add_argument("--no-eval", action="store_true", help="skip the per-width PPL stored as eval_results.json")
    p.add_argument("--eval-chunks", type=eval_chunks,
                   default=DEFAULT_EVAL_CHUNKS, help="held-out windows of 512 tokens per width for eval_results.json"
                                                     f" (default {DEFAULT_EVAL_CHUNKS}; 'all')")


def eval_chunks(text: str) -> int | None:
    if text.lower() in ("all", "none"):
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of windows >= 1 or 'all', got {text!r} (to skip the "
                                         "evaluation: --no-eval)")
    return int(text)


def bit_weights(text: str) -> dict[int, float]:
    try:
        pairs = [p.split("=") for p in text.split(",") if p.strip()]
        return {int(b): float(w) for b, w in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BITS=WEIGHT pairs like 8=0.1,4=1, got {text!r}") from None


def gptq_flags(p) -> None:
    g = p.add_argument_group("one-shot PTQ (--method gptq)")
    g.add_argument("--method", default="rtn", choices=["rtn", "gptq"],
                   help="rtn: round the master to nearest (default); gptq: choose it on calibration text to minimise"
                        " the layer-output error summed over all candidate widths")
    g.add_argument("--calibration", default=None, help="lee (Lee train docs 0-224, default), wiki (Wikipedia sample "
                                                       "train articles), lee+wiki, or a text file")
    g.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens (default 16384)")
    g.add_argument("--calib-docs", type=int, default=None, help="use only the first N documents of the corpus")
    g.add_argument("--calib-seq-len", type=int, default=None, help="calibration window length (default 512)")
    g.add_argument("--gptq-bit-weights", type=bit_weights, default=None,
                   help="weight of each width in the joint objective, e.g. 8=0.1,6=0.5,4=1,3=1,2=0.05 "
                        "(default 8=0.5,6=0.25,4=4,3=2,2=0; missing widths 1)")
    g.add_argument("--gptq-damp", type=float, default=None, help="Hessian damping, fraction of mean diag (0.01)")
    g.add_argument("--gptq-no-act-order", action="store_true", help="quantize columns in their stored order")
    g.add_argument("--gptq-asymmetric", nargs="?", const=True, default=False, type=bits_list, metavar="BITS",
                   help="each low width (or only BITS, e.g. 4,3) aims at the float outputs given its own quantized"
                        " inputs (GPTAQ)")
    g.add_argument("--tune-norms", type=bits_list, default=None, metavar="BITS",
                   help="then fit these widths' own norm gains (e.g. 4,3) by distillation from the float model on the"
                        " calibration text (norm tweaking; ~6.5 s a step on 2 AVX2 cores for the default model)")
    g.add_argument("--tune-norms-steps", type=int, default=100, help="steps of 2 x 256 tokens per width (100)")


def gptq_kwargs(args) -> dict:
    """``method`` / ``calibration`` / ``calib_docs`` / ``gptq_options`` for ``quantize_to_dir``; GPTQ flags given
    with ``--method rtn`` are refused (they would be silently ignored)."""
    opts = {k: v for k, v in (("calib_tokens", args.calib_tokens), ("seq_len", args.calib_seq_len),
                              ("bit_weights", args.gptq_bit_weights), ("damp", args.gptq_damp)) if v is not None}
    if args.gptq_no_act_order:
        opts["act_order"] = False
    if args.gptq_asymmetric:
        opts["asymmetric"] = args.gptq_asymmetric
    tune = {"tune_norms": args.tune_norms, "tune_norms_steps": args.tune_norms_steps} if args.tune_norms else {}
    if args.method == "rtn":
        if tune:
            raise ValueError("--tune-norms needs --method gptq (the norms are fitted on its calibration text)")
        given = [f for f in ("calibration", "calib_tokens", "calib_docs", "calib_seq_len", "gptq_bit_weights",
                             "gptq_damp", "gptq_no_act_order", "gptq_asymmetric") if getattr(args, f) not in (None, False)]
        if given:
            raise ValueError(", ".join("--" + f.replace("_", "-") for f in given) + " only apply to --method gptq")
        return {}
    return {"method": "gptq", "calibration": args.calibration or "lee", "calib_docs": args.calib_docs,
            "gptq_options": opts, **tune}
