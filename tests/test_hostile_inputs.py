"""Bad input of issue 16, one test per item: each must end as exit 2 with {"error"} naming the
problem (or an inline refusal / a failed run saying why), never a traceback, a hang or a silent
wrong answer. The CLI runs in-process (engine.cli.main) where no worker is needed."""
from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
HOOK = f"{ROOT / 'tests' / 'hostile_stages.py'}:STAGES"
CFG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000,
       "intermediate_size": 128, "model_type": "llama"}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("TUNEQUANT_HOME", str(h))
    monkeypatch.delenv("TUNEQUANT_DB", raising=False)
    monkeypatch.delenv("TUNEQUANT_STAGES", raising=False)
    from engine.runs import api
    monkeypatch.setattr(api, "_executor", None, raising=False)
    return h


def run_cli(capsys, *args, stdin: str | None = None):
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        rc = cli_main(list(args))
    finally:
        sys.stdin = sys.__stdin__
    out = capsys.readouterr().out
    return rc, out


def refused(capsys, *args, stdin=None) -> str:
    rc, out = run_cli(capsys, *args, stdin=stdin)
    assert rc == 2, (rc, out)
    return json.loads(out)["error"]


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity (what a strict JSON reader does)."""
    def bad(c):
        raise ValueError(f"not JSON: {c}")
    return json.loads(text, parse_constant=bad)


def scenario_file(tmp_path, text: str | bytes, name="s.yaml") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def run_config(tmp_path, **over) -> Path:
    spec = {"name": "", "model": "tiny-test", "strategy": "lora", "device": "cpu", "train": {"steps": 3}}
    for k, v in over.items():
        spec[k] = {**spec.get(k, {}), **v} if isinstance(v, dict) and isinstance(spec.get(k), dict) else v
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))


# ---- files that hang or crash the reader --------------------------------------------------------

def test_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    t0 = time.monotonic()
    msg = refused(capsys, "recommend", "--scenario", str(scenario_file(tmp_path, "model: llama-3.1-8b\n" + BOMB)),
                  "--json")
    assert "aliases" in msg
    msg = refused(capsys, "run", "--config", str(scenario_file(tmp_path, "model: x\n" + BOMB, "r.yaml")), "--json")
    assert "aliases" in msg
    assert time.monotonic() - t0 < 30          # not a timing assertion of speed: a hang guard


def test_non_utf8_scenario_and_run_config(tmp_path, capsys):
    bad = "model: llama-3.1-8b\ntask: chat\nname: caf\xe9\n".encode("latin-1")
    assert "not UTF-8" in refused(capsys, "recommend", "--scenario", str(scenario_file(tmp_path, bad)), "--json")
    assert "not UTF-8" in refused(capsys, "run", "--config", str(scenario_file(tmp_path, bad, "r.yaml")), "--json")


@pytest.mark.parametrize("content, expect", [
    (b"\x00\x01\x02\xff\xfe binary", "not UTF-8"),
    (b"[1, 2, 3]", "JSON object"),
    (json.dumps({**CFG, "hidden_size": "64"}).encode(), "hidden_size must be a whole number"),
    (json.dumps({**CFG, "hidden_size": float("nan")}).encode(), "hidden_size must be a whole number"),
    (json.dumps(CFG).replace('"vocab_size": 1000', '"vocab_size": 1e400').encode(), "vocab_size must be a whole"),
    (json.dumps({**CFG, "hidden_size": -64}).encode(), "from 1 to"),
])
def test_bad_config_json(tmp_path, capsys, content, expect):
    p = tmp_path / "config.json"
    p.write_bytes(content)
    msg = refused(capsys, "estimate", "train", "--model", str(p), "--method", "lora", "--json")
    assert expect in msg, msg


def test_nested_json_dataset_is_a_problem_not_a_crash(tmp_path, capsys):
    from engine.runs.data import validate_dataset
    p = tmp_path / "deep.jsonl"
    p.write_text('{"text": "ok row"}\n' * 3 + "[" * 100_000 + "]" * 100_000 + "\n")
    rep = validate_dataset(str(p))
    assert any(pr["kind"] == "parse" for pr in rep["problems"])
    q = tmp_path / "deep.json"
    q.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(Exception, match="nested too deeply"):
        validate_dataset(str(q))


def test_calibrate_store_that_is_a_system_file(capsys):
    assert "not a tunequant run store" in refused(capsys, "calibrate", "--store", "/etc/passwd", "--json")


def test_export_and_report_to_unwritable_paths(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert "does not exist" in refused(capsys, "calibrate", "--allow-empty", "--export", str(blocker / "x.json"),
                                       "--json")
    assert "does not exist" in refused(capsys, "report", "--scenario", "ticket-routing", "--runs", "none",
                                       "--out", str(blocker / "r.html"), "--json")
    assert "is a folder" in refused(capsys, "report", "--scenario", "ticket-routing", "--runs", "none",
                                    "--out", str(tmp_path), "--json")


# ---- estimate batch ----------------------------------------------------------------------------------

def test_batch_one_bad_line_does_not_abort_the_rest(capsys):
    lines = [{"kind": "train", "model": "llama-3.1-8b", "method": "lora", "seq_len": 1e300},
             {"kind": "infer", "model": "llama-3.1-8b"}]
    rc, out = run_cli(capsys, "estimate", "batch", stdin="\n".join(map(json.dumps, lines)) + "\n")
    answers = [json.loads(x) for x in out.splitlines()]
    assert rc == 0 and len(answers) == 2
    assert "error" in answers[0] and "weights_bytes" in answers[1]


def test_batch_accepts_size_and_family_as_readme_documents(capsys):
    line = {"kind": "train", "model": {"params_b": 13, "family": "llama-2"}, "method": "lora"}
    rc, out = run_cli(capsys, "estimate", "batch", stdin=json.dumps(line) + "\n")
    ans = json.loads(out)
    assert "error" not in ans and ans["peak_allocated_bytes"] > 13e9 * 2 * 0.9


# ---- run values refused before a run exists ------------------------------------------------------------

@pytest.mark.parametrize("over, expect", [
    ({"train": {"learning_rate": float("inf")}}, "finite"),
    ({"train": {"learning_rate": float("nan")}}, "finite"),
    ({"quantize": {"group_size": 0}}, "group_size 0"),
    ({"train": {"seq_len": 10**9}}, "less than or equal to 1048576"),
    ({"train": {"lora_rank": 10**9}}, "less than or equal to 4096"),
])
def test_meaningless_run_values_are_refused(tmp_path, capsys, home, over, expect):
    msg = refused(capsys, "run", "--config", str(run_config(tmp_path, **over)), "--json", "--stages", HOOK)
    assert expect in msg, msg
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())     # no run recorded


@pytest.mark.parametrize("value", [float("nan"), 42, ["a", "list"], {"a": "dict"}])
def test_dataset_values_that_are_not_text(tmp_path, value):
    from engine.errors import InputError
    from engine.runs import data
    from engine.spec.run import DataSpec
    p = tmp_path / "d.jsonl"
    rows = [{"text": f"fine row {i}"} for i in range(5)] + [{"text": value}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match="not text"):
        data.check(DataSpec(path=str(p)))


def test_nan_loss_fails_the_run_and_says_the_step(tmp_path):
    from engine.runs.executor import Executor
    from engine.runs.store import RunStore
    ex = Executor(RunStore(tmp_path / "runs.sqlite"))
    rid = ex.launch({"name": "nan", "model": "tiny-test", "strategy": "lora", "device": "cpu",
                     "train": {"steps": 6}}, stages=HOOK)
    run = ex.wait(rid, timeout=120)
    assert run["status"] == "failed" and "loss became NaN at step 3" in run["reason"], run["reason"]


def test_json_output_and_event_log_are_valid_json(tmp_path, capsys, home):
    from engine.runs.executor import Executor
    from engine.runs.store import RunStore
    ex = Executor(RunStore(home / "runs.sqlite"))
    rid = ex.launch({"name": "naneval", "model": "tiny-test", "strategy": "lora", "device": "cpu",
                     "train": {"steps": 2}}, stages=HOOK)
    run = ex.wait(rid, timeout=120)
    assert run["status"] == "finished"
    rc, out = run_cli(capsys, "runs", "show", rid, "--json")
    shown = strict_json(out)
    assert rc == 0 and "NaN" not in out and "Infinity" not in out
    for ln in (Path(run["workdir"]) / "events.jsonl").read_text().splitlines():
        strict_json(ln)
    assert "null" in out and shown


# ---- size caps --------------------------------------------------------------------------------------------

def test_oversized_scenario_and_dataset_are_refused_with_the_limit(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNEQUANT_MAX_CONFIG_BYTES", "10000")
    big = scenario_file(tmp_path, "model: llama-3.1-8b\ntask: chat\ndescription: '" + "x" * 20000 + "'\n")
    msg = refused(capsys, "recommend", "--scenario", str(big), "--json")
    assert "limit is 0.01 MB" in msg and "TUNEQUANT_MAX_CONFIG_BYTES" in msg
    monkeypatch.setenv("TUNEQUANT_MAX_DATASET_BYTES", "5000")
    d = tmp_path / "big.jsonl"
    d.write_text("".join(json.dumps({"text": f"row {i} " + "y" * 80}) + "\n" for i in range(200)))
    msg = refused(capsys, "run", "--config", str(run_config(tmp_path, model="smollm2-135m", dataset={"path": str(d)})),
                  "--json")
    assert "TUNEQUANT_MAX_DATASET_BYTES" in msg


# ---- runs list / report outputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("limit", ["0", "-1"])
def test_runs_list_limit_must_be_positive(capsys, limit):
    assert "--limit must be 1 or more" in refused(capsys, "runs", "list", "--limit", limit, "--json")


def test_report_without_out_goes_to_the_workspace_not_the_cwd(tmp_path, capsys, monkeypatch, home):
    monkeypatch.chdir(tmp_path)
    rc, out = run_cli(capsys, "report", "--scenario", "ticket-routing", "--runs", "none", "--json")
    assert rc == 0, out
    path = Path(json.loads(out)["path"])
    assert path.parent == home / "reports" and path.is_file()
    assert not list(tmp_path.glob("report-*"))


def test_report_out_never_creates_folders(tmp_path, capsys):
    target = tmp_path / "nonexistent" / "dir" / "x.html"
    assert "does not exist" in refused(capsys, "report", "--scenario", "ticket-routing", "--runs", "none",
                                       "--out", str(target), "--json")
    assert not (tmp_path / "nonexistent").exists()


# ---- stop inside long library loops (GPTQ layer by layer, the demo model's build) ---------------------

def _stop_after(n: int):
    """A should_stop that says "stop" from its n-th call on (a stop asked while the loop runs)."""
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] >= n
    return should_stop, calls


def test_gptq_quantization_stops_between_layers(micro_home, tmp_path, tmp_path_factory, monkeypatch):
    """gptqmodel quantizes layer by layer; with a stop asked after the first layer's forward the
    stage leaves at the next layer (StageStopped) and writes no quantized model."""
    from engine import strategies
    from engine.runs.context import StageContext, StageStopped
    from engine.runs.stages import STAGES
    from engine.spec.run import RunSpec
    monkeypatch.setenv("TUNEQUANT_HOME", str(tmp_path_factory.getbasetemp() / "tq-home"))   # micro_home's model
    rs = RunSpec.parse({"model": "demo:micro-llama", "strategy": "ptq-gptq-4bit", "device": "cpu",
                        "train": {"seq_len": 64}, "dataset": {"demo": "tickets", "max_examples": 40}})
    should_stop, calls = _stop_after(3)       # 1: the stage's own check before it starts; 2: layer 0; 3: layer 1
    ctx = StageContext(run_id="t", spec=rs, strategy=strategies.get("ptq-gptq-4bit"),
                       stage={"stage": "quantize", "method": "gptq", "bits": 4, "group_size": 64,
                              "calibration_samples": 8}, index=0, workdir=tmp_path, state={}, device="cpu",
                       should_stop=should_stop)
    with pytest.raises(StageStopped, match="between decoder layers"):
        STAGES["quantize"](ctx)
    assert calls["n"] == 3
    assert not (tmp_path / "quantized-gptq-4bit").exists()


def test_demo_model_build_stops_during_pretraining(tmp_path, monkeypatch):
    from engine.runs import demo
    from engine.runs.context import StageStopped
    monkeypatch.setenv("TUNEQUANT_HOME", str(tmp_path / "fresh"))
    should_stop, calls = _stop_after(5)       # the corpus and tokenizer checks, then pretraining steps
    with pytest.raises(StageStopped, match="stopped on request"):
        demo.ensure_model("micro-llama", should_stop=should_stop)
    assert not demo.is_built("micro-llama")
    assert not list(demo.model_dir("micro-llama").parent.glob("*.building-*"))     # nothing half-built left
