"""Calibration: the planner's estimates corrected by the runs that measured them.

Every finished run stores the planner's estimate for the device it used (engine/runs/worker.py
planner_estimate) and what it measured (its result). ``pairs(run)`` puts the two side by side,
term by term, and says which pairs measure the same thing. The comparable pairs of speed and
memory terms are *records*; ``fit(records)`` keeps, per (device, library versions, term), the
geometric mean of measured/estimated shrunk toward 1 when the runs are few (settings in
presets/calibration.yaml); ``apply`` multiplies an estimate's headline figures by the factor
that matches its device and the installed versions. ``evaluate(records)`` is the proof: the
median error before and after, in-sample and with each run held back from its own fit.

A team shares measurements with ``export(path)`` / ``import_(path)`` (JSON records; the GPU
bench's output, bench/estimates_vs_measured.py, imports too). ``python -m engine calibrate``
refits, writes ``$TUNEQUANT_HOME/calibration.json`` and prints the table (docs/calibration.md).

Pure Python (json, math); reads no database: the caller hands it the runs: never imports torch or the ML libraries.
"""
from __future__ import annotations

import json
import os
import math
import statistics
import time
from pathlib import Path

from engine.errors import InputError
from engine.estimate.correction import (_num, fitted_path, installed_versions_key, load_fitted,  # noqa: F401
                                        lookup, settings, variant_of, versions_key)   # (re-exported: calibrate's API)
from engine.record import RunRecord, StageResult, fold
from engine.workspace import home

SCHEMA = 1
# term -> (label, unit); the estimate kind and key are the two halves of the name
TERMS = {
    "train.peak_allocated_bytes": ("train: peak memory", "bytes"),
    "train.tokens_per_s": ("training tokens/s", "tokens/s"),
    "infer.weights_bytes": ("inference: weights in memory", "bytes"),
    "infer.peak_allocated_bytes": ("inference: peak memory", "bytes"),
    "infer.prefill_s": ("inference: prefill", "s"),
    "infer.decode_tokens_per_s": ("decode tokens/s", "tokens/s"),
    "accuracy.ppl_ratio": ("perplexity ratio after/before", "ratio"),
    "accuracy.retention": ("task metric retention after/before", "ratio"),
}
TASK_METRICS = ("accuracy", "exact_match", "field_match")
RSS_WHY = ("not comparable: a CPU run measures the process's peak RSS (Python, the libraries, allocator caches, "
           "the data), not the tensor bytes torch.cuda.max_memory_allocated counts on a GPU")



def records_path() -> Path:
    """Imported records (a team's shared measurements), one JSON object per line."""
    return home() / "calibration_records.jsonl"


def fit_file() -> Path:
    """Where ``calibrate``/``import_`` write the fitted JSON: fitted_path(), or
    $TUNEQUANT_HOME/calibration.json while calibration is off for estimates."""
    return fitted_path() or home() / "calibration.json"


# ---- pairs: measured next to estimated ------------------------------------------------------------
def run_device(run: dict) -> str | None:
    """The presets/hardware id of the device a run used (None: an unrecognised GPU, or a run
    recorded before the worker named its device)."""
    m = run.get("machine") or {}
    if m.get("device_preset"):
        return m["device_preset"]
    return m.get("gpu_preset") if run.get("device") == "cuda" else None


def _raw(est: dict, key: str):
    """The formula's figure: an estimate stored with calibration applied keeps it in terms[key].raw."""
    cal = est.get("calibration") or {}
    if cal.get("applied") and key in (cal.get("terms") or {}):
        return cal["terms"][key].get("raw")
    return est.get(key)


def _tunes(strategy_id) -> bool | None:
    from engine import strategies
    try:
        return bool(strategies.get(strategy_id).get("train"))
    except (InputError, KeyError, TypeError):
        return None


