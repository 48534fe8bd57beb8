"""Model card and Hub push: dry run writes the exact upload folder; no token means nothing is uploaded."""


import pytest

import abs_llm
from abs_llm import DoubleRoundingConfig
from abs_llm.hub import write_model_card

ROWS = [{"bits": 8, "ppl": 12.5, "bytes": 2_000_000}, {"bits": 4, "ppl": 14.25, "bytes": 1_000_000}]


@pytest.fixture
def ckpt(tiny_llama, tmp_path):
    abs_llm.quantize(tiny_llama, DoubleRoundingConfig(bits=8, candidate_bits=[8, 4, 2]))
    tiny_llama.save_pretrained(tmp_path / "q")
    return tmp_path / "q"


def test_model_card_content(ckpt, tmp_path):
    card = write_model_card(ckpt, ROWS, repo_id="me/tiny-switchable", out=tmp_path / "card").read_text()
    assert "pip install abs_llm" in card and "import abs_llm" in card and 'from_pretrained("me/tiny-switchable")' in card
    assert "| 4 | 14.250 | 1.0 MB |" in card and "![perplexity by bit-width](ppl.png)" in card
    assert '"quant_method": "double_rounding"' in card and "[8, 4, 2]" in card
    assert (tmp_path / "card" / "ppl.png").is_file()


