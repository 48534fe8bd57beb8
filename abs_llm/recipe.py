"""QAT recipes: a YAML file -> data, switchable model, ``MultiBitTrainer`` -> final switchable checkpoint.

Schema (every key optional except where noted; unknown keys are errors so a typo never silently does nothing)::

    model: null                   # HF id or local path; null = the embedded SmolLM2-135M-Instruct
    init: null                    # optional switchable checkpoint the student starts from (e.g. a GPTQ master);
                                  # ``model`` is then the float teacher and the tokenizer; ``quant`` must agree
                                  # or be empty.
                                  # Or {method: gptq, calibration: lee, calib_tokens: 2048, ...}: make the GPTQ
                                  # master of ``model`` here first (other keys: abs_llm.ptq.GPTQOptions fields)
    output_dir: outputs/qat
    data:
      source: lee                 # "lee" | "wiki" | "lee+wiki" (embedded corpora; "+" = as much text of each,
                                  # interleaved) | a local .txt/.json/.jsonl file | a Hub dataset name
      split: train                # embedded: train|train_fit|validation|eval (train_fit: without the validation
                                  # docs); a Hub dataset: its split name
      docs: [0, 225]              # optional [start, end) slice of the documents (keep a validation slice out)
      text_field: text            # json / Hub column holding the text
      block_size: 256             # tokens per packed training block
      teacher_text:               # optional: text sampled from the float model, each sequence started from the first
        sequences: 200            # prompt_tokens tokens of a training document (abs_llm.teacher_text); mix: add
        tokens: 256               # (beside all of the source text, interleaved) | only (the sampled text alone);
        mix: add                  # cached in output_dir/teacher_text.jsonl; more keys: prompt_tokens, temperature, seed
    quant: {candidate_bits: [8, 6, 4, 3, 2], master_bits: 8, group_size: 64}
    multibit:                     # MultiBitConfig fields (abs_llm.training)
      bits: [8, 6, 4, 3, 2]
      bit_weights: {2: 0.5}
      bit_every: {8: 2, 6: 2}     # optional: train a width on every p-th step only (staggered)
      step_per_bit: false
      alrs: true
      scale_lr: 1.0e-4
      grad_adaptive: false
      kd: teacher                 # teacher | inplace | none
      kd_alpha: 1.0
      kd_temperature: 1.0
      hasb: false                 # HASB roulette bit sampling (mixed-precision supernet)
      hasb_traces: null           # {layer: trace} or a JSON file; null: stored in the model, else estimated here
    train:                        # transformers.TrainingArguments fields
      max_steps: 40
      per_device_train_batch_size: 2
      learning_rate: 1.0e-5
      lr_scheduler_type: warmup_stable_decay       # default: constant
      lr_scheduler_kwargs: {num_decay_steps: 0.3}  # below 1: that share of max_steps (--max-steps keeps it)
      bf16: auto                  # bf16 autocast where the hardware runs bf16 matmuls natively (latent weights,
                                  # fake quantization and the KL stay fp32); true / false as in TrainingArguments
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from pathlib import Path

import yaml

from .blocks import load_texts, pack_blocks
from .evaluation import check_max_chunks
from .results import DEFAULT_EVAL_CHUNKS
from .teacher_text import settings as teacher_settings

logger = logging.getLogger(__name__)

TOP_KEYS = {"model", "init", "output_dir", "data", "quant", "multibit", "train"}
DATA_KEYS = {"source", "split", "docs", "text_field", "block_size", "config", "teacher_text"}
QUANT_KEYS = {"candidate_bits", "master_bits", "group_size"}
INIT_TEXT_KEYS = ("method", "calibration", "calib_docs")  # init: {method: gptq, ...}; other keys: GPTQOptions fields
TRAIN_DEFAULTS = dict(max_steps=40, per_device_train_batch_size=2, learning_rate=1e-5, weight_decay=0.0,
                      lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_steps=20,
                      save_total_limit=2, report_to=[], seed=0, max_grad_norm=1.0)


def load_recipe(path: str | os.PathLike, max_steps: int | None = None, output_dir: str | None = None) -> dict:
    """Read and validate a recipe; command-line overrides win."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe {path} does not exist")
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping")
    for name, keys, section in (("top level", TOP_KEYS, recipe), ("data", DATA_KEYS, recipe.get("data") or {}),
                                ("quant", QUANT_KEYS, recipe.get("quant") or {})):
        unknown = set(section) - keys
        if unknown:
            raise ValueError(f"recipe {path}: unknown {name} keys {sorted(unknown)}; allowed {sorted(keys)}")
    try:
        teacher_settings((recipe.get("data") or {}).get("teacher_text"))
    except ValueError as e:
        raise ValueError(f"recipe {path}: {e}") from None
    for section in ("train", "multibit"):
        if isinstance(recipe.get(section), dict):
            recipe[section] = {k: _number(v) for k, v in recipe[section].items()}
    train = {**TRAIN_DEFAULTS, **(recipe.get("train") or {})}
    if max_steps is not None:
        train["max_steps"] = max_steps
    if not isinstance(train["max_steps"], int) or train["max_steps"] < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {train['max_steps']!r}")
    if not float(train["learning_rate"]) > 0:
        raise ValueError(f"learning_rate must be > 0, got {train['learning_rate']}")
    _decay_steps(train)
    if train.get("bf16") == "auto":
        train["bf16"], on_cpu = native_bf16()
        if train["bf16"] and on_cpu:
            train["use_cpu"] = True  # TrainingArguments refuses bf16 without a GPU unless told the run is on the CPU
    recipe["train"] = train
    recipe["output_dir"] = output_dir or recipe.get("output_dir") or "outputs/qat"
    recipe.setdefault("data", {})
    recipe.setdefault("quant", {})
    recipe["multibit"] = recipe.get("multibit") or {}
    init = recipe.get("init")
    if isinstance(init, dict) and init.get("method") == "gptq":
        from .ptq import GPTQOptions

        try:
            GPTQOptions.make({k: v for k, v in init.items() if k not in INIT_TEXT_KEYS})
        except (TypeError, ValueError) as e:
            raise ValueError(f"recipe {path}: init: {e}") from None
    elif init is not None and not isinstance(init, (str, os.PathLike)):
        raise ValueError(f"recipe {path}: init must be a checkpoint path or a mapping with method: gptq (plus "
                         f"calibration, calib_docs and GPTQ options such as calib_tokens), got {init!r}")
    return recipe


