"""The dashboard under concurrent planners: latency, errors, and whether the process's threads
and memory keep growing (a leak) or level off.

    python bench/app_load.py                       # 20 clients x 4 rounds against a fresh app on 127.0.0.1
    python bench/app_load.py --clients 20 --rounds 6 --json out.json

Starts app.py in its own temporary TUNEQUANT_HOME (public demo off), opens ``--clients``
gradio_client sessions and, each round, has every client call ``/edit_seq_len`` (the wizard's
planner on an edit: scenario -> advisor -> matrix + four charts) at the same time, each with another
sequence length so no two answers are the same (``--same``: the same 20 each round, so the
planner's bounded caches, engine/advisor/assess.py's 8192 planner answers among them, stop
growing and only a leak would still grow). After each round it reads the app process's
thread count and RSS from /proc. Prints per round: p50/p95 latency, errors, threads, RSS.
A leak shows as threads or RSS still growing round after round; a bounded pool levels off.
Never pass/fail: figures for docs/ui.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def proc_stats(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    get = {ln.split(":")[0]: ln.split(":", 1)[1].strip() for ln in status.splitlines() if ":" in ln}
    return {"threads": int(get["Threads"]), "rss_mb": round(int(get["VmRSS"].split()[0]) / 1024, 1)}


def start_app(home: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "TUNEQUANT_HOME": str(home), "GRADIO_ANALYTICS_ENABLED": "False", "TUNEQUANT_PUBLIC_DEMO": "0"}
    for k in ("SPACE_ID", "TUNEQUANT_DB"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=open(home / "app.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit((home / "app.log").read_text()[-3000:])
            time.sleep(0.5)
    raise SystemExit("app did not start")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--port", type=int, default=7899)
    ap.add_argument("--same", action="store_true",
                    help="every round repeats the first round's 20 scenarios (the planner's caches stop growing: "
                         "what is left growing would be a leak)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from gradio_client import Client
    from engine.charts import MEMORY_VIEWS
    home = Path(tempfile.mkdtemp(prefix="tq-load-"))
    proc = start_app(home, args.port)
    url = f"http://127.0.0.1:{args.port}/"
    rounds = []
    try:
        base = proc_stats(proc.pid)
        print(f"app pid {proc.pid} at start: {base['threads']} threads, {base['rss_mb']} MB RSS")
        clients = [Client(url, verbose=False) for _ in range(args.clients)]

        def plan(i: int, r: int):
            t0 = time.perf_counter()
            try:                 # a person editing the sequence length: the whole plan recomputes
                out = clients[i].predict(256 + 16 * i + r, MEMORY_VIEWS[0], [], api_name="/edit_seq_len")
                ok = "tq-error" not in str(out)
                return time.perf_counter() - t0, None if ok else str(out[3])[:200]
            except Exception as e:
                return time.perf_counter() - t0, f"{type(e).__name__}: {e}"[:200]

        # one client alone first: the uncontended latency
        solo = [plan(0, 100 + k)[0] for k in range(3)]
        print(f"one client alone: median {statistics.median(solo) * 1000:.0f} ms")
        for r in range(args.rounds):
            with cf.ThreadPoolExecutor(args.clients) as pool:
                res = list(pool.map(lambda i: plan(i, 0 if args.same else r), range(args.clients)))
            lat = sorted(x[0] for x in res)
            errs = [x[1] for x in res if x[1]]
            time.sleep(1.0)
            st = proc_stats(proc.pid)
            row = {"round": r + 1, "p50_s": round(statistics.median(lat), 2),
                   "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 2), "errors": len(errs), **st}
            rounds.append(row)
            print(f"round {r + 1}: p50 {row['p50_s']} s, p95 {row['p95_s']} s, {len(errs)} errors, "
                  f"{st['threads']} threads, {st['rss_mb']} MB RSS" + (f"  first error: {errs[0]}" if errs else ""))
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    out = {"clients": args.clients, "solo_ms": round(statistics.median(solo) * 1000), "start": base, "rounds": rounds}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
