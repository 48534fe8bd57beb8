"""The main job (``make demo``): embedded default model -> one switchable INT8 master chosen by multi-bit-aware GPTQ
on calibration text -> checkpoint -> reload -> held-out PPL and chat answers at every bit-width, with plain rounding
of the same master format beside it for contrast -> table, JSON and PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

MARKER = "demo_results.json"
# Questions, not sentence fragments: the Instruct model answers through its chat template (a fragment such as
# "The capital of France is" sent as a user turn makes it chat about itself instead of completing it).
PROMPTS = ("What is the capital of France?", "Name three primary colors.")
METHODS = ("gptq", "rtn")
LABELS = {"gptq": "GPTQ master (one INT8, all widths)", "rtn": "plain rounding (abs-max INT8)"}


def _generate(model, tok, prompt: str, max_new_tokens: int = 24) -> str:
    msgs = [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) if tok.chat_template else prompt
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")


def _answers(model, tok, prompts) -> list[str]:
    return [_generate(model, tok, p) for p in prompts]


# About 5 minutes on 2 CPU cores: 2,048 calibration tokens (~2 min of GPTQ; the library default is 16,384) and the first
# 8 held-out windows per width (11 evaluations); raise either for tighter numbers.
DEMO_CALIB_TOKENS = 2048
DEMO_MAX_CHUNKS = 8


def demo(out_dir="outputs/demo", group_size=64, max_chunks=DEMO_MAX_CHUNKS, prompts=PROMPTS, method="gptq",
         calibration="lee", calib_tokens=DEMO_CALIB_TOKENS, contrast=True) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import DoubleRoundingConfig, quantize
    from .data import calibration_texts, default_corpus, default_model_path
    from .evaluation import evaluate_bits, perplexity
    from .switching import model_bytes

    if method not in METHODS:
        raise ValueError(f"demo method must be one of {list(METHODS)}, got {method!r}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ValueError(f"{out} exists and holds something other than a previous demo; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = default_model_path()
    tok = AutoTokenizer.from_pretrained(src)
    texts = default_corpus("eval")
    calib = calibration_texts(calibration) if method == "gptq" else None
    print(f"default model: {src}\nheld-out split: {len(texts)} Lee documents, seq_len 512, non-overlapping windows"
          + (f" (first {max_chunks})" if max_chunks else ""))

    def answers(m, b=None):
        return {"answers": [_generate(m, tok, p) for p in prompts]}

    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    fp_ppl = perplexity(fp, tok, texts, max_chunks=max_chunks, progress=False)
    rows = [{"method": "fp32", "bits": "fp32", "ppl": fp_ppl, "bytes": model_bytes(fp)} | answers(fp)]
    print(f"fp32: PPL {fp_ppl:.2f}")
    cfg = DoubleRoundingConfig(group_size=group_size)
    t = time.perf_counter()
    kwargs = {"method": "gptq", "calibration": calib, "tokenizer": tok,
              "gptq_options": {"calib_tokens": calib_tokens}} if method == "gptq" else {}
    quantize(fp, cfg, **kwargs)
    quantize_s = time.perf_counter() - t
    ckpt = out / "checkpoint"
    fp.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    del fp
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()  # the main rows run on the reloaded checkpoint
    print(f"{method} master: quantized in {quantize_s:.0f} s, saved and reloaded from {ckpt}")
    rows += [r | {"method": method} for r in evaluate_bits(model, tok, cfg.candidate_bits, texts, max_chunks=max_chunks,
                                                           progress=False, each=answers)]
    del model
    if contrast and method == "gptq":  # the same format, masters rounded to nearest: what GPTQ buys
        rtn = quantize(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(),
                       DoubleRoundingConfig(group_size=group_size))
        rows += [r | {"method": "rtn"} for r in evaluate_bits(
            rtn, tok, cfg.candidate_bits, texts, max_chunks=max_chunks, progress=False,
            each=lambda m, b: answers(m) if b <= 4 else {"answers": None})]
        del rtn

    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    fp32_bytes = sum(f.stat().st_size for f in Path(src).glob("*.safetensors"))
    print(f"\nswitchable checkpoint {ckpt}: {ckpt_bytes / 1e6:.1f} MB on disk (fp32 checkpoint {fp32_bytes / 1e6:.1f} MB,"
          f" bf16 {fp32_bytes / 2e6:.1f} MB), all five widths from one INT8 master")
    print("\nheld-out perplexity:\n" + _table(rows, fp_ppl, cfg.candidate_bits))
    for i, p in enumerate(prompts):
        print(f"\ngreedy answers to {p!r} (chat template):")
        for r in rows:
            if r["answers"] is not None:
                name = "fp32" if r["method"] == "fp32" else f"{r['method']} w{r['bits']}"
                print(f"  [{name:>8}] {r['answers'][i][:110]}")
    plot_methods(rows, out / "ppl_vs_bits.png",
                 title=f"SmolLM2-135M-Instruct, one INT8 master (group {group_size}), Lee held-out")
    summary = {"rows": rows, "prompts": prompts, "checkpoint_bytes": ckpt_bytes, "fp32_checkpoint_bytes": fp32_bytes,
               "method": method, "calibration": calibration if method == "gptq" else None, "calib_tokens": calib_tokens,
               "quantize_seconds": quantize_s, "group_size": group_size, "max_chunks": max_chunks,
               "total_seconds": time.perf_counter() - t0}
    (out / MARKER).write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out / 'ppl_vs_bits.png'} and {out / MARKER} in {summary['total_seconds']:.0f} s")
    return rows


def _table(rows, fp_ppl, bits) -> str:
    from .evaluation import markdown_table

    by = {(r["method"], r["bits"]): r for r in rows}
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    header = ["bits"] + [h for m in methods for h in (f"{m} PPL", f"{m} vs FP")] + ["size at this width"]
    body = [["fp32"] + [c for _ in methods for c in (f"{fp_ppl:.2f}", "-")] + [f"{by[('fp32', 'fp32')]['bytes'] / 1e6:.1f} MB"]]
    for b in bits:
        cells = [c for m in methods for c in ((f"{by[(m, b)]['ppl']:.2f}", _delta(by[(m, b)]["ppl"], fp_ppl))
                                              if (m, b) in by else ("-", "-"))]
        body.append([b] + cells + [f"{next(r['bytes'] for r in rows if r['bits'] == b) / 1e6:.1f} MB"])
    return markdown_table(header, body)


def _delta(ppl: float, fp: float) -> str:
    r = ppl / fp
    return f"{100 * (r - 1):+.1f}%" if r < 2 else f"x{r:.1f}" if r < 1000 else f"x{r:.1e}"


def plot_methods(rows, path, title: str) -> str:
    """PPL against bit-width, one line per method, FP as a dashed line; the x tick labels carry the size at each
    width, and the legend (not per-point labels, which collide where the methods agree) names the lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = next(r for r in rows if r["method"] == "fp32")
    fig, ax = plt.subplots(figsize=(8, 4.8))
    styles = {"gptq": dict(marker="o", color="C0", linewidth=2), "rtn": dict(marker="s", color="C3", linestyle=":")}
    sizes = {}
    for m in METHODS:
        pts = sorted((r["bits"], r["ppl"]) for r in rows if r["method"] == m)
        if pts:
            ax.plot(*zip(*pts), label=LABELS[m], **styles[m])
        sizes.update({r["bits"]: r["bytes"] for r in rows if r["method"] == m})
    ax.axhline(fp["ppl"], color="gray", linestyle="--", label=f"fp32 ({fp['ppl']:.1f})")
    ticks = sorted(sizes)
    ax.set_xticks(ticks, [f"{b}-bit\n{sizes[b] / 2**20:.0f} MiB" for b in ticks])
    ax.set_xlim(max(ticks) + 0.5, min(ticks) - 0.5)  # higher precision on the left
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_xlabel("bit-width (model size at that width)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = str(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
