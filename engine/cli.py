"""``python -m engine ...``: the command line over the engine's public API.

Every command prints one JSON object with ``--json`` (``estimate batch``: one per line).
Bad input exits 2 with ``{"error": "..."}``; the message says what would be valid.
Each area registers its own subcommands: estimates in ``engine.estimate.cli``, runs in
``engine.runs.cli``, the recommendation in ``engine.advisor``.
"""
from __future__ import annotations

import argparse
import json
import sys

from engine.errors import InputError


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as InputError (exit 2 with a JSON error)."""

    def error(self, message):
        raise InputError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    from engine.estimate import cli as estimate_cli
    from engine import advisor
    from engine.runs import cli as runs_cli
    from engine import calibration, report

    p = _Parser(prog="python -m engine", description="tunequant engine: estimate, recommend, run, report, calibrate")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    estimate_cli.register(sub)
    advisor.register_cli(sub)
    runs_cli.register(sub)
    report.register_cli(sub)
    calibration.register_cli(sub)
    return p


def emit(obj, as_json: bool = True, out=None) -> None:
    """Print a result: one JSON object (compact, one line) or an indented human view."""
    out = out or sys.stdout
    if as_json:
        out.write(json.dumps(obj, default=str) + "\n")
    else:
        out.write(json.dumps(obj, indent=2, default=str) + "\n")
    out.flush()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except InputError as e:
        emit(e.to_json())
        return 2
    except KeyboardInterrupt:
        return 130
