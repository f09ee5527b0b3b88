"""Reading files a person hands in (scenarios, run configs, config.json, datasets) without letting
one hang the process or crash it: a size cap per kind (configurable through the environment), strict
UTF-8, YAML without aliases (a "billion laughs" alias bomb expands to gigabytes), JSON nesting that
cannot overflow the stack. Every refusal is an InputError naming the file and the limit.

    TUNEQUANT_MAX_CONFIG_BYTES   scenario / run config / config.json   (default 1 MB)
    TUNEQUANT_MAX_DATASET_BYTES  a dataset file                          (default 100 MB)
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import yaml

from engine.errors import InputError

DEFAULT_MAX_CONFIG_BYTES = 1_000_000
DEFAULT_MAX_DATASET_BYTES = 100_000_000


def _limit(var: str, default: int) -> int:
    try:
        v = int(float(os.environ.get(var) or default))
        return v if v > 0 else default
    except ValueError:
        return default


def max_config_bytes() -> int:
    return _limit("TUNEQUANT_MAX_CONFIG_BYTES", DEFAULT_MAX_CONFIG_BYTES)


def max_dataset_bytes() -> int:
    return _limit("TUNEQUANT_MAX_DATASET_BYTES", DEFAULT_MAX_DATASET_BYTES)


def _mb(n: int) -> str:
    return f"{n / 1e6:.3g} MB"


def check_size(path, what: str, max_bytes: int, var: str, field: str | None = None) -> int:
    """The file's size, or an InputError if it is over ``max_bytes`` (the message names ``var``)."""
    try:
        size = Path(path).stat().st_size
    except OSError as e:
        raise InputError(f"{what} {path}: cannot be read ({e.strerror or e})", field=field)
    if size > max_bytes:
        raise InputError(f"{what} {path} is {_mb(size)}; the limit is {_mb(max_bytes)} (set {var} to raise it)",
                         field=field)
    return size


def read_text(path, what: str, field: str | None = None, max_bytes: int | None = None,
              var: str = "TUNEQUANT_MAX_CONFIG_BYTES", encoding: str = "utf-8") -> str:
    """The text of a config-sized file: size-capped, strictly UTF-8 (a BOM is dropped)."""
    max_bytes = max_config_bytes() if max_bytes is None else max_bytes
    check_size(path, what, max_bytes, var, field)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"{what} {path}: cannot be read ({e.strerror or e})", field=field)
    try:
        return raw.decode("utf-8-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         f"save it as UTF-8", field=field)


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses anchors/aliases (the alias-bomb shape) outright."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases (*name) are not accepted here; write the values out", ev.start_mark)
        return super().compose_node(parent, index)


def load_yaml(text: str, what: str, field: str | None = None):
    """YAML (or JSON) text -> data, without aliases; InputError for anything it cannot read."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)   # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise InputError(f"{what} is not valid YAML/JSON: {e}", field=field)
    except RecursionError:
        raise InputError(f"{what} is nested too deeply to be a config", field=field)


def load_yaml_file(path, what: str, field: str | None = None):
    return load_yaml(read_text(path, what, field), f"{what} {path}", field)


def loads_json(text: str, what: str, field: str | None = None):
    """JSON text -> data; nesting deep enough to overflow the parser is an InputError, not a crash."""
    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(f"{what} is nested too deeply (JSON objects inside objects hundreds deep)", field=field)


def finite_number(v) -> bool:
    """A real number (not bool) that is finite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def finite(obj):
    """``obj`` with every NaN/inf float replaced by None: what strict JSON can hold (the run store,
    events.jsonl and every --json output write it so; docs/runs.md)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj
