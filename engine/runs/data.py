"""Datasets for runs: read JSONL/JSON/CSV, check them, split them, turn rows into examples.

Four formats (``format: auto`` detects them from the fields of the rows):

    text            {"text": ...}                                   plain language modelling
    instruction     {"instruction": ..., "input": ... (optional), "output": ...}
    chat            {"messages": [{"role": "user"|"system"|"assistant", "content": ...}, ...]}
                    (the last message is the assistant's answer the model learns)
    classification  {"text": ..., "label": ..., "instruction": ... (optional: what to do, e.g. the labels)}

Every row becomes an ``Example``: a ``prompt`` (what the model is given) and a ``completion``
(what it must produce; training loss and held-out perplexity count these tokens, or every token
for ``text``). The task decides the accuracy measured at evaluation:

    classification  exact match of the generated label
    structured      outputs are JSON objects (>= 80% of rows): valid-JSON rate and field exact match
    generation      instruction/chat without JSON outputs: perplexity only
    text            perplexity only

``validate_dataset(path)`` is what the UI calls on an upload (no torch; token lengths through
the ``tokenizers`` library when a tokenizer is given, else estimated at 4 characters a token and
marked so). ``load(spec)`` is what runs use: it refuses a dataset with problems (InputError
naming the rows), and splits off the held-out rows (20% by default, seeded).
"""
from __future__ import annotations

import csv
import json
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from engine import safeload
from engine.errors import InputError

FORMATS = ("text", "instruction", "chat", "classification")
REQUIRED = {"text": ("text",), "instruction": ("instruction", "output"), "chat": ("messages",),
            "classification": ("text", "label")}
ROLES = ("system", "user", "assistant")
STRUCTURED_MIN_FRACTION = 0.8      # share of JSON-object outputs that makes a dataset "structured"
CHARS_PER_TOKEN = 4.0              # the estimate used when no tokenizer is given
MAX_SHOWN_ROWS = 10                # row numbers listed per problem


# ---- the prompt templates (plain text: they work with any tokenizer, chat template or not) --
def render(row: dict, fmt: str) -> tuple[str, str]:
    """(prompt, completion) of one row."""
    if fmt == "text":
        return "", str(row["text"])
    if fmt == "classification":        # an optional instruction (e.g. naming the labels) goes first
        head = f"### Instruction:\n{str(row['instruction']).strip()}\n\n" if row.get("instruction") else ""
        return head + f"### Text:\n{row['text']}\n\n### Label:\n", str(row["label"])
    if fmt == "instruction":
        inp = str(row.get("input") or "").strip()
        prompt = f"### Instruction:\n{row['instruction']}\n\n"
        if inp:
            prompt += f"### Input:\n{inp}\n\n"
        return prompt + "### Response:\n", str(row["output"])
    if fmt == "chat":
        msgs = row["messages"]
        prompt = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in msgs[:-1])
        return prompt + "<|assistant|>\n", str(msgs[-1]["content"])
    raise InputError(f"unknown dataset format {fmt!r}; known: {', '.join(FORMATS)}", field="dataset.format")


def messages(row: dict, fmt: str) -> list[dict] | None:
    """The prompt of one row as chat messages (what a chat template renders), None for plain text.
    Classification and instruction rows are one user turn: the instruction, then the text/input."""
    if fmt == "text":
        return None
    if fmt == "classification":
        head = f"{str(row['instruction']).strip()}\n\n" if row.get("instruction") else ""
        return [{"role": "user", "content": head + str(row["text"])}]
    if fmt == "instruction":
        inp = str(row.get("input") or "").strip()
        return [{"role": "user", "content": str(row["instruction"]).strip() + (f"\n\n{inp}" if inp else "")}]
    if fmt == "chat":
        return [{"role": m["role"], "content": str(m["content"])} for m in row["messages"][:-1]]
    return None


