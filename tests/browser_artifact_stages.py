"""Stage bodies for tests/test_browser_serving.py, loaded by the app's worker processes through the
``TUNEQUANT_STAGES`` hook: a LoRA -> merge -> GGUF pipeline in a second, writing small stand-in files
where the real stages write models (a GGUF file, a vLLM checkpoint folder) and reporting them as the
real export and evaluate stages do (artifact events; evaluate's ``runtimes``)."""
from __future__ import annotations

from pathlib import Path


def _train(ctx):
    ctx.emit("step", step=1, total=1, loss=1.0, lr=1e-4, tokens_per_s=100.0, mem_bytes=2**20, eta_s=0.0)
    return {"steps": 1}


def _export(ctx):
    out = Path(ctx.workdir) / "export-gguf"
    out.mkdir(parents=True, exist_ok=True)
    g = out / "model-q4_k_m.gguf"
    g.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    ctx.emit("artifact", path=str(g), kind="export:gguf-q4_k_m")
    v = Path(ctx.workdir) / "export-vllm"
    v.mkdir(exist_ok=True)
    (v / "config.json").write_text('{"quantization_config": {"quant_method": "gptq"}}')
    (v / "vllm_manifest.json").write_text('{"quantization": "gptq_marlin"}')
    ctx.emit("artifact", path=str(v), kind="export:gptq-4bit")
    ctx.state["exports"] = [{"format": "gguf-q4_k_m", "runtime": "llama.cpp", "path": str(g), "role": "deploy",
                             "size_on_disk_bytes": g.stat().st_size}]
    return {"exports": ctx.state["exports"]}


def _evaluate(ctx):
    ctx.emit("eval", name="after", metrics={"perplexity": 9.5})
    g = ctx.state["exports"][0]
    rt = {**g, "perplexity": 10.25, "decode_tokens_per_s": 42.0, "prefill_ms": 12.0}
    ctx.emit("eval", name="llama.cpp:gguf-q4_k_m", metrics=rt)
    return {"after": {"perplexity": 9.5}, "runtimes": [rt]}


STAGES = {"train": _train, "merge": lambda ctx: {}, "export": _export, "evaluate": _evaluate,
          "quantize": lambda ctx: {}, "convert": lambda ctx: {}}
