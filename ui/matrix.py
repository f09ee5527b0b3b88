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
from ui.common import GB, duration, error_md, gb, num, usd

# fewer, wider columns (the details view has every figure with its source: calibration memory, train
# time, rules fired, where accuracy comes from, the calibration status)
COLUMNS = ["#", "strategy", "family", "fits", "peak memory / limit", "ms/token", "retention [interval]",
           "one-off $", "serve $/M tok", "score", "why (or the binding limit)"]
WIDTHS = ["3%", "13%", "10%", "4%", "17%", "6%", "11%", "6%", "6%", "5%", "19%"]


def recommend(scenario: dict) -> tuple[dict | None, float, str]:
    """(advisor result or None, server milliseconds, inline message). InputError propagates."""
    from engine.runs import evidence
    t0 = time.perf_counter()
    res = evidence.recommend(scenario)
    return res, (time.perf_counter() - t0) * 1000, ""


# ---- the advisor's entry -> the figures shown ------------------------------------------------

def table(rs: list[dict], show_infeasible: bool = False):
    """The matrix as a pandas Styler: feasible strategies grouped by family (families in the order of
    their best rank, rank order inside), the recommended row highlighted; the infeasible ones (grey,
    rank order) only with ``show_infeasible`` (the page says how many there are and what binds them)."""
    import pandas as pd
    feas = [r for r in rs if r["feasible"]]
    first = {}
    for r in feas:
        first.setdefault(r["family"], r["rank"])
    shown = sorted(feas, key=lambda r: (first[r["family"]], r["rank"]))
    if show_infeasible:
        shown += [r for r in rs if not r["feasible"]]
    data = [{
        "#": r["rank"], "strategy": r["strategy"], "family": r["family"],
        "fits": "✓" if r["feasible"] else "✗",
        "peak memory / limit": memory_bar(r),
        "ms/token": num(r["ms_per_token"], "{:.1f}") + (f" · {r['runtime']}" if r.get("runtime") else ""),
        "retention [interval]": retention_text(r),
        "one-off $": usd(r["train_usd"]) if r["train_usd"] else "—",
        "serve $/M tok": usd(r["serve_usd_mtok"]),
        "score": num(r["score"], "{:.2f}"),
        "why (or the binding limit)": why_line(r, 90),
    } for r in shown]
    df = pd.DataFrame(data, columns=COLUMNS)
    if not rs:
        return df
    reco = rs[0]["strategy"] if rs[0]["feasible"] else None

    def style(s):
        if s["strategy"] == reco:
            return ["background-color: #e0e7ff; font-weight: 600"] * len(s)
        if s["fits"] == "✗":
            return ["color: #6b7280; background-color: #f9fafb"] * len(s)
        return [""] * len(s)
    return df.style.apply(style, axis=1)


def retention_text(r: dict) -> str:
    if r["retention"] is None:
        return "—"
    text = f"{r['retention']:.3f} [{num(r['ret_low'], '{:.3f}')}–{num(r['ret_high'], '{:.3f}')}]"
    if r.get("acc_kind") == "measured":       # a figure from the user's own run, not the published prior
        text += f" measured ({r.get('acc_run')})"
    return text


def binding_stage(r: dict) -> dict | None:
    """The stage whose memory is closest to (or furthest over) its device's limit."""
    st = [s for s in r["stages"] if s.get("bytes") and s.get("limit")]
    return max(st, key=lambda s: s["bytes"] / s["limit"]) if st else None


def memory_bar(r: dict, width: int = 8) -> str:
    """The tightest stage's memory against its device's limit as a text bar: '██████░░ 77% train 18.2/23.6 GB'."""
    s = binding_stage(r)
    if s is None:
        return "—"
    frac = s["bytes"] / s["limit"]
    full = min(width, round(frac * width))
    bar = "█" * full + "░" * (width - full) + ("▶" if frac > 1 else "")
    return f"{bar} {100 * frac:.0f}% {s['stage']} {s['bytes'] / GB:.1f}/{gb(s['limit'])}"


