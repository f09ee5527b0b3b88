"""The dashboard: six tabs (wizard, decision matrix, trade-offs, runs, compare, calibration) and their wiring.

``build_app()`` returns the ``gr.Blocks``; ``app.py`` launches it with ``LAUNCH_KW`` (theme
and CSS go to ``launch()`` in Gradio 6). Handlers are the pure functions of the screen
modules; this file only lays out components and connects events. Every handler catches bad
input and shows it inline next to its field; none lets a traceback reach the page.
"""
from __future__ import annotations

import time

import gradio as gr

from engine import charts, strategies
from engine.errors import InputError
from engine.runs import api
from ui import artifacts, calibration, compare, matrix, report, runs, wizard
from ui.common import MAX_UPLOAD, error_md, ok_md, public_demo, unexpected_md
from ui.session import SessionForms
from ui.theme import CLIENT_JS, CSS, THEME

# max_threads bounds the worker threads that run handlers (Gradio's default is 40): enough for
# recompute's 8 + a launch + a calibration + the timers' polls, so 20 concurrent planners queue
# instead of growing the pool (bench/app_load.py)
MAX_THREADS = 16
LAUNCH_KW = {"theme": THEME, "css": CSS, "js": CLIENT_JS, "max_file_size": MAX_UPLOAD, "max_threads": MAX_THREADS}
# what _recompute returns, in order (the outputs of every wizard change)
PLAN_KEYS = ("scenario", "result", "scenario_yaml", "summary", "model_msg", "data_msg", "hw_msg", "goals_msg",
             "banner", "top", "table", "infeasible", "change", "pick", "mem", "lat", "breakdown", "cost", "timing",
             "detail", "rt_pick", "runtimes")
POLL_S = 1.0          # the attached run's events
HISTORY_S = 5.0       # the history table
URL_RUN_JS = """(run_id) => {
  const u = new URL(window.location.href);
  if (run_id) { u.searchParams.set('run', run_id); } else { u.searchParams.delete('run'); }
  window.history.replaceState(null, '', u.toString());
}"""


def _header() -> None:
    demo_note = (" <span class='tq-banner'>Public demo: planning works; launching GPU runs is off here "
                 "(CPU demo runs only).</span>") if public_demo() else ""
    gr.HTML(f"<div class='tq-header'><h1>tunequant</h1><p>Fine-tune, quantize, or both? Describe the model, "
            f"data, hardware and goals; every strategy gets estimates with their sources, a rank and the "
            f"reasons; then prove it with real runs.{demo_note}</p></div>")


# ---- screen 1: the wizard ---------------------------------------------------------------------------

def _wizard_tab():
    d = wizard.DEFAULT_FORM
    c = {}
    examples = wizard.example_scenarios()
    with gr.Row():
        c["example"] = gr.Dropdown(choices=[("—", "")] + [(k, k) for k in examples], value="",
                                   label="Start from an example scenario", scale=1, elem_id="example")
        c["example_note"] = gr.HTML("<div class='tq-muted'>Pick an example to fill every step, or fill the "
                                    "steps yourself. The matrix and charts recompute on every change.</div>")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            with gr.Walkthrough(selected=1, elem_id="wizard") as walk:
                with gr.Step("Model", id=1):
                    c["source"] = gr.Radio(list(wizard.MODEL_SOURCES), value=d["source"], label="Model from",
                                           elem_id="source")
                    c["preset"] = gr.Dropdown(wizard.preset_choices(), value=d["preset"], label="Preset (type to search)",
                                              elem_id="preset")
                    c["hub_id"] = gr.Textbox(value=d["hub_id"], label="Hub id (org/name) or a model folder in the workspace",
                                             placeholder="meta-llama/Llama-3.1-8B  or  models/my-model  (press Enter)",
                                             visible=False, elem_id="hub_id")
                    c["config_file"] = gr.File(label="config.json of the model, or a .gguf model file (up to 200 MB; "
                                               "bigger: put it in the workspace and type its path)",
                                               file_types=[".json", ".gguf"], visible=False, elem_id="config_file")
                    with gr.Row(visible=False) as size_row:
                        c["params_b"] = gr.Number(value=d["params_b"], label="Parameters (billions)", elem_id="params_b")
                        c["family"] = gr.Dropdown(list(wizard.models.FAMILIES), value=d["family"], label="Family")
                    c["size_row"] = size_row
                    c["model_msg"] = gr.HTML(elem_id="model_msg")
                    with gr.Row():
                        next1 = gr.Button("Next: data →", size="sm", scale=0, min_width=160, elem_classes=["tq-nav"])
                with gr.Step("Data", id=2):
                    with gr.Row():
                        c["task"] = gr.Dropdown(list(wizard.TASKS), value=d["task"], label="Task", elem_id="task")
                        c["examples"] = gr.Number(value=d["examples"], label="Labelled examples", precision=0,
                                                  elem_id="examples")
                        c["seq_len"] = gr.Number(value=d["seq_len"], label="Sequence length (tokens)", precision=0,
                                                 elem_id="seq_len")
                        c["epochs"] = gr.Number(value=d["epochs"], label="Epochs", elem_id="epochs")
                    c["dataset_file"] = gr.File(label="Optional: your dataset (JSONL or CSV) to preview and validate",
                                                file_types=[".jsonl", ".json", ".csv"], elem_id="dataset_file")
                    # the upload's validation lives here, next to the file: no recompute writes to it
                    c["dataset_msg"] = gr.HTML(elem_id="dataset_msg")
                    c["use_rows"] = gr.Button("Use the file's row count", visible=False, size="sm",
                                              elem_id="use_rows", scale=0, min_width=260)
                    c["dataset_rows"] = gr.State(None)
                    c["data_msg"] = gr.HTML(elem_id="data_msg")
                    c["data_preview"] = gr.Dataframe(label="Preview (first rows)", visible=False, interactive=False,
                                                     max_height=260, wrap=True)
                    c["dataset_path"] = gr.State("")
                    with gr.Row():
                        back2 = gr.Button("← Model", size="sm", scale=0, min_width=160, elem_classes=["tq-nav"])
                        next2 = gr.Button("Next: hardware →", size="sm", scale=0, min_width=160, elem_classes=["tq-nav"])
                with gr.Step("Hardware", id=3):
                    with gr.Row():
                        c["gpu"] = gr.Dropdown(wizard.gpu_choices(), value=d["gpu"], label="Training GPU", elem_id="gpu")
                        c["gpu_count"] = gr.Number(value=d["gpu_count"], label="GPU count", precision=0, minimum=1,
                                                   elem_id="gpu_count")
                    with gr.Row():
                        c["target"] = gr.Radio(list(wizard.TARGETS), value=d["target"], label="Serving target",
                                               elem_id="target")
                        c["deploy_device"] = gr.Dropdown(wizard.all_device_choices(), value=d["deploy_device"],
                                                         label="Serving device (its kind must suit the target)",
                                                         elem_id="deploy_device")
                        c["runtime"] = gr.Dropdown(wizard.runtime_choices(d["deploy_device"], d["target"]),
                                                   value=d["runtime"], multiselect=True,
                                                   label=wizard.runtime_label(d["deploy_device"], d["target"]),
                                                   elem_id="runtime")
                    c["hw_msg"] = gr.HTML(elem_id="hw_msg")
                    with gr.Row():
                        back3 = gr.Button("← Data", size="sm", scale=0, min_width=160, elem_classes=["tq-nav"])
                        next3 = gr.Button("Next: goals →", size="sm", scale=0, min_width=160, elem_classes=["tq-nav"])
                with gr.Step("Goals", id=4):
                    with gr.Row():
                        c["max_latency"] = gr.Number(value=d["max_latency"], label="Max latency, ms/token (0: no goal)",
                                                     elem_id="max_latency")
                        c["min_retention"] = gr.Number(value=d["min_retention"],
                                                       label="Min accuracy kept, 0–1 (0: no goal)",
                                                       elem_id="min_retention")
                        c["priority"] = gr.Radio(list(wizard.PRIORITIES), value=d["priority"], label="Priority",
                                                 elem_id="priority")
                        c["target_bits"] = gr.Dropdown(list(wizard.BITS), value=d["target_bits"],
                                                       label="Target weight bits", elem_id="target_bits")
                    c["symptoms"] = gr.CheckboxGroup(list(wizard.SYMPTOMS), value=d["symptoms"],
                                                     label="What is wrong today (optional)", elem_id="symptoms")
                    c["goals_msg"] = gr.HTML(elem_id="goals_msg")
                    with gr.Row():
                        back4 = gr.Button("← Hardware", size="sm", scale=0, min_width=160, elem_classes=["tq-nav"])
                        c["to_matrix"] = gr.Button("See the decision matrix →", variant="primary", size="sm",
                                                   elem_id="to_matrix", scale=0, min_width=220)
            for btn, step in ((next1, 2), (back2, 1), (next2, 3), (back3, 2), (next3, 4), (back4, 3)):
                btn.click(lambda s=step: gr.Walkthrough(selected=s), outputs=walk, queue=False)
        with gr.Column(scale=2):
            c["summary"] = gr.HTML(elem_id="summary")
            c["scenario_yaml"] = gr.Code(language="yaml", label="Scenario (what the advisor reads)", interactive=False,
                                         lines=14, elem_id="scenario_yaml", buttons=["copy", "download"], wrap_lines=True)
    c["walk"] = walk
    return c


