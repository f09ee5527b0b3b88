"""The charts of a scenario, as plain Plotly JSON: the dashboard and the report draw the same ones.

A figure is a dict ``{"data": [...], "layout": {...}}``, the format plotly.js draws; nothing here
imports plotly or gradio (building ``plotly.graph_objects`` validates every property in Python,
10-25 ms per figure, too slow for charts redrawn on every input change). ``Fig`` adds
``to_json()``, all ``gr.Plot`` needs; tests read it like any dict.

``rows(result)`` flattens the advisor's answer (``engine.advisor.recommend``) into one dict of
figures per strategy; every chart is built from those rows, so charts and matrix never disagree.
``scenario_charts(rows, scenario)`` is the set both screens show: memory vs accuracy, latency vs
accuracy (each with the Pareto front of the feasible strategies and the device's limit as a
dashed line), the stacked memory breakdown of each stage, and the cost. Hovering a point shows
where its numbers come from (the planner command, the accuracy evidence). Each figure has a
fixed ``uirevision``: a zoom survives a redraw when an input changes.
"""
from __future__ import annotations

import json
import math

from engine.fmt import GB  # noqa: F401  (charts.GB: decimal GB, as the advisor's reasons)
FONT = {"family": "Inter, ui-sans-serif, system-ui, sans-serif", "size": 12, "color": "#1f2937"}
AXIS = {"gridcolor": "#e5e7eb", "zeroline": False, "linecolor": "#9ca3af", "showline": True, "automargin": True}
FAMILY_COLORS = {"ptq-only": "#2563eb", "finetune-then-quantize": "#d97706", "quantize-then-finetune": "#059669",
                 "joint-qat": "#7c3aed", "finetune-only": "#dc2626", "no-change": "#6b7280"}
# 20 distinct colours (matplotlib tab20 order) for the named parts of a memory breakdown
PART_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
               "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
MEMORY_VIEWS = ("serving memory on the target", "peak of train/calibrate/merge on the training GPU")


# ---- figures as JSON ---------------------------------------------------------------------------------

class Fig(dict):
    """A Plotly figure as JSON; ``gr.Plot`` accepts it like a plotly Figure (it calls to_json)."""

    def to_json(self) -> str:
        return json.dumps(self, default=_clean, allow_nan=False)

    @property
    def traces(self) -> list[dict]:
        return self["data"]

    @property
    def layout(self) -> dict:
        return self["layout"]


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)

def figure(title: str, uirevision: str, height: int = 420, **layout) -> Fig:
    """An empty figure with the dashboard's look; ``uirevision`` keeps zoom across redraws."""
    base = {"title": {"text": title, "font": {"size": 15}, "x": 0.01}, "uirevision": uirevision,
            "height": height, "font": FONT, "paper_bgcolor": "white", "plot_bgcolor": "white",
            "margin": {"l": 60, "r": 20, "t": 50, "b": 50}, "hoverlabel": {"align": "left"},
            "legend": {"orientation": "h", "y": -0.2, "font": {"size": 11}},
            "xaxis": dict(AXIS), "yaxis": dict(AXIS)}
    for k, v in layout.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return Fig(data=[], layout=base)


def side_by_side(title: str, uirevision: str, titles: tuple[str, str], height: int = 420, **layout) -> Fig:
    """Two panels: traces go to axes x/y (left) and x2/y2 (right)."""
    fig = figure(title, uirevision, height, **layout)
    fig.layout["xaxis"] = {**AXIS, "domain": [0, 0.45], "anchor": "y"}
    fig.layout["yaxis"] = {**AXIS, "anchor": "x"}
    fig.layout["xaxis2"] = {**AXIS, "domain": [0.55, 1], "anchor": "y2"}
    fig.layout["yaxis2"] = {**AXIS, "anchor": "x2"}
    fig.layout["annotations"] = [
        {"text": t, "x": x, "y": 1.0, "xref": "paper", "yref": "paper", "xanchor": "center", "yanchor": "bottom",
         "showarrow": False, "font": {"size": 12}} for t, x in ((titles[0], 0.225), (titles[1], 0.775))]
    return fig


