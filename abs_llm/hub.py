"""Model card and Hugging Face Hub upload for switchable checkpoints.

``push`` always builds the upload folder first (checkpoint files + filled model card, + plot when results carry
sizes); ``--dry-run`` stops there and leaves that exact folder in ``--out``, so what would be uploaded can be read.
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


def _results_table(rows) -> str:
    if not rows:
        return "_No evaluation results were supplied; run `abs-llm eval CHECKPOINT` to measure them._"
    if all("task" in r for r in rows):
        from .lm_eval_tasks import format_lm_eval_table

        return format_lm_eval_table(rows)
    from .evaluation import ppl_table

    return ppl_table(rows)


def write_model_card(checkpoint, results=None, repo_id: str | None = None, out=None) -> Path:
    """Fill ``abs_llm/model_cards/switchable.md`` for ``checkpoint`` and write it as ``README.md`` (into ``out`` if given).

    ``results``: rows from ``abs-llm eval --json`` (``{bits, ppl, bytes}``, a ``ppl.png`` plot is drawn too) or from
    ``eval --tasks ... --json`` (``{bits, task, metric...}``), as a list or a JSON file path.
    """
    cfg = _load_config(checkpoint)
    out = Path(out or checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    qc = cfg["quantization_config"]
    rows = json.loads(Path(results).read_text()) if isinstance(results, (str, Path)) else results
    plot = ""
    if rows and all({"bits", "ppl", "bytes"} <= set(r) for r in rows):
        from .evaluation import plot_ppl

        plot_ppl(rows, out / "ppl.png")
        plot = "![perplexity by bit-width](ppl.png)"
    name = repo_id or Path(checkpoint).resolve().name
    text = Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        title=name.rpartition("/")[2], repo_id=name, base_model=cfg.get("_name_or_path") or "unknown",
        master_bits=qc.get("master_bits"), candidate_bits=qc.get("candidate_bits"),
        results=_results_table(rows), plot=plot, config=json.dumps(qc, indent=2, sort_keys=True),
    )
    path = out / CARD
    path.write_text(text, encoding="utf-8")
    return path


def prepare_upload(checkpoint, out, results=None, repo_id: str | None = None) -> Path:
    """Copy ``checkpoint`` into an empty folder ``out`` and add the model card: the exact upload content."""
    _load_config(checkpoint)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"upload folder {out} exists and is not empty")
    shutil.copytree(checkpoint, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    write_model_card(out, results=results, repo_id=repo_id)
    return out


def push(checkpoint, repo_id: str, private: bool = False, dry_run: bool = False, out=None, results=None,
         token: str | None = None) -> str:
    """Upload ``checkpoint`` (+ model card) to ``repo_id``; with ``dry_run`` only write the folder to ``out``."""
    if not repo_id or repo_id.count("/") > 1:
        raise ValueError(f"--repo-id must look like 'user/name', got {repo_id!r}")
    if dry_run:
        if out is None:
            raise ValueError("--dry-run needs --out DIR to write the upload folder to")
        return str(prepare_upload(checkpoint, out, results=results, repo_id=repo_id))
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token found: set HF_TOKEN or run `hf auth login` (or use --dry-run --out DIR"
                         " to inspect the upload); nothing was uploaded")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="abs_llm_push_") as tmp:
        folder = prepare_upload(checkpoint, Path(tmp) / "upload", results=results, repo_id=repo_id)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=url.repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload abs_llm switchable checkpoint")
    return f"https://huggingface.co/{url.repo_id}"
