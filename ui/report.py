"""The report download (decision matrix screen): the current scenario's report, HTML or Markdown.

``write(scenario, fmt)`` builds it with ``engine.runs.evidence.report`` (the same report as
``python -m engine report``: the matrix, the dashboard's charts, the runs of the scenario's model,
measured vs estimated) and writes it to a temp folder Gradio may serve; the page then offers it
for download. The engine's report module is imported on first use, so the app starts no slower.
"""
from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

from engine.errors import InputError
from ui.common import error_md, ok_md, unexpected_md

FORMATS = {"HTML (charts, opens offline)": "html", "Markdown (tables)": "md"}
RUNS = {"finished runs of this model": None, "every finished run": "all", "no runs": "none"}


def folder() -> Path:
    """Where reports are written: the system temp folder (Gradio serves files from it)."""
    p = Path(tempfile.gettempdir()) / "tunequant-reports"
    p.mkdir(parents=True, exist_ok=True)
    return p


def file_name(scenario: dict, fmt: str) -> str:
    base = str(scenario.get("name") or "-".join(str(x) for x in (scenario.get("model"), scenario.get("task")) if x)
               or "scenario")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._")[:60] or "scenario"
    return f"tunequant-report-{slug}.{fmt}"


def write(scenario: dict | None, fmt_label: str, runs_label: str | None = None) -> tuple[str | None, str]:
    """(path of the written report or None, an inline message)."""
    if not scenario:
        return None, error_md("no scenario yet: fill the wizard (or pick an example) first")
    fmt = FORMATS.get(fmt_label, fmt_label)
    try:
        from engine.runs import evidence
        t0 = time.perf_counter()
        doc = evidence.report(scenario, runs=RUNS.get(runs_label, runs_label), fmt=fmt)
    except InputError as e:
        return None, error_md(e)
    except Exception as e:
        return None, unexpected_md(e, "building the report")
    sub = Path(tempfile.mkdtemp(prefix="r-", dir=folder()))      # one folder per build: no clash between users
    path = sub / file_name(scenario, fmt)
    path.write_text(doc, encoding="utf-8")
    ms = (time.perf_counter() - t0) * 1000
    size = path.stat().st_size
    shown = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"
    return str(path), ok_md(f"Report ready ({shown}, built in {ms:.0f} ms): the scenario, the recommendation and "
                            f"why, the matrix, the charts, the runs, measured vs estimated, what would change the "
                            f"answer and the commands that reproduce it.")