def pairs(run: dict, events: list[dict] | None = None) -> list[dict]:
    """The measured-vs-estimated pairs of one run (a dict as ``engine.runs.api.get_run`` returns).

    ``estimated`` is the formula's figure (the raw one when the stored estimate was calibrated;
    ``calibrated`` then holds what the planner showed). ``comparable`` says whether both measure
    the same thing: speeds and weights when the estimate was made for the device the run used;
    peak memory only on CUDA (max_memory_allocated); the perplexity ratio only for runs that do
    not also fine-tune. ``events`` (optional) supply the last training step's tokens/s when the
    train stage reported none.
    """
    rec = RunRecord.of(run)
    rid, est = rec.id, rec.estimate
    device, vkey = run_device(run), versions_key(rec.versions)
    stages = {s.stage: s for s in rec.stages}
    after, before = rec.after, rec.before
    out: list[dict] = []

    def add(term, stage, e, measured, comparable, why):
        kind, key = term.split(".", 1)
        estimated = _raw(e, key) if e else None
        if _num(estimated) is None and _num(measured) is None:
            return
        label, unit = TERMS[term]
        cal = (e or {}).get("calibration") or {}
        calibrated = e.get(key) if cal.get("applied") and key in (cal.get("terms") or {}) else None
        if _num(measured) is None:
            comparable, why = False, "not measured by this run"
        elif _num(estimated) is None:
            comparable, why = False, "not estimated"
        ok = bool(comparable) and estimated not in (0, None)
        out.append({"run_id": rid, "stage": stage, "term": term, "label": label, "unit": unit,
                    "estimated": _num(estimated), "measured": _num(measured), "calibrated": _num(calibrated),
                    "error": (measured / estimated - 1) if ok else None, "comparable": ok, "why": why,
                    "device": device, "estimate_device": (e or {}).get("gpu"), "versions": vkey})

    machine = run.get("machine") or {}
    load, cores = _num(machine.get("load_avg_1m")), _num(machine.get("cpu_count"))
    busy = (run.get("device") != "cuda" and load is not None and bool(cores)
            and load > settings()["cpu_busy_load_per_core"] * cores)

    def speed(ok: bool, why: str) -> tuple[bool, str]:
        """A CPU run on oversubscribed cores measured the other jobs too."""
        if ok and busy:
            return False, (f"not comparable: the CPU was oversubscribed when the run started (load average "
                           f"{load:g} on {cores:g} cores), so its speed measures other jobs too")
        return ok, why

    def same_device(e) -> tuple[bool, str]:
        ed = (e or {}).get("gpu")
        if device is None:
            what = "a GPU no hardware preset matches" if run.get("device") == "cuda" else "a device the run did not name"
            return False, f"not comparable: the estimate is for {ed}; this run used {what}"
        if ed != device:
            return False, f"not comparable: the estimate is for {ed}; this run used {device}"
        return True, f"compared on {device}"

    # training: the train stage's peak memory and its tokens/s over the whole stage
    tr = est.get("train") or {}
    if "train" in est and not tr.get("error"):
        st = stages.get("train") or StageResult("train")
        same, why = same_device(tr)
        if st.on_cuda:
            mem_ok, mem_why = same, (why + " (torch.cuda.max_memory_allocated over the stage)" if same else why)
        else:
            mem_ok, mem_why = False, RSS_WHY
        add("train.peak_allocated_bytes", "train", tr, st.peak_mem_bytes, mem_ok, mem_why)
        res = st.result
        pps = res.get("positions_per_s")         # padded B x T per second: the estimate's tokens/s
        tps = pps or res.get("tokens_per_s") or rec.metric("train.tokens_per_s")
        if tps is None and events:
            tps = fold(events).last_tokens_per_s
        add("train.tokens_per_s", "train", tr, tps, *speed(same, why + (
            "" if not same else f"; measured: padded positions (B x {res.get('mean_batch_len')} tokens) per second, "
            f"the estimate's positions at seq_len {tr.get('inputs', {}).get('seq_len')}" if pps else
            "; measured: real (non-padding) tokens over the train stage, the estimate fills seq_len")))
    # inference: the evaluation of the deployed model ('after'); when the run exported its deployed
    # format and measured that artifact in its runtime (llama.cpp ...), that measurement
    inf = est.get("infer") or {}
    if "infer" in est and not inf.get("error"):
        same, why = same_device(inf)
        inputs = inf.get("inputs") or {}
        inf_stage, served = "evaluate", after
        rt = deployed_runtime_eval(rec, inputs.get("weights"))
        if rt is not None:
            served, inf_stage = rt, f"evaluate ({rt['runtime']})"
            why += f"; measured in {rt['runtime']}: the exported {rt['format']} file"
        elif rec.runtime_evals and same:
            same, why = False, ("not comparable: the run deploys an exported artifact that was not measured in its "
                                "runtime; the HF evaluation measured its 16-bit source")
        w_ok, w_why = same, why + " (weights in memory after loading)"
        if served.get("adapter_bytes"):
            w_ok, w_why = False, ("not comparable: the evaluated model carries an unmerged LoRA adapter "
                                  "the estimate of the deploy format does not count")
        elif same and served.get("compute_dtype") == "float32":
            w_why += "; the run computed in float32, so its unquantized tensors take 4 bytes (the estimate: 2)"
        add("infer.weights_bytes", inf_stage, inf, served.get("weights_bytes"), w_ok, w_why)
        src = str(served.get("mem_source") or "")
        if "cuda" in src:
            add("infer.peak_allocated_bytes", inf_stage, inf, served.get("peak_mem_bytes"), same, why)
        else:
            add("infer.peak_allocated_bytes", inf_stage, inf, served.get("peak_mem_bytes"), False, RSS_WHY)
        shape_ok, shape_why = same, why
        pt = served.get("prompt_tokens")
        if same and pt is not None and inputs.get("prompt_len") not in (None, pt):
            shape_ok, shape_why = False, f"not comparable: measured with {pt} prompt tokens, estimated for {inputs['prompt_len']}"
        pre = served.get("prefill_ms")
        add("infer.prefill_s", inf_stage, inf, pre / 1000 if _num(pre) is not None else None,
            *speed(shape_ok, shape_why))
        dec = served.get("decode_tokens_per_s", rec.metric("after.decode_tokens_per_s", rec.metric("decode_tokens_per_s")))
        add("infer.decode_tokens_per_s", inf_stage, inf, dec, *speed(shape_ok, shape_why))
    # accuracy: measured after/before on the run's own evaluation data
    acc = est.get("accuracy") or {}
    if "accuracy" in est and not acc.get("error"):
        tunes = _tunes(rec.strategy)
        ft_why = "not comparable: this run also fine-tunes, so after/before is not quantization alone"
        rt = deployed_runtime_eval(rec, ((est.get("infer") or {}).get("inputs") or {}).get("weights"))
        if rt is not None:
            # the exported file in its runtime against the HF 16-bit model it was exported from (after):
            # quantization alone, whether or not the run fine-tuned before exporting
            stage, tunes, q, ref = f"evaluate ({rt['runtime']})", False, rt, after
            what = f"{rt['format']} in {rt['runtime']} / the 16-bit model it was exported from (HF)"
        else:
            stage, q, ref, what = "evaluate", after, before, "after / before"
        b, a = _num(ref.get("perplexity")), _num(q.get("perplexity"))
        add("accuracy.ppl_ratio", stage, acc, a / b if a is not None and b else None, not tunes,
            ft_why if tunes else f"compared: perplexity {what} on the run's evaluation rows")
        task = next((k for k in TASK_METRICS if _num(ref.get(k)) and _num(q.get(k)) is not None), None)
        if task:                                    # a ratio exists only where the base scored above 0
            add("accuracy.retention", stage, acc, q[task] / ref[task], not tunes,
                ft_why if tunes else f"compared: {task} {what} on the run's evaluation rows")
    return out


