"""The app as a whole: starts without the heavy stack, binds safely, builds every screen."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "torchao", "gptqmodel")


def _python(code: str, env=None, timeout=180):
    return subprocess.run([sys.executable, *code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_app_start_imports_no_torch(tmp_path):
    """Import the app and build every screen (what `python app.py` does before serving)."""
    code = ("import sys, app; app.build(); "
            "print('LOADED', sorted({m.split('.')[0] for m in sys.modules}))")
    r = _python(["-X", "importtime", "-c", code], env={"TUNEQUANT_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines() if "|" in line}
    assert "gradio" in imported and "engine" in imported and "ui" in imported   # the importtime trace is real
    for mod in HEAVY:
        assert mod not in imported, f"{mod} imported at app start"
    loaded = r.stdout.split("LOADED", 1)[1]
    for mod in HEAVY:
        assert f"'{mod}'" not in loaded


def test_bind_address_defaults(monkeypatch):
    import app
    for var in ("GRADIO_SERVER_NAME", "SPACE_ID", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert app.server_name() == "127.0.0.1"
    assert app.server_name("0.0.0.0") == "0.0.0.0"
    assert app.server_port() == 7860 and app.server_port(8001) == 8001
    monkeypatch.setenv("SPACE_ID", "someone/tunequant")
    assert app.server_name() == "0.0.0.0"
    monkeypatch.setenv("GRADIO_SERVER_NAME", "10.1.2.3")
    assert app.server_name() == "10.1.2.3"
    assert app.server_name("127.0.0.1") == "127.0.0.1"      # the flag wins
    monkeypatch.setenv("GRADIO_SERVER_PORT", "9000")
    assert app.server_port() == 9000


def test_public_demo_mode(monkeypatch):
    from ui.common import public_demo
    monkeypatch.delenv("TUNEQUANT_PUBLIC_DEMO", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert not public_demo()
    monkeypatch.setenv("SPACE_ID", "someone/tunequant")
    assert public_demo()                                     # on by default on a Space
    monkeypatch.setenv("TUNEQUANT_PUBLIC_DEMO", "0")
    assert not public_demo()                                 # unless turned off
    monkeypatch.delenv("SPACE_ID")
    monkeypatch.setenv("TUNEQUANT_PUBLIC_DEMO", "1")
    assert public_demo()


def test_build_app_has_every_screen(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEQUANT_HOME", str(tmp_path))
    from ui.layout import build_app
    demo = build_app()
    cfg = demo.get_config_file()
    ids = {c.get("props", {}).get("elem_id") for c in cfg["components"]}
    for eid in ("tab-wizard", "tab-matrix", "tab-tradeoffs", "tab-runs", "tab-compare", "matrix_table",
                "plot_mem", "plot_lat", "plot_breakdown", "plot_cost", "launch", "run_preview", "stop",
                "run_picker", "run_log", "compare_pick", "export_csv", "export_json"):
        assert eid in ids, eid
    # polling is a gr.Timer, never a generator that owns a run
    assert any(c.get("type") == "timer" for c in cfg["components"])
    fns = [getattr(bf.fn, "__name__", "") for bf in demo.fns.values()]
    assert "tick" in fns
    import inspect
    assert not any(inspect.isgeneratorfunction(bf.fn) for bf in demo.fns.values() if bf.fn)
    # the launch handler is the one place with a concurrency limit of 1 (GPU work)
    launch = [bf for bf in demo.fns.values() if getattr(bf.fn, "__name__", "") == "do_launch"]
    assert launch and launch[0].concurrency_limit == 1


def test_public_demo_banner(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEQUANT_HOME", str(tmp_path))
    monkeypatch.setenv("TUNEQUANT_PUBLIC_DEMO", "1")
    from ui.layout import build_app
    cfg = build_app().get_config_file()
    html = " ".join(str(c.get("props", {}).get("value", "")) for c in cfg["components"])
    assert "Public demo" in html and "launching GPU runs is off" in html
