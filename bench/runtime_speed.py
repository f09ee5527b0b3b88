"""Serving runtimes: the decode estimate against every published figure of presets/evidence/runtime_speed.csv.

    python bench/runtime_speed.py            # the table: in-sample and leave-one-source-out fold errors
    python bench/runtime_speed.py --fit      # also the fitted bw_efficiency per runtime x device kind
    python bench/runtime_speed.py --markdown # the table as docs/estimates.md shows it

For each decode or request-latency row: the runtime's decode step (engine/estimate/runtimes.py decode_step) for the row's model,
format, batch and context on the row's device (a preset id, or a device built from the row's bandwidth
and kind when the device is not a preset). ``in-sample`` uses presets/runtimes.yaml's efficiency;
``LOSO`` refits the bw_efficiency of the row's runtime x device kind without the row's source (the
median over the other sources' rows of the efficiency each implies, host time per token as in the
registry; rows the model puts on the
compute or dequantization bound say nothing about bandwidth and are left out of the fit) and predicts
the left-out rows; a group with no other source keeps the registry's prior
(marked). Time-to-first-token rows (``ttft_s``, batch 1) check the prefill model (runtimes.prefill):
its fold error, and with --fit the prefill efficiency each compute-bound row implies. Fold error =
max(est/meas, meas/est). Prints figures; never passes or fails.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import hardware, models                       # noqa: E402
from engine.estimate import formats as F                  # noqa: E402
from engine.estimate import runtimes as R                 # noqa: E402

CSV = Path(__file__).resolve().parents[1] / "presets" / "evidence" / "runtime_speed.csv"


METRICS = ("decode_tokens_per_s", "request_latency_s", "ttft_s")
DECODE = ("decode_tokens_per_s", "request_latency_s")      # the rows that say something about a decode step


def rows() -> list[dict]:
    with CSV.open(encoding="utf-8") as fh:
        return [r for r in csv.DictReader(fh) if r["metric"] in METRICS]


def device(r: dict) -> hardware.Device:
    if r["device"]:
        return hardware.get(r["device"])
    return hardware.Device(id=r["device_name"], name=r["device_name"], kind=r["device_kind"], memory_bytes=0,
                           bandwidth_gbs=float(r["bandwidth_gbs"]), bf16_tflops=None, fp16_tflops=None,
                           fp8_tflops=None, int8_tops=None, price_per_hour=None,
                           alu_tops=float(r["alu_tops"]) if r.get("alu_tops") else None, os=r.get("os") or "")


def context(r: dict) -> float:
    return int(r["prompt_len"]) + (int(r["new_tokens"]) - 1) / 2


def predict(r: dict, override: dict | None = None) -> float:
    """The row's metric as the registry's model gives it: decode tokens/s per sequence, or a
    request's latency (prefill, then new_tokens - 1 decode steps: the first token comes with the
    prefill, as vLLM's benchmark_latency times a whole generate)."""
    rt = R.get(r["runtime"])
    arch, dev, b = models.resolve(r["model"]), device(r), int(r["batch"])
    if r["metric"] == "ttft_s":
        return R.prefill(arch, r["format"], dev, rt, b, int(r["prompt_len"]), override)["prefill_s"]
    st = R.decode_step(arch, r["format"], dev, rt, b, context(r), override)
    if r["metric"] == "request_latency_s":
        pf = R.prefill(arch, r["format"], dev, rt, b, int(r["prompt_len"]), override)["prefill_s"]
        return pf + (int(r["new_tokens"]) - 1) * st["step_s"]
    return 1 / st["step_s"]


def measured_step(r: dict) -> float:
    """Seconds per decode step the row implies (a latency row: its prefill as modelled taken off)."""
    if r["metric"] == "request_latency_s":
        rt, arch, dev = R.get(r["runtime"]), models.resolve(r["model"]), device(r)
        pf = R.prefill(arch, r["format"], dev, rt, int(r["batch"]), int(r["prompt_len"]))["prefill_s"]
        return (float(r["value"]) - pf) / (int(r["new_tokens"]) - 1)
    return 1 / float(r["value"])


