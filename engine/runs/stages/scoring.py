"""Task scores of generated text, whichever runtime generated it (the evaluate stage's HF
``generate``, llama.cpp in the runtime evaluation): classification exact match, structured-output
JSON validity and field match. Plain Python: the generator is handed in."""
from __future__ import annotations

import json


def first_json_object(text: str):
    start = text.find("{")
    if start < 0:
        return None
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


PUNCT = " \t.,:;!?\"'`*()[]"


def answer_label(text: str, labels: list[str]) -> str:
    """The label a generated reply gives: its first line without surrounding quotes, markup or
    punctuation ("Billing.", "**billing**"), matched to a known label case-insensitively; failing
    that, its first word when that is a label ("billing - the customer was charged twice");
    otherwise the cleaned first line as it stands (not a valid label)."""
    line = text.strip().split("\n")[0].strip().strip(PUNCT)
    by_lower = {lbl.lower(): lbl for lbl in labels}
    if line.lower() in by_lower:
        return by_lower[line.lower()]
    words = line.split()
    first = words[0].strip(PUNCT).lower() if words else ""
    return by_lower.get(first, line)


def task_accuracy(tok, ds, examples, should_stop, gen) -> dict:
    """Classification accuracy (the label answer_label reads from the reply equals the reference),
    or structured-output validity and field match. ``gen(prompt,
    max_new_tokens) -> text`` generates greedily (the evaluate stage passes HF ``generate``, the
    runtime evaluation its runtime's)."""
    if ds.task == "classification":
        max_new = max(len(tok(lbl, add_special_tokens=False)["input_ids"]) for lbl in ds.labels) + 3
        right = valid = done = 0
        samples = []
        for ex in examples:
            if should_stop():
                break
            pred = answer_label(gen(ex.prompt, max_new), ds.labels)
            right += pred == ex.label
            valid += pred in ds.labels
            done += 1
            if len(samples) < 3:
                samples.append({"label": ex.label, "generated": pred})
        return {"accuracy": round(right / done, 4) if done else None,
                "valid_label_rate": round(valid / done, 4) if done else None, "generated": done, "samples": samples}
    if ds.task == "structured":
        max_new = min(256, max(len(tok(ex.completion, add_special_tokens=False)["input_ids"]) for ex in examples) + 8)
        valid = done = exact = 0
        field_scores, samples = [], []
        for ex in examples:
            if should_stop():
                break
            text = gen(ex.prompt, max_new)
            obj = first_json_object(text)
            ref = ex.fields or {}
            done += 1
            if obj is not None:
                valid += 1
                hits = sum(1 for k, v in ref.items() if k in obj and obj[k] == v)
                field_scores.append(hits / len(ref) if ref else 1.0)
                exact += bool(ref) and hits == len(ref)
            else:
                field_scores.append(0.0)
            if len(samples) < 3:
                samples.append({"reference": ex.completion, "generated": text[:200]})
        return {"json_valid_rate": round(valid / done, 4) if done else None,
                "field_match": round(sum(field_scores) / done, 4) if done else None,
                "exact_match": round(exact / done, 4) if done else None, "generated": done, "samples": samples}
    return {}
