"""Issue 6 benchmark: decode speed, prefill time, memory and switch cost of the integer kernels vs fp32/bf16 eager.

Everything is measured in one process and reported as ratios to bf16 eager of the same model, because the dev
machines are shared (absolute numbers are noisy). Settings are timed round-robin over the repeats so a burst of load
from another process hits every setting alike; medians are reported.

- decode tok/s = (N - 1) / (t(generate N) - t(generate 1)), greedy, batch 1, prompt of ``--prompt`` tokens;
- prefill = one forward over the prompt;
- bytes/token = weight bytes a decode step must read (every Linear incl. lm_head at its storage width);
  limit tok/s = measured copy bandwidth / bytes per token (the memory-bound ceiling on this machine);
- resident = bytes of the model's tensors plus packed-weight caches (not process RSS; that is reported once);
- switch: whole-model ``set_bits`` incl. packing, cold (caches cleared) and cached, vs copying every master once.

Usage: python benchmarks/bench_speed.py [--repeats 3] [--new-tokens 128] [--big-layers 4] [--out ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import cpu_name
from transformers import LlamaConfig, LlamaForCausalLM

from abs_llm import DoubleRoundingConfig, quantize, set_bits, switchable_layers
from abs_llm.layers import SwitchableLinear

BITS = [8, 6, 4, 3, 2]


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def copy_bandwidth() -> float:
    """Bytes/s of a large tensor copy (read + write counted once each)."""
    a = torch.empty(256 * 2**20, dtype=torch.uint8).fill_(1)
    b = torch.empty_like(a)
    t = median_time(lambda: b.copy_(a), 5)
    return 2 * a.numel() / t


def weight_bytes_per_token(model) -> int:
    """Bytes of every matmul weight read per decoded token: SwitchableLinear at its packed width, float Linear at its
    dtype (the tied lm_head reads the whole embedding; the input embedding reads one row, ignored)."""
    total = 0
    for m in model.modules():
        if isinstance(m, SwitchableLinear):
            total += -(-m.out_features * m.in_features * m.bits // 8) + m.weight_scale.numel() * 2
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def resident_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in switchable_layers(model).values():
        total += sum(p.nbytes for p in m._cache.values())
    return total


def untie_and_quantize_lm_head(model, cfg: DoubleRoundingConfig) -> None:
    """Optional: give lm_head its own copy of the tied embedding and quantize it (the embedding stays float)."""
    head = model.lm_head
    lin = torch.nn.Linear(head.in_features, head.out_features, bias=False, dtype=head.weight.dtype)
    lin.weight = torch.nn.Parameter(head.weight.detach().clone())
    model.lm_head = SwitchableLinear.from_linear(lin, master_bits=cfg.master_bits,
                                                 candidate_bits=tuple(cfg.candidate_bits), group_size=cfg.group_size)
    model.config.tie_word_embeddings = False


class Setting:
    def __init__(self, name, model, bits=None):
        self.name, self.model, self.bits = name, model, bits

    def activate(self):
        if self.bits is not None:
            set_bits(self.model, self.bits)


def measure_models(settings, prompt, new_tokens, repeats):
    gen = dict(do_sample=False, use_cache=True, pad_token_id=0)
    raw = {s.name: {"prefill": [], "gen_n": [], "gen_1": []} for s in settings}
    with torch.inference_mode():
        for s in settings:  # warm-up: packs weights, JIT paths, allocator
            s.activate()
            s.model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **gen)
        for _ in range(repeats):
            for s in settings:
                s.activate()
                m = s.model
                raw[s.name]["prefill"].append(median_time(lambda: m(prompt), 1, warmup=0))
                raw[s.name]["gen_1"].append(median_time(lambda: m.generate(prompt, max_new_tokens=1, **gen), 1, 0))
                raw[s.name]["gen_n"].append(median_time(
                    lambda: m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **gen), 1, 0))
    out = {}
    for s in settings:
        r = raw[s.name]
        decode = [(new_tokens - 1) / max(n - o, 1e-9) for n, o in zip(r["gen_n"], r["gen_1"])]
        s.activate()
        kernels_used = sorted({p.kernel for m in switchable_layers(s.model).values() for p in m._cache.values()
                               if p.bits == m.bits}) if s.bits else ["eager"]
        out[s.name] = {"decode_tok_s": statistics.median(decode), "prefill_s": statistics.median(r["prefill"]),
                       "bytes_per_token": weight_bytes_per_token(s.model), "resident_bytes": resident_bytes(s.model),
                       "kernels": kernels_used}
    return out


def switch_times(model, repeats):
    layers = switchable_layers(model)
    masters = [m.weight_master for m in layers.values()]
    memcpy = median_time(lambda: [t.clone() for t in masters], repeats)
    res = {"memcpy_master_s": memcpy}
    with torch.inference_mode():
        for src, dst in [(8, 4), (4, 2), (2, 8)]:
            cold, warm = [], []
            for _ in range(repeats):
                set_bits(model, src)
                for m in layers.values():  # keep only the source width: the switch must derive + pack
                    m._cache = type(m._cache)((k, v) for k, v in m._cache.items() if k[0] == src)
                t = time.perf_counter()
                set_bits(model, dst)
                cold.append(time.perf_counter() - t)
                set_bits(model, src)
                t = time.perf_counter()
                set_bits(model, dst)
                warm.append(time.perf_counter() - t)
            res[f"{src}->{dst}"] = {"cold_s": statistics.median(cold), "cached_s": statistics.median(warm),
                                    "cold_vs_memcpy": statistics.median(cold) / memcpy}
    return res


def micro(shape, group_size, repeats):
    """One Linear of the given (out, in) shape at M=1: eager fp32/bf16 vs each width's auto kernel, bf16."""
    out_f, in_f = shape
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    res = {}
    with torch.inference_mode():
        for dt in (torch.float32, torch.bfloat16):
            x, w = torch.randn(1, in_f, dtype=dt), lin.weight.to(dt)
            res[str(dt)[6:]] = median_time(lambda: F.linear(x, w), repeats * 30, 10)
        layer = SwitchableLinear.from_linear(lin, group_size=group_size)
        x = torch.randn(1, in_f, dtype=torch.bfloat16)
        for b in BITS:
            layer.bits = b
            layer(x)
            res[f"w{b}"] = median_time(lambda: layer(x), repeats * 30, 10)
            res[f"w{b}_kernel"] = layer._cache[(b, torch.bfloat16, x.device)].kernel
    return res