def _decay_steps(train: dict) -> None:
    """A ``num_decay_steps`` below 1 is that share of ``max_steps`` (as TrainingArguments reads ``warmup_steps``), so
    ``--max-steps`` keeps a warmup-stable-decay recipe's shape. A decay longer than the run is refused: the scheduler
    would silently start the run part-way down it."""
    kwargs = train.get("lr_scheduler_kwargs")
    if (train.get("lr_scheduler_type") != "warmup_stable_decay" or not isinstance(kwargs, dict)
            or "num_stable_steps" in kwargs or not isinstance(kwargs.get("num_decay_steps"), (int, float))):
        return  # another schedule, an explicit stable phase, or no decay given: transformers checks those
    steps = train["max_steps"]
    decay, warmup = (math.ceil(round(steps * v, 6)) if 0 < v < 1 else v
                     for v in (kwargs["num_decay_steps"], train.get("warmup_steps") or 0))
    if decay != int(decay) or not 1 <= decay <= steps - warmup:
        raise ValueError(f"lr_scheduler_kwargs.num_decay_steps={kwargs['num_decay_steps']!r} does not fit "
                         f"max_steps={steps} (warmup {warmup}): give a whole number of steps up to {steps - warmup}, "
                         f"or a fraction of max_steps below 1 (e.g. 0.3)")
    train["lr_scheduler_kwargs"] = {**kwargs, "num_decay_steps": int(decay)}


def _number(value):
    """YAML 1.1 (PyYAML) reads ``3e-5`` (no dot) as a string; a recipe means the number."""
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)
    return value


