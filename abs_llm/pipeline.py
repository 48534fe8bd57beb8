"""End-to-end library functions behind ``abs-llm quantize`` and ``abs-llm eval``: load, act, save or report. The CLI
only parses arguments, calls one of these and prints (docs/architecture.md, "Command line")."""

from __future__ import annotations

import os
from pathlib import Path

from .config import DoubleRoundingConfig
from .integrity import prepare_output_dir


def load_float(model_id: str | os.PathLike | None = None):
    """``(model, tokenizer, path)`` of a float model in float32: an HF id or path, default the embedded SmolLM2."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import default_model_path

    path = model_id or default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path), path


def load_checkpoint(checkpoint: str | os.PathLike, tokenizer: bool = True):
    """``(model, tokenizer)`` of a switchable checkpoint (tokenizer ``None`` when not asked for); a folder that is not
    one is refused clearly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import check_dir
    from .switching import switchable_layers

    check_dir(checkpoint)  # names a broken file even where transformers' own config parsing would fail first
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    if not switchable_layers(model):
        raise ValueError(f"{checkpoint} is not a switchable (double_rounding) checkpoint")
    return model, AutoTokenizer.from_pretrained(checkpoint) if tokenizer else None


def quantize_to_dir(model_id, out, config: DoubleRoundingConfig, overwrite: bool = False) -> Path:
    """Quantize a float model (HF id/path; default: the embedded model) into a switchable checkpoint at ``out``.
    The output folder is checked before the slow part."""
    from .hf_quantizer import quantize

    out = prepare_output_dir(out, overwrite)
    model, tok, _ = load_float(model_id)
    quantize(model, config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def evaluate_checkpoint(checkpoint, bits=None, split: str = "eval", seq_len: int = 512, max_chunks: int | None = None,
                        tasks=None, limit=None, text_file=None, batch_size: int = 1,
                        max_length: int | None = None) -> tuple[list[dict], str]:
    """Rows per bit-width (default: every candidate) and their Markdown table: built-in perplexity on a Lee split, or
    lm-evaluation-harness ``tasks``."""
    from .data import default_corpus
    from .evaluation import evaluate_bits, ppl_table
    from .switching import allowed_bits, check_bits

    if tasks is None and (text_file or limit is not None):
        raise ValueError("--text-file and --limit apply to lm-eval tasks; add --tasks abs_local_ppl")
    model, tok = load_checkpoint(checkpoint)
    bits = check_bits(model, list(bits or allowed_bits(model)))
    if tasks is not None:
        from .lm_eval_tasks import format_lm_eval_table, lm_eval_bits

        rows = lm_eval_bits(model, tok, bits, tasks, limit=limit, text_file=text_file, batch_size=batch_size,
                            max_length=max_length)
        return rows, format_lm_eval_table(rows)
    rows = evaluate_bits(model, tok, bits, default_corpus(split), seq_len, max_chunks)
    return rows, ppl_table(rows)