# ---- screen 2: the decision matrix ------------------------------------------------------------------

def _matrix_tab():
    c = {}
    c["banner"] = gr.HTML(elem_id="matrix_banner")
    with gr.Row(equal_height=True, elem_id="report_row"):
        c["report_fmt"] = gr.Radio(list(report.FORMATS), value=next(iter(report.FORMATS)), label="Report of this "
                                   "scenario (what a team lead would forward)", elem_id="report_fmt", scale=2)
        c["report_runs"] = gr.Dropdown(list(report.RUNS), value=next(iter(report.RUNS)), label="Runs in the report",
                                       elem_id="report_runs", scale=1)
        c["report_build"] = gr.Button("Build report", elem_id="report_build", scale=1, min_width=140)
        c["report_download"] = gr.DownloadButton("Download report", visible=False, elem_id="report_download",
                                                 variant="primary", scale=1, min_width=160)
    c["report_msg"] = gr.HTML(elem_id="report_msg")
    c["top"] = gr.HTML(elem_id="matrix_top")           # the strategies that decide, as cards
    c["show_all"] = gr.Checkbox(False, label="List the infeasible strategies in the table too", elem_id="show_all")
    c["table"] = gr.Dataframe(headers=matrix.COLUMNS, interactive=False, wrap=True, max_height=620,
                              label="Decision matrix: feasible strategies by family (click a row for its details)",
                              elem_id="matrix_table", column_widths=matrix.WIDTHS)
    c["infeasible"] = gr.HTML(elem_id="matrix_infeasible")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            c["change"] = gr.HTML(elem_id="matrix_change")
        with gr.Column(scale=3):
            with gr.Row():
                c["pick"] = gr.Dropdown(label="Strategy details", choices=strategies.ids(), elem_id="matrix_pick",
                                        scale=3)
                c["run_this"] = gr.Button("Run this strategy →", variant="primary", scale=1, elem_id="run_this")
            c["detail"] = gr.HTML(elem_id="matrix_detail")
    return c


# ---- screen 3: trade-offs --------------------------------------------------------------------------

def _tradeoffs_tab():
    c = {}
    c["mem_view"] = gr.Radio(list(charts.MEMORY_VIEWS), value=charts.MEMORY_VIEWS[0], label="Memory axis",
                             elem_id="mem_view")
    with gr.Row():
        c["mem"] = gr.Plot(label="Memory vs accuracy", show_label=False, elem_id="plot_mem")
        c["lat"] = gr.Plot(label="Latency vs accuracy", show_label=False, elem_id="plot_lat")
    c["shown"] = gr.Dropdown(choices=strategies.ids(), multiselect=True, label="Strategies in the memory breakdown "
                             "(empty: the six best ranked)", elem_id="breakdown_pick")
    with gr.Row():
        c["breakdown"] = gr.Plot(label="Memory per stage", show_label=False, elem_id="plot_breakdown")
        c["cost"] = gr.Plot(label="Cost", show_label=False, elem_id="plot_cost")
    c["rt_pick"] = gr.Dropdown(choices=strategies.ids(), label="Strategy compared across serving runtimes "
                               "(the recommended one until you pick)", elem_id="runtime_pick")
    c["runtimes"] = gr.Plot(label="Runtimes", show_label=False, elem_id="plot_runtimes")
    c["timing"] = gr.HTML(elem_id="tradeoffs_timing")
    return c


