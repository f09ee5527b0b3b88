"""Runs screen handlers against the real run engine: worker processes, SQLite store, events.

The run config the form builds is launched for real (``engine.runs.api.launch``); only the
stage bodies are this file's own (``STAGES`` below, loaded by the worker through the
``TUNEQUANT_STAGES`` hook), so the screen is tested independently of the training code.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from engine.errors import InputError
from ui import runs

HOOK = f"{Path(__file__).resolve()}:STAGES"


# -- stages run inside the worker process ---------------------------------------------------------
def _train(ctx):
    n = ctx.spec.train.steps or 5
    delay = 0.15 if "slow" in ctx.spec.name else 0.0
    loss = 3.0
    for i in range(n):
        if ctx.should_stop():
            ctx.emit("log", message=f"stop seen at step {i}")
            return {"steps": i, "stopped": True}
        time.sleep(delay)
        loss *= 0.9
        ctx.emit("step", step=i + 1, total=n, loss=loss, lr=ctx.spec.train.learning_rate, tokens_per_s=500.0 + i,
                 mem_bytes=2**30, eta_s=delay * (n - i - 1))
    return {"steps": n, "final_loss": loss}


def _evaluate(ctx):
    ctx.emit("eval", name="after", metrics={"perplexity": 11.0, "accuracy": 0.8})
    ctx.emit("metric", name="size_on_disk", value=12345, unit="bytes")
    ctx.emit("log", message="token hf_abcdefghijklmnopqrstuvwxyz1234 must never show")
    return {"ok": True}


def _noop(ctx):
    return {}


STAGES = {"train": _train, "evaluate": _evaluate, "merge": _noop, "quantize": _noop, "convert": _noop}


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path, monkeypatch):
    from engine.runs import api
    monkeypatch.setenv("TUNEQUANT_HOME", str(tmp_path / "ws"))
    monkeypatch.setenv("TUNEQUANT_STAGES", HOOK)
    monkeypatch.delenv("TUNEQUANT_PUBLIC_DEMO", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    api.use_store(tmp_path / "ws" / "runs.sqlite")
    yield api
    for r in api.list_runs():
        if r["status"] in runs.ACTIVE:
            api.stop(r["id"], wait=True, grace_s=2, term_s=2)
    api.use_store(None)


FORM = {"run_preset": "", "name": "ui test", "strategy": "lora", "model": "tiny-test", "device": "cpu",
        "steps": 6, "learning_rate": 0.001, "batch_size": 0, "seq_len": None, "lora_rank": 8,
        "bits": "catalog default", "group_size": 0, "calibration_samples": None, "eval_examples": 0,
        "data_demo": "", "data_path": ""}


def poll_until(view, pred, timeout=60):
    deadline = time.monotonic() + timeout
    run = None
    while time.monotonic() < deadline:
        view, run = runs.poll_view(view)
        if pred(view, run):
            return view, run
        time.sleep(0.1)
    raise AssertionError(f"condition not met; view status {view.get('status')}, seq {view.get('seq')}")


# -- the form and its preview ---------------------------------------------------------------------------
def test_form_to_spec_is_what_the_preview_shows(store):
    spec = runs.spec_from_form(FORM)
    assert spec == {"name": "ui test", "strategy": "lora", "model": "tiny-test", "device": "cpu",
                    "train": {"steps": 6, "learning_rate": 0.001, "lora_rank": 8}}   # zeros mean "default"
    text, msg = runs.spec_preview(FORM)
    assert yaml.safe_load(text) == spec and msg == ""


def test_preview_of_a_multi_process_run_shows_the_launch_command(store):
    text, msg = runs.spec_preview({"run_preset": "demo-lora-2proc"})
    assert yaml.safe_load(text)["resources"] == {"processes": 2}
    assert ("<code>python -m torch.distributed.run --standalone --nproc-per-node=2 --max-restarts=0 "
            "-m engine.runs.stages.rank RUN_WORKDIR/dist/job.json</code>") in msg
    assert "gloo" in msg


def test_ray_setting_sends_launches_to_the_cluster(store, monkeypatch):
    pytest.importorskip("ray.job_submission", reason="the ray package is not installed")
    from tests.ray_cluster import free_ports
    monkeypatch.setenv("TUNEQUANT_RAY_ADDRESS", f"http://127.0.0.1:{free_ports(1)[0]}")     # nobody there
    text, msg = runs.spec_preview(FORM)
    assert "runs as a job on the Ray cluster at" in msg
    rid, msg = runs.launch(FORM)
    assert rid is None and "no Ray cluster answers at" in msg
    assert store.list_runs() == []


def test_form_errors_name_the_field(store, tmp_path):
    with pytest.raises(InputError) as e:
        runs.spec_from_form({**FORM, "learning_rate": -1})
    assert e.value.field == "train.learning_rate"
    with pytest.raises(InputError, match="unknown strategy"):
        runs.spec_from_form({**FORM, "strategy": "magic"})
    with pytest.raises(InputError) as e:
        runs.spec_from_form({**FORM, "model": ""})
    assert e.value.field == "model"
    outside = tmp_path / "data.jsonl"
    outside.write_text("{}\n")
    with pytest.raises(InputError, match="outside the workspace"):
        runs.spec_from_form({**FORM, "data_path": str(outside)})
    text, msg = runs.spec_preview({**FORM, "learning_rate": -1})
    assert text == "" and "tq-error" in msg and "learning_rate" in msg


def test_run_presets_fill_the_form(store):
    presets = runs.run_presets()
    if not presets:
        pytest.skip("presets/runs not written yet")
    for name in presets:
        spec = runs.load_run_preset(name)
        form = {"run_preset": name, **runs.form_from_spec(spec)}
        built = runs.spec_from_form(form)
        assert built["strategy"] == spec["strategy"] and built["model"] == spec["model"], name
    assert list(presets)[0].startswith("demo-")          # CPU demos come first


def test_public_demo_allows_only_cpu_demo_runs(store, monkeypatch):
    monkeypatch.setenv("TUNEQUANT_PUBLIC_DEMO", "1")
    rid, msg = runs.launch({**FORM, "device": "cuda", "model": "demo:tiny"})
    assert rid is None and "GPU runs is off" in msg
    # "auto" would take a GPU where there is one: the config (and its preview) says cpu
    assert runs.spec_from_form({**FORM, "device": "auto", "model": "demo:tiny"})["device"] == "cpu"
    rid, msg = runs.launch({**FORM, "model": "meta-llama/Llama-3.1-8B"})
    assert rid is None and "demo models" in msg
    assert store.list_runs() == []


# -- launch, watch, re-attach, stop -----------------------------------------------------------------------
def test_launch_watch_and_reattach(store):
    rid, msg = runs.launch(FORM)
    assert rid, msg
    assert rid in msg and "tq-ok" in msg
    view, run = poll_until(runs.new_view(rid), lambda v, r: v["status"] == "finished")
    assert [p[0] for p in view["points"]] == [1, 2, 3, 4, 5, 6]
    assert view["points"][-1][1] == pytest.approx(3.0 * 0.9 ** 6)
    assert [s["stage"] for s in view["stages_done"]] == ["train", "evaluate"]
    assert all(s["duration_s"] is not None for s in view["stages_done"])
    rows = {(r["where"], r["metric"]): r["value"] for r in runs.metrics_rows(view)}
    assert rows[("after", "perplexity")] == "11" and rows[("evaluate", "size_on_disk")] == "12,345"
    log = "\n".join(view["log"])
    assert "stage 1/2: train" in log and "run finished" in log
    assert "hf_abcdefghij" not in log and "hf_***" in log            # tokens never shown
    html = runs.status_html(view, run)
    assert "data-status='finished'" in html and "lora" in html and "tiny-test" in html
    # a reload rebuilds the same view from seq 0
    again = runs.attach(rid)
    assert again["points"] == view["points"] and again["status"] == "finished" and again["seq"] == view["seq"]
    # polling again adds nothing; re-applying old events is harmless
    same, _ = runs.poll_view(again)
    assert same["seq"] == again["seq"] and same["points"] == again["points"]
    assert runs.apply_events(again, store.events(rid))["points"] == again["points"]
    # history lists it with its status; the picker too
    hist = runs.history_rows()
    assert hist[0]["run"] == rid and hist[0]["status"] == "finished" and hist[0]["strategy"] == "lora"
    assert runs.run_choices()[0][1] == rid
    fig = runs.loss_figure(view)
    assert fig.layout["uirevision"] == f"loss-{rid}" and fig.traces[0]["y"] == [p[1] for p in view["points"]]


def test_stop_a_running_run(store):
    rid, msg = runs.launch({**FORM, "name": "slow ui test", "steps": 400})
    assert rid, msg
    view, _ = poll_until(runs.new_view(rid), lambda v, r: len(v["points"]) >= 3)
    assert view["status"] == "running"
    html = runs.status_html(view, store.get_run(rid))
    assert "data-status='running'" in html and "ETA" in html
    out = runs.stop(rid)
    assert "stop requested" in out
    view, run = poll_until(view, lambda v, r: v["status"] == "stopped", timeout=40)
    assert run["status"] == "stopped"
    assert len(view["points"]) < 400
    assert "stop seen" in "\n".join(view["log"]) or "stop requested" in "\n".join(view["log"])
    assert runs.stop(None).startswith("<div class=\"tq-error\"")


def test_matrix_strategy_fills_the_launch_form(store):
    f = runs.form_for_strategy("full-finetune", {"model": "llama-3.2-1b", "seq_len": 1024})
    demo = [n for n, p in runs.run_presets().items()
            if n.startswith("demo-") and yaml.safe_load(p.read_text()).get("strategy") == "full-finetune"]
    if demo:
        assert f["run_preset"] == demo[0]
    else:
        assert f["strategy"] == "full-finetune" and f["model"] == "llama-3.2-1b" and f["seq_len"] == 1024
        assert f["device"] == "auto"


def test_matrix_strategy_form_has_only_what_its_stages_use():
    from engine.runs import evidence
    from ui import wizard
    scn = wizard.scenario_from_form(wizard.DEFAULT_FORM)
    res = evidence.recommend(scn)
    f, note = runs.from_matrix("ptq-awq-4bit", scn, res)
    assert set(f) == set(runs.LAUNCH_FIELDS)                       # every field: nothing of the last strategy stays
    assert all(f[k] is None for k in runs.TRAIN_FIELDS)
    assert f["model"] == "llama-3.1-8b" and f["data_demo"] == "python-docs" and f["bits"] == "4"
    spec = runs.spec_from_form({**f, "steps": 150, "lora_rank": 16})  # fields it never reads are ignored
    assert set(spec.get("train") or {}) <= {"seq_len"} and spec["dataset"] == {"demo": "python-docs"}
    assert spec["quantize"]["group_size"] == 128 and "not feasible" not in note
    assert runs.field_visibility("ptq-awq-4bit")["steps"] is False
    assert runs.field_visibility("qlora")["lora_rank"] and not runs.field_visibility("full-finetune")["lora_rank"]
    _, note = runs.from_matrix("full-finetune", scn, res)
    assert "not feasible" in note and "GB" in note
    f, note = runs.from_matrix("ptq-awq-4bit", {**scn, "model": {"params_b": 8, "family": "llama-3"}}, res)
    assert f["model"] == "" and "missing: a model" in note


def test_matrix_row_launches_the_training_configuration_the_advisor_found():
    """LLaMA 30B (33B) QLoRA on one RTX 4090: the row fits at a searched configuration (not batch 4);
    the launch form's run config (what the preview shows and Launch sends) trains exactly with it."""
    from engine.advisor import recommend
    scn = {"model": "llama-1-30b", "task": "chat", "examples": 5000, "measured": "none",
           "hardware": {"gpu": "rtx-4090-24gb"}}
    res = recommend(scn, what_if=False, runs=[])
    row = next(r for r in res["ranked"] if r["strategy"] == "gptq-qlora")
    assert row["feasible"] and row["run_config"]["train"]["batch_size"] < 4
    f = runs.form_for_strategy("gptq-qlora", scn, res)
    assert not f.get("run_preset")                   # no CPU demo of gptq-qlora: the scenario's model
    spec = runs.spec_from_form(f)
    assert spec["train"] == {k: v for k, v in row["run_config"]["train"].items()}
    preview, _ = runs.spec_preview(f)
    assert f"grad_accum: {row['run_config']['train']['grad_accum']}" in preview
    with pytest.raises(InputError, match="train_config"):
        runs.spec_from_form({**f, "train_config": "[1, 2]"})
