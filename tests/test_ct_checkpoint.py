"""The export stage's compressed-tensors target: the micro model written as a W8A8 int8 / FP8 / W4A16
checkpoint by the compressed-tensors library in the layout vLLM loads, read back by transformers, whose
logits stay close to the 16-bit source's; the stored weights are the round-to-nearest values of the
source's. Skipped, saying why, only where compressed-tensors is not installed (./dev.sh setup installs it:
the `export` extra)."""
from __future__ import annotations

import json

import pytest

from engine import strategies
from engine.errors import InputError
from engine.runs.context import StageContext
from engine.runs.stages import ct_checkpoint
from engine.spec.run import RunSpec

NOT_HERE = ct_checkpoint.status()
needs_ct = pytest.mark.skipif(NOT_HERE is not None, reason=f"compressed-tensors not installed: {NOT_HERE}")


def micro_dir():
    from engine.runs import demo
    return demo.ensure_model("micro-llama")


def ctx_for(tmp_path, fmt: str, state=None):
    rs = RunSpec.parse({"model": "demo:micro-llama", "strategy": "ptq-ct-w8a8-int8", "device": "cpu",
                        "train": {"seq_len": 64}, "evaluate": {"max_examples": 4, "prompt_len": 16, "new_tokens": 4},
                        "dataset": {"demo": "tickets", "max_examples": 40}})
    events = []
    src = str(micro_dir())
    ctx = StageContext(run_id="t", spec=rs, strategy=strategies.get("ptq-ct-w8a8-int8"),
                       stage={"stage": "export", "target": "compressed-tensors", "format": fmt}, index=0,
                       workdir=tmp_path, state=state if state is not None else {"base_dir": src, "model_dir": src},
                       device="cpu", emit=lambda type, **p: events.append((type, p)))
    return ctx, events


def logits(model_dir, ids, **kw):
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model_dir, **kw).eval()
    with torch.no_grad():
        return m(input_ids=torch.tensor([ids])).logits[0].float(), m


def test_status_says_what_is_missing_or_nothing():
    try:
        import compressed_tensors  # noqa: F401
        assert NOT_HERE is None
    except ImportError:
        assert "compressed-tensors is not installed" in NOT_HERE and ".[export]" in NOT_HERE


# scheme -> (stored dtype of a block linear's weight tensor, its tensor name, vLLM's scheme class)
CASES = {"ct-w8a8-int8": ("I8", "weight", "CompressedTensorsW8A8Int8", "int-quantized"),
         "ct-fp8-dynamic": ("F8_E4M3", "weight", "CompressedTensorsW8A8Fp8", "float-quantized"),
         "ct-w4a16": ("I32", "weight_packed", "CompressedTensorsWNA16", "pack-quantized")}


@needs_ct
@pytest.mark.parametrize("fmt", ["ct-w8a8-int8", pytest.param("ct-fp8-dynamic", marks=pytest.mark.slow),
                                 pytest.param("ct-w4a16", marks=pytest.mark.slow)])
def test_checkpoint_in_vllm_layout_reads_back_close_to_the_source(micro_home, tmp_path, fmt):
    import torch
    from safetensors import safe_open

    from engine.runs.stages import STAGES
    dtype_name, wname, scheme, compression = CASES[fmt]
    ctx, events = ctx_for(tmp_path, fmt)
    res = STAGES["export"](ctx)
    (e,) = res["exports"]
    assert e["runtime"] == "vllm" and e["format"] == fmt and e["role"] == "deploy"
    out = tmp_path / "export-compressed-tensors"
    assert e["path"] == str(out)
    # the layout vLLM reads: quant_method compressed-tensors in config.json, the scheme's tensors on disk
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == compression and qc["ignore"] == ["lm_head"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice(f"model.layers.0.self_attn.q_proj.{wname}").get_dtype() == dtype_name
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight_scale").get_dtype() == "BF16"
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"            # ignored: stays 16-bit
    assert "model.layers.0.mlp.down_proj.weight_scale" in keys
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    man = json.loads((out / "vllm_manifest.json").read_text())
    assert man["quantization"] == "compressed-tensors" and man["scheme"] == scheme and man["verified_in_vllm"] is False
    assert man["min_compute_capability"] >= 7.5 and man["checkpoint"]["quantized_linears"] == 14   # 7 per layer, 2 layers
    # read back independently of the stage: transformers' compressed-tensors loader vs the 16-bit source
    ids = [0, 5, 17, 42, 99, 7, 3, 250, 11, 12, 13, 14]
    want, src = logits(micro_dir(), ids, dtype=torch.bfloat16)
    got, back = logits(out, ids)
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9
    # ... and the int8 weights on disk are the source's rounded to their per-channel scale (half a step, plus the
    # bf16 rounding of the stored scale: 8 significant bits)
    if fmt == "ct-w8a8-int8":
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            q = f.get_tensor("model.layers.0.self_attn.q_proj.weight").float()
            scale = f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").float()
        w = src.model.layers[0].self_attn.q_proj.weight.detach().float()
        assert q.abs().max() <= 128 and bool((q == q.round()).all()) and q.abs().max() >= 100   # the int8 range is used
        assert bool(((q * scale - w).abs() <= scale / 2 + w.abs() * 2 ** -8).all())
    # the stage's own read-back says the same, and lands in the export entry
    rb = res["manifest"]["readback"]
    assert rb == e["readback"] and rb["max_abs_logit_diff"] < 0.05 * rb["max_abs_logit"] and rb["tokens"] > 0
    assert 0.8 < rb["perplexity_ratio"] < 1.25 and rb["argmax_agreement"] >= 0.9
    assert not any(t == "warning" for t, _ in events)


@needs_ct
def test_refusals(micro_home, tmp_path):
    from engine.runs.stages import STAGES
    from engine.runs.stages.export import settings
    with pytest.raises(InputError, match="compressed-tensors target writes .*ct-w8a8-int8"):
        settings({"stage": "export", "target": "compressed-tensors", "format": "gguf-q4_k_m"})
    assert settings({"stage": "export", "target": "compressed-tensors"})["format"] == "ct-w8a8-int8"
    ctx, _ = ctx_for(tmp_path, "ct-w8a8-int8", state={"base_dir": str(micro_dir()), "model_dir": str(micro_dir()),
                                                       "quant": {"method": "nf4", "library": "bitsandbytes"}})
    with pytest.raises(InputError, match="already quantized"):
        STAGES["export"](ctx)


@needs_ct
def test_group_that_does_not_divide_a_width_is_refused():
    import torch
    from compressed_tensors.quantization import preset_name_to_scheme
    args = preset_name_to_scheme("W4A16", ["Linear"]).weights                # group 128
    with pytest.raises(InputError, match="128 does not divide .* 576"):
        ct_checkpoint._observe(torch.zeros(64, 576), args)


@needs_ct
def test_vllm_runtime_evaluation_is_skipped_on_the_cpu_with_the_reason(micro_home, tmp_path):
    from engine.runs.stages.runtime import measure
    ctx, _ = ctx_for(tmp_path, "ct-w8a8-int8")
    r = measure(ctx, {"format": "ct-w8a8-int8", "runtime": "vllm", "path": str(tmp_path)}, None, None, [])
    assert r["runtime"] == "vllm" and "CUDA" in r["skipped"]