def vline(fig: Fig, x: float, label: str, color: str = "#b91c1c", axis: str = "x") -> None:
    """A dashed vertical line across the plot (a memory limit, a latency goal) with its label;
    ``axis``: the x axis it belongs to (x2 for the right panel of ``side_by_side``)."""
    yref = "paper" if axis == "x" else f"y{axis[1:]} domain"
    fig.layout.setdefault("shapes", []).append(
        {"type": "line", "x0": x, "x1": x, "y0": 0, "y1": 1, "xref": axis, "yref": yref,
         "line": {"color": color, "dash": "dash", "width": 1.5}})
    fig.layout.setdefault("annotations", []).append(
        {"text": label, "x": x, "y": 1.0, "xref": axis, "yref": yref, "xanchor": "right", "yanchor": "bottom",
         "showarrow": False, "font": {"color": color, "size": 11}})


def note(fig: Fig, text: str) -> Fig:
    """A message in the middle of an empty plot (and no axes)."""
    fig.layout.setdefault("annotations", []).append(
        {"text": text, "x": 0.5, "y": 0.5, "xref": "paper", "yref": "paper", "showarrow": False,
         "font": {"size": 13, "color": "#6b7280"}})
    fig.layout["xaxis"] = {**fig.layout.get("xaxis", {}), "visible": False}
    fig.layout["yaxis"] = {**fig.layout.get("yaxis", {}), "visible": False}
    return fig


def empty(title: str, why: str, uirevision: str = "empty", height: int = 420) -> Fig:
    return note(figure(title, uirevision, height), why)


# ---- the advisor's answer -> the figures of each strategy -------------------------------------------

def reason_text(r) -> str:
    if isinstance(r, dict):
        return str(r.get("text") or r.get("message") or r.get("reason") or r)
    return str(r)


def row(entry: dict, rank: int) -> dict:
    """One ranked advisor entry as the flat figures of a matrix row (None where not estimated)."""
    est = entry.get("estimates") or {}
    sid = entry.get("strategy")
    stages = []
    for st in est.get("stages") or []:
        src = st.get("source") or ""
        if src and not src.startswith("python"):
            src = "python -m engine " + (src if src.startswith("estimate ") else "estimate " + src)
        stages.append({"stage": st.get("stage"), "bytes": st.get("device_bytes"),
                       "peak": st.get("peak_allocated_bytes"), "limit": st.get("limit_bytes"),
                       "fits": st.get("fits"), "breakdown": st.get("breakdown") or {}, "source": src,
                       "device": st.get("device"), "note": st.get("note") or st.get("sharding") or "",
                       "error": st.get("error"), "launch": st.get("launch"), "runtime": st.get("runtime")})
    by = {s["stage"]: s for s in stages}
    pipeline = [s["bytes"] for s in stages if s["stage"] != "serve" and s["bytes"]]
    serve = by.get("serve") or {}
    acc = est.get("accuracy") or {}
    cost = est.get("cost") or {}
    return {
        "rank": entry.get("rank", rank), "strategy": sid, "name": entry.get("name", sid),
        "family": entry.get("family"), "scheme": entry.get("scheme"), "feasible": bool(entry.get("feasible")),
        "score": entry.get("score"), "why": [reason_text(r) for r in entry.get("why") or []],
        "rules": list(entry.get("rules") or []),
        "why_not": [reason_text(b) for b in entry.get("blocked") or []],
        "blocked_by": list(entry.get("blocked_by") or []),
        "stages": stages,
        "train_bytes": (by.get("train") or {}).get("bytes"), "train_limit": (by.get("train") or {}).get("limit"),
        "launch": (by.get("train") or {}).get("launch"),
        "quant_bytes": (by.get("quantize") or {}).get("bytes"),
        "peak_bytes": max(pipeline) if pipeline else None,
        "serve_bytes": serve.get("bytes"), "serve_limit": serve.get("limit"),
        "serve_source": serve.get("source", ""),
        "ms_per_token": est.get("latency_ms_per_token"),
        "runtime": serve.get("runtime"),           # the serving runtime the latency is for
        "train_time_s": est.get("train_time_s"),
        "retention": acc.get("retention"), "ret_low": acc.get("low"), "ret_high": acc.get("high"),
        "acc_source": evidence_text(acc), "acc_error": acc.get("error"),
        "train_usd": cost.get("train_usd"), "train_gpu_hours": cost.get("train_gpu_hours"),
        "serve_usd_mtok": cost.get("serve_usd_per_million_tokens"),
        "cost_source": cost_text(est),
        **accuracy_basis(acc), "calibration": calibration_text(est.get("stages") or []),
    }