@dataclass
class Example:
    prompt: str
    completion: str
    label: str | None = None           # classification
    fields: dict | None = None         # structured output: the reference JSON object
    messages: list | None = None       # the prompt as chat messages (with_chat_template renders them)


@dataclass
class Dataset:
    format: str
    task: str                          # classification | structured | generation | text
    train: list[Example]
    eval: list[Example]
    labels: list[str] = field(default_factory=list)
    source: str = ""
    chat_template: bool = False        # prompts rendered by the model's chat template (with_chat_template)

    def summary(self) -> dict:
        return {"format": self.format, "task": self.task, "train_rows": len(self.train),
                "eval_rows": len(self.eval), "labels": self.labels, "source": self.source,
                "chat_template": self.chat_template}


# ---- reading ---------------------------------------------------------------------------
def read_rows(path: str | Path) -> tuple[list, list[dict]]:
    """(rows, parse problems). JSONL (one object a line), a JSON array, or CSV with a header."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"dataset file {str(path)!r} not found", field="dataset.path")
    safeload.check_size(p, "dataset", safeload.max_dataset_bytes(), "TUNEQUANT_MAX_DATASET_BYTES", "dataset.path")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"dataset {p.name} is not UTF-8 text ({e}); save it as UTF-8 JSONL or CSV",
                         field="dataset.path")
    suffix = p.suffix.lower()
    problems: list[dict] = []
    if suffix == ".csv" or suffix == ".tsv":
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        rows = [dict(r) for r in reader]
        if reader.fieldnames is None:
            raise InputError(f"dataset {p.name} is empty", field="dataset.path")
        extra = [i + 2 for i, r in enumerate(rows) if None in r]
        if extra:
            problems.append(_problem("error", "parse", extra, "have more cells than the header has columns"))
        return [{k: v for k, v in r.items() if k is not None} for r in rows], problems
    if suffix not in (".jsonl", ".json", ".ndjson", ""):
        raise InputError(f"dataset {p.name}: unsupported file type {suffix!r}; use .jsonl, .json or .csv",
                         field="dataset.path")
    stripped = text.lstrip()
    if stripped.startswith("["):                     # a JSON array of objects
        try:
            data = safeload.loads_json(text, f"dataset {p.name}", field="dataset.path")
        except json.JSONDecodeError as e:
            raise InputError(f"dataset {p.name} is not valid JSON: {e}", field="dataset.path")
        return list(data), problems
    rows, bad = [], []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError):      # RecursionError: nested hundreds deep
            bad.append(i)
            rows.append(None)
    if bad:
        problems.append(_problem("error", "parse", bad, "are not valid JSON (JSONL wants one object per line)",
                                 unit="line"))
    return rows, problems


def _problem(severity: str, kind: str, rows: list[int], what: str, unit: str = "row") -> dict:
    shown = ", ".join(map(str, rows[:MAX_SHOWN_ROWS])) + (" ..." if len(rows) > MAX_SHOWN_ROWS else "")
    plural = unit + ("s" if len(rows) != 1 else "")
    return {"severity": severity, "kind": kind, "count": len(rows), "rows": rows[:MAX_SHOWN_ROWS],
            "message": f"{len(rows)} {plural} ({shown}) {what}"}


# ---- format detection and checks ------------------------------------------------------------
def detect_format(rows: list) -> str | None:
    """The format most rows fit, or None."""
    votes = {f: 0 for f in FORMATS}
    for r in rows:
        if not isinstance(r, dict):
            continue
        if "messages" in r:
            votes["chat"] += 1
        elif "instruction" in r and "output" in r:
            votes["instruction"] += 1
        elif "text" in r and "label" in r:
            votes["classification"] += 1
        elif "text" in r:
            votes["text"] += 1
    best = max(votes, key=votes.get)
    return best if votes[best] > 0 else None


def _row_problem(row, fmt: str) -> str | None:
    """What is wrong with one row for this format ("missing" / "empty" / a message), or None."""
    if not isinstance(row, dict):
        return "not-object"
    missing = [k for k in REQUIRED[fmt] if k not in row or row[k] is None]
    if missing:
        return "missing"
    if fmt == "chat":
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "empty"
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return "bad-message"
        if msgs[-1]["role"] != "assistant":
            return "no-answer"
        if not msgs[-1]["content"].strip():
            return "empty"
        return None
    texts = [k for k in REQUIRED[fmt] if k != "label"] + (["input"] if fmt == "instruction" and "input" in row
                                                           and row["input"] is not None else [])
    if any(not isinstance(row[k], str) for k in texts):
        return "not-text"
    label = row.get("label")
    if fmt == "classification" and (isinstance(label, (list, dict)) or
                                    (isinstance(label, float) and not label == label)):
        return "not-text"
    if any(not str(row[k]).strip() for k in REQUIRED[fmt]):
        return "empty"
    return None


_ROW_MESSAGES = {
    "not-object": "are not JSON objects",
    "not-text": "have a value that is not text in {fields} (a number, NaN, a list or an object; text fields take "
                "strings, a label a string or a whole number)",
    "missing": "lack a required field ({fields})",
    "empty": "have an empty required field ({fields})",
    "bad-message": "have a message that is not {{\"role\": system|user|assistant, \"content\": text}}",
    "no-answer": "do not end with an assistant message (the answer the model learns)",
}


def _as_json_object(s: str):
    try:
        v = json.loads(s)
    except (json.JSONDecodeError, TypeError):
        return None
    return v if isinstance(v, dict) else None


def _length_stats(values: list[int]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    return {"min": v[0], "mean": round(statistics.fmean(v), 1), "p50": v[len(v) // 2],
            "p95": v[min(len(v) - 1, int(round(0.95 * (len(v) - 1))))], "max": v[-1]}


def _token_counter(tokenizer):
    """A text -> token count function, and what it is (``tokenizers`` only: no torch)."""
    if tokenizer is None:
        return (lambda s: max(1, round(len(s) / CHARS_PER_TOKEN))), f"estimated ({CHARS_PER_TOKEN:g} chars/token)"
    if isinstance(tokenizer, (str, Path)):
        from tokenizers import Tokenizer
        p = Path(tokenizer)
        p = p / "tokenizer.json" if p.is_dir() else p
        if not p.is_file():
            raise InputError(f"tokenizer {str(tokenizer)!r}: no tokenizer.json there", field="tokenizer")
        tok = Tokenizer.from_file(str(p))
        return (lambda s: len(tok.encode(s, add_special_tokens=False).ids)), f"tokenizer {p}"
    if hasattr(tokenizer, "encode"):       # a tokenizers.Tokenizer or a transformers tokenizer
        def count(s):
            out = tokenizer.encode(s, add_special_tokens=False)
            return len(out.ids if hasattr(out, "ids") else out)
        return count, f"tokenizer {type(tokenizer).__name__}"
    raise InputError("tokenizer must be a path to a tokenizer.json (or its folder) or a tokenizer object",
                     field="tokenizer")


def task_of(fmt: str, examples: list[Example]) -> str:
    if fmt == "classification":
        return "classification"
    if fmt == "text":
        return "text"
    if examples and sum(e.fields is not None for e in examples) >= STRUCTURED_MIN_FRACTION * len(examples):
        return "structured"
    return "generation"


def _example(row: dict, fmt: str) -> Example:
    prompt, completion = render(row, fmt)
    return Example(prompt=prompt, completion=completion,
                   label=str(row["label"]).strip() if fmt == "classification" else None,
                   fields=_as_json_object(completion) if fmt in ("instruction", "chat") else None,
                   messages=messages(row, fmt))


def with_chat_template(ds: "Dataset", tok) -> "Dataset":
    """The dataset with every prompt rendered by the tokenizer's chat template (the user turn(s),
    then the assistant header: ``add_generation_prompt``), as TRL and LLaMA-Factory train and
    evaluate a chat model; the completion stays the answer, and the training/eval code appends the
    tokenizer's EOS (a chat model's end-of-turn token) after it. Returns ``ds`` itself when the
    tokenizer has no chat template or the rows are plain text. A BOS the template writes is left
    out when the tokenizer adds one itself, so the prompt tokenizes the same as the template."""
    if not getattr(tok, "chat_template", None) or ds.format == "text" or ds.chat_template:
        return ds
    bos = getattr(tok, "bos_token", None)
    adds_bos = bool(bos) and tok("", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]

    def one(ex: Example) -> Example:
        if not ex.messages:
            return ex
        text = tok.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False)
        if adds_bos and text.startswith(bos):
            text = text[len(bos):]
        return Example(prompt=text, completion=ex.completion, label=ex.label, fields=ex.fields, messages=ex.messages)
    return Dataset(format=ds.format, task=ds.task, train=[one(e) for e in ds.train], eval=[one(e) for e in ds.eval],
                   labels=ds.labels, source=ds.source, chat_template=True)


def validate_rows(rows: list, fmt: str = "auto", tokenizer=None, source: str = "") -> dict:
    """The checks of ``validate_dataset`` on rows already read."""
    problems: list[dict] = []
    if not rows:
        return {"format": None, "rows": 0, "valid_rows": 0, "task": None, "problems": [
            _problem("error", "empty-file", [], "found: the dataset has no rows")], "stats": {}, "preview": []}
    if fmt == "auto":
        fmt = detect_format(rows)
        if fmt is None:
            keys = sorted({k for r in rows[:50] if isinstance(r, dict) for k in r})
            raise InputError(f"dataset {source}: no known format; fields found: {', '.join(keys) or 'none'}. "
                             "Expected one of: text {text}; instruction {instruction, input?, output}; "
                             "chat {messages: [{role, content}, ...]}; classification {text, label}",
                             field="dataset.format")
    elif fmt not in FORMATS:
        raise InputError(f"unknown dataset format {fmt!r}; known: auto, {', '.join(FORMATS)}", field="dataset.format")
    bad: dict[str, list[int]] = {}
    good: list[tuple[int, dict]] = []
    for i, r in enumerate(rows, start=1):
        if r is None:                       # unparsable line, already reported
            continue
        why = _row_problem(r, fmt)
        if why:
            bad.setdefault(why, []).append(i)
        else:
            good.append((i, r))
    fields = ", ".join(REQUIRED[fmt])
    for why, idx in bad.items():
        problems.append(_problem("error", why, idx, _ROW_MESSAGES[why].format(fields=fields)))
    # duplicates: the same prompt and answer twice teaches the same thing twice and leaks into
    # the held-out split
    seen: dict[tuple, int] = {}
    dups = []
    examples = []
    for i, r in good:
        ex = _example(r, fmt)
        key = (ex.prompt.strip(), ex.completion.strip())
        if key in seen:
            dups.append(i)
        else:
            seen[key] = i
        examples.append(ex)
    if dups:
        problems.append(_problem("warning", "duplicate", dups,
                                 "repeat an earlier row exactly (they can land in both the training and the "
                                 "held-out split)"))
    count, counted_by = _token_counter(tokenizer)
    prompt_tok = [count(e.prompt) for e in examples] if fmt != "text" else []
    compl_tok = [count(e.completion) for e in examples]
    total_tok = [count(e.prompt + e.completion) for e in examples]
    stats: dict = {"tokens_counted_by": counted_by, "total_tokens": _length_stats(total_tok),
                   "completion_tokens": _length_stats(compl_tok)}
    if prompt_tok:
        stats["prompt_tokens"] = _length_stats(prompt_tok)
    stats["sum_tokens"] = sum(total_tok)
    labels: list[str] = []
    if fmt == "classification":
        dist: dict[str, int] = {}
        for e in examples:
            dist[e.label] = dist.get(e.label, 0) + 1
        stats["labels"] = dict(sorted(dist.items(), key=lambda kv: -kv[1]))
        labels = sorted(dist)
        if len(dist) == 1:
            problems.append(_problem("warning", "one-label", [], f"found: every row has the label {labels[0]!r}; "
                                     "a classifier needs at least two labels"))
    task = task_of(fmt, examples)
    if fmt in ("instruction", "chat"):
        stats["json_object_outputs"] = round(sum(e.fields is not None for e in examples) / max(1, len(examples)), 3)
    if 0 < len(examples) < 10:
        problems.append(_problem("warning", "few-rows", [], f"found: only {len(examples)} usable rows; "
                                 "fine-tuning and held-out metrics need more (hundreds or more)"))
    preview = [{"prompt": e.prompt[:300], "completion": e.completion[:300]} for e in examples[:5]]
    return {"format": fmt, "task": task, "rows": len(rows), "valid_rows": len(examples), "labels": labels,
            "problems": problems, "stats": stats, "preview": preview}


def validate_dataset(path: str | Path, format: str = "auto", tokenizer=None) -> dict:
    """Check a dataset file without loading any model: ``{format, task, rows, valid_rows,
    problems, stats, preview}``. Problems have a severity ("error" refuses a run, "warning"
    does not), a kind, the row numbers (first 10) and a message a person can act on.
    Raises InputError only when the file cannot be read at all or fits no format."""
    rows, parse_problems = read_rows(path)
    out = validate_rows(rows, format, tokenizer, source=Path(path).name)
    out["problems"] = parse_problems + out["problems"]
    out["path"] = str(path)
    return out


def errors_of(report: dict) -> list[str]:
    return [p["message"] for p in report["problems"] if p["severity"] == "error"]


# ---- what runs use ------------------------------------------------------------------------
def split(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle, at least one row on each side."""
    if len(items) < 2:
        raise InputError(f"the dataset has {len(items)} usable row(s); a run needs at least 2 "
                         "(training rows and held-out rows)", field="dataset")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(items) - 1, max(1, round(len(items) * eval_fraction)))
    return [items[i] for i in order[n_eval:]], [items[i] for i in order[:n_eval]]


