"""The advisor searches the training knobs that do not change what is learned (micro-batch with
accumulation, checkpointing, optimizer state format, LoRA rank within the user's bounds) before
it calls a training strategy infeasible, and the run config of a row trains exactly that way."""
from __future__ import annotations

import pytest

from engine import strategies
from engine.advisor import recommend
from engine.errors import InputError
from engine.estimate import estimate_train
from engine.spec.run import RunSpec
from engine.spec.scenario import parse_scenario

LIMIT_4090 = 25393692672
SC_34B = {"model": {"params_b": 34, "family": "llama-2"}, "task": "generation", "examples": 150000,
          "hardware": {"gpu": "rtx-4090-24gb", "count": 1}, "deploy": {"target": "consumer-gpu"}, "measured": "none"}


def _row(out, sid):
    return next(r for r in out["ranked"] if r["strategy"] == sid)


def _train(row):
    return next(s for s in row["estimates"]["stages"] if s["stage"] == "train")


@pytest.fixture(scope="module")
def out34():
    return recommend(SC_34B, what_if=False, runs=[])


def test_34b_qlora_on_one_4090_fits_with_the_found_configuration(out34):
    q = _row(out34, "qlora")
    st = _train(q)
    # the default step (batch 4, AdamW) does not fit; the planner says so for that very request
    default = estimate_train(parse_scenario(SC_34B).arch(), "qlora", seq_len=512, batch_size=4,
                             gpu="rtx-4090-24gb", loss="chunked")
    assert default["device_bytes"] > LIMIT_4090
    assert q["feasible"], q["why"][:3]
    planner = estimate_train(parse_scenario(SC_34B).arch(), **st["request"])
    assert st["device_bytes"] == planner["device_bytes"] <= LIMIT_4090
    c = st["config"]
    assert (c["batch_size"], c["grad_accum"]) != (4, 1) and c["batch_size"] * c["grad_accum"] == 4
    assert c["tried"] >= 1 and not c["default"]
    # the row says how it fits and what it costs in speed
    text = next(w for w in q["why"] if w.startswith("ok: train on"))
    assert f"fits at {c['text']}: {planner['device_bytes'] / 1e9:.1f} GB" in text
    assert "slower than batch 4" in text and "the default needs" in text
    assert c["speed_vs_default"] == pytest.approx(default["tokens_per_s"] / planner["tokens_per_s"], rel=1e-3)
    # training time follows the configuration that runs, not the default
    assert st["tokens_per_s"] == pytest.approx(planner["tokens_per_s"])


def test_34b_with_150k_examples_recommends_fine_tuning_not_ptq_only(out34):
    assert out34["recommended"] is not None
    rec = _row(out34, out34["recommended"])
    assert rec["family"] != "ptq-only" and strategies.get(rec["strategy"]).get("train"), rec["strategy"]


def test_the_run_config_of_a_row_trains_exactly_as_estimated(out34):
    """The translator is the one place: the row's run config, read back as a run would read it,
    gives the planner the same training request the advisor chose."""
    for sid in ("qlora", "gptq-qlora", "lora"):
        r = _row(out34, sid)
        st = _train(r)
        cfg = r["run_config"]
        spec = RunSpec.parse(cfg)                       # a valid run config as it is
        assert spec.train.optimizer == st["request"]["optimizer"]
        assert spec.train.grad_accum == st["config"]["grad_accum"]
        w = strategies.Workload.from_spec(spec, "rtx-4090-24gb")
        back = strategies.planner_requests(strategies.get(sid), parse_scenario(SC_34B).arch(), w)["train"]
        assert {k: v for k, v in back.items() if k != "model"} == st["request"]


def test_infeasible_only_when_nothing_fits_and_it_names_the_smallest_tried(out34):
    full = _row(out34, "full-finetune")
    b = next(x for x in full["blocked"] if x.get("stage") == "train")
    st = _train(full)
    assert "even at the smallest of 18 configurations tried" in b["text"]
    assert st["config"]["text"] in b["text"]
    # every configuration of the search needs at least this much (the search is over these 18)
    arch = parse_scenario(SC_34B).arch()
    for bs in (4, 2, 1):
        for ck in (False, True):
            for opt in ("adamw", "adamw-8bit", "paged-adamw-8bit"):
                e = estimate_train(arch, "full", seq_len=512, batch_size=bs, grad_accum=4 // bs, grad_ckpt=ck,
                                   optimizer=opt, gpu="rtx-4090-24gb", loss="chunked")
                assert e["device_bytes"] >= st["device_bytes"] > LIMIT_4090


def test_lora_rank_is_searched_within_the_users_bounds():
    sc = {**SC_34B, "lora_rank": {"min": 4, "max": 64}}
    out = recommend(sc, what_if=False, runs=[])
    st = _train(_row(out, "qlora"))
    r = st["config"]["lora_rank"]
    assert 4 <= r <= 64 and r < 64                  # rank 64's adapters do not fit beside a 34B base
    arch = parse_scenario(sc).arch()
    # the next rank up does not fit in even its smallest configuration: the largest rank that fits won
    up = estimate_train(arch, "qlora", seq_len=512, batch_size=1, grad_accum=4, grad_ckpt=True, lora_rank=2 * r,
                        optimizer="paged-adamw-8bit", gpu="rtx-4090-24gb", loss="chunked")
    assert up["device_bytes"] > LIMIT_4090
    assert f"LoRA rank {r}" in st["config"]["text"]
    with pytest.raises(InputError, match="lora_rank"):
        parse_scenario({**SC_34B, "lora_rank": {"min": 32, "max": 8}})


def test_a_roomy_gpu_keeps_the_default_or_a_faster_configuration():
    """Where the default fits, the search never picks something slower: 13B QLoRA on an A100 80GB."""
    out = recommend({"model": "llama-2-13b", "task": "chat", "examples": 5000, "measured": "none",
                     "hardware": {"gpu": "a100-80gb"}}, what_if=False, runs=[])
    st = _train(_row(out, "qlora"))
    default = estimate_train("llama-2-13b", "qlora", seq_len=512, batch_size=4, gpu="a100-80gb", loss="chunked")
    assert st["tokens_per_s"] >= default["tokens_per_s"] * 0.98
    assert st["config"]["speed_vs_default"] <= 1.0 / 0.98
