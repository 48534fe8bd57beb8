"""Loud failure or self-registration when a switchable checkpoint is loaded without ``import abs_llm``.

transformers only *warns* about an unknown ``quant_method`` and then builds plain ``nn.Linear`` layers. Two guards:

1. **Load guard tensor.** Our integer tensors are called ``weight_master``/``weight_scale``, so a plain load already
   lists every Linear ``weight`` as MISSING, but that is a warning and the model comes back with random weights. So
   each checkpoint also stores one empty tensor under a name the plain model *does* have (the first quantized layer's
   ``.weight``, shape ``[0]``). A plain load then hits a size mismatch, which transformers raises as an error. With
   ``abs_llm`` imported, the quantizer tells transformers to ignore that key (see ``hf_quantizer``).
2. **Remote code.** ``save_pretrained`` writes ``modeling_abs_llm.py`` next to the weights and an ``auto_map`` entry
   into ``config.json``. ``from_pretrained(path, trust_remote_code=True)`` imports that module, which imports
   ``abs_llm`` (registering the quantizer) and loads the model through the regular path. transformers checks the
   module's imports first, so a missing package is reported as ``ImportError: ... requires ... abs_llm``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import GUARD_META_KEY  # noqa: F401  (re-exported: the guard is part of the format)

REMOTE_MODULE = "modeling_abs_llm"
REMOTE_CLASS = "AbsLlmForCausalLM"
AUTO_MAP = {"AutoModelForCausalLM": f"{REMOTE_MODULE}.{REMOTE_CLASS}"}

# Kept tiny and dependency-free apart from abs_llm: it is executed by transformers from the checkpoint folder.
REMOTE_SOURCE = '''"""Loader shim for abs_llm Double Rounding switchable checkpoints (written by abs_llm; safe to read).

`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` lands here. Importing abs_llm registers the
"double_rounding" quantizer with transformers; the model then loads through transformers' normal path.
Install the package with `pip install abs_llm` if this import fails.
"""

import abs_llm  # noqa: F401  (must stay a top-level import: transformers checks it and names the missing package)


class AbsLlmForCausalLM:
    """Not a model class: a redirect to AutoModelForCausalLM once abs_llm is imported."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        return None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        from transformers import AutoModelForCausalLM

        kwargs.pop("trust_remote_code", None)
        kwargs.pop("adapter_kwargs", None)
        return AutoModelForCausalLM.from_pretrained(
            pretrained_model_name_or_path, *model_args, trust_remote_code=False, **kwargs
        )
'''


def write_remote_code(directory) -> bool:
    """Add ``modeling_abs_llm.py`` and ``auto_map`` to a saved double_rounding checkpoint; False if it is not one."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        return False
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if (cfg.get("quantization_config") or {}).get("quant_method") != "double_rounding":
        return False
    (directory / f"{REMOTE_MODULE}.py").write_text(REMOTE_SOURCE, encoding="utf-8")
    auto_map = dict(cfg.get("auto_map") or {})
    auto_map.update(AUTO_MAP)
    cfg["auto_map"] = auto_map
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True
