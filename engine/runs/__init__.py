"""Runs: the store (SQLite), the executor (one worker process per run), the worker, the stages.

The public API (imports no torch; see engine/runs/api.py and docs/runs.md):
    launch, list_runs, get_run, events, stop, wait, recover, log_tail, summary
"""
from engine.runs.api import (events, get_run, launch, list_runs, log_tail, recover, stop, summary,  # noqa: F401
                             use_store, wait)
