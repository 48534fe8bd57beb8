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
  exactly the call plain decoding makes for that position;
- the first verification step has no cache yet: transformers runs the prompt and the first drafts as one prefill, whose
  attention kernel blocks its rows by the total length. A forward pre-hook reads ``logits_to_keep`` (= drafts + 1,
  1 in plain decoding) and the wrapper then runs the prompt rows as the prefill plain generation runs, and the draft
  rows one by one.

The wrapper is registered with transformers' attention and mask interfaces as ``abs_llm_rowwise_<base>`` for ``sdpa``
and ``eager``. Its cost is ``K`` extra small attention calls per layer in each verification step.
"""

from __future__ import annotations

import sys

import torch

PREFIX = "abs_llm_rowwise_"
BASES = ("sdpa", "eager")
_PROMPT_ROWS: dict[int, int] = {}  # id(config) -> prompt rows of the no-cache forward now running (first verification)


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
        prompt = _PROMPT_ROWS.get(id(getattr(module, "config", None)), q_len) if kv_len == q_len else 0
        if q_len == 1 or kv_len < q_len or prompt >= q_len:
            return fn(module, query, key, value, attention_mask, **kwargs)
        plain = _plain_causal(attention_mask, q_len, kv_len)
        rows = []
        if prompt:  # the prefill plain generation runs on the prompt alone (sdpa then gets no mask: is_causal)
            mask = None if plain and base == "sdpa" else attention_mask[..., :prompt, :prompt]
            rows.append(fn(module, query[:, :, :prompt], key[:, :, :prompt], value[:, :, :prompt], mask, **kwargs)[0])
        kwargs.pop("is_causal", None)  # one row: causality is the key prefix itself
        past = kv_len - q_len
        for i in range(prompt, q_len):
            n = past + i + 1
            mask = None if plain else attention_mask[..., i : i + 1, :n]
            rows.append(fn(module, query[:, :, i : i + 1], key[:, :, :n], value[:, :, :n], mask, **kwargs)[0])
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


def _configs(model) -> list:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] if text is config else [config, text]


def _prompt_rows_hook(model, args, kwargs):
    keep = kwargs.get("logits_to_keep")
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if tokens is None or isinstance(keep, bool) or not isinstance(keep, int) or not 1 < keep <= tokens.shape[1]:
        return
    if cache is None or cache.get_seq_length() == 0:
        for c in _configs(model):
            _PROMPT_ROWS[id(c)] = tokens.shape[1] - keep + 1


def _prompt_rows_clear(model, args, kwargs, output=None):
    for c in _configs(model):
        _PROMPT_ROWS.pop(id(c), None)


_prompt_rows_hook.abs_llm_internal = _prompt_rows_clear.abs_llm_internal = True  # not copied into drafts


def make_rowwise(model) -> bool:
    """Route ``model``'s attention through the row-exact wrapper of its current implementation. Returns ``False``
    (and changes nothing) where that is not possible: an implementation other than sdpa/eager, or a model that does
    not dispatch attention through transformers' AttentionInterface."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if not (isinstance(impl, str) and impl.startswith(PREFIX)):
        if impl not in BASES or not hasattr(model, "set_attn_implementation"):
            return False
        register()
        model.set_attn_implementation(PREFIX + impl)
        if config._attn_implementation != PREFIX + impl:
            return False
    if _prompt_rows_hook not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_prompt_rows_hook, with_kwargs=True)
        model.register_forward_hook(_prompt_rows_clear, with_kwargs=True, always_call=True)
    return True


def make_plain(model) -> None:
    """Undo :func:`make_rowwise` (used on a draft, whose config starts as a copy of the verifier's)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if isinstance(impl, str) and impl.startswith(PREFIX):
        model.set_attn_implementation(base_of(impl))
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, h in hooks.items() if h in (_prompt_rows_hook, _prompt_rows_clear)]:
            del hooks[key]
