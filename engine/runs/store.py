"""The run store: one SQLite file (WAL) with a ``runs`` table and an append-only ``events`` table.

Default path ``$TUNEQUANT_HOME/runs.sqlite`` (``TUNEQUANT_HOME`` defaults to ./workspace);
``TUNEQUANT_DB`` overrides the file alone. Every run also gets its own folder
``$TUNEQUANT_HOME/runs/<run id>/`` holding its artifacts, ``worker.log`` (the worker's
stdout and stderr) and ``events.jsonl`` (a second, append-only copy of its events).

Writers: the executor (queued), the worker (everything while it runs) and whoever notices a
dead worker or stops a run (the final events). Each write is one short ``BEGIN IMMEDIATE``
transaction, so sequence numbers are gap-free per run, and readers (UI, CLI) never block
the writer (WAL). Events can neither be updated nor deleted (triggers), and the final
status of a run is set once: ``finish()`` only moves a run that is still queued/running.

Pure Python (sqlite3); imports no torch.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from engine.errors import InputError
from engine.safeload import finite
from engine.secrets_mask import redact_tokens
from engine.workspace import home  # noqa: F401  (store.home: where the store and the runs live)

STATUSES = ("queued", "running", "finished", "failed", "stopped", "interrupted")
ACTIVE = ("queued", "running")
FINAL = ("finished", "failed", "stopped", "interrupted")
JSON_COLUMNS = ("spec", "estimate", "versions", "machine", "result", "executor")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    strategy TEXT NOT NULL,
    model TEXT NOT NULL,
    device TEXT NOT NULL DEFAULT 'cpu',        -- cuda | cpu: decided at launch (queueing)
    status TEXT NOT NULL CHECK (status IN ('queued','running','finished','failed','stopped','interrupted')),
    reason TEXT,
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    pid INTEGER,
    stop_requested REAL,                       -- when a stop was asked for (stages poll it)
    workdir TEXT NOT NULL,
    stages_hook TEXT,                          -- "module:NAME" of a stage table other than engine.runs.stages
    spec TEXT NOT NULL,
    estimate TEXT,
    versions TEXT,
    machine TEXT,
    result TEXT,
    executor TEXT                              -- JSON: where the run executes when not here (Ray: address, job id)
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status, created);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL REFERENCES runs(id),
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    type TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS runs_no_delete BEFORE DELETE ON runs
    BEGIN SELECT RAISE(ABORT, 'runs are never deleted'); END;
"""


class StoreError(InputError):
    """The run store cannot be used as it is (missing or read-only folder, a file that is not a
    run store, damaged, truncated, or a disk that refuses writes): one message saying what to do.
    An InputError, so the CLI exits 2 with it and the app shows it instead of a traceback."""


class StoreWriteError(StoreError):
    """A write to the store failed (disk full, file size limit, I/O error, read-only file)."""


# the line a worker prints to worker.log when it cannot record its run's end in the store: whoever
# notices the dead worker later ends the run failed with this cause (executor._worker_gone)
STORE_FAILURE_MARK = "TUNEQUANT-STORE-WRITE-FAILED: "
SQLITE_MAGIC = b"SQLite format 3\x00"
REBUILD_HINT = "`python -m engine runs rebuild` rebuilds it from the runs' events.jsonl logs"