def resolve_path(spec) -> Path:
    """The file a DataSpec points at (a demo dataset is generated on first use)."""
    if spec.demo:
        from engine.runs import demo
        return demo.dataset_path(spec.demo)
    if not spec.path:
        raise InputError("dataset: give path (a JSONL/CSV file) or demo (one of the demo datasets)",
                         field="dataset.path")
    return Path(spec.path).expanduser()


def check(spec, tokenizer=None) -> dict:
    """Validate the dataset of a DataSpec; InputError naming every error found."""
    path = resolve_path(spec)
    report = validate_dataset(path, spec.format, tokenizer)
    errs = errors_of(report)
    if errs:
        raise InputError(f"dataset {path.name} ({report['format']}) has problems: " + "; ".join(errs) +
                         ". Fix or remove those rows.", field="dataset")
    if report["valid_rows"] < 2:
        raise InputError(f"dataset {path.name} has {report['valid_rows']} usable row(s); a run needs at least 2",
                         field="dataset")
    return report


def load(spec) -> Dataset:
    """The dataset of a run (engine.spec.run.DataSpec), checked, deduplicated and split."""
    report = check(spec)
    path = resolve_path(spec)
    rows, _ = read_rows(path)
    fmt = report["format"]
    examples, seen = [], set()
    for r in rows:
        ex = _example(r, fmt)
        key = (ex.prompt.strip(), ex.completion.strip())
        if key not in seen:            # duplicates would leak between the splits
            seen.add(key)
            examples.append(ex)
    if spec.max_examples:
        rng = random.Random(spec.seed)
        if len(examples) > spec.max_examples:
            examples = rng.sample(examples, spec.max_examples)
    train, held = split(examples, spec.eval_fraction, spec.seed)
    return Dataset(format=fmt, task=task_of(fmt, examples), train=train, eval=held,
                   labels=report["labels"], source=str(path))
