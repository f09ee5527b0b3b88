"""``python -m engine ...``: the command line over the engine's public API.

Every command prints one JSON object with ``--json`` (``estimate batch``: one per line).
Bad input exits 2 with ``{"error": "..."}``; the message says what would be valid.
One module per command group, each with ``register(sub)``: ``estimate`` (estimates),
``recommend`` (the decision matrix), ``runs`` (run / runs list|show|stop), ``report``,
``calibrate``; ``output`` holds the JSON and exit-code helpers. Nothing in the engine below
imports this package: the domain modules hold no argparse code.
"""
from __future__ import annotations

import sys

from engine.cli.output import EXIT_BAD_INPUT, EXIT_INTERRUPTED, Parser, emit  # noqa: F401  (emit: the commands' printer)
from engine.errors import InputError


def build_parser() -> Parser:
    from engine.cli import calibrate, estimate, recommend, report, runs

    p = Parser(prog="python -m engine", description="tunequant engine: estimate, recommend, run, report, calibrate")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    estimate.register(sub)
    recommend.register(sub)
    runs.register(sub)
    report.register(sub)
    calibrate.register(sub)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except InputError as e:
        emit(e.to_json())
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
