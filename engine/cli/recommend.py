"""``python -m engine recommend --scenario F [--measured store|none|ID,ID] [--no-what-if] [--json]``: the
decision matrix (engine.advisor) with the user's measured runs from the run store (engine.runs.evidence)."""
from __future__ import annotations

from engine.advisor import scenario_of
from engine.cli.output import emit
from engine.spec.scenario import parse_scenario


def _run(args) -> int:
    from engine.runs import evidence
    scenario = args.scenario
    if args.measured:
        m = args.measured.strip()
        m = m.lower() if m.lower() in ("store", "none") else [x.strip() for x in m.split(",") if x.strip()]
        scenario = parse_scenario({**scenario_of(args.scenario).to_dict(), "measured": m})
    out = evidence.recommend(scenario, what_if=not args.no_what_if)
    if args.json:
        emit(out)
    else:
        print(format_table(out))
    return 0


def format_table(out: dict) -> str:
    """A plain-text view of the matrix for people at a terminal."""
    flag = ""
    if out.get("meets_goals") is False and out.get("near_miss"):
        flag = " (" + out["near_miss"]["text"] + ")"
    lines = [f"recommended: {out['recommended']}{flag}"]
    rec = next((r for r in out["ranked"] if r["strategy"] == out["recommended"]), None)
    serving = ((rec or {}).get("estimates") or {}).get("serving")
    if serving:                               # the serving configuration the search chose
        lines.append(f"serving: {serving['text']}")
    lines += [f"what would change: {out['what_would_change']['summary']}" if out.get("what_would_change") else "",
              ""]
    lines.append(f"{'#':>2} {'strategy':<22} {'family':<23} {'ok':<3} {'score':>6}  blocked by / top reason")
    for r in out["ranked"]:
        first = ", ".join(r["blocked_by"]) if r["blocked_by"] else (r["why"][0][:70] if r["why"] else "")
        lines.append(f"{r['rank']:>2} {r['strategy']:<22} {r['family']:<23} {'yes' if r['feasible'] else 'no':<3} "
                     f"{r['score']:>6.3f}  {first}")
    lines.append("")
    lines.append("rules fired: " + ", ".join(x["id"] for x in out["rules_fired"]))
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("recommend", help="rank every strategy for a scenario (decision matrix)")
    p.add_argument("--scenario", required=True,
                   help="scenario YAML/JSON file, or a preset id of presets/scenarios/")
    p.add_argument("--no-what-if", action="store_true", help="skip 'what would change the answer' (faster)")
    p.add_argument("--measured", default=None,
                   help="measured accuracy evidence: store (finished runs of the run store, the default), none, "
                        "or run ids separated by commas; overrides the scenario's measured field")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run)
