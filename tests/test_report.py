"""The scenario report (engine.report): every section, the matrix as the advisor ranked it, the charts
(plotly.js inlined once, no CDN), a run's measured numbers, hostile text escaped, both formats, the CLI.

The run in the store is recorded the way the worker records one: its spec from a demo run preset, the
planner's estimate made by the worker's own function, and the measurements of a real CPU run of that
preset (r-20261123-051246-77fc75: LoRA -> merge -> GPTQ 4-bit on demo:tiny-llama, 2 cores).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine import advisor, charts, report
from engine.runs import evidence
from engine.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = {"name": "JSON extraction on the demo model", "description": "offline demo, one consumer GPU",
            "model": "demo:tiny-llama", "task": "structured-output", "examples": 2000,
            "hardware": {"gpu": "rtx-4090-24gb", "count": 1},
            "deploy": {"target": "consumer-gpu", "gpu": "rtx-4090-24gb"},
            "goals": {"max_latency_ms_per_token": 50, "priority": "balanced"}}
RUN_ID = "r-20261123-051246-77fc75"
# what the worker stored as the result of the real run (loss curve cut to 4 points, sample generations dropped)
RESULT = {'stages': [{'stage': 'train',
             'index': 0,
             'duration_s': 265.36,
             'stopped': False,
             'cpu_peak_rss_bytes': 826011648,
             'peak_mem_bytes': 826011648,
             'mem_source': 'cpu_peak_rss',
             'result': {'method': 'lora',
                        'steps': 300,
                        'total_steps': 300,
                        'stopped': False,
                        'trainable_params': 262144,
                        'params': 3672320,
                        'tokens': 227335,
                        'tokens_per_s': 879.7,
                        'train_s': 258.437,
                        'loss_first': 5.4372,
                        'loss_last': 0.4618,
                        'losses': [5.9405, 5.8379, 5.4595, 5.2318],
                        'adapter_dir': '<workdir>/adapter',
                        'adapter_bytes': 1055752}},
            {'stage': 'merge',
             'index': 1,
             'duration_s': 0.141,
             'stopped': False,
             'cpu_peak_rss_bytes': 812859392,
             'peak_mem_bytes': 812859392,
             'mem_source': 'cpu_peak_rss',
             'result': {'model_dir': '<workdir>/model-merged',
                        'size_on_disk_bytes': 6824536,
                        'dtype': 'bfloat16'}},
            {'stage': 'quantize',
             'index': 2,
             'duration_s': 11.329,
             'stopped': False,
             'cpu_peak_rss_bytes': 875970560,
             'peak_mem_bytes': 875970560,
             'mem_source': 'cpu_peak_rss',
             'result': {'model_dir': '<workdir>/quantized-gptq-4bit',
                        'quant': {'method': 'gptq',
                                  'bits': 4,
                                  'group_size': 128,
                                  'calibration_samples': 64,
                                  'library': 'gptqmodel',
                                  'calibration_samples_used': 64,
                                  'format': 'gptq'},
                        'quantize_s': 11.326,
                        'size_on_disk_bytes': 3373072,
                        'source_size_on_disk_bytes': 6824536}},
            {'stage': 'evaluate',
             'index': 3,
             'duration_s': 14.491,
             'stopped': False,
             'cpu_peak_rss_bytes': 815833088,
             'peak_mem_bytes': 815833088,
             'mem_source': 'cpu_peak_rss',
             'result': {'task': 'structured',
                        'eval_rows': 32,
                        'before': {'model': 'tiny-llama-fd6cde887d',
                                   'load_s': 0.033,
                                   'compute_dtype': 'float32',
                                   'weights_bytes': 13640960,
                                   'perplexity': 332.4034,
                                   'nll_per_token': 5.80635,
                                   'scored_tokens': 895,
                                   'json_valid_rate': 0.0,
                                   'field_match': 0.0,
                                   'exact_match': 0.0,
                                   'generated': 32,
                                   'samples': [{'reference': '{"name": "Priya Nair", "city": "Lyon", "item": '
                                                             '"wool scarf", "quantity": 4}',
                                                'generated': '\n'
                                                             '- resp: server response:\n'
                                                             '\n'
                                                             '- resp: server response if the address is not a\n'
                                                             '- file object, the default value is not a string, '
                                                             'the'},
                                               {'reference': '{"name": "Ines Costa", "city": "Turin", "item": '
                                                             '"yoga mat", "quantity": 4}',
                                                'generated': '\n'
                                                             '- resp: server response if the address is not a '
                                                             'string,\n'
                                                             '\n'
                                                             ">>> c.number_class(b'\\x00\\x00\\x00"},
                                               {'reference': '{"name": "Lena Vogel", "city": "Austin", "item": '
                                                             '"phone case", "quantity": 10}',
                                                'generated': '\n'
                                                             '- resp: server response: A string containing the '
                                                             'server.\n'
                                                             '\n'
                                                             'The optional argument is a string, the name of the\n'
                                                             'count of the pickle of'}],
                                   'prompt_tokens': 64,
                                   'new_tokens': 32,
                                   'prefill_ms': 14.01,
                                   'generate_s': 0.1658,
                                   'decode_tokens_per_s': 204.17,
                                   'peak_mem_bytes': 840183808,
                                   'mem_source': 'cpu_peak_rss',
                                   'size_on_disk_bytes': 6824536,
                                   'device': 'cpu'},
                        'after': {'model': 'quantized-gptq-4bit (gptq 4-bit)',
                                  'load_s': 0.431,
                                  'compute_dtype': 'float32',
                                  'weights_bytes': 5464064,
                                  'perplexity': 1.5779,
                                  'nll_per_token': 0.45606,
                                  'scored_tokens': 895,
                                  'json_valid_rate': 1.0,
                                  'field_match': 0.2656,
                                  'exact_match': 0.0,
                                  'generated': 32,
                                  'samples': [{'reference': '{"name": "Priya Nair", "city": "Lyon", "item": "wool '
                                                            'scarf", "quantity": 4}',
                                               'generated': '{"name": "Tom Becker", "city": "Osaka", "item": '
                                                            '"wool scarf", "quantity": 3}'},
                                              {'reference': '{"name": "Ines Costa", "city": "Turin", "item": '
                                                            '"yoga mat", "quantity": 4}',
                                               'generated': '{"name": "Lena Vogel", "city": "Osaka", "item": '
                                                            '"yoga mat", "quantity": 3}'},
                                              {'reference': '{"name": "Lena Vogel", "city": "Austin", "item": '
                                                            '"phone case", "quantity": 10}',
                                               'generated': '{"name": "Tom Becker", "city": "Osaka", "item": '
                                                            '"yoga mat", "quantity": 3}'}],
                                  'prompt_tokens': 64,
                                  'new_tokens': 32,
                                  'prefill_ms': 12.374,
                                  'generate_s': 0.2555,
                                  'decode_tokens_per_s': 127.53,
                                  'peak_mem_bytes': 816152576,
                                  'mem_source': 'cpu_peak_rss',
                                  'size_on_disk_bytes': 3373072,
                                  'device': 'cpu'},
                        'compare': {'perplexity_ratio': 0.0047,
                                    'prefill_ms_ratio': 0.8832,
                                    'peak_mem_bytes_ratio': 0.9714,
                                    'size_on_disk_bytes_ratio': 0.4943,
                                    'weights_bytes_ratio': 0.4006,
                                    'json_valid_rate_delta': 1.0,
                                    'field_match_delta': 0.2656,
                                    'exact_match_delta': 0.0}}}],
 'metrics': {'train.loss_first': {'value': 5.4372, 'unit': 'nats/token'},
             'train.loss_last': {'value': 0.4618, 'unit': 'nats/token'},
             'train.tokens_per_s': {'value': 879.7, 'unit': 'tokens/s'},
             'quantize.size_on_disk_bytes': {'value': 3373072, 'unit': 'bytes'},
             'quantize.seconds': {'value': 11.326, 'unit': 's'},
             'before.perplexity': {'value': 332.4034, 'unit': ''},
             'before.json_valid_rate': {'value': 0.0, 'unit': 'fraction'},
             'before.field_match': {'value': 0.0, 'unit': 'fraction'},
             'before.prefill_ms': {'value': 14.01, 'unit': 'ms'},
             'before.decode_tokens_per_s': {'value': 204.17, 'unit': 'tokens/s'},
             'before.peak_mem_bytes': {'value': 840183808, 'unit': 'bytes'},
             'before.size_on_disk_bytes': {'value': 6824536, 'unit': 'bytes'},
             'after.perplexity': {'value': 1.5779, 'unit': ''},
             'after.json_valid_rate': {'value': 1.0, 'unit': 'fraction'},
             'after.field_match': {'value': 0.2656, 'unit': 'fraction'},
             'after.prefill_ms': {'value': 12.374, 'unit': 'ms'},
             'after.decode_tokens_per_s': {'value': 127.53, 'unit': 'tokens/s'},
             'after.peak_mem_bytes': {'value': 816152576, 'unit': 'bytes'},
             'after.size_on_disk_bytes': {'value': 3373072, 'unit': 'bytes'},
             'compare.perplexity_ratio': {'value': 0.0047, 'unit': 'ratio'},
             'compare.prefill_ms_ratio': {'value': 0.8832, 'unit': 'ratio'},
             'compare.peak_mem_bytes_ratio': {'value': 0.9714, 'unit': 'ratio'},
             'compare.size_on_disk_bytes_ratio': {'value': 0.4943, 'unit': 'ratio'},
             'compare.weights_bytes_ratio': {'value': 0.4006, 'unit': 'ratio'},
             'compare.json_valid_rate_delta': {'value': 1.0, 'unit': 'fraction'},
             'compare.field_match_delta': {'value': 0.2656, 'unit': 'fraction'},
             'compare.exact_match_delta': {'value': 0.0, 'unit': 'fraction'}},
 'eval': {'before': {'model': 'tiny-llama-fd6cde887d',
                     'load_s': 0.033,
                     'compute_dtype': 'float32',
                     'weights_bytes': 13640960,
                     'perplexity': 332.4034,
                     'nll_per_token': 5.80635,
                     'scored_tokens': 895,
                     'json_valid_rate': 0.0,
                     'field_match': 0.0,
                     'exact_match': 0.0,
                     'generated': 32,
                     'prompt_tokens': 64,
                     'new_tokens': 32,
                     'prefill_ms': 14.01,
                     'generate_s': 0.1658,
                     'decode_tokens_per_s': 204.17,
                     'peak_mem_bytes': 840183808,
                     'mem_source': 'cpu_peak_rss',
                     'size_on_disk_bytes': 6824536,
                     'device': 'cpu'},
          'after': {'model': 'quantized-gptq-4bit (gptq 4-bit)',
                    'load_s': 0.431,
                    'compute_dtype': 'float32',
                    'weights_bytes': 5464064,
                    'perplexity': 1.5779,
                    'nll_per_token': 0.45606,
                    'scored_tokens': 895,
                    'json_valid_rate': 1.0,
                    'field_match': 0.2656,
                    'exact_match': 0.0,
                    'generated': 32,
                    'prompt_tokens': 64,
                    'new_tokens': 32,
                    'prefill_ms': 12.374,
                    'generate_s': 0.2555,
                    'decode_tokens_per_s': 127.53,
                    'peak_mem_bytes': 816152576,
                    'mem_source': 'cpu_peak_rss',
                    'size_on_disk_bytes': 3373072,
                    'device': 'cpu'}}}


def record_run(store, run_id: str, name: str | None = None) -> None:
    """A finished run as the worker records one: spec, planner estimate, versions, machine, result."""
    from engine import strategies
    from engine.runs import executor, worker
    # the shipped preset with the model this recorded run used (the presets now run demo:smollm2-135m)
    cfg = yaml.safe_load((ROOT / "presets/runs/demo-lora-merge-gptq.yaml").read_text())
    spec = executor.to_spec({**cfg, "model": "demo:tiny-llama"})
    d = spec.to_dict()
    if name:
        d["name"] = name
    store.create_run(run_id, d, "cpu")
    machine = worker.machine_info("cpu")            # this machine, as the worker records it (no torch for cpu)
    store.update_run(run_id, versions={"python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.23.0",
                                       "gptqmodel": "7.6.0"}, machine=machine,
                     estimate=worker.planner_estimate(spec, strategies.get(spec.strategy), machine["device_preset"]))
    assert store.set_running(run_id, os.getpid())
    assert store.finish(run_id, "finished", result=RESULT)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from engine.runs import api
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNEQUANT_HOME", str(home))
    mp.setenv("TUNEQUANT_MEASURED", "store")        # this test's own store (conftest turns it off elsewhere)
    ex = api.use_store(home / "runs.sqlite")
    record_run(ex.store, RUN_ID)
    yield home
    api.use_store(None)
    mp.undo()


@pytest.fixture(scope="module")
def built(store):
    d = evidence.report_data(SCENARIO)
    return d, report.html(d), report.markdown(d)


def md_table(md: str, first_header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header starts with first_header."""
    lines = md.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    rows = []
    for ln in lines[i + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", ln.strip())[1:-1]])
    return rows


def test_every_section_in_both_formats(built):
    d, html, md = built
    for sid, title in report.SECTIONS:
        assert f"<section id='{sid}'><h2>{title}</h2>" in html
        assert f"\n## {title}\n" in md
    assert html.count("<h2>") == len(report.SECTIONS)
    assert "tunequant report: JSON extraction on the demo model" in html and md.startswith("# tunequant report")
    assert "model: demo:tiny-llama" in md                          # the scenario's YAML
    assert yaml.safe_load(md.split("```yaml\n")[1].split("```")[0])["examples"] == 2000


def test_matrix_rows_are_the_advisors(built):
    d, html, md = built
    res = evidence.recommend(SCENARIO)             # the advisor with the store's measured run, as the report
    rows = md_table(md, "#")
    assert [r[1] for r in rows] == [e["strategy"] for e in res["ranked"]]
    assert [r[3] == "yes" for r in rows] == [e["feasible"] for e in res["ranked"]]
    assert [r[4] for r in rows] == [f"{e['score']:.3f}" for e in res["ranked"]]
    for r, e in zip(rows, res["ranked"]):
        acc = e["estimates"].get("accuracy") or {}
        if acc.get("retention") is not None:                       # retention with its interval
            assert r[7].startswith(f"{acc['retention']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}]")
        train = next((s for s in e["estimates"]["stages"] if s["stage"] == "train"), None)
        if train and train.get("device_bytes"):                     # memory of each stage against its limit
            assert f"train {train['device_bytes'] / 1e9:.1f} / {train['limit_bytes'] / 1e9:.1f} GB" in r[5]
    reco = res["recommended"]
    assert f"<tr class='reco'><td>1</td><td>{reco}</td>" in html
    assert f"Recommended: " in md and f"({reco}, " in md
    # the report's rows are the dashboard's rows (one flattening of the advisor's answer, engine.charts.rows)
    from ui import matrix
    ui_rows = charts.rows(res)
    for a, b in zip(d["rows"], ui_rows):
        assert {k: b.get(k) for k in a} == a
    # (the dashboard groups the feasible ones by family and lists the infeasible ones on request)
    assert sorted(matrix.table(ui_rows, True).data["strategy"]) == sorted(r["strategy"] for r in d["rows"])


def test_recommendation_names_rules_and_sources(built):
    d, html, md = built
    res = d["result"]
    entry = next(e for e in res["ranked"] if e["strategy"] == res["recommended"])
    for r in (x for x in entry["reasons"] if x["kind"] == "rule"):
        assert f"| {r['rule']} | {r['delta']:+.2f} |" in md
    assert res["what_would_change"]["summary"] in md
    assert all(a in md for a in res["assumptions"])
    assert "python -m engine recommend --scenario scenario.yaml --json" in md


def test_charts_inline_plotly_once_and_carry_the_figures(built):
    d, html, md = built
    assert html.count("<script>") == 1 + len(d["figures"])          # plotly.js + one newPlot per chart
    assert "plotly.js v" in html[:html.index("</head>")] and html.count("plotly.js v") == 1
    assert not re.search(r"<script[^>]+src=", html)                # nothing fetched: it opens offline
    rest = html.replace(report._plotly_js(), "")
    assert "http" not in rest.split("<body>")[0] and "cdn.plot.ly" not in rest
    mem = d["figures"]["memory"]
    assert f"Plotly.newPlot('chart-memory', {report._script_json(mem['data'])}" in html
    # the figure is the dashboard's: same builder, same scenario limits
    assert mem["layout"]["uirevision"] == "mem-vs-acc-serve_bytes"
    from engine import hardware
    assert mem["layout"]["shapes"][0]["x0"] == pytest.approx(hardware.get("rtx-4090-24gb").memory_bytes / 1e9)
    # Markdown: the chart data as tables; every plotted point is a row
    assert "The HTML report draws these as interactive charts" in md
    n_points = sum(len(t["x"]) for t in mem["data"] if t.get("customdata"))
    assert len(md_table(md, "strategy")) >= 1
    mem_md = md.split("### Serving memory vs accuracy")[1].split("###")[0]
    assert mem_md.count("\n| ") - 1 == n_points


def test_the_runtime_comparison_is_the_trade_off_tabs(built):
    """The Trade-offs tab's runtime chart (the recommended strategy in every runtime of the serving device) is
    in the report from the same builder: the same figure as the tab draws, its numbers compare_runtimes'."""
    d, html, md = built
    from engine.estimate import compare_runtimes
    from ui import layout
    rs, scn = d["rows"], d["scenario"]
    sid = d["result"]["recommended"]
    fig = d["figures"]["runtimes"]
    assert json.dumps(fig, sort_keys=True) == json.dumps(layout._runtime_chart(rs, scn, sid), sort_keys=True)
    assert f"Plotly.newPlot('chart-runtimes', {report._script_json(fig['data'])}" in html
    row = next(r for r in rs if r["strategy"] == sid)
    cmp = compare_runtimes(scn["model"], **charts.infer_request(row["serve_source"]))
    ok = [e for e in cmp["runtimes"] if e.get("ms_per_token") is not None]
    assert len(ok) >= 2 and sid in fig["layout"]["title"]["text"]
    # Markdown: one row per runtime with the same ms/token, interval and device memory; the matrix's one marked
    table_md = {r[0]: r for r in md_table(md, "runtime · format")}
    assert len(table_md) == len(ok)
    for e in ok:
        r = table_md[f"{e['runtime']} · {e['weights']}"]
        lo, hi = e.get("ms_per_token_low") or e["ms_per_token"], e.get("ms_per_token_high") or e["ms_per_token"]
        assert r[2] == f"{e['ms_per_token']:.2f} [{lo:.2f}, {hi:.2f}]"
        assert r[3] == f"{e['device_bytes'] / 1e9:.2f}" and r[4] == ("yes" if e["fits"] else "no")
        assert (r[5] == "the matrix's runtime") == (e["runtime"] == row["runtime"])
    assert sum(r[5] == "the matrix's runtime" for r in table_md.values()) == 1


def test_runs_section_shows_the_measurements(built):
    d, html, md = built
    assert [r["id"] for r in d["runs"]] == [RUN_ID]                 # picked by the scenario's model
    runs_md = md.split("## Runs")[1].split("## Measured vs estimated")[0]
    assert RUN_ID in runs_md and "lora-merge-gptq-4bit" in runs_md
    assert "| train.tokens_per_s | 879.7 tokens/s |" in runs_md
    assert "| after.perplexity | 1.578 |" in runs_md and "| before.perplexity | 332.4 |" in runs_md
    assert "| train | 4.4 min | 0.826 GB | cpu_peak_rss |" in runs_md
    assert "| quantize.size_on_disk_bytes | 3.37 MB |" in runs_md
    assert "python -m engine runs show r-20261123-051246-77fc75 --json" in md
    assert "strategy: lora-merge-gptq-4bit" in md                   # its config, to run it again


def test_measured_vs_estimated(built):
    from engine import calibration
    d, html, md = built
    part = md.split("## Measured vs estimated")[1].split("## Assumptions")[0]
    pairs = calibration.pairs(d["runs"][0])
    rows = md_table(part, "stage")
    assert pairs and len(rows) == len(pairs)
    for r, p in zip(rows, pairs):                                  # every pair, with its verdict and why
        assert r[:2] == [p["stage"], p["label"]] and r[5] == ("yes" if p["comparable"] else "no")
        assert r[6] == p["why"].replace("|", "\\|")
        if p["error"] is not None:
            assert r[4] == f"{100 * p['error']:+.1f}%"
    # the advisor used the run's evaluation as measured accuracy: the matrix says so, naming the run
    reco_row = next(r for r in md_table(md, "#") if r[1] == "lora-merge-gptq-4bit")
    assert reco_row[8].startswith(f"measured (run {RUN_ID}")


def test_run_selection(store):
    scn = advisor.recommend(SCENARIO, what_if=False)["scenario"]
    assert evidence.select_runs(scn, "none")[0] == []
    assert [r["id"] for r in evidence.select_runs(scn, "all")[0]] == [RUN_ID]
    assert [r["id"] for r in evidence.select_runs(scn, RUN_ID)[0]] == [RUN_ID]
    assert evidence.select_runs({**scn, "model": "qwen2.5-7b"})[0] == []
    with pytest.raises(InputError, match="r-nope"):
        evidence.select_runs(scn, "r-nope")
    with pytest.raises(InputError, match="format"):
        evidence.report(SCENARIO, "none", fmt="pdf")


HOSTILE = "<script>alert('x')</script> | <img src=x onerror=alert(1)>"


def test_hostile_text_is_escaped(store):
    from engine.runs import api
    record_run(api.executor().store, "r-hostile", name=HOSTILE)
    scn = {**SCENARIO, "name": HOSTILE, "description": "</table></section><b>bold</b>"}
    html = evidence.report(scn, runs="r-hostile", fmt="html")
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert html.count("<section") == html.count("</section>") == len(report.SECTIONS)
    md = evidence.report(scn, runs="r-hostile", fmt="md")
    prose = re.sub(r"\n(`{3,})[a-z]*\n.*?\n\1\n", "\n", md, flags=re.S)   # code blocks show text as text
    assert "<script>" not in prose and "<img" not in prose and "&lt;script>" in prose
    assert "name: <script>alert('x')</script>" in md                # the YAML, verbatim inside its code block
    row = next(ln for ln in md.splitlines() if ln.startswith("| name |"))
    assert len(re.split(r"(?<!\\)\|", row)) == 4                   # the pipe in the name is escaped, not a column


def test_cli(store, tmp_path):
    env = {**os.environ, "TUNEQUANT_HOME": str(store)}
    f = tmp_path / "scn.yaml"
    f.write_text(yaml.safe_dump(SCENARIO))

    def run(*args):
        p = subprocess.run([sys.executable, "-m", "engine", "report", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        return p.returncode, p.stdout, p.stderr

    rc, out, err = run("--scenario", str(f), "--format", "md", "--out", str(tmp_path / "r.md"), "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["format"] == "md" and info["path"] == str(tmp_path / "r.md")
    assert info["bytes"] == (tmp_path / "r.md").stat().st_size
    assert info["sections"] == [t for _, t in report.SECTIONS]
    assert "879.7 tokens/s" in (tmp_path / "r.md").read_text()      # the run from the store (by model)
    rc, out, err = run("--scenario", str(f), "--runs", "none", "--out", str(tmp_path / "r.html"), "--json")
    assert rc == 0 and json.loads(out)["format"] == "html"
    assert "Plotly.newPlot" in (tmp_path / "r.html").read_text()
    for bad in (["--scenario", str(tmp_path / "missing.yaml")], ["--scenario", str(f), "--format", "pdf"],
                ["--scenario", str(f), "--runs", "r-nope"]):
        rc, out, err = run(*bad, "--json")
        assert rc == 2 and "error" in json.loads(out), (bad, out, err)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "presets/scenarios").glob("*.yaml")))
def test_every_preset_scenario_reports(store, preset):
    md = evidence.report(preset, runs="none", fmt="md")
    res = evidence.recommend(preset)
    assert [r[1] for r in md_table(md, "#")] == [e["strategy"] for e in res["ranked"]]
    assert f"python -m engine recommend --scenario {preset} --json" in md
    assert all(f"\n## {t}\n" in md for _, t in report.SECTIONS)


def test_unnamed_scenario_and_long_commands(store):
    """A scenario without a name shows no `name: ''` (the dashboard's forms had none); the reproduce
    commands wrap in the HTML instead of being cut at the box's edge."""
    scn = {k: v for k, v in SCENARIO.items() if k not in ("name", "description")}
    md = evidence.report(scn, runs="none", fmt="md")
    assert "name: ''" not in md and "description: ''" not in md
    html = evidence.report(scn, runs="none", fmt="html")
    assert "white-space:pre-wrap" in html.split("</style>")[0]


def test_size_and_family_scenario_has_no_runs_by_model(store):
    scn = {**SCENARIO, "model": {"params_b": 13, "family": "llama-2"}}
    md = evidence.report(scn, fmt="md")
    assert "the scenario names no model id" in md and RUN_ID not in md.split("## Runs")[1]


def test_dashboard_writes_the_report(store):
    from ui import report as ui_report
    path, msg = ui_report.write(SCENARIO, "Markdown (tables)", "every finished run")
    assert path.endswith("tunequant-report-JSON-extraction-on-the-demo-model.md") and "Report ready" in msg
    text = Path(path).read_text()
    def body(doc):                                                  # the document without its "Generated <time>" line
        return [ln for ln in doc.splitlines() if not ln.startswith("Generated ")]
    assert body(text) == body(evidence.report(SCENARIO, "all", "md"))
    assert RUN_ID in text
    none, err = ui_report.write(None, "HTML (charts, opens offline)")
    assert none is None and "no scenario yet" in err
