"""Joint multi-bit QAT on the default model: PTQ start, QAT variants, float fine-tune baseline, per-step cost.

Tuning rule: variants are compared on the *validation* slice (Lee train docs 225-249, never trained on: the QAT data is
docs 0-224). The held-out split (docs 250-299) is only used with ``--split eval`` for the final report.

    python benchmarks/bench_qat.py ptq --split val
    python benchmarks/bench_qat.py qat --variant shipped --steps 12 --split val
    python benchmarks/bench_qat.py float_ft --steps 12 --split eval
    python benchmarks/bench_qat.py cost [--reps 3] [--fused]
    python benchmarks/bench_qat.py ptq --init CKPT --tag START --split val      # a checkpoint's step-0 point
    python benchmarks/bench_qat.py plot --tags A,B --fp 28.78 --png curves.png  # validation PPL per width vs step
Each run prints one JSON line and appends it to ``--out`` (default outputs/bench_qat/results.jsonl).

Tuning harness (issue 16, "QAT that keeps improving"): start from a switchable checkpoint (``--init``: the GPTQ or RTN
master), override any recipe knob with ``--set section.key=value`` (YAML values), and log validation PPL per width
every ``--eval-every`` steps (``curve`` in the JSON line), so a run that stops improving shows where::

    python benchmarks/bench_qat.py qat --variant shipped --init CKPT --steps 20 --eval-every 10 \
        --set train.learning_rate=3e-5 --set train.lr_scheduler_type=cosine --set multibit.kd_alpha=0.5
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from common import machine_info, ppl_per_width

BITS = [8, 6, 4, 3, 2]
BASE = {  # common to every variant; a variant overrides "multibit"/"train" keys
    "data": {"source": "lee", "split": "train", "docs": [0, 225], "block_size": 256},
    "quant": {"candidate_bits": BITS, "master_bits": 8, "group_size": 64},
    "multibit": {"scale_lr": 1e-4, "kd": "teacher", "alrs": True},
    "train": {"per_device_train_batch_size": 2, "learning_rate": 1e-5, "lr_scheduler_type": "constant",
              "save_strategy": "no", "logging_steps": 1, "seed": 0},
}
VARIANTS = {
    "shipped": {"step_per_bit": True},  # recipes/qat_smollm2_cpu.yaml's multibit section; tune it with --set
    # issue 7's naive prototype shape: paper Alg. A.2, equal weights, all bits
    "naive": {"step_per_bit": True},
    "naive_noalrs": {"step_per_bit": True, "alrs": False},
    "accum": {"step_per_bit": False},
    "accum_noalrs": {"step_per_bit": False, "alrs": False},
    "accum_lossnorm": {"step_per_bit": False, "loss_norm": True},
    "accum_no2": {"step_per_bit": False, "bits": [8, 6, 4, 3]},
    "accum_lowweight": {"step_per_bit": False, "bit_weights": {8: 1, 6: 1, 4: 1, 3: 0.3, 2: 0.1}},
    "lowtohigh": {"step_per_bit": True, "bits": [2, 3, 4, 6, 8]},
    # the scales are ~1e-3 (abs-max / 127): Adam at scale_lr 1e-4 moves them ~10% per step, shrinking them for the
    # low bits' benefit clips the 8-bit grid; these runs test a scale LR on the weights' relative scale
    "accum_slr1e-6": {"step_per_bit": False, "scale_lr": 1e-6},
    "accum_slr1e-5": {"step_per_bit": False, "scale_lr": 1e-5},
    "accum_slr1e-6_noalrs": {"step_per_bit": False, "scale_lr": 1e-6, "alrs": False},
    "naive_slr1e-6": {"step_per_bit": True, "scale_lr": 1e-6},
    # shared Adam moments let the low bits' scale gradients ride on the 8-bit step's LR (training.py docstring)
    "naive_perbit": {"step_per_bit": True, "per_bit_scale_state": True},
}


def eval_model(model, tok, split, max_chunks, bits=BITS):
    if split == "both":  # validation for choosing, held-out for the final report, from one trained model
        return {f"{s}_{k}": v for s in ("val", "eval") for k, v in eval_model(model, tok, s, max_chunks, bits).items()}
    return ppl_per_width(model, tok, split, bits, max_chunks)


def ptq(model, bits=BITS):
    from abs_llm import DoubleRoundingConfig, quantize

    return quantize(copy.deepcopy(model), DoubleRoundingConfig(candidate_bits=bits, group_size=64))


def apply_overrides(recipe: dict, sets) -> dict:
    """``["train.learning_rate=3e-5", "multibit.bit_weights={2: 0.5}"]`` -> recipe sections updated (YAML values)."""
    import yaml

    for item in sets or []:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("data", "multibit", "train"):
            raise ValueError(f"--set {item!r}: expected data|multibit|train.KEY=VALUE")
        recipe[section][name] = yaml.safe_load(value)  # load_recipe turns a dotless 3e-5 into a number
    return recipe


def recipe_for(variant, steps, out, hasb_traces=None, init=None, sets=None, recipe_file=None):
    import yaml

    if recipe_file:  # a shipped recipe (e.g. recipes/qat_smollm2_gpu.yaml) instead of BASE + variant
        r = yaml.safe_load(Path(recipe_file).read_text())
        for section in ("data", "multibit", "train", "quant"):
            r[section] = r.get(section) or {}
    else:
        r = copy.deepcopy(BASE)
        r["multibit"].update(VARIANTS[variant])
    if hasb_traces:  # mixed-precision supernet: HASB roulette on top of the variant
        r["multibit"].update(hasb=True, hasb_traces=str(hasb_traces))
    if init:  # the student starts from this switchable checkpoint; its quant config is the checkpoint's
        r["init"] = str(init)
        r["quant"] = {}
    apply_overrides(r, sets)
    r["train"]["max_steps"] = steps
    r["output_dir"] = out
    from abs_llm.recipe import (
        load_recipe,  # validate through the same path as `abs-llm train`
    )

    p = Path(out).parent / (Path(out).name + ".yaml")  # not with_suffix: a tag such as "clip0.25" has a dot
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(r))
    return load_recipe(p)


class ValCurve:
    """Trainer callback: PPL per width on a split every ``every`` steps (and before the first), with the time spent
    evaluating kept out of the training time."""

    def __init__(self, tok, split, every, max_chunks, bits, at_start=True):
        from transformers import TrainerCallback

        self.tok, self.split, self.every, self.max_chunks, self.bits = tok, split, every, max_chunks, bits
        self.at_start = at_start
        self.points, self.eval_s = [], 0.0
        self.callback = type("ValCurveCallback", (TrainerCallback,), {
            "on_train_begin": lambda _, a, state, c, model=None, **k: (
                self.eval(model, state.global_step) if self.at_start else None),
            "on_step_end": lambda _, a, state, c, model=None, **k: (
                self.eval(model, state.global_step) if state.global_step % self.every == 0 else None)})()

    def eval(self, model, step):
        from abs_llm.switching import get_bits, set_bits

        t0 = time.perf_counter()
        before = get_bits(model)
        ppl = eval_model(model, self.tok, self.split, self.max_chunks, self.bits)
        set_bits(model, before)
        model.train()
        self.points.append({"step": step, **{k: round(v, 3) for k, v in ppl.items()}})
        print(json.dumps({"curve": self.points[-1]}), flush=True)
        self.eval_s += time.perf_counter() - t0


def run_qat(args):
    from abs_llm.recipe import build_trainer, plot_losses

    name = Path(args.recipe).stem if args.recipe else args.variant
    tag = args.tag or f"{name}{'_hasb' if args.hasb_traces else ''}_{args.steps}"
    out = f"{args.workdir}/{tag}"
    recipe = recipe_for(args.variant, args.steps, out, args.hasb_traces, args.init, args.set, args.recipe)
    trainer = build_trainer(recipe)
    curve = None
    if args.eval_every:
        bits = sorted(trainer.bits_order, reverse=True)
        curve = ValCurve(trainer.processing_class, "val", args.eval_every, args.max_chunks, bits, not args.no_eval_start)
        trainer.add_callback(curve.callback)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0 - (curve.eval_s if curve else 0.0)
    trainer.save_switchable(out)
    plot_losses(trainer.state.log_history, Path(out, "loss_per_bits.png"))
    Path(out, "log_history.json").write_text(json.dumps(trainer.state.log_history))
    if curve and curve.points and curve.points[-1]["step"] == args.steps and args.split == "val":
        res = {k: v for k, v in curve.points[-1].items() if k != "step"}  # the last curve point is this evaluation
    else:
        res = eval_model(trainer.model, trainer.processing_class, args.split, args.max_chunks)
    losses = [e for e in trainer.state.log_history if "loss" in e]
    return {"train_s": round(train_s, 1), "s_per_step": round(train_s / args.steps, 2), **res,
            "init": args.init, "set": args.set, "recipe": args.recipe, "tag": tag, "curve": curve.points if curve else None,
            "last_loss": {k: v for k, v in losses[-1].items() if k.startswith(("loss", "grad_norm"))} if losses else None,
            "checkpoint": out}


def run_float_ft(args):
    """Float fine-tune baseline: same data, steps, batch and weight LR, LM loss (KD to itself would be a no-op)."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    from abs_llm.data import load_default_model
    from abs_llm.recipe import load_texts, pack_blocks

    model, tok = load_default_model()
    ds = pack_blocks(tok, load_texts(BASE["data"]), BASE["data"]["block_size"])
    targs = TrainingArguments(output_dir=f"{args.workdir}/float_ft", max_steps=args.steps, report_to=[],
                              **{k: v for k, v in BASE["train"].items()})
    tr = Trainer(model=model.train(), args=targs, train_dataset=ds, data_collator=default_data_collator)
    t0 = time.perf_counter()
    tr.train()
    train_s = time.perf_counter() - t0
    res = eval_model(model, tok, args.split, args.max_chunks)
    res.update(eval_model(ptq(model), tok, args.split, args.max_chunks))
    return {"train_s": round(train_s, 1), **res}


