"""ExecuTorch: the run's model as an 8da4w ``.pte`` (int8 dynamic per-token activations, int4 grouped
weights, XNNPACK), and its measurement in ExecuTorch's own runtime on the CPU.

    export_8da4w(ctx, settings, src, out)   the export stage's ``executorch`` target
    measure(ctx, export, tok, ds, examples)  the runtime evaluation's ``executorch`` runtime

The weights: a QAT-converted torchao model (``qat-8da4w-executorch``: ``Int8DynamicActivationIntxWeightConfig``,
the very config torchao's QAT simulated) is exported as it is; a 16-bit model is quantized here with the
same config (PTQ, group 32 unless the stage says ``group_size``); other quantized checkpoints are refused.
Every linear but ``lm_head`` is quantized (what torchao's QAT and the transformers loader keep 16-bit).

The program: ``torch.export`` of the model's forward ``input_ids [1, T] -> logits [1, T, V]`` with T
dynamic (1 .. ``max_seq_len``), lowered by ``to_edge_transform_and_lower`` with the XNNPACK partitioner.
**No KV cache**: the static-cache export (transformers' ``TorchExportableModuleWithStaticCache``, what
optimum-executorch uses) fails in executorch 1.5.1's lowering under torch 2.13 (``run_decompositions``:
"expected compiled_fn to be GraphModule"), so each generated token re-runs the whole context. The
perplexity and the prefill time are what a KV-cache program would give; the decode speed is a lower bound
(``decode_mode: full-context recompute``), recorded as such.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from engine.errors import InputError
from engine.runs.stages import common

DEFAULT_GROUP = 32
NO_KV_CACHE = ("full-context recompute: this .pte has no KV cache (executorch 1.5.1's lowering of the static-cache "
               "export fails under torch 2.13), so every token re-runs the whole context; a KV-cache program decodes "
               "faster")


def status() -> str | None:
    """None when executorch (its exporter and runtime) is installed; else what is missing. Imports no
    torch (launch calls it): the installed distribution and the modules' specs only."""
    import importlib.metadata
    import importlib.util
    try:
        version = importlib.metadata.version("executorch")
        missing = [m for m in ("executorch.exir", "executorch.runtime", "executorch.backends")
                   if importlib.util.find_spec(m) is None]
    except Exception as e:                                 # noqa: BLE001 - said to the user as it is
        version, missing = None, [f"{type(e).__name__}: {e}"]
    if version is None or missing:
        return (f"executorch is not installed ({'; '.join(missing) or 'no distribution'}); the ExecuTorch strategy is "
                "not runnable here. It installs beside the pinned stack: pip install -e '.[executorch]' (executorch "
                "1.5.1 keeps torch 2.13 and torchao 0.18; ./dev.sh setup installs it)")
    return None


def quant_config(group_size: int):
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))


class LogitsOnly:
    """input_ids -> logits of every position, no cache (what torch.export takes)."""

    @staticmethod
    def wrap(model):
        import torch

        class _W(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids):
                return self.m(input_ids=input_ids, use_cache=False).logits
        return _W(model)


def _model(ctx, src: str, group: int):
    """(model with 8da4w linears, where its weights come from)."""
    import torch
    from torchao.quantization import quantize_
    from engine.runs.stages.train import not_lm_head
    q = ctx.state.get("quant")
    if q and not (q.get("library") == "torchao" and "int8-dyn-act-int4-weight" in str(q.get("method"))):
        raise InputError(f"the ExecuTorch 8da4w export takes a 16-bit model (quantized here) or a QAT 8da4w model "
                         f"(convert's torchao Int8DynamicActivationIntxWeightConfig); this run's model is "
                         f"{q.get('method')} ({q.get('library')})", field="strategy")
    if q:
        model = common.load_model(ctx, src, quant=q)
        how = f"QAT-converted torchao weights ({q.get('config') or q.get('method')}), exported as they are"
    else:
        model = common.load_model(ctx, src, dtype=torch.float32)
        quantize_(model, quant_config(group), filter_fn=not_lm_head)
        how = (f"16-bit model quantized here: torchao Int8DynamicActivationIntxWeightConfig(int4, group {group}; "
               "int8 per-token activations), every linear but lm_head")
    model.eval()
    return model, how


