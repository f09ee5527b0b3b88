"""A 16-bit model -> the project's GGUF writer -> llama.cpp's quantizer, each file measured in
llama.cpp (llama-cpp-python, CPU) beside the HF model on the same held-out token ids.

    python bench/gguf_export.py --model demo:tiny-llama --dataset python-docs --types f16,q8_0,q6_k,q5_k_m,q4_k_m
    python bench/gguf_export.py --model /path/to/hf-dir --rows 32 --seq-len 256

Prints one row per file (perplexity and its ratio to HF, size, tensor types, prefill, decode, tokenizer
agreement) and writes them to bench/measurements/gguf-export-<model>.json (--out to change). The
export and evaluate stages run in this process exactly as in a run (engine/runs/stages/export.py,
runtime.py); timings depend on what else runs on the machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import held_out  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo:tiny-llama")
    ap.add_argument("--types", default="f16,q8_0,q6_k,q5_k_m,q4_k_m")
    held_out.add_args(ap, dataset="python-docs", rows=32, seq_len=256)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import tempfile

    from engine import strategies
    from engine.runs.context import StageContext
    from engine.runs.stages import STAGES
    spec = held_out.spec(a)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="gguf-bench-"))
    state: dict = {}
    log = []

    def ctx(stage):
        return StageContext(run_id="bench", spec=spec, strategy=strategies.get("bf16-baseline"), stage=stage, index=0,
                            workdir=work, state=state, device="cpu",
                            emit=lambda type, **p: log.append((type, p)) or (type in ("log", "warning") and
                                                                            print(f"  [{type}] {p['message']}")))

    t0 = time.perf_counter()
    exports = {}
    for t in a.types.split(","):
        res = STAGES["export"](ctx({"stage": "export", "target": "gguf", "format": f"gguf-{t.strip()}"}))
        for e in res["exports"]:
            exports[e["path"]] = {**e, "role": "deploy"}
            if "quantizer" in res and e["role"] == "deploy":
                exports[e["path"]]["fallback_tensors"] = res["quantizer"].get("fallback_tensors", {})
    state["exports"] = list(exports.values())
    ev = STAGES["evaluate"](ctx({"stage": "evaluate"}))
    hf = ev["after"]
    rows = []
    print(f"\nmodel {a.model}, {ev['eval_rows']} held-out rows of {a.dataset} ({ev['task']}), "
          f"{hf['scored_tokens']} scored tokens, seq_len {a.seq_len}")
    print(f"{'file':<16}{'ppl':>10}{'vs HF':>8}{'MiB':>9}{'prefill ms':>12}{'decode t/s':>12}{'tok agree':>10}  tensor types")
    print(f"{'HF ' + hf.get('compute_dtype', ''):<16}{hf['perplexity']:>10.4f}{1.0:>8.4f}{hf['size_on_disk_bytes'] / 2**20:>9.2f}"
          f"{hf.get('prefill_ms', 0):>12.2f}{hf.get('decode_tokens_per_s') or 0:>12.1f}{'':>10}")
    for m in ev.get("runtimes", []):
        if m.get("skipped"):
            print(f"{m['format']:<16} skipped: {m['skipped']}")
            continue
        e = exports[m["path"]]
        print(f"{m['format']:<16}{m['perplexity']:>10.4f}{m['vs_hf'].get('perplexity_ratio', 0):>8.4f}"
              f"{m['size_on_disk_bytes'] / 2**20:>9.2f}{m.get('prefill_ms', 0):>12.2f}{m.get('decode_tokens_per_s') or 0:>12.1f}"
              f"{m['tokenizer_agreement']:>10.3f}  {e.get('tensor_types')}")
        rows.append({**{k: v for k, v in m.items() if k != "path"}, "tensor_types": e.get("tensor_types"),
                     "fallback_tensors": e.get("fallback_tensors")})
    import llama_cpp
    held_out.write(a, "gguf-export", ev["eval_rows"],
                   {"hf": {k: v for k, v in hf.items() if k != "samples"}, "gguf": rows},
                   {"llama_cpp_python": llama_cpp.__version__}, t0, ROOT)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
