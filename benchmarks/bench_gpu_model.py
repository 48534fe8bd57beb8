"""Model sections of bench_gpu.py: an 8-layer 8B-wide random Llama (one-token forward in a CUDA graph, HF generate)
and whole-model switching vs a device memcpy of the masters. Random weights, no download."""

from __future__ import annotations

import copy
import statistics
import time
from collections import OrderedDict

import torch

from gpu_timing import sync, time_calls

from abs_llm import DoubleRoundingConfig, quantize, set_bits, switchable_layers
from abs_llm.layers import SwitchableLinear

STATE: dict = {}  # the quantized model, shared by the switch section


def build(smoke: bool, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=False)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=256,
                          tie_word_embeddings=False)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    return model, cfg


def quantize_head(model) -> None:
    head = model.lm_head
    model.lm_head = SwitchableLinear.from_linear(head, candidate_bits=(8, 6, 4, 3, 2), group_size=None)


def forward_us(run, model, ids, smoke) -> tuple[float, str]:
    fn = lambda: model(ids, use_cache=False).logits  # noqa: E731
    try:
        return time_calls([fn], run.device, smoke), "graph" if run.device.type == "cuda" and not smoke else "eager"
    except Exception as e:  # noqa: BLE001 - a forward that cannot be captured is timed eagerly (and says so)
        run.log(f"CUDA graph capture failed ({type(e).__name__}: {e}); timing eagerly")
        sync(run.device)
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            sync(run.device)
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e6, "eager"


def generate_tok_s(run, model, prompt, n, repeats=2) -> float:
    gen = dict(do_sample=False, use_cache=True, pad_token_id=0)
    ts_n, ts_1 = [], []
    for _ in range(repeats):
        for out, k in ((ts_1, 1), (ts_n, n)):
            sync(run.device)
            t = time.perf_counter()
            model.generate(prompt, max_new_tokens=k, min_new_tokens=k, **gen)
            sync(run.device)
            out.append(time.perf_counter() - t)
    return (n - 1) / max(statistics.median(ts_n) - statistics.median(ts_1), 1e-9)


def model_rows(run, results, smoke):
    dev = run.device
    model, cfg = build(smoke, dev)
    run.log(f"model built: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params")
    ids = torch.randint(0, cfg.vocab_size, (1, 1), device=dev)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), device=dev)
    n_new = 2 if smoke else 32
    rows = results.setdefault("model", [])
    with torch.inference_mode():
        run.guard("model bf16", measure, run, rows, "bf16", model, None, ids, prompt, n_new, smoke)
        q = quantize(copy.deepcopy(model), DoubleRoundingConfig(bits=8, candidate_bits=[8, 6, 4, 3, 2],
                                                                group_size=None))
        del model
        q(ids)  # layers learn their activation dtype, so set_bits packs eagerly
        STATE.update(model=q, ids=ids, prompt=prompt, n_new=n_new)
        for b in (8, 4) if smoke else (8, 4, 2):
            run.guard(f"model w{b}", measure, run, rows, f"w{b}", q, b, ids, prompt, n_new, smoke)
    summarize(results)


def head_rows(run, results, smoke):
    """The same model with lm_head quantized too (it is a quarter of the bytes per token at w4 otherwise)."""
    q = STATE["model"]
    rows = results.setdefault("model", [])
    with torch.inference_mode():
        quantize_head(q)
        q(STATE["ids"])
        for b in (4,) if smoke else (8, 4):
            run.guard(f"model w{b}+head", measure, run, rows, f"w{b}+head", q, b, STATE["ids"], STATE["prompt"],
                      STATE["n_new"], smoke)
    summarize(results)


