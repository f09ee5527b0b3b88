"""Measured evidence: the user's finished runs as accuracy evidence for the advisor.

A run record's evaluate stage measured the 16-bit model (``before``) and the run's own model
(``after``) on the same held-out rows; ``measured_from_runs`` turns that into rows the accuracy
model takes (``estimate_accuracy(measured=...)``), ``measured_runs`` keeps the runs of a
scenario's model and ``evidence`` groups the rows per strategy (the newest run counts). The
runs themselves come from the caller (engine.runs.evidence reads the run store): the advisor
reads no database.
"""
from __future__ import annotations

from engine import models, strategies
from engine.advisor.rules import scenario_of
from engine.errors import InputError
from engine.estimate import accuracy
from engine.record import RunRecord

def run_models(run: dict) -> set[str]:
    """The names a run's model goes by (the spec's reference, the planner's resolved name), lowercase."""
    rec = RunRecord.of(run)
    names = {rec.model, rec.spec.get("model")}
    for est in rec.estimate.values():
        if isinstance(est, dict) and isinstance(est.get("model"), dict):
            names.add(est["model"].get("name"))
    return {str(n).strip().lower() for n in names if n}


def _run_arch(rec: RunRecord) -> tuple[str, float] | None:
    """(family, params_b) of a run's model: from the planner estimate stored with the run, else resolved."""
    for est in rec.estimate.values():
        m = est.get("model") if isinstance(est, dict) else None
        if isinstance(m, dict) and m.get("family") and m.get("total_params"):
            return m["family"], m["total_params"] / 1e9
    try:
        a = models.resolve(rec.spec.get("model") or rec.model)
        return a.family, a.total_params / 1e9
    except Exception:                          # noqa: BLE001 - a model that no longer resolves: no config keys
        return None


def measured_from_runs(runs, model=None, strategy=None) -> list[dict]:
    """Finished runs' evaluate results -> measured rows for ``estimate_accuracy(measured=...)``.

    One row per metric the run measured on both the 16-bit model (``before``) and its own model
    (``after``) on the same held-out rows: ``perplexity`` (ratio after / before) and each task
    score of accuracy_model.yaml ``measured.task_metrics`` (retention after / before). Each row:
    run_id, strategy, model, dataset, rows (held-out rows evaluated), metric, value (after),
    baseline (before), ratio (None when the baseline is 0), comparable, reference, why, the
    strategy's quantization config (method, w_bits, a_bits, group, finetune), family, params_b.
    ``comparable`` is False for a run that fine-tuned: its ``before`` is the base before
    fine-tuning, so its ratio holds the fine-tuning gain too (estimate_accuracy leaves it out).
    ``model`` / ``strategy`` keep the runs of that model (a name it goes by) / strategy id only.
    Runs that did not finish or did not evaluate before and after give no rows. Newest first
    as given (engine.runs.api.list_runs order)."""
    want = None if model is None else str(getattr(model, "name", model)).strip().lower()
    ms = accuracy.spec()["measured"]
    out = []
    for run in runs or []:
        if not isinstance(run, dict) or run.get("status", "finished") != "finished":
            continue
        rec = RunRecord.of(run)
        sid = rec.strategy
        if (strategy is not None and sid != strategy) or (want is not None and want not in run_models(run)):
            continue
        ev = rec.evaluation
        if ev is None:
            continue
        try:
            s = strategies.get(sid)
        except InputError:
            continue                           # a strategy no longer in the catalog
        trained = strategies.traits(s)["train"] != "none"
        acc = strategies.accuracy_request(s)
        arch = _run_arch(rec)
        cfg = {"method": acc.get("method", "none"), "w_bits": float(acc.get("w_bits", 16)),
               "a_bits": float(acc.get("a_bits", 16)), "finetune": acc.get("finetune", "none")}
        if arch:
            cfg.update(family=arch[0], params_b=arch[1])
            try:
                cfg["group"] = accuracy.validate_request(arch[0], arch[1], cfg["method"], cfg["w_bits"], cfg["a_bits"],
                                         acc.get("group_size"), bool(acc.get("per_channel")),
                                         cfg["finetune"])["group"]
            except InputError:
                pass
        reference = "16-bit base before fine-tuning" if trained else "16-bit model before quantization"
        why = ("the run fine-tuned: after / before holds the fine-tuning gain as well as the quantization "
               "loss" if trained else "same model, same held-out rows, before and after quantization")
        base = {"run_id": rec.id, "strategy": sid, "model": rec.model,
                "dataset": rec.dataset, "rows": ev.rows, "task": ev.task,
                "comparable": not trained, "reference": reference, "why": why, **cfg}
        b, a = ev.before, ev.after
        if isinstance(b.get("perplexity"), (int, float)) and isinstance(a.get("perplexity"), (int, float)) \
                and b["perplexity"] > 0 and a["perplexity"] > 0:
            out.append({**base, "metric": "perplexity", "value": a["perplexity"], "baseline": b["perplexity"],
                        "ratio": a["perplexity"] / b["perplexity"],
                        "tokens": a.get("scored_tokens"), "published_metric": ms["ppl_metric"]})
        for t in ms["task_metrics"]:
            if isinstance(b.get(t), (int, float)) and isinstance(a.get(t), (int, float)):
                out.append({**base, "metric": t, "value": a[t], "baseline": b[t],
                            "ratio": a[t] / b[t] if b[t] > 0 else None,
                            "published_metric": ms["task_metric"]})
    return out


def measured_runs(scenario, runs) -> list[dict]:
    """The runs of ``runs`` (finished run records, as engine.runs.api.get_run returns them) that
    count as measured evidence for a scenario: the finished runs of the scenario's model (the
    run's model reference or its resolved name), newest first. Which runs to consider is the
    caller's (the scenario's ``measured`` field is resolved against the run store by
    engine.runs.evidence.measured_runs)."""
    sc = scenario_of(scenario)
    found = []
    for i, r in enumerate(runs or []):
        if not isinstance(r, dict):
            raise InputError(f"measured[{i}]: {r!r} is not a run record; run ids are read from the run store by "
                             f"engine.runs.evidence.measured_runs (or `recommend --measured ID,ID`)", field="measured")
        found.append(r)
    names = {sc.arch().name.strip().lower()} | ({sc.model.strip().lower()} if isinstance(sc.model, str) else set())
    out = [r for r in found if r.get("status", "finished") == "finished" and run_models(r) & names]
    return sorted(out, key=lambda r: -(r.get("created") or 0))


def evidence(runs: list[dict]) -> dict:
    """Measured rows of the runs, the newest run per strategy, and a summary for the output."""
    rows = measured_from_runs(runs)
    by_strategy: dict[str, dict] = {}
    for r in rows:                                         # runs are newest first
        e = by_strategy.setdefault(r["strategy"], {"run_id": r["run_id"], "rows": [], "runs": []})
        if r["run_id"] not in e["runs"]:
            e["runs"].append(r["run_id"])
        if r["run_id"] == e["run_id"]:
            e["rows"].append(r)
    summary = [{"run_id": r.get("id"), "strategy": r.get("strategy"), "model": r.get("model"),
                "used_for": next((sid for sid, e in by_strategy.items() if e["run_id"] == r.get("id")), None)}
               for r in runs]
    return {"rows": rows, "by_strategy": by_strategy, "summary": summary}