def deployed_runtime_eval(rec: RunRecord, weights: str | None) -> dict | None:
    """The runtime measurement of the artifact a run deploys (role deploy, the estimate's weights
    format), or None."""
    for m in rec.runtime_evals:
        if not m.get("skipped") and m.get("role", "deploy") == "deploy" and m.get("format") == weights:
            return m
    return None


# ---- records ------------------------------------------------------------------------------------
def fitted_terms() -> list[str]:
    return list(settings()["terms"])


def _record(run: dict, p: dict, source: str) -> dict:
    m = run.get("machine") or {}
    kind = p["term"].split(".", 1)[0]
    est = (run.get("estimate") or {}).get(kind) or {}
    versions = run.get("versions") or {}
    return {"run_id": p["run_id"], "term": p["term"], "device": p["device"], "versions": p["versions"],
            "library_versions": {k: versions.get(k) for k in ("python", *settings()["version_packages"], "torchao",
                                                              "gptqmodel") if k in versions},
            "machine": {k: m.get(k) for k in ("host", "cpu", "cpu_count", "gpu", "gpu_preset", "device") if k in m},
            "inputs": est.get("inputs"), "variant": variant_of(kind, est.get("inputs")),
            "strategy": run.get("strategy"), "model": run.get("model"),
            "stage": p["stage"], "estimated": p["estimated"], "measured": p["measured"],
            "created": run.get("created"), "source": source}