# ---- screen 4: runs ----------------------------------------------------------------------------------

def _runs_tab():
    c = {}
    presets = list(runs.run_presets())
    f0 = runs.default_form()
    demo_models, demo_data = runs.demo_choices()
    with gr.Accordion("Launch a run", open=True):
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                with gr.Row():
                    c["run_preset"] = gr.Dropdown([("—", "")] + [(p, p) for p in presets], value=f0["run_preset"],
                                                  label="Start from a run preset (presets/runs)", elem_id="run_preset")
                    c["strategy"] = gr.Dropdown(strategies.ids(), value=f0.get("strategy"), label="Strategy",
                                                elem_id="run_strategy")
                    c["name"] = gr.Textbox(value=f0.get("name", ""), label="Run name", elem_id="run_name")
                with gr.Row():
                    c["model"] = gr.Textbox(value=f0.get("model", ""), label="Model (demo model, preset, hub id, "
                                            "workspace folder)", elem_id="run_model",
                                            info="CPU demos: " + ", ".join(demo_models) if demo_models else None)
                    c["data_demo"] = gr.Dropdown([("—", "")] + [(d, d) for d in demo_data],
                                                 value=f0.get("data_demo", ""), label="Demo dataset", elem_id="run_demo")
                    c["data_path"] = gr.Textbox(value=f0.get("data_path", ""), label="…or dataset file in the workspace",
                                                elem_id="run_data_path")
                    c["device"] = gr.Radio(list(runs.DEVICES), value=f0.get("device") or "cpu", label="Device",
                                           elem_id="run_device")
                with gr.Row():
                    c["steps"] = gr.Number(value=f0.get("steps"), label="Train steps (0: default)", precision=0, elem_id="run_steps")
                    c["learning_rate"] = gr.Number(value=f0.get("learning_rate"), label="Learning rate (0: default)", elem_id="run_lr")
                    c["batch_size"] = gr.Number(value=f0.get("batch_size"), label="Batch size (0: default)", precision=0, elem_id="run_batch")
                    c["seq_len"] = gr.Number(value=f0.get("seq_len"), label="Sequence length (0: default)", precision=0, elem_id="run_seq")
                    c["lora_rank"] = gr.Number(value=f0.get("lora_rank"), label="LoRA rank (0: default)", precision=0, elem_id="run_rank")
                with gr.Row():
                    c["bits"] = gr.Dropdown(list(runs.BITS_CHOICES), value=f0.get("bits", "catalog default"),
                                            label="Bits", elem_id="run_bits")
                    c["group_size"] = gr.Number(value=f0.get("group_size"), label="Group size (0: catalog)", precision=0, elem_id="run_group")
                    c["calibration_samples"] = gr.Number(value=f0.get("calibration_samples"),
                                                         label="Calibration samples (0: catalog)", precision=0,
                                                         elem_id="run_calib")
                    c["eval_examples"] = gr.Number(value=f0.get("eval_examples"), label="Eval examples (0: default)", precision=0, elem_id="run_eval")
                # the advisor's training configuration of a matrix row (micro-batch, accumulation,
                # optimizer ...): shown in the preview, sent as is
                c["train_config"] = gr.Textbox(value=f0.get("train_config", ""), visible=False,
                                               elem_id="run_train_config")
                with gr.Row():
                    c["launch"] = gr.Button("Launch run", variant="primary", elem_id="launch", scale=1)
                    c["launch_msg"] = gr.HTML(elem_id="launch_msg")
            with gr.Column(scale=2):
                c["preview"] = gr.Code(language="yaml", label="Run config (exactly what Launch sends)",
                                       interactive=False, lines=16, elem_id="run_preview")
                c["preview_msg"] = gr.HTML(elem_id="preview_msg")
    with gr.Row():
        c["picker"] = gr.Dropdown(choices=[], label="Attach to a run (history)", elem_id="run_picker", scale=4,
                                  allow_custom_value=True)
        c["refresh"] = gr.Button("Refresh", size="sm", scale=0, min_width=90)
        c["stop"] = gr.Button("Stop run", variant="stop", size="sm", scale=0, min_width=110, elem_id="stop")
    c["stop_msg"] = gr.HTML(elem_id="stop_msg")
    c["status"] = gr.HTML(runs.status_html(runs.new_view(None), None), elem_id="run_status")
    with gr.Row(equal_height=False):
        c["loss"] = gr.Plot(label="Loss", show_label=False, elem_id="plot_loss", scale=3)
        c["metrics"] = gr.Dataframe(headers=["where", "metric", "value", "unit"], label="Evaluation (measured)",
                                    interactive=False, max_height=320, elem_id="run_metrics", scale=2, wrap=True,
                                    column_widths=["18%", "36%", "32%", "14%"])
    c["log"] = gr.Textbox(label="Log tail", lines=10, max_lines=10, autoscroll=True, interactive=False,
                          elem_id="run_log", elem_classes=["tq-log"])
    # the attached run's artifacts (python -m engine runs artifacts ID): download, push to the Hub
    with gr.Accordion("Artifacts of this run (download, push to the Hub)", open=True, elem_id="run_artifacts_box"):
        c["art_msg"] = gr.HTML(elem_id="art_msg")
        c["art_table"] = gr.Dataframe(headers=artifacts.COLUMNS, interactive=False, wrap=True, max_height=260,
                                      elem_id="run_artifacts", show_label=False,
                                      column_widths=["4%", "20%", "14%", "10%", "10%", "8%", "28%", "6%"])
        with gr.Row(equal_height=True):
            c["art_pick"] = gr.Dropdown(choices=[], label="Artifact", elem_id="art_pick", scale=3)
            c["art_get"] = gr.Button("Prepare download", elem_id="art_get", scale=1, min_width=150)
            c["art_download"] = gr.DownloadButton("Download", visible=False, elem_id="art_download", scale=1,
                                                  variant="primary", min_width=150)
        c["art_get_msg"] = gr.HTML(elem_id="art_get_msg")
        with gr.Row(equal_height=True):
            c["art_repo"] = gr.Textbox(label="Hub model repo (owner/name)", elem_id="art_repo", scale=2)
            c["art_token"] = gr.Textbox(label="Hugging Face write token (blank: the server's HF_TOKEN; used once, "
                                        "never shown or stored)", type="password", elem_id="art_token", scale=2)
            c["art_push"] = gr.Button("Push to the Hub", elem_id="art_push", scale=1, min_width=150)
        c["art_push_msg"] = gr.HTML(elem_id="art_push_msg")
    # an HTML table with fixed column widths: a long reason wraps in its column instead of widening the
    # page (Gradio's Dataframe sized its columns to their content: 1380 px at a 1280 px window)
    c["history"] = gr.HTML(runs.history_html([]), elem_id="run_history")
    c["view"] = gr.State(runs.new_view(None))
    c["timer"] = gr.Timer(POLL_S, active=False)
    c["history_timer"] = gr.Timer(HISTORY_S)        # other runs' statuses (another tab, the CLI)
    return c


