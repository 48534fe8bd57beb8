import os

# CI has no GPU: the Triton kernels run in Triton's interpreter. The flag is read when a @triton.jit function is
# decorated, including triton's own library (tl.zeros, tl.sum), and transformers imports triton, so set it first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(**overrides):
    # hidden 96 with group 64 exercises the short last group (96 = 1.5 x 64), like the default model's 576 = 4.5 x 128
    kw = dict(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64)
    kw.update(overrides)
    return LlamaConfig(**kw)


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


def pytest_terminal_summary(terminalreporter):
    from tests._report import RELIABILITY

    if any(RELIABILITY.values()):
        terminalreporter.write_line("reliability: " + ", ".join(f"{k}: {v}" for k, v in RELIABILITY.items()))
