"""The report of a scenario: what a team lead would forward (HTML or Markdown).

``build(scenario, runs=None, fmt="html")`` returns one self-contained document: the scenario (its
inputs and YAML), the recommendation and why (each reason with its rule id, published source or
the number against its limit), the decision matrix (every strategy), the trade-off charts (the
dashboard's own figures, ``engine.charts``), the finished runs and what they measured, measured
vs estimated (``engine.calibration.pairs``), the assumptions, what would change the answer, and
the commands that reproduce it all. The HTML inlines plotly.js once from the installed plotly
package (no CDN: it opens offline); the Markdown carries the chart data as tables.

One data path, two renderers: ``document()`` makes a list of sections of neutral blocks (text,
tables, lists, code, figures); ``html()`` and ``markdown()`` render them. Every piece of text is
escaped by the renderer, so a scenario name or a run name can never inject markup.

CLI: ``python -m engine report --scenario F [--runs model|all|none|ID,ID] [--format html|md]
[--out FILE] [--json]``.
"""
from __future__ import annotations

import datetime as _dt
import html as _html
import importlib.util
import json
import platform
import re
import subprocess
from pathlib import Path

import yaml

from engine import calibration, charts
from engine.record import RunRecord
from engine.fmt import GB, duration, num, usd
from engine.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("html", "md")
SECTIONS = (("scenario", "The scenario"), ("recommendation", "Recommendation and why"),
            ("comparison", "Baseline, quantize, fine-tune: the comparison"), ("matrix", "Decision matrix"), ("charts", "Trade-off charts"), ("runs", "Runs"),
            ("measured", "Measured vs estimated"), ("assumptions", "Assumptions"),
            ("change", "What would change the answer"), ("reproduce", "How to reproduce"))


# ---- blocks: what a section holds (rendered by html() and markdown()) -----------------------------------

def text(s: str, cls: str = "") -> tuple:
    return ("text", str(s), cls)


def table(headers: list[str], body: list[list], cls: str = "") -> tuple:
    return ("table", [str(h) for h in headers], [["" if c is None else str(c) for c in r] for r in body], cls)


def items(xs: list[str]) -> tuple:
    return ("list", [str(x) for x in xs if x])


def code(s: str, lang: str = "") -> tuple:
    return ("code", str(s), lang)


def sub(s: str) -> tuple:
    return ("h3", str(s))


def figure(key: str, fig: dict) -> tuple:
    return ("figure", key, fig)


# ---- formatting -----------------------------------------------------------------------------------------

def _dur(s) -> str:
    return duration(s, digits=1)


