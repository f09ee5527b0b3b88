"""Screen 1, the wizard: model, data, hardware, goals -> a scenario (DESIGN.md's scenario file).

The form is a plain dict keyed by ``FIELDS``; ``scenario_from_form`` turns it into the
scenario the advisor reads, ``form_from_scenario`` does the reverse for the example
scenarios of ``presets/scenarios/``. Both are pure functions (the handler tests call them);
``build()`` lays out the Gradio components.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from engine import hardware, models
from engine.errors import InputError
from engine.presets import PRESETS_DIR
from engine.spec.scenario import PRIORITIES, SYMPTOMS, TARGET_KINDS, TARGETS, TASKS  # noqa: F401  (one place)
from ui.common import (MAX_CONFIG_BYTES, MAX_DATASET_BYTES, MAX_GGUF_BYTES, confine, error_md, gb, ok_md, save_upload,
                       user_model, unexpected_md, workspace)

BITS = ("any", "2", "3", "4", "8", "16")
SRC_PRESET, SRC_HUB, SRC_UPLOAD, SRC_SIZE = ("Preset", "Hub id or local path", "Upload config.json or .gguf",
                                             "Size and family")
MODEL_SOURCES = (SRC_PRESET, SRC_HUB, SRC_UPLOAD, SRC_SIZE)



# the form, in the order the Gradio inputs are wired
FIELDS = ("source", "preset", "hub_id", "config_file", "params_b", "family",
          "task", "examples", "seq_len", "epochs", "dataset_file",
          "gpu", "gpu_count", "target", "deploy_device", "runtime",
          "max_latency", "min_retention", "priority", "target_bits", "symptoms")

DEFAULT_FORM = {
    "source": SRC_PRESET, "preset": "llama-3.1-8b", "hub_id": "", "config_file": None,
    "params_b": None, "family": "llama-3",
    "task": "generation", "examples": 5000, "seq_len": 512, "epochs": 1, "dataset_file": None,
    "gpu": "rtx-4090-24gb", "gpu_count": 1, "target": "consumer-gpu", "deploy_device": "rtx-4090-24gb",
    "runtime": [],
    "max_latency": 50, "min_retention": 0.97, "priority": "balanced", "target_bits": "4", "symptoms": [],
}

# which inline message an InputError's field belongs to
_GROUP_OF = {"model": "model", "params_b": "model", "family": "model", "hub_id": "model", "config_file": "model",
             "task": "data", "examples": "data", "seq_len": "data", "epochs": "data", "dataset": "data", "dataset_file": "data",
             "hardware": "hardware", "gpu": "hardware", "count": "hardware", "gpu_count": "hardware",
             "deploy": "hardware", "target": "hardware", "deploy_device": "hardware", "runtime": "hardware",
             "goals": "goals", "max_latency_ms_per_token": "goals", "min_accuracy_retention": "goals",
             "priority": "goals", "target_weight_bits": "goals", "symptoms": "goals"}
GROUPS = ("model", "data", "hardware", "goals")


def group_of(field: str | None) -> str:
    """The wizard step an error's field belongs to ('model', 'data', 'hardware', 'goals')."""
    if not field:
        return "model"
    parts = str(field).replace("[", ".").split(".")
    for p in (parts[0], parts[-1]):
        if p in _GROUP_OF:
            return _GROUP_OF[p]
    return "goals" if parts[0] in ("goals",) else "model"


# ---- choices --------------------------------------------------------------------------------

def gpu_choices() -> list[tuple[str, str]]:
    devs = hardware.devices()
    return [(f"{devs[g].name} ({g})", g) for g in sorted(hardware.gpu_ids(), key=lambda g: devs[g].memory_bytes)]


def device_choices(target: str) -> list[tuple[str, str]]:
    """Serving devices that fit a deployment target (GPUs for servers, boards for edge, ...)."""
    kinds = TARGET_KINDS.get(target, ())
    devs = hardware.devices()
    ids = sorted((k for k, d in devs.items() if d.kind in kinds), key=lambda k: devs[k].memory_bytes)
    return [(f"{devs[k].name} ({k})", k) for k in ids]


def all_device_choices() -> list[tuple[str, str]]:
    """Every serving device (GPUs, edge boards, phones, laptops, CPUs), labelled with its kind.

    One fixed list: the target only decides which of them are valid (checked with the rest of
    the form), so an example that sets target and device together never races a list update."""
    devs = hardware.devices()
    order = {"gpu": 0, "edge": 1, "laptop": 2, "cpu": 3, "phone": 4}
    ids = sorted(devs, key=lambda k: (order.get(devs[k].kind, 9), devs[k].memory_bytes))
    return [(f"{devs[k].name} ({k}) · {devs[k].kind}", k) for k in ids]


