"""The Ray executor against a real local Ray cluster (tests/ray_cluster.py: ``ray start --head``
on 127.0.0.1, 1 CPU, shut down in teardown): a CPU demo run end to end with its events streamed
back into the local store, re-attaching after the local process 'restarts', stop, and the run's
worker killed on the cluster. Skipped, saying so, where the ray package is not installed.
The real CPU demo run (train + evaluate with torch) is ``-m slow``; the others run the small
stages of tests/test_runs_executor.py on the cluster (seconds each)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.errors import InputError
from engine.runs import ray_backend
from engine.runs.executor import Executor, pid_alive
from engine.runs.store import RunStore

pytest.importorskip("ray.job_submission", reason="the ray package is not installed (pip install 'tunequant[cluster]')")

ROOT = Path(__file__).resolve().parent.parent
HOOK = f"{ROOT / 'tests' / 'test_runs_executor.py'}:STAGES"      # small stages of its own (seconds)


def spec(name="ray", steps=3, **kw):
    return {"name": name, "model": "demo:micro-llama", "strategy": "lora",
            "dataset": {"demo": "tickets", "max_examples": 60},
            "train": {"steps": steps, "batch_size": 4, "seq_len": 64, "learning_rate": 5e-3, "lora_rank": 8,
                      "grad_ckpt": False},
            "evaluate": {"max_examples": 4, "prompt_len": 16, "new_tokens": 4, "task_accuracy": False,
                         "latency": False, "before_and_after": False}, "device": "cpu", **kw}


@pytest.fixture(scope="module")
def cluster(micro_home, tmp_path_factory):
    from tests.ray_cluster import Cluster
    c = Cluster()
    with pytest.MonkeyPatch.context() as mp:
        # the cluster's runs keep their store and the demo model cache in the session's home
        mp.setenv("TUNEQUANT_RAY_HOME", os.environ["TUNEQUANT_HOME"])
        mp.setenv("TUNEQUANT_RAY_PYTHON", sys.executable)
        try:
            yield c.start()
        finally:
            c.stop()


@pytest.fixture
def ex(tmp_path, cluster):
    e = Executor(RunStore(tmp_path / "runs.sqlite", tmp_path / "runs"))
    yield e
    e.close()
    for run in e.store.active_runs():
        e.stop(run["id"], wait=True)


def wait_for(ex, run_id, type, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        evs = ex.store.events(run_id, types=(type,))
        if evs:
            return evs
        run = ex.get_run(run_id)
        assert run["status"] in ("queued", "running"), (run["status"], run["reason"])
        time.sleep(0.3)
    raise AssertionError(f"no {type} event in {timeout} s")


def contiguous(ex, run_id) -> list[dict]:
    evs = ex.store.events(run_id)
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
    return evs


def test_bad_targets_are_refused_before_anything_is_sent(tmp_path, micro_home):
    ex = Executor(RunStore(tmp_path / "runs.sqlite", tmp_path / "runs"))
    with pytest.raises(InputError, match="needs --address") as e:
        ex.launch(spec(), executor="ray")
    assert e.value.field == "address"
    from tests.ray_cluster import free_ports
    with pytest.raises(InputError, match="no Ray cluster answers at") as e:
        ex.launch(spec(), executor="ray", address=f"http://127.0.0.1:{free_ports(1)[0]}")
    with pytest.raises(InputError, match="is a folder on this machine"):
        ray_backend.stage(tmp_path, __import__("engine.spec.run", fromlist=["RunSpec"]).RunSpec.parse(
            {**spec(), "model": str(tmp_path)}))
    assert ex.store.list_runs() == []


@pytest.mark.slow
def test_a_cpu_demo_run_on_the_cluster_streams_back(ex, cluster):
    rid = ex.launch(spec(), executor="ray", address=cluster)
    run = ex.wait(rid, timeout=600)
    assert run["status"] == "finished", (run["reason"], (Path(run["workdir"]) / "worker.log").read_text()[-3000:])
    assert run["executor"]["kind"] == "ray" and run["executor"]["job_id"] == rid and run["pid"] is None
    evs = contiguous(ex, rid)
    types = [e["type"] for e in evs]
    assert types[0] == "queued" and types[-1] == "finished" and types.count("finished") == 1
    assert types.count("queued") == 1 and "submitted to the Ray cluster" in evs[1]["message"]
    steps = [e for e in evs if e["type"] == "step"]
    assert steps[-1]["step"] == 3 and steps[-1]["loss"] > 0
    assert [e["stage"] for e in evs if e["type"] == "stage_finished"] == ["train", "evaluate"]
    # the run's columns came back: what it measured, where, and the planner's estimate there
    assert run["result"]["eval"]["after"]["perplexity"] > 1 and run["machine"]["cpu_count"] >= 1
    assert run["estimate"]["train"]["peak_allocated_bytes"] > 0 and run["versions"]["torch"]
    # what was sent: the project's engine and presets and the run spec, nothing else
    sent = {p.name for p in (Path(run["workdir"]) / "ray-job").iterdir()}
    assert sent == {"engine", "presets", "run.json"}
    assert "worker" in (Path(run["workdir"]) / "worker.log").read_text()      # the cluster's worker.log
    # following again changes nothing (each remote event is copied once)
    assert ray_backend.sync(ex.store, rid) and len(ex.store.events(rid)) == len(evs)


def test_reattaches_after_a_restart(ex, cluster):
    rid = ex.launch(spec("slow", steps=40), executor="ray", address=cluster, stages=HOOK)
    wait_for(ex, rid, "step")
    ex.close()                                   # the app goes away; the job goes on on the cluster
    time.sleep(2)
    before = len(ex.store.events(rid))
    again = Executor(RunStore(ex.store.path, ex.store.runs_dir))       # the app starts again
    try:
        run = again.wait(rid, timeout=300)
    finally:
        again.close()
    assert run["status"] == "finished", run["reason"]
    evs = contiguous(again, rid)
    assert len(evs) > before
    steps = [e["step"] for e in evs if e["type"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == 40                # none lost, none twice


def _remote_worker_pid(ex, rid) -> int:
    return wait_for(ex, rid, "started")[0]["pid"]


def test_stop_cancels_the_job(ex, cluster):
    rid = ex.launch(spec("slow", steps=3000), executor="ray", address=cluster, stages=HOOK)
    wait_for(ex, rid, "step")
    pid = _remote_worker_pid(ex, rid)
    assert pid_alive(pid, rid)
    run = ex.stop(rid, wait=True)
    assert run["status"] == "stopped", run["reason"]
    deadline = time.monotonic() + 30
    while pid_alive(pid, rid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(pid, rid)                # the run's worker on the cluster is gone too
    msgs = [e.get("message") for e in ex.store.events(rid, types=("log",))]
    assert "stop requested" in msgs


def test_a_worker_killed_on_the_cluster_fails_the_run(ex, cluster):
    rid = ex.launch(spec("slow", steps=3000), executor="ray", address=cluster, stages=HOOK)
    wait_for(ex, rid, "step")
    os.kill(_remote_worker_pid(ex, rid), signal.SIGKILL)
    run = ex.wait(rid, timeout=120)
    assert run["status"] == "failed"
    assert run["reason"].startswith("worker process died (signal 9, SIGKILL)")
    err = ex.store.events(rid, types=("error",))[-1]
    assert err["kind"] == "worker-died"


def test_cli_run_on_the_cluster(tmp_path, cluster):
    cfg = tmp_path / "run.yaml"
    import yaml
    cfg.write_text(yaml.safe_dump(spec("cli", steps=3)))
    env = dict(os.environ, TUNEQUANT_DB=str(tmp_path / "cli.sqlite"))
    out = subprocess.run([sys.executable, "-m", "engine", "run", "--config", str(cfg), "--executor", "ray",
                          "--address", cluster, "--stages", HOOK, "--json"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    import json
    assert out.returncode == 0, out.stderr[-2000:]
    rep = json.loads(out.stdout)
    assert rep["status"] == "finished" and [s["stage"] for s in rep["stages"]] == ["train", "evaluate"]
