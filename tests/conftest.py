"""Shared fixtures and helpers: tiny random Llama models, in-memory tokenizers (no Hub), a tiny switchable checkpoint."""

import os

# CI has no GPU: the Triton kernels run in Triton's interpreter. The flag is read when a @triton.jit function is
# decorated, including triton's own library (tl.zeros, tl.sum), and transformers imports triton, so set it first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from abs_llm import DoubleRoundingConfig

CANDS = [8, 6, 4, 3, 2]


def tiny_llama_config(**overrides):
    # hidden 96 with group 64 exercises the short last group (96 = 1.5 x 64), like the default model's 576 = 4.5 x 128
    kw = dict(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64)
    kw.update(overrides)
    return LlamaConfig(**kw)


def load_q(path, **cfg):
    """A float checkpoint at ``path`` quantized on load (defaults: INT8 master, every width, group 64, 8 bits)."""
    cfg = {"bits": 8, "candidate_bits": CANDS, "group_size": 64, **cfg}
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=DoubleRoundingConfig(**cfg))


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def char_tokenizer():
    """A character tokenizer inside the tiny model's 128-token vocabulary, savable with the checkpoint (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1} | {chr(i): i for i in range(32, 127)} | {"\n": 127}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  eos_token="<eos>", unk_token="<unk>")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return tok


TEXT = ("The quick brown fox jumps over the lazy dog. Double rounding derives low bit-widths from an integer master. "
        "Switchable models change precision at run time without retraining. ") * 8


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory):
    """A tiny byte-level BPE tokenizer trained on TEXT: ``(tokenizer, saved_dir)``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       special_tokens=["<eos>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return tok, path


@pytest.fixture(scope="session")
def tiny_lm_dir(tiny_tok, tmp_path_factory):
    """Float tiny Llama + tokenizer saved together (what a recipe's ``model`` points at)."""
    tok, _ = tiny_tok
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=320))
    path = tmp_path_factory.mktemp("lm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_recipe(tmp_path, model_dir, **train):
    """A QAT recipe YAML for the tiny model (2 steps, per-channel scales, candidates 8/4/2) on a local text file."""
    import yaml

    data = tmp_path / "data.txt"
    data.write_text("\n".join([TEXT] * 6))
    t = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "save_steps": 2,
         "use_cpu": True, **train}
    recipe = {"model": str(model_dir), "data": {"source": str(data), "block_size": 32},
              "quant": {"candidate_bits": [8, 4, 2], "group_size": None},
              "multibit": {"scale_lr": 1e-3, "kd": "teacher"}, "train": t}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def tiny_llama_dir(tiny_llama, tmp_path):
    path = tmp_path / "fp"
    tiny_llama.save_pretrained(path)
    return path


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 16), generator=g)


@pytest.fixture
def qckpt(tiny_llama, tmp_path):
    """A switchable checkpoint of the tiny Llama (INT8 master, candidates 8/4/2, group 64) saved with a tokenizer."""
    import abs_llm

    abs_llm.quantize(tiny_llama, DoubleRoundingConfig(bits=8, candidate_bits=[8, 4, 2]))
    path = tmp_path / "q"
    tiny_llama.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def model_digest(model) -> str:
    """SHA-256 of everything a refused call must leave as it was: every state-dict tensor (name, dtype, shape, bytes,
    requires_grad), every module's type, and each SwitchableLinear's bits, kernel and mode."""
    import hashlib

    from abs_llm import SwitchableLinear

    h = hashlib.sha256()
    for name, t in model.state_dict(keep_vars=True).items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{t.requires_grad}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for name, m in model.named_modules():
        h.update(f"{name}|{type(m).__name__}".encode())
        if isinstance(m, SwitchableLinear):
            h.update(f"|{m.bits}|{m.kernel}|{m.trainable}".encode())
    return h.hexdigest()


def pytest_terminal_summary(terminalreporter):
    from tests._report import RELIABILITY

    if any(RELIABILITY.values()):
        terminalreporter.write_line("reliability: " + ", ".join(f"{k}: {v}" for k, v in RELIABILITY.items()))
