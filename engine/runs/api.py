"""The runs API the UI and the CLI call (re-exported by ``engine.runs``). Imports no torch.

    launch(spec_or_dict_or_path, stages=None, executor_kind=None, address=None) -> run_id
                                                              validates first (InputError), returns at once;
                                                              address: a Ray cluster runs it (ray_backend)
    list_runs(status=None, limit=None) -> list[dict]          newest first
    get_run(run_id) -> dict                                   the row: status, reason, spec, estimate,
                                                              versions, machine, result, workdir, pid, ...
    events(run_id, after_seq=0, limit=None) -> list[dict]     re-attach: pass the last seq you saw
    stop(run_id, wait=False) -> dict                          flag -> SIGTERM -> SIGKILL until gone
    wait(run_id, timeout=None) -> dict                        the run once it ended (or at the timeout)
    recover() -> list[str]                                    runs marked interrupted (done on first use)
    log_tail(run_id, lines=50) -> list[str]                   the end of the worker's stdout/stderr
    summary(run_id) -> dict                                   the run plus an events summary (``runs show``)
    store_path() -> Path                                      the store file read (opens nothing)

One Executor per process, on the store at ``$TUNEQUANT_DB`` / ``$TUNEQUANT_HOME/runs.sqlite``;
``use_store(path)`` points the API at another file (tests, a second workspace).
"""
from __future__ import annotations

import threading
from collections import deque
from pathlib import Path

from engine.runs.events import summary as _events_summary
from engine.runs.executor import Executor
from engine.runs.store import RunStore, default_db_path

_executor: Executor | None = None
_lock = threading.Lock()


def executor() -> Executor:
    """This process's executor (created on first use; creating it recovers orphaned runs)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = Executor(RunStore())
        return _executor


def use_store(path: str | Path | None = None, runs_dir: str | Path | None = None) -> Executor:
    """Point the API at another store file (None: the default); returns the new executor."""
    global _executor
    with _lock:
        _executor = Executor(RunStore(path, runs_dir))
        return _executor


def store_path() -> Path:
    """The store file this API reads: the one ``use_store`` pointed at, else the default
    (``$TUNEQUANT_DB`` / ``$TUNEQUANT_HOME/runs.sqlite``). Opens nothing."""
    ex = _executor
    return ex.store.path if ex is not None else default_db_path()


def launch(spec, stages: str | None = None, executor_kind: str | None = None, address: str | None = None) -> str:
    """Start a run here, or with ``address`` (``executor_kind`` "ray") as a job on that Ray cluster."""
    return executor().launch(spec, stages=stages, executor=executor_kind, address=address)


def list_runs(status: str | None = None, limit: int | None = None) -> list[dict]:
    return executor().list_runs(status=status, limit=limit)


def get_run(run_id: str) -> dict:
    return executor().get_run(run_id)


def events(run_id: str, after_seq: int = 0, limit: int | None = None) -> list[dict]:
    ex = executor()
    ex.get_run(run_id)
    return ex.store.events(run_id, after_seq=after_seq, limit=limit)


def stop(run_id: str, wait: bool = False, grace_s: float | None = None, term_s: float | None = None) -> dict:
    """Stop a run. By default returns at once (the UI must not block) while a background thread
    escalates flag -> SIGTERM -> SIGKILL; ``wait=True`` returns once the worker is gone."""
    return executor().stop(run_id, wait=wait, grace_s=grace_s, term_s=term_s)


def wait(run_id: str, timeout: float | None = None) -> dict:
    return executor().wait(run_id, timeout=timeout)


def recover() -> list[str]:
    return executor().recover()


def log_tail(run_id: str, lines: int = 50) -> list[str]:
    path = Path(get_run(run_id)["workdir"]) / "worker.log"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        return [ln.rstrip("\n") for ln in deque(f, maxlen=lines)]


def summary(run_id: str) -> dict:
    """The run and what its events say (counts, last step, stages, warnings, errors, last logs)."""
    run = get_run(run_id)
    evs = executor().store.events(run_id)
    return {**run, "events": _events_summary(evs)}