def records_from_runs(runs: list[dict], source: str = "run-store") -> list[dict]:
    """Comparable pairs of finished runs, for the fitted terms, as records."""
    keep = set(fitted_terms())
    out = []
    for run in runs:
        if run.get("status") not in (None, "finished"):
            continue
        for p in pairs(run):
            if p["comparable"] and p["term"] in keep and p["estimated"] and p["measured"] and \
                    p["estimated"] > 0 and p["measured"] > 0:
                out.append(_record(run, p, source))
    return out


def all_records(runs=()) -> list[dict]:
    """Comparable records of finished runs (the caller reads them through the run store's API,
    ``engine.runs.store.finished_runs``) plus the imported ones (runs first; an imported record
    with the same run id and term as a run's is dropped)."""
    return _merge(records_from_runs(list(runs or [])), imported_records())


def _key(r: dict) -> tuple:
    return (str(r.get("run_id")), str(r.get("term")))


def _merge(first: list[dict], more: list[dict]) -> list[dict]:
    seen = {_key(r) for r in first}
    out = list(first)
    for r in more:
        if _key(r) not in seen:
            seen.add(_key(r))
            out.append(r)
    return out


def imported_records() -> list[dict]:
    path = records_path()
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


# ---- the fit ------------------------------------------------------------------------------------
def _factor(logs: list[float]) -> tuple[float, float, bool]:
    """(shrunk factor, spread, consistent) from ln(measured/estimated) of n runs. Consistent:
    the runs agree on a direction, |mean| >= z x sample sd / sqrt(n) (presets: min_significance_z)."""
    n, k = len(logs), float(settings()["prior_runs"])
    mean = sum(logs) / n
    spread = math.exp(statistics.pstdev(logs)) if n >= 2 else 1.0
    sd = statistics.stdev(logs) if n >= 2 else float("inf")
    consistent = abs(mean) * math.sqrt(n) >= float(settings()["min_significance_z"]) * sd
    return math.exp(n / (n + k) * mean), spread, consistent


