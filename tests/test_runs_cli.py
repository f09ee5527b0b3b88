"""``python -m engine run|runs`` as a user calls it: real processes, a real store in a temp home.

The run's stages are the small ones of tests/test_runs_executor.py (``--stages`` hook); the
CLI, the executor, the worker process and the store are the real ones.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import yaml

from engine.runs import executor

ROOT = Path(__file__).resolve().parent.parent
HOOK = f"{ROOT / 'tests' / 'test_runs_executor.py'}:STAGES"
# a stop ends within the executor's escalation (stop flag, SIGTERM after GRACE_S, SIGKILL after TERM_S)
# plus the CLI's own exit; 30 s was shorter than that escalation and failed CI on a loaded machine
STOP_BOUND_S = executor.GRACE_S + executor.TERM_S + 30


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


def cli(home, *args, timeout=120):
    env = dict(os.environ, TUNEQUANT_HOME=str(home))
    env.pop("TUNEQUANT_DB", None)
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def config(tmp_path, file="cfg", **spec):
    data = {"name": "", "model": "tiny-test", "strategy": "lora", "device": "cpu", "train": {"steps": 3}, **spec}
    path = tmp_path / f"{file}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def wait_running(home, bg, within_s: float = 120) -> str:
    """The id of the run the background `engine run` started, once its worker is running (a loaded
    2-core machine starts workers slowly); if the CLI ended first, its output says why."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        runs = json.loads(cli(home, "runs", "list", "--status", "running", "--json").stdout)["runs"]
        if runs:
            return runs[0]["id"]
        if bg.poll() is not None:
            out, err = bg.communicate()
            pytest.fail(f"`engine run` ended (exit {bg.returncode}) before its run was running:\n{out}\n{err}")
        time.sleep(0.2)
    listed = cli(home, "runs", "list", "--json").stdout
    pytest.fail(f"no run was running after {within_s:.0f} s; the store holds: {listed}")


def test_run_json_prints_the_finished_run(tmp_path, home):
    out = cli(home, "run", "--config", str(config(tmp_path)), "--json", "--stages", HOOK)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""                                   # --json: no progress lines
    run = json.loads(out.stdout)
    assert run["status"] == "finished" and run["reason"] is None and run["id"].startswith("r-")
    assert [s["stage"] for s in run["stages"]] == ["train", "evaluate"]
    for s in run["stages"]:
        assert s["peak_mem_bytes"] > 0 and s["duration_s"] >= 0 and s["mem_source"] == "cpu_peak_rss"
    assert run["eval"] == {"after": {"perplexity": 12.5, "accuracy": 0.75}}
    assert run["artifacts"] == [{"path": f"{run['workdir']}/adapter", "kind": "adapter"}]
    assert Path(run["artifacts"][0]["path"], "weights.bin").stat().st_size == 1000
    assert Path(home, "runs.sqlite").is_file() and Path(run["log"]).is_file()

    listed = json.loads(cli(home, "runs", "list", "--json").stdout)["runs"]
    assert [(r["id"], r["status"]) for r in listed] == [(run["id"], "finished")]
    shown = cli(home, "runs", "show", run["id"], "--json")
    assert shown.returncode == 0
    show = json.loads(shown.stdout)
    assert show["id"] == run["id"] and show["spec"]["strategy"] == "lora"
    assert show["events"]["by_type"]["step"] == 3 and show["events"]["last_step"]["step"] == 3
    assert [s["stage"] for s in show["events"]["stages"]] == ["train", "evaluate"]


def test_run_streams_progress_lines_to_stderr(tmp_path, home):
    out = cli(home, "run", "--config", str(config(tmp_path, strategy="qlora")), "--stages", HOOK)
    assert out.returncode == 0, out.stderr
    err = out.stderr
    for text in ("stage 1/3: quantize", "stage 2/3: train", "step 3/3  loss 2.0480", "eval after: perplexity 12.5",
                 "artifact (adapter):", "run finished"):
        assert text in err, (text, err)
    assert json.loads(out.stdout)["status"] == "finished"     # the human view is indented JSON


def test_runs_stop_stops_a_cli_run(tmp_path, home):
    env = dict(os.environ, TUNEQUANT_HOME=str(home))
    env.pop("TUNEQUANT_DB", None)                        # the same store `runs list` reads
    bg = subprocess.Popen([sys.executable, "-m", "engine", "run", "--config",
                           str(config(tmp_path, file="slow", name="slow", train={"steps": 500})),
                           "--json", "--stages", HOOK], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        run_id = wait_running(home, bg)
        stopped = cli(home, "runs", "stop", run_id, "--json")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert json.loads(stopped.stdout)["status"] == "stopped"
        out, _ = bg.communicate(timeout=STOP_BOUND_S)
        assert bg.returncode == 1
        run = json.loads(out)
        assert run["id"] == run_id and run["status"] == "stopped" and run["artifacts"][0]["kind"] == "checkpoint"
    finally:
        if bg.poll() is None:
            bg.kill()


def test_ctrl_c_during_run_stops_the_run(tmp_path, home):
    env = dict(os.environ, TUNEQUANT_HOME=str(home))
    env.pop("TUNEQUANT_DB", None)                        # the same store `runs list` reads
    bg = subprocess.Popen([sys.executable, "-m", "engine", "run", "--config",
                           str(config(tmp_path, name="slow", train={"steps": 500})), "--stages", HOOK],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_running(home, bg)
        time.sleep(0.3)
        bg.send_signal(signal.SIGINT)
        out, err = bg.communicate(timeout=STOP_BOUND_S)
        assert bg.returncode == 130, err
        assert json.loads(out)["status"] == "stopped" and "stopping run" in err
    finally:
        if bg.poll() is None:
            bg.kill()


@pytest.mark.parametrize("content,field,words", [
    (None, "config", "not found"),
    ("model: m\nstrategy: lora\ntrain: {batch_size: 0}\n", "train.batch_size", "greater than 0"),
    ("model: m\nstrategy: nope\n", "strategy", "known: bf16-baseline"),
    ("model: m\nstrategy: lora\ndevice: tpu\n", "device", "auto"),
    ("model: m\nstrategy: lora\nlearning_rate: 1\n", "learning_rate", "Extra inputs"),
    ("model: [unclosed\n", "config", "not valid YAML"),
])
def test_bad_configs_exit_2_naming_the_field(tmp_path, home, content, field, words):
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    out = cli(home, "run", "--config", str(path), "--json", "--stages", HOOK)
    assert out.returncode == 2, out.stdout + out.stderr
    err = json.loads(out.stdout)
    assert err["field"] == field and words in err["error"] and field.split(".")[-1] in err["error"] + field
    assert json.loads(cli(home, "runs", "list", "--json").stdout) == {"runs": []}      # nothing was recorded


def test_unknown_run_ids_exit_2(home):
    for args in (("runs", "show", "r-nope", "--json"), ("runs", "stop", "r-nope")):
        out = cli(home, *args)
        assert out.returncode == 2 and "unknown run id 'r-nope'" in json.loads(out.stdout)["error"]