def _when(ts) -> str:
    if not ts:
        return "—"
    return _dt.datetime.fromtimestamp(float(ts), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _value(v, unit: str = "") -> str:
    """A measured or estimated value with its unit, bytes as GB/MB."""
    if v is None:
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if unit == "bytes":
        return f"{v / GB:.3f} GB" if abs(v) >= 0.1 * GB else f"{v / 1e6:.2f} MB"
    return f"{v:,.4g}" + (f" {unit}" if unit and unit not in ("fraction", "ratio") else "")


# ---- what the report shows --------------------------------------------------------------------------

def _versions() -> dict:
    import importlib.metadata as md
    out = {}
    for pkg in ("tunequant", "plotly"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    out["python"] = platform.python_version()
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5)
        out["git"] = rev.stdout.strip() if rev.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        out["git"] = None
    return out


def measured_pairs(run: dict) -> tuple[list[dict], str]:
    """(measured-vs-estimated pairs of a run, a note)."""
    return calibration.pairs(run), ""


def collect(result: dict, runs=(), runs_how: str = "", runs_arg: str = "model", source: str | None = None) -> dict:
    """Everything the report shows: the advisor's answer (``result``, engine.advisor.recommend),
    its rows and charts, the runs (finished run records, picked by the caller: ``runs_how`` says
    how, ``runs_arg`` is the --runs that reproduces the pick) and their pairs."""
    rs = charts.rows(result)
    scn = result["scenario"]
    figs = charts.scenario_charts(rs, scn)
    pipeline = charts.scenario_charts(rs, scn, charts.MEMORY_VIEWS[1])["memory"]
    reco = result.get("recommended")
    rt_sid = charts.runtime_strategy(rs, reco.get("strategy") if isinstance(reco, dict) else reco)
    chosen = list(runs or [])
    pairs = {r["id"]: measured_pairs(r) for r in chosen}
    return {"result": result, "rows": rs, "scenario": scn, "source": source, "runs_arg": runs_arg,
            "figures": {"memory": figs["memory"], "pipeline": pipeline, "latency": figs["latency"],
                        "breakdown": figs["breakdown"], "cost": figs["cost"],
                        # the Trade-offs tab's runtime comparison, for the strategy it shows first
                        "runtimes": charts.strategy_runtimes(rs, scn, rt_sid)},
            "runs": chosen, "runs_how": runs_how, "pairs": pairs, "versions": _versions(),
            "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# ---- the sections ----------------------------------------------------------------------------------

def _scenario_section(d: dict) -> list:
    s, m = d["scenario"], d["result"].get("model") or {}
    g, dep, goals = s.get("hardware") or {}, s.get("deploy") or {}, s.get("goals") or {}
    model = s.get("model")
    model_txt = (f"{model} ({m.get('name', model)}, {float(m.get('total_params') or 0) / 1e9:.2f}B parameters, "
                 f"family {m.get('family')})") if m else str(model)
    body = [[k, s[k]] for k in ("name", "description") if s.get(k)] + [["model", model_txt],
            ["task", s.get("task")], ["labelled examples", f"{int(s.get('examples') or 0):,}"],
            ["sequence length", s.get("seq_len")], ["epochs", s.get("epochs")],
            ["training hardware", f"{g.get('count', 1)} × {g.get('gpu')}"],
            ["serving", f"{dep.get('target')}" + (f" on {dep.get('gpu')}" if dep.get("gpu") else "")]]
    body += [[f"goal: {k}", v] for k, v in goals.items() if v is not None]
    body.append(["symptoms", ", ".join(s.get("symptoms") or []) or "—"])
    return [table(["input", "value"], body, "kv"), text("The scenario file as the advisor read it:"),
            code(yaml.safe_dump({k: v for k, v in s.items() if v not in ("", None, [], {})}, sort_keys=False,
                                allow_unicode=True), "yaml")]


def _recommendation_section(d: dict) -> list:
    res = d["result"]
    reco = res.get("recommended")
    entry = next((e for e in res.get("ranked") or [] if e.get("strategy") == reco), None)
    if entry is None:
        w = res.get("what_would_change") or {}
        return [text("No strategy is feasible on this hardware with these goals.", "verdict"),
                text(w.get("summary") or "")]
    if res.get("meets_goals") is False:
        near = res.get("near_miss") or {}
        w = res.get("what_would_change") or {}
        out = [text(f"No strategy meets every goal. Closest: {entry.get('name')} ({reco}, {entry.get('family')}), "
                    f"score {num(entry.get('score'), '{:.3f}')}: it does NOT meet every goal.", "verdict"),
               text(near.get("text") or "")]
        if (w.get("relaxation") or {}).get("text"):
            out.append(text("What would change the answer: " + w["relaxation"]["text"] + "."))
        out.append(text(entry.get("summary") or "", "muted"))
    else:
        out = [text(f"Recommended: {entry.get('name')} ({reco}, {entry.get('family')}), score "
                    f"{num(entry.get('score'), '{:.3f}')}.", "verdict"), text(entry.get("summary") or "", "muted")]
    reasons = entry.get("reasons") or []
    rules = sorted((r for r in reasons if r.get("kind") == "rule"), key=lambda r: -abs(r.get("delta") or 0))
    if rules:
        out += [sub("Rules that fired for it"),
                table(["rule", "effect on the score", "rationale", "source"],
                      [[r.get("rule"), f"{r.get('delta', 0):+.2f}", r.get("rationale"), r.get("source")]
                       for r in rules])]
    est = [r for r in reasons if r.get("kind") in ("estimate", "constraint")]
    if est:
        out += [sub("Its estimates against the limits and goals"),
                table(["constraint", "", "figure (interval) against the limit"],
                      [[r.get("constraint"), "ok" if r.get("ok") else "blocks", r.get("text")] for r in est])]
    if res.get("rules_fired"):
        out += [sub("Every rule that fired for this scenario"),
                table(["rule", "topic", "rationale", "source"],
                      [[r["id"], r.get("topic"), r.get("rationale"), r.get("source")] for r in res["rules_fired"]])]
    why = [w for w in entry.get("why") or [] if str(w).startswith("score ")]
    if why:
        out.append(text(why[0], "muted"))
    return out


def _comparison_section(d: dict) -> list:
    """The table practitioners draw for a scenario: one row per approach (engine.advisor.compare)."""
    from engine.advisor.compare import comparison
    c = comparison(d["result"])
    body, srcs = [], []
    for r in c["rows"]:
        if not r.get("strategy"):
            body.append([r["approach"], "—", "", "", "", "", "", ""])
            continue
        ok = "yes" if r["feasible"] else "no: " + ", ".join(r["blocked_by"])
        size = (f"{r['weights_bytes'] / GB:.1f} GB weights, {r['serve_device_bytes'] / GB:.1f} GB on {r['serve_device']}"
                if r.get("weights_bytes") else "—")
        lat = (f"{r['ms_per_token']:.0f} ms/token [{num(r['ms_low'], '{:.0f}')}, {num(r['ms_high'], '{:.0f}')}]"
               if r.get("ms_per_token") else "—")
        q = (f"{r['retention']:.3f} [{r['retention_low']:.3f}, {r['retention_high']:.3f}]"
             + (f" ({r['quality_basis']})" if r.get("quality_basis") else "")) if r.get("retention") is not None else "—"
        body.append([r["approach"], f"{r['strategy']} (rank {r['rank']})", ok, size, lat, q,
                     usd(r["serve_usd_per_user_month"]) if r.get("serve_usd_per_user_month") is not None else "—",
                     usd(r["train_usd"]) if r.get("train_usd") else ("none" if r.get("train_usd") == 0 else "—")])
        for what, src in r["sources"].items():
            if src:
                srcs.append(f"{r['approach']} — {what.replace('_', ' ')}: {src}")
    return [text("The approaches practitioners compare, each as the advisor's best-ranked strategy of its family, "
                 "with the figures of the decision matrix. Quality is retention against the 16-bit model of the "
                 "same approach (what quantization costs); what fine-tuning gains on your task is not estimated: "
                 "measure it with a run. Serving cost per user-month at the stated load: " + c["load"]["text"] + "."),
            table(["approach", "strategy", "meets every goal", "size", "latency (serving device)",
                   "quality: retention [80% interval]", "serving USD per user-month", "one-off USD (training + calibration)"], body),
            sub("Where each figure comes from"), items(srcs)]


def _stage_mem(r: dict) -> str:
    parts = []
    for s in r["stages"]:
        if not s["bytes"]:
            continue
        lim = f" / {s['limit'] / GB:.1f}" if s.get("limit") else ""
        ok = "" if s.get("fits") is None else (" ✓" if s["fits"] else " ✗")
        parts.append(f"{s['stage']} {s['bytes'] / GB:.1f}{lim} GB{ok}")
    return "; ".join(parts) or "—"


def matrix_rows(rs: list[dict]) -> list[list]:
    """The decision matrix as table rows (one per strategy, the advisor's order)."""
    out = []
    for r in rs:
        ret = "—" if r["retention"] is None else (
            f"{r['retention']:.3f} [{num(r['ret_low'], '{:.3f}')}, {num(r['ret_high'], '{:.3f}')}]")
        out.append([r["rank"], r["strategy"], r["family"],
                    "yes" if r["feasible"] else "no: " + ", ".join(r["blocked_by"]),
                    num(r["score"], "{:.3f}"), _stage_mem(r), num(r["ms_per_token"], "{:.1f}"), ret,
                    r["acc_from"], r["acc_source"] or r.get("acc_error") or "—", r["calibration"],
                    _dur(r["train_time_s"]) if r["train_time_s"] else "—",
                    usd(r["train_usd"]) if r["train_usd"] else "—", usd(r["serve_usd_mtok"])])
    return out


MATRIX_HEADERS = ["#", "strategy", "family", "feasible", "score", "memory per stage (of the limit)",
                  "ms/token", "retention [interval]", "accuracy from", "accuracy evidence",
                  "memory/speed calibration", "train time", "one-off cost", "serve $/1M tok"]


def _matrix_section(d: dict) -> list:
    rs = d["rows"]
    n_ok = sum(r["feasible"] for r in rs)
    out = [text(f"{len(rs)} strategies, {n_ok} feasible. Memory is GB on the device (training GPU per GPU, "
                f"serving device for serve), ✓/✗ whether it fits; retention is the accuracy kept vs 16-bit with "
                f"its interval; one-off cost is training + calibration."),
           table(MATRIX_HEADERS, matrix_rows(rs), "matrix")]
    blocked = [[r["strategy"], "; ".join(r["why_not"])] for r in rs if r["why_not"]]
    if blocked:
        out += [sub("Why the others are not feasible"), table(["strategy", "what blocks it"], blocked)]
    return out


CHART_TITLES = {"memory": "Serving memory vs accuracy", "pipeline": "Pipeline peak memory vs accuracy",
                "latency": "Latency vs accuracy", "breakdown": "Memory per stage", "cost": "Cost",
                "runtimes": "Serving runtimes compared"}


def runtime_table(fig: dict) -> list:
    """The runtime comparison's bars as one table (runtime, format, ms/token with its interval, device GB,
    fits, what it is): the same numbers the chart draws."""
    data = fig.get("data") or []
    ms = [t for t in data if t.get("type") == "bar" and t.get("xaxis") == "x"]
    gbs = {(t.get("legendgroup"), rt): x for t in data if t.get("type") == "bar" and t.get("xaxis") == "x2"
           for rt, x in zip(t["customdata"], t["x"])}
    body = []
    for t in ms:
        e = t.get("error_x") or {}
        widths = (t.get("marker") or {}).get("line", {}).get("width") or []
        shapes = ((t.get("marker") or {}).get("pattern") or {}).get("shape") or []
        for i, (rt, label, x) in enumerate(zip(t["customdata"], t["y"], t["x"])):
            lo, hi = x - (e.get("arrayminus") or [0] * len(t["x"]))[i], x + (e.get("array") or [0] * len(t["x"]))[i]
            body.append([label, t.get("name"), f"{x:.2f} [{lo:.2f}, {hi:.2f}]",
                         num(gbs.get((t.get("legendgroup"), rt)), "{:.2f}"),
                         "no" if i < len(shapes) and shapes[i] else "yes",
                         "the matrix's runtime" if i < len(widths) and widths[i] > 1 else ""])
    return [table(["runtime · format", "serves", "ms/token [interval]", "device GB", "fits", ""], body)]


def fig_tables(fig: dict) -> list:
    """The data of a chart as tables (the Markdown report's charts)."""
    layout, data = fig.get("layout") or {}, fig.get("data") or []
    notes = [a.get("text") for a in layout.get("annotations") or [] if a.get("text")]
    if not data:
        return [text("(no data: " + "; ".join(notes) + ")")]
    if layout.get("uirevision") == "runtimes":
        return runtime_table(fig) + [text("; ".join(notes))] if notes else runtime_table(fig)
    out = []
    # the strategy points (engine.charts puts each point's strategy id in customdata; text names only some)
    pts = [t for t in data if t.get("type") == "scatter" and t.get("customdata")]
    if pts:
        xt = ((layout.get("xaxis") or {}).get("title") or {}).get("text", "x")
        body = []
        for t in pts:
            e = t.get("error_y") or {}
            for i, s in enumerate(t["customdata"]):
                y = t["y"][i]
                lo = y - e["arrayminus"][i] if e.get("arrayminus") else y
                hi = y + e["array"][i] if e.get("array") else y
                feas = "yes" if (t.get("marker") or {}).get("symbol", ["circle"])[i] == "circle" else "no"
                body.append([s, t.get("name"), feas, num(t["x"][i], "{:.2f}"), f"{y:.3f} [{lo:.3f}, {hi:.3f}]"])
        out.append(table(["strategy", "family", "feasible", xt, "retention [interval]"], body))
    for t in data:
        if t.get("type") == "scatter" and t.get("mode") == "lines":
            out.append(text(f"{t.get('name')}: " + " → ".join(
                f"({num(x, '{:.2f}')}, {y:.3f})" for x, y in zip(t["x"], t["y"]))))
    bars = [t for t in data if t.get("type") == "bar"]
    if bars and bars[0].get("orientation") == "h":
        labels = bars[0]["y"]
        out.append(table(["strategy · stage"] + [t["name"] for t in bars] + ["total"],
                         [[lab] + [f"{t['x'][i]:.2f}" for t in bars] + [f"{sum(t['x'][i] for t in bars):.2f}"]
                          for i, lab in enumerate(labels)]))
    elif bars:
        titles = [a.get("text") for a in layout.get("annotations") or []]
        for j, t in enumerate(bars):
            out.append(table(["strategy", titles[j] if j < len(titles) else t.get("name", "value")],
                             [[x, num(y, "{:,.3f}")] for x, y in zip(t["x"], t["y"])]))
    limits = [a.get("text") for a in layout.get("annotations") or [] if a.get("xref") == "x"]
    if limits:
        out.append(text("Dashed line: " + "; ".join(limits)))
    return out


def _charts_section(d: dict, fmt: str) -> list:
    out = []
    if fmt == "md":
        out.append(text("The HTML report draws these as interactive charts; here is their data."))
    for key, fig in d["figures"].items():
        title = ((fig.get("layout") or {}).get("title") or {}).get("text") or CHART_TITLES[key]
        out += [figure(key, fig)] if fmt == "html" else [sub(title)] + fig_tables(fig)
    return out


def _runs_section(d: dict) -> list:
    out = [text(f"Runs shown: {d['runs_how']}.")]
    if not d["runs"]:
        return out + [text("No finished run to show. Launch one from the dashboard's Runs tab or with "
                           "`python -m engine run --config presets/runs/demo-*.yaml`.", "muted")]
    for run in d["runs"]:
        rec = RunRecord.of(run)
        dur = rec.wall_s
        out += [sub(f"{run['id']} · {run.get('name') or run.get('strategy')}"),
                table(["run", "strategy", "model", "device", "status", "started", "duration"],
                      [[run["id"], run.get("strategy"), run.get("model"), run.get("device"),
                        run.get("status") + (f" ({run['reason']})" if run.get("reason") else ""),
                        _when(run.get("started")), _dur(dur)]])]
        if rec.stages:
            out.append(table(["stage", "duration", "peak memory (measured)", "memory source"],
                             [[s.stage, _dur(s.duration_s), _value(s.peak_mem_bytes, "bytes"), s.mem_source or "—"]
                              for s in rec.stages]))
        if rec.metrics:
            out.append(table(["measured metric", "value"],
                             [[k, _value(m.get("value"), m.get("unit") or "")] for k, m in rec.metrics.items()]))
        v, mach = rec.versions, rec.machine
        if v or mach:
            out.append(text("Measured with " + ", ".join(f"{k} {x}" for k, x in v.items())
                            + (f" on {mach.get('device')} ({mach.get('cpu') or mach.get('gpu') or ''}, "
                               f"{mach.get('cpu_count', '?')} CPUs)" if mach else ""), "muted"))
    return out


def _measured_section(d: dict) -> list:
    if not d["runs"]:
        return [text("No runs, so nothing measured to set against the estimates.")]
    out = []
    for run in d["runs"]:
        pairs, note = d["pairs"][run["id"]]
        out.append(sub(run["id"]))
        if pairs is None:
            out.append(text(note, "muted"))
            continue
        if not pairs:
            out.append(text("This run stored no estimate the planner could set against its measurements.", "muted"))
            continue
        body = []
        for p in pairs:
            err = p.get("error")
            body.append([p.get("stage"), p.get("label") or p.get("term"), _value(p.get("estimated"), p.get("unit") or ""),
                         _value(p.get("measured"), p.get("unit") or ""),
                         "—" if err is None else f"{100 * err:+.1f}%",
                         "yes" if p.get("comparable") else "no", p.get("why") or ""])
        out.append(table(["stage", "term", "estimated", "measured", "error (measured/estimated − 1)",
                          "comparable", "what was compared / why not"], body))
    return out


def _assumptions_section(d: dict) -> list:
    res = d["result"]
    out = list(res.get("assumptions") or [])
    notes = set()
    for e in res.get("ranked") or []:
        for st in (e.get("estimates") or {}).get("stages") or []:
            cal = st.get("calibration")
            if isinstance(cal, dict) and cal.get("note"):
                notes.add(("calibrated by measured runs: " if cal.get("applied") else "not calibrated: ")
                          + str(cal["note"]))
    out += sorted(notes)
    out.append("Memory, latency and cost are the planner's formulas for the reference recipe (docs/estimates.md); "
               "retention comes from the accuracy model fitted to published results (docs/accuracy.md); every "
               "figure in the matrix names its command or evidence, and intervals are shown where it is an estimate.")
    return [items(out)]


def _change_section(d: dict) -> list:
    w = d["result"].get("what_would_change")
    if not w:
        return [text("Not computed for this report.")]
    out = [text(w.get("summary") or "")]
    lst = [a.get("text") for a in w.get("alternatives") or []]
    if w.get("runner_up"):
        lst.append(w["runner_up"].get("text"))
    if w.get("tightest"):
        t = w["tightest"]
        lst.append(f"tightest limit of the recommendation: {t.get('constraint')} "
                   f"({100 * float(t.get('used') or 0):.0f}% used): {t.get('text', '')}")
    return out + [items(lst)]


def _reproduce_section(d: dict) -> list:
    f = d["source"] or "scenario.yaml"
    out = []
    if not d["source"]:
        out.append(text("Save the YAML of 'The scenario' above as scenario.yaml, then:"))
    cmds = [f"python -m engine recommend --scenario {f} --json",
            f"python -m engine report --scenario {f} --runs {d['runs_arg']} --format html --out report.html"]
    reco = next((r for r in d["rows"] if r["strategy"] == d["result"].get("recommended")), None)
    if reco:
        cmds += [s["source"] for s in reco["stages"] if s["source"].startswith("python -m engine")]
    cmds += [f"python -m engine runs show {r['id']} --json" for r in d["runs"]]
    out.append(code("\n".join(cmds), "sh"))
    for r in d["runs"][:5]:
        if r.get("spec"):
            out += [text(f"Run {r['id']} again: save its config as run.yaml and run "
                         f"`python -m engine run --config run.yaml --json`:"),
                    code(yaml.safe_dump(r["spec"], sort_keys=False, allow_unicode=True), "yaml")]
    return out


def document(d: dict, fmt: str = "html") -> list[tuple[str, str, list]]:
    """[(section id, title, blocks)] in the order of SECTIONS."""
    make = {"scenario": _scenario_section, "recommendation": _recommendation_section,
            "comparison": _comparison_section, "matrix": _matrix_section,
            "charts": lambda d: _charts_section(d, fmt), "runs": _runs_section, "measured": _measured_section,
            "assumptions": _assumptions_section, "change": _change_section, "reproduce": _reproduce_section}
    return [(sid, title, make[sid](d)) for sid, title in SECTIONS]


def title(d: dict) -> str:
    s = d["scenario"]
    return f"tunequant report: {s.get('name') or ', '.join(str(x) for x in (s.get('model'), s.get('task')) if x)}"


# ---- renderers --------------------------------------------------------------------------------------

CSS = """
body{font-family:Inter,ui-sans-serif,system-ui,-apple-system,'Segoe UI',sans-serif;color:#1f2937;max-width:1400px;
margin:0 auto;padding:24px 32px;line-height:1.45;font-size:14px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;border-bottom:2px solid #e5e7eb;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:12.5px}th,td{border:1px solid #e5e7eb;padding:4px 7px;
text-align:left;vertical-align:top}th{background:#f3f4f6}table.kv td:first-child{font-weight:600;white-space:nowrap}
table.matrix td:nth-child(10){font-size:11px;color:#6b7280;min-width:260px;max-width:520px}
table.matrix tr.reco td{background:#e0e7ff;font-weight:600}table.matrix tr.infeasible td{color:#9ca3af}
pre{background:#f9fafb;border:1px solid #e5e7eb;padding:10px;overflow-x:auto;font-size:12px;white-space:pre-wrap;
overflow-wrap:anywhere}
.meta,.muted{color:#6b7280}.verdict{font-size:16px;font-weight:600}nav a{margin-right:12px}
.chart{width:100%;min-height:380px;border:1px solid #f3f4f6;margin-bottom:8px}
"""


def _plotly_js() -> str:
    """plotly.min.js from the installed plotly package (inlined once: the report opens offline)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("format: the HTML report needs the plotly package (its plotly.min.js); use --format md")
    return (Path(list(spec.submodule_search_locations)[0]) / "package_data" / "plotly.min.js").read_text(
        encoding="utf-8")


def _script_json(obj) -> str:
    """JSON safe inside a <script> element (no '</' can end it early)."""
    s = obj.to_json() if hasattr(obj, "to_json") else json.dumps(obj, default=str)
    return s.replace("</", "<\\/").replace("<!--", "<\\!--")


def html(d: dict) -> str:
    e = _html.escape
    v = d["versions"]
    doc = document(d, "html")
    reco = d["result"].get("recommended")
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           f"<title>{e(title(d))}</title><style>{CSS}</style>",
           f"<script>{_plotly_js()}</script></head><body>",
           f"<h1>{e(title(d))}</h1>",
           f"<div class='meta'>Generated {e(d['generated'])} · tunequant {e(v['tunequant'])}"
           + (f" (git {e(v['git'])})" if v.get("git") else "")
           + f" · python {e(v['python'])} · plotly {e(v['plotly'])}</div>",
           "<nav>" + "".join(f"<a href='#{sid}'>{e(t)}</a>" for sid, t, _ in doc) + "</nav>"]
    n_fig = 0
    for sid, t, blocks in doc:
        out.append(f"<section id='{sid}'><h2>{e(t)}</h2>")
        for b in blocks:
            kind = b[0]
            if kind == "text":
                out.append(f"<p class='{e(b[2])}'>{e(b[1])}</p>" if b[2] else f"<p>{e(b[1])}</p>")
            elif kind == "h3":
                out.append(f"<h3>{e(b[1])}</h3>")
            elif kind == "list":
                out.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b[1]) + "</ul>")
            elif kind == "code":
                out.append(f"<pre><code>{e(b[1])}</code></pre>")
            elif kind == "table":
                headers, body, cls = b[1], b[2], b[3]
                trs = []
                for r in body:
                    rcls = ""
                    if cls == "matrix":
                        rcls = " class='reco'" if r[1] == reco else (" class='infeasible'" if r[3] != "yes" else "")
                    trs.append(f"<tr{rcls}>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
                out.append(f"<table class='{e(cls)}'><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers)
                           + "</tr></thead><tbody>" + "".join(trs) + "</tbody></table>")
            elif kind == "figure":
                n_fig += 1
                fid = f"chart-{b[1]}"
                out.append(f"<div class='chart' id='{fid}'></div><script>Plotly.newPlot('{fid}', "
                           f"{_script_json(b[2]['data'])}, {_script_json(b[2]['layout'])}, "
                           "{responsive: true, displaylogo: false});</script>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def _md_cell(c: str) -> str:
    """Text for a Markdown line or table cell: pipes escaped, one line, no tag can open ('<=' stays)."""
    s = str(c).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", s)


def markdown(d: dict) -> str:
    v = d["versions"]
    doc = document(d, "md")
    out = [f"# {_md_cell(title(d))}", "",
           f"Generated {d['generated']} · tunequant {v['tunequant']}" + (f" (git {v['git']})" if v.get("git") else "")
           + f" · python {v['python']}", ""]
    for sid, t, blocks in doc:
        out += [f"## {t}", ""]
        for b in blocks:
            kind = b[0]
            if kind == "text":
                out += [_md_cell(b[1]), ""]
            elif kind == "h3":
                out += [f"### {_md_cell(b[1])}", ""]
            elif kind == "list":
                out += [f"- {_md_cell(x)}" for x in b[1]] + [""]
            elif kind == "code":
                fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", b[1])), default=0))
                out += [f"{fence}{b[2]}", b[1].rstrip("\n"), fence, ""]
            elif kind == "table":
                out += ["| " + " | ".join(_md_cell(h) for h in b[1]) + " |",
                        "|" + "---|" * len(b[1])]
                out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in b[2]] + [""]
    return "\n".join(out)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InputError(f"format: unknown {fmt!r}; use one of {', '.join(FORMATS)}", field="format")


def render(d: dict, fmt: str = "html") -> str:
    """The collected report (``collect``) as HTML or Markdown."""
    check_format(fmt)
    return html(d) if fmt == "html" else markdown(d)


def build(result: dict, runs=(), runs_how: str = "", runs_arg: str = "model", source: str | None = None,
          fmt: str = "html") -> str:
    """The report of the advisor's answer for a scenario (``result``) and the runs shown, as HTML
    or Markdown (engine.runs.evidence.report picks the runs from the store)."""
    check_format(fmt)
    return render(collect(result, runs, runs_how, runs_arg, source), fmt)
