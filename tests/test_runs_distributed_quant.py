"""QLoRA and QAT in several processes (resources: processes): torchrun + FSDP2 over gloo on this
CPU, on the micro demo model. QLoRA: bitsandbytes' 4-bit base weights replicated on every rank
(FSDP2 ignored_params), adapters and the rest sharded. QAT: torchao's fake-quantized linears
sharded like any linear; the convert stage (in the worker) reloads the gathered weights.

GPTQ base + LoRA (gptq-qlora, qa-lora): the GPTQ checkpoint's packed buffers whole on every rank, the adapters sharded.

Default suite: one 2-process run of each, loss going down, what it saves loads in the next stage.
``-m slow``: each follows the one-process loss curve with the same sequences per step."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine import strategies
from engine.errors import InputError
from engine.runs.context import StageContext, stage_entry
from engine.runs.stages import STAGES, prepare
from engine.spec.run import RunSpec

TRAIN = {"batch_size": 4, "seq_len": 64, "learning_rate": 5e-3, "lora_rank": 8, "grad_ckpt": False,
         "loss": "reference"}
EVAL = {"max_examples": 4, "task_accuracy": False, "latency": False, "before_and_after": False}


def spec(strategy, processes=2, **train):
    return RunSpec.parse({"name": strategy, "model": "demo:micro-llama", "strategy": strategy,
                          "dataset": {"demo": "tickets", "max_examples": 60}, "train": {**TRAIN, **train},
                          "evaluate": EVAL, "device": "cpu",
                          **({"resources": {"processes": processes}} if processes > 1 else {})})


def run_stages(s: RunSpec, workdir: Path, upto: str) -> dict:
    """The strategy's stages up to ``upto`` as the worker runs them (train in 2 processes under torchrun)."""
    st = strategies.get(s.strategy)
    workdir.mkdir(parents=True, exist_ok=True)
    state, out = {}, {}
    for i, stage in enumerate(st["stages"]):
        ctx = StageContext(run_id=workdir.name, spec=s, strategy=st, stage=stage_entry(st, i, s), index=i,
                           workdir=workdir, state=state)
        out[stage["stage"]] = STAGES[stage["stage"]](ctx)
        if stage["stage"] == upto:
            break
    return {"results": out, "state": state}


def test_qat_lora_stays_refused_with_the_reason():
    prepare(spec("qlora"))
    prepare(spec("qat-int8"))
    with pytest.raises(InputError, match="strategy qat-lora cannot train that way: QAT \\+ LoRA merges its adapters into the fake-quantized base") as e:
        prepare(spec("qat-lora"))
    assert e.value.field == "resources"


def test_two_process_qat_then_convert(tmp_path, micro_home):
    r = run_stages(spec("qat-int8", steps=3), tmp_path / "qat", upto="convert")
    train, conv = r["results"]["train"], r["results"]["convert"]
    assert train["processes"] == 2 and len(train["ranks"]) == 2 and train["losses"][-1] < train["losses"][0]
    assert "Int8DynamicActivationIntxWeightConfig" in train["qat"]
    # the gathered float weights, loaded back and converted by torchao in the worker
    assert Path(train["qat_trained_dir"], "model.safetensors").is_file()
    assert conv["quant"]["library"] == "torchao" and conv["size_on_disk_bytes"] > 0


def test_two_process_qlora(tmp_path, micro_home):
    r = run_stages(spec("qlora", steps=3), tmp_path / "qlora", upto="train")
    train = r["results"]["train"]
    assert train["processes"] == 2 and train["losses"][-1] < train["losses"][0]
    assert Path(train["adapter_dir"], "adapter_model.safetensors").is_file()
    assert r["state"]["adapter_base"]["quant"]["method"] == "nf4"



def test_two_process_adapters_on_a_gptq_base(tmp_path, micro_home):
    """qa-lora (and gptq-qlora, the same train stage without the group pooling): the GPTQ stage runs once in the
    worker, then LoRA trains over FSDP2 in 2 processes on the GPTQ checkpoint; gptqmodel's packed weights are
    module buffers, which FSDP2 leaves whole on every rank (it shards parameters: the adapters and the rest)."""
    import json
    s = RunSpec.parse({**spec("qa-lora", steps=3).model_dump(exclude_none=True),
                       "quantize": {"calibration_samples": 8}})          # the GPTQ stage is not what this tests
    r = run_stages(s, tmp_path / "qalora", upto="train")
    train = r["results"]["train"]
    assert train["processes"] == 2 and len(train["ranks"]) == 2 and train["losses"][-1] < train["losses"][0]
    assert r["state"]["adapter_base"]["quant"]["method"] == "gptq"
    cfg = json.loads(Path(train["adapter_dir"], "adapter_config.json").read_text())
    assert cfg["use_qalora"] and cfg["qalora_group_size"] == 32
    log = Path(tmp_path / "qalora" / "dist" / "rank-0.jsonl").read_text()
    assert "buffers of the GPTQ base (qweight, qzeros, scales, g_idx) whole on every rank" in log


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["qat-int8", "qlora", "gptq-qlora"])
def test_two_processes_follow_the_one_process_curve(tmp_path, micro_home, strategy):
    two = run_stages(spec(strategy, steps=4), tmp_path / "two", upto="train")["results"]["train"]
    one = run_stages(spec(strategy, processes=1, steps=4, grad_accum=2), tmp_path / "one", upto="train")["results"]["train"]
    assert two["losses"] == pytest.approx(one["losses"], rel=5e-3)
