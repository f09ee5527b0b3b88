"""Leave-one-source-out error of the accuracy model (engine/estimate/accuracy.py).

    .venv/bin/python bench/accuracy_loso.py [--by-source]

For each source (one row of the CSV's `source` column: a paper table or a README), the model
is fitted on every other source and predicts that source's usable rows. Errors:
  ppl rows      |ln(predicted ppl ratio) - ln(published ppl ratio)|
  accuracy rows |predicted retention - published retention|   (zero-shot, MMLU; own chance level)
and how often the published value falls inside the predicted 80% interval. A bits-only model
(intercept + effective bits + collapse) is fitted the same way for comparison. Prints a
table; never passes or fails.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.estimate import accuracy as A  # noqa: E402

BITS_ONLY = ("intercept", "bits", "collapse")


def quantile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def loso(rows, terms=None):
    """-> {source: {"ppl": [(err, inside)], "acc": [(err, inside)]}}"""
    used = [r for r in rows if not r.excluded]
    out = {}
    for src in sorted({r.source for r in used}):
        model = A.fit([r for r in used if r.source != src], terms=terms)
        res = {"ppl": [], "acc": []}
        for r in used:
            if r.source != src:
                continue
            point, low, high = A.predict_row(model, r)
            if r.metric_class == "ppl":
                res["ppl"].append((abs(math.log(point) - math.log(r.ratio)), low <= r.ratio <= high))
            else:
                res["acc"].append((abs(point - r.ratio), low <= r.ratio <= high))
        out[src] = res
    return out


def summary(out):
    ppl = [e for v in out.values() for e in v["ppl"]]
    acc = [e for v in out.values() for e in v["acc"]]
    def stats(xs):
        errs = [e for e, _ in xs]
        return (len(xs), quantile(errs, 0.5), quantile(errs, 0.9), sum(i for _, i in xs) / max(len(xs), 1))
    return stats(ppl), stats(acc)


def main(argv):
    rows = A.load_evidence()
    t = time.time()
    full = loso(rows)
    dt = time.time() - t
    base = loso(rows, terms=BITS_ONLY)
    print(f"rows: {len(rows)} published, {sum(not r.excluded for r in rows)} used, "
          f"{sum(bool(r.excluded) for r in rows)} excluded; {len(full)} sources; LOSO took {dt:.1f}s\n")
    print("| model | ppl rows | median abs ln(ppl ratio) err | p90 | in 80% interval | acc rows |"
          " median abs retention err | p90 | in 80% interval |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, out in (("full model", full), ("bits-only (intercept + bits + collapse)", base)):
        (np_, m1, p1, c1), (na, m2, p2, c2) = summary(out)
        print(f"| {name} | {np_} | {m1:.3f} | {p1:.3f} | {c1:.0%} | {na} | {m2:.4f} | {p2:.4f} | {c2:.0%} |")
    if "--by-source" in argv:
        print("\n| held-out source | ppl rows | median ln err | acc rows | median retention err |")
        print("|---|---|---|---|---|")
        for src, v in full.items():
            pe = [e for e, _ in v["ppl"]]
            ae = [e for e, _ in v["acc"]]
            print(f"| {src[:90]} | {len(pe)} | {quantile(pe, 0.5):.3f} | {len(ae)} | {quantile(ae, 0.5):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
