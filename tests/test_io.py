"""Model card and Hub push: dry run writes the exact upload folder; no token means nothing is uploaded."""

import json

import pytest

import abs_llm
from abs_llm import DoubleRoundingConfig
from abs_llm.cli import main
from abs_llm.io import write_model_card

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


def test_push_dry_run_writes_exact_folder(ckpt, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda *a, **k: pytest.fail("uploaded"))
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    out = tmp_path / "upload"
    assert main(["push", str(ckpt), "--repo-id", "me/tiny", "--dry-run", "--out", str(out),
                 "--results", str(tmp_path / "rows.json")]) == 0
    assert "nothing uploaded" in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert {p.name for p in ckpt.iterdir()} | {"README.md", "ppl.png"} == files
    assert (out / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    assert "modeling_abs_llm.py" in files  # the trust_remote_code shim travels with the upload


def test_push_bad_inputs(ckpt, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda *a, **k: pytest.fail("network"))
    assert main(["push", str(ckpt), "--repo-id", "me/tiny"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    assert main(["push", str(ckpt), "--repo-id", "me/tiny", "--dry-run"]) == 2
    assert "--out" in capsys.readouterr().err
    (tmp_path / "fp").mkdir()
    (tmp_path / "fp" / "config.json").write_text("{}")
    assert main(["push", str(tmp_path / "fp"), "--repo-id", "me/x", "--dry-run", "--out", str(tmp_path / "u")]) == 2
    assert "not a switchable" in capsys.readouterr().err
