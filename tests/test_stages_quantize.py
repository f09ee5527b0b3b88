"""The quantize and merge stages for real on the micro demo model: bitsandbytes INT8/NF4/FP4,
GPTQ and AWQ through gptqmodel, torchao int8 / W8A8 / int4 (Intx on the CPU); every artifact
loads back with from_pretrained and computes close to the 16-bit model."""
import pytest

from engine import strategies
from engine.errors import InputError
from engine.runs.context import StageContext
from engine.runs.stages import STAGES, run_inline
from engine.runs.stages.quantize import check, settings
from engine.spec.run import RunSpec

TRAIN = {"steps": 6, "batch_size": 4, "seq_len": 64, "learning_rate": 5e-3, "lora_rank": 8}
EVAL = {"max_examples": 4, "prompt_len": 16, "new_tokens": 4}



def run_quantize(tmp_path, method, **extra):
    """One quantize stage on the 16-bit micro model; returns (result, state, events)."""
    rs = RunSpec.parse({"model": "demo:micro-llama", "strategy": "ptq-nf4", "train": TRAIN,
                        "dataset": {"demo": "tickets", "max_examples": 40}, "device": "cpu"})
    events = []
    ctx = StageContext(run_id="t", spec=rs, strategy=strategies.get("ptq-nf4"), stage={"stage": "quantize",
                       "method": method, **extra}, index=0, workdir=tmp_path, state={}, device="cpu",
                       emit=lambda type, **p: events.append((type, p)))
    res = STAGES["quantize"](ctx)
    ctx.state["_ctx"] = ctx
    return res, ctx.state, events


def logits(path, x):
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return m, m(input_ids=x).logits.float()


def close_to_16bit(state, qdir, min_cos):
    import torch
    x = torch.arange(3, 35).view(1, 32)
    _, ref = logits(state["base_dir"], x)
    m, got = logits(qdir, x)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0).item()
    assert cos > min_cos, cos
    return m


