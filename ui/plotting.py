"""Plotly figures as plain JSON for the dashboard: the helpers live in ``engine.charts`` (the report
draws the same charts); this module keeps the names the screens import."""
from __future__ import annotations

from engine.charts import AXIS, FONT, Fig, empty, figure, note, side_by_side, vline  # noqa: F401
