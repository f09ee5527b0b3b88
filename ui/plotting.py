"""Plotly figures as plain JSON (``{"data": [...], "layout": {...}}``), the format plotly.js draws.

Building ``plotly.graph_objects`` figures validates every property in Python: about 10–25 ms
per figure here, too slow for charts that redraw on every input change (the budget is well
under 100 ms of server time for the whole update). A ``Fig`` is a dict with ``to_json()``,
which is all ``gr.Plot`` needs; tests read it like any dict.
"""
from __future__ import annotations

import json
import math

FONT = {"family": "Inter, ui-sans-serif, system-ui, sans-serif", "size": 12, "color": "#1f2937"}
AXIS = {"gridcolor": "#e5e7eb", "zeroline": False, "linecolor": "#9ca3af", "showline": True, "automargin": True}


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


def vline(fig: Fig, x: float, label: str, color: str = "#b91c1c") -> None:
    """A dashed vertical line across the plot (a memory limit, a latency goal) with its label."""
    fig.layout.setdefault("shapes", []).append(
        {"type": "line", "x0": x, "x1": x, "y0": 0, "y1": 1, "xref": "x", "yref": "paper",
         "line": {"color": color, "dash": "dash", "width": 1.5}})
    fig.layout.setdefault("annotations", []).append(
        {"text": label, "x": x, "y": 1.0, "xref": "x", "yref": "paper", "xanchor": "right", "yanchor": "bottom",
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
