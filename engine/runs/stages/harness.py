"""lm-evaluation-harness inside the evaluate stage (``evaluate.harness``).

Two kinds of task, run on the model the stage already loaded (no second load):

``run``        the run's own held-out rows as a local harness task, written into the run's
               workdir (``harness/``) and read by the harness's ``json`` dataset builder, so it
               works offline. Its type follows the data: classification -> ``multiple_choice``
               over the dataset's labels (acc, acc_norm: the log-likelihood of each label after
               the prompt, the harness's standard for classification); structured output and
               generation -> ``generate_until`` (exact_match of the greedy completion);
               plain text -> ``loglikelihood_rolling`` (word_perplexity, byte_perplexity,
               bits_per_byte).
any other name a task of the harness's registry (``hellaswag``, ``arc_easy`` ...): its dataset
               comes from the Hugging Face Hub, so offline it is reported as not run, with the
               reason, and the run goes on (a run that trained for an hour does not fail on a
               benchmark it could not download).

Each task is limited to ``evaluate.harness_limit`` documents (default: ``evaluate.max_examples``).
The harness is imported here only (the worker), never by the planner or the UI.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

RUN_TASK = "run"


def _yaml_task(name: str, data: Path, task: str, labels: list[str]) -> dict:
    """The harness config of the run's own task (a dict the TaskManager reads as YAML)."""
    cfg = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
           "test_split": "test", "metadata": {"version": 1.0}}
    if task == "classification":
        # the label follows the prompt exactly as in training: no delimiter added before it
        cfg.update(output_type="multiple_choice", doc_to_text="{{prompt}}", doc_to_choice=list(labels),
                   doc_to_target="{{label_index}}", target_delimiter="",
                   metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}])
    elif task == "text":
        cfg.update(output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{completion}}",
                   metric_list=[{"metric": m, "aggregation": m, "higher_is_better": False}
                                for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")])
    else:                                  # structured output, generation
        cfg.update(output_type="generate_until", doc_to_text="{{prompt}}", doc_to_target="{{completion}}",
                   target_delimiter="", generation_kwargs={"until": ["\n\n"], "do_sample": False,
                                                           "max_gen_toks": 256},
                   metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                 "ignore_case": False, "ignore_punctuation": False}])
    return cfg


def write_run_task(workdir: Path, ds, examples) -> tuple[str, Path]:
    """The run's held-out rows as a harness task in ``workdir/harness``: (task name, folder)."""
    folder = Path(workdir) / "harness"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"tunequant_{ds.task}"
    data = folder / "heldout.jsonl"
    with data.open("w", encoding="utf-8") as fh:
        for ex in examples:
            row = {"prompt": ex.prompt, "completion": ex.completion}
            if ds.task == "classification":
                row["label_index"] = ds.labels.index(ex.label) if ex.label in ds.labels else -1
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    import yaml
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(_yaml_task(name, data, ds.task, ds.labels),
                                                        sort_keys=False), encoding="utf-8")
    return name, folder


def _clean(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def run(ctx, model, tok, ds, examples) -> dict:
    """Every task of ``evaluate.harness`` on ``model``: {task: {metric: value, metric_stderr: ...,
    "n": documents, "kind": "run" | "harness"} or {"error": why}}."""
    es = ctx.spec.evaluate
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    limit = es.harness_limit or es.max_examples
    names, include = {}, None
    for t in es.harness:
        if t == RUN_TASK:
            if ds.task == "classification" and any(ex.label not in ds.labels for ex in examples):
                raise ValueError("the held-out rows have labels outside the dataset's label set")
            name, include = write_run_task(ctx.workdir, ds, examples)
            names[name] = RUN_TASK
        else:
            names[t] = t
    tm = TaskManager(include_path=str(include) if include else None, include_defaults=any(v != RUN_TASK
                                                                                           for v in names.values()))
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8, max_length=max(ctx.spec.train.seq_len, 256))
    out: dict = {}
    for name, asked in names.items():
        if ctx.should_stop():
            break
        try:
            res = lm_eval.simple_evaluate(model=lm, tasks=[name], limit=limit, task_manager=tm, log_samples=False,
                                          bootstrap_iters=1000, random_seed=0, numpy_random_seed=0,
                                          torch_random_seed=0, fewshot_random_seed=0)
        except Exception as e:           # a hub task offline, an unknown name: said, the run goes on
            msg = f"{type(e).__name__}: {e}"
            if asked != RUN_TASK and ("offline" in msg.lower() or "connect" in msg.lower()
                                      or "couldn't reach" in msg.lower() or "hub" in msg.lower()):
                msg = f"{asked} needs its dataset from the Hugging Face Hub, which this machine cannot reach ({msg[:200]})"
            ctx.log(f"lm-eval {asked}: not run: {msg[:300]}")
            out[asked] = {"error": msg[:500]}
            continue
        r = (res or {}).get("results", {}).get(name, {})
        vals = {}
        for k, v in r.items():            # "acc,none" -> acc ; "acc_stderr,none" -> acc_stderr
            if k == "alias":
                continue
            metric = k.split(",")[0]
            if _clean(v) is not None:
                vals[metric] = round(float(v), 6)
        n = (res.get("n-samples") or {}).get(name, {}).get("effective")
        out[asked] = {**vals, "n": n, "task": name, "kind": "run" if asked == RUN_TASK else "harness",
                      "source": f"lm-eval {lm_eval.__version__}"}
        ctx.log(f"lm-eval {asked} ({name}, {n} documents): " +
                ", ".join(f"{k} {v:.4g}" for k, v in vals.items() if not k.endswith("_stderr")))
    return out