def accuracy_basis(acc: dict) -> dict:
    """measured (the run id, its dataset and rows), estimated (published rows and measured runs
    counted), or by definition (the 16-bit model is its own reference)."""
    ev = acc.get("evidence") if isinstance(acc.get("evidence"), dict) else {}
    m = acc.get("measured") or {}
    runs = list(ev.get("measured_runs") or [])
    if m.get("run_id"):
        return {"acc_kind": "measured", "acc_run": m["run_id"], "acc_runs": runs,
                "acc_published": ev.get("published"),
                "acc_from": f"measured (run {m['run_id']}, {m.get('dataset')}, {m.get('rows')} rows)"}
    if acc.get("interval") == "exact":
        return {"acc_kind": "definition", "acc_run": None, "acc_runs": [], "acc_published": 0,
                "acc_from": "by definition (16-bit reference)"}
    n = ev.get("published")
    txt = "estimated" + (f" ({n} published" if n is not None else "") + (
        f", {len(runs)} measured run(s) of the same method" if runs else "") + (")" if n is not None else "")
    return {"acc_kind": "estimated" if acc.get("retention") is not None else None, "acc_run": None,
            "acc_runs": runs, "acc_published": n, "acc_from": txt if acc.get("retention") is not None else "—"}


def calibration_text(stages: list[dict]) -> str:
    """'calibrated from N runs' / 'not calibrated' per stage estimate that carries the planner's
    ``calibration`` key (memory and speed); '—' when none does."""
    seen = []
    for st in stages:
        c = st.get("calibration")
        if not isinstance(c, dict):
            continue
        txt = f"calibrated from {c.get('runs', 0)} runs" if c.get("applied") else "not calibrated"
        seen.append((st.get("stage"), txt))
    if not seen:
        return "—"
    if len({t for _, t in seen}) == 1:
        return seen[0][1]
    return "; ".join(f"{stage}: {t}" for stage, t in seen)


def rows(result: dict | None) -> list[dict]:
    """Every strategy of the advisor's answer as a row, in its rank order."""
    if not result:
        return []
    return [row(e, i + 1) for i, e in enumerate(result.get("ranked") or [])]


def cost_text(est: dict) -> str:
    out = []
    for st in est.get("stages") or []:
        c = st.get("cost") or {}
        if c.get("formula"):
            out.append(f"{st.get('stage')}: {c['formula']}")
        elif c.get("error"):
            out.append(f"{st.get('stage')}: {c['error']}")
    return "; ".join(out)


def evidence_text(acc: dict) -> str:
    """Where a retention figure comes from: the fit, the evidence count, the closest published result."""
    if not acc:
        return ""
    ev = acc.get("evidence") or {}
    parts = [acc.get("source") or ""]
    if isinstance(ev, dict):
        if ev.get("count") is not None:
            parts.append(f"{ev['count']} results ({ev.get('published', '?')} published, "
                         f"{ev.get('measured', 0)} measured)")
        close = [c for c in ev.get("closest") or [] if isinstance(c, dict)]
        if close:
            c = close[0]
            parts.append(f"closest: {c.get('model')} {c.get('method')} w{float(c.get('w_bits') or 0):g} "
                         f"{str(c.get('metric', ''))[:30]} {c.get('value')} vs {c.get('baseline')} "
                         f"({str(c.get('source', ''))[:60]})")
    elif ev:
        parts.append(str(ev))
    return " · ".join(p for p in parts if p)

