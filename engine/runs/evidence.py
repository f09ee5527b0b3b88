"""The run store's finished runs, handed to the layers below: the advisor's measured evidence,
the report's runs and the calibration records. The advisor, the report and calibration read no
database themselves; the CLI and the dashboard go through here.

    finished_runs() -> list[dict]               every finished run of the API's store, newest first
                                                (read again only when the file changed)
    measured_runs(scenario) -> list[dict]       the scenario's ``measured`` field resolved:
                                                store (default) | none | run ids
    recommend(scenario, ...) -> dict            engine.advisor.recommend with those runs
    select_runs(scenario, runs) -> (runs, how)  the report's runs: model (default) | all | none | ids
    report_data(scenario, runs=None) -> dict    engine.report.collect with the selected and measured runs
    report(scenario, runs=None, fmt="html")     the report rendered (engine.report.render)

``TUNEQUANT_MEASURED=off`` switches the store read of ``measured: store`` off (tests, sandboxes);
run ids given explicitly are still read. Imports no torch (sqlite only).
"""
from __future__ import annotations

import os

from engine.errors import InputError
from engine.runs import api, store as run_store

MAX_RUNS = 20          # newest finished runs the report shows when picked by model or "all"
_cache: dict = {}


def finished_runs() -> list[dict]:
    """Finished runs of the API's store (engine.runs.api.store_path), newest first; none when the
    file does not exist. Read again only when the file changed: the dashboard asks on every input
    change."""
    path = api.store_path()
    if not path.is_file():
        return []
    stamp = tuple((p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else None
                  for p in (path, path.with_name(path.name + "-wal")))
    hit = _cache.get(str(path))
    if hit and hit[0] == stamp:
        return list(hit[1])
    runs = sorted(run_store.finished_runs(path), key=lambda r: (r.get("created") or 0, r["id"]), reverse=True)
    _cache[str(path)] = (stamp, runs)
    return list(runs)


def _store_off() -> bool:
    return os.environ.get("TUNEQUANT_MEASURED", "").strip().lower() in ("off", "none", "0", "false")


def get_runs(ids, field: str) -> list[dict]:
    """Runs by id from the API's store; an unknown id is an InputError for ``field``."""
    out = []
    for i, rid in enumerate(ids):
        try:
            out.append(api.get_run(str(rid)))
        except (InputError, KeyError) as e:
            raise InputError(f"{field}[{i}]: no run {rid!r} in the run store ({e})", field=field) from None
    return out


def measured_runs(scenario) -> list[dict]:
    """The runs the scenario's ``measured`` field names: ``store`` (default) the store's finished
    runs (none with TUNEQUANT_MEASURED=off), ``none`` none, a list of run ids those runs. The
    advisor keeps the finished runs of the scenario's model (engine.advisor.measured_runs)."""
    from engine.advisor import scenario_of
    src = scenario_of(scenario).measured
    if src == "none":
        return []
    if src == "store":
        return [] if _store_off() else finished_runs()
    return get_runs(src, "measured")


def recommend(scenario, rules=None, what_if: bool = True, runs=None) -> dict:
    """The decision matrix with the user's measured runs (``runs`` given: those run records)."""
    from engine import advisor
    sc = advisor.scenario_of(scenario)
    return advisor.recommend(sc, rules=rules, what_if=what_if, runs=measured_runs(sc) if runs is None else runs)


def select_runs(scenario: dict, runs=None) -> tuple[list[dict], str]:
    """(finished runs the report shows, how they were picked). ``runs``: None/"model" (the
    scenario's model), "all", "none", or run ids (a list or "ID,ID"); an unknown id is an InputError."""
    if isinstance(runs, str) and runs.strip().lower() in ("", "model"):
        runs = None
    if isinstance(runs, str) and runs.strip().lower() == "none":
        return [], "no runs asked for (--runs none)"
    if isinstance(runs, str) and runs.strip().lower() == "all":
        found = api.list_runs(status="finished")
        return found[:MAX_RUNS], (f"every finished run in the store ({len(found)}"
                                  + (f"; the newest {MAX_RUNS} shown)" if len(found) > MAX_RUNS else ")"))
    if runs is None:
        model = scenario.get("model")
        if not isinstance(model, str):
            return [], "the scenario names no model id (size and family only), so no run matches it; pass run ids"
        found = [r for r in api.list_runs(status="finished") if r.get("model") == model]
        return found[:MAX_RUNS], (f"the finished runs of {model} ({len(found)}"
                                  + (f"; the newest {MAX_RUNS} shown)" if len(found) > MAX_RUNS else ")"))
    ids = [x.strip() for x in (runs.split(",") if isinstance(runs, str) else runs) if str(x).strip()]
    out = []
    for rid in ids:
        try:
            out.append(api.get_run(rid))
        except InputError as e:
            raise InputError(f"runs: {e}; pass ids from `python -m engine runs list`, or model, all or none",
                             field="runs") from None
        except KeyError:
            raise InputError(f"runs: no run {rid!r} in the store; pass ids from `python -m engine runs list`, "
                             f"or model, all or none", field="runs") from None
    return out, "the runs asked for: " + ", ".join(ids)


def report_data(scenario, runs=None) -> dict:
    """What the report shows (engine.report.collect): the advisor's answer with the scenario's
    measured evidence, and the runs ``select_runs`` picks."""
    from engine import advisor, report as _report
    sc = advisor.scenario_of(scenario)
    result = advisor.recommend(sc, runs=measured_runs(sc))
    chosen, how = select_runs(result["scenario"], runs)
    if runs is None or (isinstance(runs, str) and runs.strip().lower() in ("", "model", "all", "none")):
        runs_arg = (runs or "model").strip().lower()
    else:
        runs_arg = ",".join(r["id"] for r in chosen)
    source = str(scenario) if isinstance(scenario, (str, os.PathLike)) else None
    return _report.collect(result, chosen, how, runs_arg=runs_arg, source=source)


def report(scenario, runs=None, fmt: str = "html") -> str:
    """The report of a scenario as HTML or Markdown (engine.report) with ``report_data``."""
    from engine import report as _report
    _report.check_format(fmt)
    return _report.render(report_data(scenario, runs), fmt)
