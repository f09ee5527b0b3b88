"""Screen 2, the decision matrix: every strategy as a row, ranked by the advisor.

``recommend(scenario)`` calls ``engine.runs.evidence.recommend`` (the advisor with the user's
measured runs); ``engine.charts.row`` is the one place that reads the advisor's entry and
flattens it into the figures the matrix, the charts and the report show;
``table`` and the HTML helpers render them. Every number keeps its source (the planner
command with its inputs, the published evidence, or the rule) for the hover and detail views.
"""
from __future__ import annotations

import html
import time

from engine import charts, strategies
from ui.common import duration, error_md, gb, num, usd

COLUMNS = ["#", "strategy", "family", "feasible", "why not", "train mem / GPU", "calibrate mem",
           "serve mem / device", "ms/token", "retention [interval]", "accuracy from", "train time", "one-off cost",
           "serve $/M tok", "score", "rules fired", "mem/speed calibration"]


def recommend(scenario: dict) -> tuple[dict | None, float, str]:
    """(advisor result or None, server milliseconds, inline message). InputError propagates."""
    from engine.runs import evidence
    t0 = time.perf_counter()
    res = evidence.recommend(scenario)
    return res, (time.perf_counter() - t0) * 1000, ""


# ---- the advisor's entry -> the figures shown ------------------------------------------------

def table(rs: list[dict]):
    """The matrix as a pandas Styler: recommended row highlighted, infeasible rows greyed."""
    import pandas as pd
    data = []
    for r in rs:
        ret = "—" if r["retention"] is None else (
            f"{r['retention']:.3f} [{num(r['ret_low'], '{:.3f}')}–{num(r['ret_high'], '{:.3f}')}]")
        data.append({
            "#": r["rank"], "strategy": r["strategy"], "family": r["family"],
            "feasible": "✓" if r["feasible"] else "✗",
            "why not": "; ".join(_short(t) for t in r["why_not"]),
            "train mem / GPU": _vs(r["train_bytes"], r["train_limit"]),
            "calibrate mem": gb(r["quant_bytes"]) if r["quant_bytes"] else "—",
            "serve mem / device": _vs(r["serve_bytes"], r["serve_limit"]),
            "ms/token": num(r["ms_per_token"], "{:.1f}") + (f" · {r['runtime']}" if r.get("runtime") else ""),
            "retention [interval]": ret,
            "accuracy from": r["acc_from"],
            "train time": duration(r["train_time_s"]) if r["train_time_s"] else "—",
            "one-off cost": usd(r["train_usd"]) if r["train_usd"] else "—",
            "serve $/M tok": usd(r["serve_usd_mtok"]),
            "score": num(r["score"], "{:.3f}"),
            "rules fired": ", ".join(r["rules"]) or "—",
            "mem/speed calibration": r["calibration"],
        })
    df = pd.DataFrame(data, columns=COLUMNS)
    if not rs:
        return df
    reco = rs[0]["strategy"] if rs[0]["feasible"] else None

    def style(s):
        if s["strategy"] == reco:
            return ["background-color: #e0e7ff; font-weight: 600"] * len(s)
        if s["feasible"] == "✗":
            return ["color: #9ca3af"] * len(s)
        return [""] * len(s)
    return df.style.apply(style, axis=1)


def _short(text: str, n: int = 110) -> str:
    """A reason cut for the table cell (the details view has the whole text and its source)."""
    text = str(text).split(" (python -m engine")[0].split(" (estimate ")[0]
    return text if len(text) <= n else text[:n - 1] + "…"


def _vs(x, limit) -> str:
    if not x:
        return "—"
    return f"{gb(x)} / {gb(limit)}" if limit else gb(x)


# ---- HTML views ---------------------------------------------------------------------------------

def recommended(result: dict | None) -> str | None:
    if not result:
        return None
    reco = result.get("recommended")
    if isinstance(reco, dict):
        return reco.get("strategy")
    return reco


def _ul(items, limit=8) -> str:
    items = [i for i in items if i]
    if not items:
        return ""
    more = f"<li>… {len(items) - limit} more</li>" if len(items) > limit else ""
    return "<ul>" + "".join(f"<li>{html.escape(str(i))}</li>" for i in items[:limit]) + more + "</ul>"