def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both axes (lower x and higher y), sorted by x."""
    front, best_y = [], float("-inf")
    for x, y, label in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best_y:
            front.append((x, y, label))
            best_y = y
    return front


def _wrap(text: str, width: int = 90, max_lines: int = 4) -> str:
    """Hover text wrapped into <br>-separated lines (Plotly does not wrap); greedy, by words."""
    lines, cur = [], ""
    for word in str(text).split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            if len(lines) == max_lines:
                return "<br>".join(lines) + "…"
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    lines.append(cur)
    return "<br>".join(lines)


def _acc_hover(r: dict) -> str:
    if r["retention"] is None or r["ret_low"] is None:
        return ""
    return (f"retention {r['retention']:.3f} [{r['ret_low']:.3f}–{r['ret_high']:.3f}]<br>"
            f"evidence: {_wrap(r['acc_source'] or '—', 70, 2)}")


SYMBOLS = {"feasible": "circle", "infeasible": "x-thin-open", "recommended": "star"}


def _view(fp: list[dict], xkey: str, xscale: float, limit) -> tuple[list, list]:
    """Axis ranges around the bulk of the feasible strategies (and the limit line), padded: those
    within 0.05 of their median retention, the best ranked always. A far outlier (a 2-bit model at
    0.70, feasible when no retention goal is set) no longer squeezes the others into a sliver at
    0.99-1.0; it stays reachable (double-click shows everything)."""
    rets = sorted(r["retention"] for r in fp)
    med = rets[len(rets) // 2]
    best = min(fp, key=lambda r: r["rank"])
    keep = [r for r in fp if r["retention"] >= med - 0.05 or r is best]
    lo, hi = min(r["retention"] for r in keep), max(r["retention"] for r in keep)
    pad = max(0.005, 0.3 * (hi - lo))
    xs = [r[xkey] / xscale for r in keep] + ([limit / xscale] if limit else [])
    x0 = min(r[xkey] / xscale for r in keep)
    return [max(0.0, x0 - 0.15 * (max(xs) - x0)), max(xs) * 1.08], [lo - pad, hi + pad]


def _vs_accuracy(rs, xkey, title, xtitle, limit, limit_label, uirev, xscale, hover_x) -> Fig:
    pts = [r for r in rs if r.get(xkey) is not None and r["retention"] is not None]
    if not pts:
        return empty(title, "no estimates to plot (see the matrix for why)", uirev)
    fig = figure(title, uirev, xaxis={"title": {"text": xtitle}},
                 yaxis={"title": {"text": "accuracy retention vs 16-bit"}},
                 hoverlabel={"align": "left", "font": {"size": 11}})
    fp = [r for r in pts if r["feasible"]]
    front = pareto([(r[xkey] / xscale, r["retention"], r["strategy"]) for r in fp])
    reco = next((r for r in fp if r["rank"] == min(x["rank"] for x in fp)), None) if fp else None
    # the points that matter carry their name: the three best ranked and the Pareto front
    named = {r["strategy"] for r in sorted(fp, key=lambda r: r["rank"])[:3]} | {p[2] for p in front}
    for fam, color in FAMILY_COLORS.items():
        fr = [r for r in pts if r["family"] == fam]
        if not fr:
            continue
        fig.traces.append({
            "type": "scatter", "mode": "markers+text", "name": fam, "legendgroup": fam,
            "x": [r[xkey] / xscale for r in fr], "y": [r["retention"] for r in fr],
            "customdata": [r["strategy"] for r in fr],
            "text": [r["strategy"] if r["strategy"] in named else "" for r in fr],
            "textposition": "top center", "textfont": {"size": 10, "color": "#374151"},
            "marker": {"color": color, "size": 9,
                       "symbol": [SYMBOLS["feasible" if r["feasible"] else "infeasible"] for r in fr],
                       "line": {"width": 2, "color": color}},
            "error_y": {"type": "data", "symmetric": False, "thickness": 1, "width": 3, "color": color,
                        "array": [max(0.0, (r["ret_high"] if r["ret_high"] is not None else r["retention"])
                                      - r["retention"]) for r in fr],
                        "arrayminus": [max(0.0, r["retention"] - (r["ret_low"] if r["ret_low"] is not None
                                                                   else r["retention"])) for r in fr]},
            "hovertext": [f"<b>#{r['rank']} {r['strategy']}</b> ({'feasible' if r['feasible'] else 'not feasible: ' + ', '.join(r['blocked_by'])})"
                          f"<br>{hover_x(r)}<br>{_acc_hover(r)}" for r in fr],
            "hoverinfo": "text"})
    if len(front) > 1:
        fig.traces.append({"type": "scatter", "mode": "lines", "name": "Pareto front (feasible)",
                           "x": [p[0] for p in front], "y": [p[1] for p in front], "hoverinfo": "skip",
                           "line": {"shape": "hv", "dash": "dot", "color": "#111827", "width": 1.5}})
    if reco is not None:
        fig.traces.append({"type": "scatter", "mode": "markers", "name": f"recommended: {reco['strategy']}",
                           "x": [reco[xkey] / xscale], "y": [reco["retention"]], "hoverinfo": "skip",
                           "marker": {"symbol": SYMBOLS["recommended"], "size": 20, "color": "rgba(250,204,21,0.85)",
                                      "line": {"width": 1.5, "color": "#92400e"}}})
    if any(not r["feasible"] for r in pts):             # what × means, once, in the legend
        fig.traces.append({"type": "scatter", "mode": "markers", "name": "× does not fit or breaks a goal",
                           "x": [None], "y": [None], "hoverinfo": "skip",
                           "marker": {"symbol": SYMBOLS["infeasible"], "size": 9, "color": "#6b7280",
                                      "line": {"width": 2, "color": "#6b7280"}}})
    if limit:
        vline(fig, limit / xscale, limit_label)
    if fp:
        xr, yr = _view(fp, xkey, xscale, limit)
        fig.layout["xaxis"]["range"], fig.layout["yaxis"]["range"] = xr, yr
        out = sum(1 for r in pts if not (xr[0] <= r[xkey] / xscale <= xr[1] and yr[0] <= r["retention"] <= yr[1]))
        if out:
            fig.layout.setdefault("annotations", []).append(
                {"text": f"zoomed to the feasible strategies: {out} other point(s) outside (double-click to see all)",
                 "x": 1, "y": 1.0, "xref": "paper", "yref": "paper", "xanchor": "right", "yanchor": "top",
                 "showarrow": False, "font": {"size": 10.5, "color": "#6b7280"}})
    return fig


def memory_vs_accuracy(rs: list[dict], view: str = MEMORY_VIEWS[0], gpu_bytes=None, gpu_name="GPU",
                       serve_bytes=None, serve_name="target") -> Fig:
    """Memory (the served model on its device, or the peak of the train/calibrate/merge stages on
    the training GPU) vs retention, with that device's memory as a line."""
    if view != MEMORY_VIEWS[1]:
        key, limit, label = "serve_bytes", serve_bytes, f"{serve_name}: {(serve_bytes or 0) / GB:.1f} GB"

        def hover(r):
            return f"serving {r['serve_bytes'] / GB:.2f} GB<br>{_wrap(r['serve_source'], 70, 2)}"
        title = f"Serving memory vs accuracy ({serve_name})"
    else:
        key, limit, label = "peak_bytes", gpu_bytes, f"{gpu_name}: {(gpu_bytes or 0) / GB:.1f} GB per GPU"

        def hover(r):
            return "<br>".join(f"{s['stage']}: {(s['bytes'] or 0) / GB:.2f} GB — {_wrap(s['source'], 80, 2)}"
                               for s in r["stages"] if s["bytes"] and s["stage"] != "serve")
        title = f"Pipeline peak memory vs accuracy ({gpu_name})"
    return _vs_accuracy(rs, key, title, "GB", limit, label, f"mem-vs-acc-{key}", GB, hover)