def implied_efficiency(r: dict) -> float | None:
    """The bw_efficiency that makes the model reproduce the row exactly (host time as in the registry);
    None for a row the model puts on the compute or dequantization bound (its time says nothing about
    the bandwidth reached, so it takes no part in the fit)."""
    rt, dev = R.get(r["runtime"]), device(r)
    arch = models.resolve(r["model"])
    st = R.decode_step(arch, r["format"], dev, rt, int(r["batch"]), context(r))
    if st["bound"] != "memory":
        return None
    moved = st["weights_read"] + st["kv_read"]
    t = measured_step(r) - st["host_s"]
    return moved / (dev.bandwidth_gbs * 1e9 * t) if t > 0 else float("inf")


def implied_prefill_efficiency(r: dict) -> float | None:
    """The prefill efficiency that reproduces a TTFT row, when the row is compute-bound (None when the
    weights' read or the host time decides it: then no efficiency explains the figure)."""
    rt, dev, arch = R.get(r["runtime"]), device(r), models.resolve(r["model"])
    c = R.constants(rt, r["format"], dev)
    p = R.prefill(arch, r["format"], dev, rt, int(r["batch"]), int(r["prompt_len"]), {"prefill_efficiency": 1.0, "bw_efficiency": 1e9})
    host = c["host_s_per_token"] + arch.num_layers * c["host_s_per_layer"]
    at_peak = p["prefill_s"] - host                       # the compute time at 100 % of the peak (weights free)
    weights = F.bytes_read_per_token(arch, r["format"]) / (dev.bandwidth_gbs * 1e9 * c["bw_efficiency"])
    t = float(r["value"]) - host
    return at_peak / t if t > weights and at_peak / c["prefill_efficiency"] > 2 * weights else None


def group(r: dict) -> tuple[str, str, str]:
    """What one bw_efficiency covers: runtime x device kind x format class (a class the registry
    does not list for that device falls back to its `default`: then the rows pool over classes)."""
    rt = R.get(r["runtime"])
    kind = R.platform_key(rt.decode["bw_efficiency"], device(r))     # phone-ios / phone-android where listed
    table = rt.decode["bw_efficiency"].get(kind, {})
    cls = R.format_class(r["format"])
    return r["runtime"], kind, cls if cls in table else "default"


def fold(est: float, meas: float) -> float:
    return max(est / meas, meas / est)


