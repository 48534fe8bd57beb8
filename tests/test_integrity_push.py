"""``save_pretrained(..., push_to_hub=True)`` uploads exactly what a normal save writes (digests, loader shim), with
the Hub calls patched out."""

import shutil
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM

import abs_llm
from abs_llm import DoubleRoundingConfig


def test_push_to_hub_uploads_what_a_normal_save_writes(tiny_llama, tmp_path, monkeypatch, tokens):
    import transformers.utils.hub as hf_hub

    abs_llm.quantize(tiny_llama, DoubleRoundingConfig(bits=4, candidate_bits=[8, 4, 2]))
    tiny_llama.save_pretrained(tmp_path / "local")
    calls = {}

    def create_repo(repo_id, **kw):
        calls["create_repo"] = (repo_id, kw)
        return SimpleNamespace(repo_id=f"me/{repo_id}")

    def upload(self, working_dir, repo_id, files_timestamps, **kw):
        calls["upload"] = (repo_id, kw)
        shutil.copytree(working_dir, tmp_path / "uploaded")  # what would have gone to the Hub

    class Card:
        def save(self, path):
            open(path, "w").write("card")

    monkeypatch.setattr(hf_hub, "hf_api", lambda: SimpleNamespace(create_repo=create_repo))
    monkeypatch.setattr(hf_hub, "create_and_tag_model_card", lambda *a, **k: Card())
    monkeypatch.setattr(type(tiny_llama), "_upload_modified_files", upload)
    tiny_llama.save_pretrained(tmp_path / "pushed", push_to_hub=True, private=True, commit_message="m")
    assert calls["create_repo"] == ("pushed", {"exist_ok": True, "token": None, "private": True})
    assert calls["upload"][0] == "me/pushed" and calls["upload"][1]["commit_message"] == "m"
    up = tmp_path / "uploaded"
    local = {p.name for p in (tmp_path / "local").iterdir()}
    assert {p.name for p in up.iterdir()} == local | {"README.md"}
    assert "modeling_abs_llm.py" in local  # the remote-code shim
    assert (up / "model.safetensors").read_bytes() == (tmp_path / "local" / "model.safetensors").read_bytes()
    assert b"abs_llm.digests" in (up / "model.safetensors").read_bytes()[:65536]
    back = AutoModelForCausalLM.from_pretrained(up)  # digests verified: abs_llm accepts its own upload
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, tiny_llama(tokens).logits)
