"""Screen 4, runs: launch a strategy, watch it live, stop it, find it again after a reload.

No generator owns a run: ``engine.runs.api.launch`` starts a worker process and returns its
id; the page polls ``events(run_id, after_seq)`` with a ``gr.Timer`` and folds what arrives
into a small view state (``apply_events``). A reload (or a second browser) starts from seq 0
and rebuilds the same view, so nothing is lost and nothing is tied to the tab.

The launch form builds one dict (``spec_from_form``); the YAML preview shows that dict and
``launch`` passes that same dict to the engine.
"""
from __future__ import annotations

import html
import os
import time
from pathlib import Path

import yaml

from engine import strategies
from engine.errors import InputError
from engine.presets import PRESETS_DIR
from engine.record import EventFold, payload
from engine.spec.run import RunSpec
from engine import demo_presets
from engine.runs import api
from engine.runs.distributed import launch_plan
from ui.common import confine, duration, error_md, gb, ok_md, public_demo, redact, user_model

ACTIVE = ("queued", "running")
LOG_TAIL = 200            # log lines kept in the view
MAX_POINTS = 5000         # loss points kept in the view
DEVICES = ("cpu", "auto", "cuda")
BITS_CHOICES = ("catalog default", "2", "3", "4", "8")
LAUNCH_FIELDS = ("run_preset", "name", "strategy", "model", "data_demo", "data_path", "device",
                 "steps", "learning_rate", "batch_size", "seq_len", "lora_rank", "bits", "group_size",
                 "calibration_samples", "eval_examples", "train_config")


# ---- run presets and the launch form ----------------------------------------------------------

def demo_choices() -> tuple[list[str], list[str]]:
    """(demo model refs, demo dataset ids) the project builds itself (engine.runs.demo)."""
    models = [f"{demo_presets.PREFIX}{m}" for m in demo_presets.models()]
    data = list(demo_presets.datasets())
    return models, data


def default_form() -> dict:
    """The launch form before anything is chosen: the first run preset, else a CPU demo."""
    presets = run_presets()
    if presets:
        first = "demo-qlora" if "demo-qlora" in presets else next(iter(presets))
        return {"run_preset": first, **form_from_spec(load_run_preset(first))}
    models, data = demo_choices()
    return {"run_preset": "", "name": "", "strategy": "qlora", "model": models[0] if models else "",
            "data_demo": data[0] if data else "", "data_path": "", "device": "cpu", "bits": "catalog default"}


def run_presets() -> dict[str, Path]:
    """presets/runs/*.yaml by id (demo-* first: they run on a CPU)."""
    d = PRESETS_DIR / "runs"
    files = sorted(d.glob("*.yaml")) if d.is_dir() else []
    files.sort(key=lambda p: (not p.stem.startswith("demo-"), p.stem))
    return {p.stem: p for p in files}


def load_run_preset(name: str) -> dict:
    presets = run_presets()
    if name not in presets:
        raise InputError(f"unknown run preset {name!r}; known: {', '.join(presets) or '(none yet)'}",
                         field="run_preset")
    return yaml.safe_load(presets[name].read_text(encoding="utf-8")) or {}


def form_from_spec(spec: dict) -> dict:
    """Launch-form values for a run config dict (a preset or a strategy picked in the matrix)."""
    data = spec.get("dataset") or {}
    train = spec.get("train") or {}
    quant = spec.get("quantize") or {}
    ev = spec.get("evaluate") or {}
    return {
        "name": spec.get("name", ""), "strategy": spec.get("strategy"), "model": spec.get("model", ""),
        "data_demo": data.get("demo") or "", "data_path": data.get("path") or "",
        "device": spec.get("device", "auto"),
        "steps": train.get("steps"), "learning_rate": train.get("learning_rate"),
        "batch_size": train.get("batch_size"), "seq_len": train.get("seq_len"),
        "lora_rank": train.get("lora_rank"),
        "bits": str(quant["bits"]) if quant.get("bits") else "catalog default",
        "group_size": quant.get("group_size"), "calibration_samples": quant.get("calibration_samples"),
        "eval_examples": ev.get("max_examples"),
        "train_config": "",
    }


