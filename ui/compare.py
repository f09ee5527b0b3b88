"""Screen 5, compare runs: measured side by side, measured vs estimated, charts, CSV/JSON export.

The measurements come from each run's events (``stage_finished``: duration and peak memory
with its source; ``eval`` before/after; ``metric``), so they are exactly what the worker
recorded. The estimate is the one the worker stored with the run when it started.
"""
from __future__ import annotations

import csv
import json
import tempfile
import time
from pathlib import Path

from engine import hardware
from engine.errors import InputError
from engine.record import RunRecord, fold
from engine.runs import api
from ui.common import GB, duration, error_md, ok_md

FINAL_OK = ("finished",)
STAGE_COLORS = ("#2563eb", "#059669", "#d97706", "#7c3aed", "#dc2626")


def run_choices() -> list[tuple[str, str]]:
    """Runs to pick, finished ones first (newest first within each group)."""
    try:
        rs = api.list_runs()
    except InputError:                   # the run store cannot be used: the page's banner says why
        return []
    rs.sort(key=lambda r: (r.get("status") != "finished", -(r.get("created") or 0)))
    return [(f"{r['id']} · {r['status']} · {r['strategy']} · {r.get('name') or r['model']}", r["id"]) for r in rs]


def measured(run: dict, events: list[dict]) -> dict:
    """What a run measured, from its events (engine.record's fold): stages (time, peak memory),
    evaluations, metrics, the last training speed."""
    f = fold(events)
    stages = f.stages_done
    peaks = [s["peak_mem_bytes"] for s in stages if s.get("peak_mem_bytes") is not None]
    return {"stages": stages, "evals": f.evals_by_name(), "metrics": f.metrics_by_name(),
            "wall_s": RunRecord.of(run).wall_s,
            "peak_mem_bytes": max(peaks) if peaks else None,
            "mem_source": next((s.get("mem_source") for s in stages if s.get("mem_source")), None),
            "train_tokens_per_s": f.last_tokens_per_s}


def run_cost(run: dict, wall_s: float | None) -> tuple[float | None, str]:
    """(USD, how) for a run: GPU-hours x the price of the GPU preset the worker recognised."""
    if wall_s is None:
        return None, "run did not finish"
    if run.get("device") != "cuda":
        return None, "CPU run: no GPU price"
    machine = run.get("machine") or {}
    preset = machine.get("gpu_preset")
    dev = hardware.devices().get(preset) if preset else None
    if dev is None or not dev.price_per_hour:
        return None, f"no price preset for GPU {machine.get('gpu') or '?'}"
    return wall_s / 3600 * dev.price_per_hour, f"{wall_s / 3600:.3f} GPU-h × ${dev.price_per_hour}/h ({dev.id})"


def collect(run_ids: list[str]) -> tuple[list[dict], list[str]]:
    """(runs with their measurements, problems) for the chosen ids."""
    get_run, events = api.get_run, api.events
    out, problems = [], []
    for rid in run_ids or []:
        try:
            run = get_run(rid)
        except InputError as e:
            problems.append(str(e))
            continue
        if run is None:
            problems.append(f"run {rid} not found")
            continue
        evs = events(rid)
        m = measured(run, evs)
        cost, how = run_cost(run, m["wall_s"])
        out.append({"run": run, "m": {**m, "cost_usd": cost, "cost_how": how}, "events": evs})
        if run.get("status") != "finished":
            problems.append(f"{rid} is {run.get('status')}: its figures are partial")
    return out, problems


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def harness_scores(metrics: dict) -> list[tuple[str, dict]]:
    """(task, {metric: value}) of an evaluation's lm-eval results (engine/runs/stages/harness.py),
    stderr and bookkeeping left out; a task that did not run has no scores."""
    out = []
    for task, vals in (metrics.get("harness") or {}).items():
        scores = {k: v for k, v in vals.items() if isinstance(v, float) and not k.endswith("_stderr")}
        if scores:
            out.append((task, scores))
    return out


