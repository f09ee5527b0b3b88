"""ExecuTorch: the run's model as an 8da4w ``.pte`` (int8 dynamic per-token activations, int4 grouped
weights, XNNPACK), and its measurement in ExecuTorch's own runtime on the CPU.

    export_8da4w(ctx, settings, src, out)   the export stage's ``executorch`` target
    measure(ctx, export, tok, ds, examples)  the runtime evaluation's ``executorch`` runtime

The weights: a QAT-converted torchao model (``qat-8da4w-executorch``: ``Int8DynamicActivationIntxWeightConfig``,
the very config torchao's QAT simulated) is exported as it is; a 16-bit model is quantized here with the
same config (PTQ, group 32 unless the stage says ``group_size``); other quantized checkpoints are refused.
Every linear but ``lm_head`` is quantized (what torchao's QAT and the transformers loader keep 16-bit).

The program (``kv_cache: true``, the default): the model in transformers' static-cache export module
(``TorchExportableModuleWithStaticCache``, what optimum-executorch exports): ``(input_ids [1, T], cache_position
[T]) -> logits [1, T, V]`` with T dynamic (1 .. ``max_seq_len``), the keys and values of every layer held in the
program as mutable buffers of ``max_seq_len`` positions (zero-initialised in the file,
``InitializedMutableBufferPass``), lowered by ``to_edge_transform_and_lower`` with the XNNPACK partitioner. A
prompt is one execution (positions 0..T-1); each generated token is one more execution at its position, reading
the cache: decode as a phone runs it.

Why the first static-cache attempt did not lower (executorch 1.5.1, torch 2.13, transformers 5.23): with
``strict=False`` torch.export swaps the module's registered buffers for traced ones, but the StaticCache object
still holds the original key/value/length tensors; reached through it, they are lifted as constants that alias
the registered buffers (``lifted_tensor_0`` shares ``cumulative_length_0``'s storage, and so on), and
``run_decompositions`` (the first step of ``to_edge_transform_and_lower``) then meets mutated, duplicated inputs:
AOT autograd's ``AOTDedupeWrapper`` returns a function where export needs a graph module ("expected compiled_fn
to be GraphModule, got <class 'function'>"). ``KVCacheModule.forward`` points the cache's layers at the registered
buffers first (a no-op in eager), so the traced buffers are the ones mutated; ``strict=True`` (dynamo) also
lowers, more slowly.

``kv_cache: false`` (or a static-cache export that fails: a warning names the error) writes the program
without a cache, ``input_ids [1, T] -> logits``: perplexity and prefill are the same, decode re-runs the whole
context per token, a lower bound recorded as such (``decode_mode``).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from engine.errors import InputError
from engine.runs.stages import common

DEFAULT_GROUP = 32
NO_KV_CACHE = ("full-context recompute: this .pte has no KV cache, so every token re-runs the whole context; a KV-cache "
               "program decodes faster (a lower bound)")
KV_CACHE = "static KV cache: the prompt in one execution, then one execution per token at its cache position"


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


class KVCacheModule:
    """transformers' ``TorchExportableModuleWithStaticCache`` whose forward first points each cache layer at
    the module's registered buffers (the tensors torch.export traces and the program mutates)."""

    @staticmethod
    def wrap(model, max_len: int):
        from transformers import GenerationConfig
        from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

        class _K(TorchExportableModuleWithStaticCache):
            def forward(self, input_ids, cache_position):
                for i, layer in enumerate(self.static_cache.layers):
                    layer.keys = getattr(self, f"key_cache_{i}")
                    layer.values = getattr(self, f"value_cache_{i}")
                    layer.cumulative_length = getattr(self, f"cumulative_length_{i}")
                return super().forward(input_ids=input_ids, cache_position=cache_position)

        model.config.use_cache = True
        model.generation_config = GenerationConfig(use_cache=True, cache_implementation="static")
        return _K(model, batch_size=1, max_cache_len=max_len)


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