def fit(records: list[dict], min_runs: int | None = None) -> dict:
    """Correction factors per (device, versions key, term) and per (device, any versions, term).

    Each also per variant (the training method / weights format of the estimate's inputs).
    factor = exp(n/(n + prior_runs) x mean ln(measured/estimated)); ``spread`` is the geometric
    standard deviation of measured/estimated (1.0 from a single run); ``gmean`` the unshrunk
    geometric mean. Applied from ``min_runs`` runs on, when the runs agree on the direction
    (``consistent``; presets/calibration.yaml)."""
    cfg = settings()
    min_runs = int(cfg["min_runs"] if min_runs is None else min_runs)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("term") not in cfg["terms"] or not r.get("device"):
            continue
        if not (_num(r.get("estimated")) and _num(r.get("measured"))) or r["estimated"] <= 0 or r["measured"] <= 0:
            continue
        for v in (r.get("versions") or "-", "*"):
            groups.setdefault((r["device"], v, r["term"], "*"), []).append(r)
            if r.get("variant"):
                groups.setdefault((r["device"], v, r["term"], str(r["variant"])), []).append(r)
    factors = []
    for (dev, v, term, variant), rs in sorted(groups.items()):
        logs = [math.log(r["measured"] / r["estimated"]) for r in rs]
        f, spread, consistent = _factor(logs)
        run_ids = sorted({str(r["run_id"]) for r in rs})
        factors.append({"device": dev, "versions": v, "term": term, "variant": variant, "factor": f,
                        "gmean": math.exp(sum(logs) / len(logs)), "spread": spread, "runs": len(run_ids),
                        "records": len(rs), "run_ids": run_ids, "consistent": consistent,
                        "applies": len(run_ids) >= min_runs and consistent})
    devices: dict[str, set] = {}
    for r in records:
        if r.get("device"):
            devices.setdefault(r["device"], set()).add(str(r["run_id"]))
    return {"schema": SCHEMA, "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": {"min_runs": min_runs, "prior_runs": cfg["prior_runs"],
                         "version_packages": cfg["version_packages"]},
            "records": len(records), "runs": len({str(r["run_id"]) for r in records}),
            "devices": {d: len(s) for d, s in sorted(devices.items())}, "factors": factors}


# ---- evaluation: the error before and after -------------------------------------------------------
def _err(est: float, meas: float, factor: float = 1.0) -> float:
    return abs(meas / (est * factor) - 1)


def _fold(est: float, meas: float, factor: float = 1.0) -> float:
    """How many times off, either way: exp|ln(measured / estimate)| (2.0 = half or double)."""
    return math.exp(abs(math.log(meas / (est * factor))))


def evaluate(records: list[dict]) -> list[dict]:
    """Per (device, term): median |measured/estimated - 1| of the formula, after calibration
    in-sample (fitted on every record), and held back (each run's records corrected by a fit
    on the other runs only: what a new run would see). ``*_x``: the median factor off either
    way (exp|ln ratio|), which a 30x overestimate does not cap at 100% as |error| does."""
    full = fit(records)
    by: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("term") in settings()["terms"] and r.get("device"):
            by.setdefault((r["device"], r["term"]), []).append(r)
    run_ids = sorted({str(r["run_id"]) for r in records})
    held = {}
    for rid in run_ids:
        rest = [r for r in records if str(r["run_id"]) != rid]
        held[rid] = fit(rest)
    rows = []
    for (dev, term), rs in sorted(by.items()):
        errs = {k: [] for k in ("before", "in_sample", "held_back", "before_x", "in_sample_x", "held_back_x")}
        n_in = n_out = 0
        for r in rs:
            e, m, v = r["estimated"], r["measured"], r.get("variant")
            f, _ = lookup(full, dev, r.get("versions") or "-", term, v)
            g, _ = lookup(held[str(r["run_id"])], dev, r.get("versions") or "-", term, v)
            for name, fac in (("before", 1.0), ("in_sample", f["factor"] if f else 1.0),
                              ("held_back", g["factor"] if g else 1.0)):
                errs[name].append(_err(e, m, fac))
                errs[name + "_x"].append(_fold(e, m, fac))
            n_in, n_out = n_in + bool(f), n_out + bool(g)
        rows.append({"device": dev, "term": term, "records": len(rs), "runs": len({str(r["run_id"]) for r in rs}),
                     **{k: statistics.median(v) for k, v in errs.items()},
                     "corrected_in_sample": n_in, "corrected_held_back": n_out})
    return rows


# ---- sharing: export / import ------------------------------------------------------------------------
def export(path, runs=(), about: dict | None = None, records: list[dict] | None = None) -> dict:
    """Write every record (the comparable pairs of ``runs`` + imported ones; or ``records``) as a
    JSON file (``about``: free fields saying how the measurements were made)."""
    recs = all_records(runs) if records is None else records
    machines = {json.dumps(r.get("machine") or {}, sort_keys=True) for r in recs}
    doc = {"schema": SCHEMA, "kind": "tunequant-calibration-records",
           "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(about or {}),
           "machines": [json.loads(m) for m in sorted(machines)], "records": recs}
    path = Path(path)
    write_text_safely(path, json.dumps(doc, indent=1, default=str) + "\n", "export")
    return {"path": str(path), "records": len(recs), "runs": len({r["run_id"] for r in recs})}