def export_8da4w(ctx, s: dict, src: str, out: Path) -> dict:
    why = status()
    if why:
        raise InputError(why, field="strategy")
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    if s["format"] != "executorch-8da4w":
        raise InputError(f"the executorch target writes executorch-8da4w; got {s['format']!r}", field="export.format")
    group = int(ctx.stage.get("group_size") or (ctx.state.get("quant") or {}).get("group_size") or DEFAULT_GROUP)
    t0 = time.perf_counter()
    model, how = _model(ctx, src, group)
    cfg = model.config
    es = ctx.spec.evaluate
    max_len = min(int(getattr(cfg, "max_position_embeddings", 2048) or 2048),
                  max(ctx.spec.train.seq_len, es.prompt_len + es.new_tokens, 64) + 8)
    seq = torch.export.Dim("seq", min=1, max=max_len)
    example = torch.zeros((1, min(8, max_len)), dtype=torch.long)
    with torch.no_grad():
        ep = torch.export.export(LogitsOnly.wrap(model), (example,), dynamic_shapes=({1: seq},), strict=False)
    t_export = time.perf_counter() - t0
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    delegated = sum(1 for n in edge.exported_program().graph.nodes
                    if n.op == "call_function" and "call_delegate" in str(n.target))
    prog = edge.to_executorch()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{Path(src).name}-8da4w.pte"
    path.write_bytes(prog.buffer)
    secs = round(time.perf_counter() - t0, 3)
    ctx.log(f"ExecuTorch 8da4w: {how}; torch.export {t_export:.1f}s, XNNPACK lowering ({delegated} delegated "
            f"subgraph(s)), {path.stat().st_size / 2**20:.2f} MiB .pte in {secs}s; inputs [1, 1..{max_len}] tokens, "
            "no KV cache")
    ctx.warn(f"the .pte has no KV cache: {NO_KV_CACHE}")
    return {"exports": [{"format": "executorch-8da4w", "runtime": "executorch", "path": str(path), "role": "deploy",
                         "size_on_disk_bytes": path.stat().st_size, "max_seq_len": max_len, "kv_cache": False,
                         "group_size": group, "delegated_subgraphs": delegated}],
            "weights": how, "seconds": secs, "export_s": round(t_export, 3), "delegated_subgraphs": delegated}


def measure(ctx, export: dict, tok, ds, examples) -> dict:
    """Load the .pte in ExecuTorch's runtime (CPU) and measure it on the held-out rows: perplexity of the
    answer tokens (as the HF evaluation scores them), prefill time, decode speed (greedy), size, peak RSS."""
    why = status()
    if why:
        return {"skipped": why}
    import numpy as np
    import torch
    from executorch.runtime import Runtime
    from engine.runs.stages.scoring import task_accuracy
    es = ctx.spec.evaluate
    max_len = int(export.get("max_seq_len") or ctx.spec.train.seq_len)
    out: dict = {"runtime": "executorch", "format": export["format"], "path": export["path"], "device": "cpu",
                 "threads": common.cpu_threads(), "kv_cache": bool(export.get("kv_cache")), "max_seq_len": max_len}
    with common.PeakMemory("cpu") as pm:
        t0 = time.perf_counter()
        method = Runtime.get().load_program(export["path"]).load_method("forward")
        out["load_s"] = round(time.perf_counter() - t0, 3)

        def logits(ids: list[int]):
            return method.execute([torch.tensor([ids[-max_len:]], dtype=torch.long)])[0][0]

        if es.perplexity:
            nll, n = 0.0, 0
            for ids, labels in common.encode_all(tok, examples, min(ctx.spec.train.seq_len, max_len)):
                if ctx.should_stop():
                    break
                if len(ids) < 2:
                    continue
                lp = torch.log_softmax(logits(ids).double(), dim=-1)
                for t in range(len(ids) - 1):
                    if labels[t + 1] != -100:
                        nll -= float(lp[t, labels[t + 1]])
                        n += 1
            out.update({"perplexity": round(math.exp(nll / n), 4) if n else None,
                        "nll_per_token": round(nll / n, 5) if n else None, "scored_tokens": n})
        eos = tok.eos_token_id

        def greedy(ids: list[int], max_new: int, stop_at_eos: bool = True, stamps: list | None = None) -> list[int]:
            ctx_ids, made = list(ids), []
            for _ in range(max_new):
                t = int(np.argmax(logits(ctx_ids)[-1].numpy()))
                if stamps is not None:
                    stamps.append(time.perf_counter())
                if stop_at_eos and t == eos:
                    break
                made.append(t)
                ctx_ids.append(t)
            return made

        if es.task_accuracy and not ctx.should_stop():
            def gen(prompt: str, max_new: int) -> str:
                ids = tok(prompt, add_special_tokens=True)["input_ids"]
                return tok.decode(greedy(ids, min(max_new, max(1, max_len - len(ids)))), skip_special_tokens=True)
            out.update(task_accuracy(tok, ds, examples, ctx.should_stop, gen))
        if es.latency and not ctx.should_stop():
            ids = common.prompt_ids(tok, examples, min(es.prompt_len, max_len - es.new_tokens))
            out.update(common.runtime_latency(logits, greedy, ids, es.new_tokens), decode_mode=NO_KV_CACHE)
    out["peak_mem_bytes"], out["mem_source"] = pm.peak, pm.source
    out["size_on_disk_bytes"] = Path(export["path"]).stat().st_size
    return out