def latency_vs_accuracy(rs: list[dict], goal_ms=None, device_name="target") -> Fig:
    def hover(r):
        return f"{r['ms_per_token']:.1f} ms/token on {device_name}<br>{_wrap(r['serve_source'], 70, 2)}"
    return _vs_accuracy(rs, "ms_per_token", f"Latency vs accuracy ({device_name})", "decode latency, ms per token",
                        goal_ms, f"goal {goal_ms:g} ms/token" if goal_ms else "", "lat-vs-acc", 1.0, hover)


def memory_breakdown(rs: list[dict], strategies_shown: list[str] | None = None, gpu_bytes=None) -> Fig:
    """Stacked memory breakdown of each stage of the chosen strategies (one bar per strategy · stage).

    Bars are the planner's named parts (weights, gradients, optimizer states, activations, logits,
    KV cache, CUDA context ...); they sum to the stage's device memory."""
    chosen = [r for r in rs if (r["strategy"] in strategies_shown if strategies_shown else r["rank"] <= 6)]
    bars = [(f"{r['strategy']} · {s['stage']}", s) for r in chosen for s in r["stages"] if s["bytes"]]
    if not bars:
        return empty("Memory per stage", "no per-stage memory estimates to show", "mem-breakdown", 360)
    parts: list[str] = []
    for _, s in bars:
        for k in _parts(s):
            if k not in parts:
                parts.append(k)
    fig = figure("Memory per stage (stacked breakdown, GB)", "mem-breakdown", max(360, 80 + 24 * len(bars)),
                 barmode="stack", xaxis={"title": {"text": "GB"}}, yaxis={"autorange": "reversed"},
                 margin={"l": 190, "r": 10, "t": 50, "b": 50},
                 legend={"orientation": "v", "x": 1.02, "y": 1, "font": {"size": 10}})
    labels = [b[0] for b in bars]
    for i, part in enumerate(parts):
        vals = [_parts(s).get(part, 0) / GB for _, s in bars]
        if not any(vals):
            continue
        fig.traces.append({"type": "bar", "orientation": "h", "name": part, "y": labels, "x": vals,
                           "marker": {"color": PART_COLORS[i % len(PART_COLORS)]},
                           "hovertemplate": "%{y}<br>" + part + ": %{x:.2f} GB<extra></extra>"})
    if gpu_bytes:
        vline(fig, gpu_bytes / GB, f"training GPU {gpu_bytes / GB:.1f} GB")
    return fig


