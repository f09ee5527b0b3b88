"""The evaluate stage on the micro demo model: perplexity equals a hand computation of the
held-out answers' negative log-likelihood, classification and structured-output accuracy are
scored from real generations, latency and memory are measured."""
import json
import math

import pytest

from engine.runs.stages import common, run_inline
from engine.runs.stages.evaluate import first_json_object, perplexity

EVAL = {"max_examples": 5, "prompt_len": 24, "new_tokens": 6}



def test_perplexity_by_hand(micro_home):
    import torch
    from transformers import AutoModelForCausalLM
    from engine.runs import demo
    from engine.runs.data import Example
    path = str(demo.model_dir("micro-llama"))
    tok = common.load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    exs = [Example("### Text:\nmy parcel is late\n\n### Label:\n", "shipping"),
           Example("### Text:\nrefund the double charge please\n\n### Label:\n", "billing"),
           Example("", "Return the number of items in a container.")]
    got = perplexity(model, tok, exs, seq_len=64, batch_size=2)
    nll, n = 0.0, 0
    with torch.no_grad():
        for ex in exs:                                   # one at a time, no padding, by hand
            p = tok(ex.prompt)["input_ids"] if ex.prompt else tok("")["input_ids"]
            c = tok(ex.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([p + c])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            scored = range(len(p) - 1, ids.shape[1] - 1)  # positions predicting the answer tokens
            nll -= sum(logp[t, targets[t]].item() for t in scored)
            n += len(scored)
    assert got["scored_tokens"] == n
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_json_extraction_helpers():
    assert first_json_object('{"a": 1} trailing') == {"a": 1}
    assert first_json_object('junk {"a": {"b": 2}} more {"c": 3}') == {"a": {"b": 2}}
    assert first_json_object("[1, 2]") is None and first_json_object('{"a": ') is None
    assert first_json_object("no braces") is None


def test_structured_task_after_lora(micro_home, tmp_path):
    out = run_inline({"model": "demo:micro-llama", "strategy": "lora", "device": "cpu",
                      "dataset": {"demo": "json-extraction", "max_examples": 60},
                      "train": {"steps": 8, "batch_size": 4, "seq_len": 96, "learning_rate": 1e-2, "lora_rank": 8},
                      "evaluate": {**EVAL, "max_examples": 4}}, tmp_path)
    ev = out["stages"]["evaluate#1"]
    assert ev["task"] == "structured" and ev["eval_rows"] == 4
    for phase in ("before", "after"):
        m = ev[phase]
        assert m["generated"] == 4
        for k in ("json_valid_rate", "field_match", "exact_match"):
            assert 0 <= m[k] <= 1
        assert m["exact_match"] <= m["field_match"] and m["exact_match"] <= m["json_valid_rate"]
        assert len(m["samples"]) == 3 and json.loads(m["samples"][0]["reference"])
        assert m["new_tokens"] == 6 and m["prompt_tokens"] == 24 and m["prefill_ms"] > 0
        assert m["mem_source"] == "cpu_peak_rss" and m["peak_mem_bytes"] > m["weights_bytes"] > 0
    assert ev["after"]["perplexity"] < ev["before"]["perplexity"]
    assert "field_match_delta" in ev["compare"]
    evals = [e for e in out["events"] if e["type"] == "eval"]
    assert [e["name"] for e in evals] == ["before", "after"]


def test_baseline_evaluates_once(micro_home, tmp_path):
    out = run_inline({"model": "demo:micro-llama", "strategy": "bf16-baseline", "device": "cpu",
                      "dataset": {"demo": "tickets", "max_examples": 40},
                      "evaluate": {**EVAL, "latency": False}}, tmp_path)
    ev = out["stages"]["evaluate#0"]
    assert "before" not in ev and "note" in ev["after"]
    assert 0 <= ev["after"]["accuracy"] <= 1 and 0 <= ev["after"]["valid_label_rate"] <= 1
    assert "prefill_ms" not in ev["after"]
    # fp32 on this CPU: 4 bytes per parameter, plus the rotary embedding's two buffers of
    # head_dim / 2 = 16 fp32 frequencies (inv_freq, original_inv_freq)
    assert ev["after"]["compute_dtype"] == "float32" or common.cpu_has_fast_bf16()
    if ev["after"]["compute_dtype"] == "float32":
        assert ev["after"]["weights_bytes"] == 426_624 * 4 + 2 * 16 * 4


def test_lm_eval_run_task_equals_label_loglikelihoods_by_hand(micro_home, tmp_path):
    """evaluate.harness: ["run"] runs lm-evaluation-harness on the run's own held-out rows as a local
    multiple-choice task; its acc is the share of rows whose label has the highest log-likelihood
    after the prompt, which this test computes by hand on the same model."""
    pytest.importorskip("lm_eval")
    import torch
    from transformers import AutoModelForCausalLM
    from engine.runs import demo
    out = run_inline({"model": "demo:micro-llama", "strategy": "bf16-baseline", "device": "cpu",
                      "dataset": {"demo": "tickets", "max_examples": 40},
                      "evaluate": {**EVAL, "latency": False, "task_accuracy": False, "harness": ["run"]}}, tmp_path)
    ev = out["stages"]["evaluate#0"]
    h = ev["after"]["harness"]["run"]
    assert h["kind"] == "run" and h["task"] == "tunequant_classification" and h["n"] == 5
    assert h["source"].startswith("lm-eval ")
    lines = (tmp_path / "harness" / "heldout.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    import yaml
    labels = yaml.safe_load((tmp_path / "harness" / "tunequant_classification.yaml").read_text())["doc_to_choice"]
    path = str(demo.model_dir("micro-llama"))
    tok = common.load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    right = 0
    with torch.no_grad():
        for r in rows:
            ctx_ids = tok(r["prompt"])["input_ids"]
            scores = []
            for lbl in labels:       # the harness encodes context + continuation together, then splits
                whole = tok(r["prompt"] + lbl)["input_ids"]
                cont = whole[len(ctx_ids):]
                ids = torch.tensor([whole])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                scores.append(sum(logp[len(ctx_ids) - 1 + i, t].item() for i, t in enumerate(cont)))
            right += labels[max(range(len(labels)), key=scores.__getitem__)] == labels[r["label_index"]]
    assert h["acc"] == pytest.approx(right / len(rows))
    assert 0 <= h["acc_norm"] <= 1 and "acc_stderr" in h
    names = [e["name"] for e in out["events"] if e["type"] == "metric"]
    assert "after.harness.run.acc" in names


@pytest.mark.slow            # about a minute: the harness indexes its thousands of task configs first
def test_lm_eval_hub_task_offline_is_reported_not_fatal(micro_home, tmp_path, monkeypatch):
    """A named harness task needs its dataset from the Hub: offline the run still finishes and the
    task says why it did not run."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = run_inline({"model": "demo:micro-llama", "strategy": "bf16-baseline", "device": "cpu",
                      "dataset": {"demo": "tickets", "max_examples": 40},
                      "evaluate": {**EVAL, "latency": False, "task_accuracy": False, "perplexity": False,
                                   "harness": ["arc_easy"], "harness_limit": 2}}, tmp_path)
    h = out["stages"]["evaluate#0"]["after"]["harness"]["arc_easy"]
    assert "error" in h and "arc_easy needs its dataset from the Hugging Face Hub" in h["error"], h


def test_harness_task_names_are_checked():
    from engine.errors import InputError
    from engine.spec.run import RunSpec
    with pytest.raises(InputError, match="harness task names"):
        RunSpec.parse({"model": "demo:micro-llama", "strategy": "lora", "dataset": {"demo": "tickets"},
                       "evaluate": {"harness": ["../../etc/passwd"]}})


def test_the_label_is_read_from_the_first_line_or_word_of_the_reply():
    from engine.runs.stages.scoring import answer_label
    labels = ["billing", "shipping", "feature_request"]
    assert answer_label("billing", labels) == "billing"
    assert answer_label("  Billing.\nThe customer was charged twice", labels) == "billing"
    assert answer_label("**shipping**", labels) == "shipping"
    assert answer_label("feature_request - they want dark mode", labels) == "feature_request"
    assert answer_label("The queue is billing", labels) == "The queue is billing"      # not a label: counts wrong
    assert answer_label("", labels) == ""