def run_ptq(args):
    """FP and plain rounding of the default model, or (``--init CKPT``) a saved switchable checkpoint as it stands:
    the step-0 point of the QAT runs that start from it (``plot`` draws it under every such run)."""
    if args.init:
        from abs_llm.pipeline import load_checkpoint

        model, tok = load_checkpoint(args.init)
        return {**eval_model(model, tok, args.split, args.max_chunks), "init": args.init, "tag": args.tag}
    from abs_llm.data import load_default_model

    model, tok = load_default_model()
    return {**eval_model(model, tok, args.split, args.max_chunks),
            **eval_model(ptq(model), tok, args.split, args.max_chunks)}


def _run_label(tag: str, knobs: list[str], width: int = 80) -> str:
    """``tag: knob, knob``, wrapped between knobs (never inside one) so that the legend stays narrow."""
    lines = [f"{tag}:" if knobs else tag]
    for i, knob in enumerate(knobs):
        knob += "," if i < len(knobs) - 1 else ""
        if i and len(lines[-1]) + 1 + len(knob) > width:
            lines.append("    " + knob)
        else:
            lines[-1] += " " + knob
    return "\n".join(lines)


def plot_curves(results: str, tags: list[str], path: str, fp: float | None = None) -> None:
    """Validation PPL per width against step, one panel per width and one line per run (``--tag``), from the
    ``curve`` of each run's JSON line; a ``ptq --init`` line for the same checkpoint is the run's step 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(x) for x in Path(results).read_text().splitlines() if x.strip()]
    runs = {r["tag"]: r for r in lines if r.get("what") == "qat" and r.get("tag") in tags and r.get("curve")}
    starts = {r["init"]: r for r in lines if r.get("what") == "ptq" and r.get("init")}
    missing = [t for t in tags if t not in runs]
    if missing:
        raise SystemExit(f"no qat run with a curve for tag(s) {missing} in {results}")
    widths = sorted({k for r in runs.values() for p in r["curve"] for k in p if k.startswith("w")},
                    key=lambda k: -int(k[1:]))
    fig, axes = plt.subplots(1, len(widths), figsize=(3.2 * len(widths), 3.6), squeeze=False)
    for ax, w in zip(axes[0], widths):
        for tag in tags:
            r = runs[tag]
            pts = [(p["step"], p[w]) for p in r["curve"] if w in p]
            start = starts.get(r.get("init"))
            if start and w in start and all(s for s, _ in pts):
                pts.insert(0, (0, start[w]))
            knobs = [x.split(".", 1)[1] for x in r.get("set") or [] if not x.startswith("train.save_strategy")]
            ax.plot(*zip(*pts), marker="o", ms=3, label=_run_label(tag, knobs))  # the --set overrides name the run
        if fp:
            ax.axhline(fp, color="grey", lw=0.8, ls="--", label="FP")
        ys = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
        if ys and max(ys) > 20 * min(ys):  # 2 bits spans 1e7 -> 1e2: linear would flatten every later point
            ax.set_yscale("log")
        ax.set_title(f"{w[1:]}-bit")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation PPL")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout()
    # below the panels, as wide as the labels need: bbox_inches="tight" grows the image to hold it, never clips it
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=min(len(labels), 2), fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def run_cost(args):
    """Joint n-bit step vs n float steps on the default model at the CPU recipe's batch (2 x 256), with the teacher:
    ``bench_qat_step.py --model default`` (that script's docstring says what is timed)."""
    import bench_qat_step

    ns = argparse.Namespace(model="default", layers=0, batch=2, seq=256, repeats=args.reps, kd=True, fused=args.fused,
                            tf32=True, smoke=False, workdir=args.workdir)
    res = bench_qat_step.run(ns)
    print(res.pop("table"))
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["ptq", "qat", "float_ft", "cost", "plot"])
    p.add_argument("--variant", default="accum", choices=sorted(VARIANTS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--split", default="val", choices=["val", "eval", "both"])
    p.add_argument("--max-chunks", type=int, default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--fused", action="store_true", help="cost: also time the torch.compile'd fake quantization")
    p.add_argument("--hasb-traces", default=None, help="qat: train a HASB supernet with these traces (JSON)")
    p.add_argument("--recipe", default=None, help="qat: start from this recipe file instead of the built-in variants")
    p.add_argument("--init", default=None, help="qat: start from this switchable checkpoint (e.g. a GPTQ master)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="qat: override a recipe knob (data/multibit/train), YAML value; repeatable")
    p.add_argument("--eval-every", type=int, default=0, help="qat: validation PPL per width every N steps")
    p.add_argument("--no-eval-start", action="store_true", help="qat: skip the step-0 point (known from --init)")
    p.add_argument("--tag", default=None, help="qat: run name (output folder under --workdir)")
    p.add_argument("--workdir", default="outputs/bench_qat")
    p.add_argument("--out", default="outputs/bench_qat/results.jsonl")
    p.add_argument("--tags", default="", help="plot: comma-separated run tags in --out")
    p.add_argument("--fp", type=float, default=None, help="plot: the FP model's PPL on the split (a dashed line)")
    p.add_argument("--png", default="outputs/bench_qat/val_curves.png", help="plot: output image")
    args = p.parse_args()
    if args.what == "plot":
        return plot_curves(args.out, [t for t in args.tags.split(",") if t], args.png, args.fp)
    torch.manual_seed(0)
    fn = {"ptq": run_ptq, "qat": run_qat, "float_ft": run_float_ft, "cost": run_cost}[args.what]
    t0 = time.perf_counter()
    res = {"what": args.what, "variant": args.variant if args.what == "qat" else None, "steps": args.steps,
           "hasb_traces": args.hasb_traces,
           "split": args.split, "max_chunks": args.max_chunks, **fn(args), **machine_info(), "wall_s": None}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(res)
    print(line, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
