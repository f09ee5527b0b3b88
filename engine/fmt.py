"""How numbers read in the product: one place for the dashboard (ui/) and the report (engine.report)."""
from __future__ import annotations

GB = 1e9     # memory is shown in decimal GB, the unit GPU names and the advisor's reasons use


def gb(n, digits: int = 1) -> str:
    """Bytes as GB text ('—' when unknown)."""
    if n is None:
        return "—"
    try:
        return f"{float(n) / GB:.{digits}f} GB"
    except (TypeError, ValueError):
        return "—"


def num(x, fmt: str = "{:.3g}", none: str = "—") -> str:
    if x is None:
        return none
    try:
        return fmt.format(float(x))
    except (TypeError, ValueError):
        return str(x)


def usd(x) -> str:
    if x is None:
        return "—"
    x = float(x)
    if x >= 100:
        return f"${x:,.0f}"
    if x >= 1:
        return f"${x:,.2f}"
    return f"${x:.3f}"


def duration(seconds, digits: int = 0) -> str:
    """Seconds as s / min / h / days; `digits` for the seconds (a stage of 5.5 s)."""
    if seconds is None:
        return "—"
    s = float(seconds)
    if s < 90:
        return f"{s:.{digits}f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"
