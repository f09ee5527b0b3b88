"""The calibration screen: what corrects the planner's estimates, from which runs, and how much it helps.

Everything comes from ``engine.calibration`` (docs/calibration.md), the same functions as
``python -m engine calibrate``:

* records: the comparable measured-vs-estimated pairs of the run store's finished runs (read
  through ``engine.runs.store.finished_runs``) plus the imported ones (``all_records``), counted
  per device and term;
* the fitted file the estimates read (``fit_file``, written by ``calibrate``): its factors per
  (device, versions key, term, variant) with runs, spread and whether they apply, and its error
  table per term: median |measured/estimated - 1| before, in-sample and held back;
* Refit (``calibrate``), Export (``export``: every record as JSON, like ``calibrate --export``)
  and Import (``import_``: a colleague's export or a GPU bench file, merged and refitted; a bad
  file is refused with a message and changes nothing).

Pure Python: engine.calibration reads JSON only and the run store is SQLite, so the app still starts
without torch.
"""
from __future__ import annotations

import hashlib
import html
import json
import tempfile
from pathlib import Path

from engine import calibration as cal
from engine.errors import InputError
from ui.common import error_md, ok_md, public_demo, unexpected_md, upload_source

MAX_IMPORT_BYTES = 20_000_000         # a records file is ~1 kB per record
COUNT_COLUMNS = ["device", "term", "records", "runs", "from the run store", "imported", "in the fit"]
FACTOR_COLUMNS = ["device", "versions", "term", "variant", "factor", "runs", "spread", "applied"]
ERROR_COLUMNS = ["device", "term", "runs", "before", "in-sample", "held back", "× off before", "× off in-sample",
                 "× off held back"]


# ---- the numbers ------------------------------------------------------------------------------------

def store_runs() -> list[dict]:
    """The finished runs of the run store ($TUNEQUANT_DB or $TUNEQUANT_HOME/runs.sqlite), through the
    store's read API (sqlite, read-only; a missing store has none)."""
    from engine.runs import store
    return store.finished_runs()


def fitted() -> dict | None:
    """The fitted calibration the estimates read (None before the first fit)."""
    return cal.load_fitted(cal.fit_file())


def count_rows(records: list[dict] | None = None, fit: dict | None = None) -> list[dict]:
    """Records per (device, term): how many, from how many runs, own vs imported, and how many the
    fitted file was made from (a difference means new runs since the fit: refit)."""
    runs = store_runs()
    own = {(str(r["run_id"]), r["term"]) for r in cal.records_from_runs(runs)}
    records = cal.all_records(runs) if records is None else records
    in_fit = {(e["device"], e["term"]): e["records"] for e in (fit or {}).get("evaluation") or []}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r.get("device") or "-", r["term"]), []).append(r)
    out = []
    for (dev, term), rs in sorted(groups.items()):
        n_own = sum((str(r["run_id"]), r["term"]) in own for r in rs)
        out.append({"device": dev, "term": term, "records": len(rs), "runs": len({str(r["run_id"]) for r in rs}),
                    "from the run store": n_own, "imported": len(rs) - n_own, "in the fit": in_fit.get((dev, term), 0)})
    return out


def factor_rows(fit: dict | None) -> list[dict]:
    """The fitted factors, as ``calibrate()["factors"]`` lists them ("*": every versions key / variant)."""
    return [{"device": f["device"], "versions": f["versions"], "term": f["term"], "variant": f.get("variant", "*"),
             "factor": f["factor"], "runs": f["runs"], "spread": f["spread"], "applied": bool(f["applies"])}
            for f in (fit or {}).get("factors") or []]


def error_rows(fit: dict | None) -> list[dict]:
    """Per (device, term): the median error before / in-sample / held back (``calibrate()["evaluation"]``)."""
    return [dict(e) for e in (fit or {}).get("evaluation") or []]


def _pct(x) -> str:
    return "–" if x is None else f"{x * 100:.1f}%"


def _x(x) -> str:
    return "–" if x is None else f"×{x:.3g}"


def tables(fit: dict | None, records: list[dict] | None = None):
    """(counts, factors, errors) as DataFrames, figures formatted as the CLI prints them."""
    import pandas as pd
    counts = pd.DataFrame(count_rows(records, fit), columns=COUNT_COLUMNS)
    factors = pd.DataFrame([{**f, "factor": _x(f["factor"]), "spread": _x(f["spread"]),
                             "applied": "yes" if f["applied"] else "no"}
                            for f in sorted(factor_rows(fit), key=lambda f: not f["applied"])],   # in force first
                           columns=FACTOR_COLUMNS)
    errors = pd.DataFrame([{"device": e["device"], "term": e["term"], "runs": e["runs"],
                            "before": _pct(e["before"]), "in-sample": _pct(e["in_sample"]),
                            "held back": _pct(e["held_back"]), "× off before": _x(e["before_x"]),
                            "× off in-sample": _x(e["in_sample_x"]), "× off held back": _x(e["held_back_x"])}
                           for e in error_rows(fit)], columns=ERROR_COLUMNS)
    return counts, factors, errors