def evaluate(rs: list[dict] | None = None) -> list[dict]:
    """Every row with its in-sample and leave-one-source-out estimate and fold errors."""
    rs = rows() if rs is None else rs
    for r in rs:
        r["implied"] = implied_efficiency(r) if r["metric"] in DECODE else None
    out = []
    for r in rs:
        meas = float(r["value"])
        ins = predict(r)
        others = [x for x in rs if x["metric"] in DECODE and group(x) == group(r) and x["source_id"] != r["source_id"]
                  and x["implied"] is not None]
        if others and r["metric"] in DECODE:
            eff = statistics.median(x["implied"] for x in others)
            loso, how = predict(r, {"bw_efficiency": eff}), f"refit on {len({x['source_id'] for x in others})} other source(s)"
        else:
            loso, how = ins, "registry value (no other source: in-sample)"
        extra = {}
        if r["metric"] in DECODE:
            st = R.decode_step(models.resolve(r["model"]), r["format"], device(r), R.get(r["runtime"]), int(r["batch"]),
                               context(r))
            extra["bound"] = st["bound"]
            if st["bound"] == "dequantization":
                t = measured_step(r) - st["host_s"]
                extra["alu_implied"] = st["constants"]["alu_efficiency"] * st["dequant_s"] / t
        out.append({**r, **extra, "in_sample": ins, "loso": loso, "how": how, "fold_in": fold(ins, meas),
                    "fold_loso": fold(loso, meas)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fit", action="store_true", help="print the fitted bw_efficiency per runtime x device kind")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    a = ap.parse_args(argv)
    rs = rows()
    out = evaluate(rs)
    single = [o for o in out if o["batch"] == "1" and o["metric"] == "decode_tokens_per_s"]
    latency = [o for o in out if o["metric"] == "request_latency_s"]
    ttft = [o for o in out if o["metric"] == "ttft_s"]
    label = {"decode_tokens_per_s": ("decode tok/s", "tok/s"), "request_latency_s": ("latency s", "lat s"),
             "ttft_s": ("first token s", "ttft s")}
    if a.markdown:
        print("| runtime | model | device | format | batch | metric | measured | estimate | fold | LOSO estimate | LOSO fold | source |")
        print("|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---|")
        for o in out:
            metric = label[o["metric"]][0]
            print(f"| {o['runtime']} | {o['model']} | {o['device'] or o['device_name']} | {o['format']} | {o['batch']} | {metric} | "
                  f"{float(o['value']):.3g} | {o['in_sample']:.3g} | {o['fold_in']:.2f} | {o['loso']:.3g}"
                  f"{'*' if o['how'].startswith('registry') else ''} | {o['fold_loso']:.2f} | [{o['source_id']}]({o['source_url']}) |")
    else:
        print(f"{'runtime':12} {'model':14} {'device':26} {'format':12} {'B':>3} {'metric':8} {'meas':>7} {'est':>7} "
              f"{'fold':>5} {'LOSO':>7} {'fold':>5}  how")
        for o in out:
            metric = label[o["metric"]][1]
            print(f"{o['runtime']:12} {o['model']:14} {(o['device'] or o['device_name'])[:26]:26} {o['format']:12} "
                  f"{o['batch']:>3} {metric:8} {float(o['value']):7.3g} {o['in_sample']:7.3g} {o['fold_in']:5.2f} "
                  f"{o['loso']:7.3g} {o['fold_loso']:5.2f}  {o['how']}")
    for name, key in (("in-sample", "fold_in"), ("leave-one-source-out", "fold_loso")):
        f = [o[key] for o in single]
        print(f"\n{name}: {len(f)} single-stream decode rows, median fold error {statistics.median(f):.2f}x, "
              f"worst {max(f):.2f}x (target: median <= 1.3x, worst <= 1.6x)")
        if latency:
            g = [o[key] for o in latency]
            print(f"{name}: {len(g)} request-latency rows (batch 1-16), median fold error {statistics.median(g):.2f}x, "
                  f"worst {max(g):.2f}x")
    if ttft:
        f = [o["fold_in"] for o in ttft]
        print(f"time to first token: {len(f)} rows (batch 1, prefill model), median fold error "
              f"{statistics.median(f):.2f}x, worst {max(f):.2f}x (one source per runtime: in-sample)")
    if a.fit:
        print("\nfitted prefill efficiency (compute-bound time-to-first-token rows):")
        for rid in sorted({o["runtime"] for o in ttft}):
            imp = [(o, implied_prefill_efficiency(o)) for o in ttft if o["runtime"] == rid]
            vals = [v for _, v in imp if v is not None]
            reg = R.constants(R.get(rid), imp[0][0]["format"], device(imp[0][0]))["prefill_efficiency"]
            print(f"  {rid:12} " + (f"{statistics.median(vals):.3f}  (rows {len(vals)} of {len(imp)}, range "
                                    f"{min(vals):.2f}-{max(vals):.2f}; registry {reg:.2f})" if vals else
                                    f"no compute-bound row (registry {reg:.2f})"))
        print("\nfitted bw_efficiency (median of the efficiency each row implies; host_s_per_token as in the registry):")
        for g in sorted({group(r) for r in rs if r["metric"] in DECODE}):
            grp = [r for r in rs if r["metric"] in DECODE and group(r) == g]
            imp = [r["implied"] for r in grp if r["implied"] is not None]
            skipped = len(grp) - len(imp)
            reg = R.constants(R.get(g[0]), grp[0]["format"], device(grp[0]))["bw_efficiency"]
            print(f"  {g[0]:12} {g[1]:7} {g[2]:8} {statistics.median(imp):.3f}  (rows {len(imp)}, range "
                  f"{min(imp):.2f}-{max(imp):.2f}; registry {reg:.2f})"
                  + (f"; {skipped} row(s) on the dequantization/compute bound left out" if skipped else ""))
        dq = [o for o in out if o["metric"] in DECODE and o.get("bound") == "dequantization"]
        if dq:
            print("\nrows on the dequantization bound (llama.cpp alu_efficiency is a prior, not fitted): the "
                  "efficiency each implies")
            for o in dq:
                print(f"  {o['device'] or o['device_name']:26} {o['format']:12} {o['alu_implied']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
