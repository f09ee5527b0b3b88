"""Multi-process training (resources: processes / gpus): torchrun + FSDP2 over gloo on this CPU,
supervised by the real worker, on the micro demo model.

Default suite: the spec, the launch plan, refusals, failure attribution on torchrun's real
report, the per-rank estimate, and one 2-process LoRA run end to end through the executor (its
sharded training checkpoint included).
``-m slow``: the 2-process loss curve equals the 1-process one with the same effective batch
(LoRA and full fine-tune), a stop (graceful and by signal) ends every rank, a killed rank fails
the run naming it."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from engine.errors import InputError
from engine.runs import distributed
from engine.runs.executor import Executor, pid_alive
from engine.runs.faults import RankFailed
from engine.runs.store import RunStore
from engine.spec.run import RunSpec

ROOT = Path(__file__).resolve().parent.parent
TRAIN = {"steps": 4, "batch_size": 4, "seq_len": 64, "learning_rate": 5e-3, "lora_rank": 8, "grad_ckpt": False}
EVAL = {"max_examples": 4, "prompt_len": 16, "new_tokens": 4, "task_accuracy": False, "latency": False,
        "before_and_after": False}


def spec(strategy="lora", processes=2, **train):
    return {"name": f"{strategy} x{processes}", "model": "demo:micro-llama", "strategy": strategy,
            "dataset": {"demo": "tickets", "max_examples": 60}, "train": {**TRAIN, **train}, "evaluate": EVAL,
            "device": "cpu", **({"resources": {"processes": processes}} if processes > 1 else {})}


@pytest.fixture
def ex(tmp_path, micro_home):
    e = Executor(RunStore(tmp_path / "runs.sqlite", tmp_path / "runs"))
    yield e
    for run in e.store.active_runs():          # never leave ranks behind
        e.stop(run["id"], wait=True, grace_s=0, term_s=2)


def ranks_gone(run) -> bool:
    return not any(pid_alive(p, run["id"]) for p in distributed.rank_pids(run["workdir"]))


def wait_for_step(ex, run_id, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e["type"] == "step" for e in ex.store.events(run_id, types=("step",))):
            return
        run = ex.get_run(run_id)
        assert run["status"] in ("queued", "running"), (run["status"], run["reason"])
        time.sleep(0.3)
    raise AssertionError("no step event")


# -- the spec and the plan ------------------------------------------------------------------------
def test_resources_in_the_run_spec():
    s = RunSpec.parse(spec())
    assert s.world_size == 2 and s.resources.processes == 2 and RunSpec.parse(spec(processes=1)).world_size == 1
    assert RunSpec.parse({**spec(processes=1), "resources": {"gpus": 4}, "device": "auto"}).world_size == 4
    for bad, what in (({"processes": 2, "gpus": 2}, "not both"), ({"processes": 0}, "greater than or equal to 1")):
        with pytest.raises(InputError, match=what):
            RunSpec.parse({**spec(), "resources": bad})
    with pytest.raises(InputError, match="resources.gpus asks for GPUs but device is cpu"):
        RunSpec.parse({**spec(), "resources": {"gpus": 2}})
    with pytest.raises(InputError, match="resources.processes is for CPU runs"):
        RunSpec.parse({**spec(), "device": "cuda"})
    assert RunSpec.load(ROOT / "presets/runs/demo-lora-2proc.yaml").world_size == 2


def test_launch_plan_is_the_command_the_worker_runs():
    plan = distributed.launch_plan(RunSpec.parse(spec()), workdir="/w/r-1")
    assert plan["processes"] == 2 and plan["backend"] == "gloo" and "FSDP2" in plan["sharding"]
    assert plan["command"] == ("python -m torch.distributed.run --standalone --nproc-per-node=2 --max-restarts=0 "
                               "-m engine.runs.stages.rank /w/r-1/dist/job.json")
    assert distributed.command(2, "/w/r-1/dist/job.json", python="python") == plan["command"].split()
    gpu = distributed.launch_plan(RunSpec.parse({**spec(), "device": "auto", "resources": {"gpus": 8}}))
    assert gpu["backend"] == "nccl" and "bf16" in gpu["mixed_precision"] and "--nproc-per-node=8" in gpu["command"]
    assert distributed.launch_plan(RunSpec.parse(spec(processes=1))) is None


def test_refused_at_launch(ex, monkeypatch):
    with pytest.raises(InputError, match="strategy qat-lora cannot train that way: QAT \\+ LoRA merges its adapters") as e:
        ex.launch(spec("qat-lora"))
    assert e.value.field == "resources"
    with pytest.raises(InputError, match="does not train"):
        ex.launch(spec("ptq-nf4"))
    monkeypatch.setenv("TUNEQUANT_GPUS", "")
    with pytest.raises(InputError, match="this machine has none") as e:
        ex.launch({**spec(), "device": "auto", "resources": {"gpus": 2}})
    assert e.value.field == "resources.gpus"
    monkeypatch.setenv("TUNEQUANT_GPUS", "0")
    with pytest.raises(InputError, match="2 GPUs asked for, this machine has 1"):
        ex.launch({**spec(), "device": "auto", "resources": {"gpus": 2}})
    assert ex.store.list_runs() == []


# torchrun's report when rank 1 was killed with SIGKILL (torch 2.13, captured from a real run);
# rank 0 then failed in a gloo collective and got torchrun's SIGTERM
TORCHRUN_REPORT = """
engine.runs.stages.rank FAILED
-------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-03_07:58:20
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 25197)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 25197
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-03_07:58:20
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 25198)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 25198
=======================================================
"""
LOST_PEER = {"type": "error", "rank": 0, "ts": 2.0, "kind": "exception", "reason": "RuntimeError in stage train: "
             "[pair.cc:537] Read error [127.0.0.1]:64673: Connection reset by peer.", "message": "Read error: "
             "Connection reset by peer."}


def test_a_failure_is_the_rank_that_caused_it():
    assert distributed.launcher_failures(TORCHRUN_REPORT) == [(1, -9), (0, -15)]
    # the killed rank, not the one that lost its peer
    f = distributed.attribute([LOST_PEER], TORCHRUN_REPORT, 1, 2)
    assert isinstance(f, RankFailed) and f.rank == 1 and f.kind == "rank-died"
    assert f.reason.startswith("rank 1 of 2 died in stage train (signal 9, SIGKILL)")
    # a rank's own error (an OOM on one GPU) wins over the others' consequences
    oom = {"type": "error", "rank": 1, "ts": 3.0, "kind": "oom-gpu", "reason": "out of GPU memory in stage train",
           "message": "CUDA out of memory"}
    f = distributed.attribute([LOST_PEER, oom], TORCHRUN_REPORT, 1, 2)
    assert (f.rank, f.kind, f.reason) == (1, "oom-gpu", "rank 1 of 2: out of GPU memory in stage train")
    from engine.runs import faults
    c = faults.classify(f, "train")
    assert c["kind"] == "oom-gpu" and c["rank"] == 1 and c["reason"] == f.reason
    f = distributed.attribute([], "", 1, 2)
    assert f.rank is None and "torchrun" in f.reason


def test_the_estimate_recorded_is_per_rank():
    from engine.runs import worker
    from engine import strategies
    s = RunSpec.parse(spec("full-finetune"))
    est = worker.planner_estimate(s, strategies.get("full-finetune"), worker.CPU_PRESET)["train"]
    one = worker.planner_estimate(RunSpec.parse(spec("full-finetune", processes=1, loss="reference")),
                                  strategies.get("full-finetune"), worker.CPU_PRESET)["train"]
    assert est["processes"] == 2 and est["per"] == "rank" and est["inputs"].get("loss", "reference") == "reference"
    assert est["unsharded"]["peak_allocated_bytes"] == one["peak_allocated_bytes"]
    # model states halve, activations stay whole, two gathered 16-bit layers are added
    b, ob = est["breakdown"], one["breakdown"]
    assert b["optimizer_states"] == pytest.approx(ob["optimizer_states"] / 2)
    assert b["activations"] == ob["activations"] and b["fsdp_gathered_layers"] > 0
    assert est["peak_allocated_bytes"] == pytest.approx(sum(b.values()))
    assert est["tokens_per_s"] == pytest.approx(one["tokens_per_s"] * 2 * 0.9)


def test_the_qlora_estimate_per_rank_keeps_the_4bit_base_whole():
    """The QLoRA ranks hold the whole NF4 base (FSDP2 ignored_params): the recorded per-rank estimate does too
    (the advisor's rule, engine/advisor/assess.py _shard; hand-computed figures in tests/test_advisor.py)."""
    from engine import models, strategies
    from engine.estimate import formats
    from engine.runs import worker
    s = RunSpec.parse(spec("qlora"))
    est = worker.planner_estimate(s, strategies.get("qlora"), worker.CPU_PRESET)["train"]
    one = est["unsharded"]
    b = est["breakdown"]
    wb = formats.weights_breakdown(models.resolve("demo:micro-llama"), "nf4", dense_bytes=4)
    assert b["replicated_4bit_base"] == wb["block_linears"] + wb["quant_scales"] > 0
    assert est["peak_allocated_bytes"] == pytest.approx(sum(b.values()))
    assert one["peak_allocated_bytes"] > est["peak_allocated_bytes"] > b["replicated_4bit_base"]


# -- real runs --------------------------------------------------------------------------------------
def test_two_process_lora_run_end_to_end(ex):
    rid = ex.launch(spec("lora", steps=3, save_steps=3))
    run = ex.wait(rid, timeout=600)
    assert run["status"] == "finished", (run["reason"], (Path(run["workdir"]) / "worker.log").read_text()[-3000:])
    train = run["result"]["stages"][0]
    assert train["processes"] == 2 and [r["rank"] for r in train["ranks"]] == [0, 1]
    assert all(r["peak_mem_bytes"] > 50e6 and r["mem_source"] == "cpu_peak_rss" for r in train["ranks"])
    assert train["peak_mem_bytes"] == max(r["peak_mem_bytes"] for r in train["ranks"])
    res = train["result"]
    assert res["steps"] == 3 and res["loss_last"] < res["loss_first"] and res["processes"] == 2
    assert res["launch"].endswith(f"{rid}/dist/job.json") and "--nproc-per-node=2" in res["launch"]
    steps = ex.store.events(rid, types=("step",))
    assert steps[-1]["step"] == 3 and len(steps[-1]["mem_bytes_ranks"]) == 2
    # tokens summed over the ranks: 3 steps x 2 ranks x 4 sequences of real tokens
    assert res["tokens"] > 3 * 2 * 4 * 5
    assert Path(res["adapter_dir"], "adapter_model.safetensors").is_file()
    assert run["result"]["eval"]["after"]["adapter_bytes"] > 0          # evaluate read the saved adapter
    # the training checkpoint, sharded: one file of shards per rank (resuming from it: tests/test_checkpoint.py)
    from engine.runs.stages import checkpoint as ckp
    ck = Path(run["workdir"]) / "checkpoints" / "checkpoint-3"
    assert [c["step"] for c in res["checkpoints"]] == [3] and len(list(ck.glob("*.distcp"))) == 2
    assert ckp.read_state(ck)["processes"] == 2
    assert run["estimate"]["train"]["processes"] == 2
    assert ranks_gone(run)


def _train_alone(strategy, tmp_path, **train):
    """The train stage in this process (one rank's worth of everything), for the reference curve."""
    from engine import strategies
    from engine.runs.context import StageContext
    from engine.runs.stages.train import train as train_stage
    s = RunSpec.parse(spec(strategy, processes=1, loss="reference", **train))
    st = strategies.get(strategy)
    tmp_path.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(run_id="one", spec=s, strategy=st, stage=st["stages"][0], index=0, workdir=tmp_path)
    return train_stage(ctx)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["lora", "full-finetune"])