def _opt_num(v, kind=int):
    """A number field of the form; empty or 0 means "keep the preset's / the default value"."""
    if v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, (int, float)) and v == 0):
        return None
    try:
        return kind(float(v)) if kind is int else kind(v)
    except (TypeError, ValueError):
        return v   # RunSpec names the field and the type


def spec_from_form(form: dict) -> dict:
    """The run config dict the form describes, validated by RunSpec (InputError names the field).

    Starts from the chosen preset (keeps the sections the form does not show) and applies
    the form's values. The result is exactly what ``launch`` hands to the engine.
    """
    preset = form.get("run_preset")
    spec = load_run_preset(preset) if preset and preset in run_presets() else {}
    spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in spec.items()}
    if form.get("name"):
        spec["name"] = str(form["name"]).strip()
    if form.get("strategy"):
        spec["strategy"] = form["strategy"]
    if form.get("model"):
        spec["model"] = str(form["model"]).strip()
    if form.get("device"):
        spec["device"] = form["device"]
    if public_demo() and spec.get("device", "auto") != "cpu":
        if spec.get("device") == "cuda":
            raise InputError("public demo: launching GPU runs is off here; set device to cpu "
                             "(run the app yourself to use a GPU)", field="device")
        spec["device"] = "cpu"                # "auto" would take a GPU if the host has one
    data = dict(spec.get("dataset") or {})
    if form.get("data_path"):
        data.pop("demo", None)
        data["path"] = str(confine(form["data_path"], "dataset.path"))
    elif form.get("data_demo"):
        data.pop("path", None)
        data["demo"] = str(form["data_demo"]).strip()
    if data:
        spec["dataset"] = data
    shown = field_visibility(spec.get("strategy"))     # a field the strategy's stages never read is ignored
    train = dict(spec.get("train") or {})
    extra = form.get("train_config")
    if extra:                                 # the advisor's training configuration of a matrix row
        try:
            extra = yaml.safe_load(extra) if isinstance(extra, str) else extra
        except yaml.YAMLError as e:
            raise InputError(f"train_config is not valid YAML: {e}", field="train_config")
        if not isinstance(extra, dict):
            raise InputError("train_config must be a mapping of train settings", field="train_config")
        train.update(extra)
    for key, kind in (("steps", int), ("learning_rate", float), ("batch_size", int), ("seq_len", int),
                      ("lora_rank", int)):
        if not shown.get(key, True):
            continue
        v = _opt_num(form.get(key), kind)
        if v is not None:
            train[key] = v
    if train:
        spec["train"] = train
    quant = dict(spec.get("quantize") or {})
    bits = form.get("bits") if shown["bits"] else None
    if bits and bits != "catalog default":
        quant["bits"] = _opt_num(bits)
    for key in ("group_size", "calibration_samples"):
        if not shown[key]:
            continue
        v = _opt_num(form.get(key))
        if v is not None:
            quant[key] = v
    if quant:
        spec["quantize"] = quant
    n_eval = _opt_num(form.get("eval_examples"))
    if n_eval is not None:
        spec["evaluate"] = {**(spec.get("evaluate") or {}), "max_examples": n_eval}
    if not spec.get("model"):
        raise InputError("model is required: a demo model (e.g. from a demo preset), a preset id, "
                         "a hub id or a model folder in the workspace", field="model")
    if not spec.get("strategy"):
        raise InputError(f"strategy is required; one of {', '.join(strategies.ids())}", field="strategy")
    strategies.get(spec["strategy"])          # unknown ids list the known ones
    spec["model"] = user_model(spec["model"], "model")     # any path resolves inside the workspace
    RunSpec.parse(spec)                       # every field checked; the message names the bad one
    return spec


