"""Data loss of issue 16, each reproduced with real processes and real files: a disk that refuses
writes during a run (a file-size limit, RLIMIT_FSIZE, on the CLI and its worker), a mistyped
calibration store, a zero-byte / foreign / damaged / truncated runs.sqlite (and `runs rebuild`
from the events.jsonl logs), a home that cannot be created."""
from __future__ import annotations

import json
import os
import resource
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
HOOK = f"{ROOT / 'tests' / 'hostile_stages.py'}:STAGES"


def cli(home, *args, timeout=120, preexec=None, env=None):
    e = dict(os.environ, TUNEQUANT_HOME=str(home), **(env or {}))
    e.pop("TUNEQUANT_DB", None)
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec)


def config(tmp_path, name="", steps=3):
    p = tmp_path / f"cfg-{abs(hash(name))}.yaml"
    p.write_text(yaml.safe_dump({"name": name, "model": "tiny-test", "strategy": "lora", "device": "cpu",
                                 "train": {"steps": steps}}))
    return p


def one_run(tmp_path, home) -> str:
    out = cli(home, "run", "--config", str(config(tmp_path)), "--json", "--stages", HOOK)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["id"]


def error_of(out) -> str:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    return json.loads(out.stdout)["error"]


# ---- disk full during a store write ---------------------------------------------------------------

def test_disk_full_ends_the_run_failed_with_the_cause_and_never_hangs(tmp_path):
    """The run writes 4000 log events; the files may not grow past 256 KiB (ulimit -f). The CLI
    must end (no hang: the subprocess timeout fails the test), the run failed, the cause said."""
    home = tmp_path / "home"
    limit = 256 * 1024

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = cli(home, "run", "--config", str(config(tmp_path, "chatty")), "--json", "--stages", HOOK,
              preexec=small_disk, timeout=150)
    assert out.returncode == 1, (out.stdout, out.stderr[-2000:])
    run = json.loads(out.stdout)
    assert run["status"] == "failed" and "run store could not be written" in run["reason"], run
    # later, with room again: the record says failed and why (not "interrupted")
    shown = cli(home, "runs", "show", run["id"], "--json")
    assert shown.returncode == 0, shown.stderr
    rec = json.loads(shown.stdout)
    rec = rec.get("run", rec)
    assert rec["status"] == "failed" and "run store could not be written" in rec["reason"], rec


# ---- calibration: a mistyped store, a refit that drops everything ------------------------------------

