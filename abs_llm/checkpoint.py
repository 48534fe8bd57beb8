"""The on-disk format of a switchable checkpoint, in one place (docs/architecture.md, "Checkpoint format").

Per converted ``Linear`` named ``L``:

- ``L.weight_master``: the master integers. INT8 master: int8 ``(out, in)``. INT4 master: uint8 ``(out, ceil(in/2))``,
  two's-complement nibbles, even column in the low nibble (:func:`core.pack_int4`).
- ``L.weight_scale``: float32 ``(out, ceil(in / group_size))`` (one column per channel when ``group_size`` is None).
- ``L.bias`` where the layer has one, in the model's dtype. No float ``L.weight`` is ever written, except the one empty
  *load guard* tensor (below).

The safetensors header of every shard carries ``abs_llm.*`` metadata: ``format_version``, ``quant_method``,
``master_bits``, ``candidate_bits``, ``group_size``, ``layer_bits`` (every converted layer's active width at save
time), optionally ``hessian_traces``, the per-tensor SHA-256 ``digests`` (:mod:`.integrity`) and ``load_guard``. At
load, :func:`check_files` compares all of it with ``config.json`` and the model skeleton before any tensor is read.

This module imports nothing from abs_llm but the math and the digests, so layers, the quantizer, export and training
can all use it without cycles.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from . import core
from .integrity import meta_json, read_config, read_header, verify_config, verify_enabled, verify_file

FORMAT_VERSION = 1
META_PREFIX = "abs_llm."
GUARD_META_KEY = META_PREFIX + "load_guard"


# ---- master layout --------------------------------------------------------------------------------------------------
def master_layout(out_features: int, in_features: int, master_bits: int) -> tuple[torch.dtype, tuple[int, int]]:
    """``(dtype, shape)`` of the stored master."""
    if master_bits == 8:
        return torch.int8, (out_features, in_features)
    return torch.uint8, (out_features, (in_features + 1) // 2)


def scale_shape(out_features: int, in_features: int, group_size: int | None) -> tuple[int, int]:
    return out_features, core.num_groups(in_features, group_size)


def encode_master(q: torch.Tensor, master_bits: int) -> torch.Tensor:
    """int8 master integers ``(out, in)`` -> the stored tensor (packed nibbles for a 4-bit master)."""
    return core.pack_int4(q) if master_bits == 4 else q.to(torch.int8)


def decode_master(stored: torch.Tensor, master_bits: int, in_features: int) -> torch.Tensor:
    """The stored tensor -> int8 master integers ``(out, in)`` (a view, no copy, for an 8-bit master)."""
    return core.unpack_int4(stored, in_features) if master_bits == 4 else stored


_DTYPE_CODES = {torch.int8: "I8", torch.uint8: "U8", torch.float32: "F32"}


# ---- save ------------------------------------------------------------------------------------------------------------
def metadata(config, layer_bits: dict[str, int]) -> dict[str, str]:
    """The ``abs_llm.*`` header entries for a model quantized with ``config`` whose layers are at ``layer_bits``."""
    extra = {}
    if getattr(config, "hessian_traces", None):  # HASB sensitivities travel with the weights they were measured on
        extra[META_PREFIX + "hessian_traces"] = json.dumps(config.hessian_traces, sort_keys=True)
    return extra | {
        META_PREFIX + "format_version": str(FORMAT_VERSION),
        META_PREFIX + "quant_method": config.quant_method,
        META_PREFIX + "master_bits": str(config.master_bits),
        META_PREFIX + "candidate_bits": json.dumps(list(config.candidate_bits)),
        META_PREFIX + "group_size": json.dumps(config.group_size),
        META_PREFIX + "layer_bits": json.dumps(layer_bits, sort_keys=True),
    }


def state_dict_and_metadata(model, layers: dict, config, norm_float_gains: dict | None = None
                            ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What ``save_pretrained`` writes: the model's state dict with every training-mode layer rounded to its master,
    the load-guard tensor, and the header metadata. ``norm_float_gains`` (:func:`abs_llm.norms.float_gains`): the
    float gains written as the weight of each norm that has per-width gains."""
    norm_float_gains = norm_float_gains or {}
    state_dict = model.state_dict()
    for name, layer in layers.items():
        if layer.trainable:  # the latent float weight is training state; the checkpoint holds the master
            state_dict.pop(f"{name}.weight")
            state_dict[f"{name}.weight_master"] = encode_master(layer.master().detach(), layer.master_bits)
            state_dict[f"{name}.weight_scale"] = layer.weight_scale.detach().clamp(min=torch.finfo(torch.float32).tiny)
    for key, gains in norm_float_gains.items():  # a norm's weight on disk is its float gains, whatever width is active
        state_dict[key] = gains
    meta = metadata(config, {n: m.bits for n, m in layers.items()})
    if layers:
        # An empty tensor where a plain float model expects a Linear weight: loading without abs_llm then fails with a
        # size mismatch instead of returning random weights (see remote_code.py).
        guard = f"{next(iter(layers))}.weight"
        state_dict[guard] = torch.zeros(0, dtype=torch.int8)
        meta[GUARD_META_KEY] = guard
    return state_dict, meta


