"""The app's security holes of issue 16, each reproduced: server files read through upload
handlers, paths that escape the workspace, a public-demo visitor stopping another's run, and
access tokens of any length in what the app and the engine write.

API-level tests start the real app (app.py on 127.0.0.1, tests/browser_app.py) and call it like
an attacker: raw HTTP to Gradio's API with a FileData path of the attacker's choosing, and
gradio_client sessions for the stop test."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from engine.errors import InputError
from ui import calibration, common, runs, wizard
from browser_app import serve_app

ROOT = Path(__file__).resolve().parent.parent
HOOK = f"{ROOT / 'tests' / 'hostile_stages.py'}:STAGES"
FILEDATA = {"_type": "gradio.FileData"}


@pytest.fixture
def ws(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("TUNEQUANT_HOME", str(home))
    monkeypatch.setenv("TUNEQUANT_PUBLIC_DEMO", "0")
    return home


@pytest.fixture
def secret(tmp_path):
    """A server file outside the workspace and outside Gradio's upload folder."""
    p = tmp_path / "outside" / "secret.jsonl"
    p.parent.mkdir()
    p.write_text("".join(json.dumps({"text": f"TOPSECRET row {i}"}) + "\n" for i in range(300)))
    return p


def _copied(home: Path) -> list[Path]:
    return [p for p in (home / "uploads").rglob("*") if p.is_file()] if (home / "uploads").exists() else []


# ---- handlers: only Gradio's uploads and workspace files ---------------------------------------

def test_dataset_handler_refuses_a_server_path(ws, secret):
    msg, df, n, saved = wizard.dataset_check(str(secret))
    assert "not uploaded" in msg and df is None and saved is None
    assert "TOPSECRET" not in msg and _copied(ws) == []


def test_config_upload_refuses_a_server_path(ws, tmp_path):
    cfg = tmp_path / "outside-config.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "secret": "TOPSECRET"}))
    with pytest.raises(InputError, match="not uploaded"):
        wizard.scenario_from_form({**wizard.DEFAULT_FORM, "source": wizard.SRC_UPLOAD, "config_file": str(cfg)})
    assert _copied(ws) == []


def test_calibration_import_refuses_a_server_path(ws, tmp_path):
    src = tmp_path / "records.json"
    src.write_text(json.dumps({"records": []}))
    _, msg = calibration.import_upload(str(src))
    assert "not uploaded" in msg and "nothing was imported" in msg


def test_an_upload_in_gradios_folder_is_still_accepted(ws, tmp_path, monkeypatch, secret):
    up = tmp_path / "gradio-uploads"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(up))
    f = up / "abc123" / "data.jsonl"
    f.parent.mkdir(parents=True)
    f.write_bytes(secret.read_bytes())
    msg, df, n, saved = wizard.dataset_check(str(f))
    assert n == 300 and saved and Path(saved).is_relative_to(ws)
    # a symlink inside the upload folder pointing out of it is refused
    link = up / "abc123" / "link.jsonl"
    link.symlink_to(secret)
    msg, df, n, saved = wizard.dataset_check(str(link))
    assert "not uploaded" in msg and saved is None


# ---- the API, as an attacker calls it ------------------------------------------------------------

def _call(url: str, name: str, data: list) -> str:
    r = httpx.post(url + f"gradio_api/call/{name}", json={"data": data}, timeout=60)
    r.raise_for_status()
    eid = r.json()["event_id"]
    return httpx.get(url + f"gradio_api/call/{name}/{eid}", timeout=120).text


@pytest.mark.slow        # starts the app (~15 s); Gradio 6 refuses these paths itself too
def test_api_endpoints_never_read_a_server_file(tmp_path, secret):
    """/dataset_uploaded, /edit_config_file (the config.json upload, recomputed) and /cal_import with a FileData
    path of the caller's choosing: the file is not shown, not copied, not imported."""
    home = tmp_path / "apphome"
    home.mkdir()
    cfg = secret.parent / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "note": "TOPSECRET"}))
    with serve_app(home, env={"TUNEQUANT_PUBLIC_DEMO": "1"}) as app:
        u = app["url"]
        for path in (str(secret), f"/tmp/gradio/../..{secret}", str(home / "app.log")):
            out = _call(u, "dataset_uploaded", [{"path": path, "meta": FILEDATA}, 100])
            assert "TOPSECRET" not in out
        from engine.charts import MEMORY_VIEWS
        _call(u, "edit_source", [wizard.SRC_UPLOAD, MEMORY_VIEWS[0], []])
        out = _call(u, "edit_config_file", [{"path": str(cfg), "meta": FILEDATA}, MEMORY_VIEWS[0], []])
        assert "event: error" in out or "not uploaded" in out       # refused by Gradio, or by the handler
        assert "TOPSECRET" not in out
        out = _call(u, "cal_import", [{"path": str(secret), "meta": FILEDATA}])
        assert "TOPSECRET" not in out
    assert _copied(home) == []
    assert not (home / "calibration.json").exists()


