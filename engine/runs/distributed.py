"""Multi-process training: the train stage of a run whose spec asks for ``resources: {processes:
N}`` (CPU, gloo) or ``{gpus: N}`` (GPUs of one machine, NCCL) runs under torchrun with FSDP2
full sharding; the worker supervises the launcher and its ranks.

    launch_plan(spec)      what will run: processes, backend, sharding, the exact command
    supervise(ctx)         (in the worker, as the train stage) start torchrun, forward rank 0's
                           events, pass a stop on, attribute a failure to the rank that failed,
                           collect each rank's peak memory, hand the saved model to the next stages
    rank_pids(workdir)     the ranks a run started (the executor kills what is left of them)

The ranks run ``engine/runs/stages/rank.py`` (torch; FSDP in stages/fsdp.py); they write ``<workdir>/dist/rank-K.jsonl``
and read ``<workdir>/dist/stop``. torchrun starts each rank in a session of its own, so the
worker's process group does not reach them: on a stop the worker signals the launcher (which
passes SIGTERM on to its ranks) and then every rank by pid, until all are gone; each rank also
dies with its launcher (PR_SET_PDEATHSIG).

Imports no torch.
"""
from __future__ import annotations

import collections
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from engine.runs.faults import RankFailed, exit_reason

RANK_MODULE = "engine.runs.stages.rank"
# what the train stage leaves in ctx.state for the next stages (handed to the ranks and back)
STATE_KEYS = ("base_dir", "model_dir", "quant", "tokenizer_dir", "adapter_dir", "adapter_base", "qat")
SHARDING = "FSDP2 full sharding (fully_shard per decoder layer + the whole model)"
POLL_S = 0.2
STOP_TERM_S = 5.0          # after a stop: SIGTERM to the launcher, then SIGKILL to everything left after this
# what a rank raises when another rank vanished under a collective: not the cause, the consequence
LOST_PEER_TEXT = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout",
                  "connection was reset", "remote process exited", "NCCL communicator was aborted",
                  "Application timeout caused pair closure", "ProcessGroupGloo", "Gloo")


def backend(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def command(n: int, job_path: str | Path, python: str | None = None) -> list[str]:
    """The launcher command: torchrun (as ``python -m torch.distributed.run``: the same
    interpreter as the worker) on this machine, N ranks, no restarts."""
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
            "--max-restarts=0", "-m", RANK_MODULE, str(job_path)]


def launch_plan(spec, device: str | None = None, workdir: str | None = None) -> dict | None:
    """What a multi-process run will start (None for a one-process run): for the run preview,
    the CLI and the run record."""
    n = spec.world_size
    if n <= 1:
        return None
    device = device or ("cuda" if spec.resources.gpus else "cpu")
    job = f"{workdir or 'RUN_WORKDIR'}/dist/job.json"   # RUN_WORKDIR: $TUNEQUANT_HOME/runs/<run id>
    cmd = command(n, job, python="python")
    return {"processes": n, "device": device, "backend": backend(device), "sharding": SHARDING,
            "mixed_precision": "bf16 parameters, fp32 gradient reduction" if device == "cuda" else "none (fp32 on the CPU)",
            "stages": "train runs in the N processes; the other stages run once, in the worker",
            "command": shlex.join(cmd), "interconnect": "one machine (torchrun --standalone: a local rendezvous)"}


# -- reading what the ranks report -------------------------------------------------------
class _Tail:
    """New complete JSON lines of a growing file."""

    def __init__(self, path: Path):
        self.path, self.pos, self.buf = path, 0, ""

    def new(self) -> list[dict]:
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self.pos)
                chunk = f.read()
                self.pos = f.tell()
        except FileNotFoundError:
            return []
        self.buf += chunk
        *lines, self.buf = self.buf.split("\n")
        out = []
        for ln in lines:
            try:
                out.append(json.loads(ln))
            except json.JSONDecodeError:
                pass
        return out


def read_records(folder: str | Path) -> list[dict]:
    out = []
    for p in sorted(Path(folder).glob("rank-*.jsonl")):
        out += _Tail(p).new()
    return out


def rank_pids(workdir: str | Path) -> list[int]:
    """The pids of the ranks a run started (from their ``started`` records)."""
    return [int(r["pid"]) for r in read_records(Path(workdir) / "dist") if r.get("type") == "started" and r.get("pid")]