def guard_patterns(names) -> set[str]:
    """Unexpected-key patterns for the load guard of layers ``names`` (it is expected, not worth a warning)."""
    return {rf"^{re.escape(n)}\.weight$" for n in names}


# ---- load ------------------------------------------------------------------------------------------------------------
def _read_headers(files) -> tuple[dict, dict, dict]:
    """``({tensor: (dtype, shape)}, {file: metadata}, {tensor: file})`` of safetensors ``files``; every problem is a
    ``ValueError`` naming its file."""
    from safetensors import SafetensorError, safe_open

    header: dict[str, tuple[str, list[int]]] = {}
    file_meta: dict = {}
    owner: dict = {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            raise ValueError(f"double_rounding checkpoints must be safetensors; got {f}")
        read_header(f)  # our own parser first: its errors say what is wrong with the header, and name the file
        try:
            with safe_open(f, framework="pt") as sf:
                file_meta[f] = sf.metadata() or {}
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    header[k] = (sl.get_dtype(), list(sl.get_shape()))
                    owner[k] = f
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f}: unreadable safetensors file (truncated or corrupted?): {e}") from e
    return header, file_meta, owner


def check_tensors_present(files, names, what: str) -> None:
    """Every tensor in ``names`` is in the safetensors ``files``, else a ``ValueError`` naming the first missing."""
    header = _read_headers(files)[0]
    missing = [n for n in names if n not in header]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensor(s) of the {what} (first: {missing[0]}); the files "
                         "and config.json do not belong together: re-save the model with abs_llm")


def _check_metadata(meta: dict, config, shapes: dict[str, tuple[int, int]], where) -> None:
    def get(key):
        return meta.get(META_PREFIX + key)

    version = get("format_version")
    if version is None:
        raise ValueError(f"{where}: safetensors metadata lacks '{META_PREFIX}format_version'; not an abs_llm checkpoint")
    if not re.fullmatch(r"[0-9]{1,6}", version) or int(version) < 1:
        raise ValueError(f"{where}: unreadable checkpoint format_version {version!r}")
    if int(version) > FORMAT_VERSION:
        raise ValueError(f"{where}: checkpoint format_version {version} is newer than supported ({FORMAT_VERSION}); "
                         "upgrade abs_llm")
    for key, expected in (("quant_method", config.quant_method), ("master_bits", str(config.master_bits)),
                          ("group_size", json.dumps(config.group_size))):
        if get(key) != expected:
            raise ValueError(f"{where}: checkpoint metadata {key}={get(key)} disagrees with config.json ({expected})")
    cands = meta_json(where, meta, META_PREFIX + "candidate_bits", list)
    layer_bits = meta_json(where, meta, META_PREFIX + "layer_bits", dict)
    if cands is None or not all(type(b) is int for b in cands) or sorted(cands) != sorted(config.candidate_bits):
        raise ValueError(f"{where}: checkpoint metadata candidate_bits={cands} disagrees with config.json "
                         f"({list(config.candidate_bits)})")
    if layer_bits is None or set(layer_bits) != set(shapes):
        extra = sorted(set(layer_bits or {}) - set(shapes))[:3]
        missing = sorted(set(shapes) - set(layer_bits or {}))[:3]
        raise ValueError(f"{where}: checkpoint metadata layer_bits names other layers than config.json converts (in the "
                         f"header only: {extra}; converted but not in the header: {missing}); modules_to_not_convert "
                         "differs?")
    bad = {n: b for n, b in layer_bits.items() if type(b) is not int or b not in config.candidate_bits}
    if bad:
        raise ValueError(f"{where}: checkpoint metadata layer_bits {dict(list(bad.items())[:3])} are not candidate "
                         f"bit-widths {list(config.candidate_bits)}")


