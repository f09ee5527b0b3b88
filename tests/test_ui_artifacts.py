"""Runs screen, artifacts: the CLI's list (engine.runs.artifacts) as rows with runtime and size, a
download of only the run's own artifacts inside the workspace (a folder as a zip), and the push
through the CLI's function: offline it says nothing was uploaded and the token never shows; in the
public demo the server's token is not lent."""
import zipfile
from pathlib import Path

import pytest

from ui import artifacts as UA


@pytest.fixture
def ws(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("TUNEQUANT_HOME", str(home))
    monkeypatch.delenv("TUNEQUANT_PUBLIC_DEMO", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    return home


def _run(root: Path, outside: Path | None = None):
    g = root / "runs" / "r-1" / "export-gguf" / "m-q4_k_m.gguf"
    g.parent.mkdir(parents=True)
    g.write_bytes(b"GGUF" + b"\0" * 3000)
    v = root / "runs" / "r-1" / "export-vllm"
    v.mkdir()
    (v / "config.json").write_text("{}")
    (v / "vllm_manifest.json").write_text('{"quantization": "gptq_marlin"}')
    rt = {"runtime": "llama.cpp", "format": "gguf-q4_k_m", "role": "deploy", "path": str(g), "perplexity": 12.5,
          "decode_tokens_per_s": 80.0, "size_on_disk_bytes": 3004}
    arts = [{"path": str(g), "kind": "export:gguf-q4_k_m"}, {"path": str(v), "kind": "export:gptq-4bit"},
            {"path": str(root / "gone"), "kind": "model"}]
    if outside:
        arts.append({"path": str(outside), "kind": "export:gguf-f16"})
    return {"id": "r-1", "name": "demo", "strategy": "lora-merge-gguf-q4_k_m", "model": "demo:tiny-llama",
            "device": "cpu", "status": "finished", "spec": {"dataset": {"demo": "tickets"}},
            "result": {"artifacts": arts, "stages": [{"stage": "evaluate", "result": {"runtimes": [rt]}}],
                       "eval": {"after": {"perplexity": 12.0}, "llama.cpp:gguf-q4_k_m": rt}}}


def test_rows_are_the_clis_list_with_runtime_size_and_measurement(ws):
    from engine.runs import artifacts as A
    run = _run(ws)
    rows = UA.table(run)
    assert [r[2] for r in rows] == [a["kind"] for a in A.artifacts(run)]
    g, v, gone = rows
    assert g[1:6] == ["m-q4_k_m.gguf", "export:gguf-q4_k_m", "llama.cpp", "gguf-q4_k_m", "3 KiB"]
    assert g[6] == "perplexity 12.500, decode 80.0 tok/s" and g[7] == "yes"
    assert v[1] == "export-vllm/" and v[3] == "vllm" and gone[7] == "gone"
    assert [i for _, i in UA.choices(run)] == [0, 1]                  # only what is still on disk
    assert "runs artifacts r-1" in UA.summary(run)
    assert UA.table(None) == [] and "no artifacts" in UA.summary({**run, "result": {}})


def test_download_serves_the_runs_own_artifacts_inside_the_workspace(ws, tmp_path):
    outside = tmp_path / "secret.gguf"
    outside.write_bytes(b"not yours")
    run = _run(ws, outside)
    path, msg = UA.download(run, 0)
    assert Path(path).read_bytes() == Path(UA.listed(run)[0]["path"]).read_bytes() and "ready" in msg
    assert Path(path).parent.parent == UA._serve_folder()            # a folder Gradio serves (the temp dir)
    z, msg = UA.download(run, 1)
    assert z.endswith("export-vllm.zip") and "zip" in msg
    assert sorted(zipfile.ZipFile(z).namelist()) == ["config.json", "vllm_manifest.json"]
    for bad in (2, 3, 9, -1, "x", None):       # gone, outside the workspace, not an index of the run
        path, msg = UA.download(run, bad)
        assert path is None and "tq-error" in msg, bad
    assert "outside the workspace" in UA.download(run, 3)[1]


def test_push_goes_through_the_clis_function_and_never_shows_the_token(ws, monkeypatch):
    run = _run(ws)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "no Hugging Face write token" in UA.push(run, "me/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = UA.push(run, "me/model", token="hf_typedtokentyped123")
    assert "nothing was uploaded" in msg and "hf_typedtokentyped123" not in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")          # nothing listens: no network
    monkeypatch.setenv("HF_TOKEN", "weird-token-shape-0123456789")
    msg = UA.push(run, "me/model")
    assert "nothing was uploaded" in msg and "weird-token-shape-0123456789" not in msg
    assert "owner/name" in UA.push(run, "model", token="hf_x")
    # public demo: the server's HF_TOKEN is not lent to a visitor
    monkeypatch.setenv("TUNEQUANT_PUBLIC_DEMO", "1")
    msg = UA.push(run, "me/model")
    assert "type your own" in msg and "nothing was uploaded" in msg
    assert "attach" in UA.push(None, "me/model")
