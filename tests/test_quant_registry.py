"""The registries of quantization methods and weight formats (presets/quant/): every entry is
consistent with the rest of the presets, everything else reads them (the catalog's derived facts,
the advisor's serving check, the stage's settings), and a method added through the registry
alone shows up in the estimates, the advisor and the quantize stage (a real run on the micro model)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine import quant, strategies
from engine.errors import InputError
from engine.estimate import accuracy, formats

ROOT = Path(__file__).resolve().parent.parent


def test_every_method_names_known_formats_accuracy_methods_and_handlers():
    from engine.runs.stages.quantize import HANDLERS
    for m in quant.methods().values():
        for b in m.bits:
            assert formats.get(m.format_for(b)).quantized, (m.id, b)
        assert m.accuracy["method"] in accuracy.methods(), m.id
        assert m.library in HANDLERS, m.id
    assert quant.get("dynamic-int8") is quant.get("w8a8")          # the old name of the one scheme
    assert quant.get("GPTQ").format_for(3) == "gptq-3bit" and quant.get("awq").format_for() == "awq-4bit"
    with pytest.raises(InputError, match="unknown quantization method 'int3'; known: awq, fp4.*w8a8"):
        quant.get("int3")


def test_settings_follow_the_registry():
    assert quant.settings({"method": "gptq"}) == {"method": "gptq", "bits": 4, "group_size": 128,
                                                   "calibration_samples": 128}
    assert quant.settings({"method": "nf4", "double_quant": False, "bits": 8}) == \
        {"method": "nf4", "bits": 4, "double_quant": False, "blocksize": 64}     # bits are fixed for NF4
    assert quant.settings({"method": "dynamic-int8"}) == {"method": "w8a8", "bits": 8}


def test_the_catalog_reads_its_facts_from_the_registries():
    t = strategies.all_traits()
    calibrates = {sid for sid, s in t.items() if s["calibration"]}
    assert calibrates == {s["id"] for s in strategies.catalog()
                          if any(st.get("method") in ("gptq", "awq") for st in s["stages"])}
    assert {sid for sid, s in t.items() if s["gpu_only"]} == {"ptq-torchao-int4", "ptq-fp8"}
    assert {sid for sid, s in t.items() if s["fp8"]} == {"ptq-fp8"}
    assert not t["bf16-baseline"]["quantized"] and not t["hosted-api"]["quantized"] and t["ptq-nf4"]["quantized"]
    # a PTQ strategy's accuracy request is its method's (the explicit requests the catalog held before)
    want = {"ptq-int8": {"method": "int8", "w_bits": 8, "per_channel": True},
            "ptq-nf4": {"method": "nf4", "w_bits": 4, "group_size": 64},
            "ptq-gptq-2bit": {"method": "gptq", "w_bits": 2, "group_size": 64},
            "ptq-awq-4bit": {"method": "awq", "w_bits": 4, "group_size": 128},
            "ptq-torchao-int8": {"method": "rtn", "w_bits": 8, "per_channel": True},
            "ptq-torchao-int4": {"method": "rtn", "w_bits": 4, "group_size": 128},
            "ptq-dynamic-int8": {"method": "smoothquant", "w_bits": 8, "a_bits": 8, "per_channel": True,
                                 "act_granularity": "per-token"},
            "ptq-fp8": {"method": "fp8", "w_bits": 8, "a_bits": 8, "per_channel": True, "act_granularity": "per-token"}}
    for sid, req in want.items():
        assert strategies.accuracy_request(strategies.get(sid)) == req, sid
    assert strategies.scheme(strategies.get("ptq-fp8")) == "FP8" and strategies.scheme(strategies.get("ptq-dynamic-int8")) == "W8A8"


def test_formats_say_where_they_serve():
    hf = [f for f in formats.formats().values() if "transformers" in f.runtimes]     # the HF-path formats
    on = {k: {f.id for f in hf if k in f.serve_on} for k in ("edge", "laptop", "cpu", "phone")}
    # a phone runs no transformers: of these only bf16 reaches one, through ExecuTorch
    assert on["phone"] == {"bf16"}
    assert on["laptop"] == {"bf16", "fp16", "gptq-8bit", "gptq-4bit", "gptq-3bit", "awq-4bit", "torchao-int8", "w8a8",
                            "w4a8"}
    assert "torchao-int4" in on["edge"] and "torchao-int4" not in on["cpu"] and "fp8" not in on["edge"]
    assert all("gpu" in f.serve_on for f in hf)
    # the serving runtimes' formats serve where their runtime runs (presets/runtimes.yaml devices)
    from engine.estimate import runtimes
    for f in formats.formats().values():
        kinds = {k for r in f.runtimes for k in runtimes.get(r).devices}
        assert set(f.serve_on) <= kinds | {"gpu"}, f.id
    assert formats.get("w8a8").tensor_cores == "int8" and formats.get("fp8").tensor_cores == "fp8"


def test_catalog_check_catches_a_deploy_format_its_method_does_not_make():
    import copy
    cat = copy.deepcopy(strategies.catalog())
    next(s for s in cat if s["id"] == "ptq-nf4")["deploy"] = "int8"
    with pytest.raises(InputError, match="produces nf4, but it deploys int8"):
        strategies.check_catalog(cat)


# ---- adding a method -------------------------------------------------------------------------------

NEW_METHOD = {"id": "nf4-plain", "name": "bitsandbytes NF4 without double quantization", "library": "bitsandbytes",
              "format": "nf4-nodq", "bits": [4], "fixed": {"bits": 4, "blocksize": 64, "double_quant": False},
              "accuracy": {"method": "nf4", "group_size": 64},
              "config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}
NEW_STRATEGY = {"id": "ptq-nf4-plain", "family": "ptq-only", "name": "NF4 without double quantization",
                "stages": [{"stage": "quantize", "method": "nf4-plain"}, {"stage": "evaluate"}],
                "deploy": "nf4-nodq", "libraries": ["bitsandbytes"],
                "summary": "NF4 with fp32 absmax per block (no second quantization of the constants)."}
DEMO = {"model": "demo:tiny-llama", "task": "classification", "examples": 400,
        "hardware": {"gpu": "rtx-4090-24gb"}, "deploy": {"target": "consumer-gpu"}}


def test_a_method_added_as_data_alone(tmp_path):
    """A copy of presets/ with one more entry in quant/methods.yaml and one strategy that uses it:
    the planner estimates its quantize stage, the advisor ranks the strategy with the method's
    facts, the stage takes its settings; nothing else was touched."""
    presets = tmp_path / "presets"
    shutil.copytree(ROOT / "presets", presets)
    for rel, entry in (("quant/methods.yaml", NEW_METHOD), ("strategies.yaml", NEW_STRATEGY)):
        with open(presets / rel, "a", encoding="utf-8") as f:
            f.write(yaml.safe_dump([entry], sort_keys=False))
    code = f"""