def _lower(ep, init_buffers: tuple[str, ...] = ()):
    """(program bytes, delegated subgraphs): XNNPACK lowering of an exported program."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    delegated = sum(1 for n in edge.exported_program().graph.nodes
                    if n.op == "call_function" and "call_delegate" in str(n.target))
    passes = [InitializedMutableBufferPass(list(init_buffers))] if init_buffers else []
    import warnings
    with warnings.catch_warnings():      # "Mutation on a buffer ... meaningless initial state": the cache is initialised
        warnings.filterwarnings("ignore", message="Mutation on a buffer")
        prog = edge.to_executorch(ExecutorchBackendConfig(passes=passes))
    return prog.buffer, delegated


def _export_with_cache(model, max_len: int):
    import torch
    seq = torch.export.Dim("seq", min=1, max=max_len)
    ids = torch.zeros((1, min(8, max_len)), dtype=torch.long)
    with torch.no_grad():
        ep = torch.export.export(KVCacheModule.wrap(model, max_len), (),
                                 {"input_ids": ids, "cache_position": torch.arange(ids.shape[1])},
                                 dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}}, strict=False)
    return ep


def _export_without_cache(model, max_len: int):
    import torch
    seq = torch.export.Dim("seq", min=1, max=max_len)
    example = torch.zeros((1, min(8, max_len)), dtype=torch.long)
    with torch.no_grad():
        return torch.export.export(LogitsOnly.wrap(model), (example,), dynamic_shapes=({1: seq},), strict=False)


def cache_bytes(cfg, max_len: int, dtype_bytes: int) -> int:
    """Keys and values of every layer for ``max_len`` positions at batch 1 (what the program holds)."""
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * max_len * head_dim * dtype_bytes


def export_8da4w(ctx, s: dict, src: str, out: Path) -> dict:
    why = status()
    if why:
        raise InputError(why, field="strategy")
    import torch
    if s["format"] != "executorch-8da4w":
        raise InputError(f"the executorch target writes executorch-8da4w; got {s['format']!r}", field="export.format")
    group = int(ctx.stage.get("group_size") or (ctx.state.get("quant") or {}).get("group_size") or DEFAULT_GROUP)
    want_cache = ctx.stage.get("kv_cache", True) is not False
    t0 = time.perf_counter()
    model, how = _model(ctx, src, group)
    cfg = model.config
    es = ctx.spec.evaluate
    max_len = min(int(getattr(cfg, "max_position_embeddings", 2048) or 2048),
                  max(ctx.spec.train.seq_len, es.prompt_len + es.new_tokens, 64) + 8)
    kv, cache_error = want_cache, None
    if want_cache:
        try:
            ep = _export_with_cache(model, max_len)
            t_export = time.perf_counter() - t0
            buf, delegated = _lower(ep, init_buffers=("key_cache", "value_cache"))
        except Exception as e:                             # noqa: BLE001 - said in the run, then the cacheless program
            kv, cache_error = False, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            ctx.warn(f"the static-cache export did not lower ({cache_error}); writing the program without a KV cache")
            model, how = _model(ctx, src, group)           # the wrapper changed the model's cache settings
    if not kv:
        t1 = time.perf_counter()
        ep = _export_without_cache(model, max_len)
        t_export = time.perf_counter() - t1
        buf, delegated = _lower(ep)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{Path(src).name}-8da4w.pte"
    path.write_bytes(buf)
    secs = round(time.perf_counter() - t0, 3)
    entry = {"format": "executorch-8da4w", "runtime": "executorch", "path": str(path), "role": "deploy",
             "size_on_disk_bytes": path.stat().st_size, "max_seq_len": max_len, "kv_cache": kv,
             "group_size": group, "delegated_subgraphs": delegated}
    if kv:
        dtype_bytes = torch.finfo(model.dtype).bits // 8
        entry["kv_cache_bytes"] = cache_bytes(cfg, max_len, dtype_bytes)
        entry["kv_cache_dtype"] = str(model.dtype).replace("torch.", "")
    ctx.log(f"ExecuTorch 8da4w: {how}; torch.export {t_export:.1f}s, XNNPACK lowering ({delegated} delegated "
            f"subgraph(s)), {path.stat().st_size / 2**20:.2f} MiB .pte in {secs}s; inputs [1, 1..{max_len}] tokens, " +
            (f"static KV cache of {max_len} positions ({entry['kv_cache_bytes'] / 2**20:.2f} MiB, {entry['kv_cache_dtype']}, "
             "zero-initialised in the file)" if kv else "no KV cache"))
    if not kv:
        ctx.warn(f"the .pte has no KV cache: {NO_KV_CACHE}")
    res = {"exports": [entry], "weights": how, "seconds": secs, "export_s": round(t_export, 3),
           "delegated_subgraphs": delegated, "kv_cache": kv}
    if cache_error:
        res["kv_cache_error"] = cache_error
    return res


def measure(ctx, export: dict, tok, ds, examples) -> dict:
    """Load the .pte in ExecuTorch's runtime (CPU) and measure it on the held-out rows: perplexity of the
    answer tokens (as the HF evaluation scores them), prefill time, decode speed (greedy: one execution per
    token at its cache position when the program holds a KV cache), size, peak RSS. With a cache, one held-out
    row is also decoded token by token and its logits compared with the same program's one-shot logits
    (``kv_cache_check``: the cache carries what a full recompute sees)."""
    why = status()
    if why:
        return {"skipped": why}
    import numpy as np
    import torch
    from executorch.runtime import Runtime
    from engine.runs.stages.scoring import task_accuracy
    es = ctx.spec.evaluate
    max_len = int(export.get("max_seq_len") or ctx.spec.train.seq_len)
    kv = bool(export.get("kv_cache"))
    out: dict = {"runtime": "executorch", "format": export["format"], "path": export["path"], "device": "cpu",
                 "threads": common.cpu_threads(), "kv_cache": kv, "max_seq_len": max_len}
    with common.PeakMemory("cpu") as pm:
        t0 = time.perf_counter()
        method = Runtime.get().load_program(export["path"]).load_method("forward")
        out["load_s"] = round(time.perf_counter() - t0, 3)
        run = Program(method, kv, max_len)

        if es.perplexity:
            nll, n = 0.0, 0
            for ids, labels in common.encode_all(tok, examples, min(ctx.spec.train.seq_len, max_len)):
                if ctx.should_stop():
                    break
                if len(ids) < 2:
                    continue
                lp = torch.log_softmax(run.prefill(ids).double(), dim=-1)
                for t in range(len(ids) - 1):
                    if labels[t + 1] != -100:
                        nll -= float(lp[t, labels[t + 1]])
                        n += 1
            out.update({"perplexity": round(math.exp(nll / n), 4) if n else None,
                        "nll_per_token": round(nll / n, 5) if n else None, "scored_tokens": n})
        eos = tok.eos_token_id

        def greedy(ids: list[int], max_new: int, stop_at_eos: bool = True, stamps: list | None = None) -> list[int]:
            made = []
            last = run.prefill(ids)[-1]
            for _ in range(max_new):
                t = int(np.argmax(last.numpy()))
                if stamps is not None:
                    stamps.append(time.perf_counter())
                if stop_at_eos and t == eos:
                    break
                made.append(t)
                if len(made) == max_new or run.full():
                    break
                last = run.step(t)
            return made

        if es.task_accuracy and not ctx.should_stop():
            def gen(prompt: str, max_new: int) -> str:
                ids = tok(prompt, add_special_tokens=True)["input_ids"][-max_len:]
                return tok.decode(greedy(ids, min(max_new, max(1, max_len - len(ids)))), skip_special_tokens=True)
            out.update(task_accuracy(tok, ds, examples, ctx.should_stop, gen))
        if es.latency and not ctx.should_stop():
            ids = common.prompt_ids(tok, examples, min(es.prompt_len, max_len - es.new_tokens))
            out.update(common.runtime_latency(run.prefill, greedy, ids, es.new_tokens),
                       decode_mode=KV_CACHE if kv else NO_KV_CACHE)
        if kv and examples and not ctx.should_stop():
            ids = next(iter(common.encode_all(tok, examples[:1], min(ctx.spec.train.seq_len, max_len))))[0]
            out["kv_cache_check"] = run.check(ids)
    out["peak_mem_bytes"], out["mem_source"] = pm.peak, pm.source
    out["size_on_disk_bytes"] = Path(export["path"]).stat().st_size
    return out


class Program:
    """A loaded .pte's forward as a decoder: ``prefill(ids)`` (positions 0..T-1, every position's logits) and,
    with a KV cache, ``step(token)`` (one execution at the next position); without one, ``step`` re-runs the
    whole context."""

    def __init__(self, method, kv: bool, max_len: int):
        self.method, self.kv, self.max_len = method, kv, max_len
        self.ids: list[int] = []

    def _run(self, ids: list[int], start: int):
        import torch
        args = [torch.tensor([ids], dtype=torch.long)]
        if self.kv:
            args.append(torch.arange(start, start + len(ids), dtype=torch.long))
        return self.method.execute(args)[0][0]

    def prefill(self, ids: list[int]):
        self.ids = list(ids[-self.max_len:])
        return self._run(self.ids, 0)

    def full(self) -> bool:
        return len(self.ids) >= self.max_len

    def step(self, token: int):
        """Logits after ``token`` (the last position's)."""
        self.ids.append(token)
        if self.kv:
            return self._run([token], len(self.ids) - 1)[-1]
        return self._run(self.ids[-self.max_len:], 0)[-1]

    def check(self, ids: list[int], prompt: int = 4) -> dict:
        """Logits of ``ids`` decoded token by token through the cache (after a ``prompt``-token prefill) against the
        same program's logits of the whole sequence in one execution."""
        import torch
        ids = ids[:self.max_len]
        whole = self.prefill(ids)
        got = [self.prefill(ids[:prompt])]
        for t in ids[prompt:]:
            got.append(self.step(t)[None])
        got = torch.cat(got)
        diff = float((got - whole).abs().max())
        return {"tokens": len(ids), "prefill_tokens": min(prompt, len(ids)), "max_abs_logit_diff": round(diff, 6),
                "max_abs_logit": round(float(whole.abs().max()), 4),
                "argmax_agreement": round(float((got.argmax(-1) == whole.argmax(-1)).float().mean()), 4)}
