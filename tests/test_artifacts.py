"""A run's artifacts: listed with their runtime, downloadable (folders as zip), pushed to the Hub only
with a token and a network; offline the push says so, uploads nothing, and never shows the token."""
import zipfile

import pytest

from engine.errors import InputError
from engine.runs import artifacts as A


def _run(tmp_path):
    g = tmp_path / "export-gguf" / "m-q4_k_m.gguf"
    g.parent.mkdir()
    g.write_bytes(b"GGUF" + b"\0" * 60)
    v = tmp_path / "export-vllm"
    v.mkdir()
    (v / "config.json").write_text("{}")
    (v / "vllm_manifest.json").write_text('{"quantization": "gptq_marlin"}')
    (v / "model.safetensors").write_bytes(b"\1" * 100)
    rt = {"runtime": "llama.cpp", "format": "gguf-q4_k_m", "role": "deploy", "path": str(g), "perplexity": 12.5,
          "decode_tokens_per_s": 80.0, "size_on_disk_bytes": 64}
    return {"id": "r-1", "name": "demo", "strategy": "lora-merge-gguf-q4_k_m", "model": "demo:tiny-llama",
            "device": "cpu", "status": "finished", "spec": {"dataset": {"demo": "tickets"}},
            "estimate": {"infer": {"decode_tokens_per_s": 95.0, "weights_bytes": 2**21, "gpu": "cpu-x86-pytorch"}},
            "result": {"artifacts": [{"path": str(g), "kind": "export:gguf-q4_k_m"},
                                     {"path": str(v), "kind": "export:gptq-4bit"},
                                     {"path": str(tmp_path / "gone"), "kind": "model"}],
                       "stages": [{"stage": "evaluate", "result": {"runtimes": [rt]}}],
                       "eval": {"after": {"perplexity": 12.0, "accuracy": 1.0}, "llama.cpp:gguf-q4_k_m": rt}}}


def test_listed_with_runtime_and_downloadable(tmp_path):
    run = _run(tmp_path)
    got = {a["kind"]: a for a in A.artifacts(run)}
    g, v, gone = got["export:gguf-q4_k_m"], got["export:gptq-4bit"], got["model"]
    assert g["runtime"] == "llama.cpp" and g["format"] == "gguf-q4_k_m" and g["bytes"] == 64
    assert g["measured"] == {"perplexity": 12.5, "decode_tokens_per_s": 80.0}
    assert v["runtime"] == "vllm" and v["is_dir"] and v["bytes"] == 2 + 31 + 100
    assert not gone["exists"] and gone["runtime"] == "transformers"
    assert A.download_path(g["path"]) == g["path"]
    z = A.download_path(v["path"])
    assert z.endswith("export-vllm.zip")
    assert sorted(zipfile.ZipFile(z).namelist()) == ["config.json", "model.safetensors", "vllm_manifest.json"]
    with pytest.raises(InputError, match="not on this machine"):
        A.download_path(gone["path"])
    card = A.model_card(run, g)
    assert "lora-merge-gguf-q4_k_m" in card and "| gguf-q4_k_m (llama.cpp) | 12.5 |" in card and "95.0 tokens/s" in card


def test_push_needs_a_token_and_the_hub_and_never_shows_the_token(tmp_path, monkeypatch):
    run = _run(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(InputError, match="set HF_TOKEN"):
        A.push_to_hub(run, "me/model")
    monkeypatch.setenv("HF_TOKEN", "hf_secretsecret")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError) as e:
        A.push_to_hub(run, "me/model")
    assert "nothing was uploaded" in str(e.value) and "hf_secretsecret" not in str(e.value)
    with pytest.raises(InputError, match="owner/name"):
        A.push_to_hub(run, "model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")          # nothing listens: no network
    with pytest.raises(InputError) as e:
        A.push_to_hub(run, "me/model")
    assert "nothing was uploaded" in str(e.value) and "hf_secretsecret" not in str(e.value)
