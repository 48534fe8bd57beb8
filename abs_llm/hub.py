"""Model card and Hugging Face Hub upload for switchable checkpoints.

``push`` always builds the upload folder first (checkpoint files + filled model card with the per-width results and
their plot, from ``--results``, the checkpoint's ``eval_results.json``, or measured on the copy; ``--no-eval`` skips
that on purpose); ``--dry-run`` stops there and leaves that exact folder in ``--out``, so what would be uploaded can be read.
A real push needs a token (``HF_TOKEN`` or ``hf auth login``); without one it stops before any network call.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from string import Template

TEMPLATE = Path(__file__).resolve().parent / "model_cards" / "switchable.md"  # shipped as package data
CARD = "README.md"


def _load_config(checkpoint) -> dict:
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise ValueError(f"{checkpoint} has no config.json; not a checkpoint directory")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if (cfg.get("quantization_config") or {}).get("quant_method") != "double_rounding":
        raise ValueError(f"{checkpoint} is not a switchable (double_rounding) checkpoint")
    return cfg


def _results(checkpoint, results, evaluated: str | None) -> tuple[str, list[dict]]:
    """The card's results section and the rows to plot: ``results`` (rows or a JSON file from ``abs-llm eval --json``)
    when given, else the checkpoint's own ``eval_results.json``."""
    from .results import markdown, read_results

    if results is not None:
        rows = json.loads(Path(results).read_text()) if isinstance(results, (str, Path)) else list(results)
        if rows and all("task" in r for r in rows):
            from .lm_eval_tasks import format_lm_eval_table

            return format_lm_eval_table(rows), []
        from .evaluation import ppl_table

        return (ppl_table(rows) if rows else evaluated or "_No evaluation results were supplied._"), rows
    data = read_results(checkpoint) or {}
    text = markdown(data) or evaluated or "_No evaluation results: run `abs-llm eval CHECKPOINT --save` to measure them._"
    return text, (data.get("ppl") or {}).get("rows", [])


def _source_text(cfg: dict) -> tuple[str, str]:
    """``(front-matter line, sentence)`` for the card: a real ``base_model:`` only when the source is known."""
    src = cfg.get("abs_llm_source") or {}
    base = src.get("base_model")
    meta = f"base_model: {base}\n" if base else ""
    if src.get("gguf"):
        g = src["gguf"]
        fields = ", ".join(f"{k}: {g[k]}" for k in ("name", "organization", "finetune", "size_label", "version")
                           if g.get(k))
        sentence = f"[{base}](https://huggingface.co/{base}), read from the GGUF file `{g.get('file')}` ({fields})"
    elif base:
        sentence = f"[{base}](https://huggingface.co/{base})" if "/" in base else f"`{base}`"
    else:
        sentence = "a model whose source was not recorded"
    return meta, sentence


def write_model_card(checkpoint, results=None, repo_id: str | None = None, out=None, evaluated: str | None = None) -> Path:
    """Fill ``abs_llm/model_cards/switchable.md`` for ``checkpoint`` and write it as ``README.md`` (into ``out`` if given).

    The results section and the ``ppl.png`` plot come from ``results`` (rows of ``abs-llm eval --json``, as a list
    or a JSON file) when given, else from the checkpoint's ``eval_results.json`` (:mod:`abs_llm.results`); ``evaluated``
    replaces the "no results" line (e.g. to say evaluation was skipped on purpose).
    """
    cfg = _load_config(checkpoint)
    out = Path(out or checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    qc = cfg["quantization_config"]
    table, rows = _results(checkpoint, results, evaluated)
    plot = ""
    rows = [r for r in rows if isinstance(r.get("bits"), int)]  # a searched map's row is a label, not a width
    if rows and all({"bits", "ppl", "bytes"} <= set(r) for r in rows):
        from .evaluation import plot_ppl

        plot_ppl(rows, out / "ppl.png")
        plot = "![perplexity by bit-width](ppl.png)"
    name = repo_id or Path(checkpoint).resolve().name
    base_meta, source = _source_text(cfg)
    text = Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        title=name.rpartition("/")[2], repo_id=name, base_model_meta=base_meta, source=source,
        master_bits=qc.get("master_bits"), candidate_bits=qc.get("candidate_bits"),
        results=table, plot=plot, config=json.dumps(qc, indent=2, sort_keys=True),
    )
    path = out / CARD
    path.write_text(text, encoding="utf-8")
    return path


def prepare_upload(checkpoint, out, results=None, repo_id: str | None = None, evaluate: bool = True,
                   tokenizer=None, eval_chunks: int | None = None) -> Path:
    """Copy ``checkpoint`` into an empty folder ``out`` and add the model card: the exact upload content. Without
    ``results`` and without current ``eval_results.json``, the copy is evaluated first (PPL at every width, written
    into the copy only) unless ``evaluate`` is False."""
    from .results import DEFAULT_EVAL_CHUNKS, evaluate_and_store, read_results

    _load_config(checkpoint)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"upload folder {out} exists and is not empty")
    need_eval = evaluate and results is None and read_results(checkpoint) is None
    if need_eval:
        from .evaluation import check_max_chunks
        from .pipeline import load_checkpoint

        check_max_chunks(eval_chunks)
        try:  # tokenizer and model before any file is copied: a refusal leaves no half-made folder
            model, tok = load_checkpoint(checkpoint, tokenizer_path=tokenizer)
        except ValueError as e:
            raise ValueError(f"{e} (or --no-eval to publish without results)") from None
    shutil.copytree(checkpoint, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    if need_eval:
        evaluate_and_store(out, model, tok, DEFAULT_EVAL_CHUNKS if eval_chunks is None else eval_chunks)
    skipped = None if evaluate else "_Evaluation skipped on purpose (`--no-eval`)._"
    write_model_card(out, results=results, repo_id=repo_id, evaluated=skipped)
    return out


def push(checkpoint, repo_id: str, private: bool = False, dry_run: bool = False, out=None, results=None,
         token: str | None = None, evaluate: bool = True, tokenizer=None, eval_chunks: int | None = None) -> str:
    """Upload ``checkpoint`` (+ model card with the per-width results and plot) to ``repo_id``; with ``dry_run`` only
    write the folder to ``out``. See :func:`prepare_upload` for ``evaluate`` / ``tokenizer`` / ``eval_chunks``."""
    if not repo_id or repo_id.count("/") > 1:
        raise ValueError(f"--repo-id must look like 'user/name', got {repo_id!r}")
    prep = dict(results=results, repo_id=repo_id, evaluate=evaluate, tokenizer=tokenizer, eval_chunks=eval_chunks)
    if dry_run:
        if out is None:
            raise ValueError("--dry-run needs --out DIR to write the upload folder to")
        return str(prepare_upload(checkpoint, out, **prep))
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token found: set HF_TOKEN or run `hf auth login` (or use --dry-run --out DIR"
                         " to inspect the upload); nothing was uploaded")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="abs_llm_push_") as tmp:
        folder = prepare_upload(checkpoint, Path(tmp) / "upload", **prep)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=url.repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload abs_llm switchable checkpoint")
    return f"https://huggingface.co/{url.repo_id}"