def launcher_failures(text: str) -> list[tuple[int, int]]:
    """(rank, exit code) of each failed rank in torchrun's failure report, the root cause first."""
    out = []
    for m in re.finditer(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", text):
        item = (int(m.group(1)), int(m.group(2)))
        if item not in out:
            out.append(item)
    root = re.search(r"Root Cause.*?rank\s*:\s*(\d+)\s*\(local_rank:\s*\d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", text, re.S)
    if root:
        item = (int(root.group(1)), int(root.group(2)))
        out = [item] + [x for x in out if x != item]
    return out


def _lost_peer(rec: dict) -> bool:
    text = f"{rec.get('message') or ''}\n{rec.get('traceback') or ''}"
    return any(t in text for t in LOST_PEER_TEXT) and rec.get("kind") == "exception"


def attribute(records: list[dict], launcher_text: str, returncode: int | None, n: int, stage: str = "train") -> RankFailed:
    """Which rank failed and why: a rank that raised something of its own (OOM, a bad input, a
    bug) first; else a rank killed by a signal from outside (not the SIGTERM the launcher sends
    the survivors); else the first rank that reported an error; else torchrun's root cause."""
    errors = sorted((r for r in records if r.get("type") == "error"), key=lambda r: r.get("ts", 0))
    own = [r for r in errors if not _lost_peer(r)]
    if own:
        r = own[0]
        return RankFailed(r["rank"], n, r.get("kind") or "exception", f"rank {r['rank']} of {n}: {r.get('reason')}",
                          r.get("message") or "")
    failures = launcher_failures(launcher_text)
    errored = {r["rank"] for r in errors}
    killed = [(rk, code) for rk, code in failures
              if code < 0 and -code not in (signal.SIGTERM, signal.SIGINT) and rk not in errored]
    for rk, code in killed + [x for x in failures if x[0] not in errored]:
        how = exit_reason(code).replace("worker process died ", "").replace("worker process exited", "exited")
        return RankFailed(rk, n, "rank-died", f"rank {rk} of {n} died in stage {stage} {how}", how)
    if errors:
        r = errors[0]
        return RankFailed(r["rank"], n, r.get("kind") or "exception", f"rank {r['rank']} of {n}: {r.get('reason')}",
                          r.get("message") or "")
    if failures:
        rk, code = failures[0]
        return RankFailed(rk, n, "rank-died", f"rank {rk} of {n} ended with code {code} in stage {stage}", "")
    return RankFailed(None, n, "launcher", f"the launcher (torchrun) ended with code {returncode} in stage {stage} "
                      "before any rank reported; see worker.log", "")


# -- the supervisor (runs in the worker, as the train stage) ------------------------------------
def _alive(pid: int) -> bool:
    """A live (not zombie) process (the executor's pid_alive imports this module: no cycle)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        if Path("/proc/self").exists():
            return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def end_all(proc: subprocess.Popen | None, pids: list[int], term_s: float = STOP_TERM_S) -> None:
    """SIGTERM the launcher (it passes the signal to its ranks) and every rank, wait up to
    ``term_s``, then SIGKILL whatever is left, until all are gone."""
    for pid in pids:
        _signal(pid, signal.SIGTERM, group=True)
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + term_s
    while time.monotonic() < deadline:
        if (proc is None or proc.poll() is not None) and not any(_alive(p) for p in pids):
            return
        time.sleep(0.05)
    while (proc is not None and proc.poll() is None) or any(_alive(p) for p in pids):
        if proc is not None and proc.poll() is None:
            proc.kill()
        for pid in pids:
            _signal(pid, signal.SIGKILL, group=True)
            _signal(pid, signal.SIGKILL)
        time.sleep(0.05)


def supervise(ctx) -> dict:
    """Run the train stage in ``spec.world_size`` processes under torchrun; returns the stage's
    result (rank 0's) with ``processes``, ``ranks`` (each rank's peak memory) and ``launch``."""
    spec, n = ctx.spec, ctx.spec.world_size
    method = ctx.stage.get("method", "lora")
    folder = Path(ctx.workdir) / "dist"
    folder.mkdir(parents=True, exist_ok=True)
    for old in list(folder.glob("rank-*.jsonl")) + [folder / "stop"]:
        old.unlink(missing_ok=True)
    job_path = folder / "job.json"
    job_path.write_text(json.dumps({
        "run_id": ctx.run_id, "spec": spec.to_dict(), "stage": ctx.stage, "index": ctx.index,
        "workdir": str(ctx.workdir), "dir": str(folder), "device": ctx.device,
        "state": {k: ctx.state[k] for k in STATE_KEYS if k in ctx.state}}, default=str))
    cmd = command(n, job_path)
    env = dict(os.environ)
    if ctx.device != "cuda":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    ctx.log(f"train {method} in {n} processes ({backend(ctx.device)}, {SHARDING}): {shlex.join(cmd)}")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    tail: collections.deque[str] = collections.deque(maxlen=400)

    def pump():                             # the launcher's and the ranks' output into worker.log
        for raw in iter(proc.stdout.readline, b""):
            text = raw.decode("utf-8", "replace")
            tail.append(text)
            sys.stdout.write(text)
            sys.stdout.flush()
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    rank0 = _Tail(folder / "rank-0.jsonl")
    others = [_Tail(folder / f"rank-{r}.jsonl") for r in range(1, n)]
    records: list[dict] = []
    stop_sent = False

    def drain():
        for rec in rank0.new():
            records.append(rec)
            if rec["type"] == "event":
                ctx.emit(rec["event"], **rec["payload"])
        for t in others:
            records.extend(t.new())

    try:
        while proc.poll() is None:
            drain()
            if not stop_sent and ctx.should_stop():
                (folder / "stop").touch()
                stop_sent = True
                ctx.log(f"stop passed to the {n} ranks (they stop together after the current step)")
            time.sleep(POLL_S)
        reader.join(timeout=5)
        drain()
    finally:
        if proc.poll() is None:            # leaving early (SIGTERM to the worker, an error here): end them all
            end_all(proc, [r["pid"] for r in records if r.get("type") == "started"])
    rc = proc.returncode
    result = next((r for r in records if r["type"] == "result"), None)
    if rc != 0 or result is None:
        raise attribute(records, "".join(tail), rc, n, ctx.name)
    ctx.state.update(result["state"])
    mems = sorted((r for r in records if r["type"] == "memory"), key=lambda r: r["rank"])
    ranks = [{k: r.get(k) for k in ("rank", "peak_mem_bytes", "mem_source", "cpu_peak_rss_bytes",
                                    "cuda_max_reserved_bytes") if r.get(k) is not None} for r in mems]
    return {**result["result"], "processes": n, "backend": backend(ctx.device), "sharding": SHARDING,
            "launch": shlex.join(cmd), "ranks": ranks}
