"""The executor and the worker with real processes, real signals and a real SQLite store.

Only the stage bodies are the test's own (STAGES below, loaded by the worker through the
``stages="<this file>:STAGES"`` hook); the run's name carries what a stage should do:
    slow         0.1 s per step          ignore-stop   never polls the stop flag
    ignore-term  also ignores SIGTERM    oom / cpu-oom / boom   raise in the train stage
    big          the train stage holds 300 MB for a moment
    cuda-alloc / cuda-oom   allocate 512 MiB on the GPU / more than any GPU has (gpu tests)
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

from engine.errors import InputError
from engine.runs.executor import Executor, pid_alive
from engine.runs.store import RunStore

HOOK = f"{Path(__file__).resolve()}:STAGES"


# -- the test's stages (run inside the worker process) ------------------------------------
def _train(ctx):
    mode = ctx.spec.name.split()
    n = ctx.spec.train.steps or 5
    delay = 0.1 if "slow" in mode else 0.0
    if "ignore-term" in mode:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "big" in mode:
        block = bytearray(300 * 2**20)
        block[::4096] = b"x" * len(block[::4096])       # touch every page: it counts in RSS
        del block
    if "cuda-alloc" in mode:                            # 512 MiB on the GPU, freed again
        import torch
        x = torch.ones(128 * 2**20, dtype=torch.float32, device="cuda")
        del x
    loss = 4.0
    for i in range(n):
        if "ignore-stop" not in mode and ctx.should_stop():
            ctx.emit("log", message=f"stop seen at step {i}; saving")
            (ctx.workdir / "partial.txt").write_text(str(i))
            ctx.emit("artifact", path=str(ctx.workdir / "partial.txt"), kind="checkpoint")
            return {"steps": i, "stopped": True}
        if "oom" in mode and i == 2:
            import torch
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 23.65 GiB total)")
        if "cuda-oom" in mode and i == 2:
            import torch
            torch.empty(2**50, dtype=torch.uint8, device="cuda")       # 1 PiB: the real CUDA OOM
        if "cpu-oom" in mode and i == 2:
            raise MemoryError()
        if "boom" in mode and i == 2:
            raise ValueError("the stage broke on purpose\nsecond line")
        try:
            time.sleep(delay)
        except Exception:          # a careless stage: does not swallow the worker's StopRun
            pass
        loss *= 0.8
        ctx.emit("step", step=i + 1, total=n, loss=loss, lr=ctx.spec.train.learning_rate, tokens_per_s=1000.0,
                 mem_bytes=123, eta_s=delay * (n - i - 1))
    (ctx.workdir / "adapter").mkdir(exist_ok=True)
    (ctx.workdir / "adapter" / "weights.bin").write_bytes(b"\0" * 1000)
    ctx.state["adapter_dir"] = str(ctx.workdir / "adapter")
    ctx.emit("artifact", path=ctx.state["adapter_dir"], kind="adapter")
    return {"steps": n, "final_loss": loss}


def _quantize(ctx):
    ctx.state["model_dir"] = str(ctx.workdir / "q")
    ctx.emit("log", message=f"quantize with {ctx.stage.get('method')} bits={ctx.stage.get('bits')}")
    return {"method": ctx.stage.get("method"), "bits": ctx.stage.get("bits")}


def _evaluate(ctx):
    ctx.emit("eval", name="after", metrics={"perplexity": 12.5, "accuracy": 0.75})
    ctx.emit("metric", name="size_on_disk", value=1000, unit="bytes")
    return {"saw_adapter": ctx.state.get("adapter_dir") is not None}


def _merge(ctx):
    return {}


STAGES = {"train": _train, "quantize": _quantize, "evaluate": _evaluate, "merge": _merge, "convert": _merge}


def prepare(spec):
    if spec.dataset.path and not Path(spec.dataset.path).is_file():
        raise InputError(f"dataset.path {spec.dataset.path!r} not found", field="dataset.path")


# -- helpers ------------------------------------------------------------------------------
@pytest.fixture
def ex(tmp_path, monkeypatch):
    monkeypatch.delenv("TUNEQUANT_STAGES", raising=False)
    return Executor(RunStore(tmp_path / "runs.sqlite"))


def spec(name="", strategy="lora", steps=5, **kw):
    return {"name": name, "model": "tiny-test", "strategy": strategy, "device": "cpu",
            "train": {"steps": steps}, **kw}


def wait_for(pred, timeout=20.0, every=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = pred()
        if out:
            return out
        time.sleep(every)
    raise AssertionError("condition not met in time")


def types(evs):
    return [e["type"] for e in evs]


# -- tests --------------------------------------------------------------------------------
def test_run_records_everything_in_order(ex):
    rid = ex.launch(spec(steps=4), stages=HOOK)
    run = ex.wait(rid, timeout=60)
    assert run["status"] == "finished", run
    evs = ex.store.events(rid)
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
    assert types(evs) == ["queued", "started", "stage_started", "step", "step", "step", "step", "artifact",
                          "stage_finished", "stage_started", "eval", "metric", "stage_finished", "finished"]
    assert [e["loss"] for e in evs if e["type"] == "step"] == pytest.approx([3.2, 2.56, 2.048, 1.6384])
    # re-attach after seq N: exactly the rest
    assert ex.store.events(rid, after_seq=5) == evs[5:]
    # the JSONL copy holds the same events in the same order
    lines = [json.loads(ln) for ln in (Path(run["workdir"]) / "events.jsonl").read_text().splitlines()]
    assert [(ln["seq"], ln["type"]) for ln in lines] == [(e["seq"], e["type"]) for e in evs]
    res = run["result"]
    assert [s["stage"] for s in res["stages"]] == ["train", "evaluate"]
    assert res["stages"][0]["result"] == {"steps": 4, "final_loss": pytest.approx(1.6384)}
    assert res["stages"][1]["result"] == {"saw_adapter": True}          # state handed between stages
    for s in res["stages"]:
        assert s["duration_s"] >= 0 and s["peak_mem_bytes"] > 10 * 2**20 and s["mem_source"] == "cpu_peak_rss"
    assert res["eval"] == {"after": {"perplexity": 12.5, "accuracy": 0.75}}
    assert res["metrics"] == {"size_on_disk": {"value": 1000, "unit": "bytes"}}
    assert res["artifacts"] == [{"path": str(Path(run["workdir"]) / "adapter"), "kind": "adapter"}]
    assert run["versions"]["python"] and "torch" in run["versions"]
    assert run["machine"]["cpu_count"] >= 1 and run["machine"]["ram_bytes"] > 0
    assert set(run["estimate"]) >= {"train", "infer"}        # a result or an {"error"}, never missing
    assert run["pid"] and not pid_alive(run["pid"]) or wait_for(lambda: not pid_alive(run["pid"]))
    assert run["started"] >= run["created"] and run["ended"] >= run["started"]


def test_quantize_stage_sees_spec_overrides(ex):
    rid = ex.launch(spec(strategy="ptq-gptq-4bit", quantize={"bits": 3}), stages=HOOK)
    run = ex.wait(rid, timeout=60)
    assert run["status"] == "finished"
    assert run["result"]["stages"][0]["result"] == {"method": "gptq", "bits": 3}


def test_peak_memory_is_per_stage(ex):
    rid = ex.launch(spec("big", steps=1), stages=HOOK)
    run = ex.wait(rid, timeout=60)
    train, evaluate = run["result"]["stages"]
    assert train["peak_mem_bytes"] >= 300 * 2**20
    assert evaluate["peak_mem_bytes"] < train["peak_mem_bytes"] - 250 * 2**20      # the peak was reset


def test_stop_is_graceful_when_the_stage_polls(ex):
    rid = ex.launch(spec("slow", steps=200), stages=HOOK)
    wait_for(lambda: len(ex.store.events(rid, types=("step",))) >= 3)
    pid = ex.get_run(rid)["pid"]
    t0 = time.monotonic()
    run = ex.stop(rid, grace_s=20, term_s=5)
    assert time.monotonic() - t0 < 10
    assert run["status"] == "stopped" and "stopped on request" in run["reason"]
    assert not pid_alive(pid)
    evs = ex.store.events(rid)
    assert any(e["type"] == "log" and e["message"].startswith("stop seen at step") for e in evs)
    assert not any(e["type"] == "log" and "sent SIG" in e["message"] for e in evs)
    assert run["result"]["artifacts"][0]["kind"] == "checkpoint"                   # saved what it could
    assert types(evs)[-1] == "finished" and evs[-1]["status"] == "stopped"
    assert types(evs).count("finished") == 1


def test_stop_escalates_to_sigterm(ex):
    rid = ex.launch(spec("slow ignore-stop", steps=400), stages=HOOK)
    wait_for(lambda: ex.store.events(rid, types=("step",)))
    pid = ex.get_run(rid)["pid"]
    run = ex.stop(rid, grace_s=0.5, term_s=10)
    assert run["status"] == "stopped" and "SIGTERM" in run["reason"], run["reason"]
    assert not pid_alive(pid)
    interrupted = run["result"]["stages"][-1]                   # the interrupted stage is still measured
    assert interrupted["stage"] == "train" and interrupted["stopped"] and interrupted["duration_s"] >= 0.4
    assert any("sent SIGTERM" in e.get("message", "") for e in ex.store.events(rid, types=("log",)))


def test_stop_escalates_to_sigkill(ex):
    rid = ex.launch(spec("slow ignore-stop ignore-term", steps=400), stages=HOOK)
    wait_for(lambda: ex.store.events(rid, types=("step",)))
    pid = ex.get_run(rid)["pid"]
    run = ex.stop(rid, grace_s=0.3, term_s=0.5)
    assert run["status"] == "stopped"
    assert not pid_alive(pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)                                    # the whole process group is gone
    evs = ex.store.events(rid)
    assert any("sent SIGKILL" in e.get("message", "") for e in evs)
    assert types(evs).count("finished") == 1


def test_killed_worker_is_marked_failed_with_the_signal(ex):
    rid = ex.launch(spec("slow", steps=400), stages=HOOK)
    wait_for(lambda: ex.store.events(rid, types=("step",)))
    os.kill(ex.get_run(rid)["pid"], signal.SIGKILL)
    run = ex.wait(rid, timeout=20)
    assert run["status"] == "failed"
    assert run["reason"].startswith("worker process died (signal 9, SIGKILL)")
    err = ex.store.events(rid, types=("error",))[-1]
    assert err["kind"] == "worker-died" and err["stage"] == "train" and err["returncode"] == -9
    assert ex.store.events(rid, types=("step",))                 # nothing recorded before was lost


def test_cuda_oom_fails_the_run_with_what_would_fit(ex):
    rid = ex.launch(spec("oom", strategy="qlora", steps=5, train={"steps": 5, "batch_size": 8, "grad_ckpt": False}),
                    stages=HOOK)
    run = ex.wait(rid, timeout=90)
    assert run["status"] == "failed"
    assert run["reason"].startswith("out of GPU memory in stage train; what would fit instead: ")
    err = ex.store.events(rid, types=("error",))[-1]
    assert err["kind"] == "oom-gpu" and err["stage"] == "train"
    assert "OutOfMemoryError" in err["traceback"] and "CUDA out of memory" in err["message"]
    assert any("batch_size" in s for s in err["suggestions"])
    assert any("grad_ckpt" in s for s in err["suggestions"])
    # the quantize stage before it finished and is kept; the failed stage is measured too
    stages = run["result"]["stages"]
    assert [s["stage"] for s in stages] == ["quantize", "train"] and stages[1]["failed"]
    assert len(ex.store.events(rid, types=("step",))) == 2
    assert "Traceback" in (Path(run["workdir"]) / "worker.log").read_text()


def test_cpu_oom_and_other_exceptions_name_the_reason(ex):
    a = ex.launch(spec("cpu-oom"), stages=HOOK)
    b = ex.launch(spec("boom"), stages=HOOK)
    ra, rb = ex.wait(a, timeout=60), ex.wait(b, timeout=60)
    assert ra["status"] == "failed" and ra["reason"].startswith("out of CPU memory in stage train")
    assert rb["status"] == "failed" and rb["reason"] == "ValueError in stage train: the stage broke on purpose"
    log = (Path(rb["workdir"]) / "worker.log").read_text()
    assert "Traceback" in log and "ValueError: the stage broke on purpose" in log


def test_restart_marks_orphaned_runs_interrupted(tmp_path):
    db = tmp_path / "runs.sqlite"
    # an "app" process launches two runs and exits; its workers live on in their own sessions
    code = ("import sys; from engine.runs import api; api.use_store(sys.argv[1]);"
            "print(api.launch(dict(name='slow', model='m', strategy='lora', device='cpu', train={'steps': 400}),"
            " stages=sys.argv[2]));"
            "print(api.launch(dict(name='slow', model='m', strategy='lora', device='cpu', train={'steps': 400}),"
            " stages=sys.argv[2]))")
    out = subprocess.run([sys.executable, "-c", code, str(db), HOOK], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    gone, alive = out.stdout.split()
    store = RunStore(db)
    wait_for(lambda: store.get_run(gone)["status"] == "running" and store.get_run(alive)["status"] == "running")
    pid_gone, pid_alive_ = store.get_run(gone)["pid"], store.get_run(alive)["pid"]
    os.kill(pid_gone, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid_gone, gone))
    ex = Executor(store)                                          # "the app restarts"
    assert ex.get_run(gone)["status"] == "interrupted", ex.get_run(gone)
    assert "was gone when the engine restarted" in ex.get_run(gone)["reason"]
    assert ex.get_run(alive)["status"] == "running", ex.get_run(alive)  # a live worker is left alone ...
    run = ex.stop(alive, grace_s=10)                              # ... and can still be stopped by id
    assert run["status"] == "stopped" and not pid_alive(pid_alive_)


def test_bad_input_is_refused_before_a_run_exists(ex, tmp_path):
    cases = [
        (spec(train={"batch_size": 0}), "train.batch_size"),
        (spec(strategy="no-such"), "strategy"),
        (spec(strategy="ptq-torchao-int4"), "device"),                         # GPU-only library on the CPU
        (spec(dataset={"path": str(tmp_path / "missing.jsonl")}), "dataset.path"),   # the stages' prepare
        ({"model": "m"}, "strategy"),
    ]
    for bad, field in cases:
        with pytest.raises(InputError) as e:
            ex.launch(bad, stages=HOOK)
        assert e.value.field == field, (bad, str(e.value))
    assert ex.store.list_runs() == []


def test_two_readers_follow_a_run_while_it_writes(ex, tmp_path):
    rid = ex.launch(spec("slow", steps=25), stages=HOOK)
    reader = ("import sys, time, json; from engine.runs.store import RunStore\n"
              "s = RunStore(sys.argv[1]); seq = 0; got = []\n"
              "while True:\n"
              "    run = s.get_run(sys.argv[2]); new = s.events(sys.argv[2], after_seq=seq)\n"
              "    got += [e['seq'] for e in new]; seq = got[-1] if got else 0\n"
              "    if run['status'] not in ('queued', 'running') and not s.events(sys.argv[2], after_seq=seq): break\n"
              "    time.sleep(0.03)\n"
              "print(json.dumps(got))\n")
    root = Path(__file__).resolve().parent.parent
    readers = [subprocess.Popen([sys.executable, "-c", reader, str(ex.store.path), rid], stdout=subprocess.PIPE,
                                text=True, cwd=root) for _ in range(2)]
    outs = [json.loads(r.communicate(timeout=60)[0]) for r in readers]
    run = ex.wait(rid, timeout=30)
    every = [e["seq"] for e in ex.store.events(rid)]
    assert run["status"] == "finished" and len(every) > 30
    assert outs[0] == every and outs[1] == every


def test_gpu_runs_queue_one_per_gpu(ex, tmp_path, monkeypatch):
    """A GPU run waits while its GPU is taken (here the lock is held by the test), can be
    stopped while queued, and starts once the GPU is free."""
    import fcntl
    monkeypatch.setenv("TUNEQUANT_GPUS", "0")
    lock_dir = ex.store.runs_dir.parent / "locks"
    lock_dir.mkdir(exist_ok=True)
    held = open(lock_dir / "gpu-0.lock", "a+")
    fcntl.flock(held, fcntl.LOCK_EX)
    a = ex.launch(spec(steps=1, device="auto"), stages=HOOK)
    b = ex.launch(spec(steps=1, device="cuda"), stages=HOOK)
    assert ex.get_run(a)["device"] == "cuda"
    wait_for(lambda: any("waiting for a free GPU" in e["message"] for e in ex.store.events(a, types=("log",))))
    time.sleep(0.5)
    assert ex.get_run(a)["status"] == "queued" and ex.get_run(b)["status"] == "queued"
    assert ex.stop(b, grace_s=5)["status"] == "stopped"
    fcntl.flock(held, fcntl.LOCK_UN)
    held.close()
    run = ex.wait(a, timeout=60)
    assert run["started"] is not None                     # it left the queue
    if run["status"] == "failed":                         # no CUDA on this machine: said so, not crashed
        assert "torch sees no CUDA GPU" in run["reason"]
    else:
        assert run["status"] == "finished"


def test_a_worker_dying_unwatched_is_noticed_by_any_reader(tmp_path):
    """The launcher is gone (no parent watches the worker); the next reader notices the death."""
    db = tmp_path / "runs.sqlite"
    code = ("import sys; from engine.runs import api; api.use_store(sys.argv[1]);"
            "print(api.launch(dict(name='slow', model='m', strategy='lora', device='cpu', train={'steps': 400}),"
            " stages=sys.argv[2]))")
    rid = subprocess.run([sys.executable, "-c", code, str(db), HOOK], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout.strip()
    ex = Executor(RunStore(db))
    wait_for(lambda: ex.get_run(rid)["status"] == "running")
    pid = ex.get_run(rid)["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid, rid))
    run = ex.list_runs()[0]
    assert run["status"] == "failed" and run["reason"].startswith("worker process died")
    assert ex.store.events(rid)[-1]["type"] == "finished"


@pytest.mark.gpu
def test_gpu_runs_measure_cuda_memory_queue_and_name_a_real_oom(ex, monkeypatch):
    monkeypatch.setenv("TUNEQUANT_GPUS", "0")                     # one GPU slot: runs take turns
    a = ex.launch(spec("cuda-alloc slow", steps=5, device="cuda"), stages=HOOK)
    b = ex.launch(spec("cuda-alloc slow", steps=5, device="cuda"), stages=HOOK)
    ra, rb = ex.wait(a, timeout=120), ex.wait(b, timeout=120)
    assert ra["status"] == rb["status"] == "finished", (ra["reason"], rb["reason"])
    assert rb["started"] >= ra["ended"] - 0.5                      # b waited for a's GPU
    train = ra["result"]["stages"][0]
    assert train["mem_source"] == "cuda_max_memory_allocated" and train["peak_mem_bytes"] >= 512 * 2**20
    assert ra["machine"]["gpu_memory_bytes"] > 0 and ra["machine"]["gpu"]
    c = ex.launch(spec("cuda-oom", steps=5, device="cuda"), stages=HOOK)
    rc = ex.wait(c, timeout=120)
    assert rc["status"] == "failed" and rc["reason"].startswith("out of GPU memory in stage train")
    assert ex.store.events(c, types=("error",))[-1]["kind"] == "oom-gpu"
