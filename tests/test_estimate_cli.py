"""The estimate CLI contract of DESIGN.md through a real subprocess, and the bench's CPU smoke path."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, stdin=None):
    p = subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True,
                       input=stdin, timeout=120)
    return p.returncode, p.stdout


def test_train_json_contract():
    rc, out = cli("estimate", "train", "--model", "llama-3.1-8b", "--method", "qlora", "--seq-len", "1024",
                  "--batch-size", "2", "--no-grad-ckpt", "--lora-rank", "8", "--gpu", "a100-80gb", "--json")
    assert rc == 0
    r = json.loads(out)
    for key in ("peak_allocated_bytes", "device_bytes", "breakdown", "tokens_per_s", "low", "high", "fits",
                "step_time_s", "terms", "notes", "gpu", "inputs"):
        assert key in r, key
    assert sum(r["breakdown"].values()) == r["peak_allocated_bytes"]
    assert r["device_bytes"] > r["peak_allocated_bytes"]
    assert r["inputs"] == {"model": "llama-3.1-8b", "method": "qlora", "precision": "bf16", "seq_len": 1024,
                           "batch_size": 2, "grad_ckpt": False, "lora_rank": 8, "gpu": "a100-80gb"}
    assert all("formula" in t for t in r["terms"].values())


def test_infer_json_contract():
    rc, out = cli("estimate", "infer", "--model", "meta-llama/Llama-3.1-8B", "--weights", "nf4", "--batch-size", "8",
                  "--prompt-len", "256", "--new-tokens", "64", "--runtime", "transformers", "--json")
    assert rc == 0
    r = json.loads(out)
    for key in ("weights_bytes", "peak_allocated_bytes", "device_bytes", "prefill_s", "decode_tokens_per_s",
                "roofline", "hf_generate", "breakdown", "fits"):
        assert key in r, key
    assert r["gpu"] == "h100-80gb" and r["weights_format"]["id"] == "nf4"
    assert r["roofline"]["decode_tokens_per_s"] > r["decode_tokens_per_s"]


@pytest.mark.parametrize("args,match", [
    (("train", "--model", "no-such-model", "--method", "lora"), "unknown model 'no-such-model'"),
    (("train", "--model", "llama-3.1-8b", "--method", "lora", "--batch-size", "-4"), "batch_size must be an integer >= 1"),
    (("train", "--model", "llama-3.1-8b", "--method", "magic"), "method"),
    (("train", "--model", "llama-3.1-8b", "--method", "lora", "--gpu", "tpu-v9"), "unknown device 'tpu-v9'"),
    (("infer", "--model", "llama-3.1-8b", "--new-tokens", "0"), "new_tokens must be an integer >= 1"),
    (("infer", "--model", "llama-3.1-8b", "--weights", "int3"), "unknown weights 'int3'; known: .*nf4"),
    (("infer", "--model", "llama-3.1-8b", "--weights", "hosted"), "'hosted' means a provider serves the model"),
    (("infer", "--model", "smollm2-135m", "--weights", "gptq-4bit"),
     "group_size 128 does not divide in_features 576 of self_attn.q_proj"),
])
def test_bad_input_exits_2_with_a_json_error(args, match):
    import re
    rc, out = cli("estimate", *args, "--json")
    assert rc == 2
    err = json.loads(out)["error"]
    assert re.search(match, err), err


def test_batch_answers_every_line_in_order():
    lines = [
        {"kind": "train", "model": "llama-3.2-1b", "method": "lora", "seq_len": 256},
        {"kind": "infer", "model": "no-such-model"},
        "this is not json",
        {"kind": "infer", "model": "qwen2.5-0.5b", "weights": "gptq-4bit", "batch_size": 4},
        {"kind": "train", "model": "llama-3.2-1b", "method": "full", "batch_size": -1},
    ]
    stdin = "\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n"
    rc, out = cli("estimate", "batch", stdin=stdin)
    assert rc == 0
    res = [json.loads(x) for x in out.strip().splitlines()]
    assert len(res) == 5
    assert res[0]["kind"] == "train" and res[0]["inputs"]["seq_len"] == 256
    assert "unknown model" in res[1]["error"]
    assert "not JSON" in res[2]["error"]
    assert res[3]["kind"] == "infer" and res[3]["weights_format"]["id"] == "gptq-4bit"
    assert "batch_size" in res[4]["error"]


def test_bench_cpu_smoke_path(tmp_path):
    """bench/estimates_vs_measured.py --device cpu --tiny runs the reference recipe on shrunken models,
    measures with the live-storage tracker, writes the JSON and prints predicted vs measured."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    p = subprocess.run([sys.executable, "bench/estimates_vs_measured.py", "--device", "cpu", "--tiny", "--quick",
                        "--models", "llama-3.2-1b", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "summary" in p.stdout and "train.peak_allocated_bytes" in p.stdout
    (path,) = tmp_path.glob("cpu-server-64gb-tiny-*.json")
    doc = json.loads(path.read_text())
    assert doc["device"] == "cpu" and doc["tiny"]
    kinds = {(r["kind"], r.get("method") or r.get("weights")) for r in doc["results"]}
    assert {("train", "lora"), ("train", "qlora"), ("train", "full"), ("infer", "bf16"), ("infer", "nf4")} <= kinds
    for r in doc["results"]:
        m, pr = r["measured"], r["predicted"]
        assert not m["oom"] and m["peak_allocated_bytes"] > 0
        assert pr["peak_allocated_bytes"] == pytest.approx(m["peak_allocated_bytes"], rel=0.15), r
        if r["kind"] == "infer":
            assert pr["weights_bytes"] == m["weights_bytes"]              # tensor for tensor
    assert doc["summary"]["train.peak_allocated_bytes"]["median_abs_err"] < 0.05


def test_quantize_and_merge_stages_answer_the_commands_the_advisor_cites():
    """The advisor's reasons print `estimate quantize ...` / `estimate merge ...`: both must run."""
    from engine.estimate import estimate_merge, estimate_quantize
    rc, stdout = cli("estimate", "quantize", "--model", "qwen2.5-0.5b", "--method", "gptq", "--bits", "4",
                     "--group-size", "128", "--calibration-samples", "64", "--seq-len", "1024", "--gpu", "l4-24gb", "--json")
    assert rc == 0, stdout
    out = json.loads(stdout)
    same = estimate_quantize("qwen2.5-0.5b", "gptq", bits=4, group_size=128, calibration_samples=64,
                             seq_len=1024, gpu="l4-24gb")
    assert out["peak_allocated_bytes"] == same["peak_allocated_bytes"] > 0
    assert sum(out["breakdown"].values()) == out["peak_allocated_bytes"]
    rc, stdout = cli("estimate", "merge", "--model", "llama-3.2-1b", "--lora-rank", "8", "--json")
    assert rc == 0, stdout
    assert json.loads(stdout)["peak_allocated_bytes"] == estimate_merge("llama-3.2-1b", lora_rank=8)["peak_allocated_bytes"]
    rc, stdout = cli("estimate", "quantize", "--model", "qwen2.5-0.5b", "--json")      # --method missing
    assert rc == 2 and "method" in json.loads(stdout)["error"]
