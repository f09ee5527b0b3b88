"""What each post-training quantization method costs the demo model on held-out text, and how much of
it quantization-aware training wins back: real runs through the executor, one at a time.

    python bench/ptq_cost.py --home /tmp/tq-ptq                       # int8, nf4, gptq 4/3/2-bit
    python bench/ptq_cost.py --home H --cases int8,gptq-3bit,gptq-2bit --reuse RUN_ID,RUN_ID
    python bench/ptq_cost.py --home H --cases ft-16bit,ft-8da4w,qat-8da4w,8da4w  # does QAT win back 8da4w's cost?

Every case is a run of ``--base`` (default presets/runs/demo-ptq-gptq.yaml: demo:smollm2-135m,
held-out python-docs passages, seq_len 256, 16 calibration rows, 24 evaluated rows) with another
strategy, launched with ``engine.runs.api.launch`` into the run store of ``--home`` (so every
figure is a run id that ``python -m engine runs show ID`` prints, and ``calibrate --export`` takes
them as records), and waited for before the next starts. ``--reuse`` takes finished runs of that
store instead of running them again (the demo presets' own runs), refused when their model, data or
evaluation settings differ from the base's.

The PTQ cases compare the run's quantized model (``after``) with its 16-bit starting model
(``before``) on the same held-out rows: ``ratio`` = perplexity after / before.

The QAT cases answer "does QAT recover part of what PTQ costs" without mixing in what fine-tuning on
the text gains, with one quantizer throughout (torchao 8da4w: int8 dynamic per-token activations,
int4 weights in groups of 32, what ``qat-int8`` and demo-qat convert to): ``ft-16bit`` fine-tunes
every weight on the training passages (8 steps of 2 x 256 tokens, lr 1e-4, fp32, no fake
quantization); ``ft-8da4w`` is that fine-tuned model rounded by QAT's own convert with nothing learned
(``qat-int8`` on the ``ft-16bit`` run's saved model, one step at lr 1e-12: PTQ with the same
quantizer; the executor has no CPU PTQ strategy for 8da4w); ``qat-8da4w`` fine-tunes the same steps
with fake quantization and converts; ``8da4w`` rounds the untouched model the same way (its PTQ
cost). Recovered share = (ft-8da4w - qat-8da4w) / (ft-8da4w - ft-16bit) in perplexity. Written to ``--out`` (default bench/measurements/ptq-cost-<model>.json), merged by case
with what an earlier call wrote there, and printed as a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# case: (strategy, RunSpec overrides, the case whose trained model it starts from)
PTQ = {
    "int8": ("ptq-int8", {}, None),
    "nf4": ("ptq-nf4", {}, None),
    "fp4": ("ptq-fp4", {}, None),
    "gptq-8bit": ("ptq-gptq-8bit", {}, None),
    "gptq-4bit": ("ptq-gptq-4bit", {}, None),
    "gptq-3bit": ("ptq-gptq-3bit", {}, None),
    "gptq-2bit": ("ptq-gptq-2bit", {}, None),
    "awq-4bit": ("ptq-awq-4bit", {}, None),
}
QAT_TRAIN = {"steps": 8, "batch_size": 2, "learning_rate": 1.0e-4, "warmup_steps": 2, "grad_ckpt": False,
             "precision": "fp32"}
# the QAT strategy's own quantizer with nothing learned: one step at a learning rate of 1e-12 (AdamW's
# first update is about lr in size), then convert = the starting model rounded exactly as QAT converts
ROUND_ONLY = {"steps": 1, "batch_size": 1, "learning_rate": 1.0e-12, "warmup_steps": 0, "grad_ckpt": False,
              "precision": "fp32"}
QAT = {
    "ft-16bit": ("full-finetune", {"train": QAT_TRAIN}, None),
    "ft-8da4w": ("qat-int8", {"train": ROUND_ONLY}, "ft-16bit"),
    "qat-8da4w": ("qat-int8", {"train": QAT_TRAIN}, None),
    "8da4w": ("qat-int8", {"train": ROUND_ONLY}, None),
}
CASES = {**PTQ, **QAT}
DEFAULT = ("int8", "nf4", "gptq-4bit", "gptq-3bit", "gptq-2bit")
SAME = (("model",), ("dataset",), ("train", "seq_len"), ("evaluate", "max_examples"), ("evaluate", "prompt_len"),
        ("evaluate", "new_tokens"))


def _get(d: dict, path: tuple):
    for k in path:
        d = (d or {}).get(k)
    return d


def machine() -> dict:
    info = {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        info["cpu"] = m.group(1).strip() if m else None
        flags = set((re.search(r"^flags\s*:\s*(.+)$", text, re.M) or [None, ""])[1].split())
        info["cpu_flags"] = sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni"))
    except OSError:
        pass
    return info


def spec_for(case: str, base: dict, trained: dict) -> dict:
    strategy, over, start_from = CASES[case]
    spec = json.loads(json.dumps(base))
    spec["name"] = f"bench ptq_cost {case}"
    spec["strategy"] = strategy
    for k, v in over.items():
        spec[k] = {**(spec.get(k) or {}), **v}
    if start_from:
        if start_from not in trained:
            raise SystemExit(f"case {case} starts from the model of case {start_from}: run {start_from} first "
                             f"(in the same call, or name its run with --reuse)")
        spec["model"] = trained[start_from]
    return spec


def summarize(case: str, run: dict) -> dict:
    res = run.get("result") or {}
    row = {"case": case, "run_id": run["id"], "strategy": run.get("strategy"), "status": run["status"],
           "error": run.get("reason") if run["status"] != "finished" else None,
           "load_avg_1m_at_start": (run.get("machine") or {}).get("load_avg_1m"),
           "stages": {}, "model": (run.get("spec") or {}).get("model")}
    if run.get("started") and run.get("ended"):
        row["wall_s"] = round(run["ended"] - run["started"], 1)
    for st in res.get("stages", []):
        r = st.get("result") or {}
        row["stages"][st["stage"]] = round(st.get("duration_s") or 0, 1)
        if st["stage"] == "quantize":
            row["quant"] = {k: r.get(k) for k in ("method", "bits", "group_size") if r.get(k) is not None}
        if st["stage"] == "train":
            row["train"] = {k: r.get(k) for k in ("method", "steps", "loss_first", "loss_last", "tokens_per_s")}
            if r.get("model_dir"):
                row["model_dir"] = r["model_dir"] if isinstance(r["model_dir"], str) else (r["model_dir"] or {}).get("path")
        if st["stage"] == "evaluate":
            b, a, c = r.get("before") or {}, r.get("after") or {}, r.get("compare") or {}
            row.update(eval_rows=r.get("eval_rows"), scored_tokens=a.get("scored_tokens"),
                       ppl_before=b.get("perplexity"), ppl_after=a.get("perplexity"),
                       ratio=c.get("perplexity_ratio"),
                       size_before=b.get("size_on_disk_bytes"), size_after=a.get("size_on_disk_bytes"))
    if "wall_s" not in row and row["stages"]:
        row["wall_s"] = round(sum(row["stages"].values()), 1)
    return row


def check_reuse(run: dict, base: dict) -> str | None:
    from engine.spec.run import RunSpec
    spec = run.get("spec") or {}
    base = RunSpec.parse(base).to_dict()            # the stored spec is the parsed one, defaults filled in
    for path in SAME:
        if _get(spec, path) != _get(base, path):
            return f"{'.'.join(path)} is {_get(spec, path)!r} there, {_get(base, path)!r} in the base"
    return None


def case_of(run: dict, reuse_cases: dict) -> str | None:
    for case, (strategy, _, _) in CASES.items():
        if strategy == run.get("strategy") and case not in reuse_cases:
            return case
    return None


def mib(b) -> str:
    return f"{b / 2**20:.1f}" if isinstance(b, (int, float)) else "-"


def table(rows: list[dict]) -> str:
    out = ["| case | run | starts from | perplexity before -> after | ratio | size MiB before -> after | stages (s) | load avg at start |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "finished":
            out.append(f"| {r['case']} | {r.get('run_id', '-')} | | {r.get('status')}: {r.get('error')} | | | | |")
            continue
        frm = "16-bit demo model" if str(r.get("model", "")).startswith("demo:") else "ft-16bit's model"
        stages = ", ".join(f"{k} {v:g}" for k, v in r["stages"].items())
        out.append(f"| {r['case']} | {r['run_id']} | {frm} | {r['ppl_before']:.3f} -> {r['ppl_after']:.3f} | "
                   f"x{r['ratio']:.3f} | {mib(r.get('size_before'))} -> {mib(r.get('size_after'))} | {stages} | "
                   f"{r.get('load_avg_1m_at_start')} |")
    by = {r["case"]: r for r in rows if r.get("status") == "finished"}
    if all(k in by for k in ("ft-16bit", "ft-8da4w", "qat-8da4w")):
        f, p, q = by["ft-16bit"]["ppl_after"], by["ft-8da4w"]["ppl_after"], by["qat-8da4w"]["ppl_after"]
        out.append("")
        if abs(p - f) < 0.005 * f:
            out.append(f"QAT: fine-tuned 16-bit {f:.3f}, fine-tuned then rounded to 8da4w {p:.3f}, QAT 8da4w {q:.3f}: "
                       "the rounding costs under 0.5 %, too little to say what QAT wins back")
            return "\n".join(out)
        share = (p - q) / (p - f)
        out.append(f"QAT: fine-tuned 16-bit {f:.3f}, fine-tuned then rounded to 8da4w {p:.3f}, QAT 8da4w {q:.3f}: "
                   f"recovered share of the rounding's cost (ft-8da4w - qat-8da4w) / (ft-8da4w - ft-16bit) = {share:.2f}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", required=True, help="TUNEQUANT_HOME whose run store the runs go into")
    ap.add_argument("--base", default=str(ROOT / "presets" / "runs" / "demo-ptq-gptq.yaml"))
    ap.add_argument("--cases", default=",".join(DEFAULT), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--reuse", default="", help="finished run ids of the store to take instead of running")
    ap.add_argument("--timeout-s", type=float, default=3600, help="per run")
    ap.add_argument("--out", default=None, help="default bench/measurements/ptq-cost-<model>.json")
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    import yaml
    base = yaml.safe_load(Path(args.base).read_text())
    home = Path(args.home)
    home.mkdir(parents=True, exist_ok=True)
    os.environ["TUNEQUANT_HOME"] = str(home)
    from engine.runs import api
    api.use_store(home / "runs.sqlite", home / "runs")
    model = str(base["model"]).replace("demo:", "")
    out_path = Path(args.out) if args.out else ROOT / "bench" / "measurements" / f"ptq-cost-{model}.json"
    doc = {"kind": "ptq_cost", "rows": []}
    if out_path.is_file():
        doc = json.loads(out_path.read_text())
    rows = {r["case"]: r for r in doc.get("rows", [])}
    reused: dict[str, dict] = {}
    for rid in [x for x in args.reuse.split(",") if x]:
        run = api.get_run(rid)
        why = check_reuse(run, base)
        if run["status"] != "finished" or why:
            print(f"--reuse {rid}: not comparable ({run['status']}{'; ' + why if why else ''})", file=sys.stderr)
            return 2
        case = case_of(run, reused)
        reused[case] = run
    trained = {c: r["model_dir"] for c, r in rows.items() if r.get("model_dir")}
    command = "python bench/ptq_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc["commands"] = [c for c in doc.get("commands", []) if c != command] + [command]
    for case in cases:
        t0 = time.monotonic()
        if case in reused:
            row = summarize(case, reused[case])
            row["reused"] = True
        else:
            spec = spec_for(case, base, trained)
            print(f"{case}: {spec['strategy']} on {spec['model']} (load {os.getloadavg()[0]:.2f})", flush=True)
            rid = api.launch(spec)
            run = api.wait(rid, timeout=args.timeout_s)
            if run["status"] not in ("finished", "failed", "stopped", "interrupted"):
                api.stop(rid, wait=True)
                run = api.get_run(rid)
            row = summarize(case, run)
            row["bench_wall_s"] = round(time.monotonic() - t0, 1)
        row["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        if row.get("model_dir"):
            trained[case] = row["model_dir"]
        rows[case] = row
        order = [c for c in CASES if c in rows]
        doc.update(kind="ptq_cost", base=str(Path(args.base).resolve().relative_to(ROOT)) if
                   Path(args.base).resolve().is_relative_to(ROOT) else args.base,
                   base_spec=base, machine=machine(), updated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   rows=[rows[c] for c in order])
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"  {case}: {row['status']} {row.get('run_id')} ratio {row.get('ratio')}", flush=True)
    print(table(doc["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