REQUIRED = ("run_id", "term", "device", "versions", "estimated", "measured")


def _check_record(r, i: int, path) -> dict:
    if not isinstance(r, dict):
        raise InputError(f"{path}: record {i} is not a JSON object", field="import")
    missing = [k for k in REQUIRED if r.get(k) in (None, "")]
    if missing:
        raise InputError(f"{path}: record {i} lacks {', '.join(missing)} (every record needs "
                         f"{', '.join(REQUIRED)})", field="import")
    if r["term"] not in TERMS:
        raise InputError(f"{path}: record {i} has unknown term {r['term']!r}; known: {', '.join(TERMS)}",
                         field="import")
    for k in ("estimated", "measured"):
        if _num(r[k]) is None or r[k] <= 0:
            raise InputError(f"{path}: record {i}: {k} must be a positive number, got {r[k]!r}", field="import")
    return r


def records_from_bench(doc: dict, source: str = "bench") -> list[dict]:
    """Records from bench/estimates_vs_measured.py output (a GPU session's measurements).

    Only CUDA runs: the CPU smoke run measures shrunken models with a live-storage tracker and
    is predicted for CPU kernels, which no CPU run of the engine uses."""
    if doc.get("device") != "cuda":
        return []
    gpu, v = doc.get("gpu"), doc.get("versions") or {}
    vkey = versions_key(v)
    out = []
    for i, r in enumerate(doc.get("results") or []):
        kind, meas, pred = r.get("kind"), r.get("measured") or {}, r.get("predicted") or {}
        if kind not in ("train", "infer") or meas.get("oom") or meas.get("error"):
            continue
        shape = {k: r.get(k) for k in ("model", "method", "weights", "precision", "grad_ckpt", "seq_len",
                                       "batch_size", "prompt_len", "new_tokens") if r.get(k) is not None}
        label = "-".join(str(x) for x in shape.values())
        for key in (("peak_allocated_bytes", "tokens_per_s") if kind == "train" else
                    ("weights_bytes", "peak_allocated_bytes", "prefill_s", "decode_tokens_per_s")):
            e, m = _num(pred.get(key)), _num(meas.get(key))
            if e and m and e > 0 and m > 0:
                out.append({"run_id": f"bench:{gpu}:{doc.get('started')}:{label}", "term": f"{kind}.{key}",
                            "device": gpu, "versions": vkey, "library_versions": v,
                            "machine": {"gpu": doc.get("device_name"), "gpu_preset": gpu, "device": "cuda"},
                            "inputs": {**shape, "gpu": gpu}, "variant": r.get("method" if kind == "train" else "weights"),
                            "strategy": None, "model": r.get("model"),
                            "stage": kind, "estimated": e, "measured": m, "created": doc.get("started"),
                            "source": source})
    return out


