"""Every strategy family through the real executor on random-init models of real architectures,
collecting measured peak memory and tokens/s per stage next to the planner's estimate.

    python bench/gpu_runs.py                                   # CUDA: all families, stops starting runs after --budget-s
    python bench/gpu_runs.py --families lora,lora-ref,qlora    # a chunk (each device call < 600 s)
    python bench/gpu_runs.py --device cpu --micro              # smoke: micro configs, 2 steps, seconds per run

For each model preset used (llama-3.2-1b, qwen2.5-0.5b) a random-init bf16 model is built
from the preset's config (no download) and saved with a small byte-level BPE tokenizer
(engine/runs/demo.py, trained on stdlib docstrings) into a temp dir; then RunSpecs like
presets/runs/gpu-*.yaml, pointing at that dir, go through ``engine.runs.api.launch`` (one
worker process per run, the run store in a temp TUNEQUANT_HOME) and ``wait``. The dataset is
the demo ``python-docs`` text (windows of seq_len tokens, so training batches are full length).
Per run and stage: status, duration, peak memory (CUDA max_memory_allocated, or CPU peak RSS)
and its source, tokens/s and loss mode of the train stage, perplexity / prefill / decode of
the evaluated model, size on disk, and the planner's estimate recorded with the run (train
peak and tokens/s). Written to bench/measurements/gpu-runs-<gpu>.json after every run (merged
with what an earlier chunk wrote there) and printed as a table.

A family whose library is missing (bitsandbytes, torchao, gptqmodel) is recorded as skipped.
Random weights: perplexities say nothing about quality; memory and speed are the point.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# id: (model preset, strategy, RunSpec overrides, libraries it needs)
FAMILIES = {
    "lora": ("llama-3.2-1b", "lora", {}, ()),
    "lora-ref": ("llama-3.2-1b", "lora", {"train": {"loss": "reference"}}, ()),
    "qlora": ("llama-3.2-1b", "qlora", {}, ("bitsandbytes",)),
    "qlora-ref": ("llama-3.2-1b", "qlora", {"train": {"loss": "reference"}}, ("bitsandbytes",)),
    "full": ("qwen2.5-0.5b", "full-finetune", {"train": {"learning_rate": 2e-5}}, ()),
    "qat-int8": ("qwen2.5-0.5b", "qat-int8", {"train": {"learning_rate": 2e-5}}, ("torchao",)),
    "qat-int4": ("qwen2.5-0.5b", "qat-int4-weight", {"train": {"learning_rate": 2e-5}}, ("torchao",)),
    "lora-merge-gptq": ("qwen2.5-0.5b", "lora-merge-gptq-4bit", {"quantize": {"calibration_samples": 32}},
                        ("gptqmodel",)),
    "ptq-nf4": ("llama-3.2-1b", "ptq-nf4", {}, ("bitsandbytes",)),
    "ptq-int8": ("llama-3.2-1b", "ptq-int8", {}, ("bitsandbytes",)),
    "ptq-torchao-int4": ("llama-3.2-1b", "ptq-torchao-int4", {}, ("torchao",)),
}
CPU_FAMILIES = ("lora", "lora-ref", "qlora", "full", "qat-int8", "ptq-nf4")


def have(lib: str) -> bool:
    return importlib.util.find_spec(lib) is not None


# ---- models --------------------------------------------------------------------------------

def hf_config(preset: str, micro: bool, vocab: int):
    import transformers
    from engine import models
    cfg = dict(models.presets()[preset]["config"])
    if micro:   # 2 layers of width 64, the preset's GQA ratio, the tokenizer's vocabulary
        heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        ratio = max(1, heads // kv)
        cfg.update(num_hidden_layers=2, hidden_size=64, head_dim=16, num_key_value_heads=2,
                   num_attention_heads=2 * ratio, intermediate_size=128, vocab_size=vocab)
    mt = cfg.pop("model_type")
    cfg.pop("architectures", None)
    cfg.update(use_cache=True)
    return transformers.AutoConfig.for_model(mt, **cfg)


def tokenizer(vocab: int):
    from engine.runs import demo
    tok = demo.build_tokenizer(demo.corpus(400_000), vocab)
    return tok


def build_model_dir(preset: str, micro: bool, tok, root: Path, dev: str) -> str:
    """A random-init bf16 checkpoint of the preset's architecture, with the tokenizer beside it."""
    import torch
    import transformers
    cfg = hf_config(preset, micro, len(tok))
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    with torch.device("cuda" if dev == "cuda" else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    out = root / f"{preset}{'-micro' if micro else ''}"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    return str(out)


# ---- runs ----------------------------------------------------------------------------------

def run_spec(family: str, model_dir: str, args, dev: str) -> dict:
    preset, strategy, over, _ = FAMILIES[family]
    spec = {
        "name": f"bench {family} {preset}{' micro' if args.micro else ''}",
        "model": model_dir, "strategy": strategy, "device": dev,
        "dataset": {"demo": "python-docs", "max_examples": args.max_examples},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                  "learning_rate": 2e-4, "lora_rank": 16, "grad_ckpt": True, "precision": "bf16"},
        "quantize": {},
        "evaluate": {"max_examples": args.eval_examples, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "task_accuracy": False, "before_and_after": False},
    }
    for k, v in over.items():
        spec[k] = {**spec[k], **v}
    return spec


