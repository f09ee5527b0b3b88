"""Layers that hold (DESIGN.md "Layout", docs/layers.md): each engine module imports only its own
layer or those below, function-level imports included; no import cycle among engine modules; only the
CLI entry point imports the CLI; and per entry point, what loading it (and using it) pulls in.

    0 base      engine (package), errors, presets, fmt, workspace
    1 planner   vocab, quant, models, hardware, demo_presets, strategies, record, spec/, estimate/
    2 advice    advisor/, calibration, report, charts
    3 runs      runs/
    4 entry     cli/, engine.__main__ (and ui/, app.py, which import the engine only)
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "torchao", "gptqmodel", "llama_cpp", "ray")

# module name prefix -> layer (the longest matching prefix decides)
LAYERS = {
    "engine": 0, "engine.errors": 0, "engine.presets": 0, "engine.fmt": 0, "engine.workspace": 0,
    "engine.secrets_mask": 0, "engine.safeload": 0,
    "engine.vocab": 1, "engine.quant": 1, "engine.record": 1,
    "engine.models": 1, "engine.hardware": 1, "engine.demo_presets": 1, "engine.strategies": 1,
    "engine.spec": 1, "engine.estimate": 1,
    "engine.advisor": 2, "engine.calibration": 2, "engine.report": 2, "engine.charts": 2,
    "engine.runs": 3,
    "engine.cli": 4, "engine.__main__": 4,
}
NAMES = {0: "base", 1: "planner", 2: "advisor/calibration/report", 3: "runs", 4: "cli"}


def modules() -> dict[str, Path]:
    """Every engine module by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(ENGINE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{name} has no layer: add it to LAYERS (and to docs/layers.md)"
    return LAYERS[best]


def imports(name: str, path: Path, mods) -> set[str]:
    """Engine modules this module imports anywhere in its body (module level and inside functions),
    the edges of the before-stop hook's check."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[:len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t in mods and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, mods) for m, p in mods.items()}


def test_every_import_goes_to_the_same_layer_or_below():
    bad = []
    for m, targets in graph().items():
        for t in targets:
            if m.startswith(t + "."):               # a package's own parent (loaded first anyway)
                continue
            if layer(t) > layer(m):
                bad.append(f"{m} ({NAMES[layer(m)]}) imports {t} ({NAMES[layer(t)]})")
    assert not bad, "imports that go up a layer:\n" + "\n".join(sorted(bad))


def test_no_import_cycle_among_engine_modules():
    """The same check as the before-stop hook (/work/shared/hooks/before-stop): an edge from a module to
    every engine module it names in an import, function-level imports included, a parent package left out."""
    g = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph().items()}

    def reach(a):
        seen, stack = set(), [a]
        while stack:
            for w in g[stack.pop()]:
                if w not in seen:
                    seen.add(w)
                    stack.append(w)
        return seen

    cyclic = sorted(m for m in g if m in reach(m))
    assert not cyclic, f"{len(cyclic)} engine modules sit on import cycles: {cyclic}"


def test_only_the_entry_point_imports_the_cli():
    users = sorted(m for m, ts in graph().items() if any(t == "engine.cli" or t.startswith("engine.cli.") for t in ts)
                   and not (m == "engine.__main__" or m == "engine.cli" or m.startswith("engine.cli.")))
    assert users == []
    for path in sorted((ROOT / "ui").glob("*.py")) + [ROOT / "app.py"]:
        assert "engine.cli" not in path.read_text(encoding="utf-8"), path


def test_domain_modules_hold_no_argparse():
    holders = sorted(m for m, p in modules().items() if not (m == "engine.cli" or m.startswith("engine.cli."))
                     and "argparse" in p.read_text(encoding="utf-8"))
    assert holders == []


# ---- per entry point: what loading and using it pulls in ------------------------------------------

ENTRY_POINTS = {
    # entry point -> (code run after the import, module prefixes that must not be loaded)
    "engine.estimate": ("engine.estimate.estimate_train('demo:tiny-llama', 'qlora'); "
                        "engine.estimate.estimate_infer('llama-3.2-1b', weights='nf4'); "
                        "engine.estimate.estimate_accuracy(family='llama-2', params_b=7, method='gptq', w_bits=4)",
                        ("engine.runs", "engine.advisor", "engine.calibration", "engine.report", "engine.cli", "ui")),
    "engine.advisor": ("engine.advisor.recommend('ticket-routing'); engine.advisor.recommend({'model': 'demo:tiny-llama', "
                       "'task': 'chat', 'hardware': {'gpu': 't4-16gb'}}, what_if=False)",
                       ("engine.runs", "engine.calibration", "engine.report", "engine.cli", "ui")),
    "engine.calibration": ("engine.calibration.all_records([])",
                           ("engine.runs", "engine.advisor", "engine.report", "engine.cli", "ui")),
    "engine.report": ("", ("engine.runs", "engine.cli", "ui")),
    "engine.runs.api": ("engine.runs.api.list_runs()", ("engine.cli", "ui")),
    "engine.runs.evidence": ("engine.runs.evidence.recommend('ticket-routing', what_if=False)", ("engine.cli", "ui")),
    "app": ("", ("engine.cli",)),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_what_each_entry_point_loads(entry, tmp_path):
    code, banned = ENTRY_POINTS[entry]
    script = (f"import sys, {entry}\n{code}\n"
              f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} "
              f"or any(m == b or m.startswith(b + '.') for b in {banned!r}))\n"
              "print('LOADED', bad)\n")
    env = {**os.environ, "TUNEQUANT_HOME": str(tmp_path), "TUNEQUANT_MEASURED": "off", "TUNEQUANT_CALIBRATION": "off"}
    env.pop("TUNEQUANT_DB", None)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "LOADED []" in p.stdout, f"{entry} loads {p.stdout.strip()}"