def check_allowed(spec: dict) -> None:
    """Public demo mode: CPU runs of the project's demo model only (no GPU, no hub downloads)."""
    if not public_demo():
        return
    if spec.get("device") != "cpu":
        raise InputError("public demo: launching GPU runs is off here; set device to cpu "
                         "(run the app yourself to use a GPU)", field="device")
    if not str(spec.get("model", "")).startswith("demo:"):
        raise InputError("public demo: only the project's demo models run here (a demo-* preset); "
                         "run the app yourself for other models", field="model")
    if any(r.get("status") in ACTIVE for r in api.list_runs()):
        raise InputError("public demo: one run at a time; wait for the current run or stop it", field="launch")


def spec_preview(form: dict) -> tuple[str, str]:
    """(YAML of the run config, inline message) for the form as it is now."""
    try:
        spec = spec_from_form(form)
    except InputError as e:
        return "", error_md(e)
    msg = ""
    try:
        check_allowed(spec)
    except InputError as e:
        msg = error_md(e)
    addr = ray_address()
    if addr:
        msg += ok_md(f"runs as a job on the Ray cluster at <code>{html.escape(addr)}</code> "
                     "(TUNEQUANT_RAY_ADDRESS); its events stream back here")
    plan = launch_plan(RunSpec.parse(spec))
    if plan:                                  # several processes: the exact launcher command the worker runs
        msg += ok_md(html.escape(f"train stage in {plan['processes']} processes ({plan['backend']}, "
                                 f"{plan['sharding']}): ") + f"<code>{html.escape(plan['command'])}</code>")
    return yaml.safe_dump(spec, sort_keys=False, default_flow_style=False), msg


def ray_address() -> str | None:
    """The Runs screen's executor setting: TUNEQUANT_RAY_ADDRESS (a Ray cluster's dashboard URL or
    ray:// address) sends every launch there as a Ray job; unset, runs start on this machine."""
    import os
    return os.environ.get("TUNEQUANT_RAY_ADDRESS", "").strip() or None


# who launched each run from this app (a browser session): in the public demo only that session,
# or someone holding TUNEQUANT_ADMIN_TOKEN, may stop it
_OWNERS: dict[str, str] = {}
ADMIN_HEADER = "x-tunequant-admin"