def vals_source(metrics: dict, task: str) -> str:
    h = (metrics.get("harness") or {}).get(task) or {}
    return f"{h.get('source', 'lm-eval')}, {h.get('n')} documents"


def long_rows(items: list[dict]) -> list[dict]:
    """Every measurement as (run, quantity, value, unit, source): the CSV export and the table."""
    rows = []
    for it in items:
        run, m = it["run"], it["m"]
        rid = run["id"]
        src = f"run:{rid}"

        def add(q, v, unit="", source=src):
            rows.append({"run": rid, "quantity": q, "value": v, "unit": unit, "source": source})
        add("strategy", run.get("strategy"))
        add("model", run.get("model"))
        add("device", run.get("device"))
        add("status", run.get("status"))
        add("wall time", m["wall_s"], "s")
        add("peak memory (max over stages)", m["peak_mem_bytes"] / GB if m["peak_mem_bytes"] else None, "GB",
            f"{src} ({m['mem_source'] or 'measured'})")
        for s in m["stages"]:
            add(f"{s['stage']}: time", s.get("duration_s"), "s")
            add(f"{s['stage']}: peak memory", s["peak_mem_bytes"] / GB if s.get("peak_mem_bytes") else None, "GB",
                f"{src} ({s.get('mem_source') or 'measured'})")
        if m["train_tokens_per_s"] is not None:
            add("training tokens/s (last step)", m["train_tokens_per_s"], "tokens/s")
        for name, metrics in m["evals"].items():
            for k, v in metrics.items():
                if isinstance(v, (dict, list)):
                    continue
                add(f"{name}: {k}", v)
            for task, vals in harness_scores(metrics):
                for k, v in vals.items():
                    add(f"{name}: lm-eval {task} {k}", v, "", f"{src} ({vals_source(metrics, task)})")
        shown = {f"{name}.{k}" for name, metrics in m["evals"].items() for k in metrics}
        shown |= {f"{name}.harness.{task}.{k}" for name, metrics in m["evals"].items()
                  for task, vals in harness_scores(metrics) for k in vals}
        for k, (v, unit) in m["metrics"].items():
            if k not in shown and not isinstance(v, (dict, list)):
                add(k, v, unit)
        add("cost", m["cost_usd"], "USD", m["cost_how"])
    return rows


def side_by_side(items: list[dict]):
    """Quantities as rows, runs as columns (the table people read)."""
    import pandas as pd
    rows = long_rows(items)
    if not rows:
        return pd.DataFrame()
    order, table = [], {}
    for r in rows:
        key = r["quantity"] + (f" ({r['unit']})" if r["unit"] else "")
        if key not in table:
            order.append(key)
            table[key] = {}
        table[key][r["run"]] = _fmt(r["value"])
    cols = [it["run"]["id"] for it in items]
    return pd.DataFrame([{"quantity": k, **{c: table[k].get(c, "—") for c in cols}} for k in order],
                        columns=["quantity"] + cols)


