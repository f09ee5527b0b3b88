"""One typed run record and one fold of the event stream (engine/record.py), read the same way by
the runs screen, compare, ``runs show``/``run``, the report, calibration and the advisor's evidence."""
from __future__ import annotations

import copy

import pytest

from engine.record import EventFold, RunRecord, StageResult, fold
from test_report import RESULT, RUN_ID

RUN = {"id": RUN_ID, "name": "", "strategy": "lora-merge-gptq-4bit", "model": "demo:tiny-llama", "device": "cpu",
       "status": "finished", "created": 100.0, "started": 101.0, "ended": 400.5,
       "spec": {"model": "demo:tiny-llama", "strategy": "lora-merge-gptq-4bit", "dataset": {"demo": "json-extraction"}},
       "estimate": {}, "versions": {"torch": "2.13.0"}, "machine": {"device": "cpu"}, "result": RESULT}

EVENTS = [
    {"seq": 1, "ts": 1.0, "type": "queued", "strategy": "lora", "model": "m", "device": "cpu"},
    {"seq": 2, "ts": 2.0, "type": "started", "pid": 1, "device": "cpu"},
    {"seq": 3, "ts": 3.0, "type": "stage_started", "stage": "train", "index": 0, "total": 2},
    {"seq": 4, "ts": 4.0, "type": "step", "step": 1, "total": 2, "loss": 3.0, "tokens_per_s": 100.0},
    {"seq": 5, "ts": 5.0, "type": "log", "message": "half way"},
    {"seq": 6, "ts": 6.0, "type": "step", "step": 2, "total": 2, "loss": 2.5},
    {"seq": 7, "ts": 7.0, "type": "stage_finished", "stage": "train", "index": 0, "duration_s": 4.0,
     "peak_mem_bytes": 123, "mem_source": "cpu_peak_rss", "result": {"steps": 2}},
    {"seq": 8, "ts": 8.0, "type": "stage_started", "stage": "evaluate", "index": 1, "total": 2},
    {"seq": 9, "ts": 9.0, "type": "eval", "name": "after", "metrics": {"perplexity": 9.0}},
    {"seq": 10, "ts": 9.5, "type": "metric", "name": "after.decode_tokens_per_s", "value": 50.0, "unit": "tokens/s"},
    {"seq": 11, "ts": 9.6, "type": "warning", "message": "careful"},
    {"seq": 12, "ts": 10.0, "type": "finished", "status": "finished", "reason": None},
]


def test_the_record_of_a_stored_run():
    rec = RunRecord.of(RUN)
    assert [s.stage for s in rec.stages] == [s["stage"] for s in RESULT["stages"]]
    assert rec.stage("train").peak_mem_bytes == RESULT["stages"][0]["peak_mem_bytes"] and not rec.stage("train").on_cuda
    assert rec.wall_s == pytest.approx(299.5) and rec.dataset == "demo:json-extraction"
    assert rec.before == RESULT["eval"]["before"] and rec.after == RESULT["eval"]["after"]
    ev = rec.evaluation
    assert ev is not None and ev.before["perplexity"] == RESULT["eval"]["before"]["perplexity"]
    assert rec.metric("train.loss_first") == 5.4372 and rec.metric("nope", 7) == 7
    empty = RunRecord.of({"id": "r-x", "status": "queued"})
    assert empty.stages == () and empty.evaluation is None and empty.wall_s is None
    assert StageResult.of({"stage": "quantize", "mem_source": "cuda_max_memory_allocated", "extra": 1}).on_cuda