def launch(form: dict, owner: str | None = None) -> tuple[str | None, str]:
    """Start the run the form describes: (run id or None, inline message). ``owner``: the
    launching session (Gradio's session hash), the one that may stop it in the public demo."""
    try:
        spec = spec_from_form(form)
        check_allowed(spec)
        addr = ray_address()
        run_id = api.launch(spec, executor_kind="ray" if addr else None, address=addr)
        if owner:
            _OWNERS[run_id] = owner
    except InputError as e:
        return None, error_md(e)
    except Exception as e:  # the engine refused for another reason: say it inline
        return None, error_md(f"launch failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
    return run_id, ok_md(f"launched run <code>{html.escape(str(run_id))}</code>: live progress below; "
                         f"it keeps running if you close the tab (this page's URL re-attaches).")


def is_admin(token: str | None) -> bool:
    """``token`` equals TUNEQUANT_ADMIN_TOKEN (unset: nobody is admin)."""
    import hmac
    want = os.environ.get("TUNEQUANT_ADMIN_TOKEN") or ""
    return bool(want) and bool(token) and hmac.compare_digest(str(token), want)


def may_stop(run_id: str, session: str | None, admin_token: str | None = None) -> bool:
    """Outside the public demo anyone at the app may stop any run (it is the operator's own app);
    in the public demo only the session that launched the run, or the admin token."""
    if not public_demo() or is_admin(admin_token):
        return True
    return bool(session) and _OWNERS.get(run_id) == session


def stop(run_id: str | None, session: str | None = None, admin_token: str | None = None) -> str:
    if not run_id:
        return error_md("no run selected")
    if not may_stop(run_id, session, admin_token):
        return error_md(f"public demo: run {run_id} was launched by another visitor; only the page that "
                        f"launched it (or the operator, with the admin token) can stop it")
    try:
        api.stop(run_id)
    except InputError as e:
        return error_md(e)
    except Exception as e:
        return error_md(f"stop failed: {type(e).__name__}: {str(e)[:200]}")
    return ok_md(f"stop requested for <code>{html.escape(run_id)}</code>: the worker saves what it can, "
                 f"then ends; status turns <b>stopped</b>.")


# ---- the live view: events folded into a small state ------------------------------------------

def new_view(run_id: str | None) -> dict:
    """A view of a run: the fold of its events so far (engine.record.EventFold) plus the log lines
    shown and a version the page redraws on."""
    return {"run_id": run_id, "log": [], "version": 0,
            **EventFold(max_points=MAX_POINTS, max_logs=LOG_TAIL).to_dict()}


def apply_events(view: dict, events: list[dict]) -> dict:
    """Fold new events (seq > view['seq']) into the view (engine.record's fold); returns a new dict."""
    from engine.runs.events import line as event_line
    f = EventFold.from_dict(view)
    log = list(view.get("log") or [])
    for ev in events:
        if not f.add(ev):
            continue                                     # already seen (re-delivery is harmless)
        p = payload(ev)
        flat = {"type": ev["type"], "ts": ev.get("ts"), "seq": ev["seq"], **p}
        if ev["type"] != "step":
            log.append(redact(event_line(flat)))
        elif ev["seq"] % 10 == 0 or (p.get("total") and p.get("step") == p.get("total")):
            log.append(redact(event_line(flat)))   # one step line in ten: the curve shows the rest
    v = {**view, **f.to_dict(), "log": log[-LOG_TAIL:]}
    if events:
        v["version"] = view.get("version", 0) + 1
    return v


def attach(run_id: str | None) -> dict:
    """A fresh view of a run, rebuilt from all its events (what a reload does)."""
    view = new_view(run_id)
    return poll_view(view)[0] if run_id else view


def poll_view(view: dict) -> tuple[dict, dict | None]:
    """New events for the view's run: (updated view, the run record or None)."""
    run_id = view.get("run_id")
    if not run_id:
        return view, None
    run = api.get_run(run_id)
    if run is None:
        return {**view, "status": "unknown"}, None
    view = apply_events(view, api.events(run_id, after_seq=view.get("seq", 0)))
    if view.get("status") != run.get("status"):
        view = {**view, "status": run.get("status"), "reason": run.get("reason") or view.get("reason"),
                "version": view.get("version", 0) + 1}
    return view, run


# ---- rendering ---------------------------------------------------------------------------------

STATUS_COLORS = {"queued": "#6b7280", "running": "#2563eb", "finished": "#15803d", "failed": "#b91c1c",
                 "stopped": "#b45309", "interrupted": "#7c3aed"}


def status_html(view: dict, run: dict | None) -> str:
    """Run header: status, stage k/n, step, loss, tokens/s, memory, ETA, elapsed; the reason when it ended."""
    if not view.get("run_id"):
        return "<div class='tq-muted'>No run attached. Launch one above or pick one from the history.</div>"
    if run is None:
        return error_md(f"run {view['run_id']} not found in the run store")
    st = view.get("status") or run.get("status") or "?"
    color = STATUS_COLORS.get(st, "#374151")
    s = view.get("last_step") or {}
    stage = view.get("stage")
    idx, tot = view.get("stage_index"), view.get("stage_total")
    prep = view.get("prepare") or {}
    if stage is None and prep.get("what") and not prep.get("done") and st in ACTIVE:
        stage_txt = "preparing" + (f" ({prep.get('step')}/{prep['total']})" if prep.get("total") else "")
    else:
        stage_txt = f"{stage} ({idx + 1}/{tot})" if stage is not None and idx is not None and tot else (stage or "—")
    step_txt = f"{s.get('step')}/{s.get('total')}" if s.get("total") else (str(s.get("step")) if s else "—")
    started = run.get("started") or view.get("started_ts")
    ended = run.get("ended") or view.get("ended_ts")
    elapsed = (ended or time.time()) - started if started else None
    # the last measured loss and speed stay once their stage is over (evaluate has no steps)
    points = view.get("points") or []
    loss = s.get("loss") if isinstance(s.get("loss"), (int, float)) else (points[-1][1] if points else None)
    tps = s.get("tokens_per_s") if isinstance(s.get("tokens_per_s"), (int, float)) else view.get("last_tokens_per_s")
    last = "" if s else " (last)"
    cells = [("stage", stage_txt), ("step", step_txt),
             ("loss" + (last if loss is not None else ""), f"{loss:.4f}" if isinstance(loss, (int, float)) else "—"),
             ("tokens/s" + (last if tps is not None else ""), f"{tps:,.0f}" if isinstance(tps, (int, float)) else "—"),
             ("memory", gb(s.get("mem_bytes"), 2) if s.get("mem_bytes") is not None else "—"),
             ("ETA", duration(s.get("eta_s")) if st == "running" and s.get("eta_s") is not None else "—")]
    grid = "".join(f"<div class='tq-kv'><span>{k}</span><b>{html.escape(str(v))}</b></div>" for k, v in cells)
    # elapsed: counted on in the browser while the run is active (ui.theme.CLIENT_JS), not only on events
    live = f" data-start='{started:.3f}'" if started and not ended and st in ACTIVE else ""
    grid += (f"<div class='tq-kv'><span>elapsed</span><b class='tq-elapsed'{live}>"
             f"{html.escape(duration(elapsed) if elapsed is not None else '—')}</b></div>")
    reason = view.get("reason") or run.get("reason")
    reason_html = f"<div class='tq-reason'>{html.escape(redact(str(reason)))}</div>" if reason and st != "finished" else ""
    title = (f"<code>{html.escape(view['run_id'])}</code> · {html.escape(run.get('name') or '')} · "
             f"{html.escape(run.get('strategy', ''))} on {html.escape(run.get('model', ''))} · "
             f"{html.escape(run.get('device') or '')}")
    return (f"<div class='tq-run'><div class='tq-run-title'><span class='tq-badge' data-status='{st}' "
            f"style='background:{color}'>{st}</span> {title}</div><div class='tq-grid'>{grid}</div>{reason_html}"
            f"{stages_html(view, run)}</div>")


def stages_html(view: dict, run: dict) -> str:
    """The strategy's stages with what each measured (duration, peak memory) once done."""
    try:
        names = [s["stage"] for s in strategies.get(run.get("strategy"))["stages"]]
    except InputError:
        names = []
    done = {d.get("index"): d for d in view.get("stages_done", [])}
    items = []
    prep = view.get("prepare") or {}
    if prep.get("what"):                       # before the first stage, never part of its time
        what = html.escape(str(prep["what"]).split(" (")[0])
        if prep.get("done"):
            items.append(f"<li class='prep'>⚙ {what} — {duration(prep.get('duration_s'))}</li>")
        elif view.get("status") in ACTIVE:
            prog = f" ({prep.get('step')}/{prep['total']})" if prep.get("total") else ""
            items.append(f"<li class='now'>▶ {what}{prog}</li>")
        else:
            items.append(f"<li class='stopped'>■ {what} — not finished</li>")
    for i, name in enumerate(names):
        if i in done:
            d = done[i]
            mem = (f"peak {gb(d.get('peak_mem_bytes'), 2)} <span class='tq-src'>"
                   f"({d.get('mem_source') or 'measured'})</span>")
            if d.get("failed"):
                items.append(f"<li class='failed'>✗ {name} — failed after {duration(d.get('duration_s'))}, {mem}</li>")
            elif d.get("stopped"):
                items.append(f"<li class='stopped'>■ {name} — stopped after {duration(d.get('duration_s'))}, "
                             f"{mem}</li>")
            else:
                items.append(f"<li class='done'>✓ {name} — {duration(d.get('duration_s'))}, {mem}</li>")
        elif view.get("stage_index") == i and view.get("status") in ACTIVE:
            items.append(f"<li class='now'>▶ {name}</li>")
        else:
            items.append(f"<li class='todo'>· {name}</li>")
    return f"<ol class='tq-stages'>{''.join(items)}</ol>" if items else ""


def loss_figure(view: dict):
    """Loss per step (one trace per training stage); uirevision keeps zoom while steps arrive."""
    from engine.charts import figure, note
    fig = figure("Training loss (measured)", f"loss-{view.get('run_id')}", 320,
                 xaxis={"title": {"text": "step"}}, yaxis={"title": {"text": "loss"}},
                 margin={"l": 55, "r": 20, "t": 45, "b": 40}, legend={"y": -0.3})
    by_stage: dict[str, list] = {}
    for p in view.get("points", []):
        by_stage.setdefault(p[2] or "train", []).append(p)
    for stage, pts in by_stage.items():
        fig.traces.append({
            "type": "scatter", "mode": "lines+markers", "name": stage, "marker": {"size": 4},
            "x": [p[0] for p in pts], "y": [p[1] for p in pts],
            "customdata": [[p[3], p[4]] for p in pts],
            "hovertemplate": "step %{x}<br>loss %{y:.4f}<br>lr %{customdata[0]:.2e}<br>%{customdata[1]:,.0f} tokens/s"
                             f"<extra>measured, run {view.get('run_id')}</extra>"})
    if not by_stage:
        note(fig, "no training steps yet" if view.get("status") in ACTIVE or not view.get("run_id")
             else "this run has no training steps")
    return fig


def metrics_rows(view: dict) -> list[dict]:
    """Evaluation results and metrics as table rows (measured; the run id is the source).

    Scalars only (sample generations stay in the log/artifacts); a metric event that repeats an
    evaluation's figure ("after.perplexity") is shown once."""
    rows, seen = [], set()
    for e in view.get("evals", []):
        where = e.get("name") or e.get("stage")
        for k, val in (e.get("metrics") or {}).items():
            if isinstance(val, (dict, list)):
                continue
            rows.append({"where": where, "metric": k, "value": _fmt(val), "unit": ""})
            seen.add(f"{where}.{k}")
    for m in view.get("metrics", []):
        if m.get("name") in seen or isinstance(m.get("value"), (dict, list)):
            continue
        rows.append({"where": m.get("stage") or "", "metric": m.get("name"), "value": _fmt(m.get("value")),
                     "unit": m.get("unit") or ""})
    return rows


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, float)):
        return f"{v:.4g}" if isinstance(v, float) else f"{v:,}"
    return str(v)[:120]


