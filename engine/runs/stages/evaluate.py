"""The evaluate stage: measure the model a run produced (``after``) and, when
``evaluate.before_and_after``, the model it started from (``before``), on the same held-out rows.

For each model:
  perplexity            exp(mean NLL) of the held-out answer tokens (every token for plain
                        text), the tokens the training loss counts; ``scored_tokens`` says how many
  accuracy              classification: exact match of the generated label (greedy, first line)
  json_valid_rate,      structured output: share of generations that hold a JSON object, share of
  field_match,          the reference fields it gets exactly right, share with every field right
  exact_match
  prefill_ms            one forward pass over ``evaluate.prompt_len`` real tokens, batch 1
                        (median of 3 after a warm-up)
  decode_tokens_per_s   greedy ``generate`` of ``evaluate.new_tokens`` tokens: (new - 1) tokens
                        over (generate time - prefill time)
  peak_mem_bytes        CUDA max_memory_allocated, or the process's peak RSS on the CPU, from
                        loading the model to the last measurement (``mem_source`` says which)
  weights_bytes         the loaded model's parameters and buffers as stored (packed sizes of
                        quantized tensors, inner tensors of torchao's)
  size_on_disk_bytes    weight files of the model dir (plus the adapter's, if any)
  harness               lm-evaluation-harness scores of the tasks in ``evaluate.harness`` (the run's
                        own held-out rows as a local task, or named harness tasks): stages/harness.py
Each model is an ``eval`` event with all of these and ``metric`` events for the headline numbers;
``compare`` gives after/before ratios.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from pathlib import Path

from engine.runs.stages import common
from engine.runs.stages.scoring import first_json_object, task_accuracy  # noqa: F401 (first_json_object: API)

HEADLINE = {"perplexity": "", "accuracy": "fraction", "json_valid_rate": "fraction", "field_match": "fraction",
            "prefill_ms": "ms", "decode_tokens_per_s": "tokens/s", "peak_mem_bytes": "bytes",
            "size_on_disk_bytes": "bytes"}


# ---- exported artifacts, in their runtimes -------------------------------------------------------
def measure_runtimes(ctx, exports, tok, ds, examples, hf_after: dict) -> list[dict]:
    """Each exported artifact measured in its runtime (engine/runs/stages/runtime.py), as ``eval``
    events named ``<runtime>:<format>`` and metrics ``<runtime>:<format>.<key>``; ``vs_hf`` gives the
    ratios to the HF evaluation of the model the artifact was exported from (``after``)."""
    from engine.runs.stages import runtime
    out = []
    for e in exports:
        if ctx.should_stop():
            break
        if e.get("role") == "source" and not ctx.spec.evaluate.runtime_sources:
            ctx.log(f"{e['format']} ({Path(e['path']).name}) is the source the deployed artifact was made from: not "
                    "measured (evaluate.runtime_sources: false)")
            continue
        ctx.log(f"evaluate {e['format']} in {e['runtime']}: {Path(e['path']).name}")
        t0 = time.perf_counter()
        m = runtime.measure(ctx, e, tok, ds, examples)
        m["seconds_total"] = round(time.perf_counter() - t0, 3)
        if m.get("skipped"):
            ctx.warn(f"{e['format']} not measured in {e['runtime']}: {m['skipped']}")
        else:
            m["vs_hf"] = {f"{k}_ratio": round(m[k] / hf_after[k], 4) for k in ("perplexity", "prefill_ms")
                          if m.get(k) and hf_after.get(k)}
            if m.get("decode_tokens_per_s") and hf_after.get("decode_tokens_per_s"):
                m["vs_hf"]["decode_tokens_per_s_ratio"] = round(m["decode_tokens_per_s"] / hf_after["decode_tokens_per_s"], 4)
        name = f"{e['runtime']}:{e['format']}"
        ctx.emit("eval", name=name, metrics=m)
        for key in runtime.HEADLINE:
            if m.get(key) is not None:
                ctx.emit("metric", name=f"{name}.{key}", value=m[key],
                         unit={**HEADLINE, "weights_bytes": "bytes", "tokenizer_agreement": "fraction"}.get(key, ""))
        out.append(m)
    return out


# ---- which model ------------------------------------------------------------------------------
def final_model(ctx) -> dict:
    """What the run produced: a model dir (maybe quantized), maybe with adapters on a base."""
    st = ctx.state
    if st.get("adapter_dir"):
        base = st.get("adapter_base") or {"dir": st["model_dir"], "quant": st.get("quant")}
        return {"dir": base["dir"], "quant": base.get("quant"), "adapter": st["adapter_dir"]}
    return {"dir": st["model_dir"], "quant": st.get("quant"), "adapter": None}


def load_for_eval(ctx, which: dict):
    from engine.runs.stages.train import nf4_config
    q = which.get("quant")
    if q and q.get("on_load"):                      # QLoRA base quantized while loading
        model = common.load_model(ctx, which["dir"], quantization_config=nf4_config(ctx, q["method"],
                                                                                    q.get("double_quant", True)))
    else:
        model = common.load_model(ctx, which["dir"], quant=q)
    if which.get("adapter"):
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, which["adapter"])
        if not q:                                   # a 16-bit base is served with the adapters merged
            model = model.merge_and_unload()
    model.eval()
    return model


def describe(which: dict) -> str:
    q = which.get("quant")
    s = Path(which["dir"]).name if Path(which["dir"]).is_dir() else which["dir"]
    if q:
        s += f" ({q['method']}" + (f" {q['bits']}-bit" if q.get("bits") else "") + ")"
    if which.get("adapter"):
        s += " + LoRA adapter" + ("" if q else " (merged in memory)")
    return s


# ---- measurements ---------------------------------------------------------------------------------
def _dev(model):
    return next(model.parameters()).device


def perplexity(model, tok, examples, seq_len: int, batch_size: int = 8) -> dict:
    import torch
    pairs = common.encode_all(tok, examples, seq_len)
    nll, n = 0.0, 0
    dev = "cuda" if _dev(model).type == "cuda" else "cpu"
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            b = common.collate(pairs[i:i + batch_size], tok.pad_token_id, dev)
            k = int((b["labels"][:, 1:] != -100).sum())
            if k == 0:
                continue
            loss = model(**b).loss.float().item()
            nll += loss * k
            n += k
    return {"perplexity": round(math.exp(nll / n), 4) if n else None, "nll_per_token": round(nll / n, 5) if n else None,
            "scored_tokens": n}


def generate(model, tok, prompt: str, max_new_tokens: int) -> str:
    import torch
    enc = tok(prompt, return_tensors="pt", add_special_tokens=True).to(_dev(model))
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def latency(model, tok, examples, prompt_len: int, new_tokens: int) -> dict:
    """Prefill and greedy decode speed at batch 1 on a prompt of real held-out tokens."""
    import torch
    from transformers import StoppingCriteriaList
    _Stamps = _stamps_class()
    dev = _dev(model)
    ids: list[int] = tok("", add_special_tokens=True)["input_ids"]
    for ex in examples * (1 + prompt_len // 8):
        if len(ids) >= prompt_len:
            break
        ids += tok(ex.prompt + ex.completion, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids[:prompt_len]], device=dev)
    mask = torch.ones_like(x)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        model(input_ids=x, attention_mask=mask)                      # warm-up
        times = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            model(input_ids=x, attention_mask=mask)
            sync()
            times.append(time.perf_counter() - t0)
        prefill = statistics.median(times)
        stamps = _Stamps(sync)                       # a time stamp after each generated token
        sync()
        t0 = time.perf_counter()
        out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id,
                             stopping_criteria=StoppingCriteriaList([stamps]))
        sync()
        gen = time.perf_counter() - t0
    made = out.shape[1] - x.shape[1]
    # decode: from the first generated token (after the prefill) to the last, timed inside this one
    # generate call; subtracting separately timed prefills goes negative on a loaded CPU
    decode_s = stamps.t[-1] - stamps.t[0] if len(stamps.t) > 1 else 0.0
    return {"prompt_tokens": int(x.shape[1]), "new_tokens": int(made), "prefill_ms": round(prefill * 1e3, 3),
            "generate_s": round(gen, 4),
            "decode_tokens_per_s": round((len(stamps.t) - 1) / decode_s, 2) if decode_s > 0 else None}


def _stamps_class():
    from transformers import StoppingCriteria

    class Stamps(StoppingCriteria):
        """Never stops generation; records when each token is done (generate calls it once per step)."""

        def __init__(self, sync):
            self.sync, self.t = sync, []

        def __call__(self, input_ids, scores, **kwargs):
            import torch
            self.sync()
            self.t.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return Stamps


def measure(ctx, which: dict, tok, ds, examples) -> dict:
    es = ctx.spec.evaluate
    out: dict = {"model": describe(which)}
    with common.PeakMemory(ctx.device) as pm:
        t0 = time.perf_counter()
        model = load_for_eval(ctx, which)
        out["load_s"] = round(time.perf_counter() - t0, 3)
        out["compute_dtype"] = str(model.dtype).replace("torch.", "")
        out["weights_bytes"] = common.model_bytes(model)
        secs = {"load": out["load_s"]}              # where this model's evaluation time went
        if es.perplexity:
            with common.timed(secs, "perplexity"):
                out.update(perplexity(model, tok, examples, ctx.spec.train.seq_len))
        if es.task_accuracy and not ctx.should_stop():
            with common.timed(secs, "task"):
                out.update(task_accuracy(tok, ds, examples, ctx.should_stop,
                                         lambda prompt, max_new: generate(model, tok, prompt, max_new)))
        if es.latency and not ctx.should_stop():
            with common.timed(secs, "latency"):
                out.update(latency(model, tok, examples, es.prompt_len, es.new_tokens))
        if es.harness and not ctx.should_stop():
            from engine.runs.stages import harness
            with common.timed(secs, "harness"):
                out["harness"] = harness.run(ctx, model, tok, ds, examples)
        out["seconds"] = secs
    out["peak_mem_bytes"], out["mem_source"] = pm.peak, pm.source
    size = common.weights_bytes_on_disk(which["dir"]) if Path(which["dir"]).is_dir() else None
    if which.get("adapter"):
        out["adapter_bytes"] = common.weights_bytes_on_disk(which["adapter"])
        size = (size or 0) + out["adapter_bytes"]
    out["size_on_disk_bytes"] = size
    out["device"] = ctx.device
    del model
    gc.collect()
    if ctx.device == "cuda":
        import torch
        torch.cuda.empty_cache()
    return out


def evaluate(ctx) -> dict:
    common.quiet_libraries()
    es = ctx.spec.evaluate
    base = common.base_model(ctx)
    ds = common.dataset(ctx)
    tok = common.load_tokenizer(ctx.state["tokenizer_dir"])
    examples = ds.eval[:es.max_examples]
    after = final_model(ctx)
    phases = []
    unchanged = after["dir"] == base and not after["adapter"] and not after["quant"]
    if es.before_and_after and not unchanged:
        phases.append(("before", {"dir": base, "quant": None, "adapter": None}))
    phases.append(("after", after))
    ctx.log(f"evaluate on {len(examples)} held-out rows ({ds.task}): " +
            "; ".join(f"{n}: {describe(w)}" for n, w in phases))
    results: dict = {"task": ds.task, "eval_rows": len(examples)}
    for name, which in phases:
        if ctx.should_stop():
            results["stopped"] = True
            break
        m = measure(ctx, which, tok, ds, examples)
        if unchanged:
            m["note"] = "the run does not change the model: this is also the starting model"
        results[name] = m
        ctx.emit("eval", name=name, metrics=m)
        for key, unit in HEADLINE.items():
            if m.get(key) is not None:
                ctx.emit("metric", name=f"{name}.{key}", value=m[key], unit=unit)
        for task, vals in (m.get("harness") or {}).items():
            for key, val in vals.items():
                if isinstance(val, float) and not key.endswith("_stderr"):
                    ctx.emit("metric", name=f"{name}.harness.{task}.{key}", value=val, unit="lm-eval")
    exports = ctx.state.get("exports") or []
    if es.runtime and exports and not ctx.should_stop():
        results["runtimes"] = measure_runtimes(ctx, exports, tok, ds, examples, results.get("after") or {})
    if "before" in results and "after" in results:
        b, a = results["before"], results["after"]
        cmp = {}
        for key in ("perplexity", "prefill_ms", "peak_mem_bytes", "size_on_disk_bytes", "weights_bytes"):
            if a.get(key) and b.get(key):
                cmp[f"{key}_ratio"] = round(a[key] / b[key], 4)
        for key in ("accuracy", "json_valid_rate", "field_match", "exact_match"):
            if a.get(key) is not None and b.get(key) is not None:
                cmp[f"{key}_delta"] = round(a[key] - b[key], 4)
        for task, av in (a.get("harness") or {}).items():      # lm-eval scores: after - before
            bv = (b.get("harness") or {}).get(task) or {}
            for key, val in av.items():
                if isinstance(val, float) and isinstance(bv.get(key), float) and not key.endswith("_stderr"):
                    cmp[f"harness.{task}.{key}_delta"] = round(val - bv[key], 6)
        results["compare"] = cmp
        for key, val in cmp.items():
            ctx.emit("metric", name=f"compare.{key}", value=val, unit="ratio" if key.endswith("ratio") else "fraction")
    return results
