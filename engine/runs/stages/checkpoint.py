"""Training checkpoints: ``train.save_steps`` writes one every N optimizer steps (and when the run
is stopped), ``train.resume_from_checkpoint`` continues a new run from one.

A checkpoint is a folder ``<run workdir>/checkpoints/checkpoint-<step>/`` holding

    *.distcp, .metadata   the trainable weights and the optimizer state, written with
                          torch.distributed.checkpoint (DCP): under FSDP2 each rank writes its own
                          shards (a *sharded* state dict: no rank gathers the whole model), in one
                          process the whole tensors. DCP reshards on load, so a checkpoint of 2
                          processes resumes in 1 (or 4) and the other way round.
    trainer_state.json    the step, the losses so far, how many micro-batches of the shuffled stream
                          were consumed, and the settings a resume must share (method, model,
                          sequences per optimizer step, seq_len, seed); written last, by rank 0, so a
                          folder without it is an unfinished checkpoint and is never resumed from.

LoRA / QLoRA / QAT+LoRA checkpoints hold the adapters alone (the frozen base is reloaded from the
model); a full fine-tune (or QAT) checkpoint holds every weight. ``save_total_limit`` keeps the last
K. Resuming loads the weights and the optimizer state, skips the micro-batches already consumed and
continues the learning-rate schedule from the saved step: the loss curve goes on as if the run had
not been interrupted (tests/test_checkpoint.py).

``find`` and ``read_state`` import no torch (launch checks a resume with them).
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from engine.errors import InputError

STATE_FILE = "trainer_state.json"
FOLDER = "checkpoints"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# what a resume must share with the run that saved the checkpoint
MUST_MATCH = ("method", "model", "batch_size", "sequences_per_step", "seq_len", "seed")


def _complete(d: Path) -> bool:
    return (d / STATE_FILE).is_file()


def listed(folder: str | Path) -> list[Path]:
    """The complete checkpoints under a folder (a run's workdir, its checkpoints/ folder), oldest first."""
    folder = Path(folder)
    if (folder / FOLDER).is_dir():
        folder = folder / FOLDER
    out = [d for d in folder.glob("checkpoint-*") if d.is_dir() and _NAME.match(d.name) and _complete(d)]
    return sorted(out, key=lambda d: int(_NAME.match(d.name).group(1)))


def find(path: str | Path) -> Path:
    """The checkpoint a ``resume_from_checkpoint`` names: a checkpoint folder itself, or the last
    complete one under a run's workdir or its ``checkpoints/`` folder. InputError otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"train.resume_from_checkpoint: {str(path)!r} does not exist (give a checkpoint folder, "
                         "a run's workdir or a run id)", field="train.resume_from_checkpoint")
    if p.is_dir() and _complete(p):
        return p.resolve()
    found = listed(p) if p.is_dir() else []
    if not found:
        raise InputError(f"train.resume_from_checkpoint: no complete checkpoint in {p} (a checkpoint-<step> folder "
                         f"with {STATE_FILE}; a run writes them with train.save_steps)",
                         field="train.resume_from_checkpoint")
    return found[-1].resolve()


def read_state(ckpt: str | Path) -> dict:
    return json.loads((Path(ckpt) / STATE_FILE).read_text(encoding="utf-8"))


def identity(spec, method: str, world: int) -> dict:
    """The settings a checkpoint records and a resume must share."""
    tp = spec.train
    return {"method": method, "model": spec.model, "batch_size": tp.batch_size,
            "sequences_per_step": tp.batch_size * tp.grad_accum * world,
            "seq_len": tp.seq_len, "seed": spec.seed}


def check_resume(state: dict, spec, method: str, world: int, total_steps: int | None = None) -> None:
    """Refuse a resume whose run would not continue the checkpoint's (InputError naming the setting)."""
    want = identity(spec, method, world)
    bad = [f"{k}: checkpoint {state.get(k)!r}, this run {want[k]!r}" for k in MUST_MATCH if state.get(k) != want[k]]
    if bad:
        raise InputError("train.resume_from_checkpoint: the checkpoint was written by a different training set-up (" +
                         "; ".join(bad) + "); sequences per step = batch_size x grad_accum x processes",
                         field="train.resume_from_checkpoint")
    if total_steps is not None and state["step"] >= total_steps:
        raise InputError(f"train.resume_from_checkpoint: the checkpoint is at step {state['step']}, this run trains "
                         f"{total_steps} steps in all; ask for more steps", field="train.resume_from_checkpoint")


class Checkpointer:
    """Saves and loads the trainable state of one training loop (every rank calls it alike)."""

    def __init__(self, workdir, every: int | None, keep: int | None, meta: dict, resume: str | None = None,
                 log=None, artifact=None, lora: bool = True):
        self.folder = Path(workdir) / FOLDER
        self.every, self.keep, self.meta = every, keep, dict(meta)
        self.resume = Path(resume) if resume else None
        self.log = log or (lambda msg: None)
        self.artifact = artifact
        self.lora = lora                  # adapters only (the frozen base is not saved)
        self.saved: list[dict] = []

    def _opts(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(ignore_frozen_params=self.lora, strict=not self.lora)   # adapters: a partial load

    @staticmethod
    def _rank() -> int:
        import torch.distributed as dist
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @staticmethod
    def _barrier() -> None:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, step: int, model, opt, progress: dict, why: str = "every") -> None:
        """Write checkpoint-<step> (collective under FSDP: every rank calls it)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        t0 = time.perf_counter()
        out = self.folder / f"checkpoint-{step}"
        if self._rank() == 0 and out.exists():
            shutil.rmtree(out)
        self._barrier()
        msd, osd = get_state_dict(model, opt, options=self._opts())
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(out))
        self._barrier()
        if self._rank() == 0:
            state = {**self.meta, "step": step, "saved": why, "time": time.time(), **progress}
            (out / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
            size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
            rec = {"step": step, "path": str(out), "bytes": size, "seconds": round(time.perf_counter() - t0, 3),
                   "why": why}
            self.saved.append(rec)
            self.log(f"checkpoint at step {step} ({why}): {out} ({size / 2**20:.2f} MiB, {rec['seconds']}s)")
            if self.artifact is not None:
                self.artifact(out, "checkpoint")
            if self.keep:
                for old in listed(self.folder)[:-self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def load(self, model, opt) -> dict:
        """Load the resume checkpoint's weights and optimizer state into this model (any sharding);
        returns its trainer state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        state = read_state(self.resume)
        msd, osd = get_state_dict(model, opt, options=self._opts())    # initialises the optimizer's state
        box = {"model": msd, "optim": osd}
        dcp.load(box, checkpoint_id=str(self.resume))
        set_state_dict(model, opt, model_state_dict=box["model"], optim_state_dict=box["optim"], options=self._opts())
        self.log(f"resumed from {self.resume} (step {state['step']} of {state.get('total_steps')}, "
                 f"saved by {state.get('processes', 1)} process(es))")
        return state
