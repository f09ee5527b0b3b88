"""``python -m engine report --scenario F [--runs model|all|none|ID,ID] [--format html|md] [--out FILE]
[--json]``: the scenario report (engine.report) with the run store's runs (engine.runs.evidence)."""
from __future__ import annotations

from pathlib import Path

from engine import report
from engine.cli.output import emit
from engine.errors import InputError


def _run(args) -> int:
    from engine.runs import evidence
    fmt = args.format
    if args.out and args.out != "-" and fmt is None:
        fmt = "md" if args.out.endswith(".md") else "html"
    fmt = fmt or "html"
    runs = None if args.runs in (None, "model") else args.runs
    doc = evidence.report(args.scenario, runs, fmt)
    stem = Path(str(args.scenario)).stem if not isinstance(args.scenario, dict) else "scenario"
    out = args.out or f"report-{stem}.{fmt}"
    if out == "-":
        if args.json:
            raise InputError("out: '-' (stdout) cannot be combined with --json; name a file", field="out")
        print(doc)
        return 0
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    info = {"path": str(path.resolve()), "format": fmt, "bytes": path.stat().st_size,
            "sections": [t for _, t in report.SECTIONS]}
    if args.json:
        emit(info)
    else:
        print(f"wrote {info['path']} ({info['bytes']:,} bytes, {fmt})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="write the report of a scenario (HTML with charts, or Markdown)")
    p.add_argument("--scenario", required=True, help="scenario YAML/JSON file, or a preset id of presets/scenarios/")
    p.add_argument("--runs", default=None,
                   help="runs to include: model (default: the finished runs of the scenario's model), all, none, "
                        "or run ids ID,ID")
    p.add_argument("--format", choices=report.FORMATS, default=None, help="html (default; charts inline, opens offline) or md")
    p.add_argument("--out", default=None, help="file to write (default report-<scenario>.<format>; '-' prints it)")
    p.add_argument("--json", action="store_true", help='print {"path", "format", "bytes", "sections"}')
    p.set_defaults(func=_run)