RUNTIME_AUTO = "auto"          # deploy.runtime left out: the advisor's serving search picks per strategy


def runtime_choices(device: str | None, target: str | None = None) -> list[tuple[str, str]]:
    """The serving runtimes (presets/runtimes.yaml) that run on ``device``, the target's default marked.
    The wizard's picker selects any number of them: none is ``deploy.runtime`` left out (the advisor's
    serving search serves each strategy with the runtime that loads its format on the device and meets
    the goals best, the target's default winning ties; docs/advisor.md), one fixes it, several are
    searched in the order picked. No device (a hosted API): none."""
    from engine.estimate import runtimes
    try:
        dev = hardware.get(device) if device else None
    except InputError:
        dev = None
    if dev is None:
        return []
    default, _ = runtimes.default_runtime(dev, target)
    return [(f"{rt.id}" + (" (the default here)" if rt.id == default else ""), rt.id)
            for rt in runtimes.runtimes().values() if rt.runs_on(dev)]


def runtime_label(device: str | None, target: str | None = None) -> str:
    """The picker's label: what none, one and several mean, with the device's default."""
    from engine.estimate import runtimes
    try:
        dev = hardware.get(device) if device else None
    except InputError:
        dev = None
    if dev is None:
        return "Serving runtime (a hosted API serves itself)"
    default, _ = runtimes.default_runtime(dev, target)
    return (f"Serving runtimes — none: the advisor searches every one on the device (default here: {default}); "
            "one: only that; several: searched in the order picked")


def runtime_list(value) -> list[str]:
    """The picker's value (or a form's) as runtime ids in order without repeats: none, "auto" or "any"
    -> [] (search every runtime), "vllm" -> ["vllm"], a list as it is."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for v in items:
        v = str(v or "").strip()
        if v and v.lower() not in (RUNTIME_AUTO, "any") and v not in out:
            out.append(v)
    return out


def preset_choices() -> list[tuple[str, str]]:
    ps = models.presets()
    return [(f"{pid} — {ps[pid].get('params_b', 0):g}B ({ps[pid].get('family', '')})", pid)
            for pid in sorted(ps, key=lambda p: (ps[p].get("family", ""), ps[p].get("params_b", 0)))]


def example_scenarios() -> dict[str, Path]:
    """The worked examples in presets/scenarios/ (id -> file)."""
    d = PRESETS_DIR / "scenarios"
    return {p.stem: p for p in sorted(d.glob("*.yaml"))} if d.is_dir() else {}


def example_summary(path: Path) -> str:
    """The first comment lines of an example scenario (what the advisor should conclude)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            lines.append(line.lstrip("# ").rstrip())
        elif line.strip():
            break
    return " ".join(lines)


# ---- form <-> scenario ------------------------------------------------------------------------

def _number(value, field: str, kind=float, low=None, high=None, required=True):
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InputError(f"{field} is required", field=field)
        return None
    try:
        x = kind(float(value))
    except (TypeError, ValueError):
        raise InputError(f"{field} must be a number, got {value!r}", field=field)
    if (low is not None and x < low) or (high is not None and x > high):
        rng = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InputError(f"{field} must be {rng}, got {value}", field=field)
    return x


