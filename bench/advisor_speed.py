"""How long the advisor takes to answer, as the dashboard calls it: the first recommend() in a process
(imports, accuracy-model fit, every estimate) and a warm recompute after one input changed (the
dashboard recomputes on every change). Prints figures; asserts nothing.

    python bench/advisor_speed.py                      # Llama 2 13B, 8k examples, one RTX 4090
    python bench/advisor_speed.py --repeat 15 --profile

Warm inputs changed, one per call, cycling: the latency goal, the examples, the priority, the
symptoms (what a person changes while reading the matrix). ``--what-if`` off skips the re-ranked
what-would-change scenarios (the dashboard always computes them)."""
from __future__ import annotations

import argparse
import statistics
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-2-13b")
    ap.add_argument("--gpu", default="rtx-4090-24gb")
    ap.add_argument("--examples", type=int, default=8000)
    ap.add_argument("--repeat", type=int, default=12)
    ap.add_argument("--no-what-if", action="store_true")
    ap.add_argument("--profile", action="store_true", help="cProfile one warm call (top 20 by cumulative time)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    from engine import advisor
    base = {"model": a.model, "task": "generation", "examples": a.examples,
            "hardware": {"gpu": a.gpu, "count": 1}, "goals": {"max_latency_ms_per_token": 50}}
    what_if = not a.no_what_if
    advisor.recommend(base, what_if=what_if)
    cold = time.perf_counter() - t0
    changes = [lambda i: {"goals": {"max_latency_ms_per_token": 40 + i}},
               lambda i: {"examples": a.examples + i},
               lambda i: {"goals": {"max_latency_ms_per_token": 50, "priority": ("accuracy", "cost", "balanced")[i % 3]}},
               lambda i: {"symptoms": [("too-slow", "wrong-tone", "too-big")[i % 3]]}]
    times = []
    for i in range(a.repeat):
        sc = {**base, **changes[i % len(changes)](i)}
        t = time.perf_counter()
        advisor.recommend(sc, what_if=what_if)
        times.append(1000 * (time.perf_counter() - t))
    print(f"advisor.recommend, {a.model} on 1x {a.gpu}, {a.examples} examples, what-if {'on' if what_if else 'off'}")
    print(f"  first call in the process (imports, fits, every estimate): {cold:.2f} s")
    print(f"  warm, one input changed ({a.repeat} calls): median {statistics.median(times):.1f} ms, "
          f"min {min(times):.1f} ms, max {max(times):.1f} ms")
    if a.profile:
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        advisor.recommend({**base, "examples": a.examples + 999}, what_if=what_if)
        pr.disable()
        pstats.Stats(pr).sort_stats("cumulative").print_stats(20)


if __name__ == "__main__":
    main()