def _parts(stage: dict) -> dict:
    """A stage's breakdown in bytes; what the planner did not name (device overhead) as 'other'."""
    b = {k: float(v) for k, v in (stage.get("breakdown") or {}).items() if isinstance(v, (int, float))}
    total = float(stage.get("bytes") or 0)
    rest = total - sum(b.values())
    if rest > 0.005 * total:
        b["context + allocator slack" if b else "total"] = rest
    return b


def cost_chart(rs: list[dict]) -> Fig:
    """One-off cost (training + calibration, USD) and serving cost (USD per million tokens) of the feasible
    strategies, in rank order (an infeasible strategy's cost answers no question)."""
    tr = [r for r in rs if r["train_usd"] and r["feasible"]]
    sv = [r for r in rs if r["serve_usd_mtok"] is not None and r["feasible"]]
    if not tr and not sv:
        return empty("Cost", "no cost estimates for feasible strategies (no price for these devices, "
                             "or nothing feasible)", "cost")
    fig = side_by_side("Cost comparison", "cost",
                       ("one-off: training + calibration (USD)", "serving (USD per 1M tokens)"),
                       showlegend=False, margin={"l": 60, "r": 20, "t": 60, "b": 130})
    fig.traces.append({"type": "bar", "x": [r["strategy"] for r in tr], "y": [r["train_usd"] for r in tr],
                       "marker": {"color": [FAMILY_COLORS.get(r["family"], "#999") for r in tr]},
                       "hovertext": [_wrap(r["cost_source"] or "", 80, 3) for r in tr],
                       "hovertemplate": "%{x}: $%{y:,.2f}<br>%{hovertext}<extra></extra>",
                       "xaxis": "x", "yaxis": "y"})
    fig.traces.append({"type": "bar", "x": [r["strategy"] for r in sv], "y": [r["serve_usd_mtok"] for r in sv],
                       "marker": {"color": [FAMILY_COLORS.get(r["family"], "#999") for r in sv]},
                       "hovertemplate": "%{x}: $%{y:,.3f} per 1M tokens<extra></extra>",
                       "xaxis": "x2", "yaxis": "y2"})
    for ax in ("xaxis", "xaxis2"):
        fig.layout[ax].update(tickangle=-45, tickfont={"size": 10})
    return fig


# ---- runtimes compared for one strategy -------------------------------------------------------------

RUNTIME_COLORS = {"loads": "#4f46e5", "nearest": "#c7d2fe"}


def infer_request(source: str) -> dict:
    """The keywords of ``estimate_infer`` in an advisor serve stage's ``source`` (the CLI request
    ``estimate infer --model M --weights W --batch-size 1 ...``), numbers as numbers; ``model`` left
    out (the caller knows the scenario's model reference, the command names the architecture)."""
    toks = str(source or "").split()
    out: dict = {}
    i = 0
    while i < len(toks):
        t = toks[i]
        if t.startswith("--") and i + 1 < len(toks) and not toks[i + 1].startswith("--"):
            key, val = t[2:].replace("-", "_"), toks[i + 1]
            try:
                val = int(val)
            except ValueError:
                try:
                    val = float(val)
                except ValueError:
                    pass
            out[key] = val
            i += 2
        else:
            i += 1
    out.pop("model", None)
    return out