# ---- screen 5: compare -------------------------------------------------------------------------------

def _compare_tab():
    c = {}
    with gr.Row():
        c["pick"] = gr.Dropdown(choices=[], multiselect=True, label="Runs to compare (finished runs first)",
                                elem_id="compare_pick", scale=5)
        c["refresh"] = gr.Button("Refresh", size="sm", scale=0, min_width=90)
    c["msg"] = gr.HTML(elem_id="compare_msg")
    c["table"] = gr.Dataframe(label="Side by side (measured)", interactive=False, wrap=True, elem_id="compare_table",
                              max_height=520)
    c["vs_est"] = gr.HTML(elem_id="compare_est")
    with gr.Row():
        c["chart_quality"] = gr.Plot(label="Quality", show_label=False, elem_id="plot_cmp_quality")
        c["chart_cost"] = gr.Plot(label="Memory and speed", show_label=False, elem_id="plot_cmp_speed")
    with gr.Row():
        c["csv"] = gr.File(label="CSV export", interactive=False, elem_id="export_csv")
        c["json"] = gr.File(label="JSON export", interactive=False, elem_id="export_json")
    return c


# ---- screen 6: calibration ---------------------------------------------------------------------------

def _calibration_tab():
    c = {}
    c["status"] = gr.HTML(elem_id="cal_status")
    with gr.Row(equal_height=True):
        c["refit"] = gr.Button("Refit from the run store", variant="primary", elem_id="cal_refit", scale=1,
                               min_width=200)
        c["export"] = gr.DownloadButton("Export records (JSON)", visible=False, elem_id="cal_export", scale=1,
                                        min_width=200)
        c["import"] = gr.File(label="Import records: a calibration export or a bench/measurements/*.json file "
                              "(merged, then refitted)", file_types=[".json"], elem_id="cal_import", scale=2,
                              height=130)
    c["msg"] = gr.HTML(elem_id="cal_msg")
    c["errors"] = gr.Dataframe(headers=calibration.ERROR_COLUMNS, interactive=False, wrap=True, elem_id="cal_errors",
                               label="Error per term: median |measured/estimated − 1| and × off, before / after "
                                     "(in-sample, held back)")
    c["factors"] = gr.Dataframe(headers=calibration.FACTOR_COLUMNS, interactive=False, wrap=True, max_height=420,
                                elem_id="cal_factors", label="Fitted factors (applied first; versions/variant "
                                                             "'*': any)")
    c["counts"] = gr.Dataframe(headers=calibration.COUNT_COLUMNS, interactive=False, wrap=True, elem_id="cal_counts",
                               label="Comparable records per device and term")
    return c


# ---- wiring -----------------------------------------------------------------------------------------