def test_two_processes_follow_the_one_process_loss_curve(ex, tmp_path, strategy):
    """2 ranks x batch 4 == 1 process x batch 4 x accumulation 2: the same 8 sequences per step."""
    rid = ex.launch(spec(strategy, steps=5))
    one = _train_alone(strategy, tmp_path / "one", steps=5, grad_accum=2)
    run = ex.wait(rid, timeout=900)
    assert run["status"] == "finished", run["reason"]
    two = run["result"]["stages"][0]["result"]
    assert two["losses"][-1] < two["losses"][0]
    assert two["losses"] == pytest.approx(one["losses"], rel=2e-3)
    assert two["tokens"] == one["tokens"]
    if strategy == "full-finetune":                    # the unsharded model, saved once, loads back
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(two["model_dir"])
        assert sum(p.numel() for p in m.parameters()) == two["params"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flag", "signal"])
def test_stop_reaches_every_rank(ex, how):
    rid = ex.launch(spec("lora", steps=500))
    wait_for_step(ex, rid)
    pids = distributed.rank_pids(ex.get_run(rid)["workdir"])
    assert len(pids) == 2 and all(pid_alive(p, rid) for p in pids)
    # flag: the ranks stop together after a step and save; signal: SIGTERM at once, then SIGKILL
    run = ex.stop(rid, wait=True, grace_s=60 if how == "flag" else 0, term_s=10)
    assert run["status"] == "stopped"
    assert ranks_gone(run) and not any(pid_alive(p) for p in pids)
    if how == "flag":
        res = run["result"]["stages"][0]
        assert res["stopped"] and res["result"]["stopped"] and 0 < res["result"]["steps"] < 500
        assert len(res["ranks"]) == 2


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_naming_it(ex):
    rid = ex.launch(spec("lora", steps=500))
    wait_for_step(ex, rid)
    pids = distributed.rank_pids(ex.get_run(rid)["workdir"])
    os.kill(pids[1], signal.SIGKILL)
    run = ex.wait(rid, timeout=180)
    assert run["status"] == "failed"
    assert run["reason"].startswith("rank 1 of 2 died in stage train (signal 9, SIGKILL)")
    err = [e for e in ex.store.events(rid, types=("error",))][-1]
    assert err["kind"] == "rank-died" and err["stage"] == "train"
    assert ranks_gone(run)


def test_each_gpu_rank_loads_onto_its_own_gpu():
    from engine.runs.context import StageContext
    from engine.runs.stages import common
    s = RunSpec.parse({**spec(), "device": "cuda", "resources": {"gpus": 2}})
    ctx = StageContext(run_id="x", spec=s, strategy={}, stage={}, index=0, workdir=Path("."), device="cuda",
                       state={"_dist": {"rank": 1, "world": 2, "local_rank": 1, "backend": "nccl"}})
    assert common.device_map(ctx) == {"": 1}
    ctx.state = {}
    assert common.device_map(ctx) == {"": 0}
