"""Screen 3, trade-offs (Plotly): memory vs accuracy, latency vs accuracy, memory per stage, cost.

Each chart is built from the matrix rows (``ui.matrix.rows``), so the charts and the matrix
can never disagree. Hovering a point shows where its numbers come from. Every figure has a
fixed ``uirevision``: when the inputs change and the chart is redrawn, a zoom the user made
is kept.
"""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ui.common import GIB

FAMILY_COLORS = {"ptq-only": "#2563eb", "finetune-then-quantize": "#d97706", "quantize-then-finetune": "#059669",
                 "joint-qat": "#7c3aed", "finetune-only": "#dc2626", "no-change": "#6b7280"}
MEMORY_VIEWS = ("serving memory on the target", "peak of train/calibrate/merge on the training GPU")
_LAYOUT = dict(template="plotly_white", height=420, margin={"l": 60, "r": 20, "t": 50, "b": 50},
               legend={"orientation": "h", "y": -0.18, "font": {"size": 11}}, hoverlabel={"align": "left"})


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both axes (lower x, higher y), sorted by x."""
    front = []
    best_y = float("-inf")
    for x, y, label in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best_y:
            front.append((x, y, label))
            best_y = y
    return front


def _empty(title: str, why: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, **_LAYOUT)
    fig.add_annotation(text=why, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def _wrap(text: str, width: int = 90, max_lines: int = 4) -> str:
    """Hover text wrapped into <br>-separated lines (Plotly does not wrap)."""
    import textwrap
    lines = textwrap.wrap(str(text), width) or [""]
    return "<br>".join(lines[:max_lines]) + ("…" if len(lines) > max_lines else "")


def _acc_hover(r: dict) -> str:
    if r["retention"] is None or r["ret_low"] is None:
        return ""
    return (f"retention {r['retention']:.3f} [{r['ret_low']:.3f}–{r['ret_high']:.3f}]<br>"
            f"evidence: {_wrap(r['acc_source'] or '—')}")


def _scatter_vs_accuracy(rs, xkey, title, xtitle, limit=None, limit_label="", uirev="", xscale=1.0,
                         hover_x=None) -> go.Figure:
    pts = [r for r in rs if r.get(xkey) is not None and r["retention"] is not None]
    if not pts:
        return _empty(title, "no estimates to plot yet")
    fig = go.Figure()
    for fam in FAMILY_COLORS:
        fr = [r for r in pts if r["family"] == fam]
        if not fr:
            continue
        fig.add_trace(go.Scatter(
            x=[r[xkey] / xscale for r in fr], y=[r["retention"] for r in fr], mode="markers", name=fam,
            marker={"color": FAMILY_COLORS[fam], "size": [14 if r["rank"] == 1 and r["feasible"] else 9 for r in fr],
                    "symbol": ["circle" if r["feasible"] else "x-thin-open" for r in fr],
                    "line": {"width": 2, "color": FAMILY_COLORS[fam]}},
            error_y={"type": "data", "symmetric": False,
                     "array": [max(0.0, (r["ret_high"] or r["retention"]) - r["retention"]) for r in fr],
                     "arrayminus": [max(0.0, r["retention"] - (r["ret_low"] or r["retention"])) for r in fr],
                     "thickness": 1, "width": 3, "color": FAMILY_COLORS[fam]},
            text=[r["strategy"] for r in fr],
            hovertext=[f"<b>#{r['rank']} {r['strategy']}</b> ({'feasible' if r['feasible'] else 'not feasible'})<br>"
                       f"{hover_x(r) if hover_x else ''}<br>{_acc_hover(r)}" for r in fr],
            hoverinfo="text"))
    feas = [(r[xkey] / xscale, r["retention"], r["strategy"]) for r in pts if r["feasible"]]
    front = pareto(feas)
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], mode="lines",
                                 line={"shape": "hv", "dash": "dot", "color": "#111827", "width": 1.5},
                                 name="Pareto front (feasible)", hoverinfo="skip"))
    if limit:
        fig.add_vline(x=limit / xscale, line={"color": "#b91c1c", "dash": "dash"},
                      annotation_text=limit_label, annotation_position="top left",
                      annotation_font={"color": "#b91c1c", "size": 11})
    fig.update_layout(title=title, xaxis_title=xtitle, yaxis_title="accuracy retention (vs 16-bit)",
                      uirevision=uirev, **_LAYOUT)
    return fig


def memory_vs_accuracy(rs: list[dict], view: str = MEMORY_VIEWS[0], gpu_bytes=None, gpu_name="GPU",
                       serve_bytes=None, serve_name="target") -> go.Figure:
    """Memory (served model on its device, or the peak of the train/calibrate/merge stages on the
    training GPU) vs retention, with the device's memory as a line."""
    if view != MEMORY_VIEWS[1]:
        key, limit, label = "serve_bytes", serve_bytes, f"{serve_name}: {(serve_bytes or 0) / GIB:.1f} GiB"
        hover = lambda r: f"serving memory {r['serve_bytes'] / GIB:.2f} GiB<br>{r['serve_source']}"
    else:
        key, limit, label = "peak_bytes", gpu_bytes, f"{gpu_name}: {(gpu_bytes or 0) / GIB:.1f} GiB"
        hover = lambda r: "<br>".join(f"{s['stage']}: {(s['bytes'] or 0) / GIB:.2f} GiB — {s['source']}"[:170]
                                      for s in r["stages"] if s["bytes"] and s["stage"] != "serve")
    return _scatter_vs_accuracy(rs, key, "Memory vs accuracy", "GiB", limit, label, "mem-vs-acc", GIB, hover)


