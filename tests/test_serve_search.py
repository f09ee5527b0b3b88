"""The serving configuration search (docs/advisor.md "Serving configuration search"): with
deploy.runtime left open (or a list), each strategy is served by the runtime that loads its format on
the serving device and meets the goals best: the fastest per token (priority accuracy/balanced) or
the cheapest per million tokens (priority cost), compared at the pessimistic end of each interval;
the batch is the workload's (1) for latency and the largest batch meeting the goal for the price.
Figures here are computed by hand from the roofline formula's inputs (presets/runtimes.yaml)."""
from __future__ import annotations

import math

import pytest
import yaml

from engine import hardware
from engine.advisor import recommend
from engine.errors import InputError
from engine.estimate import formats as F
from engine.estimate.latency import attention_flops_per_token, matmul_params
from engine.models import resolve
from engine.presets import PRESETS_DIR
from engine.spec.scenario import parse_scenario

RT = {r["id"]: r for r in yaml.safe_load((PRESETS_DIR / "runtimes.yaml").read_text())["runtimes"]}
INTERVAL = yaml.safe_load((PRESETS_DIR / "runtimes.yaml").read_text())["interval"]


def _row(out, sid):
    return next(r for r in out["ranked"] if r["strategy"] == sid)


def _serve(row):
    return next(s for s in row["estimates"]["stages"] if s["stage"] == "serve")


def _hand_step_ms(rid: str, arch, fmt: str, dev, batch: int, context: float) -> float:
    """One decode step of a roofline runtime, by hand: max(bytes / (bandwidth x efficiency),
    FLOPs / (peak x flops efficiency)) + host per token + layers x host per layer (class 'low')."""
    d = RT[rid]["decode"]
    eff = d["bw_efficiency"]["gpu"].get("low", d["bw_efficiency"]["gpu"].get("default"))
    cls = (d.get("class_host_s_per_layer") or {}).get("low", 0.0)
    cls = cls.get(dev.arch, cls.get("default", 0.0)) if isinstance(cls, dict) else cls
    host = d["host_s_per_token"]["gpu"] + arch.num_layers * ((d.get("host_s_per_layer") or {}).get("gpu", 0.0) + cls)
    mem = (F.bytes_read_per_token(arch, fmt) + batch * context * arch.kv_cache_bytes_per_token(2)) \
        / (dev.bandwidth_gbs * 1e9 * eff)
    blocks, head = matmul_params(arch)
    comp = batch * (2 * (blocks + head) + 2 * attention_flops_per_token(arch, context)) \
        / (dev.matmul_tflops * 1e12 * d["flops_efficiency"])
    return 1e3 * (max(mem, comp) + host)


def _hand_capacity(rid, arch, fmt, dev, goal_ms, context):
    """The largest batch (<= the runtime's max_batch) whose step meets the goal, and its USD per 1M tokens."""
    b = max(x for x in range(1, RT[rid]["batching"]["max_batch"] + 1)
            if _hand_step_ms(rid, arch, fmt, dev, x, context) <= goal_ms)
    tps = b / (_hand_step_ms(rid, arch, fmt, dev, b, context) / 1e3)
    return b, dev.price_per_hour / (tps * 3600) * 1e6


SC = {"model": "llama-3.1-8b", "task": "chat", "examples": 5000, "hardware": {"gpu": "l4-24gb"},
      "deploy": {"target": "gpu-server", "gpu": "l4-24gb", "runtime": ["vllm", "tensorrt-llm"]},
      "goals": {"max_latency_ms_per_token": 30}}


