"""Estimates corrected by measured runs: the fitted factors (``$TUNEQUANT_HOME/calibration.json``,
written by ``engine.calibration``) applied to an estimate's headline figures.

``apply(est, kind)`` multiplies the figures of a train/infer estimate by the factor that matches
its device, the installed library versions and the method/format (``lookup``), widens the
interval by the runs' spread and says so in the estimate's ``calibration`` key. The fitting
itself (pairs of measured vs estimated, the fit, its evaluation, sharing) is
``engine.calibration``, a layer above: the planner only reads the fitted file.

Pure Python (json, importlib.metadata): never imports torch or the ML libraries.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
from pathlib import Path

from engine.presets import load_yaml
from engine.workspace import home

@functools.lru_cache(maxsize=1)
def settings() -> dict:
    return load_yaml("calibration.yaml")



def fitted_path() -> Path | None:
    """The fitted calibration estimates use: $TUNEQUANT_CALIBRATION (a path, or ``off``:
    None), else $TUNEQUANT_HOME/calibration.json."""
    env = os.environ.get("TUNEQUANT_CALIBRATION")
    if env is not None and env.strip().lower() in ("off", "0", "false", "none", ""):
        return None
    return Path(env).expanduser().resolve() if env else home() / "calibration.json"



# ---- versions -----------------------------------------------------------------------------------
def versions_key(versions: dict | None) -> str:
    """'torch 2.13 · transformers 5.23 · ...' at major.minor of the packages of the settings."""
    versions = versions or {}
    parts = []
    for name in settings()["version_packages"]:
        v = versions.get(name)
        m = re.match(r"^(\d+)\.(\d+)", str(v)) if v else None
        parts.append(f"{name} {m.group(1)}.{m.group(2)}" if m else f"{name} -")
    return " · ".join(parts)


@functools.lru_cache(maxsize=1)
def installed_versions_key() -> str:
    """The versions key of this environment (package metadata only; nothing is imported)."""
    out = {}
    for name in settings()["version_packages"]:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return versions_key(out)



def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None



def variant_of(kind: str, inputs: dict | None) -> str | None:
    """What splits a term further (presets/calibration.yaml variant_keys): the training method,
    the weights format. Speed errors differ by kernel path, so each gets its own factor."""
    key = (settings().get("variant_keys") or {}).get(kind)
    v = (inputs or {}).get(key) if key else None
    return str(v) if v is not None else None



def _index(fitted: dict) -> dict:
    idx = fitted.get("_index")
    if idx is None:
        idx = {(f["device"], f["versions"], f["term"], f.get("variant", "*")): f for f in fitted.get("factors") or []}
        fitted["_index"] = idx
    return idx


MATCHES = (("exact", False, False), ("any-versions", True, False), ("exact", False, True), ("any-versions", True, True))


def lookup(fitted: dict, device: str | None, versions: str, term: str,
           variant: str | None = None) -> tuple[dict | None, str]:
    """(factor entry, "exact" | "any-versions"), the first with enough runs of: this variant
    (method or weights format) at the exact versions key, at any versions; then every variant
    of the term (entry["variant"] == "*") at the exact versions, at any versions."""
    idx = _index(fitted)
    for how, any_versions, all_variants in MATCHES:
        if not variant and not all_variants:
            continue
        f = idx.get((device, "*" if any_versions else versions, term, "*" if all_variants else str(variant)))
        if f and f["applies"]:
            return f, how
    return None, ""



# ---- applying a fit to an estimate ------------------------------------------------------------------
_LOADED: dict = {}


def load_fitted(path: Path | None = None) -> dict | None:
    """The fitted calibration (cached by path and mtime); None when there is none."""
    path = fitted_path() if path is None else Path(path)
    if path is None:
        return None
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return None
    hit = _LOADED.get(str(path))
    if hit and hit[0] == mtime:
        return hit[1]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    _LOADED[str(path)] = (mtime, data)
    return data


def apply(est: dict, kind: str, enabled: bool = True, device_bytes=None) -> dict:
    """Add the ``calibration`` key to an estimate (and correct its headline figures in place:
    value x factor; the interval's low / spread and high x spread, the runs' scatter).

    ``device_bytes(peak, low, high)`` recomputes what the device must hold when a peak changes."""
    dev = est.get("gpu")
    info = {"applied": False, "runs": 0, "device": dev, "note": "", "terms": {}}
    path = fitted_path()
    if not enabled:
        info["note"] = "not calibrated: calibration=False (--no-calibration); the formula's figures"
    elif path is None:
        info["note"] = "not calibrated: TUNEQUANT_CALIBRATION=off; the formula's figures"
    else:
        fitted = load_fitted(path)
        if fitted is None:
            info["note"] = (f"not calibrated: no fitted calibration at {path} (run `python -m engine calibrate` "
                            f"after measured runs)")
        else:
            vkey = installed_versions_key()
            matched, how_set, run_ids = [], set(), set()
            for term, spec in settings()["terms"].items():
                k, key = term.split(".", 1)
                if k != kind or _num(est.get(key)) is None:
                    continue
                f, how = lookup(fitted, dev, vkey, term, variant_of(kind, est.get("inputs")))
                if f is None:
                    continue
                factor, spread = f["factor"], f["spread"]
                for s in spec.get("scales", []):
                    if _num(est.get(s)) is not None:     # the interval widens by the runs' spread
                        widen = 1 / spread if s == "low" or s.endswith("_low") else \
                            spread if s == "high" or s.endswith("_high") else 1.0
                        est[s] = est[s] * factor * widen
                for s in spec.get("inverse", []):
                    if _num(est.get(s)) is not None:
                        est[s] = est[s] / factor
                info["terms"][key] = {"factor": factor, "raw": est[key] / factor, "runs": f["runs"],
                                      "spread": f["spread"], "versions": f["versions"],
                                      "variant": f.get("variant", "*"), "match": how,
                                      "run_ids": f["run_ids"][:20]}
                if key in ("weights_bytes", "peak_allocated_bytes"):
                    est[key] = int(round(est[key]))
                if spec.get("device_bytes") and device_bytes is not None:
                    est.update(device_bytes(est["peak_allocated_bytes"], int(est["low"]), int(est["high"])))
                matched.append(term)
                how_set.add(how)
                run_ids.update(f["run_ids"])
            if matched:
                info["applied"], info["runs"] = True, len(run_ids)
                where = ("the installed library versions" if not any("any-versions" in h for h in how_set) else
                         "other library versions too (no exact match for " + vkey + ")")
                info["note"] = (f"calibrated from {len(run_ids)} measured run(s) on {dev} with {where}: "
                                + ", ".join(f"{t.split('.', 1)[1]} x{info['terms'][t.split('.', 1)[1]]['factor']:.3g}"
                                            for t in matched) + f" ({path.name}, fitted {fitted.get('fitted_at')})")
            else:
                n = (fitted.get("devices") or {}).get(dev, 0)
                info["note"] = (f"not calibrated: no measured runs for {dev}" if not n else
                                f"not calibrated: {n} measured run(s) on {dev}, but no term of this {kind} "
                                f"estimate has {fitted.get('settings', {}).get('min_runs')}+ runs agreeing on a "
                                f"correction (they scatter around the formula's figures)")
    est["calibration"] = info
    if info["applied"]:
        est.setdefault("notes", []).append(info["note"])
    return est


def state() -> tuple:
    """What the calibration in force depends on: the fitted file (or None) and its mtime. Caches of
    estimates key on it, so a refit or a changed TUNEQUANT_CALIBRATION is never served stale."""
    path = fitted_path()
    if path is None:
        return (None, None)
    try:
        return (str(path), path.stat().st_mtime_ns)
    except OSError:
        return (str(path), None)