def store_problem() -> str | None:
    """Why the run store cannot be used (a home that cannot be created, a read-only, lost, foreign,
    damaged or truncated runs.sqlite), with what to do; None when it is fine. The page shows it as
    a banner; the runs screens then show no runs instead of an error."""
    try:
        api.list_runs(limit=1)
    except InputError as e:
        return str(e)
    return None


def _runs_or_none() -> list[dict]:
    try:
        return api.list_runs()
    except InputError:                   # the store cannot be used: store_problem() says why, once
        return []


def history_rows(limit: int = 200) -> list[dict]:
    """Every run, newest first: id, name, strategy, model, device, status, reason, created, duration."""
    out = []
    for r in _runs_or_none()[:limit]:
        started, ended = r.get("started"), r.get("ended")
        dur = (ended or time.time()) - started if started else None
        out.append({"run": r.get("id"), "name": r.get("name") or "", "strategy": r.get("strategy"),
                    "model": r.get("model"), "device": r.get("device") or "", "status": r.get("status"),
                    "reason": _cut(redact(r.get("reason") or ""), 140),
                    "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])) if r.get("created") else "",
                    "duration": duration(dur) if dur is not None else "—"})
    return out


HISTORY_COLUMNS = (("run", "15%"), ("name", "11%"), ("strategy", "10%"), ("model", "10%"), ("device", "6%"),
                   ("status", "7%"), ("reason", "22%"), ("created", "12%"), ("duration", "7%"))