def model_ref(form: dict):
    """The model reference of the scenario (preset id, hub id/path, saved config.json, or size)."""
    src = form.get("source") or SRC_PRESET
    if src == SRC_PRESET:
        pid = form.get("preset")
        if not pid:
            raise InputError("model: pick a preset (type to search)", field="model")
        return pid
    if src == SRC_HUB:
        ref = (form.get("hub_id") or "").strip()
        if not ref:
            raise InputError("model: type a hub id (org/name) or a model folder in the workspace", field="model")
        if ref.lower() in models.presets():
            return ref
        # a hub id "org/name", or a path (absolute, relative to the workspace, a config.json, with ..):
        # every path resolves, symlinks included, inside the workspace (ui.common.user_model)
        if Path(ref).suffix == ".json":
            return str(confine(ref, "model"))
        # a first folder that exists in the workspace (e.g. models/...) says local too
        looks_local = (ref.startswith(("/", ".", "~")) or ref.count("/") != 1
                       or (workspace() / ref).exists() or (workspace() / ref.split("/")[0]).is_dir())
        if not looks_local:
            return ref
        path = Path(user_model(ref, "model"))
        if not path.is_absolute() or not path.exists():
            raise InputError(f"model: folder not found: {ref} is not in the workspace; put the model folder "
                             f"there (with its config.json), or type a hub id (org/name)", field="model")
        return str(path)
    if src == SRC_UPLOAD:
        f = form.get("config_file")
        if not f:
            raise InputError("model: upload a config.json or a .gguf file", field="model")
        if Path(str(f)).suffix.lower() == ".gguf":
            return _gguf_upload(f)
        saved = save_upload(f, "configs", MAX_CONFIG_BYTES, (".json",), "model")
        try:
            json.loads(saved.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"model: {Path(f).name} is not valid JSON ({e})", field="model")
        return str(saved)
    if src == SRC_SIZE:
        p = _number(form.get("params_b"), "params_b", float, 0.01, 2000)
        fam = form.get("family")
        if fam not in models.FAMILIES:
            raise InputError(f"family must be one of {', '.join(models.FAMILIES)}", field="family")
        return {"params_b": p, "family": fam}
    raise InputError(f"model source must be one of {', '.join(MODEL_SOURCES)}", field="model")


def _gguf_upload(f) -> str:
    """An uploaded .gguf model, kept in workspace/uploads/models/ once its metadata reads (the planner's
    architecture comes from it: engine.models.gguf_config). A file that does not read (truncated,
    corrupt, not GGUF, an architecture the planner does not count) is refused naming the problem and
    the upload is not kept."""
    name = Path(str(f)).name
    saved = save_upload(f, "models", MAX_GGUF_BYTES, (".gguf",), "model")
    try:
        models.gguf_config(saved)
    except InputError as e:
        import shutil
        shutil.rmtree(saved.parent, ignore_errors=True)          # uploads/models/<hash>/: nothing half-kept
        raise InputError(f"model: the uploaded {name}: " + str(e).replace(str(saved), name), field="model") from None
    return str(saved)


def scenario_from_form(form: dict) -> dict:
    """The scenario (DESIGN.md's YAML, as a dict) the wizard's fields describe.

    Raises InputError naming the field for anything that cannot be used.
    """
    f = {**DEFAULT_FORM, **{k: v for k, v in form.items() if k in FIELDS}}
    scn: dict = {"model": model_ref(f)}
    if f["task"] not in TASKS:
        raise InputError(f"task must be one of {', '.join(TASKS)}", field="task")
    scn["task"] = f["task"]
    scn["examples"] = _number(f["examples"], "examples", int, 0)
    seq = _number(f["seq_len"], "seq_len", int, 16, 1_048_576, required=False)
    if seq:
        scn["seq_len"] = seq
    epochs = _number(f.get("epochs"), "epochs", float, 0.01, 1000, required=False)
    if epochs:
        scn["epochs"] = epochs
    if f["gpu"] not in hardware.gpu_ids():
        raise InputError(f"training GPU must be one of {', '.join(hardware.gpu_ids())}", field="hardware.gpu")
    scn["hardware"] = {"gpu": f["gpu"], "count": _number(f["gpu_count"], "hardware.count", int, 1, 1024)}
    if f["target"] not in TARGETS:
        raise InputError(f"serving target must be one of {', '.join(TARGETS)}", field="deploy.target")
    deploy = {"target": f["target"]}
    if f["target"] != "hosted-api":
        allowed = [k for _, k in device_choices(f["target"])]
        if f["deploy_device"] not in allowed:
            raise InputError(f"serving device for {f['target']} must be one of {', '.join(allowed)}",
                             field="deploy.gpu")
        deploy["gpu"] = f["deploy_device"]
        picked = runtime_list(f.get("runtime"))
        ok = [k for _, k in runtime_choices(f["deploy_device"])]
        for rt in picked:
            if rt not in ok:
                raise InputError(f"serving runtime {rt} does not run on {f['deploy_device']}; there: "
                                 f"{', '.join(ok)}", field="deploy.runtime")
        if picked:                       # deploy.runtime: one name fixes it, a list is searched in its order
            deploy["runtime"] = picked[0] if len(picked) == 1 else picked
    scn["deploy"] = deploy
    goals = {}
    lat = _number(f["max_latency"], "goals.max_latency_ms_per_token", float, 0, 1e6, required=False)
    if lat:
        goals["max_latency_ms_per_token"] = lat
    ret = _number(f["min_retention"], "goals.min_accuracy_retention", float, 0, 1, required=False)
    if ret:
        goals["min_accuracy_retention"] = ret
    if f["priority"] not in PRIORITIES:
        raise InputError(f"priority must be one of {', '.join(PRIORITIES)}", field="goals.priority")
    goals["priority"] = f["priority"]
    if f["target_bits"] not in (None, "", "any"):
        goals["target_weight_bits"] = _number(f["target_bits"], "goals.target_weight_bits", int, 1, 16)
    scn["goals"] = goals
    syms = [s for s in (f.get("symptoms") or [])]
    bad = [s for s in syms if s not in SYMPTOMS]
    if bad:
        raise InputError(f"symptoms must be among {', '.join(SYMPTOMS)}; got {', '.join(bad)}", field="symptoms")
    if syms:
        scn["symptoms"] = syms
    for k in ("name", "description"):            # an example's own words (not form fields)
        if str(form.get(k) or "").strip():
            scn[k] = str(form[k]).strip()
    return scn