def check_file(path: Path, runs_dir: Path | None = None) -> None:
    """Refuse a store file that is not a usable run store (cheap: the header, the size it says
    it has, and the two tables): zero bytes while runs have event logs, a foreign or damaged
    file, a truncated one, a foreign SQLite database. A missing file is fine (a new store)."""
    path = Path(path)
    if not path.exists():
        return
    if path.is_dir():
        raise StoreError(f"run store {path} is a directory, not a file; set TUNEQUANT_DB to a file path")
    runs_dir = runs_dir or path.parent / "runs"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(100)
    except PermissionError:
        raise StoreError(f"run store {path} cannot be read (permission denied); fix its permissions or point "
                         f"TUNEQUANT_HOME at a folder you own")
    if size == 0:
        logs = list(runs_dir.glob("*/events.jsonl")) if runs_dir.is_dir() else []
        if logs:
            raise StoreError(f"run store {path} is empty (0 bytes) but {len(logs)} run(s) have event logs under "
                             f"{runs_dir}; the database was lost or truncated: {REBUILD_HINT}")
        return
    if not head.startswith(SQLITE_MAGIC):
        raise StoreError(f"{path} is not a tunequant run store (not an SQLite database: foreign or damaged "
                         f"file); move it away, or {REBUILD_HINT}")
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    pages = int.from_bytes(head[28:32], "big")
    valid = head[24:28] == head[92:96]
    if valid and pages and size < pages * page:
        raise StoreError(f"run store {path} is truncated ({size} bytes; its header says {pages * page}); "
                         f"{REBUILD_HINT}")


def default_db_path() -> Path:
    return Path(os.environ.get("TUNEQUANT_DB") or home() / "runs.sqlite").expanduser().resolve()


def db_path(store=None) -> Path:
    """The file of a store given as a RunStore, a path, or None (the default store)."""
    if store is None:
        return default_db_path()
    return Path(getattr(store, "path", store)).expanduser().resolve()


def finished_runs(store=None) -> list[dict]:
    """Every finished run of a store (a RunStore, a path, or None: the default), oldest first,
    read-only: a store file that does not exist has none and is not created. What calibration
    and the advisor's measured evidence read (the run store's public read path)."""
    path = db_path(store)
    if not path.is_file():
        return []
    check_file(path)
    if path.stat().st_size == 0:
        return []                                    # a new, empty store (no event logs beside it)
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    con.row_factory = sqlite3.Row
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return []
        if not tables & {"runs", "events"}:
            raise StoreError(f"{path} is an SQLite database of something else (tables: {', '.join(sorted(tables))}), "
                             f"not a tunequant run store")
        if "runs" not in tables:                     # another process is creating it: no runs yet
            return []
        rows = con.execute("SELECT * FROM runs WHERE status = 'finished' ORDER BY created, id").fetchall()
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path} is not a readable tunequant run store ({e}); {REBUILD_HINT}")
    finally:
        con.close()
    return [RunStore._row(r) for r in rows]


def _retry_busy(fn, seconds: float = 60.0):
    """Call fn, retrying while SQLite says the file is locked or busy (another process is
    creating or converting it); other errors, and a lock held longer than `seconds`, raise."""
    deadline, pause = time.monotonic() + seconds, 0.01
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            msg = str(e).lower()
            if ("locked" not in msg and "busy" not in msg) or time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.5)


def _store_problem(path: Path, e: Exception) -> str:
    """A person's message for an SQLite error on the store file."""
    msg = str(e).lower()
    if "locked" in msg or "busy" in msg:
        return f"run store {path} stayed locked by another process for over a minute ({e}); retry"
    if "readonly" in msg or "read-only" in msg or "unable to open" in msg:
        return (f"run store {path} cannot be opened for writing ({e}); fix the permissions, or set TUNEQUANT_HOME to "
                f"a writable folder")
    if "full" in msg or "disk i/o" in msg or "too large" in msg or isinstance(e, OSError):
        return f"run store {path}: the disk refused a write ({e}); free disk space and retry"
    return f"run store {path} is damaged ({e}); {REBUILD_HINT}"


def _dumps(obj) -> str:
    """Strict JSON (non-finite numbers as null) with access tokens masked."""
    return redact_tokens(json.dumps(finite(obj), default=str, allow_nan=False))