def history_html(rows: list[dict]) -> str:
    """The history as an HTML table with fixed column widths (a long reason wraps in its cell); each
    run id links to its page (?run=ID re-attaches)."""
    head = "".join(f"<th style='width:{w}'>{k}</th>" for k, w in HISTORY_COLUMNS)
    body = "".join(
        "<tr>" + "".join(
            f"<td><a href='?run={html.escape(str(r['run']), quote=True)}'>{html.escape(str(r['run']))}</a></td>"
            if k == "run" else
            f"<td{' class=st-' + html.escape(str(r.get(k))) if k == 'status' else ''}>"
            f"{html.escape(str(r.get(k) or ''))}</td>"
            for k, _ in HISTORY_COLUMNS) + "</tr>" for r in rows)
    if not rows:
        body = f"<tr><td colspan='{len(HISTORY_COLUMNS)}' class='tq-muted'>no runs yet</td></tr>"
    return (f"<div class='tq-history'><div class='tq-history-title'>History (every run, newest first)</div>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def _cut(text: str, n: int) -> str:
    """A cell's text at most ``n`` characters (attach the run for the whole of it)."""
    return text if len(text) <= n else text[:n - 1] + "…"


def run_choices() -> list[tuple[str, str]]:
    """(label, id) for the run picker, newest first."""
    return [(f"{r['run']} · {r['status']} · {r['strategy']} · {r['name'] or r['model']}", r["run"])
            for r in history_rows()]


def form_for_strategy(strategy_id: str | None, scenario: dict | None, result: dict | None = None,
                      dataset_path: str = "") -> dict:
    """Launch-form values for a strategy picked in the matrix (every field; see ``from_matrix``)."""
    return from_matrix(strategy_id, scenario, result, dataset_path)[0]


# the form's fields that only some strategies use
TRAIN_FIELDS = ("steps", "learning_rate", "batch_size", "lora_rank")
QUANT_FIELDS = ("bits", "group_size", "calibration_samples")


def stage_use(strategy_id: str | None) -> dict:
    """Which parts of the launch form the strategy's stages read: train, lora (rank), quantize."""
    try:
        stages = strategies.get(strategy_id)["stages"] if strategy_id else None
    except InputError:
        stages = None
    if stages is None:                            # unknown: show everything, RunSpec names what is wrong
        return {"train": True, "lora": True, "quantize": True}
    train = [st for st in stages if st["stage"] == "train"]
    return {"train": bool(train),
            "lora": any(st.get("method") in ("lora", "qlora") or st.get("lora") for st in train),
            "quantize": any(st["stage"] == "quantize" for st in stages)}


def field_visibility(strategy_id: str | None) -> dict[str, bool]:
    """Launch-form field -> shown, for the strategy (fields its stages never read are hidden)."""
    use = stage_use(strategy_id)
    out = {k: use["train"] for k in TRAIN_FIELDS}
    out["lora_rank"] = use["lora"]
    out.update({k: use["quantize"] for k in QUANT_FIELDS})
    return out


def _stand_in_dataset(strategy_id: str, task: str | None) -> str:
    """A demo dataset that fits the strategy: text passages for quantization alone (calibration and
    perplexity), the scenario's kind of task for a fine-tune."""
    data = demo_presets.datasets()
    if not stage_use(strategy_id)["train"]:
        want = "python-docs"
    else:
        want = "tickets" if task == "classification" else "json-extraction"
    return want if want in data else next(iter(data), "")


def _advisor_config(result: dict | None, strategy_id: str) -> dict:
    """The configuration the advisor estimated for the strategy (train request, quantize settings)."""
    import re
    entry = next((e for e in (result or {}).get("ranked") or [] if e.get("strategy") == strategy_id), None)
    out: dict = {}
    # the training configuration the advisor's search chose for the row (micro-batch, accumulation,
    # checkpointing, optimizer, LoRA rank): the form's own fields, the rest as train_config
    train = dict(((entry or {}).get("run_config") or {}).get("train") or {})
    for st in ((entry or {}).get("estimates") or {}).get("stages") or []:
        if st.get("stage") == "train":
            req = st.get("request") or {}
            out.update({k: req[k] for k in ("seq_len", "batch_size", "lora_rank") if req.get(k)})
            out.update({k: train.pop(k) for k in ("seq_len", "batch_size", "lora_rank") if train.get(k)})
            if train:
                out["train_config"] = yaml.safe_dump(train, default_flow_style=True, sort_keys=False).strip()
        elif st.get("stage") == "quantize":
            if st.get("bits"):
                out["bits"] = str(st["bits"])
            src = str(st.get("source") or "")
            for flag, key in (("--group-size", "group_size"), ("--calibration-samples", "calibration_samples")):
                m = re.search(rf"{flag} (\d+)", src)
                if m:
                    out[key] = int(m.group(1))
    return out


def from_matrix(strategy_id: str | None, scenario: dict | None, result: dict | None = None,
                dataset_path: str = "") -> tuple[dict, str]:
    """(launch-form values for every field, a note) for a strategy picked in the matrix.

    A demo preset of that strategy (presets/runs/demo-*.yaml) when there is one: it runs on a CPU
    with the project's own model. Otherwise the scenario's model with the configuration the advisor
    estimated (sequence length, batch, LoRA rank, bits, group size, calibration samples), the
    dataset uploaded in the wizard or a demo dataset standing in for it, device "auto". Fields the
    strategy's stages never read are emptied. The note says what is still missing before Launch
    and warns when the advisor judged the strategy infeasible for the scenario.
    """
    if not strategy_id:
        return {}, ""
    empty = {k: None for k in LAUNCH_FIELDS}
    empty.update(run_preset="", name="", model="", data_demo="", data_path="", device="auto",
                 bits="catalog default")
    notes: list[str] = []
    form = None
    for name, path in run_presets().items():
        if name.startswith("demo-") and (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get(
                "strategy") == strategy_id:
            form = {**empty, "run_preset": name, **form_from_spec(load_run_preset(name))}
            notes.append(f"the CPU demo preset <b>{html.escape(name)}</b> (the project's own small model) "
                         "runs this strategy here; put your model and data in to run it for real")
            break
    if form is None:
        scn = scenario or {}
        model = scn.get("model")
        form = {**empty, "strategy": strategy_id, "device": "auto", "seq_len": scn.get("seq_len"),
                **_advisor_config(result, strategy_id)}
        if isinstance(model, str) and model and not model.endswith(".json"):
            form["model"] = model
            form["name"] = f"{strategy_id} on {Path(model).name}"
        else:
            form["name"] = strategy_id
            what = ("the scenario's model is a size and family only" if isinstance(model, dict)
                    else "the scenario's model is a config.json (no weights)")
            notes.append(f"<b>missing: a model</b> — {what}; type a hub id or a model folder in the workspace")
        if dataset_path:
            form["data_path"] = dataset_path
        else:
            form["data_demo"] = _stand_in_dataset(strategy_id, scn.get("task"))
            notes.append(f"dataset: the demo set <b>{html.escape(form['data_demo'])}</b> stands in; upload "
                         "yours in the wizard's data step or give a file in the workspace")
    use = field_visibility(strategy_id)
    for k, shown in use.items():
        if not shown:
            form[k] = "catalog default" if k == "bits" else None
    if not use["steps"]:                       # trains nothing: no training configuration either
        form["train_config"] = None
    entry = next((e for e in (result or {}).get("ranked") or [] if e.get("strategy") == strategy_id), None)
    if entry is not None and not entry.get("feasible"):
        from engine import charts
        row = next((r for r in charts.rows(result) if r["strategy"] == strategy_id), {})
        why = "; ".join(str(t) for t in (row.get("why_not") or [])[:2])
        warn = error_md(f"the advisor judged {strategy_id} not feasible for this scenario"
                        + (f": {why}" if why else "") + ". It can still run; expect it to fail or miss a goal.")
    else:
        warn = ""
    body = "".join(f"<li>{n}</li>" for n in notes)
    return form, warn + (f"<div class='tq-muted'>From the matrix: <b>{html.escape(strategy_id)}</b>"
                         f"<ul>{body}</ul></div>" if body else "")
