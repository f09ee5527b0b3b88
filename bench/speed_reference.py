"""The speed model against the H100 reference measurements: fit, fold errors, device memory.

    python bench/speed_reference.py            # errors of the shipped constants, in-sample fit and leave-one-model-out
    python bench/speed_reference.py --fit      # also print the fitted constants as presets/estimate/speed.yaml lines
    python bench/speed_reference.py --json out.json

Reads presets/evidence/h100-reference/ (measurements.jsonl and the three model configs; README
there) and bench/measurements/h100-reference-before.json (the planner's estimates before this
calibration). Pure Python (the planner only), a minute or two on a shared CPU.

Training step time is predicted by engine/estimate/latency.py from the physical quantities of
each step (tensor-core FLOPs, elementwise bytes, NF4 dequantization, materialised attention
scores, host layer passes) and a handful of constants shared by every model and method. The
fit minimises the squared log error of step time plus a Gaussian prior on each constant's log
(PRIORS below: a value from public figures and how far it may plausibly be off); a constant the
data cannot pin down (e.g. the GEMM efficiency when the held-out model is the only GPU-bound
one) stays near its prior instead of wandering. Leave-one-model-out refits without one model
and predicts it: what a new architecture will see.

Fold error of a row: max(predicted/measured, measured/predicted). Targets (issue 14): training
median <= 1.15x and worst <= 1.4x, leave-one-model-out.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import hardware, models  # noqa: E402
from engine.estimate import latency, memory  # noqa: E402

REF = ROOT / "presets" / "evidence" / "h100-reference"
BEFORE = ROOT / "bench" / "measurements" / "h100-reference-before.json"
GPU = "h100-80gb"
NOISE = 0.1          # log-sd of one measurement around the model (step-to-step and run-to-run scatter)

# (value, log-sd): where each fitted constant starts and how hard the data must pull it away
TRAIN_PRIORS = {
    "gemm_efficiency": (0.6, 0.25,
                        "large bf16 GEMMs reach ~55-70% of the H100's dense peak in cuBLAS (NVIDIA H100 "
                        "tuning guide / PyTorch matmul benchmarks), less in eager training"),
    "h_half": (512, 0.5, "128-256 wide tiles on 132 SMs: layers a few hundred wide leave SMs idle"),
    "tokens_half": (512, 0.5, "the same for the token dimension of the GEMMs"),
    "elementwise_traffic": (2.0, 0.5, "eager elementwise kernels reach about half the bandwidth"),
    "math_attention_bytes_per_score": (48.0, 0.7, "write, scale/mask, softmax read+write, AV read (6 x 4 B) "
                                                  "+ fp32 SIMT matmuls of 4 x head_dim FLOPs per score"),
    "nf4_dequant_bytes_per_param": (4.6, 0.5, "0.56 B NF4 + absmax read, 2 B bf16 written, 2 B read by the GEMM"),
}
HOST_PRIOR = (3e-3, 2.0, "weak: ~100-300 launches per layer pass at 10-30 us on the host")
HOST_METHODS = ("full", "lora", "qlora")
INFER_FORMATS = ("bf16", "int8", "nf4")
INFER_PRIORS = {
    "decode_bw_efficiency": ({"bf16": 0.8, "int8": 0.3, "nf4": 0.55}, 0.3),
    "layer_overhead_s": ({"bf16": 1e-3, "int8": 4e-3, "nf4": 2e-3}, 2.0),
    "step_overhead_s": ({"bf16": 5e-3, "int8": 5e-3, "nf4": 5e-3}, 3.0),
    "prefill_efficiency": ({"bf16": 1.0, "int8": 0.45, "nf4": 0.65}, 0.3),
}
BOUNDS = {"gemm_efficiency": 0.9, "decode_bw_efficiency": 1.0, "prefill_efficiency": 1.5}


# ---- data ----------------------------------------------------------------------------------

def load() -> tuple[list[dict], dict]:
    lines = [json.loads(x) for x in (REF / "measurements.jsonl").read_text().splitlines() if x.strip()]
    archs = {m: models.resolve(str(REF / f"{m}.json")) for m in sorted({r["model"] for r in lines if "model" in r})}
    rows = []
    for i, r in enumerate(lines):
        if r["kind"] in ("train", "inference") and not r.get("error"):
            rows.append({**r, "line": i})
    return rows, archs


def train_case(r: dict) -> dict:
    m, prec = r["method"], "bf16"
    if m.startswith("full"):
        prec, m = ("fp32-amp" if "fp32" in m else "bf16"), "full"
    return {"method": m, "precision": prec, "seq_len": r["seq"], "batch_size": r["batch"],
            "grad_ckpt": bool(r["grad_ckpt"]), "lora_rank": r["rank"]}


def train_rows(rows, archs, dev) -> list[dict]:
    out = []
    for r in rows:
        if r["kind"] != "train":
            continue
        c = train_case(r)
        a = archs[r["model"]]
        q = latency.step_quantities(a, c["method"], c["precision"], c["seq_len"], c["batch_size"], c["grad_ckpt"],
                                    c["lora_rank"], dev)
        out.append({"row": r, "case": c, "arch": a, "q": q, "measured": r["step_s"], "model": r["model"],
                    "term": f"{r['method']} {'ckpt' if r['grad_ckpt'] else 'no-ckpt'}"})
    return out


def infer_rows(rows, archs, dev) -> list[dict]:
    out = []
    for r in rows:
        if r["kind"] != "inference":
            continue
        a = archs[r["model"]]
        q = latency.infer_quantities(a, r["quant"], r["batch"], r["prompt"], r["new_tokens"], dev, plain_forward=True)
        out.append({"row": r, "arch": a, "q": q, "model": r["model"], "fmt": r["quant"],
                    "decode_measured": r["batch"] / r["decode_tok_s"], "prefill_measured": r["prefill_s"],
                    "term": f"{r['quant']} batch {'1' if r['batch'] == 1 else '>1'}"})
    return out


# ---- the model as a function of its constants -------------------------------------------------

def train_predict(x: dict, c: dict, dev) -> float:
    return latency.step_time(x["q"], x["arch"], x["case"]["method"], dev, c)["step_s"]


def infer_predict(x: dict, c: dict, tc: dict, dev) -> tuple[float, float]:
    t = latency.infer_times(x["q"], x["arch"], dev, c, tc)
    return t["decode_s_per_token"], t["prefill_s"]


def fold(p: float, m: float) -> float:
    e = p / m
    return max(e, 1 / e)


# ---- fitting: Nelder-Mead on log constants --------------------------------------------------------

def nelder_mead(f, x0: list[float], iters: int, step: float) -> list[float]:
    n = len(x0)
    pts = [x0[:]] + [[x0[j] + (step if j == i else 0.0) for j in range(n)] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = sorted(range(n + 1), key=lambda i: vals[i])
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        c = [sum(p[j] for p in pts[:-1]) / n for j in range(n)]
        xr = [2 * c[j] - pts[-1][j] for j in range(n)]
        fr = f(xr)
        if fr < vals[0]:
            xe = [3 * c[j] - 2 * pts[-1][j] for j in range(n)]
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = [(c[j] + pts[-1][j]) / 2 for j in range(n)]
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                for i in range(1, n + 1):
                    pts[i] = [(pts[0][j] + pts[i][j]) / 2 for j in range(n)]
                    vals[i] = f(pts[i])
    return pts[min(range(n + 1), key=lambda i: vals[i])]


def minimise(obj, x0: list[float]) -> list[float]:
    x = x0
    for step in (0.5, 0.2, 0.1, 0.05):
        x = nelder_mead(obj, x, 1500, step)
    return x


def _train_params() -> list[tuple[str, float, float]]:
    ps = [(k, v, sd) for k, (v, sd, _) in TRAIN_PRIORS.items()]
    for m in HOST_METHODS:
        for d in ("forward", "backward"):
            ps.append((f"host.{m}.{d}", HOST_PRIOR[0], HOST_PRIOR[1]))
    return ps


def _set_train(c: dict, name: str, v: float) -> None:
    if name.startswith("host."):
        _, m, d = name.split(".")
        c["host_s_per_layer"][m][d] = v
    else:
        c[name] = v


def fit_train(data: list[dict], base: dict, dev) -> dict:
    params = _train_params()

    def constants(theta):
        c = copy.deepcopy(base)
        for (name, _, _), t in zip(params, theta):
            _set_train(c, name, math.exp(t))
        return c

    def obj(theta):
        c = constants(theta)
        if c["gemm_efficiency"] > BOUNDS["gemm_efficiency"]:
            return 1e9
        s = sum(math.log(train_predict(x, c, dev) / x["measured"]) ** 2 for x in data)
        return s + sum(((NOISE / sd) ** 2) * (t - math.log(v)) ** 2 for (_, v, sd), t in zip(params, theta))

    theta = minimise(obj, [math.log(v) for _, v, _ in params])
    c = constants(theta)
    # QAT is not measured: full fine-tuning's host terms with fake-quantization's extra ops
    c["host_s_per_layer"]["qat"] = {"forward": c["host_s_per_layer"]["full"]["forward"] * 1.5,
                                    "backward": c["host_s_per_layer"]["full"]["backward"] * 1.3}
    return c


def fit_infer(data: list[dict], base: dict, tc: dict, dev) -> dict:
    params = [(k, f, pri[f], sd) for k, (pri, sd) in INFER_PRIORS.items() for f in INFER_FORMATS]

    base = copy.deepcopy(base)
    base["formats"] = {f: dict(latency.format_constants(f, base)) for f in latency.F.ids()}

    def constants(theta):
        c = copy.deepcopy(base)
        for (k, f, _, _), t in zip(params, theta):
            c["formats"][f][k] = math.exp(t)
        return c

    def obj(theta):
        c = constants(theta)
        for f in INFER_FORMATS:
            if any(c["formats"][f][k] > b for k, b in BOUNDS.items() if k in c["formats"][f]):
                return 1e9
        s = 0.0
        for x in data:
            d, p = infer_predict(x, c, tc, dev)
            s += math.log(d / x["decode_measured"]) ** 2 + math.log(p / x["prefill_measured"]) ** 2
        return s + sum(((NOISE / sd) ** 2) * (t - math.log(v)) ** 2 for (_, _, v, sd), t in zip(params, theta))

    c = constants(minimise(obj, [math.log(v) for _, _, v, _ in params]))
    for f in ("fp16", "fp32", "nf4-nodq", "fp4"):      # same kernels as a fitted format
        src = {"fp16": "bf16", "fp32": "bf16", "nf4-nodq": "nf4", "fp4": "nf4"}[f]
        for k in ("layer_overhead_s", "step_overhead_s") + (() if f == "fp32" else ("decode_bw_efficiency",
                                                                                    "prefill_efficiency")):
            c["formats"][f][k] = c["formats"][src][k]
    return c


# ---- reports -------------------------------------------------------------------------------------

def summarise(errors: list[float]) -> str:
    return f"x{statistics.median(errors):.2f} / x{max(errors):.2f}" if errors else "-"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    out = [f"\n{title}", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def grouped(items: list[tuple[str, str, float]], key) -> dict[str, list[float]]:
    g: dict[str, list[float]] = {}
    for it in items:
        g.setdefault(key(it), []).append(it[2])
    return g


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fit", action="store_true", help="print the fitted constants as speed.yaml lines")
    ap.add_argument("--json", help="write every row's measured and predicted figures to this file")
    args = ap.parse_args(argv)
    dev = hardware.get(GPU)
    rows, archs = load()
    tr, inf = train_rows(rows, archs, dev), infer_rows(rows, archs, dev)
    shipped_t, shipped_i = latency.sp()["train"], latency.sp()["infer"]
    before = {b["line"]: b for b in json.loads(BEFORE.read_text())["rows"]} if BEFORE.is_file() else {}

    fit_t = fit_train(tr, shipped_t, dev)
    fit_i = fit_infer(inf, shipped_i, fit_t, dev)
    lomo_t, lomo_i = {}, {}
    for m in archs:
        ct = fit_train([x for x in tr if x["model"] != m], shipped_t, dev)
        ci = fit_infer([x for x in inf if x["model"] != m], shipped_i, ct, dev)
        for x in tr:
            if x["model"] == m:
                lomo_t[x["row"]["line"]] = train_predict(x, ct, dev)
        for x in inf:
            if x["model"] == m:
                lomo_i[x["row"]["line"]] = infer_predict(x, ci, ct, dev)

    # training: per row, per model, per term
    recs = []
    cols = {"before": [], "shipped": [], "fit": [], "lomo": []}
    for x in tr:
        ln, meas = x["row"]["line"], x["measured"]
        b = before.get(ln)
        pred = {"before": (x["row"]["batch"] * x["row"]["seq"] / b["tokens_per_s"]) if b else None,
                "shipped": train_predict(x, shipped_t, dev), "fit": train_predict(x, fit_t, dev), "lomo": lomo_t[ln]}
        recs.append({"kind": "train", "line": ln, "model": x["model"], "term": x["term"], **x["case"],
                     "measured_step_s": meas, **{f"{k}_step_s": v for k, v in pred.items()}})
        for k, v in pred.items():
            if v:
                cols[k].append((x["model"], x["term"], fold(v, meas)))
    print(f"H100 reference: {len(tr)} training steps, {len(inf)} generate runs of {', '.join(archs)} "
          f"({REF.relative_to(ROOT)}); fold error median / worst")
    hdr = ["", "before (priors)", "shipped constants", "in-sample fit", "leave-one-model-out"]
    body = []
    for label, key in [("all", lambda it: "all")] + [(None, lambda it: it[0])]:
        keys = sorted({key(it) for it in cols["shipped"]})
        for k in keys:
            body.append([k] + [summarise(grouped(cols[c], key).get(k, [])) for c in ("before", "shipped", "fit", "lomo")])
    print(table("Training step time per model", hdr, body))
    body = [[k] + [summarise(grouped(cols[c], lambda it: it[1]).get(k, [])) for c in ("before", "shipped", "fit", "lomo")]
            for k in sorted({it[1] for it in cols["shipped"]})]
    print(table("Training step time per method and checkpointing", hdr, body))

    # inference
    icols = {f"{w}_{c}": [] for w in ("decode", "prefill") for c in ("before", "shipped", "fit", "lomo")}
    for x in inf:
        ln, r = x["row"]["line"], x["row"]
        b = before.get(ln)
        preds = {"shipped": infer_predict(x, shipped_i, shipped_t, dev), "fit": infer_predict(x, fit_i, fit_t, dev),
                 "lomo": lomo_i[ln]}
        if b:
            preds["before"] = (r["batch"] / b["decode_tokens_per_s_total"], b["prefill_s"])
        recs.append({"kind": "inference", "line": ln, "model": x["model"], "weights": x["fmt"], "batch": r["batch"],
                     "prompt": r["prompt"], "measured_decode_s": x["decode_measured"],
                     "measured_prefill_s": x["prefill_measured"],
                     **{f"{k}_decode_s": v[0] for k, v in preds.items()},
                     **{f"{k}_prefill_s": v[1] for k, v in preds.items()}})
        for k, (d, p) in preds.items():
            icols[f"decode_{k}"].append((x["model"], x["term"], fold(d, x["decode_measured"])))
            icols[f"prefill_{k}"].append((x["model"], x["term"], fold(p, x["prefill_measured"])))
    for w in ("decode", "prefill"):
        body = []
        for key in (lambda it: "all", lambda it: it[0], lambda it: it[1]):
            keys = sorted({key(it) for it in icols[f"{w}_shipped"]})
            body += [[k] + [summarise(grouped(icols[f"{w}_{c}"], key).get(k, [])) for c in ("before", "shipped", "fit", "lomo")]
                     for k in keys]
        print(table(f"HF generate {w} ({'seconds per step' if w == 'decode' else 'a plain forward over the prompt'}) "
                    "per model and format", hdr, body))

    # device memory: what the planner says the GPU needs vs what it held
    G = 2 ** 30
    body, short = [], 0
    ctx_train = max((r["cuda_used_before_load"] for r in rows if r["kind"] == "inference"), default=0)
    ctx_fresh = {}          # a serving process that has not trained: the context before loading each format
    for r in rows:
        if r["kind"] == "inference" and r["set"] == "base":
            ctx_fresh[r["quant"]] = max(ctx_fresh.get(r["quant"], 0), r["cuda_used_before_load"])
    from engine import estimate
    for x in tr:
        r, c = x["row"], x["case"]
        e = estimate.estimate_train(str(REF / f"{r['model']}.json"), gpu=GPU, calibration=False, **c)
        held = r["reserved_peak"] + ctx_train
        ok = e["device_bytes"] >= held
        short += not ok
        body.append([r["model"], f"{r['method']} {r['seq']}x{r['batch']} {'ckpt' if r['grad_ckpt'] else 'no-ckpt'}",
                     f"{r['peak_bytes'] / G:.2f}", f"{e['peak_allocated_bytes'] / G:.2f}", f"{held / G:.2f}",
                     f"{e['device_bytes'] / G:.2f}", "ok" if ok else "SHORT"])
        recs.append({"kind": "train-memory", "line": r["line"], "held_bytes": held, "device_bytes": e["device_bytes"],
                     "peak_bytes": r["peak_bytes"], "predicted_peak_bytes": e["peak_allocated_bytes"]})
    for x in inf:
        r = x["row"]
        e = estimate.estimate_infer(str(REF / f"{r['model']}.json"), r["quant"], runtime="transformers", batch_size=r["batch"],
                                    prompt_len=r["prompt"], new_tokens=r["new_tokens"], gpu=GPU, calibration=False)
        held = r["weights_bytes"] + r["generate_peak_extra_bytes"] + ctx_fresh[r["quant"]]
        ok = e["device_bytes"] >= held
        short += not ok
        body.append([r["model"], f"generate {r['quant']} b{r['batch']} p{r['prompt']}",
                     f"{(r['weights_bytes'] + r['generate_peak_extra_bytes']) / G:.2f}",
                     f"{e['peak_allocated_bytes'] / G:.2f}", f"{held / G:.2f}", f"{e['device_bytes'] / G:.2f}",
                     "ok" if ok else "SHORT"])
        recs.append({"kind": "infer-memory", "line": r["line"], "held_bytes": held, "device_bytes": e["device_bytes"]})
    print(table(f"device_bytes vs what the GPU held (GiB; training: max_memory_reserved + the {ctx_train / G:.2f} GiB "
                "CUDA context measured after training; generate: allocated peak + the context measured before "
                "loading that format in a fresh process, since reserved still holds the timed full-logit forward's blocks)",
                ["model", "case", "peak measured", "peak estimated", "held", "device_bytes", ""], body))
    print(f"\n{short} case(s) where device_bytes falls short of what the GPU held")

    if args.fit:
        print("\n# fitted train constants (presets/estimate/speed.yaml train:)")
        for k in TRAIN_PRIORS:
            print(f"  {k}: {fit_t[k]:.4g}")
        print("  host_s_per_layer:")
        for m, d in fit_t["host_s_per_layer"].items():
            print(f"    {m}: {{forward: {d['forward']:.5f}, backward: {d['backward']:.5f}}}")
        print("# fitted speed of the measured formats (presets/quant/formats.yaml, each entry's speed:)")
        for f in INFER_FORMATS:
            v = fit_i["formats"][f]
            print(f"  {f}: speed: {{decode_bw_efficiency: {v['decode_bw_efficiency']:.3f}, layer_overhead_s: "
                  f"{v['layer_overhead_s']:.5f}, step_overhead_s: {v['step_overhead_s']:.4f}, "
                  f"prefill_efficiency: {v['prefill_efficiency']:.3f}}}")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": GPU, "rows": recs, "fit_train": fit_t,
                                               "fit_infer": fit_i}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
