"""Calibration: pairs of measured vs estimated, the fit (hand-computed factors), the error
before/after on the recorded CPU runs (held back), export/import, the estimate's
``calibration`` key and the ``calibrate`` command."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from engine import calibration as C
from engine import estimate as E
from engine import strategies
from engine.runs.store import finished_runs

ROOT = Path(__file__).resolve().parent.parent
RECORDED = [ROOT / "bench" / "measurements" / "calibration-cpu-2026-11-23.json"]
CPU = "cpu-x86-pytorch"


def rec(run_id, term="train.tokens_per_s", est=100.0, meas=200.0, device=CPU, versions=None):
    return {"run_id": run_id, "term": term, "device": device, "versions": versions or C.installed_versions_key(),
            "estimated": est, "measured": meas}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEQUANT_HOME", str(tmp_path))
    monkeypatch.delenv("TUNEQUANT_DB", raising=False)
    monkeypatch.setenv("TUNEQUANT_CALIBRATION", str(tmp_path / "calibration.json"))
    return tmp_path


# ---- the fit ------------------------------------------------------------------------------------
def test_factor_is_the_shrunk_geometric_mean():
    assert C.settings()["prior_runs"] == 1 and C.settings()["min_runs"] == 2
    f = C.fit([rec(f"r{i}") for i in range(3)])
    (exact,) = [x for x in f["factors"] if x["versions"] != "*"]
    assert exact["factor"] == pytest.approx(2 ** 0.75)          # exp(3/(3+1) ln 2) = 1.682
    assert exact["gmean"] == pytest.approx(2.0) and exact["spread"] == pytest.approx(1.0)
    assert exact["runs"] == 3 and exact["applies"] and exact["run_ids"] == ["r0", "r1", "r2"]
    # measured 1x, 4x: geometric mean 2, spread exp(pstdev(0, ln 4)) = exp(ln 2) = 2, factor exp(2/3 ln 2)
    f = C.fit([rec("a", meas=100.0), rec("b", meas=400.0)])
    (exact,) = [x for x in f["factors"] if x["versions"] != "*"]
    assert exact["factor"] == pytest.approx(2 ** (2 / 3)) and exact["spread"] == pytest.approx(2.0)
    assert not exact["consistent"] and not exact["applies"]     # 1x and 4x: |ln 2| sqrt 2 < 2 x sd 0.98
    # one run is not enough (min_runs 2)
    f = C.fit([rec("only")])
    assert all(not x["applies"] for x in f["factors"])
    assert C.lookup(f, CPU, C.installed_versions_key(), "train.tokens_per_s") == (None, "")


def test_exact_versions_first_then_any_versions():
    other = "torch 1.0 · transformers 1.0 · peft 0.1 · bitsandbytes 0.1"
    mine = C.installed_versions_key()
    recs = [rec("a", meas=300.0, versions=other), rec("b", meas=300.0, versions=other),
            rec("c", meas=150.0, versions=mine), rec("d", meas=150.0, versions=mine)]
    f = C.fit(recs)
    hit, how = C.lookup(f, CPU, mine, "train.tokens_per_s")
    assert how == "exact" and hit["factor"] == pytest.approx(1.5 ** (2 / 3))
    hit, how = C.lookup(f, CPU, "torch 9.9 · transformers 9.9 · peft 9.9 · bitsandbytes 9.9", "train.tokens_per_s")
    assert how == "any-versions" and hit["runs"] == 4
    assert hit["factor"] == pytest.approx(math.exp(4 / 5 * (2 * math.log(3) + 2 * math.log(1.5)) / 4))
    assert C.lookup(f, "h100-80gb", mine, "train.tokens_per_s")[0] is None


def test_a_variant_with_enough_runs_has_its_own_factor():
    recs = [{**rec(f"n{i}", "infer.decode_tokens_per_s", meas=400.0), "variant": "nf4"} for i in range(2)]
    recs += [{**rec(f"b{i}", "infer.decode_tokens_per_s", meas=100.0), "variant": "bf16"} for i in range(2)]
    recs += [{**rec("i0", "infer.decode_tokens_per_s", meas=800.0), "variant": "int8"}]
    f = C.fit(recs)
    mine = C.installed_versions_key()
    hit, how = C.lookup(f, CPU, mine, "infer.decode_tokens_per_s", "nf4")
    assert how == "exact" and hit["variant"] == "nf4" and hit["factor"] == pytest.approx(4 ** (2 / 3))
    hit, how = C.lookup(f, CPU, mine, "infer.decode_tokens_per_s", "int8")     # one int8 run: the term's factor
    assert how == "exact" and hit["variant"] == "*" and hit["runs"] == 5
    assert hit["factor"] == pytest.approx(math.exp(5 / 6 * (2 * math.log(4) + math.log(8)) / 5))
    assert C.lookup(f, CPU, "torch 0.1", "infer.decode_tokens_per_s", "bf16")[1] == "any-versions"
    assert C.variant_of("infer", {"weights": "nf4"}) == "nf4" and C.variant_of("train", {"method": "qlora"}) == "qlora"


def test_evaluate_in_sample_and_held_back_by_hand():
    # three runs at 2x, 2x, 4x the estimate
    recs = [rec("a"), rec("b"), rec("c", meas=400.0)]
    (row,) = C.evaluate(recs)
    assert row["before"] == pytest.approx(1.0)                  # median of |2-1|, |2-1|, |4-1|
    fa = math.exp(3 / 4 * (2 * math.log(2) + math.log(4)) / 3)
    assert row["in_sample"] == pytest.approx(abs(2 / fa - 1))
    # held back: a -> fit(b, c), b -> fit(a, c), c -> fit(a, b)
    f_bc = math.exp(2 / 3 * (math.log(2) + math.log(4)) / 2)
    f_ab = math.exp(2 / 3 * math.log(2))
    errs = sorted([abs(2 / f_bc - 1), abs(2 / f_bc - 1), abs(4 / f_ab - 1)])
    assert row["held_back"] == pytest.approx(errs[1]) and row["corrected_held_back"] == 3
    assert row["before_x"] == pytest.approx(2.0) and row["in_sample_x"] == pytest.approx(max(2 / fa, fa / 2))


# ---- pairs --------------------------------------------------------------------------------------
def _run(strategy, estimate, result, device="cpu", preset=CPU, status="finished"):
    return {"id": f"r-{strategy}", "strategy": strategy, "model": "demo:tiny-llama", "device": device,
            "status": status, "created": 1.0, "estimate": estimate, "result": result,
            "versions": {"torch": "2.13.0+cpu", "transformers": "5.23.0", "peft": "0.21.2", "bitsandbytes": "0.50.2"},
            "machine": {"host": "vm", "cpu": "AMD EPYC", "cpu_count": 2, "device": device, "device_preset": preset}}


def _cpu_qlora_run(gpu=CPU):
    tr = E.estimate_train("demo:tiny-llama", "qlora", seq_len=128, batch_size=8, grad_ckpt=False, gpu=gpu,
                          calibration=False)
    inf = E.estimate_infer("demo:tiny-llama", weights="nf4", prompt_len=64, new_tokens=32, gpu=gpu,
                           calibration=False)
    after = {"weights_bytes": 5383424, "perplexity": 11.0, "prefill_ms": 12.0, "decode_tokens_per_s": 90.0,
             "peak_mem_bytes": 6e8, "mem_source": "cpu_peak_rss", "prompt_tokens": 64, "compute_dtype": "float32"}
    result = {"stages": [{"stage": "train", "peak_mem_bytes": 5e8, "mem_source": "cpu_peak_rss",
                          "result": {"tokens_per_s": 3000.0}},
                         {"stage": "evaluate", "peak_mem_bytes": 6e8, "mem_source": "cpu_peak_rss"}],
              "eval": {"before": {"perplexity": 10.0}, "after": after}, "metrics": {}}
    return _run("qlora", {"gpu": gpu, "train": tr, "infer": inf, "accuracy": {"ppl_ratio": 1.02, "retention": 0.9}},
                result), tr, inf


def test_pairs_of_a_cpu_run_compare_like_with_like():
    run, tr, inf = _cpu_qlora_run()
    ps = {p["term"]: p for p in C.pairs(run)}
    assert set(ps) == {"train.peak_allocated_bytes", "train.tokens_per_s", "infer.weights_bytes",
                       "infer.peak_allocated_bytes", "infer.prefill_s", "infer.decode_tokens_per_s",
                       "accuracy.ppl_ratio"}
    for t in ("train.peak_allocated_bytes", "infer.peak_allocated_bytes"):
        assert not ps[t]["comparable"] and ps[t]["error"] is None and "peak RSS" in ps[t]["why"]
    t = ps["train.tokens_per_s"]
    assert t["comparable"] and t["estimated"] == tr["tokens_per_s"] and t["measured"] == 3000.0
    assert t["error"] == pytest.approx(3000.0 / tr["tokens_per_s"] - 1) and t["device"] == CPU
    assert ps["infer.prefill_s"]["measured"] == pytest.approx(0.012) and ps["infer.prefill_s"]["comparable"]
    assert ps["infer.weights_bytes"]["estimated"] == inf["weights_bytes"] and "float32" in ps["infer.weights_bytes"]["why"]
    assert not ps["accuracy.ppl_ratio"]["comparable"] and "fine-tunes" in ps["accuracy.ppl_ratio"]["why"]
    assert ps["train.tokens_per_s"]["versions"] == "torch 2.13 · transformers 5.23 · peft 0.21 · bitsandbytes 0.50"
    keys = {"run_id", "stage", "term", "label", "unit", "estimated", "measured", "error", "comparable", "why",
            "device", "versions"}
    assert all(keys <= set(p) for p in ps.values())
    # the same run estimated for the reference H100 (what the worker did before): nothing comparable
    run2, _, _ = _cpu_qlora_run(gpu="h100-80gb")
    assert not any(p["comparable"] for p in C.pairs(run2))
    assert "h100-80gb" in next(p for p in C.pairs(run2) if p["term"] == "train.tokens_per_s")["why"]
    # a CPU run that started on oversubscribed cores (load average > 1.5 per core): its speeds are not records
    busy = {**run, "machine": {**run["machine"], "load_avg_1m": 3.5}}
    bp = {p["term"]: p for p in C.pairs(busy)}
    for t in ("train.tokens_per_s", "infer.prefill_s", "infer.decode_tokens_per_s"):
        assert not bp[t]["comparable"] and "oversubscribed" in bp[t]["why"] and "3.5 on 2 cores" in bp[t]["why"]
    assert bp["infer.weights_bytes"]["comparable"]
    assert C.pairs({**run, "machine": {**run["machine"], "load_avg_1m": 2.9}})[1]["comparable"]
    # records keep only comparable pairs of the fitted terms
    recs = C.records_from_runs([run])
    assert {r["term"] for r in recs} == {"train.tokens_per_s", "infer.weights_bytes", "infer.prefill_s",
                                         "infer.decode_tokens_per_s"}
    assert all(r["machine"]["cpu"] == "AMD EPYC" and r["inputs"]["gpu"] == CPU for r in recs)


def test_pairs_ptq_ratio_and_a_calibrated_stored_estimate(home):
    inf = E.estimate_infer("demo:tiny-llama", weights="nf4", prompt_len=64, new_tokens=32, gpu=CPU, calibration=False)
    raw = inf["decode_tokens_per_s"]
    home.joinpath("calibration.json").write_text(json.dumps(C.fit(
        [rec(f"r{i}", "infer.decode_tokens_per_s", est=100.0, meas=5.0) for i in range(4)])))
    cal = E.estimate_infer("demo:tiny-llama", weights="nf4", prompt_len=64, new_tokens=32, gpu=CPU)
    assert cal["calibration"]["applied"]
    run = _run("ptq-nf4", {"gpu": CPU, "infer": cal, "accuracy": {"ppl_ratio": 1.02, "retention": 0.95}},
               {"stages": [], "eval": {"before": {"perplexity": 10.0, "accuracy": 0.5},
                                       "after": {"perplexity": 10.5, "accuracy": 0.45, "decode_tokens_per_s": 80.0}}})
    ps = {p["term"]: p for p in C.pairs(run)}
    d = ps["infer.decode_tokens_per_s"]
    assert d["estimated"] == pytest.approx(raw) and d["calibrated"] == pytest.approx(cal["decode_tokens_per_s"])
    assert d["error"] == pytest.approx(80.0 / raw - 1)           # records fit on the formula's figure
    assert ps["accuracy.ppl_ratio"]["comparable"] and ps["accuracy.ppl_ratio"]["measured"] == pytest.approx(1.05)
    assert ps["accuracy.retention"]["comparable"] and ps["accuracy.retention"]["measured"] == pytest.approx(0.9)
    assert not strategies.get("ptq-nf4").get("train")


def test_pairs_of_an_exported_artifact_measured_in_its_runtime():
    """A run that exports its deployed format (gguf-q4_k_m) and measures that file in llama.cpp: the
    inference terms pair the estimate with the runtime's figures, not with the HF evaluation of the
    16-bit source; the perplexity ratio is the file's against that source (quantization alone, so
    comparable although the run fine-tuned)."""
    inf = {"gpu": CPU, "inputs": {"weights": "gguf-q4_k_m", "runtime": "llama.cpp", "prompt_len": 16, "gpu": CPU},
           "weights_bytes": 2.0e6, "prefill_s": 0.02, "decode_tokens_per_s": 100.0, "peak_allocated_bytes": 3e6}
    rt = {"runtime": "llama.cpp", "format": "gguf-q4_k_m", "role": "deploy", "perplexity": 12.6,
          "accuracy": 0.9, "prefill_ms": 5.0, "decode_tokens_per_s": 250.0, "weights_bytes": 2.2e6,
          "prompt_tokens": 16, "peak_mem_bytes": 9e8, "mem_source": "cpu_peak_rss"}
    src = {**rt, "format": "gguf-f16", "role": "source", "decode_tokens_per_s": 120.0, "perplexity": 12.0}
    after = {"perplexity": 12.0, "accuracy": 1.0, "prefill_ms": 40.0, "decode_tokens_per_s": 60.0,
             "weights_bytes": 6.8e6, "prompt_tokens": 16, "compute_dtype": "float32"}
    result = {"stages": [{"stage": "evaluate", "result": {"after": after, "before": {"perplexity": 30.0, "accuracy": 0.2},
                                                           "runtimes": [src, rt]}}],
              "eval": {"after": after, "before": {"perplexity": 30.0}}}
    run = _run("lora-merge-gptq-4bit", {"gpu": CPU, "infer": inf, "accuracy": {"ppl_ratio": 1.03, "retention": 0.97}},
               result)
    ps = {p["term"]: p for p in C.pairs(run)}
    d = ps["infer.decode_tokens_per_s"]
    assert d["measured"] == 250.0 and d["stage"] == "evaluate (llama.cpp)" and d["comparable"]
    assert "measured in llama.cpp" in d["why"]
    assert ps["infer.prefill_s"]["measured"] == pytest.approx(0.005)
    assert ps["infer.weights_bytes"]["measured"] == 2.2e6 and ps["infer.weights_bytes"]["comparable"]
    p = ps["accuracy.ppl_ratio"]
    assert p["measured"] == pytest.approx(12.6 / 12.0) and p["comparable"] and "exported from" in p["why"]
    assert ps["accuracy.retention"]["measured"] == pytest.approx(0.9)
    assert {r["term"] for r in C.records_from_runs([run])} >= {"infer.decode_tokens_per_s", "infer.prefill_s"}
    # the same run whose runtime measurement was skipped (no llama.cpp): the HF figures of the 16-bit
    # source are not taken for the deployed file's
    skipped = {**rt, "skipped": "llama-cpp-python is not installed here"}
    run2 = {**run, "result": {**result, "stages": [{"stage": "evaluate", "result": {
        "after": after, "runtimes": [{k: skipped[k] for k in ("runtime", "format", "role", "skipped")}]}}]}}
    ps2 = {p["term"]: p for p in C.pairs(run2)}
    assert not ps2["infer.decode_tokens_per_s"]["comparable"] and "not measured in its runtime" in \
        ps2["infer.decode_tokens_per_s"]["why"]


# ---- applying a fit ---------------------------------------------------------------------------------
def test_estimate_carries_calibration_applied_or_not(home, monkeypatch):
    raw = E.estimate_train("demo:tiny-llama", "lora", seq_len=128, batch_size=8, grad_ckpt=False, gpu=CPU,
                           calibration=False)
    assert raw["calibration"]["applied"] is False and "calibration=False" in raw["calibration"]["note"]
    nofile = E.estimate_train("demo:tiny-llama", "lora", gpu=CPU)
    assert not nofile["calibration"]["applied"] and "python -m engine calibrate" in nofile["calibration"]["note"]
    recs = [rec(f"r{i}", est=100.0, meas=300.0) for i in range(3)]
    recs += [rec(f"g{i}", "train.peak_allocated_bytes", est=100.0, meas=110.0, device="h100-80gb") for i in range(5)]
    home.joinpath("calibration.json").write_text(json.dumps(C.fit(recs)))
    cal = E.estimate_train("demo:tiny-llama", "lora", seq_len=128, batch_size=8, grad_ckpt=False, gpu=CPU)
    c = cal["calibration"]
    f = math.exp(3 / 4 * math.log(3))
    assert c["applied"] and c["runs"] == 3 and c["device"] == CPU and set(c["terms"]) == {"tokens_per_s"}
    t = c["terms"]["tokens_per_s"]
    assert t["factor"] == pytest.approx(f) and t["raw"] == pytest.approx(raw["tokens_per_s"]) and t["runs"] == 3
    assert t["versions"] == C.installed_versions_key() and t["spread"] == pytest.approx(1.0)
    assert cal["tokens_per_s"] == pytest.approx(raw["tokens_per_s"] * f)
    assert cal["tokens_per_s_high"] == pytest.approx(raw["tokens_per_s_high"] * f)
    assert cal["step_time_s"] == pytest.approx(raw["step_time_s"] / f)
    assert cal["peak_allocated_bytes"] == raw["peak_allocated_bytes"]       # no memory records for the CPU
    assert "calibrated from 3 measured run(s)" in c["note"] and c["note"] in cal["notes"]
    # the GPU peak: 5 runs at 1.1x -> factor exp(5/6 ln 1.1), device bytes recomputed from it
    g_raw = E.estimate_train("llama-3.2-1b", "lora", gpu="h100-80gb", calibration=False)
    g = E.estimate_train("llama-3.2-1b", "lora", gpu="h100-80gb")
    fg = math.exp(5 / 6 * math.log(1.1))
    assert g["peak_allocated_bytes"] == round(g_raw["peak_allocated_bytes"] * fg)
    assert g["device_bytes"] > g_raw["device_bytes"] and g["calibration"]["terms"]["peak_allocated_bytes"]["runs"] == 5
    assert g["tokens_per_s"] == g_raw["tokens_per_s"]
    # a device without runs, and calibration switched off
    other = E.estimate_infer("demo:tiny-llama", gpu="a100-80gb", runtime="transformers")
    assert other["calibration"] == {"applied": False, "runs": 0, "device": "a100-80gb",
                                    "note": "not calibrated: no measured runs for a100-80gb", "terms": {}}
    monkeypatch.setenv("TUNEQUANT_CALIBRATION", "off")
    assert "TUNEQUANT_CALIBRATION=off" in E.estimate_train("demo:tiny-llama", "lora", gpu=CPU)["calibration"]["note"]


def test_planner_estimates_cpu_runs_for_the_cpu_entry():
    from engine.runs.worker import CPU_PRESET, planner_estimate
    from engine.spec.run import RunSpec
    assert CPU_PRESET == CPU
    spec = RunSpec.parse({"model": "demo:tiny-llama", "strategy": "qlora", "dataset": {"demo": "tickets"},
                          "train": {"steps": 5, "batch_size": 8, "seq_len": 128}, "device": "cpu"})
    est = planner_estimate(spec, strategies.get("qlora"), CPU_PRESET)
    assert est["train"]["gpu"] == CPU and est["infer"]["gpu"] == CPU and est["train"]["tokens_per_s"] > 0
    # the run trains with the engine's chunked loss (the default): the estimate models that loss
    assert est["train"]["inputs"]["loss"] == "chunked"
    ref = planner_estimate(RunSpec.parse({**spec.model_dump(), "train": {**spec.train.model_dump(), "loss": "reference"}}),
                           strategies.get("qlora"), CPU_PRESET)
    assert ref["train"]["inputs"].get("loss", "reference") == "reference"
    assert ref["train"]["peak_allocated_bytes"] > est["train"]["peak_allocated_bytes"]   # B x T x V fp32 logits


# ---- the recorded CPU measurements -----------------------------------------------------------------------
def test_recorded_cpu_runs_error_drops_on_held_back_runs():
    recs = [r for path in RECORDED for r in C.read_records(path)]
    assert len({r["run_id"] for r in recs}) >= 25 and all(r["device"] == CPU for r in recs)
    rows = {r["term"]: r for r in C.evaluate(recs)}
    for term in ("infer.decode_tokens_per_s", "infer.prefill_s", "infer.weights_bytes"):
        r = rows[term]
        assert r["runs"] >= 15 and r["corrected_held_back"] == r["records"]
        assert r["held_back"] < r["before"] and r["in_sample"] < r["before"], r
        assert r["held_back_x"] < r["before_x"]
    # the CPU's decode speed: the crude bandwidth roofline is > 10x off; held back, within ~4x
    d = rows["infer.decode_tokens_per_s"]
    assert d["before_x"] > 10 and d["held_back_x"] < 4.5
    # training speed on the shared 2-core VM scatters both ways around the formula (other jobs on the
    # cores): no consistent correction, so calibration leaves it alone rather than make it worse
    t = rows["train.tokens_per_s"]
    assert t["runs"] >= 15 and t["held_back"] <= t["before"] and t["in_sample"] <= t["before"]


def test_recorded_real_model_runs_weights_match_the_formula():
    """bench/measurements/calibration-cpu-2026-12-03-smollm2.json: the real demo model (SmolLM2-135M) on a CPU
    that computes in bf16. Unquantized tensors take the 2 bytes the formula counts, so every format's weights
    bytes are within 2.5 % before any factor (the fp32 tiny-model records needed x1.59); the one decode factor
    helps held back."""
    path = ROOT / "bench" / "measurements" / "calibration-cpu-2026-12-03-smollm2.json"
    recs = C.read_records(path)
    assert len({r["run_id"] for r in recs}) >= 10 and all(r["model"] == "demo:smollm2-135m" for r in recs)
    w = [r for r in recs if r["term"] == "infer.weights_bytes"]
    assert len({r["variant"] for r in w}) >= 5 and all(abs(r["measured"] / r["estimated"] - 1) < 0.025 for r in w)
    rows = {r["term"]: r for r in C.evaluate(recs)}
    assert rows["infer.weights_bytes"]["before"] < 0.02 and rows["infer.decode_tokens_per_s"]["held_back_x"] < \
        rows["infer.decode_tokens_per_s"]["before_x"]


# ---- export / import / the command ------------------------------------------------------------------------
def test_export_import_round_trip_into_a_fresh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEQUANT_CALIBRATION", "off")
    monkeypatch.delenv("TUNEQUANT_DB", raising=False)
    src = RECORDED[0]
    original = C.read_records(src)
    monkeypatch.setenv("TUNEQUANT_HOME", str(tmp_path / "a"))
    got = C.import_(src)
    assert got["added"] == len(original) and got["duplicates"] == 0
    assert got["fitted"] == str(tmp_path / "a" / "calibration.json")          # refitted (calibration off: home)
    assert json.loads(Path(got["fitted"]).read_text())["records"] == len(original)
    assert C.import_(src)["added"] == 0                              # dedupe by run id + term
    out = C.export(tmp_path / "shared.json")
    assert out["records"] == len(original)
    monkeypatch.setenv("TUNEQUANT_HOME", str(tmp_path / "b"))
    assert C.all_records(finished_runs()) == []
    C.import_(tmp_path / "shared.json")
    back = C.all_records(finished_runs())
    key = lambda r: (r["run_id"], r["term"])
    assert sorted(map(key, back)) == sorted(map(key, original))
    assert {key(r): (r["estimated"], r["measured"], r["device"], r["versions"]) for r in back} == \
           {key(r): (r["estimated"], r["measured"], r["device"], r["versions"]) for r in original}


def test_records_from_a_run_store(tmp_path, monkeypatch):
    from engine.runs.store import RunStore, finished_runs
    run, _, _ = _cpu_qlora_run()
    store = RunStore(tmp_path / "runs.sqlite", tmp_path / "runs")
    store.create_run("r-1", {"model": "demo:tiny-llama", "strategy": "qlora"}, "cpu")
    store.update_run("r-1", estimate=run["estimate"], versions=run["versions"], machine=run["machine"])
    store.finish("r-1", "finished", None, result=run["result"])
    store.create_run("r-2", {"model": "demo:tiny-llama", "strategy": "qlora"}, "cpu")   # queued: not a record
    monkeypatch.setenv("TUNEQUANT_HOME", str(tmp_path / "home"))
    recs = C.all_records(finished_runs(tmp_path / "runs.sqlite"))
    assert {r["run_id"] for r in recs} == {"r-1"} and len(recs) == 4
    assert C.all_records(finished_runs(store)) == recs


def test_bench_output_imports_as_records():
    doc = {"gpu": "h100-80gb", "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "started": "2026-11-23T06",
           "versions": {"torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2", "bitsandbytes": "0.50.2"},
           "results": [
               {"kind": "train", "model": "llama-3.2-1b", "method": "lora", "grad_ckpt": True, "seq_len": 512,
                "batch_size": 4, "measured": {"peak_allocated_bytes": 9e9, "tokens_per_s": 3e4, "oom": False},
                "predicted": {"peak_allocated_bytes": 1e10, "tokens_per_s": 2.5e4}},
               {"kind": "train", "model": "llama-3.1-8b", "method": "full", "grad_ckpt": True, "seq_len": 512,
                "batch_size": 1, "measured": {"oom": True, "error": "CUDA out of memory"},
                "predicted": {"peak_allocated_bytes": 8e10, "tokens_per_s": 1e3}},
               {"kind": "infer", "model": "llama-3.2-1b", "weights": "nf4", "batch_size": 1, "prompt_len": 512,
                "new_tokens": 128, "measured": {"weights_bytes": 1e9, "peak_allocated_bytes": 1.2e9, "prefill_s": 0.03,
                                                "decode_tokens_per_s": 40.0},
                "predicted": {"weights_bytes": 1.01e9, "peak_allocated_bytes": 1.1e9, "prefill_s": 0.02,
                              "decode_tokens_per_s": 50.0}}]}
    recs = C.records_from_bench(doc)
    assert sorted(r["term"] for r in recs) == sorted(["train.peak_allocated_bytes", "train.tokens_per_s",
                                                      "infer.weights_bytes", "infer.peak_allocated_bytes",
                                                      "infer.prefill_s", "infer.decode_tokens_per_s"])
    assert all(r["device"] == "h100-80gb" and r["versions"].startswith("torch 2.13") for r in recs)
    assert len({r["run_id"] for r in recs}) == 2                    # one id per measured case; the OOM is skipped
    assert C.records_from_bench({**doc, "device": "cpu"}) == []


def test_cli_calibrate_json_and_bad_import(home, capsys, tmp_path):
    from engine.cli import main
    (tmp_path / "none.sqlite").touch()            # an empty store (a missing one is an error: tests/test_store_faults.py)
    assert main(["calibrate", "--store", str(tmp_path / "none.sqlite"), "--import", str(RECORDED[0]),
                 "--export", str(tmp_path / "out.json"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"path", "store", "records", "runs", "devices", "evaluation", "factors", "active",
                        "imported", "exported"}
    assert res["devices"][CPU] == res["runs"] and res["path"] == str(home / "calibration.json") and res["active"]
    assert {r["term"] for r in res["evaluation"]} >= {"train.tokens_per_s", "infer.decode_tokens_per_s"}
    assert set(res["evaluation"][0]) >= {"device", "term", "runs", "before", "in_sample", "held_back"}
    assert json.loads((tmp_path / "out.json").read_text())["records"]
    # the fitted file is what estimates now use
    inf = E.estimate_infer("demo:tiny-llama", weights="nf4", prompt_len=64, new_tokens=32, gpu=CPU)
    assert inf["calibration"]["applied"] and inf["calibration"]["terms"]["decode_tokens_per_s"]["variant"] == "nf4"
    t = inf["calibration"]["terms"]["decode_tokens_per_s"]
    assert t["factor"] < 0.1 and t["spread"] > 1.5
    raw = E.estimate_infer("demo:tiny-llama", weights="nf4", prompt_len=64, new_tokens=32, gpu=CPU, calibration=False)
    assert inf["decode_tokens_per_s"] == pytest.approx(raw["decode_tokens_per_s"] * t["factor"])
    assert inf["decode_tokens_per_s_low"] == pytest.approx(raw["decode_tokens_per_s_low"] * t["factor"] / t["spread"])
    assert inf["decode_tokens_per_s_high"] == pytest.approx(raw["decode_tokens_per_s_high"] * t["factor"] * t["spread"])
    assert "scatter" in E.estimate_train("demo:tiny-llama", "lora", gpu=CPU)["calibration"]["note"]
    # the human table
    assert main(["calibrate"]) == 0
    txt = capsys.readouterr().out
    assert "held back" in txt and "train.tokens_per_s" in txt and f"{CPU}: " in txt
    # bad import files: exit 2 with an actionable JSON error
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["calibrate", "--import", str(bad), "--json"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert "--import" in err and "calibrate --export" in err
    bad.write_text(json.dumps({"schema": 1, "records": [{"run_id": "x", "term": "train.tokens_per_s"}]}))
    assert main(["calibrate", "--import", str(bad)]) == 2
    assert "lacks device, versions, estimated, measured" in json.loads(capsys.readouterr().out)["error"]
    assert main(["calibrate", "--import", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in json.loads(capsys.readouterr().out)["error"]


def test_calibration_stays_torch_free_and_fast(home):
    import subprocess
    import sys
    code = ("import sys, time; from engine import estimate as E; E.estimate_train('llama-3.2-1b', 'lora');"
            "t = time.perf_counter(); [E.estimate_train('llama-3.2-1b', 'lora') for _ in range(20)];"
            "dt = (time.perf_counter() - t) / 20; from engine import calibration;"
            "print(dt, any(m in sys.modules for m in ('torch', 'transformers', 'peft', 'bitsandbytes')))")
    home.joinpath("calibration.json").write_text(json.dumps(C.fit([rec(f"r{i}", device="h100-80gb") for i in range(3)])))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**__import__("os").environ}).stdout.split()
    assert float(out[0]) < 0.1 and out[1] == "False"