def summarize_run(run: dict) -> dict:
    """The figures of a finished (or failed) run: per stage, and the estimate made for it."""
    res = run.get("result") or {}
    est = run.get("estimate") or {}
    out = {"run_id": run["id"], "status": run["status"], "error": run.get("error"), "stages": []}
    for st in res.get("stages", []):
        r = st.get("result") or {}
        row = {"stage": st["stage"], "duration_s": st.get("duration_s"), "peak_mem_bytes": st.get("peak_mem_bytes"),
               "mem_source": st.get("mem_source"), "cpu_peak_rss_bytes": st.get("cpu_peak_rss_bytes")}
        if st["stage"] == "train":
            row.update({k: r.get(k) for k in ("method", "steps", "tokens", "tokens_per_s", "loss_mode", "loss_first",
                                              "loss_last", "trainable_params")})
        if st["stage"] == "evaluate":
            a = r.get("after") or {}
            row.update({k: a.get(k) for k in ("perplexity", "prefill_ms", "decode_tokens_per_s", "size_on_disk_bytes",
                                              "peak_mem_bytes")})
            row["eval_peak_mem_bytes"] = row.pop("peak_mem_bytes")
            row["peak_mem_bytes"] = st.get("peak_mem_bytes")
        if st["stage"] == "quantize":
            row.update({k: r.get(k) for k in ("size_on_disk_bytes", "source_size_on_disk_bytes")})
        out["stages"].append(row)
    tr = est.get("train") or {}
    if tr and "error" not in tr:
        out["estimate_train"] = {"peak_allocated_bytes": tr.get("peak_allocated_bytes"), "low": tr.get("low"),
                                 "high": tr.get("high"), "tokens_per_s": tr.get("tokens_per_s"),
                                 "gpu": tr.get("gpu"), "loss": (tr.get("inputs") or {}).get("loss", "reference")}
    elif tr:
        out["estimate_train"] = {"error": tr["error"]}
    return out


def _gpu_id(dev: str) -> str:
    if dev != "cuda":
        return "cpu"
    import torch
    name = torch.cuda.get_device_name(0)
    spec = importlib.util.spec_from_file_location("evm", ROOT / "bench" / "estimates_vs_measured.py")
    evm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evm)
    for key, gid in evm.GPU_NAMES.items():
        if key in name:
            return gid
    return name.replace(" ", "-").lower()


def _size(x):
    if not x:
        return "-"
    return f"{x / 2 ** 30:6.2f} GiB" if x >= 2 ** 28 else f"{x / 2 ** 20:6.1f} MiB"


def _num(x) -> str:
    return f"{x:,.0f}" if isinstance(x, (int, float)) else "-"


def print_table(rows: list[dict]) -> None:
    print(f"\n{'family':17s} {'status':9s} {'stage':9s} {'time s':>7s} {'peak':>10s} {'tok/s':>9s} {'est. peak':>10s} "
          f"{'est. tok/s':>10s}  notes")
    for r in rows:
        if r.get("skipped"):
            print(f"{r['family']:17s} skipped   {r['skipped']}")
            continue
        est = r.get("estimate_train") or {}
        for i, st in enumerate(r.get("stages") or [{}]):
            tr = st.get("stage") == "train"
            note = ""
            if tr:
                note = f"loss {st.get('loss_mode')}, {st.get('loss_first')} -> {st.get('loss_last')}"
            elif st.get("stage") == "evaluate":
                note = f"decode {st.get('decode_tokens_per_s')} tok/s, prefill {st.get('prefill_ms')} ms"
            print(f"{r['family'] if i == 0 else '':17s} {r['status'] if i == 0 else '':9s} {st.get('stage', '-'):9s} "
                  f"{st.get('duration_s') or 0:7.1f} {_size(st.get('peak_mem_bytes')):>10s} "
                  f"{_num(st.get('tokens_per_s')) if tr else '':>9s} "
                  f"{_size(est.get('peak_allocated_bytes')) if tr else '':>10s} "
                  f"{_num(est.get('tokens_per_s')) if tr else '':>10s}  {note}")
        if r.get("error"):
            print(f"{'':17s} error: {str(r['error'])[:150]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None)
    ap.add_argument("--micro", action="store_true", help="2-layer width-64 configs (CPU smoke)")
    ap.add_argument("--families", default=None, help=f"comma list of {', '.join(FAMILIES)} (default: all; CPU: "
                                                      f"{', '.join(CPU_FAMILIES)})")
    ap.add_argument("--steps", type=int, default=None, help="train steps (default 30; micro 2)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=None, help="default 512 (micro 64)")
    ap.add_argument("--max-examples", type=int, default=None, help="dataset rows (default 400; micro 40)")
    ap.add_argument("--eval-examples", type=int, default=None, help="default 16 (micro 4)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 256 (micro 16)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 32 (micro 4)")
    ap.add_argument("--vocab", type=int, default=2048, help="the tokenizer's vocabulary (micro models use it too)")
    ap.add_argument("--budget-s", type=float, default=480, help="start no run after this many seconds")
    ap.add_argument("--timeout-s", type=float, default=400, help="per run")
    ap.add_argument("--out", default=None, help="default bench/measurements/gpu-runs-<gpu>.json")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--home", default=None, help="TUNEQUANT_HOME for the runs (default: a new temp dir)")
    args = ap.parse_args(argv)
    import torch
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --micro", file=sys.stderr)
        return 2
    m = args.micro
    args.steps = args.steps or (2 if m else 30)
    args.seq_len = args.seq_len or (64 if m else 512)
    args.max_examples = args.max_examples or (40 if m else 400)
    args.eval_examples = args.eval_examples or (4 if m else 16)
    args.prompt_len = args.prompt_len or (16 if m else 256)
    args.new_tokens = args.new_tokens or (4 if m else 32)
    fams = [f for f in (args.families.split(",") if args.families else
                        (CPU_FAMILIES if dev == "cpu" else list(FAMILIES))) if f]
    unknown = [f for f in fams if f not in FAMILIES]
    if unknown:
        print(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; known: {', '.join(FAMILIES)}",
              file=sys.stderr)
        return 2
    t_start = time.monotonic()
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="tq-gpu-runs-"))
    home.mkdir(parents=True, exist_ok=True)
    from engine.runs import api
    prev_home, prev_executor = os.environ.get("TUNEQUANT_HOME"), api._executor
    os.environ["TUNEQUANT_HOME"] = str(home)
    api.use_store(home / "runs.sqlite", home / "runs")
    try:
        return _run_all(args, dev, fams, home, api, t_start)
    finally:                                  # leave the caller's store and home as they were
        api._executor = prev_executor
        if prev_home is None:
            os.environ.pop("TUNEQUANT_HOME", None)
        else:
            os.environ["TUNEQUANT_HOME"] = prev_home


