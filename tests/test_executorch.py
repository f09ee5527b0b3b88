"""ExecuTorch: the 8da4w .pte export (torchao int8 dynamic activations + int4 group-32 weights, XNNPACK)
of the micro demo model, loaded and measured in ExecuTorch's runtime on this CPU. Skipped, saying why,
only where executorch is not installed (./dev.sh setup installs it: the `executorch` extra)."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine import strategies
from engine.runs.context import StageContext
from engine.runs.stages import executorch_pte
from engine.spec.run import RunSpec

NOT_HERE = executorch_pte.status()


def micro_dir():
    from engine.runs import demo
    return demo.ensure_model("micro-llama")


def ctx_for(tmp_path, stage: dict, state: dict):
    rs = RunSpec.parse({"model": "demo:micro-llama", "strategy": "bf16-baseline", "device": "cpu",
                        "train": {"seq_len": 64}, "evaluate": {"max_examples": 4, "prompt_len": 16, "new_tokens": 4},
                        "dataset": {"demo": "tickets", "max_examples": 40}})
    events = []
    ctx = StageContext(run_id="t", spec=rs, strategy=strategies.get("bf16-baseline"), stage=stage, index=0,
                       workdir=tmp_path, state=state, device="cpu", emit=lambda type, **p: events.append((type, p)))
    return ctx, events


def test_status_says_what_is_missing_or_nothing():
    try:
        import executorch  # noqa: F401
        from executorch.runtime import Runtime  # noqa: F401
        assert NOT_HERE is None
    except Exception:
        assert "executorch is not installed" in NOT_HERE and "not runnable here" in NOT_HERE


@pytest.mark.slow
@pytest.mark.skipif(NOT_HERE is not None, reason=f"executorch not installed: {NOT_HERE}")
def test_pte_export_then_measured_in_the_executorch_runtime(micro_home, tmp_path):
    import torch
    from torchao.quantization import quantize_
    from transformers import AutoModelForCausalLM

    from engine.runs.stages import STAGES, common
    from engine.runs.stages.runtime import measure
    from engine.runs.stages.train import not_lm_head
    ctx, events = ctx_for(tmp_path, {"stage": "export", "target": "executorch", "format": "executorch-8da4w"},
                          {"base_dir": str(micro_dir()), "model_dir": str(micro_dir()), "quant": None})
    res = STAGES["export"](ctx)
    (e,) = res["exports"]
    assert e["runtime"] == "executorch" and e["path"].endswith(".pte") and e["kv_cache"] is False
    assert res["delegated_subgraphs"] >= 1                              # XNNPACK took the quantized linears
    assert Path(e["path"]).stat().st_size == e["size_on_disk_bytes"] > 0
    assert any(t == "warning" and "no KV cache" in p["message"] for t, p in events)
    # the runtime's logits are the eager torchao 8da4w model's
    from executorch.runtime import Runtime
    ids = [0, 5, 17, 42, 99, 7, 3, 250]
    got = Runtime.get().load_program(e["path"]).load_method("forward").execute([torch.tensor([ids])])[0]
    m = AutoModelForCausalLM.from_pretrained(micro_dir(), dtype=torch.float32).eval()
    quantize_(m, executorch_pte.quant_config(32), filter_fn=not_lm_head)
    with torch.no_grad():
        want = m(input_ids=torch.tensor([ids]), use_cache=False).logits
    assert float((got - want).abs().max()) < 0.02 * float(want.abs().max())
    # the runtime evaluation: perplexity on the held-out rows, prefill, decode, size, memory
    from engine.runs import data
    tok = common.load_tokenizer(str(micro_dir()))
    ds = data.load(ctx.spec.dataset)
    r = measure(ctx, e, tok, ds, ds.eval[:4])
    assert "skipped" not in r, r
    assert r["perplexity"] > 1 and r["scored_tokens"] > 0 and r["prefill_ms"] > 0 and r["decode_tokens_per_s"] > 0
    assert "full-context recompute" in r["decode_mode"] and r["size_on_disk_bytes"] == e["size_on_disk_bytes"]