def runtime_comparison(cmp: dict, goal_ms=None, device_name: str = "target", strategy: str = "",
                       chosen: str | None = None) -> Fig:
    """Decode ms/token (left, with the interval and the latency goal) and device memory (right, with
    the device's memory) of one strategy in every runtime on the serving device (``cmp``:
    engine.estimate.compare_runtimes). Solid bars: runtimes that load the strategy's format; light
    bars: another runtime serving its nearest format (the strategy exported for it); hatched: does
    not fit; outlined: ``chosen`` (the runtime the matrix's figure is for). Hover: the formula, the
    runtime's evidence and the command that gives the same numbers."""
    title = f"Runtimes for {strategy or cmp.get('weights')} on {device_name}"
    ok = [e for e in cmp.get("runtimes") or [] if e.get("ms_per_token") is not None]
    failed = [e for e in cmp.get("runtimes") or [] if e.get("error")]
    if not ok:
        why = "; ".join(f"{e['runtime']}: {e['error']}" for e in failed) or "no runtime runs on this device"
        return empty(title, _wrap(why, 90, 4), "runtimes", 360)
    fig = side_by_side(title, "runtimes", ("decode, ms per token (batch 1)", "device memory, GB"),
                       height=max(300, 120 + 46 * len(ok)), hoverlabel={"align": "left", "font": {"size": 11}},
                       margin={"l": 200, "r": 20, "t": 60, "b": 60}, barmode="overlay")
    fig.layout["yaxis"].update(autorange="reversed")
    fig.layout["yaxis2"].update(autorange="reversed", showticklabels=False)
    fig.layout["xaxis"]["title"] = {"text": "ms/token"}
    fig.layout["xaxis2"]["title"] = {"text": "GB"}

    def label(e):
        return f"{e['runtime']} · {e['weights']}"

    def hover(e):
        iv = (f" [{e['ms_per_token_low']:.1f}–{e['ms_per_token_high']:.1f}]"
              if e.get("ms_per_token_low") and e.get("ms_per_token_high") else "")
        mem = (f"{e['device_bytes'] / GB:.2f} GB of {e['limit_bytes'] / GB:.1f} GB"
               + ("" if e["fits"] else " — does not fit")
               + (f" (reserves {e['reserved_bytes'] / GB:.1f} GB)" if e.get("reserved_bytes") and
                  e["reserved_bytes"] > e["device_bytes"] * 1.01 else ""))
        return (f"<b>{e['runtime']}</b> {e['weights']} — {e['why']}"
                + (" · the runtime the matrix assumed" if e["runtime"] == chosen else "")
                + f"<br>{e['ms_per_token']:.2f} ms/token{iv}"
                + (f", {e['bound']}-bound" if e.get("bound") else "") + f"; {mem}"
                + f"<br>{_wrap(e.get('formula') or '', 95, 3)}"
                + f"<br>evidence: {_wrap(e.get('evidence') or '—', 95, 2)}"
                + f"<br>{_wrap(e['source'], 95, 2)}")
    for kind, name in (("loads", f"loads {cmp.get('weights')}"), ("nearest", "its nearest format (another export)")):
        es = [e for e in ok if (kind == "loads") == bool(e["loads"])]
        if not es:
            continue
        color = RUNTIME_COLORS[kind]
        marker = {"color": color,
                  "line": {"color": ["#111827" if e["runtime"] == chosen else color for e in es],
                           "width": [2.5 if e["runtime"] == chosen else 0.5 for e in es]},
                  "pattern": {"shape": ["" if e["fits"] else "/" for e in es], "fgcolor": "#b91c1c"}}
        hv = [hover(e) for e in es]
        fig.traces.append({
            "type": "bar", "orientation": "h", "name": name, "legendgroup": kind, "y": [label(e) for e in es],
            "x": [e["ms_per_token"] for e in es], "customdata": [e["runtime"] for e in es],
            "marker": marker, "hovertext": hv, "hoverinfo": "text", "xaxis": "x", "yaxis": "y",
            "error_x": {"type": "data", "symmetric": False, "thickness": 1, "width": 3, "color": "#374151",
                        "array": [max(0.0, (e.get("ms_per_token_high") or e["ms_per_token"]) - e["ms_per_token"])
                                  for e in es],
                        "arrayminus": [max(0.0, e["ms_per_token"] - (e.get("ms_per_token_low") or e["ms_per_token"]))
                                       for e in es]}})
        fig.traces.append({
            "type": "bar", "orientation": "h", "name": name, "legendgroup": kind, "showlegend": False,
            "y": [label(e) for e in es], "x": [(e.get("device_bytes") or 0) / GB for e in es],
            "customdata": [e["runtime"] for e in es], "marker": marker, "hovertext": hv, "hoverinfo": "text",
            "xaxis": "x2", "yaxis": "y2"})
    if goal_ms:
        vline(fig, float(goal_ms), f"goal {float(goal_ms):g} ms/token")
    limit = next((e["limit_bytes"] for e in ok if e.get("limit_bytes")), None)
    if limit:
        vline(fig, limit / GB, f"{device_name} {limit / GB:.0f} GB", axis="x2")
    notes = []
    if chosen and any(e["runtime"] == chosen for e in ok):
        notes.append(f"outlined: {chosen}, the runtime of the matrix's figure")
    if any(not e["fits"] for e in ok):
        notes.append("hatched: does not fit the device")
    if failed:
        notes.append("not estimated: " + "; ".join(f"{e['runtime']} ({e['error'][:60]})" for e in failed))
    if notes:
        fig.layout.setdefault("annotations", []).append(
            {"text": _wrap(" · ".join(notes), 140, 2), "x": 0, "y": -0.12, "xref": "paper", "yref": "paper",
             "xanchor": "left", "yanchor": "top", "showarrow": False, "font": {"size": 10.5, "color": "#6b7280"}})
        fig.layout["legend"] = {**fig.layout["legend"], "y": -0.3}
    return fig