def build_app() -> gr.Blocks:
    with gr.Blocks(title="tunequant — fine-tuning × quantization planner", fill_width=True) as demo:
        _header()
        store_banner = gr.HTML(elem_id="store_banner")   # the run store cannot be used: why, what to do
        with gr.Tabs(selected="wizard", elem_id="tabs") as tabs:
            with gr.Tab("1 · Scenario", id="wizard", elem_id="tab-wizard"):
                W = _wizard_tab()
            with gr.Tab("2 · Decision matrix", id="matrix", elem_id="tab-matrix"):
                M = _matrix_tab()
            with gr.Tab("3 · Trade-offs", id="tradeoffs", elem_id="tab-tradeoffs"):
                T = _tradeoffs_tab()
            with gr.Tab("4 · Runs", id="runs", elem_id="tab-runs"):
                R = _runs_tab()
            with gr.Tab("5 · Compare", id="compare", elem_id="tab-compare"):
                C = _compare_tab()
            with gr.Tab("6 · Calibration", id="calibration", elem_id="tab-calibration") as cal_tab:
                K = _calibration_tab()
        result = gr.State(None)       # the advisor's answer for the current scenario
        scenario = gr.State(None)

        # The form lives on the server (``form``): every person's edit writes its one field there and
        # recomputes from it. Components of a wizard step that is not open keep their old value in the
        # browser until the step is shown, so a recompute that read the components would mix two
        # scenarios after an example pick (and a pick that sets ~20 fields fired ~20 recomputes).
        form = gr.State(dict(wizard.DEFAULT_FORM))
        plan_extra = [T["mem_view"], T["shown"], M["show_all"]]

        where = {"scenario": scenario, "result": result, **{k: W[k] for k in ("scenario_yaml", "summary", "model_msg",
                                                                               "data_msg", "hw_msg", "goals_msg")},
                 "banner": M["banner"], "top": M["top"], "table": M["table"], "infeasible": M["infeasible"],
                 "change": M["change"], "pick": M["pick"],
                 "detail": M["detail"], **{k: T[k] for k in ("mem", "lat", "breakdown", "cost", "timing", "rt_pick",
                                                             "runtimes")}}
        plan_outputs = [where[k] for k in PLAN_KEYS]
        plan_kw = {"trigger_mode": "always_last", "show_progress": "hidden", "concurrency_limit": 8}

        # -- scenario -> advisor -> matrix + charts (one handler: they never disagree)
        def recompute(f, view, shown, show_all=False):
            return [f] + _recompute(f or dict(wizard.DEFAULT_FORM), view, shown, show_all)

        def plan(request, f, change, view, shown, show_all, reset=False):
            """change(the session's latest form) -> (new form, outputs before the form's); then the
            plan of that form; written only if no later change of the session started meanwhile
            (ui/session.py: a slow first recompute must not overwrite an example picked meanwhile)."""
            sid = _session(request)
            f, extra, n = FORMS.begin(sid, f, change, reset=reset)
            out = extra + recompute(f, view, shown, show_all)
            return out if FORMS.latest(sid, n) else [gr.skip() for _ in out]

        def on_plan_load(f, view, shown, show_all, request: gr.Request = None):
            return plan(request, f, lambda base: (dict(f or wizard.DEFAULT_FORM), []), view, shown, show_all,
                        reset=True)
        demo.load(on_plan_load, [form] + plan_extra, [form] + plan_outputs, **plan_kw)

        def edited_form(base, key, value):
            f = {**base, key: value}
            if f.get("name") and not f["name"].endswith(" (edited)"):
                f["name"] += " (edited)"                     # no longer the example as it was written
            return f

        def edit(key):
            def edited(f, value, view, shown, show_all, request: gr.Request = None):
                return plan(request, f, lambda base: (edited_form(base, key, value), []), view, shown, show_all)
            edited.__name__ = f"edit_{key}"
            return edited
        for k in wizard.FIELDS:
            if k in ("hub_id", "config_file", "dataset_file", "target", "deploy_device"):
                continue
            W[k].input(edit(k), [form, W[k]] + plan_extra, [form] + plan_outputs, **plan_kw)
        gr.on([W["hub_id"].submit, W["hub_id"].blur], edit("hub_id"), [form, W["hub_id"]] + plan_extra,
              [form] + plan_outputs, **plan_kw)
        # a person's upload or clear only: an example empties the field without a second recompute
        gr.on([W["config_file"].upload, W["config_file"].clear], edit("config_file"),
              [form, W["config_file"]] + plan_extra, [form] + plan_outputs, **plan_kw)

        # -- model source: show the matching field
        def show_source(src):
            return (gr.update(visible=src == wizard.SRC_PRESET), gr.update(visible=src == wizard.SRC_HUB),
                    gr.update(visible=src == wizard.SRC_UPLOAD), gr.update(visible=src == wizard.SRC_SIZE))
        W["source"].change(show_source, W["source"], [W["preset"], W["hub_id"], W["config_file"], W["size_row"]],
                           queue=False)

        # -- serving target: devices of that kind; one recompute with both fields set. Target or device:
        # the runtimes that run on the device (a runtime that does not goes back to auto)
        def target_chosen(f, target, view, shown, show_all, request: gr.Request = None):
            def change(base):
                f = {**base, "target": target}
                ids = [k for _, k in wizard.device_choices(target)]
                f["deploy_device"] = (f.get("deploy_device") if f.get("deploy_device") in ids
                                      else (ids[0] if ids else None))
                f, rt = _runtime_for_device(f)
                return f, [gr.update(value=f["deploy_device"], interactive=bool(ids)), rt]
            return plan(request, f, change, view, shown, show_all)
        W["target"].input(target_chosen, [form, W["target"]] + plan_extra,
                          [W["deploy_device"], W["runtime"], form] + plan_outputs, **plan_kw)

        def device_chosen(f, device, view, shown, show_all, request: gr.Request = None):
            def change(base):
                f, rt = _runtime_for_device(edited_form(base, "deploy_device", device))
                return f, [rt]
            return plan(request, f, change, view, shown, show_all)
        W["deploy_device"].input(device_chosen, [form, W["deploy_device"]] + plan_extra,
                                 [W["runtime"], form] + plan_outputs, **plan_kw)

        # -- dataset upload: validate and preview next to the file; the example count changes only when
        # the person says so (a sample is not the dataset, and the count can flip the recommendation)
        def dataset_uploaded(path, f):
            msg, df, n, saved = wizard.dataset_check(path)
            examples = (f or {}).get("examples")
            ask = bool(n) and n != examples
            if ask:
                msg += ("<div class='tq-muted'>“Labelled examples” stays at "
                        f"{examples if examples is not None else '—'}: a file may be a sample of the data. "
                        f"If it is all of it, use its {n:,} rows.</div>")
            return (msg, gr.update(value=df, visible=df is not None),
                    gr.update(visible=ask, value=f"Use {n:,} rows as labelled examples" if ask else None),
                    n, saved or "", gr.update(value=saved) if saved else gr.update())
        W["dataset_file"].change(dataset_uploaded, [W["dataset_file"], form],
                                 [W["dataset_msg"], W["data_preview"], W["use_rows"], W["dataset_rows"],
                                  W["dataset_path"], R["data_path"]])

        def use_rows(f, n, view, shown, show_all, request: gr.Request = None):
            if not n:
                return [gr.update(), gr.update(visible=False)] + [gr.skip() for _ in range(1 + len(plan_outputs))]
            return plan(request, f, lambda base: (edited_form(base, "examples", n), [n, gr.update(visible=False)]),
                        view, shown, show_all)
        W["use_rows"].click(use_rows, [form, W["dataset_rows"]] + plan_extra,
                            [W["examples"], W["use_rows"], form] + plan_outputs)

        # -- examples: replace every field (uploads included) and recompute once
        ex_fields = [k for k in wizard.FIELDS if k not in ("config_file", "dataset_file")]
        ex_outputs = ([W[k] for k in ex_fields] + [W["config_file"], W["dataset_file"], W["dataset_msg"],
                      W["data_preview"], W["use_rows"], W["example_note"], form] + plan_outputs)

        def load_example(name, view, shown, show_all, request: gr.Request = None):
            if not name:
                return [gr.skip() for _ in ex_outputs]
            try:
                ex = wizard.load_example(name)
            except InputError as e:
                return [error_md(e) if o is W["example_note"] else gr.skip() for o in ex_outputs]
            note = ok_md(f"<b>{name}</b>: {wizard.example_summary(wizard.example_scenarios()[name])}")

            def change(base):                                # an example replaces the whole form
                f, rt = _runtime_for_device(ex)
                return f, ([rt if k == "runtime" else f[k] for k in ex_fields]
                           + [None, None, "", gr.update(value=None, visible=False), gr.update(visible=False), note])
            return plan(request, None, change, view, shown, show_all)
        # .select: once per pick (a dropdown's .input also fires again when it loses focus)
        W["example"].select(load_example, [W["example"]] + plan_extra, ex_outputs, **plan_kw)
        W["to_matrix"].click(lambda: gr.Tabs(selected="matrix"), outputs=tabs, queue=False)

        # -- matrix details and "run this"
        M["pick"].change(lambda sid, res: matrix.detail_html(res, sid), [M["pick"], result], M["detail"])

        def table_select(evt: gr.SelectData):      # the row's own strategy id (rows are grouped, not ranked)
            row = evt.row_value or []
            sid = row[matrix.COLUMNS.index("strategy")] if len(row) > 1 else None
            return sid if sid in strategies.ids() else gr.update()
        M["table"].select(table_select, None, M["pick"])

        def list_all(res, show_all):
            rs = charts.rows(res)
            return matrix.table(rs, show_all), matrix.infeasible_html(res, rs, show_all)
        M["show_all"].input(list_all, [result, M["show_all"]], [M["table"], M["infeasible"]], show_progress="hidden")

        launch_fields = [R[k] for k in runs.LAUNCH_FIELDS]

        def preview(*vals):
            return runs.spec_preview(dict(zip(runs.LAUNCH_FIELDS, vals)))

        def run_this(sid, scn, res, data_path):
            vals, note = runs.from_matrix(sid, scn, res, data_path or "")
            return ([vals.get(k, gr.update()) for k in runs.LAUNCH_FIELDS]
                    + _launch_visibility(sid) + [note, gr.Tabs(selected="runs")])
        hideable = [R[k] for k in runs.field_visibility(None)]
        (M["run_this"].click(run_this, [M["pick"], scenario, result, W["dataset_path"]],
                             launch_fields + hideable + [R["launch_msg"], tabs])
         .then(preview, launch_fields, [R["preview"], R["preview_msg"]], show_progress="hidden"))
        # the form shows the fields the strategy's stages read (a preset, a pick, the matrix)
        R["strategy"].change(_launch_visibility, R["strategy"], hideable, queue=False)

        # -- the report of the current scenario: build, then download; a changed scenario hides the stale one.
        # Built from the server's form as it stands at the click (what the next recompute reads), not from
        # the components: those of a wizard step not yet opened can hold an earlier scenario's values
        def build_report(fmt, which_runs, f):
            try:
                scn = wizard.scenario_from_form(f or dict(wizard.DEFAULT_FORM))
            except InputError as e:
                return gr.DownloadButton(visible=False), error_md(e)
            path, msg = report.write(scn, fmt, which_runs)
            if path is None:
                return gr.DownloadButton(visible=False), msg
            return gr.DownloadButton(f"Download {path.rsplit('/', 1)[-1]}", value=path, visible=True), msg
        M["report_build"].click(build_report, [M["report_fmt"], M["report_runs"], form],
                                [M["report_download"], M["report_msg"]],
                                concurrency_limit=2)
        gr.on([scenario.change, M["report_fmt"].change, M["report_runs"].change],
              lambda: (gr.DownloadButton(visible=False), ""), None, [M["report_download"], M["report_msg"]],
              show_progress="hidden")

        # -- trade-off controls
        def charts_only(res, scn, view, shown):
            return _charts(charts.rows(res), scn, view, shown)
        gr.on([T["mem_view"].change, T["shown"].change], charts_only, [result, scenario, T["mem_view"], T["shown"]],
              [T["mem"], T["lat"], T["breakdown"], T["cost"]], trigger_mode="always_last", show_progress="hidden")
        T["rt_pick"].input(lambda sid, res, scn: _runtime_chart(charts.rows(res), scn, sid),
                           [T["rt_pick"], result, scenario], T["runtimes"], trigger_mode="always_last",
                           show_progress="hidden")

        # -- runs: preset -> form; form -> preview; launch; attach; poll; stop; history
        def preset_chosen(name):
            if not name:
                return [gr.update() for _ in runs.LAUNCH_FIELDS[1:]]
            try:
                f = runs.form_from_spec(runs.load_run_preset(name))
            except InputError:
                return [gr.update() for _ in runs.LAUNCH_FIELDS[1:]]
            return [f.get(k) for k in runs.LAUNCH_FIELDS[1:]]
        # a person's pick only ("Run this strategy" sets the preset and its own values together)
        (R["run_preset"].input(preset_chosen, R["run_preset"], launch_fields[1:], queue=False)
         .then(preview, launch_fields, [R["preview"], R["preview_msg"]], show_progress="hidden"))

        # a person's edit, or once after a preset / "Run this strategy" set every field (not 16 times)
        gr.on([R[k].input for k in runs.LAUNCH_FIELDS] + [demo.load], preview, launch_fields,
              [R["preview"], R["preview_msg"]], trigger_mode="always_last", show_progress="hidden")

        live_outputs = [R["view"], R["status"], R["loss"], R["metrics"], R["log"], R["timer"]]

        def do_launch(request: gr.Request, *vals):
            run_id, msg = runs.launch(dict(zip(runs.LAUNCH_FIELDS, vals)), owner=_session(request))
            if not run_id:
                return [msg, gr.update(), gr.update()] + [gr.update() for _ in live_outputs] + [None]
            live = _live(runs.attach(run_id), force=True)
            return [msg, gr.update(choices=runs.run_choices(), value=run_id), _history()] + live + [run_id]
        run_id_box = gr.Textbox(visible=False)
        (R["launch"].click(do_launch, launch_fields,
                           [R["launch_msg"], R["picker"], R["history"]] + live_outputs + [run_id_box],
                           concurrency_limit=1, concurrency_id="launch")
         .then(None, run_id_box, None, js=URL_RUN_JS))

        def do_attach(run_id):
            if not run_id:
                return _live(runs.new_view(None), force=True)
            return _live(runs.attach(run_id), force=True)
        art_outputs = [R["art_msg"], R["art_table"], R["art_pick"], R["art_download"], R["art_get_msg"]]
        (R["picker"].input(do_attach, R["picker"], live_outputs)
         .then(None, R["picker"], None, js=URL_RUN_JS)
         .then(_artifacts, R["view"], art_outputs, show_progress="hidden"))
        R["launch"].click(lambda: _artifacts(None), None, art_outputs, show_progress="hidden", queue=False)

        def art_get(view, index):
            path, msg = artifacts.download(_attached_run(view), index)
            if not path:
                return gr.DownloadButton(visible=False), msg
            return gr.DownloadButton(f"Download {path.rsplit('/', 1)[-1]}", value=path, visible=True), msg
        R["art_get"].click(art_get, [R["view"], R["art_pick"]], [R["art_download"], R["art_get_msg"]],
                           concurrency_limit=2)
        R["art_pick"].input(lambda: (gr.DownloadButton(visible=False), ""), None,
                            [R["art_download"], R["art_get_msg"]], queue=False)

        def art_push(view, repo, token):
            # the token box is emptied whatever happens: it is used for this one push and kept nowhere
            return artifacts.push(_attached_run(view), repo, token), ""
        R["art_push"].click(art_push, [R["view"], R["art_repo"], R["art_token"]], [R["art_push_msg"], R["art_token"]],
                            concurrency_limit=1, concurrency_id="push")

        def tick(view):
            live = _live(*_poll(view))
            if live[0].get("status") != (view or {}).get("status"):      # queued -> running -> finished ...
                return live + [_history(), gr.update(choices=compare.run_choices()),
                               gr.update(choices=runs.run_choices())] + _artifacts(live[0])
            return live + [gr.skip(), gr.skip(), gr.skip()] + [gr.skip() for _ in art_outputs]
        R["timer"].tick(tick, R["view"], live_outputs + [R["history"], C["pick"], R["picker"]] + art_outputs,
                        show_progress="hidden", concurrency_limit=None)

        def do_stop(view, request: gr.Request):
            msg = runs.stop((view or {}).get("run_id"), session=_session(request), admin_token=_admin_token(request))
            return [msg, gr.Timer(active=True)]
        R["stop"].click(do_stop, R["view"], [R["stop_msg"], R["timer"]])

        R["history_timer"].tick(_history, None, R["history"], show_progress="hidden", concurrency_limit=None)

        def refresh_runs(current):
            ch = runs.run_choices()
            return gr.update(choices=ch, value=current), _history()
        R["refresh"].click(refresh_runs, R["picker"], [R["picker"], R["history"]])

        # -- compare
        cmp_outputs = [C["msg"], C["table"], C["vs_est"], C["chart_quality"], C["chart_cost"], C["csv"], C["json"]]
        C["pick"].change(lambda ids: compare.render(ids), C["pick"], cmp_outputs)
        C["refresh"].click(lambda cur: gr.update(choices=compare.run_choices(), value=cur), C["pick"], C["pick"])

        # -- calibration: shown when the tab opens; refit, import (upload), export (always the current records)
        cal_outputs = [K["status"], K["errors"], K["factors"], K["counts"], K["export"]]

        def cal_screen(view: dict) -> list:
            exp = view["export"]
            button = (gr.DownloadButton(f"Export {view['records']} records (JSON)", value=exp, visible=True) if exp
                      else gr.DownloadButton(visible=False))
            return [view["status"], view["errors"], view["factors"], view["counts"], button]
        cal_tab.select(lambda: cal_screen(calibration.render()) + [""], None, cal_outputs + [K["msg"]])

        def cal_refit():
            view, msg = calibration.refit()
            return cal_screen(view) + [msg]
        K["refit"].click(cal_refit, None, cal_outputs + [K["msg"]], concurrency_limit=1, concurrency_id="calibrate")

        def cal_import(path):                      # the upload empties again, ready for the next file
            view, msg = calibration.import_upload(path)
            return cal_screen(view) + [msg, None]
        K["import"].upload(cal_import, K["import"], cal_outputs + [K["msg"], K["import"]], concurrency_limit=1,
                           concurrency_id="calibrate")

        # -- page load: run history, and re-attach when the URL names a run (?run=ID)
        def on_load(request: gr.Request):
            run_id = (request.query_params.get("run") if request else None) or None
            ch = runs.run_choices()
            try:
                live = _live(runs.attach(run_id) if run_id else runs.new_view(None), force=True)
            except InputError:                   # an unknown run, or a store that cannot be used
                live = _live(runs.new_view(None), force=True)
            tab = gr.Tabs(selected="runs") if run_id else gr.update()
            problem = runs.store_problem()
            banner = error_md(f"The run store cannot be used: {problem}. Planning works; runs, compare and "
                              f"calibration need the store.") if problem else ""
            return [gr.update(choices=ch, value=run_id), _history(),
                    gr.update(choices=compare.run_choices())] + live + [tab, banner]
        (demo.load(on_load, None, [R["picker"], R["history"], C["pick"]] + live_outputs + [tabs, store_banner])
         .then(_artifacts, R["view"], art_outputs, show_progress="hidden"))
    return demo