def why_line(r: dict, n: int = 140) -> str:
    """One line: for a feasible strategy its first deciding reason (a rule or a goal it meets), for
    an infeasible one the limit or goal that blocks it."""
    if not r["feasible"]:
        return _short(r["why_not"][0], n) if r["why_not"] else "not feasible"
    told = [t for t in r["why"] if not t.startswith(("ok:", "score "))]
    return _short((told or [t for t in r["why"] if not t.startswith("score ")] or ["—"])[0], n)


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
    head = "Recommended"
    if result.get("meets_goals") is False:
        head = "Closest (does NOT meet every goal)"
        figs.insert(0, (result.get("near_miss") or {}).get("text", "does not meet every goal"))
    nxt = [r for r in rs if r["feasible"] and r["strategy"] != reco][:3]
    nxt_html = ("<div class='tq-top'>Next: " + ", ".join(
        f"{html.escape(r['strategy'])} ({num(r['score'], '{:.2f}')})" for r in nxt) + "</div>") if nxt else ""
    return (f"<div class='tq-reco' id='reco'><h3>{head}: {html.escape(top['name'])}</h3>"
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
    if reco and result.get("meets_goals") is False:     # the advisor always answers: the closest one
        what = (f"<b>No strategy is feasible</b>; the closest, which does NOT meet every goal: "
                f"<b>{html.escape(str(reco))}</b>.")
    elif reco:
        what = f"Recommended (highlighted): <b>{html.escape(str(reco))}</b>."
    else:
        w = result.get("what_would_change") or {}
        what = ("<b>No strategy is feasible</b>" + (f": {html.escape(str(w.get('summary')))}" if w.get("summary")
                                                   else "; the reasons below say which limit binds each one") + ".")
    return (f"<div class='tq-muted'>{len(rs)} strategies, {n_ok} feasible on this hardware. {what} "
            f"Click a row for everything about it.</div>")


def top_html(result: dict | None, rs: list[dict], n: int = 3) -> str:
    """The strategies that decide, as cards: fits (memory bars against each device), ms/token on the
    serving device, retention with its interval, cost, score, and one line of why."""
    if not result or not rs:
        return ""
    feas = [r for r in rs if r["feasible"]][:n]
    if not feas:
        best = rs[0]
        return ("<div class='tq-cards' id='top-cards'><div class='tq-card tq-card-none'><b>No strategy is feasible"
                f"</b><div class='tq-src'>closest: #{best['rank']} {html.escape(best['name'])}</div>"
                f"<div>{html.escape(why_line(best, 200))}</div></div></div>")
    reco = recommended(result)
    cards = []
    for r in feas:
        bars = "".join(_bar_html(s) for s in r["stages"] if s.get("bytes") and s.get("limit"))
        cost = (f"one-off {usd(r['train_usd'])}" if r["train_usd"] else "no one-off cost") + \
            f" · serve {usd(r['serve_usd_mtok'])}/M tok"
        cards.append(
            f"<div class='tq-card{' tq-card-reco' if r['strategy'] == reco else ''}' data-strategy="
            f"'{html.escape(r['strategy'], quote=True)}'>"
            f"<div class='tq-card-head'><span class='tq-rank'>#{r['rank']}</span> <b>{html.escape(r['name'])}</b>"
            f"{' <span class=tq-pill>recommended</span>' if r['strategy'] == reco else ''}</div>"
            f"<div class='tq-src'>{html.escape(r['strategy'])} · {html.escape(str(r['family']))}</div>"
            f"<div class='tq-card-nums'><span><i>fits</i><b>✓</b></span>"
            f"<span><i>ms/token{(' · ' + html.escape(r['runtime'])) if r.get('runtime') else ''}</i>"
            f"<b>{num(r['ms_per_token'], '{:.1f}')}</b></span>"
            f"<span><i>retention</i><b>{num(r['retention'], '{:.3f}')}</b>"
            f"<small>[{num(r['ret_low'], '{:.3f}')}–{num(r['ret_high'], '{:.3f}')}]</small></span>"
            f"<span><i>score</i><b>{num(r['score'], '{:.2f}')}</b></span></div>"
            f"{bars}<div class='tq-card-cost'>{html.escape(cost)}</div>"
            f"<div class='tq-card-why'>{html.escape(why_line(r, 160))}</div></div>")
    return f"<div class='tq-cards' id='top-cards'>{''.join(cards)}</div>"


def _bar_html(s: dict) -> str:
    frac = s["bytes"] / s["limit"]
    color = "#16a34a" if frac <= 0.85 else "#d97706" if frac <= 1 else "#dc2626"
    return (f"<div class='tq-mem'><span class='tq-mem-label'>{html.escape(str(s['stage']))}</span>"
            f"<span class='tq-mem-track'><span class='tq-mem-fill' style='width:{min(100, 100 * frac):.0f}%;"
            f"background:{color}'></span></span><span class='tq-mem-val'>{gb(s['bytes'])} / {gb(s['limit'])}"
            f"</span></div>")


def infeasible_html(result: dict | None, rs: list[dict], shown: bool = False) -> str:
    """How many strategies are collapsed out of the table and what binds them, by limit or goal."""
    bad = [r for r in rs if not r["feasible"]]
    if not result or not bad:
        return ""
    groups: dict[str, list[dict]] = {}
    for r in bad:
        groups.setdefault(", ".join(r["blocked_by"]) or "other", []).append(r)
    items = "".join(
        f"<li><b>{html.escape(k)}</b> ({len(v)}): {', '.join(html.escape(x['strategy']) for x in v[:8])}"
        f"{' …' if len(v) > 8 else ''} — <span class='tq-src'>e.g. {html.escape(why_line(v[0], 150))}</span></li>"
        for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1])))
    state = "shown in grey below the feasible ones" if shown else "hidden from the table (tick the box to list them)"
    return (f"<div class='tq-infeasible' id='infeasible'><b>{len(bad)} infeasible</b> ({state}), by what binds "
            f"them:<ul>{items}</ul></div>")


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
    # the summary strings the items below together: keep only its parts that no item says again
    later = [charts.reason_text(a) for a in w.get("alternatives") or []]
    later += [charts.reason_text(w["runner_up"])] if w.get("runner_up") else []
    summary = str(w.get("summary") or "")
    if w.get("tightest"):                      # said as its own item below, with how much is used
        summary = summary.split("the tightest limit")[0].rstrip("; ")
    parts = [p for p in summary.split("; ") if p and not any(p[:40] in x for x in later)]
    items = [html.escape("; ".join(parts))]
    for alt in w.get("alternatives") or []:
        items.append(html.escape(charts.reason_text(alt)))
    if w.get("runner_up"):
        items.append(html.escape(charts.reason_text(w["runner_up"])))
    seen: set = set()                          # the summary often is the first alternative, word for word
    items = [i for i in items if i and not (i in seen or seen.add(i))]
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
