"""Cost of one joint multi-bit QAT step against plain float training steps (issue 16 target: joint 5-width step
<= 1.3x five float steps on a GPU).

One process, one batch. "float" = forward + backward + fused AdamW step of the float model (LM loss); the reference
is five of them (one per width). "joint" = ``MultiBitTrainer.training_step`` over every width (fake-quantized
forward + backward per width) plus the optimiser step(s), in accumulate mode (one step) and step-per-bit mode (a
step after every width, the paper's Alg. A.2), with the fake quantization eager or ``fused`` (``torch.compile``, and on
CUDA the two Triton passes of ``kernels/triton_fq.py``).
Settings are timed round-robin over the repeats (a burst of load from another process hits every setting alike);
medians are reported, the Markdown table is printed last.

    python benchmarks/bench_qat_step.py                  # GPU: random 1B-wide Llama (hidden 2048, inter 8192)
    python benchmarks/bench_qat_step.py --model default  # the embedded SmolLM2-135M (what the recipes train)
    python benchmarks/bench_qat_step.py --smoke          # CPU, tiny model, seconds (tests/test_bench_qat_step.py)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from common import machine_info
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from abs_llm import DoubleRoundingConfig, quantize
from abs_llm.evaluation import markdown_table
from abs_llm.multibit import lm_loss
from abs_llm.training import MultiBitConfig, MultiBitTrainer

BITS = [8, 6, 4, 3, 2]
WIDE = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
            vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
            tie_word_embeddings=True, max_position_embeddings=128)


def build_model(args):
    if args.model == "default":
        from abs_llm.data import load_default_model

        return load_default_model()[0]
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=args.layers, **(TINY if args.smoke else WIDE))
    return LlamaForCausalLM(cfg)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def float_stepper(model, batch, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # the Trainer's default optimiser

    def step():
        loss = lm_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def joint_stepper(qmodel, batch, args, step_per_bit, fused, teacher):
    """Every setting shares one quantized model (its own optimiser state); ``fused`` is re-applied per step."""
    extra = {"fused": fused} if fused else {}  # so the script also times code from before `fused` existed
    mb = MultiBitConfig(bits=BITS, step_per_bit=step_per_bit, scale_lr=1e-4,
                        kd="teacher" if teacher is not None else "none", **extra)
    targs = TrainingArguments(output_dir=str(Path(args.workdir) / "step"), report_to=[], learning_rate=1e-5,
                              max_grad_norm=1.0, use_cpu=not torch.cuda.is_available())
    tr = MultiBitTrainer(model=qmodel, args=targs, multibit=mb, teacher=teacher)
    tr.create_optimizer_and_scheduler(num_training_steps=1000)

    def step():
        for layer in tr.layers.values():
            layer.fused = fused  # the settings share the model
        tr.training_step(tr.model, dict(batch))
        tr.optimizer.step()  # after step_per_bit every gradient is None already: nothing to do
        tr.optimizer.zero_grad(set_to_none=True)
    return step


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda" and args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(args).to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids}
    teacher = copy.deepcopy(model).eval() if args.kd else None
    settings = {"float x1": float_stepper(model.train(), batch, device)}
    fused_options = [False]
    if args.fused:  # torch.compile'd fake quantization; the Triton passes where they run (CUDA)
        fused_options += ["compile", "triton"] if device.type == "cuda" else ["compile"]
    q = quantize(copy.deepcopy(model), DoubleRoundingConfig(candidate_bits=BITS, group_size=64), trainable=True)
    for step_per_bit in (False, True):
        for fused in fused_options:
            name = f"joint {'step-per-bit' if step_per_bit else 'accumulate'}{f' fused {fused}' if fused else ''}"
            settings[name] = joint_stepper(q, batch, args, step_per_bit, fused, teacher)
    times = {k: [] for k in settings}
    t_warm = time.perf_counter()
    for fn in settings.values():  # warm-up (and compile, for the fused settings)
        fn()
        sync(device)
    warmup_s = time.perf_counter() - t_warm
    for _ in range(args.repeats):
        for name, fn in settings.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    five = len(BITS) * med["float x1"]
    rows = [["5 float steps", f"{1e3 * five:.1f}", "1.00"]]
    rows += [[k, f"{1e3 * v:.1f}", f"{v / five:.2f}"] for k, v in med.items() if k != "float x1"]
    n_params = sum(p.numel() for p in model.parameters())
    return {"device": str(device), "model": args.model if not args.smoke else "tiny", "params": n_params,
            "layers": model.config.num_hidden_layers, "batch": args.batch, "seq": args.seq, "kd": args.kd,
            "repeats": args.repeats, "tf32": bool(device.type == "cuda" and args.tf32), "warmup_s": round(warmup_s, 1),
            "median_s": {k: round(v, 5) for k, v in med.items()},
            "ratio_to_5_float": {k: round(v / five, 3) for k, v in med.items() if k != "float x1"},
            **machine_info(), "table": markdown_table(["step", "ms (median)", "x 5 float steps"], rows)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["wide", "default"], default="wide",
                   help="wide: random Llama 1B-wide (hidden 2048, intermediate 8192); default: SmolLM2-135M")
    p.add_argument("--layers", type=int, default=4, help="layers of the random model")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--kd", action="store_true", help="distil from a float teacher (teacher forward once per step)")
    p.add_argument("--no-fused", dest="fused", action="store_false", help="skip the fused (torch.compile, Triton) settings")
    p.add_argument("--no-tf32", dest="tf32", action="store_false")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, 1 repeat, eager only (seconds)")
    p.add_argument("--workdir", default="outputs/bench_qat_step")
    p.add_argument("--out", default="outputs/bench_qat_step/results.jsonl")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.batch, args.seq, args.repeats, args.fused = 2, 2, 32, 1, False
    res = run(args)
    table = res.pop("table")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(res) + "\n")
    print(json.dumps(res))
    print(f"\n{res['model']} ({res['params'] / 1e6:.0f}M params, {res['layers']} layers), batch {res['batch']} x "
          f"{res['seq']} tokens, {res['device']}, median of {res['repeats']}:\n{table}")
    return res


if __name__ == "__main__":
    main()