def form_from_scenario(scn: dict) -> dict:
    """Wizard values for a scenario dict (the inverse of scenario_from_form, for examples)."""
    form = dict(DEFAULT_FORM)
    m = scn.get("model")
    if isinstance(m, dict) and "params_b" in m:
        form.update(source=SRC_SIZE, params_b=m["params_b"], family=m.get("family", "llama-3"))
    elif isinstance(m, str) and m.lower() in models.presets():
        form.update(source=SRC_PRESET, preset=m.lower())
    else:
        form.update(source=SRC_HUB, hub_id=str(m or ""))
    form["task"] = scn.get("task", form["task"])
    form["examples"] = scn.get("examples", form["examples"])
    form["seq_len"] = scn.get("seq_len", form["seq_len"])
    form["epochs"] = scn.get("epochs", 1)
    hw = scn.get("hardware") or {}
    form["gpu"] = hw.get("gpu", form["gpu"])
    form["gpu_count"] = hw.get("count", 1)
    dep = scn.get("deploy") or {}
    form["target"] = dep.get("target", form["target"])
    choices = [k for _, k in device_choices(form["target"])]
    form["deploy_device"] = dep.get("gpu") or dep.get("device") or (choices[0] if choices else None)
    form["runtime"] = runtime_list(dep.get("runtime"))
    goals = scn.get("goals") or {}
    form["max_latency"] = goals.get("max_latency_ms_per_token")
    form["min_retention"] = goals.get("min_accuracy_retention")
    form["priority"] = goals.get("priority", "balanced")
    tb = goals.get("target_weight_bits")
    form["target_bits"] = str(tb) if tb is not None else "any"
    form["symptoms"] = list(scn.get("symptoms") or [])
    form["name"], form["description"] = scn.get("name") or "", scn.get("description") or ""
    return form


def load_example(name: str) -> dict:
    """The wizard form of an example scenario from presets/scenarios/."""
    ex = example_scenarios()
    if name not in ex:
        raise InputError(f"unknown example {name!r}; known: {', '.join(ex)}", field="example")
    return form_from_scenario(yaml.safe_load(ex[name].read_text(encoding="utf-8")) or {})


def scenario_yaml(scn: dict) -> str:
    """The scenario as YAML; a model file or folder in the workspace shows as a path relative to it
    (no server path on the page), with a comment that says so."""
    m = scn.get("model")
    note = ""
    if isinstance(m, str) and m.startswith(str(workspace()) + "/"):
        scn = {**scn, "model": m[len(str(workspace())) + 1:]}
        note = "# model: relative to the workspace ($TUNEQUANT_HOME)\n"
    return note + yaml.safe_dump(scn, sort_keys=False, default_flow_style=None, width=100)


def shown_path(text: str) -> str:
    """Text with the workspace's absolute path replaced by 'workspace' (what the page shows)."""
    return str(text).replace(str(workspace()) + "/", "workspace/")


# ---- inline summaries -----------------------------------------------------------------------

def model_summary(ref) -> str:
    """One line about the resolved model (or the InputError as an inline message)."""
    try:
        a = models.resolve(ref)
    except InputError as e:
        if isinstance(ref, str) and ref.count("/") == 1 and not ref.startswith(("/", ".", "~")):
            return error_md(f"{e} — and there is no folder {ref} in the workspace either")
        return error_md(shown_path(e))
    act = f" ({a.active_params / 1e9:.2f} B active)" if a.active_params != a.total_params else ""
    approx = " · approximate (size and family only)" if a.approximate else ""
    return ok_md(
        f"<b>{a.name}</b> · {a.family} · {a.total_params / 1e9:.2f} B parameters{act} · {a.num_layers} layers · "
        f"hidden {a.hidden_size} · heads {a.num_heads}/{a.num_kv_heads} kv · vocab {a.vocab_size:,} · "
        f"bf16 weights {gb(a.total_params * 2)} · <span class='tq-src'>source: {shown_path(a.source)}</span>{approx}")