# ---- confinement -----------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["engine/../../outside", "../outside", "models/../../x", "~/m", "/etc"])
def test_run_model_paths_stay_in_the_workspace(ws, model):
    form = {**runs.default_form(), "model": model, "run_preset": ""}
    form.setdefault("strategy", "qlora")
    with pytest.raises(InputError, match="outside the workspace"):
        runs.spec_from_form(form)


def test_a_symlink_out_of_the_workspace_is_refused(ws, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (ws / "models").mkdir()
    (ws / "models" / "m").symlink_to(tmp_path / "elsewhere")
    form = {**runs.default_form(), "model": "models/m", "run_preset": ""}
    form.setdefault("strategy", "qlora")
    with pytest.raises(InputError, match="outside the workspace"):
        runs.spec_from_form(form)
    form = {**runs.default_form(), "data_path": "models/m/data.jsonl"}
    with pytest.raises(InputError, match="outside the workspace"):
        runs.spec_from_form(form)
    with pytest.raises(InputError, match="outside the workspace"):
        wizard.model_ref({"source": wizard.SRC_HUB, "hub_id": "engine/../../outside"})


def test_hub_ids_and_workspace_models_still_work(ws):
    (ws / "models" / "mine").mkdir(parents=True)
    assert common.user_model("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert common.user_model("demo:micro-llama") == "demo:micro-llama"
    assert common.user_model("llama-3.1-8b") == "llama-3.1-8b"
    assert common.user_model("models/mine") == str(ws / "models" / "mine")


# ---- public demo: stop only your own run -----------------------------------------------------------

def _launch_values(name: str) -> list:
    form = {"run_preset": "", "name": name, "strategy": "lora", "model": "demo:micro-llama", "data_demo": "tickets",
            "data_path": "", "device": "cpu", "steps": 300, "learning_rate": 0, "batch_size": 0, "seq_len": 0,
            "lora_rank": 0, "bits": "catalog default", "group_size": 0, "calibration_samples": 0, "eval_examples": 0}
    return [form[k] for k in runs.LAUNCH_FIELDS]


@pytest.mark.slow        # starts the app and a run (~15 s); the rule itself: test_public_demo_admin_token_...
def test_public_demo_visitor_cannot_stop_anothers_run(tmp_path):
    from gradio_client import Client
    home = tmp_path / "apphome"
    home.mkdir()
    with serve_app(home, env={"TUNEQUANT_PUBLIC_DEMO": "1", "TUNEQUANT_STAGES": HOOK,
                              "TUNEQUANT_ADMIN_TOKEN": "admin-secret-123"}) as app:
        owner = Client(app["url"], verbose=False)
        out = owner.predict(*_launch_values("slow"), api_name="/do_launch")
        run_id = out[-1]
        assert run_id and run_id.startswith("r-"), out[0]
        visitor = Client(app["url"], verbose=False)
        visitor.predict(run_id, api_name="/do_attach")
        msg = visitor.predict(api_name="/do_stop")[0]
        assert "another visitor" in msg
        time.sleep(1.0)
        from engine.runs.store import RunStore
        store = RunStore(home / "runs.sqlite")
        assert store.get_run(run_id)["status"] in ("queued", "running")
        assert not store.stop_requested(run_id)
        admin = Client(app["url"], verbose=False, headers={runs.ADMIN_HEADER: "wrong"})
        admin.predict(run_id, api_name="/do_attach")
        assert "another visitor" in admin.predict(api_name="/do_stop")[0]
        msg = owner.predict(api_name="/do_stop")[0]
        assert "stop requested" in msg
        assert store.stop_requested(run_id)


def test_public_demo_admin_token_stops_any_run(ws, monkeypatch):
    monkeypatch.setenv("TUNEQUANT_PUBLIC_DEMO", "1")
    monkeypatch.setenv("TUNEQUANT_ADMIN_TOKEN", "tok-1")
    runs._OWNERS["r-x"] = "session-a"
    assert runs.may_stop("r-x", "session-a")
    assert not runs.may_stop("r-x", "session-b")
    assert not runs.may_stop("r-x", None, "tok-2")
    assert runs.may_stop("r-x", "session-b", "tok-1")
    monkeypatch.setenv("TUNEQUANT_PUBLIC_DEMO", "0")
    assert runs.may_stop("r-x", "session-b")


# ---- tokens ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tok", ["hf_a1", "hf_abc", "hf_" + "x" * 7, "hf_" + "Ab3" * 20])
def test_every_hf_token_length_is_masked(tok):
    assert tok not in common.redact(f"token {tok}.") and tok not in common.redact(f"x={tok}")
    from engine.secrets_mask import redact_tokens
    assert tok not in redact_tokens(json.dumps({"m": f"with {tok}"}))
    assert "hf_hub_download" in common.redact("hf_hub_download failed")


def test_prose_after_token_is_not_masked_but_values_are():
    """The push refusal says "no Hugging Face token: set HF_TOKEN ..." (engine/runs/artifacts.py); the bearer /
    token= pattern used to turn it into "token: *** HF_TOKEN". A word is prose; anything shaped like a value is not."""
    from engine.secrets_mask import redact
    msg = "no Hugging Face token: set HF_TOKEN (a write token) to push"
    assert redact(msg) == msg and redact("token: required") == "token: required"
    for value in ("s3cr3tvalue", "eyJhbGciOi.J9-x_y", "AbCdEfGhIj", "abcdefghijklmnopqrst", "hunter2"):
        for text in (f"token={value}", f"token: {value}", json.dumps({"token": value}), f"TOKEN = '{value}'"):
            assert value not in redact(text), text
    assert redact("Authorization: Bearer abcdef") == "Authorization: Bearer ***"     # a header's value always


def test_the_records_own_keys_are_not_masked():
    """A key of the record is never a token: the planner's estimate keeps its hf_generate (the store
    used to save it as "hf_***", and the estimate read back had no decode figures); values still are."""
    from engine.secrets_mask import redact_tokens
    rec = {"estimate": {"infer": {"hf_generate": {"decode_tokens_per_s": 41.7}}}, "note": "hf_Zq9short leaked"}
    back = json.loads(redact_tokens(json.dumps(rec)))
    assert back["estimate"]["infer"]["hf_generate"] == {"decode_tokens_per_s": 41.7}
    assert back["note"] == "hf_*** leaked"


def test_a_planted_token_is_in_no_file_the_engine_writes(ws, monkeypatch, tmp_path):
    """HF_TOKEN (a short one) in the environment; a stage prints it, logs it and fails with it; two
    runs carry it in their names. Nothing written afterwards holds it: the store, events.jsonl,
    worker.log, the scenario report (with every run) and the compare exports (CSV, JSON)."""
    tok = "hf_Zq9short"
    monkeypatch.setenv("HF_TOKEN", tok)
    from engine.runs import api
    monkeypatch.setattr(api, "_executor", None)          # restored after the test (use_store sets it)
    api.use_store(ws / "runs.sqlite")
    spec = {"model": "tiny-test", "strategy": "lora", "device": "cpu", "train": {"steps": 2}}
    leak = api.launch({**spec, "name": f"leak {tok}"}, stages=HOOK)
    ok = [api.launch({**spec, "name": f"fine {tok} {i}"}, stages=HOOK) for i in range(2)]
    runs_ = [api.wait(r, timeout=120) for r in [leak] + ok]
    assert runs_[0]["status"] == "failed" and "hub refused token" in runs_[0]["reason"]
    assert [r["status"] for r in runs_[1:]] == ["finished", "finished"]
    from ui import compare, report
    out = compare.render(ok)
    exports = [Path(p) for p in out[-2:] if p]
    assert len(exports) == 2
    path, msg = report.write(wizard.scenario_from_form(wizard.DEFAULT_FORM), "html", "all")
    assert path, msg
    written = [p for p in ws.rglob("*") if p.is_file()] + exports + [Path(path)]
    assert any(p.name == "worker.log" for p in written) and any(p.name == "events.jsonl" for p in written)
    for p in written:
        assert tok.encode() not in p.read_bytes(), p
    assert "hf_***" in (Path(runs_[0]["workdir"]) / "worker.log").read_text()
