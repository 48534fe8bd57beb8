"""Row-exact attention, so that speculative verification reproduces the verifier's own greedy decode bit for bit.

When the verifier checks ``K`` drafted tokens it runs one forward over ``K + 1`` query rows on its cache, where plain
decoding runs ``K + 1`` one-row forwards. The linear layers give the same values per row either way (their kernels
reduce each row alone; checked for every width and up to 40 rows), but the attention kernel does not: one call reduces
over the longest key length of the batch (masked keys included), which changes the float summation order of the
earlier rows (measured: 1e-4 after the first layer in bf16, 0.2-0.5 on the logits, and a different greedy token every
few dozen tokens on SmolLM2-135M). Rounding differences, not a bug, but the promise of assisted generation is "the same
output as the verifier", so the verifier's attention is wrapped:

- one query row, or a prefill (no cache: as many keys as queries): the base function, unchanged, so the verifier's own
  decoding gives exactly what it gave before;
- several query rows on a cache: each row attends to its own key prefix in a one-row call of the base function, i.e.
  exactly the call plain decoding makes for that position.

The wrapper is registered with transformers' attention and mask interfaces as ``abs_llm_rowwise_<base>`` for ``sdpa``
and ``eager``. Its cost is ``K`` extra small attention calls per layer in each verification step.
"""

from __future__ import annotations

import sys

import torch

PREFIX = "abs_llm_rowwise_"
BASES = ("sdpa", "eager")


def _base_function(base: str, module):
    if base == "eager":  # each modeling file has its own eager_attention_forward
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[base]


def _plain_causal(mask: torch.Tensor | None, q_len: int, kv_len: int) -> bool:
    """Whether ``mask`` only says "row i sees keys [0, kv_len - q_len + i]" (no padding, no window): then a one-row call
    needs no mask at all, which is what plain decoding passes."""
    if mask is None:
        return True
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
    allowed = mask if mask.dtype == torch.bool else mask == 0
    return bool((allowed[..., -q_len:, :kv_len] == causal).all())


def rowwise(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        fn = _base_function(base, module)
        q_len, kv_len = query.shape[2], key.shape[2]
        if q_len == 1 or kv_len <= q_len:
            return fn(module, query, key, value, attention_mask, **kwargs)
        kwargs.pop("is_causal", None)  # one row: causality is the key prefix itself
        plain = _plain_causal(attention_mask, q_len, kv_len)
        past, rows = kv_len - q_len, []
        for i in range(q_len):
            n = past + i + 1
            mask = None if plain else attention_mask[..., i : i + 1, :n]
            out, _ = fn(module, query[:, :, i : i + 1], key[:, :, :n], value[:, :, :n], mask, **kwargs)
            rows.append(out)
        return torch.cat(rows, dim=1), None  # attention functions return (batch, q, heads, dim)

    attention.__name__ = f"{PREFIX}{base}"
    return attention


def register() -> None:
    """Register ``abs_llm_rowwise_sdpa`` / ``abs_llm_rowwise_eager`` (idempotent)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import AttentionInterface

    for base in BASES:
        name = PREFIX + base
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, rowwise(base))
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


def base_of(impl: str | None) -> str | None:
    return impl[len(PREFIX):] if isinstance(impl, str) and impl.startswith(PREFIX) else impl


def make_rowwise(model) -> bool:
    """Route ``model``'s attention through the row-exact wrapper of its current implementation. Returns ``False``
    (and changes nothing) where that is not possible: an implementation other than sdpa/eager, or a model that does
    not dispatch attention through transformers' AttentionInterface."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if isinstance(impl, str) and impl.startswith(PREFIX):
        return True
    if impl not in BASES or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    model.set_attn_implementation(PREFIX + impl)
    return config._attn_implementation == PREFIX + impl


def make_plain(model) -> None:
    """Undo :func:`make_rowwise` (used on a draft, whose config starts as a copy of the verifier's)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if isinstance(impl, str) and impl.startswith(PREFIX):
        model.set_attn_implementation(base_of(impl))
