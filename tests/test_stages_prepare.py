"""prepare(spec): a run that cannot work is refused before it starts, with a message naming
the problem and the field (no torch is loaded for this)."""
import json

import pytest

from engine.errors import InputError
from engine.runs.stages import prepare
from engine.spec.run import RunSpec


def spec(**kw):
    base = {"model": "demo:micro-llama", "strategy": "lora", "dataset": {"demo": "tickets"}, "device": "cpu"}
    base.update(kw)
    return RunSpec.parse(base)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEQUANT_HOME", str(tmp_path / "home"))


def test_good_runs_pass_and_report():
    out = prepare(spec())
    assert out["device"] == "cpu" and out["model"] == "micro-llama"
    assert out["dataset"] == {"format": "classification", "task": "classification", "rows": 600, "valid_rows": 600}
    for strategy in ("qlora", "lora-merge-gptq-4bit", "qat-int8", "ptq-nf4", "ptq-gptq-4bit", "ptq-awq-4bit",
                     "full-then-int8", "gptq-qlora", "qa-lora", "bf16-baseline", "ptq-gguf-q4_k_m",
                     "lora-merge-gguf-q4_k_m"):
        prepare(spec(strategy=strategy))
    assert prepare(spec(model="llama-3.2-1b", strategy="qlora"))["model"] == "llama-3.2-1b"


def test_unknown_model():
    with pytest.raises(InputError, match="unknown demo model 'demo:nope'") as e:
        prepare(spec(model="demo:nope"))
    assert e.value.field == "model"
    with pytest.raises(InputError, match="unknown model 'not-a-model'"):
        prepare(spec(model="not-a-model"))


def test_bad_datasets(tmp_path):
    with pytest.raises(InputError, match="not found") as e:
        prepare(spec(dataset={"path": str(tmp_path / "missing.jsonl")}))
    assert e.value.field == "dataset.path"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "output": ""}) + "\n" + json.dumps({"instruction": "y", "output": "z"}) + "\n")
    with pytest.raises(InputError, match=r"1 row \(1\) have an empty required field \(instruction, output\)"):
        prepare(spec(dataset={"path": str(bad)}))
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "x", "answer": "y"}) + "\n")
    with pytest.raises(InputError, match="fields found: answer, question"):
        prepare(spec(dataset={"path": str(odd)}))
    with pytest.raises(InputError, match="unknown demo dataset 'nope'"):
        prepare(spec(dataset={"demo": "nope"}))


def test_settings_the_model_or_device_cannot_take():
    with pytest.raises(InputError, match="needs a GPU with FP8"):
        prepare(spec(strategy="ptq-fp8"))
    with pytest.raises(InputError, match=r"group size 256 does not divide .*\(128\)") as e:
        prepare(spec(strategy="ptq-gptq-4bit", quantize={"group_size": 256}))
    assert e.value.field == "quantize.group_size"
    with pytest.raises(InputError, match="none of the LoRA targets query_key_value"):
        prepare(spec(train={"lora_targets": ["query_key_value"]}))
    with pytest.raises(InputError, match="seq_len 4096 is longer than micro-llama supports \\(512"):
        prepare(spec(train={"seq_len": 4096}))
    with pytest.raises(InputError, match="awq quantizes to 4 bits"):
        prepare(spec(strategy="ptq-awq-4bit", quantize={"bits": 8}))


def test_a_strategy_with_pending_stages_is_refused_and_the_catalog_lists_only_what_cannot_run(monkeypatch):
    from engine import strategies
    from engine.runs.stages import STAGES
    from engine.runs.stages.executorch_pte import status
    if status() is None:                                        # the ExecuTorch export runs here now
        prepare(spec(strategy="qat-8da4w-executorch"))
    else:                                                       # where executorch is missing: said at launch
        with pytest.raises(InputError, match="executorch is not installed.*not runnable here"):
            prepare(spec(strategy="qat-8da4w-executorch"))
    pending = {s["id"]: s["pending_stages"] for s in strategies.catalog() if s.get("pending_stages")}
    assert pending == {}                                        # GGUF and ExecuTorch exports run (docs/stages.md)
    real = strategies.get
    monkeypatch.setattr(strategies, "get", lambda sid: {**real(sid), "pending_stages": ["export"]}
                        if sid == "qat-8da4w-executorch" else real(sid))
    with pytest.raises(InputError, match="cannot run its export stage yet") as e:
        prepare(spec(strategy="qat-8da4w-executorch"))
    assert e.value.field == "strategy"
    for s in strategies.catalog():                              # every stage a runnable strategy names is registered
        if not s.get("pending_stages"):
            assert {st["stage"] for st in s["stages"]} <= set(STAGES), s["id"]


def test_prepare_imports_no_torch():
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys; from engine.runs.stages import prepare; from engine.spec.run import RunSpec; "
            "prepare(RunSpec.parse({'model': 'demo:micro-llama', 'strategy': 'qlora', 'dataset': {'demo': 'tickets'}, "
            "'device': 'cpu'})); sys.exit(1 if 'torch' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(Path(__file__).resolve().parent.parent))
    assert r.returncode == 0, r.stderr