@pytest.mark.parametrize("method,cls", [("nf4", "Linear4bit"), ("fp4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_bitsandbytes_roundtrip(micro_home, tmp_path, method, cls):
    res, state, events = run_quantize(tmp_path, method)
    assert res["quant"]["library"] == "bitsandbytes" and state["quant"]["method"] == method
    m = close_to_16bit(state, res["model_dir"], 0.98)
    lin = m.model.layers[0].self_attn.q_proj
    assert type(lin).__name__ == cls
    if method != "int8":
        assert lin.weight.quant_state.quant_type == method and lin.weight.quant_state.blocksize == 64
        assert m.config.quantization_config.bnb_4bit_use_double_quant
    # the stages' loader computes in fp32 on a CPU without fast bf16: the unquantized weights
    # (saved bf16) are cast up losslessly, the quantized ones stay packed
    from engine.runs.stages import common
    ctx = state["_ctx"]
    mm = common.load_model(ctx, res["model_dir"], quant=res["quant"])
    want = common.compute_dtype(ctx)
    assert mm.model.embed_tokens.weight.dtype == want and mm.lm_head.weight.dtype == want
    assert type(mm.model.layers[0].self_attn.q_proj.weight).__name__ in ("Params4bit", "Int8Params")
    # 4-bit: 0.5 byte per weight plus scales; the unquantized embeddings/head keep 16-bit
    assert res["size_on_disk_bytes"] < res["source_size_on_disk_bytes"] * (0.55 if method != "int8" else 0.7)
    assert any(t == "artifact" and p["kind"] == "quantized-model" for t, p in events)


def test_gptq_4bit_roundtrip(micro_home, tmp_path):
    import json
    res, state, _ = run_quantize(tmp_path, "gptq", bits=4, group_size=64, calibration_samples=16)
    cfg = json.loads((tmp_path / "quantized-gptq-4bit" / "config.json").read_text())["quantization_config"]
    assert cfg["bits"] == 4 and cfg["group_size"] == 64 and cfg["quant_method"] == "gptq"
    assert res["quant"]["calibration_samples_used"] == 16
    m = close_to_16bit(state, res["model_dir"], 0.97)
    up = m.model.layers[0].mlp.up_proj
    assert hasattr(up, "qweight") and up.bits == 4 and up.group_size == 64
    # 4 bits per weight + a scale and zero per 64: about a quarter of the 16-bit block weights
    assert res["size_on_disk_bytes"] < 0.6 * res["source_size_on_disk_bytes"]


def test_torchao_methods(micro_home, tmp_path):
    for method, tname in (("torchao-int8", "Int8Tensor"), ("dynamic-int8", "Int8Tensor"),
                          ("torchao-int4", "IntxUnpackedToInt8Tensor")):
        res, state, events = run_quantize(tmp_path / method, method, group_size=64)
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(res["model_dir"])
        assert type(m.model.layers[0].self_attn.k_proj.weight).__name__ == tname, method
        if method == "torchao-int4":
            assert any(t == "warning" and "needs a GPU" in p["message"] for t, p in events)
            assert "IntxWeightOnlyConfig(int4, group 64)" in res["quant"]["config"]


def test_lora_merge_then_gptq(micro_home, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    out = run_inline({"model": "demo:micro-llama", "strategy": "lora-merge-gptq-4bit", "train": TRAIN,
                      "quantize": {"calibration_samples": 16, "group_size": 64},
                      "evaluate": {**EVAL, "task_accuracy": False, "latency": False},
                      "dataset": {"demo": "tickets", "max_examples": 40}, "device": "cpu"}, tmp_path)
    merged = out["stages"]["merge#1"]
    assert merged["dtype"] == "bfloat16"
    a = AutoModelForCausalLM.from_pretrained(out["state"]["base_dir"])
    b = AutoModelForCausalLM.from_pretrained(merged["model_dir"])
    assert b.dtype == torch.bfloat16 and not hasattr(b, "peft_config")
    da = a.model.layers[0].self_attn.q_proj.weight.float()
    db = b.model.layers[0].self_attn.q_proj.weight.float()
    assert (da - db).abs().max() > 1e-3                              # the adapters were folded in
    q = out["stages"]["quantize#2"]
    assert q["quant"]["method"] == "gptq" and q["quant"]["group_size"] == 64
    ev = out["stages"]["evaluate#3"]
    assert "gptq 4-bit" in ev["after"]["model"] and ev["after"]["perplexity"] < ev["before"]["perplexity"]


def test_refusals_name_the_problem():
    with pytest.raises(InputError, match="needs a GPU with FP8"):
        check({"method": "fp8"}, None, "cpu")
    with pytest.raises(InputError, match="unknown quantization method 'int3'"):
        settings({"method": "int3"})
    with pytest.raises(InputError, match="awq quantizes to 4 bits"):
        check({"method": "awq", "bits": 3}, None, "cpu")
    with pytest.raises(InputError, match="power of two"):
        check({"method": "gptq", "group_size": 100}, None, "cpu")
    from engine.runs import demo
    with pytest.raises(InputError, match=r"group size 512 does not divide .*self_attn.q_proj \(128\)"):
        check({"method": "gptq", "group_size": 512}, demo.hf_config("micro-llama"), "cpu")
    assert settings({"method": "nf4"}) == {"method": "nf4", "bits": 4, "double_quant": True, "blocksize": 64}
    assert settings({"method": "gptq"})["group_size"] == 128


def test_merge_needs_adapters(micro_home, tmp_path):
    rs = RunSpec.parse({"model": "demo:micro-llama", "strategy": "lora-merge-nf4", "device": "cpu",
                        "dataset": {"demo": "tickets"}})
    ctx = StageContext(run_id="t", spec=rs, strategy=strategies.get("lora-merge-nf4"), stage={"stage": "merge"},
                       index=1, workdir=tmp_path, state={})
    with pytest.raises(InputError, match="merge needs LoRA adapters"):
        STAGES["merge"](ctx)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ptq-awq-4bit", "ptq-gptq-3bit", "ptq-gptq-2bit", "ptq-gptq-8bit",
                                      "gptq-qlora", "qa-lora", "qat-int4-weight", "qat-lora", "ptq-fp4",
                                      "lora-merge-nf4", "ptq-torchao-int8", "ptq-dynamic-int8"])
def test_every_cpu_strategy_end_to_end(micro_home, tmp_path, strategy):
    out = run_inline({"model": "demo:micro-llama", "strategy": strategy, "train": TRAIN,
                      "quantize": {"calibration_samples": 16}, "evaluate": EVAL,
                      "dataset": {"demo": "tickets", "max_examples": 40}, "device": "cpu"}, tmp_path)
    ev = out["stages"][[k for k in out["stages"] if k.startswith("evaluate")][0]]
    assert ev["after"]["perplexity"] > 1 and ev["after"]["size_on_disk_bytes"] > 0
    if strategy == "qa-lora":
        assert any(e["type"] == "warning" and "QA-LoRA" in e["message"] for e in out["events"])