def latency_vs_accuracy(rs: list[dict], goal_ms=None, device_name="target") -> go.Figure:
    hover = lambda r: f"{r['ms_per_token']:.1f} ms/token on {device_name} {r['serve_source']}"[:200]
    return _scatter_vs_accuracy(rs, "ms_per_token", f"Latency vs accuracy ({device_name})",
                                "decode latency, ms per token", goal_ms,
                                f"goal {goal_ms:g} ms/token" if goal_ms else "", "lat-vs-acc", 1.0, hover)


def memory_breakdown(rs: list[dict], strategies_shown: list[str] | None = None, gpu_bytes=None) -> go.Figure:
    """Stacked memory breakdown of each stage of the chosen strategies (bars: strategy · stage)."""
    chosen = [r for r in rs if (r["strategy"] in strategies_shown if strategies_shown else r["rank"] <= 6)]
    bars = [(f"{r['strategy']} · {s['stage']}", s) for r in chosen for s in r["stages"] if s["bytes"]]
    if not bars:
        return _empty("Memory per stage", "no per-stage memory estimates to show")
    parts: list[str] = []
    for _, s in bars:
        for k in (s["breakdown"] or {"total": s["bytes"]}):
            if k not in parts:
                parts.append(k)
    fig = go.Figure()
    labels = [b[0] for b in bars]
    for part in parts:
        vals = [((s["breakdown"] or {"total": s["bytes"]}).get(part) or 0) / GIB for _, s in bars]
        if not any(vals):
            continue
        fig.add_trace(go.Bar(y=labels, x=vals, name=part, orientation="h",
                             hovertemplate="%{y}<br>" + part + ": %{x:.2f} GiB<extra></extra>"))
    if gpu_bytes:
        fig.add_vline(x=gpu_bytes / GIB, line={"color": "#b91c1c", "dash": "dash"},
                      annotation_text=f"GPU {gpu_bytes / GIB:.1f} GiB", annotation_font={"color": "#b91c1c"})
    fig.update_layout(barmode="stack", title="Memory per stage (stacked breakdown)", xaxis_title="GiB",
                      uirevision="mem-breakdown", **{**_LAYOUT, "height": max(320, 60 + 26 * len(bars))})
    fig.update_yaxes(autorange="reversed")
    return fig


def cost_chart(rs: list[dict]) -> go.Figure:
    """Training cost (one-off, USD) and serving cost (USD per million tokens) per strategy, by rank."""
    tr = [r for r in rs if r["train_usd"] is not None]
    sv = [r for r in rs if r["serve_usd_mtok"] is not None]
    if not tr and not sv:
        return _empty("Cost", "no cost estimates (no prices for these devices, or not estimated yet)")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training (one-off, USD)", "serving (USD per 1M tokens)"))
    fig.add_trace(go.Bar(x=[r["strategy"] for r in tr], y=[r["train_usd"] for r in tr], name="training",
                         marker_color=[FAMILY_COLORS.get(r["family"], "#999") for r in tr],
                         hovertext=[r["cost_source"] for r in tr],
                         hovertemplate="%{x}: $%{y:,.2f}<br>%{hovertext}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=[r["strategy"] for r in sv], y=[r["serve_usd_mtok"] for r in sv], name="serving",
                         marker_color=[FAMILY_COLORS.get(r["family"], "#999") for r in sv],
                         hovertemplate="%{x}: $%{y:,.3f} per 1M tokens<extra></extra>"), row=1, col=2)
    fig.update_layout(title="Cost comparison", showlegend=False, uirevision="cost", **_LAYOUT)
    fig.update_xaxes(tickangle=-45, tickfont={"size": 10})
    return fig