def vs_estimate(items: list[dict]):
    """Measured next to what the planner estimated for the run (stored by the worker), with the error.

    The pairs and what makes them comparable are engine.calibration.pairs (one place for the
    concept; calibration fits on the same pairs): speeds and weights when the estimate was made
    for the device the run used, peak memory only on CUDA (a CPU run's peak RSS is not a tensor
    allocation), the perplexity ratio only for runs that do not also fine-tune. The note says
    what was compared, or why not.
    """
    import pandas as pd
    from engine import calibration
    out = []
    for it in items:
        run = it["run"]
        rid, est = run["id"], run.get("estimate") or {}
        if not est or est.get("error"):
            out.append({"run": rid, "quantity": "estimate", "estimated": "—", "measured": "—", "error": "—",
                        "note": f"no estimate recorded ({est.get('error')})" if est else "no estimate recorded"})
            continue
        for key in ("train", "infer", "accuracy"):
            e = est.get(key) or {}
            if e.get("error"):
                out.append({"run": rid, "quantity": f"{key} estimate", "estimated": "—", "measured": "—",
                            "error": "—", "note": f"not estimated: {e['error']}"[:200]})
        for p in calibration.pairs(run, it.get("events")):
            scale, unit = (1 / GB, " (GB)") if p["unit"] == "bytes" else (1.0, "")
            est_v, meas_v, err, note = p["estimated"], p["measured"], p["error"], p["why"]
            if p["calibrated"] is not None:      # the planner showed a calibrated figure: compare with that
                note += f"; the formula alone said {_fmt(est_v * scale)}" + (f" ({err * 100:+.1f}%)" if err is not None else "")
                est_v = p["calibrated"]
                err = meas_v / est_v - 1 if err is not None and est_v else None
            out.append({"run": rid, "quantity": p["label"] + unit,
                        "estimated": _fmt(est_v * scale if est_v is not None else None),
                        "measured": _fmt(meas_v * scale if meas_v is not None else None),
                        "error": f"{err * 100:+.1f}%" if err is not None else "—", "note": note})
    return pd.DataFrame(out, columns=["run", "quantity", "estimated", "measured", "error", "note"])


