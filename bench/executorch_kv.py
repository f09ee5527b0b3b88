"""A 16-bit model -> 8da4w ``.pte`` with and without its static KV cache, each measured in ExecuTorch's
runtime on the CPU (the export and evaluate stages exactly as in a run), plus the cache program's logits
decoded token by token against the eager torchao 8da4w model's on one held-out row.

    python bench/executorch_kv.py --model demo:smollm2-135m --dataset tickets --rows 8

Prints one row per program (perplexity, prefill, decode tokens/s, size, cache bytes) and writes
bench/measurements/executorch-kv-<model>.json (--out to change). Timings depend on what else runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import held_out  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo:smollm2-135m")
    held_out.add_args(ap, dataset="tickets", rows=8, seq_len=128)
    ap.add_argument("--no-accuracy", action="store_true", help="skip the greedy task accuracy")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import tempfile

    import torch
    from torchao.quantization import quantize_
    from transformers import AutoModelForCausalLM

    from engine import strategies
    from engine.runs import data
    from engine.runs.context import StageContext
    from engine.runs.stages import STAGES, common, executorch_pte
    from engine.runs.stages.runtime import measure
    from engine.runs.stages.train import not_lm_head
    spec = held_out.spec(a, task_accuracy=not a.no_accuracy)
    from engine.runs import demo
    src = str(demo.ensure_model(a.model.split(":", 1)[1])) if a.model.startswith("demo:") else a.model
    work = Path(tempfile.mkdtemp(prefix="et-kv-bench-"))
    t0 = time.perf_counter()
    tok = common.load_tokenizer(src)
    ds = data.load(spec.dataset)
    examples = ds.eval[:a.rows]
    rows = []
    for kv in (True, False):
        state = {"base_dir": src, "model_dir": src, "quant": None}
        ctx = StageContext(run_id="bench", spec=spec, strategy=strategies.get("bf16-baseline"),
                           stage={"stage": "export", "target": "executorch", "format": "executorch-8da4w", "kv_cache": kv},
                           index=0, workdir=work / ("kv" if kv else "nokv"), state=state, device="cpu",
                           emit=lambda type, **p: type in ("log", "warning") and print(f"  [{type}] {p['message']}"))
        t = time.perf_counter()
        res = STAGES["export"](ctx)
        (e,) = res["exports"]
        export_s = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        m = measure(ctx, e, tok, ds, examples)
        rows.append({**{k: v for k, v in m.items() if k not in ("path", "samples")}, "export_wall_s": export_s,
                     "measure_wall_s": round(time.perf_counter() - t, 1), "kv_cache_bytes": e.get("kv_cache_bytes"),
                     "delegated_subgraphs": e["delegated_subgraphs"], "pte": e["path"]})
    # the cache program decoded token by token against the eager 8da4w model on one held-out row
    from executorch.runtime import Runtime
    ids = next(iter(common.encode_all(tok, examples[:1], a.seq_len)))[0]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    quantize_(model, executorch_pte.quant_config(executorch_pte.DEFAULT_GROUP), filter_fn=not_lm_head)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    run = executorch_pte.Program(Runtime.get().load_program(rows[0]["pte"]).load_method("forward"), True,
                                 rows[0]["max_seq_len"])
    got = [run.prefill(ids[:4])] + [run.step(t)[None] for t in ids[4:]]
    got = torch.cat(got)
    vs_eager = {"tokens": len(ids), "prefill_tokens": 4, "max_abs_logit_diff": round(float((got - want).abs().max()), 5),
                "max_abs_logit": round(float(want.abs().max()), 3),
                "argmax_agreement": round(float((got.argmax(-1) == want.argmax(-1)).float().mean()), 4)}
    print(f"\nmodel {a.model}, {len(examples)} held-out rows of {a.dataset}; load average {os.getloadavg()}")
    print(f"{'program':<12}{'ppl':>10}{'acc':>6}{'prefill ms':>12}{'decode t/s':>12}{'MiB':>8}{'cache MiB':>10}{'export s':>10}")
    for r in rows:
        print(f"{'KV cache' if r['kv_cache'] else 'no cache':<12}{r.get('perplexity') or 0:>10.4f}{r.get('accuracy') or 0:>6.2f}"
              f"{r.get('prefill_ms') or 0:>12.1f}{r.get('decode_tokens_per_s') or 0:>12.2f}"
              f"{r['size_on_disk_bytes'] / 2**20:>8.2f}{(r['kv_cache_bytes'] or 0) / 2**20:>10.2f}{r['export_wall_s']:>10.1f}")
    print(f"token by token through the cache vs eager 8da4w: {vs_eager}")
    print(f"in-runtime kv_cache_check: {rows[0].get('kv_cache_check')}")
    import importlib.metadata as md
    held_out.write(a, "executorch-kv", len(examples),
                   {"programs": [{k: v for k, v in r.items() if k != "pte"} for r in rows],
                   "cache_vs_eager": vs_eager, "load_average_end": os.getloadavg()},
                   {p: md.version(p) for p in ("executorch", "torch", "torchao", "transformers")}, t0, ROOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