def measure(run, rows, name, m, bits, ids, prompt, n_new, smoke):
    if bits is not None:
        set_bits(m, bits, kernel="triton" if run.device.type != "cuda" else None)  # CPU auto never picks triton
    us, how = forward_us(run, m, ids, smoke)
    tok_s = generate_tok_s(run, m, prompt, n_new, repeats=1 if smoke else 2)
    kinds = sorted({p.kernel for layer in switchable_layers(m).values() for key, p in layer._cache.items()
                    if key[0] == layer.bits}) if bits is not None else ["bf16"]
    rows.append(dict(setting=name, forward_us=us, timing=how, generate_tok_s=tok_s, kernels=kinds))
    run.log(f"model {name}: one-token forward {us:.0f} us ({how}), generate {tok_s:.1f} tok/s, {kinds}")


def summarize(results):
    rows = results.get("model", [])
    base = next((r for r in rows if r["setting"] == "bf16"), None)
    if not base:
        return
    for r in rows:
        r["forward_vs_bf16"] = base["forward_us"] / r["forward_us"]
        r["generate_vs_bf16"] = r["generate_tok_s"] / base["generate_tok_s"]
    line = ("one-token forward / HF generate vs bf16 (8-layer 8B-wide random Llama, per-channel, lm_head bf16 unless "
            "+head): " + "; ".join(f"{r['setting']} {r['forward_vs_bf16']:.2f}x / {r['generate_vs_bf16']:.2f}x "
                                   f"({r['timing']})" for r in rows))
    results["summary"] = [x for x in results.get("summary", []) if not x.startswith("one-token")] + [line]


def switch_rows(run, results, smoke):
    repeats = 1 if smoke else 3
    q = STATE.get("model")
    if q is None:
        raise RuntimeError("the model section did not build a quantized model")
    dev = run.device
    kernel = "triton" if dev.type != "cuda" else None
    layers = list(switchable_layers(q).values())
    masters = [m.weight_master for m in layers]
    dst = [torch.empty_like(t) for t in masters]

    def memcpy():
        for a, b in zip(masters, dst):
            b.copy_(a)
        sync(dev)

    memcpy()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        memcpy()
        ts.append(time.perf_counter() - t)
    base = statistics.median(ts)
    out = {"memcpy_s": base, "master_bytes": sum(t.numel() for t in masters), "layers": len(layers)}
    with torch.inference_mode():
        pairs = ((8, 4),) if smoke else ((8, 4), (4, 2), (2, 8), (8, 6), (6, 3))
        for b in sorted({b for p in pairs for b in p}):  # self-check and config choice happen here, not in the timing
            set_bits(q, b, kernel=kernel)
        sync(dev)
        for src, dst_b in pairs:
            cold, cached = [], []
            for _ in range(repeats):
                set_bits(q, src, kernel=kernel)
                for m in layers:
                    m._cache = OrderedDict((k, v) for k, v in m._cache.items() if k[0] == src)
                sync(dev)
                t = time.perf_counter()
                set_bits(q, dst_b)
                sync(dev)
                cold.append(time.perf_counter() - t)
                set_bits(q, src)
                sync(dev)
                t = time.perf_counter()
                set_bits(q, dst_b)
                sync(dev)
                cached.append(time.perf_counter() - t)
            c, p = statistics.median(cold), statistics.median(cached)
            out[f"{src}->{dst_b}"] = {"cold_s": c, "ping_pong_s": p, "cold_vs_memcpy": c / base,
                                      "ping_pong_vs_memcpy": p / base}
            run.log(f"switch {src}->{dst_b}: cold {c * 1e3:.2f} ms = {c / base:.2f}x memcpy ({base * 1e3:.2f} ms), "
                    f"ping-pong {p * 1e3:.3f} ms = {p / base:.3f}x")
    results["switch"] = out
    results.setdefault("summary", []).append(
        f"whole-model switch ({len(layers)} layers, {out['master_bytes'] / 1e9:.2f} GB of masters, device memcpy "
        f"{base * 1e3:.2f} ms): " + "; ".join(f"{k} cold {v['cold_vs_memcpy']:.2f}x, ping-pong "
                                              f"{v['ping_pong_vs_memcpy']:.3f}x" for k, v in out.items()
                                              if isinstance(v, dict)))
