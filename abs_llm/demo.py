"""The main job (``make demo``): embedded default model -> switchable INT8-master checkpoint -> reload -> held-out PPL
and a greedy generation at every bit-width -> table, JSON and PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

MARKER = "demo_results.json"


def _generate(model, tok, prompt: str, max_new_tokens: int = 20) -> str:
    msgs = [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) if tok.chat_template else prompt
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip().replace("\n", " ")


def demo(out_dir="outputs/demo", group_size=64, max_chunks=None, prompt="The capital of France is") -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import DoubleRoundingConfig
    from .data import default_corpus, default_model_path
    from .evaluation import evaluate_bits, perplexity, plot_ppl, ppl_table
    from .switching import model_bytes

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ValueError(f"{out} exists and holds something other than a previous demo; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = default_model_path()
    tok = AutoTokenizer.from_pretrained(src)
    texts = default_corpus("eval")
    print(f"default model: {src}\nheld-out split: {len(texts)} Lee documents, seq_len 512, non-overlapping windows")

    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    fp_ppl = perplexity(fp, tok, texts, max_chunks=max_chunks)
    rows = [{"bits": "fp32", "ppl": fp_ppl, "bytes": model_bytes(fp), "sample": _generate(fp, tok, prompt)}]
    del fp

    cfg = DoubleRoundingConfig(group_size=group_size)
    t = time.perf_counter()
    qm = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.float32)
    quantize_s = time.perf_counter() - t
    ckpt = out / "checkpoint"
    qm.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    del qm
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()  # everything below runs on the reloaded checkpoint
    rows += evaluate_bits(model, tok, cfg.candidate_bits, texts, max_chunks=max_chunks,
                          each=lambda m, b: {"sample": _generate(m, tok, prompt)})

    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    fp32_bytes = sum(f.stat().st_size for f in Path(src).glob("*.safetensors"))
    print(f"\nswitchable checkpoint {ckpt}: {ckpt_bytes / 1e6:.1f} MB on disk (fp32 checkpoint {fp32_bytes / 1e6:.1f} MB,"
          f" bf16 {fp32_bytes / 2e6:.1f} MB); quantize-on-load {quantize_s:.1f} s")
    print("\nheld-out perplexity:\n" + ppl_table(rows, fp_ppl))
    print(f"\ngreedy generations for {prompt!r}:")
    for r in rows:
        print(f"  [{r['bits']:>4}] {r['sample'][:100]}")
    plot_ppl(rows, out / "ppl_vs_bits.png", title=f"SmolLM2-135M, Double Rounding from INT8 master (group {group_size})")
    summary = {"rows": rows, "checkpoint_bytes": ckpt_bytes, "fp32_checkpoint_bytes": fp32_bytes,
               "quantize_seconds": quantize_s, "group_size": group_size, "max_chunks": max_chunks,
               "total_seconds": time.perf_counter() - t0}
    (out / MARKER).write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out / 'ppl_vs_bits.png'} and {out / MARKER} in {summary['total_seconds']:.0f} s")
    return rows
