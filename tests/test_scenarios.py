"""Scenario files: parsing, defaults, and bad input that names the field and the allowed values."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.errors import InputError
from engine.spec.scenario import load_scenario, parse_scenario, preset_ids

ROOT = Path(__file__).resolve().parent.parent
OK = {"model": "llama-3.1-8b", "task": "generation", "examples": 5000,
      "hardware": {"gpu": "rtx-4090-24gb", "count": 1},
      "deploy": {"target": "consumer-gpu", "gpu": "rtx-4090-24gb"},
      "goals": {"max_latency_ms_per_token": 50, "min_accuracy_retention": 0.97, "priority": "balanced",
                "target_weight_bits": 4}}


def bad(**change):
    data = json.loads(json.dumps(OK))
    for path, val in change.items():
        node = data
        *head, last = path.split("__")
        for h in head:
            node = node[h]
        if val is KeyError:
            node.pop(last)
        else:
            node[last] = val
    return data


def test_design_example_parses_and_resolves():
    sc = parse_scenario(OK)
    assert sc.arch().name == "llama-3.1-8b"
    assert sc.train_device().id == "rtx-4090-24gb" and sc.serve_device().memory_bytes == 25393692672
    assert sc.goals.target_weight_bits == 4 and sc.symptoms == []
    assert sc.seq_len == 512 and sc.epochs == 1


def test_defaults_and_synonyms():
    sc = parse_scenario({"model": {"params_b": 13, "family": "llama-2"}, "task": "chat",
                         "hardware": {"gpu": "A100-80GB"}})
    assert sc.hardware.gpu == "a100-80gb" and sc.hardware.count == 1
    assert sc.deploy.target == "gpu-server" and sc.deploy.gpu == "a100-80gb"   # served where trained
    assert sc.goals.priority == "balanced" and sc.examples == 0
    assert sc.arch().approximate
    phone = parse_scenario({**OK, "deploy": {"target": "phone"}, "goals": {}})
    assert phone.serve_device().kind == "phone"                                # first phone preset
    dev = parse_scenario({**OK, "deploy": {"target": "edge", "device": "jetson-orin-nano-8gb"}})
    assert dev.deploy.gpu == "jetson-orin-nano-8gb"
    hosted = parse_scenario({**OK, "deploy": {"target": "hosted-api"}})
    assert hosted.serve_device() is None


@pytest.mark.parametrize("data, field, words", [
    (bad(hardware__gpu="a100-81gb"), "hardware.gpu", ["a100-80gb", "rtx-4090-24gb"]),
    (bad(model=KeyError), "model", ["preset id", "params_b"]),
    (bad(model="no-such-model"), "model", ["not a preset", "Closest presets:"]),
    (bad(model="llama-3.1-8bb"), "model", ["Closest presets: llama-3.1-8b"]),   # by closeness, not alphabet
    (bad(examples=-5), "examples", ["examples must be >= 0, got -5"]),
    (bad(task="poetry"), "task", ["classification", "retrieval", "generation", "structured-output", "chat"]),
    (bad(colour="blue"), "colour", ["unknown field", "examples", "hardware"]),
    (bad(goals__speed=3), "goals.speed", ["max_latency_ms_per_token", "priority"]),
    (bad(goals__priority="speed"), "goals.priority", ["accuracy", "balanced", "cost"]),
    (bad(goals__target_weight_bits=5), "goals.target_weight_bits", ["2, 3, 4, 8, 16"]),
    (bad(goals__min_accuracy_retention=1.5), "goals.min_accuracy_retention", ["must be <= 1"]),
    (bad(deploy__target="cloud"), "deploy.target", ["gpu-server", "phone", "hosted-api"]),
    (bad(deploy__gpu="iphone-15-pro-8gb"), "deploy.gpu", ["consumer-gpu", "rtx-4090-24gb"]),
    (bad(hardware__count=0), "hardware.count", ["must be >= 1"]),
    (bad(hardware=KeyError), "hardware", ["required", "h100-80gb"]),
    (bad(symptoms=["slow"]), "symptoms", ["too-slow", "wrong-domain"]),
    (bad(model={"params_b": 13}), "model", ["family", "llama-2"]),
])
def test_bad_scenarios_name_the_field(data, field, words):
    with pytest.raises(InputError) as e:
        parse_scenario(data)
    assert e.value.field == field, str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_every_preset_scenario_parses_with_a_comment():
    ids = preset_ids()
    assert {"hr-chatbot-13b-l4", "ticket-routing", "medical-150k-8xa100", "phone-assistant-3b",
            "llama-70b-too-big", "llama-13b-rtx4090"} <= set(ids)
    for sid in ids:
        path = ROOT / "presets" / "scenarios" / f"{sid}.yaml"
        text = path.read_text()
        assert "advisor should conclude" in text, sid      # each says what to expect, and why
        sc = load_scenario(path)
        assert sc.name and sc.task
        assert load_scenario(sid).to_dict() == sc.to_dict()   # a preset id works as well as a path


def test_relative_model_dir_is_taken_from_the_scenario_file(tmp_path):
    from engine import models
    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "config.json").write_text(json.dumps(models.presets()["qwen2.5-0.5b"]["config"]))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**OK, "model": "my-model"}))
    sc = load_scenario(tmp_path / "s.yaml")
    assert sc.arch().total_params == models.resolve("qwen2.5-0.5b").total_params


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_scenario(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed")
    with pytest.raises(InputError, match="not valid YAML"):
        load_scenario(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(InputError, match="mapping"):
        load_scenario(tmp_path / "list.yaml")


@pytest.mark.parametrize("change, field, word", [
    (dict(hardware__gpu="gtx-9000"), "hardware.gpu", "h100-80gb"),
    (dict(model=KeyError), "model", "required"),
    (dict(examples=-1), "examples", "examples"),
    (dict(task="poetry"), "task", "structured-output"),
    (dict(extra_field=1), "extra_field", "allowed"),
])
def test_cli_bad_scenario_exits_2_naming_the_field(tmp_path, change, field, word):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(bad(**change)))
    p = subprocess.run([sys.executable, "-m", "engine", "recommend", "--scenario", str(path), "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    out = json.loads(p.stdout)
    assert out["field"] == field and word in out["error"], out


def test_cli_missing_file_exits_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "engine", "recommend", "--scenario", str(tmp_path / "x.yaml"),
                        "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "not found" in json.loads(p.stdout)["error"]
