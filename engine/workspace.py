"""Where the user's files live: ``$TUNEQUANT_HOME`` (default ``./workspace``), for the run store,
uploads, the demo cache and the calibration files alike."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path


def home() -> Path:
    """The workspace folder (``$TUNEQUANT_HOME``, default ./workspace), absolute."""
    return Path(os.environ.get("TUNEQUANT_HOME") or "workspace").expanduser().resolve()


class FileLock:
    """An exclusive lock on a file (released by the OS if the holder dies): one builder of a
    cached model at a time, the others wait."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a+")

    def __enter__(self):
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()