@pytest.mark.parametrize("priority,expect", [("balanced", "vllm"), ("cost", "tensorrt-llm")])
def test_the_search_picks_by_the_priority_at_the_pessimistic_end_hand_computed(priority, expect):
    # served on a T4 (Turing: no Marlin, so vLLM's 4-bit kernels keep the per-layer time measured on
    # the H100; on an Ampere or Ada GPU such as the L4 they stream like 16-bit weights and vLLM wins
    # both priorities)
    arch, dev = resolve("llama-3.1-8b"), hardware.get("t4-16gb")
    ctx = 512 + (128 - 1) / 2                    # the workload's prompt and half the new tokens
    ms = {r: _hand_step_ms(r, arch, "gptq-4bit", dev, 1, ctx) for r in ("vllm", "tensorrt-llm")}
    lo = {"vllm": INTERVAL["fitted"][0], "tensorrt-llm": INTERVAL["prior"][0]}   # vLLM fitted on GPUs; TRT a prior
    cap = {r: _hand_capacity(r, arch, "gptq-4bit", dev, 30, ctx) for r in ms}
    # balanced: the fastest at the slow end: vLLM 23.2 / 0.6 = 38.6 ms beats TRT-LLM 20.7 / 0.5 = 41.4 ms
    slow = {r: ms[r] / lo[r] for r in ms}
    # cost: the cheapest at that end: TRT-LLM serves 30 sequences within 30 ms, vLLM 22
    dear = {r: cap[r][1] / lo[r] for r in ms}
    key = slow if priority == "balanced" else dear
    assert min(key, key=key.get) == expect
    out = recommend({**SC, "deploy": {**SC["deploy"], "gpu": "t4-16gb"}, "goals": {**SC["goals"], "priority": priority}},
                    what_if=False)
    s = _serve(_row(out, "ptq-gptq-4bit"))
    assert s["runtime"] == expect
    assert s["decode_ms_per_token"] == pytest.approx(ms[expect], rel=1e-6)
    assert s["decode_ms_per_token_high"] == pytest.approx(slow[expect], rel=1e-6)
    c = s["config"]
    assert c["max_batch_within_goal"] == cap[expect][0]
    assert c["usd_per_million_tokens"] == pytest.approx(cap[expect][1], rel=1e-6)
    assert c["chosen_by"] == ("latency" if priority == "balanced" else "cost") and c["searched"]
    assert [t["runtime"] for t in c["tried"]] == ["vllm", "tensorrt-llm"]      # the target's default first
    # the row says it: "served with vllm gptq-4bit at batch 1: 23.2 ms/token of 30; up to 22 ..."
    assert c["text"].startswith(f"served with {expect} gptq-4bit at batch 1: {ms[expect]:.1f} ms/token of 30; "
                                f"up to {cap[expect][0]} concurrent sequences within the goal")
    row = _row(out, "ptq-gptq-4bit")
    assert any(c["text"] in w for w in row["why"])
    assert row["estimates"]["serving"] == c                              # what the dashboard can show
    assert row["estimates"]["latency_ms_per_token"] == pytest.approx(ms[expect], rel=1e-6)
    assert row["estimates"]["cost"]["serve_usd_per_million_tokens"] == pytest.approx(cap[expect][1], rel=1e-6)


def test_the_search_turns_an_infeasible_verdict_feasible():
    # the HR chatbot (13B on an L4, 60 ms/token): QLoRA's NF4 weights in vLLM run eagerly (bitsandbytes:
    # no CUDA graphs), 87 ms/token; the same weights with transformers' generate decode in ~46 ms
    fixed = recommend({**_hr(), "deploy": {"target": "gpu-server", "gpu": "l4-24gb", "runtime": "vllm"}},
                      what_if=False)
    q = _row(fixed, "qlora")
    assert not q["feasible"] and q["blocked_by"] == ["latency"]
    assert _serve(q)["runtime"] == "vllm" and _serve(q)["config"]["tried"][0]["runtime"] == "vllm"
    assert len(_serve(q)["config"]["tried"]) == 1 and not _serve(q)["config"]["searched"]
    searched = recommend(_hr(), what_if=False)
    q = _row(searched, "qlora")
    assert q["feasible"], q["blocked"]
    s = _serve(q)
    assert s["runtime"] == "transformers" and s["decode_ms_per_token"] < 60
    tried = {t["runtime"]: t for t in s["config"]["tried"]}
    assert set(tried) == {"vllm", "transformers"} and not tried["vllm"]["meets_latency"]
    assert tried["vllm"]["ms_per_token"] == pytest.approx(_serve(_row(fixed, "qlora"))["decode_ms_per_token"])
    # no published row measures vLLM with bitsandbytes weights: the slow end is the `unmeasured` one
    v = tried["vllm"]["ms_per_token"]
    assert f"vllm {v:.1f} [{v / INTERVAL['unmeasured'][0]:.1f}], misses the goal" in s["config"]["why"]
    # the CLI's table says how the recommendation is served
    from engine.cli.recommend import format_table
    rec = _row(searched, searched["recommended"])
    assert f"serving: {rec['estimates']['serving']['text']}" in format_table({**searched, "what_would_change": None})


def _hr(**goals):
    return {"model": "llama-2-13b", "task": "chat", "examples": 3000, "hardware": {"gpu": "l4-24gb"},
            "deploy": {"target": "gpu-server", "gpu": "l4-24gb"},
            "goals": {"max_latency_ms_per_token": 60, "min_accuracy_retention": 0.95, **goals}}