class RunStore:
    """The runs and their events in one SQLite file. Safe to use from several threads and
    processes at once (one connection per thread; WAL; writes retry while the file is busy)."""

    def __init__(self, path: str | Path | None = None, runs_dir: str | Path | None = None):
        self.path = Path(path).expanduser().resolve() if path else default_db_path()
        self.runs_dir = Path(runs_dir).expanduser().resolve() if runs_dir else self.path.parent / "runs"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.runs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the run store's folder {self.path.parent} ({e.strerror}); set "
                             f"TUNEQUANT_HOME to a writable folder (or TUNEQUANT_DB to a writable file)")
        check_file(self.path, self.runs_dir)
        self._local = threading.local()
        try:
            db = self._db()
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and not tables & {"runs", "events"}:    # (one of them alone: another process is creating it)
                raise StoreError(f"{self.path} is an SQLite database of something else (tables: "
                                 f"{', '.join(sorted(tables))}), not a tunequant run store; point TUNEQUANT_DB "
                                 f"elsewhere or move it away")
            # idempotent, and several processes may open the store at once: create only what is
            # missing, retrying while another process holds the lock (see _retry_busy)
            if "events" not in tables:
                _retry_busy(lambda: db.executescript(SCHEMA))
            cols = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
            if "executor" not in cols:              # a store made before runs could execute elsewhere
                def add():
                    if "executor" not in {r[1] for r in db.execute("PRAGMA table_info(runs)")}:
                        db.execute("ALTER TABLE runs ADD COLUMN executor TEXT")
                _retry_busy(add)
            if not os.access(self.path, os.W_OK) or not os.access(self.path.parent, os.W_OK):
                raise StoreError(f"run store {self.path} is read-only (the file or its folder is not writable); "
                                 f"runs could not be recorded: fix the permissions or set TUNEQUANT_HOME to a "
                                 f"writable folder")
        except sqlite3.DatabaseError as e:
            self.close()
            raise StoreError(_store_problem(self.path, e))

    # -- connections -------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=60000")
            # WAL is a property of the file: set once by whoever creates it. Switching needs an
            # exclusive lock, and SQLite answers "database is locked" at once (no busy wait, to
            # avoid a deadlock) when another process is opening the same new file: retry.
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                _retry_busy(lambda: db.execute("PRAGMA journal_mode=WAL"))
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    class _Tx:
        def __init__(self, db, path=None):
            self.db, self.path = db, path

        def _failed(self, e):
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            return StoreWriteError(_store_problem(self.path, e))

        def __enter__(self):
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as e:
                raise self._failed(e) from e
            return self.db

        def __exit__(self, exc_type, exc, tb):
            if exc_type is None:
                try:
                    self.db.execute("COMMIT")
                except sqlite3.OperationalError as e:
                    raise self._failed(e) from e
                return False
            if isinstance(exc, (sqlite3.OperationalError, OSError)):    # disk full, size limit, I/O
                raise self._failed(exc) from exc
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            return False

    def _write(self):
        """A write transaction (takes the write lock at once, so read-then-write is atomic)."""
        return self._Tx(self._db(), self.path)

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- runs --------------------------------------------------------------
    def workdir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def create_run(self, run_id: str, spec: dict, device: str, stages_hook: str | None = None,
                   executor: dict | None = None) -> dict:
        wd = self.workdir(run_id)
        wd.mkdir(parents=True, exist_ok=False)
        with self._write() as db:
            db.execute(
                "INSERT INTO runs (id, name, strategy, model, device, status, created, workdir, stages_hook, spec,"
                " executor) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
                (run_id, redact_tokens(spec.get("name") or ""), spec["strategy"], redact_tokens(spec["model"]),
                 device, time.time(), str(wd), stages_hook, _dumps(spec), _dumps(executor) if executor else None))
        return self.get_run(run_id)

    def mirror_event(self, run_id: str, remote_seq: int, type: str, payload: dict, ts: float | None = None) -> bool:
        """Append an event of a run that executes elsewhere (a Ray job), once: only when it is the
        next one of the remote stream (``executor.remote_seq`` + 1, advanced in the same
        transaction), so several followers of one run never duplicate or skip an event.
        ``type`` None only advances the stream (an event not copied). Returns whether it applied."""
        with self._write() as db:
            row = db.execute("SELECT executor FROM runs WHERE id=?", (run_id,)).fetchone()
            info = json.loads(row["executor"]) if row and row["executor"] else None
            if info is None or int(remote_seq) != int(info.get("remote_seq", 0)) + 1:
                return False
            info["remote_seq"] = int(remote_seq)
            db.execute("UPDATE runs SET executor=? WHERE id=?", (_dumps(info), run_id))
            if type is not None:
                self._append(db, run_id, type, payload, ts or time.time())
            return True

    def update_run(self, run_id: str, **fields) -> None:
        """Set columns of a run (JSON columns take Python objects)."""
        if not fields:
            return
        cols, vals = [], []
        for k, v in fields.items():
            if k in ("id", "status"):
                raise ValueError(f"{k} is set only through create_run/set_running/finish")
            cols.append(f"{k} = ?")
            vals.append(_dumps(v) if k in JSON_COLUMNS and v is not None else v)
        with self._write() as db:
            db.execute(f"UPDATE runs SET {', '.join(cols)} WHERE id = ?", (*vals, run_id))

    def set_running(self, run_id: str, pid: int) -> bool:
        """queued -> running (False if the run already ended, e.g. stopped while queued)."""
        with self._write() as db:
            cur = db.execute("UPDATE runs SET status='running', started=?, pid=? WHERE id=? AND status='queued'",
                             (time.time(), pid, run_id))
            return cur.rowcount == 1

    def finish(self, run_id: str, status: str, reason: str | None = None, result: dict | None = None,
               event: dict | None = None, before: list[tuple[str, dict]] = ()) -> bool:
        """End a queued/running run once: set its final status, reason (and result) and append the
        events ``before`` (e.g. an error) and the ``finished`` event in the same transaction.
        Returns False (and changes nothing) if the run had already ended, so the first one to
        finish a run wins (worker, stopper or watcher)."""
        assert status in FINAL, status
        with self._write() as db:
            row = db.execute("SELECT status, result FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None or row["status"] not in ACTIVE:
                return False
            now = time.time()
            if result is None and row["result"]:
                result = json.loads(row["result"])
            reason = redact_tokens(reason)
            db.execute("UPDATE runs SET status=?, reason=?, ended=?, result=? WHERE id=?",
                       (status, reason, now, _dumps(result) if result is not None else None, run_id))
            for type, payload in before:
                self._append(db, run_id, type, payload, now)
            self._append(db, run_id, "finished", {"status": status, "reason": reason, **(event or {})}, now)
        return True

    def get_run(self, run_id: str) -> dict | None:
        row = self._db().execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        return self._row(row) if row else None

    def list_runs(self, status: str | None = None, limit: int | None = None) -> list[dict]:
        """Runs, newest first (optionally of one status)."""
        q, args = "SELECT * FROM runs", []
        if status:
            q += " WHERE status=?"
            args.append(status)
        q += " ORDER BY created DESC, id DESC"
        if limit:
            q += " LIMIT ?"
            args.append(int(limit))
        return [self._row(r) for r in self._db().execute(q, args)]

    def active_runs(self) -> list[dict]:
        """Queued and running runs, oldest first."""
        rows = self._db().execute("SELECT * FROM runs WHERE status IN ('queued','running') ORDER BY created, id")
        return [self._row(r) for r in rows]

    def request_stop(self, run_id: str) -> bool:
        """Raise the stop flag of an active run (the worker's stages poll it)."""
        with self._write() as db:
            cur = db.execute("UPDATE runs SET stop_requested=COALESCE(stop_requested, ?) "
                             "WHERE id=? AND status IN ('queued','running')", (time.time(), run_id))
            return cur.rowcount == 1

    def stop_requested(self, run_id: str) -> bool:
        row = self._db().execute("SELECT stop_requested FROM runs WHERE id=?", (run_id,)).fetchone()
        return bool(row and row[0])

    @staticmethod
    def _row(row: sqlite3.Row) -> dict:
        d = dict(row)
        for k in JSON_COLUMNS:
            if d.get(k):
                d[k] = json.loads(d[k])
        return d

    # -- events ------------------------------------------------------------
    def _append(self, db, run_id: str, type: str, payload: dict, ts: float) -> int:
        seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE run_id=?", (run_id,)).fetchone()[0]
        text = _dumps(payload)
        db.execute("INSERT INTO events (run_id, seq, ts, type, payload) VALUES (?, ?, ?, ?, ?)",
                   (run_id, seq, ts, type, text))
        # the second copy, written under the same lock so the file is in sequence order
        wd = self.workdir(run_id)
        if wd.is_dir():
            with open(wd / "events.jsonl", "a", encoding="utf-8") as f:
                f.write(_dumps({"run_id": run_id, "seq": seq, "ts": ts, "type": type, "payload": payload}) + "\n")
        return seq

    def append_event(self, run_id: str, type: str, payload: dict | None = None) -> int:
        """Append one event; returns its sequence number (1, 2, ... per run)."""
        with self._write() as db:
            return self._append(db, run_id, type, payload or {}, time.time())

    def events(self, run_id: str, after_seq: int = 0, limit: int | None = None,
               types: tuple[str, ...] | None = None) -> list[dict]:
        """Events of a run with seq > after_seq, in order (re-attach: pass the last seq you saw)."""
        q, args = "SELECT seq, ts, type, payload FROM events WHERE run_id=? AND seq>?", [run_id, int(after_seq)]
        if types:
            q += f" AND type IN ({', '.join('?' * len(types))})"
            args += list(types)
        q += " ORDER BY seq"
        if limit:
            q += " LIMIT ?"
            args.append(int(limit))
        return [{"seq": r["seq"], "ts": r["ts"], "type": r["type"], **json.loads(r["payload"])}
                for r in self._db().execute(q, args)]

    def last_seq(self, run_id: str) -> int:
        return self._db().execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE run_id=?", (run_id,)).fetchone()[0]

    def event_counts(self, run_id: str) -> dict[str, int]:
        rows = self._db().execute("SELECT type, COUNT(*) FROM events WHERE run_id=? GROUP BY type", (run_id,))
        return {r[0]: r[1] for r in rows}


# -- rebuilding the database from the runs' event logs -----------------------------------------------
def _read_log(path: Path) -> list[dict]:
    """The events of one events.jsonl, in seq order (a torn last line, from a crash, is skipped)."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for ln in f:
            try:
                ev = json.loads(ln)
            except ValueError:
                continue
            if isinstance(ev, dict) and isinstance(ev.get("seq"), int) and ev.get("type"):
                out.append(ev)
    seen, events = set(), []
    for ev in sorted(out, key=lambda e: e["seq"]):
        if ev["seq"] not in seen:
            seen.add(ev["seq"])
            events.append(ev)
    return events


def _row_from_events(run_id: str, workdir: Path, events: list[dict]) -> dict:
    """The runs row an event log implies: what launched it, when, how it ended, what it measured."""
    by = {}
    for ev in events:
        by.setdefault(ev["type"], []).append(ev)
    q = (by.get("queued") or [{}])[0].get("payload") or {}
    started = (by.get("started") or [None])[0]
    fin = (by.get("finished") or [None])[-1]
    spec = q.get("spec") if isinstance(q.get("spec"), dict) else \
        {"model": q.get("model") or "?", "strategy": q.get("strategy") or "?", "device": q.get("device") or "cpu"}
    result = {"stages": [], "metrics": {}, "eval": {}, "artifacts": []}
    for ev in events:
        p = ev.get("payload") or {}
        if ev["type"] == "stage_finished":
            result["stages"].append(p)
        elif ev["type"] == "metric" and p.get("name"):
            result["metrics"][p["name"]] = {"value": p.get("value"), "unit": p.get("unit")}
        elif ev["type"] == "eval":
            result["eval"][p.get("name") or f"eval{len(result['eval'])}"] = p.get("metrics")
        elif ev["type"] == "artifact":
            result["artifacts"].append({"path": str(p.get("path")), "kind": p.get("kind")})
        elif ev["type"] == "error" and p.get("kind"):
            result["error"] = {k: p.get(k) for k in ("stage", "kind", "message", "reason", "suggestions")}
    if fin is not None:
        status = (fin.get("payload") or {}).get("status") or "failed"
        reason = (fin.get("payload") or {}).get("reason")
    else:
        status, reason = "interrupted", "rebuilt from events.jsonl: the log ends before the run ended"
    return {"id": run_id, "name": spec.get("name") or "", "strategy": spec.get("strategy") or "?",
            "model": spec.get("model") or "?", "device": q.get("device") or spec.get("device") or "cpu",
            "status": status if status in STATUSES else "failed", "reason": reason,
            "created": events[0]["ts"], "started": started["ts"] if started else None,
            "ended": fin["ts"] if fin else events[-1]["ts"],
            "pid": (started.get("payload") or {}).get("pid") if started else None,
            "workdir": str(workdir), "spec": {**spec, "rebuilt_from": "events.jsonl"}, "result": result}


def rebuild(path=None, runs_dir=None) -> dict:
    """Rebuild the run store from every ``runs/<id>/events.jsonl`` (the append-only second copy of
    each run's events): a new database is written beside the old one and renamed over it; the
    old file (and its -wal/-shm) is kept as ``<name>.broken-<time>``. Returns what was done.
    What only the database held is not in the logs: a run's library versions, machine and the
    planner's estimate (and, for runs launched before the spec was logged, its name and spec)."""
    path = db_path(path)
    runs_dir = Path(runs_dir).resolve() if runs_dir else path.parent / "runs"
    logs = sorted(runs_dir.glob("*/events.jsonl")) if runs_dir.is_dir() else []
    tmp = path.with_name(f".{path.name}.rebuild-{os.getpid()}")
    for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        if p.exists():
            p.unlink()
    try:
        con = sqlite3.connect(tmp, isolation_level=None)
        con.executescript(SCHEMA)
        runs, events = 0, 0
        con.execute("BEGIN")
        for log in logs:
            evs = _read_log(log)
            if not evs:
                continue
            row = _row_from_events(log.parent.name, log.parent, evs)
            con.execute("INSERT INTO runs (id, name, strategy, model, device, status, reason, created, started, ended,"
                        " pid, workdir, spec, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (row["id"], row["name"], row["strategy"], row["model"], row["device"], row["status"],
                         row["reason"], row["created"], row["started"], row["ended"], row["pid"], row["workdir"],
                         _dumps(row["spec"]), _dumps(row["result"])))
            for ev in evs:
                con.execute("INSERT INTO events (run_id, seq, ts, type, payload) VALUES (?, ?, ?, ?, ?)",
                            (row["id"], ev["seq"], ev["ts"], ev["type"], _dumps(ev.get("payload") or {})))
            runs, events = runs + 1, events + len(evs)
        con.execute("COMMIT")
        con.close()
    except (OSError, sqlite3.Error) as e:
        raise StoreError(f"could not rebuild the run store at {path} ({e}); nothing was changed")
    kept = None
    if path.exists():
        kept = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, kept)
        for side in ("-wal", "-shm"):
            if Path(f"{path}{side}").exists():
                os.replace(f"{path}{side}", f"{kept}{side}")
    os.replace(tmp, path)
    return {"path": str(path), "runs": runs, "events": events, "logs": len(logs),
            "old_file": str(kept) if kept else None}