def vs_estimate_html(df) -> str:
    """The measured-vs-estimated table as HTML (it wraps long notes inside the page width)."""
    import html as _h
    if df is None or len(df) == 0:
        return ""
    head = "".join(f"<th>{_h.escape(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{_h.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return (f"<div class='tq-detail' id='vs-estimate'><b>Measured vs estimated</b> <span class='tq-src'>(the "
            f"planner's estimate stored with each run; the error only where both measure the same thing)</span>"
            f"<table><tr>{head}</tr>{body}</table></div>")


def _first_metric(m: dict, names: tuple[str, ...]):
    """A measured value by name: the 'after' evaluation first, then metric events."""
    for n in names:
        v = (m["evals"].get("after") or {}).get(n)
        if isinstance(v, (int, float)):
            return v
        if n in m["metrics"] and isinstance(m["metrics"][n][0], (int, float)):
            return m["metrics"][n][0]
    return None


def run_label(run: dict) -> str:
    """A short two-line axis label: the run's name (or strategy) and the end of its id."""
    name = (run.get("name") or run.get("strategy") or "")[:28]
    return f"{name}<br>{run['id'][-6:]}"


def charts(items: list[dict]):
    """(quality figure, memory/time figure) for the chosen runs; every bar is a measurement."""
    from engine.charts import side_by_side
    ids = [run_label(it["run"]) for it in items]
    q = side_by_side("Quality (measured)", "cmp-quality", ("perplexity (lower is better)", "task metrics"), 380,
                     barmode="group", margin={"l": 55, "r": 20, "t": 60, "b": 40}, legend={"y": -0.25})
    ppl_keys = sorted({(n, k) for it in items for n, ms in it["m"]["evals"].items() for k in ms
                       if "perplexity" in k.lower() or k.lower() == "ppl"})
    for n, k in ppl_keys:
        q.traces.append({"type": "bar", "x": ids, "y": [it["m"]["evals"].get(n, {}).get(k) for it in items],
                         "name": f"{n} {k}", "xaxis": "x", "yaxis": "y",
                         "hovertemplate": "%{x}: %{y:.3f}<extra>measured</extra>"})
    task_keys = sorted({(n, k) for it in items for n, ms in it["m"]["evals"].items() for k, v in ms.items()
                        if any(w in k.lower() for w in ("accuracy", "exact", "valid", "f1"))
                        and isinstance(v, (int, float)) and not isinstance(v, bool)})
    for n, k in task_keys:
        q.traces.append({"type": "bar", "x": ids, "y": [it["m"]["evals"].get(n, {}).get(k) for it in items],
                         "name": f"{n} {k}", "xaxis": "x2", "yaxis": "y2",
                         "hovertemplate": "%{x}: %{y:.3f}<extra>measured</extra>"})
    lm_keys = sorted({(n, t, k) for it in items for n, ms in it["m"]["evals"].items()
                      for t, vals in harness_scores(ms) for k in vals if k in ("acc", "acc_norm", "exact_match")})
    for n, t, k in lm_keys:                # lm-eval's scores beside the stage's own (fractions too)
        q.traces.append({"type": "bar", "x": ids, "xaxis": "x2", "yaxis": "y2", "name": f"{n} lm-eval {t} {k}",
                         "y": [dict(harness_scores(it["m"]["evals"].get(n, {}))).get(t, {}).get(k) for it in items],
                         "hovertemplate": "%{x}: %{y:.3f}<extra>lm-eval</extra>"})
    s = side_by_side("Memory and time (measured)", "cmp-speed", ("peak memory per stage (GB)",
                                                                "wall time per stage (s)"), 380,
                     barmode="group", margin={"l": 55, "r": 20, "t": 60, "b": 40}, legend={"y": -0.25})
    stage_names = []
    for it in items:
        for st in it["m"]["stages"]:
            if st["stage"] not in stage_names:
                stage_names.append(st["stage"])
    for i, name in enumerate(stage_names):
        color = STAGE_COLORS[i % len(STAGE_COLORS)]
        mem = [next((st["peak_mem_bytes"] / GB for st in it["m"]["stages"]
                     if st["stage"] == name and st.get("peak_mem_bytes")), None) for it in items]
        tim = [next((st["duration_s"] for st in it["m"]["stages"] if st["stage"] == name), None) for it in items]
        s.traces.append({"type": "bar", "x": ids, "y": mem, "name": name, "legendgroup": name,
                         "marker": {"color": color}, "xaxis": "x", "yaxis": "y",
                         "hovertemplate": "%{x} " + name + ": %{y:.2f} GB<extra>measured</extra>"})
        s.traces.append({"type": "bar", "x": ids, "y": tim, "name": name, "legendgroup": name, "showlegend": False,
                         "marker": {"color": color}, "xaxis": "x2", "yaxis": "y2",
                         "hovertemplate": "%{x} " + name + ": %{y:.1f} s<extra>measured</extra>"})
    return q, s


def export(items: list[dict]) -> tuple[str, str]:
    """(CSV path, JSON path) of the comparison, in a temp folder Gradio may serve."""
    d = Path(tempfile.mkdtemp(prefix="tunequant-compare-"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    csv_path, json_path = d / f"compare-{stamp}.csv", d / f"compare-{stamp}.json"
    rows = long_rows(items)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["run", "quantity", "value", "unit", "source"])
        w.writeheader()
        w.writerows(rows)
    doc = {"runs": [{"id": it["run"]["id"], "name": it["run"].get("name"), "strategy": it["run"].get("strategy"),
                     "model": it["run"].get("model"), "device": it["run"].get("device"),
                     "status": it["run"].get("status"), "reason": it["run"].get("reason"),
                     "spec": it["run"].get("spec"), "estimate": it["run"].get("estimate"),
                     "machine": it["run"].get("machine"), "versions": it["run"].get("versions"),
                     "measured": it["m"]} for it in items],
           "vs_estimate": vs_estimate(items).to_dict(orient="records")}
    json_path.write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    return str(csv_path), str(json_path)


def render(run_ids: list[str] | None) -> list:
    """Every output of the compare screen: message, table, vs-estimate, two charts, CSV, JSON."""
    import pandas as pd
    if not run_ids:
        return ["<div class='tq-muted'>Pick two or more runs.</div>", pd.DataFrame(), "", None, None, None, None]
    items, problems = collect(run_ids)
    if not items:
        return [error_md("; ".join(problems) or "nothing to compare"), pd.DataFrame(), "", None, None, None, None]
    q, s = charts(items)
    csv_path, json_path = export(items)
    msg = (error_md("; ".join(problems)) if problems else "") + ok_md(
        f"{len(items)} run(s) · every figure is measured by the run named in its column (events of the run store)")
    return [msg, side_by_side(items), vs_estimate_html(vs_estimate(items)), q, s, csv_path, json_path]
