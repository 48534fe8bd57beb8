"""Joint multi-bit QAT on the default model: PTQ start, QAT variants, float fine-tune baseline, per-step cost.

Tuning rule: variants are compared on the *validation* slice (Lee train docs 225-249, never trained on: the QAT data is
docs 0-224). The held-out split (docs 250-299) is only used with ``--split eval`` for the final report.

    python benchmarks/bench_qat.py ptq --split val
    python benchmarks/bench_qat.py qat --variant shipped --steps 12 --split val
    python benchmarks/bench_qat.py float_ft --steps 12 --split eval
    python benchmarks/bench_qat.py cost --bits 8,6,4,3,2
Each run prints one JSON line and appends it to ``--out`` (default outputs/bench_qat/results.jsonl).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from common import ppl_per_width

BITS = [8, 6, 4, 3, 2]
BASE = {  # common to every variant; a variant overrides "multibit"/"train" keys
    "data": {"source": "lee", "split": "train", "docs": [0, 225], "block_size": 256},
    "quant": {"candidate_bits": BITS, "master_bits": 8, "group_size": 64},
    "multibit": {"scale_lr": 1e-4, "kd": "teacher", "alrs": True},
    "train": {"per_device_train_batch_size": 2, "learning_rate": 1e-5, "lr_scheduler_type": "constant",
              "save_strategy": "no", "logging_steps": 1, "seed": 0},
}
VARIANTS = {
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


def recipe_for(variant, steps, out, hasb_traces=None):
    r = copy.deepcopy(BASE)
    r["multibit"].update(VARIANTS[variant])
    if hasb_traces:  # mixed-precision supernet: HASB roulette on top of the variant
        r["multibit"].update(hasb=True, hasb_traces=str(hasb_traces))
    r["train"]["max_steps"] = steps
    r["output_dir"] = out
    from abs_llm.recipe import (
        load_recipe,  # validate through the same path as `abs-llm train`
    )

    p = Path(out).with_suffix(".yaml")
    p.parent.mkdir(parents=True, exist_ok=True)
    import yaml

    p.write_text(yaml.safe_dump(r))
    return load_recipe(p)


def run_qat(args):
    from abs_llm.recipe import build_trainer, plot_losses

    out = f"{args.workdir}/{args.variant}{'_hasb' if args.hasb_traces else ''}_{args.steps}"
    trainer = build_trainer(recipe_for(args.variant, args.steps, out, args.hasb_traces))
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    trainer.save_switchable(out)
    plot_losses(trainer.state.log_history, Path(out, "loss_per_bits.png"))
    Path(out, "log_history.json").write_text(json.dumps(trainer.state.log_history))
    res = eval_model(trainer.model, trainer.processing_class, args.split, args.max_chunks)
    return {"train_s": round(train_s, 1), "s_per_step": round(train_s / args.steps, 2), **res, "checkpoint": out}


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
    from abs_llm.data import load_default_model

    model, tok = load_default_model()
    return {**eval_model(model, tok, args.split, args.max_chunks),
            **eval_model(ptq(model), tok, args.split, args.max_chunks)}


def run_cost(args):
    """Seconds per optimisation step, same process, same batch: n float steps vs one joint n-bit step."""
    from abs_llm.data import load_default_model
    from abs_llm.recipe import load_texts, pack_blocks
    from abs_llm.training import lm_loss

    bits = [int(b) for b in args.bits.split(",")]
    model, tok = load_default_model()
    ds = pack_blocks(tok, load_texts(BASE["data"]), 256)
    batch = {k: torch.tensor(v) for k, v in ds[:2].items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def float_step():
        model.train()
        loss = lm_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    res = {"bits": bits}
    for kd in ("teacher", "none"):
        r = recipe_for("accum", 1, f"{args.workdir}/cost")
        r["multibit"].update(kd=kd, bits=bits)
        from abs_llm.recipe import build_trainer

        tr = build_trainer(r)
        tr.create_optimizer_and_scheduler(1)

        def joint_step():
            tr.training_step(tr.model, dict(batch))
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)

        for name, fn in ((f"joint_kd_{kd}", joint_step), (f"float_{kd}", float_step)):  # interleaved: CPU is shared
            fn()  # warm-up
            ts = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            res[name] = min(ts)
        res[f"ratio_kd_{kd}"] = res[f"joint_kd_{kd}"] / (len(bits) * res[f"float_{kd}"])
        del tr
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["ptq", "qat", "float_ft", "cost"])
    p.add_argument("--variant", default="accum", choices=sorted(VARIANTS))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--split", default="val", choices=["val", "eval", "both"])
    p.add_argument("--max-chunks", type=int, default=None)
    p.add_argument("--bits", default="8,6,4,3,2")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--hasb-traces", default=None, help="qat: train a HASB supernet with these traces (JSON)")
    p.add_argument("--workdir", default="outputs/bench_qat")
    p.add_argument("--out", default="outputs/bench_qat/results.jsonl")
    args = p.parse_args()
    torch.manual_seed(0)
    fn = {"ptq": run_ptq, "qat": run_qat, "float_ft": run_float_ft, "cost": run_cost}[args.what]
    t0 = time.perf_counter()
    res = {"what": args.what, "variant": args.variant if args.what == "qat" else None, "steps": args.steps,
           "hasb_traces": args.hasb_traces,
           "split": args.split, "max_chunks": args.max_chunks, **fn(args), "wall_s": None}
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(res)
    print(line, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
