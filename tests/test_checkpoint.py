"""Training checkpoints (train.save_steps / save_total_limit / resume_from_checkpoint), on the micro
demo model: one process, and 2 FSDP processes over gloo (torch.distributed.checkpoint, sharded per
rank). A resumed run continues the loss curve of the run that wrote the checkpoint.

Default suite: one process saves and resumes; a 2-process run writing its sharded checkpoint is part of
tests/test_runs_distributed.py's end-to-end run. ``-m slow``: a 2-process checkpoint resumed in one and in
two processes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import InputError
from engine.runs.stages import checkpoint as ckp
from engine.spec.run import RunSpec

TRAIN = {"batch_size": 4, "seq_len": 64, "learning_rate": 5e-3, "lora_rank": 8, "grad_ckpt": False,
         "loss": "reference"}
EVAL = {"max_examples": 4, "task_accuracy": False, "latency": False, "before_and_after": False}


def spec(strategy="lora", processes=1, **train):
    return RunSpec.parse({"name": "ckpt", "model": "demo:micro-llama", "strategy": strategy,
                          "dataset": {"demo": "tickets", "max_examples": 60}, "train": {**TRAIN, **train},
                          "evaluate": EVAL, "device": "cpu",
                          **({"resources": {"processes": processes}} if processes > 1 else {})})


def train_stage(s: RunSpec, workdir: Path, run_id="one", events=None):
    """The train stage as the worker runs it (2 processes: torchrun + FSDP2, supervised from here)."""
    from engine import strategies
    from engine.runs.context import StageContext
    from engine.runs.stages.train import train
    st = strategies.get(s.strategy)
    workdir.mkdir(parents=True, exist_ok=True)
    emit = (lambda type, **p: events.append({"type": type, **p})) if events is not None else (lambda type, **p: None)
    ctx = StageContext(run_id=run_id, spec=s, strategy=st, stage=st["stages"][0], index=0, workdir=workdir, emit=emit)
    return train(ctx)


def test_the_run_spec_fields():
    s = spec(save_steps=5, save_total_limit=2, resume_from_checkpoint="/x")
    assert (s.train.save_steps, s.train.save_total_limit, s.train.resume_from_checkpoint) == (5, 2, "/x")
    # the HF / LLaMA-Factory name of gradient checkpointing is accepted for grad_ckpt
    t = {k: v for k, v in TRAIN.items() if k != "grad_ckpt"}
    g = RunSpec.parse({"model": "demo:micro-llama", "strategy": "lora", "train": {**t, "gradient_checkpointing": False}})
    assert g.train.grad_ckpt is False and g.to_dict()["train"]["grad_ckpt"] is False
    with pytest.raises(InputError, match="train.save_steps"):
        spec(save_steps=0)


def test_find_names_the_last_complete_checkpoint(tmp_path):
    with pytest.raises(InputError, match="does not exist") as e:
        ckp.find(tmp_path / "nope")
    assert e.value.field == "train.resume_from_checkpoint"
    with pytest.raises(InputError, match="no complete checkpoint"):
        ckp.find(tmp_path)
    for step, done in ((2, True), (10, True), (12, False)):      # 12: written without its trainer state
        d = tmp_path / "checkpoints" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        if done:
            (d / ckp.STATE_FILE).write_text(json.dumps({"step": step}))
    assert ckp.find(tmp_path).name == "checkpoint-10"                  # a run's workdir
    assert ckp.find(tmp_path / "checkpoints").name == "checkpoint-10"
    assert ckp.find(tmp_path / "checkpoints" / "checkpoint-2").name == "checkpoint-2"
    state = {**ckp.identity(spec(), "lora", 1), "step": 4}
    ckp.check_resume(state, spec(), "lora", 1, 8)
    # 2 processes x batch 4 == 1 process x batch 4 x accumulation 2: the same sequences per step
    ckp.check_resume({**ckp.identity(spec(processes=2), "lora", 2), "step": 4}, spec(grad_accum=2), "lora", 1, 8)
    with pytest.raises(InputError, match="method: checkpoint 'lora', this run 'full'"):
        ckp.check_resume(state, spec(), "full", 1, 8)
    with pytest.raises(InputError, match="sequences_per_step: checkpoint 4, this run 8"):
        ckp.check_resume(state, spec(grad_accum=2), "lora", 1, 8)
    with pytest.raises(InputError, match="at step 4, this run trains 4 steps"):
        ckp.check_resume(state, spec(), "lora", 1, 4)


def test_launch_checks_the_resume(tmp_path):
    from engine.runs.executor import Executor
    from engine.runs.stages import prepare
    from engine.runs.store import RunStore
    with pytest.raises(InputError, match="does not exist") as e:
        prepare(spec(resume_from_checkpoint=str(tmp_path / "nope")))
    assert e.value.field == "train.resume_from_checkpoint"
    d = tmp_path / "checkpoints" / "checkpoint-3"
    d.mkdir(parents=True)
    (d / ckp.STATE_FILE).write_text(json.dumps({**ckp.identity(spec(), "full", 1), "step": 3}))
    with pytest.raises(InputError, match="method: checkpoint 'full', this run 'lora'"):
        prepare(spec(resume_from_checkpoint=str(tmp_path)))
    with pytest.raises(InputError, match="has no train stage"):
        prepare(RunSpec.parse({**spec().to_dict(), "strategy": "ptq-nf4", "train": {**TRAIN, "save_steps": 2}}))
    # a run id names that run's workdir (its last checkpoint)
    ex = Executor(RunStore(tmp_path / "runs.sqlite", tmp_path / "runs"), recover=False)
    ex.store.create_run("r-20260101-120000-abcdef", spec().to_dict(), "cpu", None)
    got = ex.resolve_resume(spec(resume_from_checkpoint="r-20260101-120000-abcdef"))
    assert got.train.resume_from_checkpoint == ex.store.get_run("r-20260101-120000-abcdef")["workdir"]
    with pytest.raises(InputError, match="no run 'r-20260101-120000-000000'"):
        ex.resolve_resume(spec(resume_from_checkpoint="r-20260101-120000-000000"))


def test_one_process_saves_and_a_resumed_run_continues_the_curve(tmp_path, micro_home):
    events = []
    a = train_stage(spec(steps=6, save_steps=2, save_total_limit=2), tmp_path / "a", events=events)
    # every 2 steps; the last 2 kept
    assert [c["step"] for c in a["checkpoints"]] == [2, 4, 6]
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    kinds = [e["kind"] for e in events if e["type"] == "artifact"]
    assert kinds.count("checkpoint") == 3
    state = ckp.read_state(tmp_path / "a" / "checkpoints" / "checkpoint-4")
    assert state["step"] == 4 and state["losses"] == pytest.approx(a["losses"][:4], abs=1e-4) and state["method"] == "lora"
    # the adapters and their two AdamW moments (fp32), not the frozen base
    n = a["trainable_params"]
    assert 3 * 4 * n <= a["checkpoints"][1]["bytes"] < 2 * 3 * 4 * n and n < a["params"] / 2   # + DCP's per-tensor headers
    b = train_stage(spec(steps=6, resume_from_checkpoint=str(tmp_path / "a" / "checkpoints" / "checkpoint-4")),
                    tmp_path / "b")
    assert b["resumed_from"]["step"] == 4 and b["steps"] == 6
    assert b["losses"][:4] == a["losses"][:4]
    assert b["losses"][4:] == pytest.approx(a["losses"][4:], rel=1e-4)
    assert a["losses"][-1] < a["losses"][0]
    # a different set-up is refused before training
    with pytest.raises(InputError, match="sequences_per_step"):
        train_stage(spec(steps=6, batch_size=2, resume_from_checkpoint=str(tmp_path / "a")), tmp_path / "c")


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory, micro_home):
    """A 2-process LoRA run of 4 steps with a checkpoint every 2 (torchrun + FSDP2, gloo)."""
    wd = tmp_path_factory.mktemp("two") / "a"
    return wd, train_stage(spec(processes=2, steps=4, save_steps=2), wd, run_id="a")


@pytest.mark.slow
def test_two_processes_save_sharded_and_one_resumes(two_proc, tmp_path):
    """2 FSDP ranks write one checkpoint (each its own shards); one process with the same sequences
    per step resumes from it (DCP reshards) and continues the 2-process loss curve."""
    wd, a = two_proc
    assert [c["step"] for c in a["checkpoints"]] == [2, 4] and a["processes"] == 2
    ck2 = wd / "checkpoints" / "checkpoint-2"
    assert len(list(ck2.glob("*.distcp"))) == 2                      # one file of shards per rank
    assert ckp.read_state(ck2)["processes"] == 2
    one = train_stage(spec(steps=4, grad_accum=2, resume_from_checkpoint=str(ck2)), tmp_path / "one")
    assert one["resumed_from"] == {"path": str(ck2), "step": 2, "processes": 2}
    assert one["losses"][:2] == a["losses"][:2]
    assert one["losses"][2:] == pytest.approx(a["losses"][2:], rel=2e-3)


@pytest.mark.slow
def test_two_processes_resume_in_two_processes(two_proc, tmp_path):
    wd, a = two_proc
    ck2 = wd / "checkpoints" / "checkpoint-2"
    b = train_stage(spec(processes=2, steps=4, resume_from_checkpoint=str(ck2)), tmp_path / "b", run_id="b")
    assert b["resumed_from"]["step"] == 2 and b["processes"] == 2
    assert b["losses"][:2] == a["losses"][:2]
    assert b["losses"][2:] == pytest.approx(a["losses"][2:], rel=2e-3)
