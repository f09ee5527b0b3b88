"""``python -m engine calibrate [--store DB] [--import FILE] [--export FILE] [--json]``: refit the
estimates' correction factors from the run store's finished runs (engine.calibration) and print
the error before and after (docs/calibration.md)."""
from __future__ import annotations

from engine import calibration
from engine.cli.output import emit


def _pct(x) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def table(res: dict) -> str:
    lines = [f"calibration: {res['records']} record(s) from {res['runs']} run(s) -> {res['path']}"]
    if not res.get("active"):
        lines.append("  (TUNEQUANT_CALIBRATION=off: estimates of this process do not use it)")
    for dev, n in res["devices"].items():
        lines.append(f"  {dev}: {n} run(s)")
    if res.get("imported"):
        i = res["imported"]
        lines.append(f"imported {i['added']} new record(s) of {i['read']} from {i['file']}")
    lines.append("")
    lines.append("median |measured/estimated - 1|   (held back: each run corrected by a fit on the other runs)")
    lines.append("and the median factor off either way, exp|ln(measured/estimated)| (x1.00 = exact)")
    hdr = (f"{'device':<18} {'term':<28} {'runs':>4} {'before':>9} {'in-sample':>10} {'held back':>10}"
           f" {'before':>8} {'in-sample':>10} {'held back':>10}")
    lines += [hdr, "-" * len(hdr)]
    for r in res["evaluation"]:
        lines.append(f"{r['device']:<18} {r['term']:<28} {r['runs']:>4} {_pct(r['before']):>9} "
                     f"{_pct(r['in_sample']):>10} {_pct(r['held_back']):>10} x{r['before_x']:>7.2f} "
                     f"x{r['in_sample_x']:>9.2f} x{r['held_back_x']:>9.2f}")
    lines.append("")
    lines.append("factors at the exact versions (device, term, variant: factor, spread, runs)")
    for f in res["factors"]:
        if f["applies"] and f["versions"] != "*":
            lines.append(f"  {f['device']:<18} {f['term']:<28} {f['variant']:<14} x{f['factor']:.3g} "
                         f"(spread x{f['spread']:.2g}, {f['runs']} runs; {f['versions']})")
    if res.get("exported"):
        lines.append(f"exported {res['exported']['records']} record(s) to {res['exported']['path']}")
    return "\n".join(lines)


def _run(args) -> int:
    from engine.errors import InputError
    from engine.runs import store
    path = store.db_path(args.store)
    if args.store is not None and not path.is_file():
        raise InputError(f"--store: no run store at {path}; give the path of a runs.sqlite (default "
                         f"$TUNEQUANT_DB or $TUNEQUANT_HOME/runs.sqlite)", field="store")
    if args.export:
        from pathlib import Path
        folder = Path(args.export).expanduser().parent
        if not folder.is_dir():                  # never create folders for a typo
            raise InputError(f"--export: the folder {folder} does not exist; create it or choose another path",
                             field="export")
    res = calibration.calibrate(store.finished_runs(path), args.import_file, args.export, store=path,
                                allow_empty=args.allow_empty)
    if args.json:
        emit(res)
    else:
        print(table(res))
    return 0


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="refit the estimates' correction factors from measured runs")
    p.add_argument("--store", default=None, help="run store (default $TUNEQUANT_DB or $TUNEQUANT_HOME/runs.sqlite)")
    p.add_argument("--import", dest="import_file", default=None,
                   help="merge records from a calibration export or a bench/measurements/*.json file")
    p.add_argument("--export", default=None, help="write every record (store + imported) to this JSON file")
    p.add_argument("--allow-empty", action="store_true",
                   help="refit even when there are no records (it replaces a fit of some; the old file stays as .bak)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run)
