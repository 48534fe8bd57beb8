"""The ``abs-llm quantize`` flags of ``--method gptq`` and their translation into ``quantize()`` arguments."""

from __future__ import annotations

import argparse
from pathlib import Path

CORPORA = {"lee": ("train_fit", "lee"), "wiki": ("train", "wiki")}


def _bit_weights(text: str) -> dict[int, float]:
    try:
        pairs = [p.split("=") for p in text.split(",") if p.strip()]
        return {int(b): float(w) for b, w in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BITS=WEIGHT pairs like 8=0.1,4=1, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("one-shot PTQ (--method gptq)")
    g.add_argument("--method", default="rtn", choices=["rtn", "gptq"],
                   help="rtn: round the master to nearest (default); gptq: choose it on calibration text to minimise"
                        " the layer-output error summed over all candidate widths")
    g.add_argument("--calibration", default=None,
                   help="lee (Lee train docs 0-224, default), wiki (Wikipedia sample train articles) or a text file")
    g.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens (default 16384)")
    g.add_argument("--calib-docs", type=int, default=None, help="use only the first N documents of the corpus")
    g.add_argument("--calib-seq-len", type=int, default=None, help="calibration window length (default 512)")
    g.add_argument("--gptq-bit-weights", type=_bit_weights, default=None,
                   help="weight of each width in the joint objective, e.g. 8=0.1,6=0.5,4=1,3=1,2=0.05")
    g.add_argument("--gptq-damp", type=float, default=None, help="Hessian damping, fraction of mean diag (0.01)")
    g.add_argument("--gptq-no-act-order", action="store_true", help="quantize columns in their stored order")


def calibration_texts(source: str, n_docs: int | None = None) -> list[str]:
    """Documents of ``lee``/``wiki`` or of a text file (documents separated by blank lines)."""
    from ..data import default_corpus

    if source in CORPORA:
        split, name = CORPORA[source]
        docs = default_corpus(split, name=name)
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"--calibration {source!r} is neither 'lee', 'wiki' nor an existing text file")
        docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    if n_docs is not None:
        if n_docs < 1:
            raise ValueError(f"--calib-docs must be >= 1, got {n_docs}")
        docs = docs[:n_docs]
    return docs


def quantize_kwargs(args) -> dict:
    """``method``/``calibration``/``gptq_options`` for ``abs_llm.quantize`` from parsed flags (the caller adds the
    tokenizer); ``{}`` for ``--method rtn``."""
    gptq_flags = [f for f in ("calibration", "calib_tokens", "calib_docs", "calib_seq_len", "gptq_bit_weights",
                              "gptq_damp") if getattr(args, f) is not None] + (["gptq_no_act_order"]
                                                                               if args.gptq_no_act_order else [])
    if args.method == "rtn":
        if gptq_flags:
            flags = ", ".join("--" + f.replace("_", "-") for f in gptq_flags)
            raise ValueError(f"{flags} only apply to --method gptq")
        return {}
    opts = {k: v for k, v in (("calib_tokens", args.calib_tokens), ("seq_len", args.calib_seq_len),
                              ("bit_weights", args.gptq_bit_weights), ("damp", args.gptq_damp)) if v is not None}
    if args.gptq_no_act_order:
        opts["act_order"] = False
    return {"method": "gptq", "calibration": calibration_texts(args.calibration or "lee", args.calib_docs),
            "gptq_options": opts}
