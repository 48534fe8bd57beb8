"""End-to-end library functions behind ``abs-llm quantize`` and ``abs-llm eval``: load, act, save or report. The CLI
only parses arguments, calls one of these and prints (docs/architecture.md, "Command line")."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from .config import DoubleRoundingConfig
from .saving import prepare_output_dir
from .results import DEFAULT_EVAL_CHUNKS


def load_float(model_id: str | os.PathLike | None = None, tokenizer=None, tokenizer_required: bool = True):
    """``(model, tokenizer, path)`` of a float model in float32: an HF id or path, default the embedded SmolLM2. The
    tokenizer is ``tokenizer`` (path/id) when given, else the model's own (``None`` if it has none and it is not
    required)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .data import default_model_path
    from .lineage import source_tokenizer

    path = model_id or default_model_path()
    tok = source_tokenizer(path, tokenizer, required=tokenizer_required)  # before the slow load
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tok, path


def load_checkpoint(checkpoint: str | os.PathLike, tokenizer: bool = True, tokenizer_path=None):
    """``(model, tokenizer)`` of a switchable checkpoint (tokenizer ``None`` when not asked for; else
    :func:`abs_llm.lineage.load_tokenizer`: ``tokenizer_path``, the checkpoint's, the source model's); a folder that
    is not one is refused clearly."""
    from transformers import AutoModelForCausalLM

    from .checkpoint import check_dir
    from .lineage import load_tokenizer
    from .switching import switchable_layers

    check_dir(checkpoint)  # names a broken file even where transformers' own config parsing would fail first
    cfg = Path(checkpoint) / "config.json"
    if cfg.is_file() and '"double_rounding"' not in cfg.read_text(encoding="utf-8"):
        raise ValueError(f"{checkpoint} is not a switchable (double_rounding) checkpoint")
    tok = load_tokenizer(checkpoint, tokenizer_path) if tokenizer else None  # a missing tokenizer fails fast
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    if not switchable_layers(model):
        raise ValueError(f"{checkpoint} is not a switchable (double_rounding) checkpoint")
    return model, tok


def quantize_to_dir(model_id, out, config: DoubleRoundingConfig, overwrite: bool = False, tokenizer=None,
                    evaluate: bool = True, eval_chunks: int | None = DEFAULT_EVAL_CHUNKS, method: str = "rtn",
                    calibration: str | None = None, calib_docs: int | None = None, gptq_options=None,
                    tune_norms=None, tune_norms_steps: int = 100) -> Path:
    """Quantize a float model (HF id/path; default: the embedded model) into a switchable checkpoint at ``out``, with
    its tokenizer, its source (``config.json``) and, unless ``evaluate`` is False, its PPL at every width
    (``eval_results.json``). The output folder and the tokenizer are checked before the slow part.

    ``method="gptq"`` chooses the master on ``calibration`` text (:func:`abs_llm.data.calibration_texts`: ``"lee"``,
    ``"wiki"``, ``"lee+wiki"`` or a text file; the first ``calib_docs`` documents) with ``gptq_options``.
    ``tune_norms`` (e.g. ``[4, 3]``) then fits those widths' own norm gains by distillation from the float model on
    the same text (:func:`abs_llm.tune_norms`, ``tune_norms_steps`` steps per width)."""
    from .evaluation import check_max_chunks
    from .hf_quantizer import quantize
    from .ptq import check_method
    from .results import evaluate_and_store

    check_method(method, None, None, gptq_options if method == "gptq" else None)
    if evaluate:
        check_max_chunks(eval_chunks)
    if method == "rtn" and (calibration is not None or calib_docs is not None):
        raise ValueError("calibration / calib_docs are only used by method='gptq'")
    if tune_norms:
        from .ptq.norm_tweak import check_tune_args

        check_tune_args(config, tune_norms, tune_norms_steps)
    kwargs = {}
    if method == "gptq":
        from .data import calibration_texts

        kwargs = {"method": "gptq", "calibration": calibration_texts(calibration or "lee", calib_docs),
                  "gptq_options": gptq_options}
    out = prepare_output_dir(out, overwrite)
    model, tok, _ = load_float(model_id, tokenizer, tokenizer_required=evaluate or method == "gptq" or bool(tune_norms))
    teacher = copy.deepcopy(model) if tune_norms else None  # the float model, before quantize converts it in place
    quantize(model, config, **kwargs, **({"tokenizer": tok} if kwargs else {}))
    if tune_norms:
        from .data import calibration_texts
        from .ptq.norm_tweak import tune_norms as fit

        fit(model, tok, tune_norms, teacher, calibration_texts(calibration or "lee", calib_docs),
            steps=tune_norms_steps)
        del teacher
    model.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    if evaluate:
        evaluate_and_store(out, model, tok, eval_chunks)
    return out


def evaluate_checkpoint(checkpoint, bits=None, split: str = "eval", seq_len: int = 512, max_chunks: int | None = None,
                        tasks=None, limit=None, text_file=None, batch_size: int = 1,
                        max_length: int | None = None, tokenizer=None, save: bool = False,
                        corpus: str = "lee") -> tuple[list[dict], str]:
    """Rows per bit-width (default: every candidate) and their Markdown table: built-in perplexity on a ``split`` of
    an embedded ``corpus`` (``"lee"`` or ``"wiki"``), or
    lm-evaluation-harness ``tasks``. ``save`` stores them in the checkpoint's ``eval_results.json`` / ``.md`` (the
    model card reads them); ``tokenizer`` overrides the checkpoint's (see :func:`load_checkpoint`)."""
    from .data import default_corpus
    from .evaluation import evaluate_bits, ppl_table
    from .switching import allowed_bits, check_bits

    if tasks is None and (text_file or limit is not None):
        raise ValueError("--text-file and --limit apply to lm-eval tasks; add --tasks abs_local_ppl")
    if save and (split != "eval" or text_file or corpus != "lee"):
        raise ValueError("--save stores results on the Lee held-out split; drop --split / --corpus / --text-file")
    model, tok = load_checkpoint(checkpoint, tokenizer_path=tokenizer)
    bits = check_bits(model, list(bits or allowed_bits(model)))
    if tasks is not None:
        from .lm_eval_tasks import format_lm_eval_table, lm_eval_bits

        rows = lm_eval_bits(model, tok, bits, tasks, limit=limit, text_file=text_file, batch_size=batch_size,
                            max_length=max_length)
        if save:
            from .results import write_results

            write_results(checkpoint, lm_eval={"tasks": list(tasks), "limit": limit, "rows": rows})
        return rows, format_lm_eval_table(rows)
    rows = evaluate_bits(model, tok, bits, default_corpus(split, name=corpus), seq_len, max_chunks)
    if save:
        from .results import CORPUS, write_results

        write_results(checkpoint, ppl={"corpus": CORPUS, "seq_len": seq_len, "max_chunks": max_chunks, "rows": rows})
    return rows, ppl_table(rows)
