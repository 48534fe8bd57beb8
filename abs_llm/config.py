"""DoubleRoundingConfig: the quantization config that transformers stores in ``config.json``."""

from __future__ import annotations

from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import FORMAT_VERSION
from .core import (DEFAULT_CANDIDATE_BITS, DEFAULT_GROUP_SIZE, DEFAULT_MASTER_BITS, MASTER_BITS, allowed_candidates,
                   check_group_size)
from .kernels import check_kernel

QUANT_METHOD = "double_rounding"


def _check_bits(name: str, value, allowed) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {sorted(allowed)}")
    return value


class DoubleRoundingConfig(QuantizationConfigMixin):
    """Switchable multi-bit weight quantization: one integer master, every lower bit-width derived by a second rounding.

    Args:
        bits: active bit-width after loading (one of ``candidate_bits``; default: the highest candidate).
        candidate_bits: bit-widths the model may switch to; all ``<= master_bits``.
        master_bits: stored integer precision, 8 (candidates 2..8) or 4 (candidates 2..4, packed two per byte).
        group_size: ``None`` for one scale per output channel, or a power of two in [16, 1024] input columns per
            scale (the last group of a row is shorter when it does not divide ``in_features``).
        modules_to_not_convert: module names (or prefixes/regexes, as in transformers) kept in floating point.
            ``None`` keeps transformers' default (the output embedding / tied weights).
        layer_bits: optional ``{module_name: bits}`` overriding ``bits`` per layer.
        kernel: matmul used at run time, ``"auto"`` (best stock-PyTorch integer kernel for the bit-width, device and
            activation dtype, see :mod:`abs_llm.kernels`), ``"dequant"`` or a named kernel. Not stored when
            ``"auto"``, so default checkpoints stay readable by versions without this field.
        hessian_traces: optional ``{module_name: tr(H_l)/n_l}`` from ``abs_llm.hasb.hessian_traces`` (HASB), kept so a
            later search can reuse them without recomputing.
        norm_bits: widths that carry their own norm gains (:mod:`abs_llm.norms`, fitted by ``abs_llm.tune_norms``);
            ``None`` for none. Set by the tuning, not by hand: the checkpoint must hold those gains.
    """

    def __init__(
        self,
        bits: int | None = None,
        candidate_bits: list[int] | tuple[int, ...] = DEFAULT_CANDIDATE_BITS,
        master_bits: int = DEFAULT_MASTER_BITS,
        group_size: int | None = DEFAULT_GROUP_SIZE,
        modules_to_not_convert: list[str] | None = None,
        layer_bits: dict[str, int] | None = None,
        hessian_traces: dict[str, float] | None = None,
        format_version: int = FORMAT_VERSION,
        kernel: str = "auto",
        norm_bits: list[int] | None = None,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.candidate_bits = candidate_bits
        self.master_bits = master_bits
        self.group_size = group_size
        self.modules_to_not_convert = modules_to_not_convert
        self.layer_bits = layer_bits
        self.hessian_traces = hessian_traces
        self.format_version = format_version
        self.kernel = kernel
        self.norm_bits = norm_bits
        unknown = set(kwargs) - {"quant_method"}
        if unknown:
            raise ValueError(f"DoubleRoundingConfig got unknown fields {sorted(unknown)}")
        self.post_init()

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """transformers builds the config from ``config.json`` through here: a bad field is reported as coming from
        that file, as a ``ValueError`` whatever its type was."""
        if not isinstance(config_dict, dict):
            raise ValueError(f"config.json quantization_config must be a JSON object, got {config_dict!r:.80}")
        try:
            return super().from_dict(config_dict, return_unused_kwargs, **kwargs)
        except ValueError as e:
            raise ValueError(f"config.json quantization_config: {e}") from e

    def post_init(self):
        allowed = allowed_candidates(_check_bits("master_bits", self.master_bits, MASTER_BITS))
        if not isinstance(self.candidate_bits, (list, tuple)) or not self.candidate_bits:
            raise ValueError(f"candidate_bits must be a non-empty list drawn from {list(allowed)}, got "
                             f"{self.candidate_bits!r:.80}")
        cands = [_check_bits("candidate_bits entry", b, allowed) for b in self.candidate_bits]
        if len(set(cands)) != len(cands):
            raise ValueError(f"candidate_bits has duplicates: {cands}")
        self.candidate_bits = sorted(cands, reverse=True)
        if self.bits is None:  # the highest candidate: the master's own width for the default candidates
            self.bits = self.candidate_bits[0]
        _check_bits("bits", self.bits, self.candidate_bits)
        check_group_size(self.group_size)
        if not isinstance(self.kernel, str):
            raise ValueError(f"kernel must be a string, got {self.kernel!r:.80}")
        check_kernel(self.kernel)
        if self.modules_to_not_convert is not None:
            if not isinstance(self.modules_to_not_convert, (list, tuple)) or not all(
                isinstance(m, str) for m in self.modules_to_not_convert
            ):
                raise ValueError(f"modules_to_not_convert must be a list of names, got {self.modules_to_not_convert!r}")
            self.modules_to_not_convert = list(self.modules_to_not_convert)
        if self.layer_bits is not None:
            if not isinstance(self.layer_bits, dict):
                raise ValueError(f"layer_bits must be a dict {{module_name: bits}}, got {type(self.layer_bits).__name__}")
            for name, b in self.layer_bits.items():
                if not isinstance(name, str):
                    raise ValueError(f"layer_bits keys must be module names, got {name!r}")
                _check_bits(f"layer_bits[{name!r}]", b, self.candidate_bits)
            self.layer_bits = dict(self.layer_bits) or None
        if self.hessian_traces is not None:
            if not isinstance(self.hessian_traces, dict) or not all(  # abs(v) < 1e300: finite, and fits a float
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e300
                for k, v in self.hessian_traces.items()
            ):
                raise ValueError("hessian_traces must be a dict {module_name: finite number}")
            self.hessian_traces = {str(k): float(v) for k, v in self.hessian_traces.items()} or None
        if self.norm_bits is not None:
            if not isinstance(self.norm_bits, (list, tuple)):
                raise ValueError(f"norm_bits must be a list of candidate widths, got {self.norm_bits!r:.80}")
            nb = [_check_bits("norm_bits entry", b, self.candidate_bits) for b in self.norm_bits]
            self.norm_bits = sorted(set(nb), reverse=True) or None
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, int) or self.format_version < 1:
            raise ValueError(f"format_version must be an integer >= 1, got {self.format_version!r:.80}")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format_version {self.format_version} is newer than this abs_llm supports ({FORMAT_VERSION});"
                " upgrade abs_llm"
            )

    def to_dict(self):
        d = super().to_dict()
        d["quant_method"] = QUANT_METHOD
        if d.get("kernel") == "auto":
            d.pop("kernel")
        if not d.get("norm_bits"):  # absent unless tuned: such checkpoints stay readable by versions without it
            d.pop("norm_bits", None)
        return d