# ---- run ----------------------------------------------------------------------------------------------------------
def build_trainer(recipe: dict, tokenizer=None):
    """Model, teacher, data and ``MultiBitTrainer`` for a validated recipe (nothing trained yet)."""
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments, default_data_collator

    from .config import DoubleRoundingConfig
    from .hf_quantizer import quantize
    from .training import MultiBitConfig, MultiBitTrainer

    qcfg = DoubleRoundingConfig(**recipe["quant"])  # trains from the highest candidate; defaults live in core
    mb_fields = dict(recipe["multibit"])
    if "bit_weights" in mb_fields and mb_fields["bit_weights"]:
        mb_fields["bit_weights"] = {int(k): float(v) for k, v in mb_fields["bit_weights"].items()}
    if mb_fields.get("bit_every"):
        mb_fields["bit_every"] = {int(k): v for k, v in mb_fields["bit_every"].items()}
    try:
        mb = MultiBitConfig(**mb_fields)
    except TypeError as e:
        raise ValueError(f"recipe multibit section: {e}") from None
    bad = [b for b in (mb.bits or []) if b not in qcfg.candidate_bits]
    if bad:
        raise ValueError(f"multibit.bits {bad} are not in quant.candidate_bits {qcfg.candidate_bits}")
    try:
        args = TrainingArguments(output_dir=recipe["output_dir"], **recipe["train"])
    except TypeError as e:
        raise ValueError(f"recipe train section: {e}") from None

    if recipe.get("model"):
        path = recipe["model"]
    else:
        from .data import default_model_path

        path = default_model_path()
    from .lineage import source_tokenizer

    tok = source_tokenizer(path, tokenizer)
    data = recipe["data"]
    texts = load_texts(data)
    train_ds = pack_blocks(tok, texts, data.get("block_size", 256))  # data errors before the model loads
    sampled = teacher_settings(data.get("teacher_text"))
    init = recipe.get("init")
    if init and not isinstance(init, dict):
        model = load_init(init, recipe["quant"])
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() if mb.kd != "none" else None
        if sampled:
            float_model = teacher if teacher is not None else AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32)
            train_ds = _with_teacher_text(sampled, float_model, tok, texts, data, args)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        teacher = copy.deepcopy(model).eval() if mb.kd != "none" else None
        if sampled:  # the float model, before it is quantized
            train_ds = _with_teacher_text(sampled, model, tok, texts, data, args)
        quantize(model, qcfg, trainable=True, **(gptq_init(init, tok) if init else {}))
    model.config.use_cache = False
    if mb.hasb and mb.hasb_traces is None and not getattr(model.config.quantization_config, "hessian_traces", None):
        mb.hasb_traces = estimate_traces(model, train_ds, seed=mb.hasb_seed)
    return MultiBitTrainer(model=model, args=args, multibit=mb, teacher=teacher, train_dataset=train_ds,
                           data_collator=default_data_collator, processing_class=tok)


def _with_teacher_text(sampled: dict, float_model, tok, texts: list[str], data: dict, args):
    """Training blocks with the float model's own text beside all of the source text (``mix: add``, interleaved) or
    alone (``mix: only``); under several processes the main one samples and caches it, the others read the cache."""
    from .data import interleave
    from .teacher_text import teacher_text

    with args.main_process_first(desc="teacher text"):
        extra = teacher_text(sampled, float_model, tok, texts, args.output_dir)
    mixed = extra if sampled["mix"] == "only" else interleave([texts, extra])
    return pack_blocks(tok, mixed, data.get("block_size", 256))


def native_bf16() -> tuple[bool, bool]:
    """``(bf16 autocast pays here, the run is on the CPU)`` for ``train: {bf16: auto}``: a CUDA GPU with bf16, or a
    CPU whose matmuls run bf16 natively (AVX512-BF16 or AMX: 2.7x fp32 on the 2-core EPYC of BENCHMARKS.md). Other
    CPUs emulate bf16 and would run slower than fp32. (On the CPU, FSDP2 keeps fp32 parameters under autocast:
    ``distributed.enable_cpu_fsdp2`` installs its own plugin without accelerate's bf16 policy.)"""
    import torch

    if torch.cuda.is_available():
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            # accelerate turns bf16 into an FSDP policy that all-gathers the latent weights in bf16, and
            # round(bf16(W) / s) is not the master's round(W / s) (recipes/accelerate_fsdp.yaml)
            logger.warning("bf16: auto under FSDP on GPUs -> fp32 (a bf16 FSDP policy would round the latent weights)")
            return False, False
        return torch.cuda.is_bf16_supported(), False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu helpers: absent -> False
    return any(getattr(torch.cpu, f, lambda: False)() for f in probes), True


def gptq_init(init: dict, tokenizer) -> dict:
    """``quantize`` arguments for ``init: {method: gptq, ...}``: the GPTQ master is chosen on the calibration text
    (``lee`` = Lee train docs 0-224 unless ``calib_docs``), the rest of the mapping are ``GPTQOptions`` fields."""
    from .data import calibration_texts

    opts = {k: v for k, v in init.items() if k not in INIT_TEXT_KEYS}
    return {"method": "gptq", "tokenizer": tokenizer, "gptq_options": opts,
            "calibration": calibration_texts(init.get("calibration", "lee"), init.get("calib_docs"))}


