"""Screen 3, trade-offs (Plotly): memory vs accuracy, latency vs accuracy, memory per stage, cost.

Each chart is built from the matrix rows (``ui.matrix.rows``), so charts and matrix can never
disagree. Hovering a point shows where its numbers come from (the planner command and its
inputs, the published evidence of the accuracy fit). Every figure has a fixed ``uirevision``:
when an input changes and the chart is redrawn, a zoom the user made is kept.
"""
from __future__ import annotations

from ui.common import GB
from ui.plotting import Fig, empty, figure, side_by_side, vline

FAMILY_COLORS = {"ptq-only": "#2563eb", "finetune-then-quantize": "#d97706", "quantize-then-finetune": "#059669",
                 "joint-qat": "#7c3aed", "finetune-only": "#dc2626", "no-change": "#6b7280"}
# 20 distinct colours (matplotlib tab20 order) for the named parts of a memory breakdown
PART_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
               "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
MEMORY_VIEWS = ("serving memory on the target", "peak of train/calibrate/merge on the training GPU")


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
            f"evidence: {_wrap(r['acc_source'] or '—')}")


def _vs_accuracy(rs, xkey, title, xtitle, limit, limit_label, uirev, xscale, hover_x) -> Fig:
    pts = [r for r in rs if r.get(xkey) is not None and r["retention"] is not None]
    if not pts:
        return empty(title, "no estimates to plot (see the matrix for why)", uirev)
    fig = figure(title, uirev, xaxis={"title": {"text": xtitle}},
                 yaxis={"title": {"text": "accuracy retention vs 16-bit"}})
    for fam, color in FAMILY_COLORS.items():
        fr = [r for r in pts if r["family"] == fam]
        if not fr:
            continue
        fig.traces.append({
            "type": "scatter", "mode": "markers", "name": fam,
            "x": [r[xkey] / xscale for r in fr], "y": [r["retention"] for r in fr],
            "text": [r["strategy"] for r in fr],
            "marker": {"color": color, "size": [15 if r["rank"] == 1 and r["feasible"] else 9 for r in fr],
                       "symbol": ["circle" if r["feasible"] else "x-thin-open" for r in fr],
                       "line": {"width": 2, "color": color}},
            "error_y": {"type": "data", "symmetric": False, "thickness": 1, "width": 3, "color": color,
                        "array": [max(0.0, (r["ret_high"] if r["ret_high"] is not None else r["retention"])
                                      - r["retention"]) for r in fr],
                        "arrayminus": [max(0.0, r["retention"] - (r["ret_low"] if r["ret_low"] is not None
                                                                   else r["retention"])) for r in fr]},
            "hovertext": [f"<b>#{r['rank']} {r['strategy']}</b> ({'feasible' if r['feasible'] else 'not feasible: ' + ', '.join(r['blocked_by'])})"
                          f"<br>{hover_x(r)}<br>{_acc_hover(r)}" for r in fr],
            "hoverinfo": "text"})
    front = pareto([(r[xkey] / xscale, r["retention"], r["strategy"]) for r in pts if r["feasible"]])
    if len(front) > 1:
        fig.traces.append({"type": "scatter", "mode": "lines", "name": "Pareto front (feasible)",
                           "x": [p[0] for p in front], "y": [p[1] for p in front], "hoverinfo": "skip",
                           "line": {"shape": "hv", "dash": "dot", "color": "#111827", "width": 1.5}})
    if limit:
        vline(fig, limit / xscale, limit_label)
    return fig


def memory_vs_accuracy(rs: list[dict], view: str = MEMORY_VIEWS[0], gpu_bytes=None, gpu_name="GPU",
                       serve_bytes=None, serve_name="target") -> Fig:
    """Memory (the served model on its device, or the peak of the train/calibrate/merge stages on
    the training GPU) vs retention, with that device's memory as a line."""
    if view != MEMORY_VIEWS[1]:
        key, limit, label = "serve_bytes", serve_bytes, f"{serve_name}: {(serve_bytes or 0) / GB:.1f} GB"

        def hover(r):
            return f"serving {r['serve_bytes'] / GB:.2f} GB<br>{_wrap(r['serve_source'])}"
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
        return f"{r['ms_per_token']:.1f} ms/token on {device_name}<br>{_wrap(r['serve_source'])}"
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