def test_the_fold_is_incremental_and_idempotent():
    whole = fold(EVENTS)
    part = fold(EVENTS[5:], into=fold(EVENTS[:5]))
    again = fold(EVENTS, into=whole)                     # every event already seen: nothing changes
    assert part.to_dict() == whole.to_dict() == again.to_dict()
    assert whole.status == "finished" and whole.started_ts == 2.0 and whole.ended_ts == 10.0
    assert whole.points == [[1, 3.0, "train", None, 100.0], [2, 2.5, "train", None, None]]
    assert whole.last_tokens_per_s == 100.0 and whole.last_step_event["step"] == 2
    assert whole.last_step == {}                         # the evaluate stage started after it: no step running
    assert whole.stages_done == [{"stage": "train", "index": 0, "duration_s": 4.0, "peak_mem_bytes": 123,
                                  "mem_source": "cpu_peak_rss", "stopped": False, "failed": False}]
    assert whole.evals_by_name() == {"after": {"perplexity": 9.0}}
    assert whole.metrics_by_name() == {"after.decode_tokens_per_s": (50.0, "tokens/s")}
    assert whole.logs == ["half way"] and whole.warnings == ["careful"] and whole.by_type["step"] == 2
    assert EventFold.from_dict(whole.to_dict()) == whole
    capped = fold(EVENTS + [{"seq": 12 + i, "ts": 11.0, "type": "log", "message": str(i)} for i in range(1, 6)],
                  into=EventFold(max_logs=3))
    assert capped.logs == ["3", "4", "5"]


def test_every_reader_folds_the_same_way():
    """`runs show` (events.summary), the runs screen (apply_events) and compare (measured) read one fold."""
    from engine.runs.events import summary
    from ui import compare, runs
    s = summary(EVENTS)
    view = runs.apply_events(runs.new_view("r-1"), EVENTS)
    m = compare.measured(RUN, EVENTS)
    assert s["stages"] == view["stages_done"] == m["stages"]
    assert s["last_step"] == EVENTS[5] and view["last_step_event"] == EVENTS[5] and view["last_step"] == {}
    assert m["train_tokens_per_s"] == 100.0 and m["evals"] == {"after": {"perplexity": 9.0}}
    assert view["status"] == "finished" and view["seq"] == 12 and view["points"][-1][1] == 2.5
    # flat events and {payload} events fold alike
    wrapped = [{k: v for k, v in e.items() if k in ("seq", "ts", "type")}
               | {"payload": {k: v for k, v in e.items() if k not in ("seq", "ts", "type")}} for e in EVENTS]
    assert fold(wrapped).stages_done == fold(EVENTS).stages_done


def test_calibration_and_evidence_read_the_record():
    from engine import calibration
    from engine.advisor.measured import measured_from_runs
    run = copy.deepcopy(RUN)
    rows = measured_from_runs([run])
    assert rows and {r["dataset"] for r in rows} == {"demo:json-extraction"}
    assert rows[0]["baseline"] == RESULT["eval"]["before"][rows[0]["metric"]]
    assert calibration.pairs(run) == []                  # no stored estimate: nothing to pair


def test_preparation_and_a_stopped_stage_read_as_what_they_were():
    """A demo-model build before the first stage is its own step (never in a stage's time); a stage
    that ended on a stop is not 'done' in the fold or in the log line."""
    from engine.runs.events import line
    what = "build the demo model micro-llama"
    evs = [{"seq": 1, "ts": 1.0, "type": "started", "pid": 1, "device": "cpu"},
           {"seq": 2, "ts": 1.5, "type": "prepare", "what": what, "step": 0, "total": None, "done": False},
           {"seq": 3, "ts": 3.0, "type": "prepare", "what": what, "step": 25, "total": 50, "done": False},
           {"seq": 4, "ts": 9.0, "type": "prepare", "what": what, "done": True, "duration_s": 7.5},
           {"seq": 5, "ts": 9.1, "type": "stage_started", "stage": "quantize", "index": 0, "total": 2},
           {"seq": 6, "ts": 12.0, "type": "stage_finished", "stage": "quantize", "index": 0, "duration_s": 2.9,
            "stopped": True, "peak_mem_bytes": 1, "mem_source": "cpu_peak_rss"}]
    mid = fold(evs[:3])
    assert mid.prepare["step"] == 25 and mid.prepare["started_ts"] == 1.5 and not mid.prepare["done"]
    f = fold(evs)
    assert f.prepare["done"] and f.prepare["duration_s"] == 7.5 and f.prepare["started_ts"] == 1.5
    assert f.stages_done[0]["stopped"] is True and f.stages_done[0]["duration_s"] == 2.9
    assert "stopped after" in line(evs[5]) and "done" not in line(evs[5])
    assert "not part of any stage" in line(evs[3]) and "(25/50)" in line(evs[2])