def runtime_strategy(rs: list[dict], recommended: str | None = None) -> str | None:
    """The strategy the runtime comparison shows until one is picked: the recommended one, else the
    first row with a serving estimate (the Trade-offs tab and the report alike)."""
    return recommended or next((r["strategy"] for r in rs if r.get("ms_per_token") is not None), None)


def strategy_runtimes(rs: list[dict], scenario: dict | None, strategy_id: str | None) -> Fig:
    """The runtime comparison of one strategy of the matrix: ``engine.estimate.compare_runtimes`` on its
    row's own serve request (so the outlined bar is the row's ms/token), drawn by ``runtime_comparison``;
    or a figure saying why there is none. The one builder of the Trade-offs tab's chart and the report's."""
    from engine import hardware
    from engine.errors import InputError
    from engine.estimate import compare_runtimes
    title = "Serving runtimes compared"
    r = next((x for x in rs if x["strategy"] == strategy_id), None)
    if not r or not scenario:
        return empty(title, "pick a strategy to compare its serving runtimes", "runtimes", 300)
    if r["ms_per_token"] is None or not r.get("serve_source"):
        return empty(title, f"{strategy_id} has no serving estimate here (a hosted API, or see the matrix "
                            "for why)", "runtimes", 300)
    dev_id = (scenario.get("deploy") or {}).get("gpu")
    try:
        cmp = compare_runtimes(scenario["model"], **infer_request(r["serve_source"]))
        dev = hardware.get(dev_id)
    except InputError as e:
        return empty(title, str(e)[:200], "runtimes", 300)
    goal = (scenario.get("goals") or {}).get("max_latency_ms_per_token")
    return runtime_comparison(cmp, goal, dev.name, strategy_id, chosen=r.get("runtime"))


# ---- the charts of a scenario ------------------------------------------------------------------------

CHARTS = ("memory", "latency", "breakdown", "cost")


def scenario_charts(rs: list[dict], scenario: dict | None, view: str = MEMORY_VIEWS[0],
                    shown: list[str] | None = None) -> dict[str, Fig]:
    """The four trade-off figures of a scenario (keys of ``CHARTS``), limits drawn from its devices:
    the training GPU's memory (per GPU), the serving device's memory, the latency goal."""
    from engine import hardware
    if not rs or not scenario:
        fig = empty("", "no scenario yet")
        return {k: fig for k in CHARTS}
    g = hardware.get(scenario["hardware"]["gpu"])
    count = int(scenario["hardware"].get("count") or 1)
    dev_id = (scenario.get("deploy") or {}).get("gpu")
    dev = hardware.get(dev_id) if dev_id else None
    goal = (scenario.get("goals") or {}).get("max_latency_ms_per_token")
    return {"memory": memory_vs_accuracy(rs, view, g.memory_bytes, f"{count} × {g.name}" if count > 1 else g.name,
                                         dev.memory_bytes if dev else None, dev.name if dev else "hosted API"),
            "latency": latency_vs_accuracy(rs, goal, dev.name if dev else "hosted API"),
            "breakdown": memory_breakdown(rs, shown or None, g.memory_bytes),
            "cost": cost_chart(rs)}