def check_files(files, config, shapes: dict[str, tuple[int, int]]) -> None:
    """Compare the safetensors headers of ``files`` with what ``config`` implies for the layers ``shapes``
    (``{name: (out_features, in_features)}``), before any tensor is loaded; then verify the digests."""
    header, file_meta, owner = _read_headers(files)
    if verify_enabled():  # first: an edited config.json explains every disagreement below
        for f, m in file_meta.items():
            verify_config(f, m)
    for f, m in file_meta.items():
        _check_metadata(m, config, shapes, f)
    problems = []  # (tensor, what is wrong)
    for name, (out_f, in_f) in shapes.items():
        dtype, shape = master_layout(out_f, in_f, config.master_bits)
        expect = {
            f"{name}.weight_master": (_DTYPE_CODES[dtype], list(shape)),
            f"{name}.weight_scale": ("F32", list(scale_shape(out_f, in_f, config.group_size))),
        }
        for key, (dt, shp) in expect.items():
            got = header.get(key)
            if got is None:
                problems.append((key, f"missing tensor {key}"))
            elif got != (dt, shp):
                problems.append((key, f"{key}: dtype/shape {got[0]}{got[1]}, expected {dt}{shp}"))
    guards = {m.get(GUARD_META_KEY) for m in file_meta.values()}
    stray = [k for k in header if k.endswith(".weight") and k[: -len(".weight")] in shapes
             and not (k in guards and header[k][1] == [0])]
    problems += [(k, f"unexpected float weight {k} for a quantized layer") for k in stray]
    if problems:
        shown = "; ".join(t for _, t in problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        where = sorted({str(owner.get(k, files[0])) for k, _ in problems[:5]})
        raise ValueError(f"{', '.join(where)}: checkpoint does not match its double_rounding config: {shown}")
    if verify_enabled():
        for f, m in file_meta.items():
            verify_file(f, m)


# ---- before transformers builds the model ---------------------------------------------------------------------------
def weight_files(directory) -> list[Path]:
    """The weight shards of a local checkpoint folder, as transformers names them."""
    return sorted(Path(directory).glob("model*.safetensors"))


def _header_meta(file) -> dict:
    meta = read_header(file)[0].get("__metadata__")
    return meta if isinstance(meta, dict) else {}  # a malformed one is safetensors' to refuse, at load


def check_config_file(directory) -> None:
    """Refuse a local checkpoint whose ``config.json`` differs from the config recorded with its weights. Called from
    the quantizer before transformers builds the model, so a corrupted value is named instead of crashing the model's
    constructor; a no-op for remote ids and for checkpoints saved without a record."""
    if not directory or not Path(directory).is_dir() or not verify_enabled():
        return
    for f in weight_files(directory):
        verify_config(f, _header_meta(f))


def check_dir(directory) -> None:
    """Everything about a local checkpoint folder that can be checked before ``from_pretrained`` parses its
    ``config.json``: readable headers, a ``double_rounding`` ``quantization_config`` when the weights are a switchable
    checkpoint, and the config record (see :func:`check_config_file`). ``pipeline.load_checkpoint`` calls it, so the CLI
    names the broken file even where transformers' own config parsing would fail first."""
    d = Path(directory)
    files = weight_files(d) if d.is_dir() else []
    ours = [f for f in files if META_PREFIX + "format_version" in _header_meta(f)]
    if not ours:
        return
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{d}: no config.json next to the switchable checkpoint {ours[0].name}")
    q = read_config(cfg_path).get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "double_rounding":
        raise ValueError(f"{cfg_path}: no double_rounding quantization_config, but {ours[0].name} holds a switchable "
                         "checkpoint (config.json edited or corrupted?)")
    check_config_file(d)
