"""The run store (SQLite, WAL, append-only events), event checks and fault classification."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from engine.runs.api import events as api_events
from engine.runs.events import check, line, summary
from engine.runs.faults import classify, exit_reason, suggestions
from engine.runs.store import RunStore
from engine.spec.run import RunSpec

ROOT = Path(__file__).resolve().parent.parent
SPEC = {"name": "t", "model": "m", "strategy": "lora"}


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "runs.sqlite")


def test_runs_roundtrip_and_order(store):
    a = store.create_run("r-a", SPEC, "cpu")
    store.create_run("r-b", {**SPEC, "strategy": "qlora"}, "cuda", stages_hook="x:STAGES")
    assert a["status"] == "queued" and a["spec"] == SPEC and Path(a["workdir"]).is_dir()
    store.update_run("r-a", versions={"torch": "2.13"}, machine={"cpu_count": 2}, estimate={"train": {"error": "x"}})
    got = store.get_run("r-a")
    assert got["versions"] == {"torch": "2.13"} and got["machine"] == {"cpu_count": 2}
    assert [r["id"] for r in store.list_runs()] == ["r-b", "r-a"]           # newest first
    assert [r["id"] for r in store.list_runs(status="queued", limit=1)] == ["r-b"]
    assert store.get_run("nope") is None
    assert store._db().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ValueError):
        store.update_run("r-a", status="finished")                          # status only through finish()


def test_lifecycle_sets_status_once(store):
    store.create_run("r-1", SPEC, "cpu")
    assert store.request_stop("r-1") and store.stop_requested("r-1")
    assert store.set_running("r-1", 1234)
    assert not store.set_running("r-1", 1234)                               # only from queued
    assert store.finish("r-1", "stopped", "stopped on request", result={"stages": []})
    assert not store.finish("r-1", "failed", "late")                       # the first to end it wins
    run = store.get_run("r-1")
    assert (run["status"], run["reason"], run["result"]) == ("stopped", "stopped on request", {"stages": []})
    assert run["ended"] >= run["started"] >= run["created"]
    assert [e["type"] for e in store.events("r-1")] == ["finished"]
    assert not store.request_stop("r-1") and not store.set_running("r-1", 1)


def test_events_are_sequenced_filtered_and_copied_to_jsonl(store):
    store.create_run("r-1", SPEC, "cpu")
    for i in range(5):
        assert store.append_event("r-1", "step", {"step": i + 1, "loss": 1.0 / (i + 1)}) == i + 1
    store.append_event("r-1", "log", {"message": "hello"})
    evs = store.events("r-1")
    assert [e["seq"] for e in evs] == [1, 2, 3, 4, 5, 6]
    assert evs[2] == {"seq": 3, "ts": evs[2]["ts"], "type": "step", "step": 3, "loss": pytest.approx(1 / 3)}
    assert [e["seq"] for e in store.events("r-1", after_seq=4)] == [5, 6]
    assert [e["seq"] for e in store.events("r-1", after_seq=1, limit=2)] == [2, 3]
    assert [e["type"] for e in store.events("r-1", types=("log",))] == ["log"]
    assert store.last_seq("r-1") == 6 and store.event_counts("r-1") == {"step": 5, "log": 1}
    jl = [json.loads(x) for x in (store.workdir("r-1") / "events.jsonl").read_text().splitlines()]
    assert [(x["seq"], x["type"], x["payload"]) for x in jl] == \
        [(e["seq"], e["type"], {k: v for k, v in e.items() if k not in ("seq", "ts", "type")}) for e in evs]


def test_events_and_runs_cannot_be_rewritten(store):
    store.create_run("r-1", SPEC, "cpu")
    store.append_event("r-1", "log", {"message": "kept"})
    db = store._db()
    for sql in ("UPDATE events SET type='x'", "DELETE FROM events", "DELETE FROM runs"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only|never deleted"):
            db.execute(sql)
    assert store.events("r-1")[0]["message"] == "kept"


def test_concurrent_writers_get_gap_free_sequences(store):
    """Three processes append to the same run at once (the worker, a stopper, a watcher)."""
    store.create_run("r-1", SPEC, "cpu")
    code = ("import sys; from engine.runs.store import RunStore; s = RunStore(sys.argv[1])\n"
            "for i in range(60): s.append_event('r-1', 'log', {'message': sys.argv[2] + ':' + str(i)})\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(store.path), w], cwd=ROOT) for w in "abc"]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    evs = store.events("r-1")
    assert [e["seq"] for e in evs] == list(range(1, 181))
    for w in "abc":                                                  # each writer's events in its own order
        assert [e["message"] for e in evs if e["message"].startswith(w)] == [f"{w}:{i}" for i in range(60)]
    jl = [json.loads(x)["seq"] for x in (store.workdir("r-1") / "events.jsonl").read_text().splitlines()]
    assert jl == list(range(1, 181))


def test_event_check_and_lines():
    assert check("step", {"loss": float("nan"), "step": 1}) == {"loss": None, "step": 1}
    with pytest.raises(ValueError, match="unknown event type"):
        check("stepp", {})
    with pytest.raises(ValueError, match="may not use"):
        check("log", {"seq": 3})
    with pytest.raises(ValueError):
        check("finished", {}, allowed=("step", "log"))            # stages may not end a run themselves
    ev = {"seq": 1, "ts": 0, "type": "step", "step": 3, "total": 10, "loss": 1.23456, "lr": 2e-4,
          "tokens_per_s": 1520.4, "mem_bytes": 3 * 2**30, "eta_s": 75}
    assert line(ev).endswith("step 3/10  loss 1.2346  lr 2.00e-04  1520 tok/s  mem 3.00 GiB  eta 1m15s")
    s = summary([ev, {"seq": 2, "ts": 1, "type": "log", "message": "m"},
                 {"seq": 3, "ts": 2, "type": "error", "stage": "train", "kind": "oom-gpu", "message": "x"}])
    assert s["by_type"] == {"step": 1, "log": 1, "error": 1} and s["last_seq"] == 3
    assert s["last_step"]["step"] == 3 and s["log_tail"] == ["m"] and s["errors"][0]["kind"] == "oom-gpu"
    assert callable(api_events)          # engine.runs.api.events is the API function; the module is engine.runs.events


def test_fault_classification_uses_the_real_exception_types():
    torch = pytest.importorskip("torch")
    c = classify(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "train")
    assert c == {"kind": "oom-gpu", "reason": "out of GPU memory in stage train",
                 "message": "CUDA out of memory. Tried to allocate 2.00 GiB"}
    with pytest.raises(RuntimeError) as e:
        torch.empty(2**62, dtype=torch.uint8)                      # a real CPU allocation failure
    assert classify(e.value, "quantize")["reason"] == "out of CPU memory in stage quantize"
    assert classify(MemoryError(), "evaluate")["kind"] == "oom-cpu"
    assert classify(KeyError("x"), "merge")["reason"] == "KeyError in stage merge: 'x'"
    from engine.errors import InputError
    assert classify(InputError("dataset has 0 rows"), "train")["kind"] == "input"


def test_exit_reasons_name_the_signal():
    assert exit_reason(-9).startswith("worker process died (signal 9, SIGKILL)")
    assert exit_reason(-11) == "worker process died (signal 11, SIGSEGV)"
    assert exit_reason(3) == "worker process exited with code 3 without finishing the run"
    assert "not started by this process" in exit_reason(None)


def test_oom_suggestions_cover_batch_checkpointing_and_4bit():
    spec = RunSpec.parse({"model": "llama-3.2-1b", "strategy": "lora",
                          "train": {"batch_size": 8, "grad_ckpt": False, "seq_len": 2048}})
    from engine import strategies
    out = suggestions(spec, strategies.get("lora"), "train", gpu="t4-16gb", capacity_bytes=2 * 2**30)
    text = " | ".join(out)
    assert "batch_size" in text and "grad_ckpt" in text and ("qlora" in text or "4-bit" in text)
    q = suggestions(spec, strategies.get("ptq-gptq-4bit"), "quantize")
    assert any("calibration_samples" in s for s in q)


def test_importing_the_runs_api_does_not_import_torch():
    code = ("import sys, engine.runs.api, engine.cli.runs, engine.runs.worker, engine.runs.context;"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'torchao', 'gptqmodel')"
            " if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_oom_suggestions_are_checked_against_the_planner():
    import re
    from engine import estimate, strategies
    if not hasattr(estimate, "estimate_train"):
        pytest.skip("the training estimate is not there yet")
    spec = RunSpec.parse({"model": "llama-3.2-1b", "strategy": "full-finetune",
                          "train": {"batch_size": 8, "grad_ckpt": False, "seq_len": 2048}})
    for cap_gib in (6, 15, 40):
        out = suggestions(spec, strategies.get("full-finetune"), "train", gpu="t4-16gb", capacity_bytes=cap_gib * 2**30)
        fits = [s for s in out if f"fits in {cap_gib:.1f} GiB" in s]
        assert fits, out
        for s in fits:                                      # every proposal is estimated to fit
            assert float(re.search(r"estimated ([\d.]+) GiB", s).group(1)) <= cap_gib
        assert "the planner estimated this run at" in out[-1]


def test_finish_writes_its_events_only_if_it_wins(store):
    store.create_run("r-1", SPEC, "cpu")
    assert store.finish("r-1", "failed", "worker process died", before=[("error", {"kind": "worker-died"})])
    assert not store.finish("r-1", "failed", "again", before=[("error", {"kind": "worker-died"})])
    assert [e["type"] for e in store.events("r-1")] == ["error", "finished"]


def _open_store_at(path, barrier, results):
    barrier.wait()          # every process opens the new file at the same instant
    try:
        RunStore(path).list_runs()
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - the test reports what went wrong
        results.put(repr(e))


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    """CLI, worker and test process create the same new runs.sqlite together: switching a new
    file to WAL needs an exclusive lock and SQLite refuses it at once ("database is locked",
    no busy wait) to the losers; the store must wait for the winner instead of failing
    (it failed CI twice this way)."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    outcomes = []
    for i in range(12):
        results, barrier = ctx.Queue(), ctx.Barrier(6)
        procs = [ctx.Process(target=_open_store_at, args=(tmp_path / f"s{i}" / "runs.sqlite", barrier, results))
                 for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        outcomes += [results.get(timeout=5) for _ in procs]
    assert set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]
