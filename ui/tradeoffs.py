"""Screen 3, trade-offs (Plotly): memory vs accuracy, latency vs accuracy, memory per stage, cost.

The figures are built by ``engine.charts`` from the matrix rows (``ui.matrix.rows``), so charts
and matrix never disagree and the scenario report (``engine.report``) draws the very same charts.
Hovering a point shows where its numbers come from (the planner command and its inputs, the
published evidence of the accuracy fit). Every figure has a fixed ``uirevision``: when an input
changes and the chart is redrawn, a zoom the user made is kept.
"""
from __future__ import annotations

from engine.charts import (CHARTS, FAMILY_COLORS, MEMORY_VIEWS, PART_COLORS, cost_chart,  # noqa: F401
                           latency_vs_accuracy, memory_breakdown, memory_vs_accuracy, pareto, scenario_charts)
