"""Where the data in presets/ lives, and a cached YAML reader for it."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import yaml

PRESETS_DIR = Path(os.environ.get("TUNEQUANT_PRESETS", Path(__file__).resolve().parent.parent / "presets"))


@functools.lru_cache(maxsize=None)
def load_yaml(relpath: str):
    """Parse one YAML file under presets/ (cached: presets are read-only at run time)."""
    with open(PRESETS_DIR / relpath, encoding="utf-8") as f:
        return yaml.safe_load(f)


@functools.lru_cache(maxsize=None)
def load_dir(reldir: str) -> dict[str, dict]:
    """Every ``*.yaml`` in a presets folder, keyed by its ``id`` (or file stem)."""
    out = {}
    for path in sorted((PRESETS_DIR / reldir).glob("*.yaml")):
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        data.setdefault("id", path.stem)
        out[data["id"]] = data
    return out