def status_html(fit: dict | None, records: list[dict]) -> str:
    """Which file the estimates read, when it was fitted, from what, and whether it is current."""
    path, active = cal.fit_file(), cal.fitted_path() is not None
    runs = len({str(r["run_id"]) for r in records})
    if fit is None:
        head = (f"<b>No fitted calibration yet</b> at <code>{html.escape(str(path))}</code>: estimates show the "
                f"formulas' figures. {len(records)} comparable record(s) from {runs} run(s) are ready; "
                f"<b>Refit</b> fits them (or import a colleague's records).")
    else:
        devs = ", ".join(f"{html.escape(d)}: {n} run(s)" for d, n in (fit.get("devices") or {}).items()) or "no device"
        n_applied = sum(1 for f in fit.get("factors") or [] if f.get("applies"))
        head = (f"<b>Fitted calibration</b> <code>{html.escape(str(path))}</code>, fitted {fit.get('fitted_at')} "
                f"from {fit.get('records')} record(s) of {fit.get('runs')} run(s) ({devs}); "
                f"{n_applied} of {len(fit.get('factors') or [])} factors apply "
                f"(min_runs {(fit.get('settings') or {}).get('min_runs')}, and the runs agree on a direction).")
        if fit.get("records") != len(records):
            head += (f" <b>Not current:</b> {len(records)} record(s) now (new runs or imports since the fit): "
                     f"<b>Refit</b>.")
    use = ("New estimates of this app use it (the matrix picks it up on its next recompute)." if active else
           "TUNEQUANT_CALIBRATION=off: this app's estimates do not use it (the file is still written).")
    return (f"<div class='tq-muted'>{head} {use} Error = median |measured/estimated − 1| per term; "
            f"× off = median exp|ln(measured/estimated)|; held back = each run corrected by a fit on the other "
            f"runs only (what the next run sees). Same numbers as <code>python -m engine calibrate --json</code>; "
            f"docs/calibration.md.</div>")


# ---- export -------------------------------------------------------------------------------------------

def folder() -> Path:
    p = Path(tempfile.gettempdir()) / "tunequant-calibration"
    p.mkdir(parents=True, exist_ok=True)
    return p


def export_file(records: list[dict] | None = None) -> str | None:
    """Every record (run store + imported) as a calibration export (schema 1, what
    ``calibrate --export`` writes), in a folder named by the records' hash: the same records
    give the same file, so refreshing the screen leaves no litter. None when there are none."""
    records = cal.all_records(store_runs()) if records is None else records
    if not records:
        return None
    digest = hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = folder() / digest / "tunequant-calibration-records.json"
    if not path.exists():
        cal.export(path, records=records, about={"how": "exported from the tunequant dashboard (Calibration)"})
    return str(path)


# ---- the screen's state and actions --------------------------------------------------------------------

def render() -> dict:
    """Everything the screen shows: status, the three tables, the export file. A records file or
    run store that cannot be read is said in the status line (no traceback on the page)."""
    try:
        records = cal.all_records(store_runs())
        fit = fitted()
    except Exception as e:
        import pandas as pd
        counts, factors, errors = (pd.DataFrame(columns=c) for c in (COUNT_COLUMNS, FACTOR_COLUMNS, ERROR_COLUMNS))
        return {"status": unexpected_md(e, f"reading the calibration records ({cal.records_path()}, the run store)"),
                "counts": counts, "factors": factors, "errors": errors, "export": None, "records": 0}
    counts, factors, errors = tables(fit, records)
    return {"status": status_html(fit, records), "counts": counts, "factors": factors, "errors": errors,
            "export": export_file(records), "records": len(records)}


def refit() -> tuple[dict, str]:
    """Refit from the run store + imported records (``calibrate()``); (screen, message)."""
    try:
        from engine.runs import store
        res = cal.calibrate(store_runs(), store=store.default_db_path())
    except InputError as e:
        return render(), error_md(e)
    except Exception as e:
        return render(), unexpected_md(e, "refitting the calibration")
    n = sum(1 for f in res["factors"] if f["applies"])
    return render(), ok_md(f"Refitted: {res['records']} record(s) from {res['runs']} run(s); {n} factor(s) apply; "
                           f"written to <code>{html.escape(res['path'])}</code>.")


def import_upload(path) -> tuple[dict, str]:
    """Merge an uploaded records file (a calibration export or a bench/measurements file) and refit.
    A bad file: an inline message naming the problem; nothing is written. Off in the public demo
    (a visitor's records would change every visitor's estimates)."""
    if not path:
        return render(), ""
    src = Path(path)
    name = src.name
    if public_demo():
        return render(), error_md("import: off in the public demo (TUNEQUANT_PUBLIC_DEMO): imported records would "
                                  "change every visitor's estimates. Import them on your own instance, or with "
                                  "`python -m engine calibrate --import FILE` — nothing was imported.")
    try:
        src = upload_source(src, "import")
        if not src.is_file():
            raise InputError(f"import: the upload {name!r} is gone; upload it again", field="import")
        size = src.stat().st_size
        if size > MAX_IMPORT_BYTES:
            raise InputError(f"import: {name} is {size / 1e6:.1f} MB; the limit is {MAX_IMPORT_BYTES / 1e6:.0f} MB",
                             field="import")
        if src.suffix.lower() != ".json":
            raise InputError(f"import: {name} must be a .json file: a calibration export (Export here, or "
                             f"`python -m engine calibrate --export FILE`) or a bench/measurements/*.json file",
                             field="import")
        if not cal.read_records(src):              # checked before anything is written
            raise InputError(f"import: {name} holds no records to calibrate with (a bench file contributes CUDA "
                             f"runs only)", field="import")
        res = cal.import_(src, store_runs())
    except InputError as e:
        msg = str(e).replace(str(src), name).replace("--import:", "import:")
        return render(), error_md(msg + " — nothing was imported.")
    except Exception as e:
        return render(), unexpected_md(e, "importing the calibration records")
    return render(), ok_md(f"Imported {res['added']} new record(s) of {res['read']} from {html.escape(name)} "
                           f"({res['duplicates']} already there); refitted into "
                           f"<code>{html.escape(str(res.get('fitted')))}</code>.")
