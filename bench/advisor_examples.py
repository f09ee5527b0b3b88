"""The worked examples of docs/advisor.md, generated from the advisor's answers for the preset scenarios
(presets/scenarios/*.yaml), so the doc can be regenerated when the planner's figures move.

    python bench/advisor_examples.py            # prints the blocks
    python bench/advisor_examples.py --write    # rewrites them in docs/advisor.md
    python bench/advisor_examples.py --check    # exit 1 when the doc differs (tests/test_docs_examples.py)

Each scenario's block sits between ``<!-- example:ID -->`` and ``<!-- /example:ID -->`` in the doc;
prose outside the markers is kept as written. Measured runs are not used (``runs=[]``) and neither is a
fitted calibration (TUNEQUANT_CALIBRATION=off): the figures are the planner's formulas, the same on
every machine."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "advisor.md"
SHOWN_FEASIBLE, SHOWN_BLOCKED = 3, 3


def _gb(b):
    return f"{b / 1e9:.1f}" if b else "-"


def _scenario_line(sc, arch) -> str:
    g = sc.goals
    goals = [f"{k} {getattr(g, k)}" for k in ("max_latency_ms_per_token", "min_accuracy_retention")
             if getattr(g, k) is not None]
    goals.append(f"priority {g.priority}")
    if g.target_weight_bits is not None:
        goals.append(f"target_weight_bits {g.target_weight_bits}")
    serve = (f"serving on {sc.deploy.target} `{sc.deploy.gpu}`" if sc.deploy.gpu else f"serving on {sc.deploy.target}")
    rt = sc.deploy.runtime
    serve += (f" with {rt}" if isinstance(rt, str) else f" (runtimes searched: {', '.join(rt)})" if rt
              else " (runtime searched)")
    model = sc.model if isinstance(sc.model, str) else arch.name
    return (f"Model `{model}` ({arch.total_params / 1e9:.1f}B), task {sc.task}, {sc.examples:,} examples, training on "
            f"{sc.hardware.count}x {sc.hardware.gpu}, {serve}; goals: {', '.join(goals)}"
            + (f"; symptoms: {', '.join(sc.symptoms)}" if sc.symptoms else "") + ".")


def _row(r) -> str:
    e = r["estimates"]
    serve = next((s for s in e["stages"] if s["stage"] == "serve"), {})
    acc = e["accuracy"]
    ret = (f"{acc['retention']:.3f} [{acc.get('low', acc['retention']):.3f}, {acc.get('high', acc['retention']):.3f}]"
           if acc.get("retention") is not None else "-")
    ms = e.get("latency_ms_per_token")
    sv = e.get("serving") or {}
    batch = sv.get("max_batch_within_goal")
    return (f"| {r['rank']} | `{r['strategy']}` | {'yes' if r['feasible'] else 'no'} | {r['score']:.3f} | "
            f"{_gb(e.get('train_device_bytes'))} | {_gb(e.get('serve_device_bytes'))} | {serve.get('runtime') or '-'} | "
            f"{f'{ms:.0f}' if ms else '-'} | {batch if batch is not None else '-'} | {ret} | "
            f"{', '.join(r['blocked_by']) or '-'} |")


def block(scenario_id: str) -> str:
    """The generated Markdown of one preset scenario (without the markers)."""
    from engine.advisor import recommend
    from engine.spec.scenario import load_scenario
    path = ROOT / "presets" / "scenarios" / f"{scenario_id}.yaml"
    sc = load_scenario(path)
    out = recommend(sc, runs=[])
    arch = sc.arch()
    rows = out["ranked"]
    shown = [r for r in rows if r["feasible"]][:SHOWN_FEASIBLE] + [r for r in rows if not r["feasible"]][:SHOWN_BLOCKED]
    shown.sort(key=lambda r: r["rank"])
    rec = next(r for r in rows if r["strategy"] == out["recommended"]) if out["recommended"] else None
    lines = [f"### {sc.name or scenario_id} (`presets/scenarios/{scenario_id}.yaml`)", ""]
    lines.append(((sc.description or "").strip() + " " if sc.description else "") + _scenario_line(sc, arch))
    lines.append("")
    if rec is None:
        lines.append("**No recommendation**: every strategy has a format or deployment mismatch.")
    else:
        flag = "" if out["meets_goals"] else " (does NOT meet every goal: the closest)"
        lines.append(f"**Recommended: `{rec['strategy']}`**{flag}. Rules fired: "
                     + ", ".join(f"`{f['id']}`" for f in out["rules_fired"]) + ".")
        sv = rec["estimates"].get("serving")
        if sv:
            lines += ["", f"Serving: {sv['text']}" + ("" if sv.get("why") == "given" else f"; {sv['why']}") + "."]
    lines += ["", "| # | strategy | feasible | score | train GB/GPU | serve GB | runtime | ms/token | batch in goal | "
                  "retention [interval] | blocked by |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in shown]
    lines += ["", f"What would change the answer: {out['what_would_change']['summary']}"]
    return "\n".join(lines)


def scenario_ids() -> list[str]:
    from engine.spec.scenario import preset_ids
    return preset_ids()


def render(doc: str, blocks: dict[str, str]) -> str:
    """The doc with each marked block replaced; a scenario without markers is an error."""
    for sid, text in blocks.items():
        pat = re.compile(rf"(<!-- example:{re.escape(sid)} -->\n)(?:.*?\n)?(<!-- /example:{re.escape(sid)} -->)", re.S)
        if not pat.search(doc):
            raise SystemExit(f"docs/advisor.md has no <!-- example:{sid} --> ... <!-- /example:{sid} --> block")
        doc = pat.sub(lambda m: m.group(1) + text + "\n" + m.group(2), doc)
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="rewrite the blocks in docs/advisor.md")
    ap.add_argument("--check", action="store_true", help="exit 1 when docs/advisor.md differs")
    a = ap.parse_args(argv)
    os.environ["TUNEQUANT_CALIBRATION"] = "off"          # the formulas' figures, not this machine's fit
    blocks = {sid: block(sid) for sid in scenario_ids()}
    if not (a.write or a.check):
        print("\n\n".join(blocks.values()))
        return 0
    doc = DOC.read_text()
    new = render(doc, blocks)
    if a.write:
        DOC.write_text(new)
        print(f"docs/advisor.md: {len(blocks)} worked examples {'rewritten' if new != doc else 'unchanged'}")
    elif a.check:
        if new != doc:
            print("docs/advisor.md's worked examples differ from the advisor's answers; regenerate them with "
                  "python bench/advisor_examples.py --write", file=sys.stderr)
            return 1
        print("docs/advisor.md's worked examples are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
