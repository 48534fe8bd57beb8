"""abs_llm: Adaptive Bit Switching (Double Rounding, ALRS, HASB) for Hugging Face transformers.

Importing the package registers ``quant_method="double_rounding"`` with transformers (idempotent).
"""

from .config import DoubleRoundingConfig
from .hf_quantizer import DoubleRoundingHfQuantizer, quantize
from .layers import SwitchableLinear
from .switching import get_bits, set_bits, switchable_layers

__version__ = "0.1.0"


def _register() -> None:
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from .config import QUANT_METHOD

    # Assigning (not the decorators, which refuse re-registration) keeps re-imports and reloads idempotent.
    AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = DoubleRoundingConfig
    AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = DoubleRoundingHfQuantizer


_register()

from .peft_hook import install_when_imported as _install_peft_hook  # noqa: E402

_install_peft_hook()  # plain peft.get_peft_model / PeftModel.from_pretrained learn SwitchableLinear when peft loads


def __getattr__(name):
    # Heavy helpers (model/corpus loading, evaluation) load on first use, not at import.
    lazy = {
        "default_model_path": "data",
        "load_default_model": "data",
        "default_corpus": "data",
        "perplexity": "evaluation",
        "draft_model": "speculative",
        "tune_norms": "ptq.norm_tweak",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(f".{lazy[name]}", __name__), name)
    raise AttributeError(f"module 'abs_llm' has no attribute {name!r}")


__all__ = [
    "DoubleRoundingConfig",
    "DoubleRoundingHfQuantizer",
    "SwitchableLinear",
    "quantize",
    "set_bits",
    "get_bits",
    "switchable_layers",
    "default_model_path",
    "load_default_model",
    "default_corpus",
    "perplexity",
    "draft_model",
    "tune_norms",
]
