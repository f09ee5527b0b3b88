"""Serving runtimes: the decode estimate against every published figure of presets/evidence/runtime_speed.csv.

    python bench/runtime_speed.py            # the table: in-sample and leave-one-source-out fold errors
    python bench/runtime_speed.py --fit      # also the fitted bw_efficiency per runtime x device kind
    python bench/runtime_speed.py --markdown # the table as docs/estimates.md shows it

For each row: the runtime's decode step (engine/estimate/runtimes.py decode_step) for the row's model,
format, batch and context on the row's device (a preset id, or a device built from the row's bandwidth
and kind when the device is not a preset). ``in-sample`` uses presets/runtimes.yaml's efficiency;
``LOSO`` refits the bw_efficiency of the row's runtime x device kind without the row's source (the
median over the other sources' rows of the efficiency each implies, host time per token as in the
registry) and predicts the left-out rows; a group with no other source keeps the registry's prior
(marked). Fold error = max(est/meas, meas/est). Prints figures; never passes or fails.
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


def rows() -> list[dict]:
    with CSV.open(encoding="utf-8") as fh:
        return [r for r in csv.DictReader(fh) if r["metric"] == "decode_tokens_per_s"]


def device(r: dict) -> hardware.Device:
    if r["device"]:
        return hardware.get(r["device"])
    return hardware.Device(id=r["device_name"], name=r["device_name"], kind=r["device_kind"], memory_bytes=0,
                           bandwidth_gbs=float(r["bandwidth_gbs"]), bf16_tflops=None, fp16_tflops=None,
                           fp8_tflops=None, int8_tops=None, price_per_hour=None)


def context(r: dict) -> float:
    return int(r["prompt_len"]) + (int(r["new_tokens"]) - 1) / 2


def predict(r: dict, override: dict | None = None) -> float:
    """Decode tokens/s per sequence the registry's model gives for the row."""
    rt = R.get(r["runtime"])
    st = R.decode_step(models.resolve(r["model"]), r["format"], device(r), rt, int(r["batch"]), context(r), override)
    return 1 / st["step_s"]


def implied_efficiency(r: dict) -> float:
    """The bw_efficiency that makes the model reproduce the row exactly (host time as in the registry)."""
    rt, dev = R.get(r["runtime"]), device(r)
    arch = models.resolve(r["model"])
    st = R.decode_step(arch, r["format"], dev, rt, int(r["batch"]), context(r))
    moved = st["weights_read"] + st["kv_read"]
    t = 1 / float(r["value"]) - st["host_s"]
    return moved / (dev.bandwidth_gbs * 1e9 * t) if t > 0 else float("inf")


def group(r: dict) -> tuple[str, str]:
    return r["runtime"], r["device_kind"]


def fold(est: float, meas: float) -> float:
    return max(est / meas, meas / est)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fit", action="store_true", help="print the fitted bw_efficiency per runtime x device kind")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    a = ap.parse_args(argv)
    rs = rows()
    for r in rs:
        r["implied"] = implied_efficiency(r)
    out = []
    for r in rs:
        meas = float(r["value"])
        ins = predict(r)
        others = [x for x in rs if group(x) == group(r) and x["source_id"] != r["source_id"]]
        if others:
            eff = statistics.median(x["implied"] for x in others)
            loso, how = predict(r, {"bw_efficiency": eff}), f"refit on {len({x['source_id'] for x in others})} other source(s)"
        else:
            loso, how = ins, "prior (no other source)"
        out.append({**r, "in_sample": ins, "loso": loso, "how": how, "fold_in": fold(ins, meas),
                    "fold_loso": fold(loso, meas)})
    single = [o for o in out if o["batch"] == "1"]
    if a.markdown:
        print("| runtime | model | device | format | measured tok/s | estimate | fold | LOSO estimate | LOSO fold | source |")
        print("|---|---|---|---|---:|---:|---:|---:|---:|---|")
        for o in out:
            print(f"| {o['runtime']} | {o['model']} | {o['device'] or o['device_name']} | {o['format']} | "
                  f"{float(o['value']):.1f} | {o['in_sample']:.1f} | {o['fold_in']:.2f} | {o['loso']:.1f}"
                  f"{'*' if o['how'].startswith('prior') else ''} | {o['fold_loso']:.2f} | [{o['source_id']}]({o['source_url']}) |")
    else:
        print(f"{'runtime':12} {'model':14} {'device':26} {'format':12} {'meas':>7} {'est':>7} {'fold':>5} "
              f"{'LOSO':>7} {'fold':>5}  how")
        for o in out:
            print(f"{o['runtime']:12} {o['model']:14} {(o['device'] or o['device_name'])[:26]:26} {o['format']:12} "
                  f"{float(o['value']):7.1f} {o['in_sample']:7.1f} {o['fold_in']:5.2f} {o['loso']:7.1f} "
                  f"{o['fold_loso']:5.2f}  {o['how']}")
    for name, key in (("in-sample", "fold_in"), ("leave-one-source-out", "fold_loso")):
        f = [o[key] for o in single]
        print(f"\n{name}: {len(f)} single-stream rows, median fold error {statistics.median(f):.2f}x, "
              f"worst {max(f):.2f}x (target: median <= 1.3x, worst <= 1.6x)")
    if a.fit:
        print("\nfitted bw_efficiency (median of the efficiency each row implies; host_s_per_token as in the registry):")
        for g in sorted({group(r) for r in rs}):
            imp = [r["implied"] for r in rs if group(r) == g]
            print(f"  {g[0]:12} {g[1]:7} {statistics.median(imp):.3f}  (rows {len(imp)}, range "
                  f"{min(imp):.2f}-{max(imp):.2f}; registry {R.constants(R.get(g[0]), 'bf16' if g[0] != 'llama.cpp' else 'gguf-f16', next(device(r) for r in rs if group(r) == g))['bw_efficiency']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