import json
from engine import advisor, estimate, strategies
from engine.estimate import formats
from engine.runs.stages.quantize import check
q = estimate.estimate_quantize("llama-3.2-1b", "nf4-plain", gpu="l4-24gb")
out = {{"quant_weights": q["breakdown"]["quantized_weights"],
        "nodq_weights": formats.weights_bytes(estimate._arch("llama-3.2-1b"), "nf4-nodq"),
        "check": check({{"method": "nf4-plain"}}, None, "cpu")}}
res = advisor.recommend({DEMO!r}, what_if=False)
row = next(e for e in res["ranked"] if e["strategy"] == "ptq-nf4-plain")
out["row"] = {{"family": row["family"], "acc": row["estimates"]["accuracy"]["inputs"],
              "serve": next(s for s in row["estimates"]["stages"] if s["stage"] == "serve")["weights"]}}
out["traits"] = strategies.all_traits()["ptq-nf4-plain"]
print(json.dumps(out))
"""
    env = {**os.environ, "TUNEQUANT_PRESETS": str(presets), "TUNEQUANT_HOME": str(tmp_path / "home")}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    import json
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["quant_weights"] == out["nodq_weights"] > 0
    assert out["check"] == {"method": "nf4-plain", "bits": 4, "blocksize": 64, "double_quant": False}
    assert out["row"]["family"] == "ptq-only" and out["row"]["serve"] == "nf4-nodq"
    assert out["row"]["acc"]["method"] == "nf4" and out["row"]["acc"]["w_bits"] == 4
    assert out["traits"]["calibration"] is False and out["traits"]["gpu_only"] is False and out["traits"]["quantized"]


@pytest.fixture
def registered():
    """The new method registered in this process with a handler of its own library, and a strategy using it."""
    from engine.runs.stages import common
    from engine.runs.stages.quantize import HANDLERS

    def handler(ctx, s, src, out):
        """bitsandbytes NF4 with the method's fixed settings (no double quantization), saved as loaded."""
        from transformers import BitsAndBytesConfig
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_use_double_quant=s["double_quant"],
                                 bnb_4bit_compute_dtype=common.compute_dtype(ctx))
        model = common.load_model(ctx, src, dtype=common.base_dtype(ctx), quantization_config=cfg)
        model.save_pretrained(out)
        common.save_tokenizer(ctx, out)
        return {"library": "bitsandbytes", "handler": "test"}

    quant.register({**NEW_METHOD, "library": "bnb-plain"})
    HANDLERS["bnb-plain"] = handler
    strategies.register(NEW_STRATEGY)
    try:
        yield
    finally:
        strategies.unregister(NEW_STRATEGY["id"])
        HANDLERS.pop("bnb-plain", None)
        quant.unregister(NEW_METHOD["id"])


def test_a_registered_method_is_estimated_ranked_and_run(registered, micro_home, tmp_path):
    from engine import advisor, estimate
    q = estimate.estimate_quantize("demo:micro-llama", "nf4-plain", gpu="l4-24gb")
    assert q["breakdown"]["quantized_weights"] == formats.weights_bytes(estimate._arch("demo:micro-llama"), "nf4-nodq")
    res = advisor.recommend(DEMO, what_if=False)
    row = next(e for e in res["ranked"] if e["strategy"] == "ptq-nf4-plain")
    assert row["estimates"]["accuracy"]["inputs"]["method"] == "nf4"
    # the quantize stage runs it through the registered handler, on the micro demo model
    from test_stages_quantize import run_quantize
    res, state, events = run_quantize(tmp_path, "nf4-plain")
    assert res["quant"]["handler"] == "test" and res["quant"]["method"] == "nf4-plain"
    assert res["quant"]["double_quant"] is False and Path(res["model_dir"]).name == "quantized-nf4-plain"
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(res["model_dir"])
    lin = m.model.layers[0].self_attn.q_proj
    assert type(lin).__name__ == "Linear4bit" and lin.weight.quant_state.quant_type == "nf4"
    assert not m.config.quantization_config.bnb_4bit_use_double_quant