def test_calibrate_missing_store_exits_2_and_keeps_the_fit(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    fitted = home / "calibration.json"
    fitted.write_text(json.dumps({"schema": 1, "records": 24, "runs": 8, "factors": [{"x": 1}]}))
    before = fitted.read_bytes()
    env = {"TUNEQUANT_CALIBRATION": str(fitted)}
    msg = error_of(cli(home, "calibrate", "--store", str(home / "runz.sqlite"), "--json", env=env))
    assert "no run store at" in msg and fitted.read_bytes() == before
    # an existing but empty store: the refit would drop all 24 records -> refused, file kept
    (home / "empty.sqlite").touch()
    msg = error_of(cli(home, "calibrate", "--store", str(home / "empty.sqlite"), "--json", env=env))
    assert "refit refused" in msg and "24 record" in msg and fitted.read_bytes() == before
    # on purpose: written, the previous one kept as .bak
    out = cli(home, "calibrate", "--store", str(home / "empty.sqlite"), "--allow-empty", "--json", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (home / "calibration.json.bak").read_bytes() == before
    assert json.loads(fitted.read_text())["records"] == 0


def test_calibrate_store_that_is_not_a_store_exits_2(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    msg = error_of(cli(home, "calibrate", "--store", "/etc/passwd", "--json"))
    assert "not a tunequant run store" in msg


# ---- a lost, foreign, damaged or truncated runs.sqlite -------------------------------------------------

def test_zero_byte_store_is_detected_and_rebuilt_from_the_event_logs(tmp_path):
    home = tmp_path / "home"
    ids = [one_run(tmp_path, home), one_run(tmp_path, home)]
    db = home / "runs.sqlite"
    for side in ("-wal", "-shm"):
        Path(f"{db}{side}").unlink(missing_ok=True)
    db.write_bytes(b"")
    msg = error_of(cli(home, "runs", "list", "--json"))
    assert "empty (0 bytes)" in msg and "2 run(s) have event logs" in msg and "runs rebuild" in msg
    out = cli(home, "runs", "rebuild", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["runs"] == 2 and res["old_file"] and Path(res["old_file"]).exists()
    runs = json.loads(cli(home, "runs", "list", "--json").stdout)["runs"]
    assert sorted(r["id"] for r in runs) == sorted(ids)
    assert {r["status"] for r in runs} == {"finished"}
    shown = json.loads(cli(home, "runs", "show", ids[0], "--json").stdout)
    assert json.dumps(shown).count('"stage": "train"') >= 1
    # the rebuilt store takes new runs (sequence numbers continue per run, new ids)
    one_run(tmp_path, home)
    assert len(json.loads(cli(home, "runs", "list", "--json").stdout)["runs"]) == 3


@pytest.mark.parametrize("kind", ["garbage", "foreign", "truncated"])
def test_a_foreign_damaged_or_truncated_store_gets_one_clear_message(tmp_path, kind):
    home = tmp_path / "home"
    home.mkdir()
    db = home / "runs.sqlite"
    if kind == "garbage":
        db.write_bytes(os.urandom(5000))
        expect = "not an SQLite database"
    elif kind == "foreign":
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE invoices (id INTEGER)")
        con.commit()
        con.close()
        expect = "of something else"
    else:
        one_run(tmp_path, home)
        con = sqlite3.connect(db)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        size = db.stat().st_size
        with open(db, "r+b") as f:
            f.truncate(size // 2)
        expect = "truncated"
    for args in (("runs", "list", "--json"), ("run", "--config", str(config(tmp_path)), "--json", "--stages", HOOK)):
        msg = error_of(cli(home, *args))
        assert expect in msg, msg


def test_a_home_that_cannot_be_created_is_one_message(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    msg = error_of(cli(blocker / "home", "runs", "list", "--json"))
    assert "set TUNEQUANT_HOME to a writable folder" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files anyway")
def test_a_read_only_store_is_one_message(tmp_path):
    home = tmp_path / "home"
    one_run(tmp_path, home)
    os.chmod(home / "runs.sqlite", 0o444)
    try:
        msg = error_of(cli(home, "run", "--config", str(config(tmp_path)), "--json", "--stages", HOOK))
        assert "read-only" in msg or "cannot be opened for writing" in msg
    finally:
        os.chmod(home / "runs.sqlite", 0o644)


@pytest.mark.slow        # starts the app (~15 s); the handlers alone: test_the_runs_screens_say_a_lost_store
def test_the_app_shows_a_lost_store_as_a_banner_not_an_error(tmp_path):
    """A zero-byte runs.sqlite beside runs' event logs: the page loads, its banner says what is
    wrong and what to do, the runs screens show no runs (no Gradio error)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from browser_app import serve_app
    from gradio_client import Client
    home = tmp_path / "home"
    one_run(tmp_path, home)
    (home / "runs.sqlite").write_bytes(b"")
    for side in ("-wal", "-shm"):
        Path(f"{home / 'runs.sqlite'}{side}").unlink(missing_ok=True)
    with serve_app(home) as app:
        out = Client(app["url"], verbose=False).predict(api_name="/on_load")
    banner = out[-1]
    assert "run store cannot be used" in banner and "runs rebuild" in banner and "tq-error" in banner
    assert (home / "runs.sqlite").stat().st_size == 0           # nothing was silently recreated


def test_the_runs_screens_say_a_lost_store(tmp_path, monkeypatch):
    """The dashboard's handlers on a zero-byte store beside event logs: the banner's message, and
    empty run lists instead of an exception."""
    home = tmp_path / "home"
    (home / "runs" / "r-x").mkdir(parents=True)
    (home / "runs" / "r-x" / "events.jsonl").write_text("{}\n")
    (home / "runs.sqlite").write_bytes(b"")
    monkeypatch.setenv("TUNEQUANT_HOME", str(home))
    monkeypatch.delenv("TUNEQUANT_DB", raising=False)
    from engine.runs import api
    monkeypatch.setattr(api, "_executor", None)
    from ui import compare, runs
    assert "runs rebuild" in runs.store_problem()
    assert runs.history_rows() == [] and runs.run_choices() == [] and compare.run_choices() == []
