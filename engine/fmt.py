"""How numbers read in the product, and the byte units: one place for the engine, the dashboard
(ui/) and the report (engine.report).

GB (1e9) is what memory is shown in: the unit GPU names, the advisor's reasons and the tables use.
GIB (2**30) is what CUDA's context sizes and the OOM suggestions speak in (torch reports GiB).
"""
from __future__ import annotations

GB = 1e9            # decimal gigabyte
GIB = 1024 ** 3     # binary gibibyte


def gb(n, digits: int = 1, none: str = "—") -> str:
    """Bytes as GB text (``none`` when unknown)."""
    if n is None:
        return none
    try:
        return f"{float(n) / GB:.{digits}f} GB"
    except (TypeError, ValueError):
        return none


def gib(n, digits: int = 1, none: str = "?") -> str:
    """Bytes as GiB text (``none`` when unknown)."""
    if n is None:
        return none
    return f"{float(n) / GIB:.{digits}f} GiB"


def iec(n) -> str:
    """Bytes in the largest binary unit that keeps the number below 1024: '512 B', '3.00 GiB'."""
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


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
