"""``python -m engine report --scenario F [--runs model|all|none|ID,ID] [--format html|md] [--out FILE]
[--json]``: the scenario report (engine.report) with the run store's runs (engine.runs.evidence)."""
from __future__ import annotations

from pathlib import Path

from engine import report
from engine.cli.output import emit
from engine.errors import InputError
from engine.workspace import home


def _run(args) -> int:
    from engine.runs import evidence
    fmt = args.format
    if args.out and args.out != "-" and fmt is None:
        fmt = "md" if args.out.endswith(".md") else "html"
    fmt = fmt or "html"
    runs = None if args.runs in (None, "model") else args.runs
    doc = evidence.report(args.scenario, runs, fmt)
    stem = Path(str(args.scenario)).stem if not isinstance(args.scenario, dict) else "scenario"
    if args.out == "-":
        if args.json:
            raise InputError("out: '-' (stdout) cannot be combined with --json; name a file", field="out")
        print(doc)
        return 0
    if args.out:
        path = Path(args.out).expanduser()
        if not path.parent.is_dir():            # never create folders anywhere: a typo would
            raise InputError(f"--out: the folder {path.parent} does not exist; create it or choose another path",
                             field="out")
    else:                                       # not the current directory: the workspace's reports/
        path = home() / "reports" / f"report-{stem}.{fmt}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"cannot create {path.parent} ({e.strerror}); give --out FILE", field="out")
    if path.is_dir():
        raise InputError(f"--out: {path} is a folder; name a file", field="out")
    try:
        path.write_text(doc, encoding="utf-8")
    except OSError as e:
        raise InputError(f"--out: cannot write {path} ({e.strerror or e}); choose a writable place", field="out")
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
    p.add_argument("--out", default=None, help="file to write, in an existing folder (default $TUNEQUANT_HOME/reports/report-<scenario>.<format>; "
                        "'-' prints it)")
    p.add_argument("--json", action="store_true", help='print {"path", "format", "bytes", "sections"}')
    p.set_defaults(func=_run)