# every session's wizard form and its latest plan computation (ui/session.py)
FORMS = SessionForms(wizard.DEFAULT_FORM)


# ---- handler bodies (kept out of build_app so tests can call them) -------------------------------------

def _session(request) -> str | None:
    """The browser session of an event (who launched a run)."""
    return getattr(request, "session_hash", None) if request is not None else None


def _admin_token(request) -> str | None:
    """The admin token of an event: the x-tunequant-admin header or the page's ?admin= parameter."""
    if request is None:
        return None
    try:
        return request.headers.get(runs.ADMIN_HEADER) or request.query_params.get("admin")
    except Exception:
        return None


def _recompute(form: dict, mem_view: str = charts.MEMORY_VIEWS[0], shown=None, show_all: bool = False) -> list:
    """Wizard form -> scenario -> advisor -> every plan output, in PLAN_KEYS order."""
    t0 = time.perf_counter()
    msgs = {g: "" for g in wizard.GROUPS}
    try:
        scn = wizard.scenario_from_form(form)
    except InputError as e:
        msgs[wizard.group_of(e.field)] = error_md(wizard.shown_path(e))
        return _plan_error(msgs, error_md(wizard.shown_path(e)))
    except Exception as e:
        return _plan_error(msgs, unexpected_md(e, "reading the form"))
    msgs["model"] = wizard.model_summary(scn["model"])
    msgs["hardware"] = wizard.hardware_summary(scn["hardware"]["gpu"], scn["hardware"]["count"],
                                               scn["deploy"].get("gpu"), scn["deploy"]["target"])
    try:
        res, ms, note = matrix.recommend(scn)
    except InputError as e:                        # (a file in the workspace is named by its place there)
        msgs[wizard.group_of(e.field)] = error_md(wizard.shown_path(e))
        return _plan_error(msgs, error_md(wizard.shown_path(e)), scn)
    except Exception as e:
        return _plan_error(msgs, unexpected_md(e, "the advisor"), scn)
    if res is None:
        return _plan_error(msgs, note, scn)
    rs = charts.rows(res)
    mem, lat, breakdown, cost = _charts(rs, scn, mem_view, shown)
    reco = matrix.recommended(res)
    rt_sid = charts.runtime_strategy(rs, reco)
    out = {"scenario": scn, "result": res, "scenario_yaml": wizard.scenario_yaml(scn),
           "summary": matrix.summary_html(res, rs), "model_msg": msgs["model"], "data_msg": msgs["data"],
           "hw_msg": msgs["hardware"], "goals_msg": msgs["goals"], "banner": matrix.banner_html(res, rs),
           "top": matrix.top_html(res, rs), "table": matrix.table(rs, show_all),
           "infeasible": matrix.infeasible_html(res, rs, show_all), "change": matrix.change_html(res),
           "pick": gr.update(value=reco, choices=[r["strategy"] for r in rs] or strategies.ids()),
           "mem": mem, "lat": lat, "breakdown": breakdown, "cost": cost,
           "detail": matrix.detail_html(res, reco or (rs[0]["strategy"] if rs else None)),
           "rt_pick": gr.update(value=rt_sid, choices=[r["strategy"] for r in rs if r["ms_per_token"] is not None]
                                or strategies.ids()),
           "runtimes": _runtime_chart(rs, scn, rt_sid)}
    total_ms = (time.perf_counter() - t0) * 1000
    out["timing"] = f"<div class='tq-src'>advisor {ms:.0f} ms · whole update {total_ms:.0f} ms of server time</div>"
    return [out[k] for k in PLAN_KEYS]


