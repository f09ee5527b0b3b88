"""What every command shares: one JSON object on stdout, bad input as exit 2 with ``{"error"}``.

``Parser`` is argparse whose errors are InputErrors (so a bad flag reads like any other bad
input); ``emit`` prints a result; ``main`` in ``engine.cli`` turns InputError into exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from engine.errors import InputError
from engine.safeload import finite

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as InputError (exit 2 with a JSON error)."""

    def error(self, message):
        raise InputError(f"{self.prog}: {message}")


def emit(obj, as_json: bool = True, out=None) -> None:
    """Print a result: one JSON object (compact, one line) or an indented human view."""
    out = out or sys.stdout
    obj = finite(obj)                    # valid JSON everywhere: NaN/inf print as null
    if as_json:
        out.write(json.dumps(obj, default=str, allow_nan=False) + "\n")
    else:
        out.write(json.dumps(obj, indent=2, default=str, allow_nan=False) + "\n")
    out.flush()
