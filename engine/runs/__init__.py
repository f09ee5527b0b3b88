"""Runs: the store (SQLite), the executor (one worker process per run), the worker, the stages.

Importing this package loads nothing: import the module you need. The public API (imports no
torch; docs/runs.md) is ``engine.runs.api``: launch, list_runs, get_run, events, stop, wait,
recover, log_tail, summary, use_store; ``engine.runs.evidence`` hands the store's finished runs
to the layers below (the advisor's measured evidence, the report, calibration).
"""