def summary_html(result: dict | None, rs: list[dict]) -> str:
    """The wizard's side panel: the recommendation with its key figures, its first reasons, the next best."""
    if not result or not rs:
        return ""
    reco = recommended(result)
    top = next((r for r in rs if r["strategy"] == reco), None)
    if top is None:
        w = result.get("what_would_change") or {}
        return ("<div class='tq-reco' id='reco'><h3>No strategy is feasible</h3>"
                f"<div class='tq-src'>{html.escape(str(w.get('summary') or ''))}</div>"
                + _ul([_short(t, 160) for t in rs[0]["why_not"]], 4) + "</div>")
    figs = []
    if top["train_bytes"]:
        figs.append(f"train {_vs(top['train_bytes'], top['train_limit'])}")
    if top["serve_bytes"]:
        figs.append(f"serve {_vs(top['serve_bytes'], top['serve_limit'])}")
    if top["ms_per_token"]:
        figs.append(f"{top['ms_per_token']:.1f} ms/token" + (f" ({top['runtime']})" if top.get("runtime") else ""))
    if top["retention"] is not None:
        figs.append(f"retention {top['retention']:.3f} [{num(top['ret_low'], '{:.3f}')}–"
                    f"{num(top['ret_high'], '{:.3f}')}]")
    if top["train_usd"]:
        figs.append(f"one-off {usd(top['train_usd'])} (train + calibrate)")
    reasons = [_short(t, 170) for t in top["why"] if not t.startswith("score ")]
    nxt = [r for r in rs if r["feasible"] and r["strategy"] != reco][:3]
    nxt_html = ("<div class='tq-top'>Next: " + ", ".join(
        f"{html.escape(r['strategy'])} ({num(r['score'], '{:.2f}')})" for r in nxt) + "</div>") if nxt else ""
    return (f"<div class='tq-reco' id='reco'><h3>Recommended: {html.escape(top['name'])}</h3>"
            f"<div class='tq-src'>{html.escape(str(top['strategy']))} · {html.escape(str(top['family']))} · "
            f"score {num(top['score'], '{:.3f}')}</div>"
            f"<div class='tq-figs'>{' · '.join(html.escape(f) for f in figs)}</div>"
            f"{_ul(reasons, 4)}{nxt_html}<div class='tq-src'>All reasons, sources and the other strategies: "
            f"decision matrix tab.</div></div>")


def banner_html(result: dict | None, rs: list[dict]) -> str:
    if not result:
        return ""
    n_ok = sum(r["feasible"] for r in rs)
    reco = recommended(result)
    return (f"<div class='tq-muted'>{len(rs)} strategies, {n_ok} feasible on this hardware. "
            f"Recommended (highlighted): <b>{html.escape(str(reco))}</b>. Grey rows do not fit or break a goal; "
            f"the reasons say which limit or rule decided.</div>")


def change_html(result: dict | None) -> str:
    """'What would change the answer': the binding constraint, the nearest alternatives (each
    re-checked by the advisor on the changed scenario), the runner-up and the tightest limit."""
    if not result:
        return ""
    w = result.get("what_would_change")
    if not w:
        return ""
    if not isinstance(w, dict):
        return f"<div class='tq-change'><b>What would change the answer</b>{_ul([str(w)])}</div>"
    items = [html.escape(str(w.get("summary") or ""))]
    for alt in w.get("alternatives") or []:
        items.append(html.escape(charts.reason_text(alt)))
    if w.get("runner_up"):
        items.append(html.escape(charts.reason_text(w["runner_up"])))
    if w.get("tightest"):
        t = w["tightest"]
        items.append(f"tightest limit of the recommendation: {html.escape(str(t.get('constraint')))} "
                     f"({100 * float(t.get('used') or 0):.0f}% used): {html.escape(str(t.get('text', '')))}")
    lis = "".join(f"<li>{i}</li>" for i in items)
    return f"<div class='tq-change' id='what-would-change'><b>What would change the answer</b><ul>{lis}</ul></div>"


def _run_link(run_id: str) -> str:
    """A link that opens the run's page (the dashboard re-attaches to ?run=ID)."""
    rid = html.escape(str(run_id), quote=True)
    return f"<a href='?run={rid}' class='tq-run-link'>{rid}</a>"