def _launch_visibility(strategy_id) -> list:
    """Show/hide the launch form's training and quantization fields for a strategy."""
    return [gr.update(visible=v) for v in runs.field_visibility(strategy_id).values()]


def _plan_error(msgs: dict, err: str, scn: dict | None = None) -> list:
    """Every plan output when the scenario cannot be used: the message by its field and above
    the matrix; no stale matrix or chart stays on screen."""
    import pandas as pd
    fig = charts.empty("", "fix the scenario to see the charts")
    out = {"scenario": scn, "result": None, "scenario_yaml": wizard.scenario_yaml(scn) if scn else "",
           "summary": err, "model_msg": msgs["model"], "data_msg": msgs["data"], "hw_msg": msgs["hardware"],
           "goals_msg": msgs["goals"], "banner": err, "top": "", "table": pd.DataFrame(columns=matrix.COLUMNS),
           "infeasible": "", "change": "",
           "pick": gr.update(), "mem": fig, "lat": fig, "breakdown": fig, "cost": fig, "timing": "", "detail": "",
           "rt_pick": gr.update(), "runtimes": fig}
    return [out[k] for k in PLAN_KEYS]


def _runtime_for_device(f: dict) -> tuple[dict, dict]:
    """(the form with the picked runtimes that run on its serving device, in their order: none left is
    the advisor's search; the runtime picker's update: those runtimes as choices)."""
    device = f.get("deploy_device") if f.get("target") != "hosted-api" else None
    ch = wizard.runtime_choices(device, f.get("target"))
    ids = [k for _, k in ch]
    f = {**f, "runtime": [k for k in wizard.runtime_list(f.get("runtime")) if k in ids]}
    return f, gr.update(choices=ch, value=f["runtime"], interactive=bool(ch),
                        label=wizard.runtime_label(device, f.get("target")))