def read_records(path) -> list[dict]:
    """Records from a calibration export or a bench measurement file; InputError otherwise."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"--import: no such file {path}", field="import")
    except (OSError, ValueError) as e:
        raise InputError(f"--import: {path} is not JSON ({e}); expected a `python -m engine calibrate --export` "
                         f"file or a bench/measurements/*.json file", field="import")
    if isinstance(doc, dict) and isinstance(doc.get("records"), list):
        if doc.get("schema") != SCHEMA:
            raise InputError(f"--import: {path} has schema {doc.get('schema')!r}; this version reads schema {SCHEMA}",
                             field="import")
        return [_check_record(r, i, path) for i, r in enumerate(doc["records"])]
    if isinstance(doc, dict) and isinstance(doc.get("results"), list) and "gpu" in doc:
        return records_from_bench(doc, source=f"bench:{path.name}")
    raise InputError(f"--import: {path} is neither a calibration export (schema, records) nor a bench "
                     f"measurement file (gpu, results); make one with `python -m engine calibrate --export FILE`",
                     field="import")


def import_(path, runs=(), refit: bool = True) -> dict:
    """Merge a file's records into $TUNEQUANT_HOME/calibration_records.jsonl (dedupe by run id
    and term; what is there stays) and refit (the records of ``runs``, the run store's finished
    runs, + every imported one) into the fitted JSON. Returns what was added."""
    new = read_records(path)
    have = imported_records()
    merged = _merge(have, new)
    added = len(merged) - len(have)
    rp = records_path()
    rp.parent.mkdir(parents=True, exist_ok=True)
    with open(rp, "a", encoding="utf-8") as f:
        for r in merged[len(have):]:
            f.write(json.dumps(r, default=str) + "\n")
    out = {"file": str(path), "read": len(new), "added": added, "duplicates": len(new) - added,
           "records_path": str(rp)}
    if refit:
        out["fitted"] = write_fit(all_records(runs))[0]
    return out


def _previous_records(path: Path) -> int:
    """How many records the fitted file at ``path`` was fitted on (0: none, or no readable file)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return int(doc.get("records") or 0) if isinstance(doc, dict) else 0
    except (OSError, ValueError, TypeError):
        return 0


def write_text_safely(path, text: str, what: str = "file") -> None:
    """Write ``text`` to ``path`` without ever leaving it half-written: a new file beside it, then a
    rename over it; the previous version is kept as ``<name>.bak`` (one backup). An unwritable place
    is an InputError naming it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        if path.is_file():
            bak = path.with_name(path.name + ".bak")
            try:
                os.replace(path, bak)
            except OSError:
                pass
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise InputError(f"cannot write the {what} {path} ({e.strerror or e}); choose a writable place",
                         field="out")


def write_fit(recs: list[dict], out=None, allow_empty: bool = False) -> tuple[str, dict]:
    """Fit + evaluate ``recs`` and write the fitted JSON (default: fitted_path(), or
    $TUNEQUANT_HOME/calibration.json while calibration is off): a new file, then a rename, the
    previous one kept as ``calibration.json.bak``. A refit with no records over a file fitted on
    some is refused (a mistyped store would wipe every factor) unless ``allow_empty``."""
    path = Path(out) if out else (fitted_path() or home() / "calibration.json")
    before = _previous_records(path)
    if not recs and before and not allow_empty:
        raise InputError(f"refit refused: no records to fit (an empty or wrong run store?), and {path} holds a fit "
                         f"of {before} record(s) that this would drop; nothing was written. Check --store, or pass "
                         f"--allow-empty to fit nothing on purpose (the old file is then kept as {path.name}.bak)",
                         field="store")
    fitted = fit(recs)
    fitted["evaluation"] = evaluate(recs)
    write_text_safely(path, json.dumps({k: v for k, v in fitted.items() if k != "_index"}, indent=1, default=str)
                      + "\n", "fitted calibration")
    return str(path), fitted


def calibrate(runs=(), import_file=None, export_file=None, out=None, store=None, allow_empty: bool = False) -> dict:
    """Import (optional), refit from ``runs`` (the run store's finished runs, read by the caller)
    + the imported records, write the fitted JSON, evaluate, export (optional): what
    `python -m engine calibrate` does. ``store``: where the runs came from (said in the result)."""
    imported = import_(import_file, refit=False) if import_file else None
    recs = all_records(runs)
    path, fitted = write_fit(recs, out, allow_empty=allow_empty)
    res = {"path": path, "store": None if store is None else str(store), "records": len(recs),
           "runs": fitted["runs"], "devices": fitted["devices"], "evaluation": fitted["evaluation"],
           "factors": [{k: f[k] for k in ("device", "versions", "term", "variant", "factor", "gmean", "spread", "runs",
                                          "applies")}
                       for f in fitted["factors"]],
           "active": fitted_path() is not None}
    if imported:
        res["imported"] = imported
    if export_file:
        res["exported"] = export(export_file, runs)
    return res