def hardware_summary(gpu: str, count, device: str | None, target: str) -> str:
    try:
        g = hardware.get(gpu, gpu_only=True)
    except InputError as e:
        return error_md(e)
    txt = (f"Training: {int(count or 1)} × {g.name} — {gb(g.memory_bytes)} usable each "
           f"(torch total_memory), {g.bandwidth_gbs:g} GB/s, bf16 {g.bf16_tflops or '—'} TFLOP/s"
           f"{', ${:.2f}/h'.format(g.price_per_hour) if g.price_per_hour else ''}.")
    if target == "hosted-api":
        txt += " Serving: a hosted API (the provider picks the hardware)."
    elif device:
        try:
            d = hardware.get(device)
            txt += f" Serving: {d.name} — {gb(d.memory_bytes)} for the model, {d.bandwidth_gbs:g} GB/s."
        except InputError as e:
            return error_md(e)
    return ok_md(txt + " <span class='tq-src'>source: presets/hardware</span>")


def dataset_check(path) -> tuple[str, object, int | None, str | None]:
    """Validate an uploaded dataset: (inline message, preview DataFrame or None, rows, saved path).

    The file is copied into the workspace first (a run can use it: the saved path goes to the
    launch form) and checked by engine.runs.data.validate_dataset (pure Python).
    """
    import pandas as pd
    if not path:
        return "", None, None, None
    try:
        saved = save_upload(path, "datasets", MAX_DATASET_BYTES, (".jsonl", ".json", ".csv"), "dataset")
    except InputError as e:
        return error_md(e), None, None, None
    from engine.runs.data import validate_dataset      # pure Python (json/csv); no torch
    try:
        rep = validate_dataset(str(saved))
    except InputError as e:
        return error_md(e), None, None, None
    except Exception as e:  # a bug in validation must not take the wizard down
        return unexpected_md(e, "dataset validation"), None, None, None
    rows = rep.get("rows")
    problems = rep.get("problems") or []
    head = f"<b>{saved.name}</b>: {rows} rows" + (f" ({rep['valid_rows']} valid)" if "valid_rows" in rep else "") \
        + f", format <b>{rep.get('format')}</b>"
    stats_txt = _stats_text(rep.get("stats") or {})
    if stats_txt:
        head += " · " + stats_txt
    if problems:
        items = "".join(f"<li>{_text(p)}</li>" for p in problems[:8])
        more = f"<li>… {len(problems) - 8} more</li>" if len(problems) > 8 else ""
        msg = error_md(f"{saved.name}: {len(problems)} problem(s)") + f"<ul class='tq-problems'>{items}{more}</ul>" \
            + ok_md(head)
    else:
        msg = ok_md(head + " · no problems found")
    preview = rep.get("preview") or []
    df = pd.DataFrame([{k: _cell(v) for k, v in r.items()} if isinstance(r, dict) else {"row": _cell(r)}
                       for r in preview[:10]]) if preview else None
    return msg, df, rows, str(saved)


def _stats_text(stats: dict) -> str:
    """Length statistics and label counts of a dataset report, in one line."""
    parts = []
    tot = stats.get("total_tokens")
    if isinstance(tot, dict):
        parts.append(f"tokens per example p50 {tot.get('p50')}, p95 {tot.get('p95')}, max {tot.get('max')}"
                     + (f" ({stats['tokens_counted_by']})" if stats.get("tokens_counted_by") else ""))
    labels = stats.get("labels")
    if isinstance(labels, dict) and labels:
        shown = ", ".join(f"{k} {v}" for k, v in list(labels.items())[:8])
        parts.append(f"labels: {shown}" + (" …" if len(labels) > 8 else ""))
    for k, v in stats.items():
        if k not in ("total_tokens", "labels", "tokens_counted_by") and isinstance(v, (int, float)) \
                and not isinstance(v, bool):
            parts.append(f"{k.replace('_', ' ')} {v:,}")
    return " · ".join(parts)


def _text(p) -> str:
    import html
    if isinstance(p, dict):
        p = p.get("message") or p.get("problem") or json.dumps(p)
    return html.escape(str(p))


def _cell(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 160 else s[:157] + "…"
