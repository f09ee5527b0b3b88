"""``python -m engine estimate {train,infer,accuracy,quantize,merge,batch}``: the flags of DESIGN.md's contracts.

The flags map one to one onto keyword arguments of ``engine.estimate.estimate_train``,
``estimate_infer`` and ``estimate_accuracy``; ``batch`` takes the same names in snake_case as
JSON keys, one request per line, and answers one line per request in order.
"""
from __future__ import annotations

import json
import sys

from engine.cli.output import emit
from engine.errors import InputError
from engine.vocab import DEFAULT_QAT_SCHEME, FINETUNES, LOSS_MODES, PRECISIONS, QAT_SCHEMES, TRAIN_METHODS

# JSON key -> (flag, type, default); one table drives both argparse and batch validation
TRAIN_ARGS = {
    "model": ("--model", str, None),
    "method": ("--method", str, None),
    "precision": ("--precision", str, "bf16"),
    "seq_len": ("--seq-len", int, 512),
    "batch_size": ("--batch-size", int, 4),
    "grad_ckpt": ("--grad-ckpt", bool, True),
    "lora_rank": ("--lora-rank", int, 16),
    "gpu": ("--gpu", str, None),
    "calibration": ("--calibration", bool, True),
    "loss": ("--loss", str, "reference"),
    "qat_scheme": ("--qat-scheme", str, DEFAULT_QAT_SCHEME),     # method qat: what is fake-quantized
    "lora_targets": ("--lora-targets", str, None),               # comma-separated; default all seven
}
INFER_ARGS = {
    "model": ("--model", str, None),
    "weights": ("--weights", str, "bf16"),
    "batch_size": ("--batch-size", int, 1),
    "prompt_len": ("--prompt-len", int, 512),
    "new_tokens": ("--new-tokens", int, 128),
    "gpu": ("--gpu", str, None),
    "group_size": ("--group-size", int, None),
    "calibration": ("--calibration", bool, True),
    "runtime": ("--runtime", str, None),                       # default: the device's (presets/runtimes.yaml)
    "target": ("--target", str, None),                         # a deploy target whose default runtime applies
    "max_ms_per_token": ("--max-ms-per-token", float, None),   # latency goal of the serving capacity
}
QUANTIZE_ARGS = {
    "model": ("--model", str, None),
    "method": ("--method", str, None),
    "bits": ("--bits", int, 4),
    "group_size": ("--group-size", int, 128),
    "calibration_samples": ("--calibration-samples", int, 128),
    "seq_len": ("--seq-len", int, 2048),
    "gpu": ("--gpu", str, None),
}
MERGE_ARGS = {
    "model": ("--model", str, None),
    "base": ("--base", str, "bf16"),
    "lora_rank": ("--lora-rank", int, 16),
    "gpu": ("--gpu", str, None),
}
ACCURACY_ARGS = {
    "family": ("--family", str, None),
    "params_b": ("--params-b", float, None),
    "method": ("--method", str, None),
    "w_bits": ("--w-bits", float, None),
    "a_bits": ("--a-bits", float, 16),
    "group_size": ("--group-size", int, None),
    "per_channel": ("--per-channel", bool, False),
    "finetune": ("--finetune", str, "none"),
    # the activation scale's granularity when --a-bits < 16 (default per-token: dynamic int8 as
    # torchao / ExecuTorch / vLLM run it); the estimate module's error lists the choices
    "act_granularity": ("--act-granularity", str, None),
    "runs": ("--runs", str, None),      # measured evidence: run ids (comma-separated) or "store" (every finished run)
}
REQUIRED = {"train": ("model", "method"), "infer": ("model",), "accuracy": ("family", "params_b", "method", "w_bits"),
            "quantize": ("model", "method"), "merge": ("model",)}
CHOICES = {
    ("train", "method"): TRAIN_METHODS,
    ("train", "precision"): PRECISIONS,
    ("train", "loss"): LOSS_MODES,
    ("train", "qat_scheme"): tuple(QAT_SCHEMES),
    ("accuracy", "finetune"): FINETUNES,
    ("infer", "target"): ("gpu-server", "consumer-gpu", "edge", "phone"),
}
KINDS = {"train": TRAIN_ARGS, "infer": INFER_ARGS, "accuracy": ACCURACY_ARGS,
         "quantize": QUANTIZE_ARGS, "merge": MERGE_ARGS}


def measured_rows(runs: str) -> list[dict]:
    """--runs: finished runs of the run store ($TUNEQUANT_HOME) as measured accuracy rows
    (engine.advisor.measured.measured_from_runs); "store" takes every finished run."""
    from engine.advisor.measured import measured_from_runs
    from engine.runs import api                    # sqlite only: imports no torch
    if runs.strip().lower() == "store":
        chosen = [api.get_run(r["id"]) for r in api.list_runs(status="finished")]
    else:
        ids = [i.strip() for i in runs.split(",") if i.strip()]
        known = {r["id"] for r in api.list_runs()}
        missing = [i for i in ids if i not in known]
        if missing:
            raise InputError(f"unknown run id(s) {', '.join(missing)} in the run store "
                             f"({api.executor().store.path}); `python -m engine runs list` shows them, or use --runs store",
                             field="runs")
        chosen = [api.get_run(i) for i in ids]
    return measured_from_runs(chosen)