def table(title, rows, bw, base="bf16"):
    b = rows[base]["decode_tok_s"]
    lines = [f"\n{title}", f"{'setting':<14}{'decode tok/s':>13}{'vs bf16':>9}{'prefill ms':>12}{'MB/token':>10}"
             f"{'limit tok/s':>12}{'resident MB':>13}  kernels"]
    for name, r in rows.items():
        lines.append(f"{name:<14}{r['decode_tok_s']:>13.1f}{r['decode_tok_s'] / b:>9.2f}{r['prefill_s'] * 1e3:>12.1f}"
                     f"{r['bytes_per_token'] / 1e6:>10.1f}{bw / r['bytes_per_token']:>12.1f}"
                     f"{r['resident_bytes'] / 1e6:>13.1f}  {','.join(r['kernels'])}")
    return "\n".join(lines)


def run_model(name, fp32_model, cfg, prompt, args, lm_head_too=True):
    bf16 = copy.deepcopy(fp32_model).to(torch.bfloat16)
    q = quantize(copy.deepcopy(bf16), copy.deepcopy(cfg))
    settings = [Setting("fp32", fp32_model), Setting("bf16", bf16)] + [Setting(f"w{b}", q, b) for b in BITS]
    if lm_head_too:
        qh = copy.deepcopy(q)
        untie_and_quantize_lm_head(qh, cfg)
        settings += [Setting(f"w{b}+head", qh, b) for b in (8, 4)]
    rows = measure_models(settings, prompt, args.new_tokens if name == "default" else args.big_tokens, args.repeats)
    return rows, q


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--groups", default="none,64", help="group sizes for the default model, e.g. none,64")
    ap.add_argument("--big-layers", type=int, default=4, help="layers of the 1B-wide random Llama (0: skip)")
    ap.add_argument("--big-tokens", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/speed.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = {"machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "args": vars(args)}
    bw = copy_bandwidth()
    results["copy_bandwidth_GBps"] = bw / 1e9
    print(f"machine: {results['machine']}, {results['threads']} threads, torch {torch.__version__}, "
          f"copy bandwidth {bw / 1e9:.1f} GB/s")

    from abs_llm.data import default_corpus, load_default_model

    model, tok = load_default_model()
    ids = tok(" ".join(default_corpus("eval")[:3]), return_tensors="pt").input_ids[:, : args.prompt]
    for g in [None if s == "none" else int(s) for s in args.groups.split(",")]:
        cfg = DoubleRoundingConfig(group_size=g)
        rows, q = run_model("default", model, cfg, ids, args)
        key = f"default_group{g or 'none'}"
        results[key] = {"decode": rows, "switch": switch_times(q, args.repeats)}
        print(table(f"SmolLM2-135M-Instruct, group_size={g}, batch 1, {args.new_tokens} new tokens greedy, "
                    f"prompt {ids.shape[1]}, median of {args.repeats}", rows, bw))
        print("switch (bf16, whole model):", json.dumps(results[key]["switch"], indent=1))
        del q
    for g in [None if s == "none" else int(s) for s in args.groups.split(",")]:
        for shape in [(1536, 576), (576, 1536)]:
            results[f"micro_{shape[0]}x{shape[1]}_group{g or 'none'}_us"] = r = {
                k: (v * 1e6 if isinstance(v, float) else v) for k, v in micro(shape, g, args.repeats).items()}
            print(f"micro {shape} group {g} (us, M=1):", {k: (round(v, 1) if isinstance(v, float) else v)
                                                          for k, v in r.items()})
    if args.big_layers:
        cfgl = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=args.big_layers,
                           num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                           tie_word_embeddings=False, max_position_embeddings=2048)
        big = LlamaForCausalLM(cfgl).eval()
        big_prompt = torch.randint(0, 32000, (1, args.prompt))
        rows, q = run_model("big", big, DoubleRoundingConfig(group_size=None), big_prompt, args)
        params = sum(p.numel() for p in big.parameters())
        results["big"] = {"layers": args.big_layers, "params": params, "decode": rows}
        print(table(f"random Llama 1B-wide (hidden 2048, inter 8192, vocab 32000), {args.big_layers} layers "
                    f"= {params / 1e9:.2f}B params, per-channel, {args.big_tokens} new tokens", rows, bw))
    results["peak_rss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(f"peak process RSS {results['peak_rss_MB']:.0f} MB; wrote {args.out}")


if __name__ == "__main__":
    main()