def load_init(init, quant: dict):
    """The switchable checkpoint a recipe's student starts from (MultiBitTrainer turns its master into latent weights);
    a ``quant`` section that contradicts the checkpoint is refused instead of silently ignored."""
    from transformers import AutoModelForCausalLM

    from .switching import switchable_layers

    if not Path(init, "config.json").is_file():
        raise ValueError(f"init {init} is not a checkpoint directory (no config.json); give a switchable checkpoint")
    model = AutoModelForCausalLM.from_pretrained(init)
    if not switchable_layers(model):
        raise ValueError(f"init {init} is not a switchable (double_rounding) checkpoint")
    qc = model.config.quantization_config
    have = {"candidate_bits": list(qc.candidate_bits), "master_bits": qc.master_bits, "group_size": qc.group_size}
    bad = {k: v for k, v in quant.items() if k in have and (sorted(v) if k == "candidate_bits" else v) != (
        sorted(have[k]) if k == "candidate_bits" else have[k])}
    if bad:
        raise ValueError(f"recipe quant {bad} contradicts the init checkpoint {init} ({have}); drop the quant section")
    model.config.use_cache = False
    return model


def estimate_traces(model, train_ds, n_blocks: int = 8, n_samples: int = 4, seed: int = 0) -> dict[str, float]:
    """HASB sensitivities from the first training blocks (Gauss-Newton/Fisher traces, ``n_samples`` label draws per
    block), for a recipe with ``hasb: true`` and no traces; ~20 s on the default model on 2 CPU cores."""
    import time

    import torch

    from .hasb import fisher_traces

    batches = [torch.tensor([ids]) for ids in train_ds[:n_blocks]["input_ids"]]
    t = time.perf_counter()
    traces = fisher_traces(model, batches, n_samples=n_samples, seed=seed)
    logger.warning("estimated HASB traces on %d block(s) x %d samples in %.0f s", len(batches), n_samples,
                   time.perf_counter() - t)
    return traces


def last_checkpoint(output_dir: str) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


def train(recipe_path, max_steps=None, output_dir=None, resume: bool | str = True, tokenizer=None,
          evaluate: bool = True, eval_chunks: int | None = DEFAULT_EVAL_CHUNKS):
    """Run a recipe end to end. ``resume=True`` continues from the newest ``checkpoint-*`` in the output dir. The final
    checkpoint gets its own ``eval_results.json`` (PPL at every width) unless ``evaluate`` is False."""
    recipe = load_recipe(recipe_path, max_steps, output_dir)
    check_max_chunks(eval_chunks if evaluate else None)  # before the training, not after it
    ckpt = resume if isinstance(resume, str) else (last_checkpoint(recipe["output_dir"]) if resume else None)
    if ckpt:
        logger.warning("resuming from %s", ckpt)
        if isinstance(recipe.get("init"), dict):  # the checkpoint replaces every latent weight and scale: no GPTQ
            recipe = {**recipe, "init": None}
    trainer = build_trainer(recipe, tokenizer)
    trainer.train(resume_from_checkpoint=ckpt)
    out = recipe["output_dir"]
    saved = trainer.save_switchable(out)  # under FSDP2 the gathered copy: trainer.model stays sharded
    if trainer.args.should_save:
        Path(out, "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        plot_losses(trainer.state.log_history, Path(out, "loss_per_bits.png"))
        if evaluate:
            from .results import evaluate_and_store

            evaluate_and_store(out, saved, trainer.processing_class, eval_chunks)
    return trainer


def plot_losses(log_history: list[dict], path) -> None:
    """Loss per bit-width against step (keys ``loss_w<b>`` written by ``MultiBitTrainer.log``); skipped with a warning
    where matplotlib is not installed (a bare GPU box), so a finished run still ends cleanly."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (the losses are in log_history.json)", path)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for e in log_history for k in e if k.startswith("loss_w")}, key=lambda k: -int(k[6:]))
    if not keys:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in keys:
        pts = [(e["step"], e[k]) for e in log_history if k in e]
        ax.plot(*zip(*pts), label=f"{k[6:]}-bit")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (KD/LM)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
