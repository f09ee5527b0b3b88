"""Where the user's files live: ``$TUNEQUANT_HOME`` (default ``./workspace``), for the run store,
uploads, the demo cache and the calibration files alike."""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The workspace folder (``$TUNEQUANT_HOME``, default ./workspace), absolute."""
    return Path(os.environ.get("TUNEQUANT_HOME") or "workspace").expanduser().resolve()