def test_infeasible_only_when_no_configuration_fits_and_the_reason_names_the_one_tried():
    out = recommend(_hr(max_latency_ms_per_token=30), what_if=False)
    # latency: neither runtime that loads NF4 meets 30 ms; the fastest that fits is named
    q = _row(out, "qlora")
    s = _serve(q)
    tried = s["config"]["tried"]
    fastest = min(tried, key=lambda t: t["ms_per_token"])
    assert s["runtime"] == fastest["runtime"] == "transformers" and s["config"]["chosen_by"] == "fastest"
    b = next(b for b in q["blocked"] if b["constraint"] == "latency")
    assert b["value"] == pytest.approx(fastest["ms_per_token"])
    assert "even with the fastest that fits of 2 runtimes tried" in b["text"] and "with transformers" in b["text"]
    # memory: 13B in bf16 fits no runtime on 24 GB; the smallest configuration is named
    base = _row(out, "bf16-baseline")
    s = _serve(base)
    assert s["config"]["chosen_by"] == "smallest" and not any(t["fits"] for t in s["config"]["tried"])
    assert s["device_bytes"] == min(t["device_bytes"] for t in s["config"]["tried"])
    m = next(b for b in base["blocked"] if b["constraint"] == "memory" and b.get("stage") == "serve")
    assert f"even at the smallest of {len(s['config']['tried'])} configurations tried ({s['runtime']} at batch 1)" \
        in m["text"]
    # what would change is consistent with it: the latency relaxation is the fastest configuration's figure
    out = recommend(_hr(max_latency_ms_per_token=10))
    relax = out["what_would_change"]["relaxation"]
    assert list(relax["change"]) == ["goals.max_latency_ms_per_token"]
    row = _row(out, relax["strategy"])
    assert relax["change"]["goals.max_latency_ms_per_token"] == math.ceil(row["estimates"]["latency_ms_per_token"])
    assert "of 2 runtimes tried" in out["near_miss"]["text"] or "runtimes tried" in row["blocked"][0]["text"]


def test_deploy_runtime_contract():
    base = {"model": "llama-3.1-8b", "task": "chat", "hardware": {"gpu": "rtx-4090-24gb"},
            "deploy": {"target": "consumer-gpu", "gpu": "rtx-4090-24gb"}}
    dep = lambda rt: parse_scenario({**base, "deploy": {**base["deploy"], "runtime": rt}}).deploy.runtime
    assert parse_scenario(base).deploy.runtime is None
    assert dep("any") is None and dep("ANY") is None
    assert dep("llama.cpp") == "llama.cpp" and dep(["vllm"]) == "vllm"
    assert dep(["llama.cpp", "vllm", "llama.cpp"]) == ["llama.cpp", "vllm"]
    with pytest.raises(InputError, match="deploy.runtime: an empty list"):
        dep([])
    with pytest.raises(InputError, match="deploy.runtime: unknown runtime 'tgi'"):
        dep(["vllm", "tgi"])
    with pytest.raises(InputError, match="deploy.runtime: mlx does not run on rtx-4090-24gb"):
        dep(["vllm", "mlx"])


def test_a_list_restricts_the_search_and_blocks_what_none_of_it_loads():
    out = recommend({**SC, "deploy": {**SC["deploy"], "runtime": ["vllm", "llama.cpp"]}}, what_if=False)
    nf4 = _serve(_row(out, "ptq-nf4"))
    assert [t["runtime"] for t in nf4["config"]["tried"]] == ["vllm"]          # transformers is not allowed
    assert "the only runtime that loads nf4 on l4-24gb of deploy.runtime: vllm, llama.cpp" == nf4["runtime_why"]
    ao = _row(out, "ptq-torchao-int4")
    assert "format" in ao["blocked_by"]
    assert any(b["text"].startswith("none of the runtimes of deploy.runtime (vllm, llama.cpp) loads torchao-int4")
               for b in ao["blocked"])
    # a list's order is the order of the candidates (the earlier wins a tie)
    out = recommend({**SC, "deploy": {**SC["deploy"], "runtime": ["tensorrt-llm", "transformers", "vllm"]}},
                    what_if=False)
    assert [t["runtime"] for t in _serve(_row(out, "ptq-gptq-4bit"))["config"]["tried"]] == \
        ["tensorrt-llm", "transformers", "vllm"]
    # one named runtime: only it is used (the existing behaviour)
    out = recommend({**SC, "deploy": {**SC["deploy"], "runtime": "tensorrt-llm"}}, what_if=False)
    s = _serve(_row(out, "ptq-gptq-4bit"))
    assert s["runtime"] == "tensorrt-llm" and s["runtime_why"] == "given" and len(s["config"]["tried"]) == 1