def _call(kind: str, kwargs: dict) -> dict:
    from engine import estimate
    if kind == "accuracy":
        kwargs = dict(kwargs)
        runs = kwargs.pop("runs", None)
        if runs:
            kwargs["measured"] = measured_rows(runs)
    fn = {"train": estimate.estimate_train, "infer": estimate.estimate_infer,
          "accuracy": estimate.estimate_accuracy, "quantize": estimate.estimate_quantize,
          "merge": estimate.estimate_merge}[kind]
    return fn(**kwargs)


def _coerce(kind: str, raw: dict) -> dict:
    """Validate a request's keys and types against the table; fill defaults."""
    table = KINDS[kind]
    unknown = sorted(set(raw) - set(table))
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(unknown)} for kind {kind!r}; known: {', '.join(table)}")
    out = {}
    for key, (flag, typ, default) in table.items():
        val = raw.get(key, default)
        if key == "model" and isinstance(val, dict):        # {params_b, family} (README), or config.json fields
            out[key] = val
            continue
        if val is None:
            if key in REQUIRED[kind]:
                raise InputError(f"{kind}: {key} ({flag}) is required", field=key)
            out[key] = None
            continue
        try:
            if typ is bool:
                if not isinstance(val, bool):
                    raise ValueError
            elif typ is int:
                if isinstance(val, bool) or float(val) != int(float(val)):
                    raise ValueError
                val = int(float(val))
            elif typ is float:
                if isinstance(val, bool):
                    raise ValueError
                val = float(val)
            else:
                val = str(val)
        except (TypeError, ValueError):
            raise InputError(f"{kind}: {key} must be {typ.__name__}, got {val!r}", field=key)
        allowed = CHOICES.get((kind, key))
        if allowed and val not in allowed:
            raise InputError(f"{kind}: {key} must be one of {', '.join(allowed)}, got {val!r}", field=key)
        out[key] = val
    return out


def _add_flags(p, kind: str) -> None:
    for key, (flag, typ, default) in KINDS[kind].items():
        if key == "grad_ckpt":
            g = p.add_mutually_exclusive_group()
            g.add_argument("--grad-ckpt", dest="grad_ckpt", action="store_true", default=True,
                           help="gradient checkpointing, non-reentrant (default)")
            g.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false")
        elif key == "calibration":
            g = p.add_mutually_exclusive_group()
            g.add_argument("--calibration", dest="calibration", action="store_true", default=True,
                           help="correct the figures by measured runs where a fit matches (default; docs/calibration.md)")
            g.add_argument("--no-calibration", dest="calibration", action="store_false",
                           help="the formula's figures alone")
        elif key == "per_channel":
            p.add_argument(flag, dest=key, action="store_true", help="one scale per output channel (no groups)")
        else:
            p.add_argument(flag, dest=key, type=typ, default=default, required=key in REQUIRED[kind],
                           choices=CHOICES.get((kind, key)))
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _run_one(kind):
    def run(args):
        raw = {k: getattr(args, k) for k in KINDS[kind]}
        emit(_call(kind, _coerce(kind, raw)), as_json=args.json)
        return 0
    return run


def _run_batch(args) -> int:
    """One JSON request per stdin line -> one JSON answer per line, in order; errors stay local."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise InputError("each line must be a JSON object with a 'kind'")
            req = dict(req)
            kind = req.pop("kind", None)
            if kind not in KINDS:
                raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}", field="kind")
            result = _call(kind, _coerce(kind, req))
        except json.JSONDecodeError as e:
            result = {"error": f"line is not JSON: {e}"}
        except RecursionError:
            result = {"error": "line is nested too deeply to be a request"}
        except InputError as e:
            result = e.to_json()
        except Exception as e:          # one bad request never aborts the batch: its line says why
            result = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}
        emit(result)
    return 0


def register(sub) -> None:
    est = sub.add_parser("estimate", help="memory, speed, accuracy estimates")
    esub = est.add_subparsers(dest="what", required=True, parser_class=type(est))
    for kind, help_ in (("train", "training memory and speed"), ("infer", "inference memory and speed"),
                        ("accuracy", "accuracy retention and perplexity ratio"),
                        ("quantize", "memory and time of a quantize/calibration stage (GPTQ, AWQ, ...)"),
                        ("merge", "memory of merging LoRA adapters into the 16-bit base")):
        p = esub.add_parser(kind, help=help_)
        _add_flags(p, kind)
        p.set_defaults(func=_run_one(kind))
    b = esub.add_parser("batch", help="JSON lines on stdin, one answer per line")
    b.add_argument("--json", action="store_true", help="(always JSON)")
    b.set_defaults(func=_run_batch)
