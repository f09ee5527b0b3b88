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


# the .pte's logits against the eager torchao 8da4w model's: XNNPACK's int8 x int4 kernels and the eager
# reference round differently; measured 0.002 of max |logit| 3.95 on the micro model (decoded through the cache)
TOL = 0.01


def eager_8da4w_logits(ids):
    import torch
    from torchao.quantization import quantize_
    from transformers import AutoModelForCausalLM

    from engine.runs.stages.train import not_lm_head
    m = AutoModelForCausalLM.from_pretrained(micro_dir(), dtype=torch.float32).eval()
    quantize_(m, executorch_pte.quant_config(32), filter_fn=not_lm_head)
    with torch.no_grad():
        return m(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


@pytest.mark.slow
@pytest.mark.skipif(NOT_HERE is not None, reason=f"executorch not installed: {NOT_HERE}")
def test_pte_with_kv_cache_decodes_token_by_token_as_the_eager_model(micro_home, tmp_path):
    import torch

    from engine.runs.stages import STAGES, common
    from engine.runs.stages.runtime import measure
    ctx, events = ctx_for(tmp_path, {"stage": "export", "target": "executorch", "format": "executorch-8da4w"},
                          {"base_dir": str(micro_dir()), "model_dir": str(micro_dir()), "quant": None})
    res = STAGES["export"](ctx)
    (e,) = res["exports"]
    assert e["runtime"] == "executorch" and e["path"].endswith(".pte")
    assert e["kv_cache"] is True and "kv_cache_error" not in res, res.get("kv_cache_error")
    assert res["delegated_subgraphs"] >= 1                              # XNNPACK took the quantized linears
    assert Path(e["path"]).stat().st_size == e["size_on_disk_bytes"] > e["kv_cache_bytes"] > 0
    assert not any(t == "warning" for t, p in events), events
    # the runtime decodes one token per execution at its cache position: logits of every step are the eager
    # model's logits of the whole sequence at that position
    from executorch.runtime import Runtime
    ids = [0, 5, 17, 42, 99, 7, 3, 250, 11, 12, 13, 14]
    want = eager_8da4w_logits(ids)
    run = executorch_pte.Program(Runtime.get().load_program(e["path"]).load_method("forward"), True, e["max_seq_len"])
    got = [run.prefill(ids[:3])]
    for t in ids[3:]:
        got.append(run.step(t)[None])
    got = torch.cat(got)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < TOL * float(want.abs().max())
    assert bool((got.argmax(-1) == want.argmax(-1)).all())
    # a new prompt at position 0 starts over: what was cached before does not leak into it
    again = run.prefill(ids[5:9])
    assert float((again - eager_8da4w_logits(ids[5:9])).abs().max()) < TOL * float(want.abs().max())
    # without the cache, a token at position t sees nothing before it: the check above could not pass by accident
    alone = run.prefill(ids[:1])
    assert float((alone[0] - want[0]).abs().max()) < TOL * float(want.abs().max())
    assert float((run.prefill([ids[6]])[0] - want[6]).abs().max()) > TOL * float(want.abs().max())
    # the runtime evaluation: perplexity on the held-out rows, prefill, decode through the cache, size, memory
    from engine.runs import data
    tok = common.load_tokenizer(str(micro_dir()))
    ds = data.load(ctx.spec.dataset)
    r = measure(ctx, e, tok, ds, ds.eval[:4])
    assert "skipped" not in r, r
    assert r["kv_cache"] is True and "KV cache" in r["decode_mode"]
    assert r["perplexity"] > 1 and r["scored_tokens"] > 0 and r["prefill_ms"] > 0 and r["decode_tokens_per_s"] > 0
    chk = r["kv_cache_check"]
    assert chk["tokens"] > chk["prefill_tokens"] and chk["max_abs_logit_diff"] < TOL * chk["max_abs_logit"]
    assert chk["argmax_agreement"] == 1.0 and r["size_on_disk_bytes"] == e["size_on_disk_bytes"]


@pytest.mark.slow
@pytest.mark.skipif(NOT_HERE is not None, reason=f"executorch not installed: {NOT_HERE}")
def test_pte_without_kv_cache_when_asked(micro_home, tmp_path):
    import torch

    from engine.runs.stages import STAGES, common
    from engine.runs.stages.runtime import measure
    ctx, events = ctx_for(tmp_path, {"stage": "export", "target": "executorch", "format": "executorch-8da4w",
                                     "kv_cache": False},
                          {"base_dir": str(micro_dir()), "model_dir": str(micro_dir()), "quant": None})
    (e,) = STAGES["export"](ctx)["exports"]
    assert e["kv_cache"] is False and "kv_cache_bytes" not in e
    assert any(t == "warning" and "no KV cache" in p["message"] for t, p in events)
    from executorch.runtime import Runtime
    ids = [0, 5, 17, 42, 99, 7, 3, 250]
    got = Runtime.get().load_program(e["path"]).load_method("forward").execute([torch.tensor([ids])])[0][0]
    want = eager_8da4w_logits(ids)
    assert float((got - want).abs().max()) < TOL * float(want.abs().max())
    from engine.runs import data
    tok = common.load_tokenizer(str(micro_dir()))
    ds = data.load(ctx.spec.dataset)
    r = measure(ctx, e, tok, ds, ds.eval[:2])
    assert "full-context recompute" in r["decode_mode"] and "kv_cache_check" not in r and r["perplexity"] > 1