def _run_all(args, dev, fams, home, api, t_start) -> int:
    import torch
    m = args.micro
    gpu = _gpu_id(dev)
    out_path = Path(args.out) if args.out else ROOT / "bench" / "measurements" / f"gpu-runs-{gpu}{'-micro' if m else ''}.json"
    doc = {"kind": "gpu_runs", "device": dev, "gpu": gpu, "rows": []}
    if out_path.is_file() and not args.no_save:
        try:
            doc = json.loads(out_path.read_text())        # an earlier chunk: keep its rows
        except json.JSONDecodeError:
            pass
    doc.update(gpu_name=torch.cuda.get_device_name(0) if dev == "cuda" else None, micro=m,
               settings={k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "max_examples",
                                                        "eval_examples", "prompt_len", "new_tokens", "vocab")})
    tok = tokenizer(args.vocab)
    dirs: dict[str, str] = {}
    print(f"{len(fams)} families on {dev} ({gpu}){' micro' if m else ''}: {', '.join(fams)}; "
          f"tokenizer ready in {time.monotonic() - t_start:.0f} s", flush=True)
    for fam in fams:
        preset, strategy, _, libs = FAMILIES[fam]
        row = {"family": fam, "model": preset, "strategy": strategy,
               "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        missing = [lib for lib in libs if not have(lib)]
        if missing:
            row["skipped"] = f"{', '.join(missing)} not installed"
        elif time.monotonic() - t_start > args.budget_s:
            row["skipped"] = f"over --budget-s {args.budget_s:.0f}: run it in another call (--families {fam})"
        else:
            if preset not in dirs:
                dirs[preset] = build_model_dir(preset, m, tok, home, dev)
            spec = run_spec(fam, dirs[preset], args, dev)
            t0 = time.monotonic()
            try:
                rid = api.launch(spec)
                run = api.wait(rid, timeout=args.timeout_s)
                if run["status"] not in ("finished", "failed", "stopped", "interrupted"):
                    api.stop(rid, wait=True)
                    run = api.get_run(rid)
                row.update(summarize_run(run))
            except Exception as e:                       # noqa: BLE001 - refused before it started
                row.update(status="refused", error=f"{type(e).__name__}: {e}")
            row["wall_s"] = round(time.monotonic() - t0, 1)
            row["spec"] = {k: spec[k] for k in ("strategy", "train", "quantize", "evaluate")}
        doc["rows"] = [r for r in doc["rows"] if r.get("family") != fam or r.get("micro", m) != m] + [{**row, "micro": m}]
        print(f"  {fam:17s} {row.get('status') or 'skipped':9s} {row.get('wall_s', 0):6.1f} s"
              f"{'  ' + str(row.get('error') or row.get('skipped') or '')[:160] if row.get('error') or row.get('skipped') else ''}",
              flush=True)
        if not args.no_save:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(doc, indent=1))
    print_table([r for r in doc["rows"] if r.get("micro", m) == m])
    if not args.no_save:
        print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