def _basis_html(r: dict) -> str:
    """'measured in run <link> (dataset, rows)' or 'estimated from N published results (+ runs <links>)'."""
    if r.get("acc_kind") == "measured":
        return (f"<b class='tq-measured'>measured</b> in run {_run_link(r['acc_run'])} "
                f"<span class='tq-src'>({html.escape(r['acc_from'].split(', ', 1)[-1].rstrip(')'))})</span>")
    runs = r.get("acc_runs") or []
    return ("<b>estimated</b>" + (f" from {r['acc_published']} published results" if r.get("acc_published") else "")
            + (" + runs " + ", ".join(_run_link(x) for x in runs) if runs else ""))


def detail_html(result: dict | None, strategy_id: str | None) -> str:
    """Everything about one strategy: reasons with their rule or number, and each estimate's source."""
    if not result or not strategy_id:
        return ""
    entry = next((e for e in result.get("ranked") or [] if e.get("strategy") == strategy_id), None)
    if entry is None:
        return error_md(f"{strategy_id} is not in this matrix")
    rs = charts.rows(result)
    r = next(x for x in rs if x["strategy"] == strategy_id)
    cat = strategies.get(strategy_id)
    stages = " → ".join(s["stage"] + (f" ({s['method']})" if s.get("method") else "") for s in cat["stages"])
    mem_rows = "".join(
        f"<tr><td>{html.escape(str(s['stage']))}</td><td>{gb(s['bytes'], 2)}</td><td>{gb(s['limit'], 1)}</td>"
        f"<td>{'✓' if s['fits'] else ('✗' if s['fits'] is False else '—')}</td>"
        f"<td class='tq-src'>{html.escape(str(s['source'])[:300])}</td></tr>" for s in r["stages"])
    mem = (f"<table><tr><th>stage</th><th>memory</th><th>limit</th><th>fits</th><th>source</th></tr>{mem_rows}</table>"
           if mem_rows else "")
    ret = (f"retention {r['retention']:.3f} [{num(r['ret_low'], '{:.3f}')}–{num(r['ret_high'], '{:.3f}')}] "
           f"{_basis_html(r)} <span class='tq-src'>evidence: {html.escape(r['acc_source'] or '—')}</span>"
           if r["retention"] is not None else "retention: not estimated")
    cal = (f"<div>memory/speed estimates: {html.escape(r['calibration'])}</div>" if r["calibration"] != "—" else "")
    lp = r.get("launch")
    if lp:                     # a multi-GPU training row: how it would run, and what can run it
        cal += (f"<div>launch: {lp['processes']} processes, {html.escape(lp['sharding'])}, {gb(lp['per_gpu_bytes'], 2)} "
                f"per GPU; interconnect: {html.escape(lp['interconnect'])}; runs on: "
                + html.escape("; ".join(lp["executors"]) or f"no executor of this engine ({lp.get('not_runnable')})")
                + "</div>")
    return (f"<div class='tq-detail'><b>#{r['rank']} {html.escape(r['name'])}</b> "
            f"<span class='tq-src'>({html.escape(strategy_id)}, {html.escape(str(r['family']))}; "
            f"{'feasible' if r['feasible'] else 'not feasible'}; score {num(r['score'], '{:.2f}')})</span>"
            f"<div class='tq-src'>{html.escape(cat.get('summary', ''))}<br>stages: {html.escape(stages)}</div>"
            f"<b>Why</b>{_ul(r['why'], 20)}{('<b>Why not</b>' + _ul(r['why_not'], 20)) if r['why_not'] else ''}"
            f"{mem}{cal}<div>{ret}</div>"
            f"<div>serving: {gb(r['serve_bytes'], 2)}, {num(r['ms_per_token'], '{:.1f}')} ms/token"
            f"{' with ' + html.escape(r['runtime']) if r.get('runtime') else ''} "
            f"<span class='tq-src'>{html.escape(str(r['serve_source'])[:200])}</span></div>"
            f"<div>cost: training {usd(r['train_usd'])}, serving {usd(r['serve_usd_mtok'])} per 1M tokens "
            f"<span class='tq-src'>{html.escape(str(r['cost_source'])[:200])}</span></div></div>")