def _runtime_chart(rs: list[dict], scn: dict | None, strategy_id: str | None):
    """The runtime comparison of one strategy (engine.charts.strategy_runtimes: the report's builder too)."""
    return charts.strategy_runtimes(rs, scn, strategy_id)


def _charts(rs: list[dict], scn: dict | None, view: str, shown) -> list:
    figs = charts.scenario_charts(rs, scn, view, shown)
    return [figs[k] for k in charts.CHARTS]


def _poll(view: dict):
    try:
        return runs.poll_view(view)
    except InputError as e:
        return {**view, "status": "unknown", "reason": str(e)}, None


def _live(view_or_pair, run=None, force: bool = False) -> list:
    """The live outputs for a view: view, status, loss figure, metrics, log, timer."""
    import pandas as pd
    view = view_or_pair
    if run is None and view.get("run_id"):
        try:
            run = api.get_run(view["run_id"])
        except InputError:
            run = None
    active = bool(view.get("run_id")) and (view.get("status") in runs.ACTIVE or view.get("status") is None)
    changed = force or view.get("version") != view.get("_shown_version")
    view = {**view, "_shown_version": view.get("version")}
    if not changed:
        return [view, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Timer(active=active)]
    metrics = runs.metrics_rows(view)
    return [view, runs.status_html(view, run), runs.loss_figure(view),
            pd.DataFrame(metrics, columns=["where", "metric", "value", "unit"]),
            "\n".join(view.get("log", [])[-60:]), gr.Timer(active=active)]


def _attached_run(view: dict | None) -> dict | None:
    rid = (view or {}).get("run_id")
    if not rid:
        return None
    try:
        return api.get_run(rid)
    except InputError:
        return None


def _artifacts(view: dict | None) -> list:
    """The artifacts outputs for the attached run: message, table, picker, a hidden download button and
    an empty message (a new run's list replaces the last one's download)."""
    import pandas as pd
    run = _attached_run(view)
    try:
        rows, ch, msg = artifacts.table(run), artifacts.choices(run), artifacts.summary(run)
    except Exception as e:                      # a run record the list cannot read: said, never a traceback
        rows, ch, msg = [], [], unexpected_md(e, "listing the artifacts")
    return [msg, pd.DataFrame(rows, columns=artifacts.COLUMNS), gr.update(choices=ch, value=ch[0][1] if ch else None),
            gr.DownloadButton(visible=False), ""]


def _history():
    return runs.history_html(runs.history_rows())
