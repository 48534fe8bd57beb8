"""Text generation from a switchable checkpoint, optionally self-speculative (``abs-llm generate``).

One library call for the CLI: load the checkpoint, build the prompt (chat template for Instruct models), generate
greedily at ``bits`` with or without a low-bit draft of the same master, and report tokens/s and the acceptance rate.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def parse_bits(spec, layer_names=()) -> int | dict[str, int]:
    """``"4"`` -> 4; a directory (e.g. from ``abs-llm search``) or its ``config.json`` -> that checkpoint's bits, as
    a full ``{layer: bits}`` over ``layer_names`` when it holds a per-layer map (which stores only the layers that
    differ from its common ``bits``)."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        return spec
    text = str(spec)
    if text.strip().isdigit():
        return int(text)
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"bits {text!r} is neither an integer nor a checkpoint directory / config.json with a "
                         "quantization_config (e.g. the --out of `abs-llm search`)")
    qcfg = json.loads(path.read_text()).get("quantization_config") or {}
    if "bits" not in qcfg:
        raise ValueError(f"{path} has no quantization_config.bits; is it a switchable (double_rounding) checkpoint?")
    common, layer_bits = int(qcfg["bits"]), qcfg.get("layer_bits") or {}
    if not layer_bits:
        return common
    return {name: int(layer_bits.get(name, common)) for name in (layer_names or layer_bits)}


def prompt_ids(tokenizer, prompt: str, chat: bool | None = None) -> torch.Tensor:
    """Token ids of ``prompt``; through the tokenizer's chat template when it has one (Instruct models) unless
    ``chat=False``."""
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat was requested but the tokenizer has no chat template")
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        return enc["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def load(checkpoint: str, dtype: str = "bfloat16", tokenizer=None):
    """``(model, tokenizer)`` of a switchable checkpoint (:func:`abs_llm.pipeline.load_checkpoint`), cast to ``dtype``
    activations."""
    from .pipeline import load_checkpoint

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {sorted(DTYPES)}")
    model, tok = load_checkpoint(checkpoint, tokenizer_path=tokenizer)
    return model.eval().to(DTYPES[dtype]), tok


def generate(checkpoint: str, prompt: str, bits=None, draft_bits=None, head_bits: int | None = None,
             num_assistant_tokens: int | None = None, schedule: str | None = None, max_new_tokens: int = 128,
             compare: bool = False, dtype: str = "bfloat16", chat: bool | None = None, tokenizer=None) -> dict:
    """Greedy generation at ``bits`` (default: the checkpoint's), assisted by a ``draft_bits`` draft when given.
    With ``compare`` the verifier also runs alone, for the speed ratio and a check that the text is identical.
    ``tokenizer`` overrides the checkpoint's (path or HF id)."""
    from .speculative import draft_extra_bytes, draft_model, generate_with_stats
    from .switching import set_bits, switchable_layers

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    model, tok = load(checkpoint, dtype, tokenizer)
    names = list(switchable_layers(model))
    if bits is not None:
        set_bits(model, parse_bits(bits, names))
    ids = prompt_ids(tok, prompt, chat)
    result = {"prompt_tokens": ids.shape[1], "bits": bits, "draft_bits": draft_bits}
    draft = None
    if draft_bits is not None:
        draft = draft_model(model, bits=parse_bits(draft_bits, names), head_bits=head_bits,
                            num_assistant_tokens=num_assistant_tokens, schedule=schedule)
    with torch.no_grad():  # warm-up: packs every width once so the timed runs measure decoding, not packing
        model(ids[:, -8:])
        if draft is not None:
            draft(ids[:, -8:])
    out, stats = generate_with_stats(model, ids, draft, max_new_tokens=max_new_tokens)
    result |= stats
    result["text"] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if draft is not None:
        result["draft_extra_bytes"] = draft_extra_bytes(draft)
    if compare and draft is not None:
        plain, alone = generate_with_stats(model, ids, None, max_new_tokens=max_new_tokens)
        result["verifier_tokens_per_s"] = alone["tokens_per_s"]
        result["speedup"] = stats["tokens_per_s"] / alone["tokens_per_s"]
        result["identical"] = bool(torch.equal(plain, out))
    return result


def summary_line(r: dict) -> str:
    """One line of speed (and, with a draft, acceptance; with ``compare``, speed-up and identity) for a result."""
    line = f"{r['new_tokens']} tokens in {r['seconds']:.2f} s: {r['tokens_per_s']:.1f} tokens/s"
    if "acceptance" in r:
        line += (f"; draft acceptance {r['acceptance']:.1%} ({r['accepted']}/{r['drafted']} drafted tokens, "
                 f"{r['tokens_per_round']:.2f} tokens per verifier step)")
    if "speedup" in r:
        line += (f"; verifier alone {r['verifier_tokens_per_s']:.1f} tokens/s, speed-up {r['speedup']:.2f}x, "
                 f"identical text: {'yes' if r['identical'] else 'NO'}")
    return line
