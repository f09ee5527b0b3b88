"""bench/gpu_runs.py's CPU smoke: a family through the real executor (worker process, run
store) on a micro config of a real architecture, its figures collected from the store."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _mod():
    spec = importlib.util.spec_from_file_location("gpu_runs", ROOT / "bench" / "gpu_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_families_name_real_strategies_and_presets():
    from engine import models, strategies
    mod = _mod()
    for fam, (preset, strategy, over, libs) in mod.FAMILIES.items():
        assert preset in models.presets(), fam
        assert strategies.get(strategy)["id"] == strategy, fam
    assert set(mod.CPU_FAMILIES) <= set(mod.FAMILIES)


def test_cpu_micro_smoke_through_the_executor(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    import os
    from engine.runs import api
    before = (os.environ.get("TUNEQUANT_HOME"), api._executor)
    out = tmp_path / "runs.json"
    assert _mod().main(["--device", "cpu", "--micro", "--families", "lora", "--out", str(out),
                        "--home", str(tmp_path / "home")]) == 0
    assert (os.environ.get("TUNEQUANT_HOME"), api._executor) == before      # the caller's store is back
    doc = json.loads(out.read_text())
    [row] = doc["rows"]
    assert row["family"] == "lora" and row["status"] == "finished", row.get("error")
    train = next(s for s in row["stages"] if s["stage"] == "train")
    assert train["steps"] == 2 and train["tokens_per_s"] > 0 and train["loss_mode"] == "chunked"
    assert train["peak_mem_bytes"] > 0 and train["mem_source"].startswith("cpu")
    assert train["trainable_params"] > 0
    ev = next(s for s in row["stages"] if s["stage"] == "evaluate")
    assert ev["perplexity"] > 1
    assert row["estimate_train"]["peak_allocated_bytes"] > 0
