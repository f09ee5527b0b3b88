"""Wizard handlers: form -> scenario (what the advisor reads), examples, inline messages, uploads."""
import json

import pytest
import yaml

from engine.errors import InputError
from engine.spec.scenario import parse_scenario
from ui import common, wizard


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEQUANT_HOME", str(tmp_path / "ws"))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))        # files under tmp_path count as the app's uploads
    return tmp_path / "ws"


def test_default_form_is_a_valid_scenario():
    scn = wizard.scenario_from_form(wizard.DEFAULT_FORM)
    assert scn == {"model": "llama-3.1-8b", "task": "generation", "examples": 5000, "seq_len": 512, "epochs": 1.0,
                   "hardware": {"gpu": "rtx-4090-24gb", "count": 1},
                   "deploy": {"target": "consumer-gpu", "gpu": "rtx-4090-24gb"},
                   "goals": {"max_latency_ms_per_token": 50.0, "min_accuracy_retention": 0.97,
                             "priority": "balanced", "target_weight_bits": 4}}
    parse_scenario(scn)          # the advisor's own validation accepts it


def test_zero_goals_mean_no_goal_and_any_bits():
    scn = wizard.scenario_from_form({**wizard.DEFAULT_FORM, "max_latency": 0, "min_retention": None,
                                     "target_bits": "any"})
    assert scn["goals"] == {"priority": "balanced"}


@pytest.mark.parametrize("name", sorted(wizard.example_scenarios()))
def test_every_example_round_trips_through_the_form(name):
    """Loading an example fills the form; the form gives back the same scenario the file describes."""
    path = wizard.example_scenarios()[name]
    raw = yaml.safe_load(path.read_text())
    form = wizard.load_example(name)
    scn = wizard.scenario_from_form(form)
    want = parse_scenario(raw).to_dict()
    got = parse_scenario(scn).to_dict()
    for key in ("model", "task", "examples", "seq_len", "hardware", "deploy", "goals", "symptoms", "name",
                "description"):
        assert got[key] == want[key], (name, key)
    assert wizard.example_summary(path)            # the comment that says what to conclude


def test_examples_exist():
    assert len(wizard.example_scenarios()) >= 6


def test_bad_fields_name_the_field_and_the_step():
    cases = [({"source": wizard.SRC_PRESET, "preset": None}, "model", "model"),
             ({"examples": -5}, "examples", "data"),
             ({"examples": "many"}, "examples", "data"),
             ({"gpu": "gtx-480"}, "hardware.gpu", "hardware"),
             ({"gpu_count": 0}, "hardware.count", "hardware"),
             ({"target": "phone", "deploy_device": "h100-80gb"}, "deploy.gpu", "hardware"),
             ({"min_retention": 1.5}, "goals.min_accuracy_retention", "goals"),
             ({"symptoms": ["haunted"]}, "symptoms", "goals"),
             ({"source": wizard.SRC_SIZE, "params_b": 13, "family": "gpt-9"}, "family", "model")]
    for change, field, group in cases:
        with pytest.raises(InputError) as e:
            wizard.scenario_from_form({**wizard.DEFAULT_FORM, **change})
        assert e.value.field == field, change
        assert wizard.group_of(e.value.field) == group, change


def test_size_and_family_model():
    scn = wizard.scenario_from_form({**wizard.DEFAULT_FORM, "source": wizard.SRC_SIZE, "params_b": 13,
                                     "family": "llama-2"})
    assert scn["model"] == {"params_b": 13.0, "family": "llama-2"}
    assert "approximate" in wizard.model_summary(scn["model"])


def test_uploaded_config_is_saved_in_the_workspace_and_resolves(tmp_path, home):
    from engine import models
    cfg = dict(models.presets()["qwen2.5-0.5b"]["config"])
    up = tmp_path / "config.json"
    up.write_text(json.dumps(cfg))
    scn = wizard.scenario_from_form({**wizard.DEFAULT_FORM, "source": wizard.SRC_UPLOAD, "config_file": str(up)})
    saved = scn["model"]
    assert saved.startswith(str(home.resolve())) and saved.endswith("config.json")
    assert models.resolve(saved).total_params == models.resolve("qwen2.5-0.5b").total_params
    assert "0.49 B parameters" in wizard.model_summary(saved)


def test_bad_uploads_are_refused_inline(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        wizard.scenario_from_form({**wizard.DEFAULT_FORM, "source": wizard.SRC_UPLOAD, "config_file": str(bad)})
    big = tmp_path / "huge.json"
    big.write_bytes(b" " * (common.MAX_CONFIG_BYTES + 1))
    with pytest.raises(InputError, match="limit"):
        wizard.scenario_from_form({**wizard.DEFAULT_FORM, "source": wizard.SRC_UPLOAD, "config_file": str(big)})
    txt = tmp_path / "config.txt"
    txt.write_text("{}")
    with pytest.raises(InputError, match=".json"):
        wizard.scenario_from_form({**wizard.DEFAULT_FORM, "source": wizard.SRC_UPLOAD, "config_file": str(txt)})


def test_a_gguf_upload_that_does_not_read_is_refused_naming_it_and_not_kept(tmp_path, home):
    """(The real demo GGUF through the page: tests/test_browser_wizard.py.)"""
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x07" * 40)          # a header that stops short
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04 not a model")
    for f, problem in ((cut, "cut.gguf is a truncated or corrupt GGUF file"), (other, "other.gguf is not a GGUF file")):
        with pytest.raises(InputError, match=f"model: the uploaded {f.name}: {problem}") as e:
            wizard.scenario_from_form({**wizard.DEFAULT_FORM, "source": wizard.SRC_UPLOAD, "config_file": str(f)})
        assert str(home) not in str(e.value) and wizard.group_of(e.value.field) == "model"
    assert not list((home / "uploads" / "models").glob("*/*"))            # nothing half-kept
    big = tmp_path / "big.gguf"
    with open(big, "wb") as fh:
        fh.truncate(common.MAX_GGUF_BYTES + 1)
    with pytest.raises(InputError, match="limit is 200 MB"):
        wizard.scenario_from_form({**wizard.DEFAULT_FORM, "source": wizard.SRC_UPLOAD, "config_file": str(big)})


def test_local_model_paths_are_confined_to_the_workspace(tmp_path, home):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(InputError, match="outside the workspace"):
        wizard.scenario_from_form({**wizard.DEFAULT_FORM, "source": wizard.SRC_HUB, "hub_id": str(outside)})
    with pytest.raises(InputError, match="outside the workspace"):
        wizard.scenario_from_form({**wizard.DEFAULT_FORM, "source": wizard.SRC_HUB, "hub_id": "../../etc"})
    inside = home / "models" / "mine"
    inside.mkdir(parents=True)
    scn = wizard.scenario_from_form({**wizard.DEFAULT_FORM, "source": wizard.SRC_HUB, "hub_id": "models/mine"})
    assert scn["model"] == str(inside.resolve())
    # a symlink inside the workspace that points out of it is refused too
    (home / "sneaky").symlink_to(outside)
    with pytest.raises(InputError, match="outside the workspace"):
        wizard.scenario_from_form({**wizard.DEFAULT_FORM, "source": wizard.SRC_HUB, "hub_id": "sneaky"})
    # hub ids and preset hub ids pass through untouched
    scn = wizard.scenario_from_form({**wizard.DEFAULT_FORM, "source": wizard.SRC_HUB,
                                     "hub_id": "meta-llama/Llama-3.1-8B"})
    assert scn["model"] == "meta-llama/Llama-3.1-8B"


def test_inline_messages_are_html_without_tracebacks():
    msg = wizard.model_summary("no-such-model-xyz")
    assert "tq-error" in msg and "Traceback" not in msg and "unknown model" in msg
    ok = wizard.model_summary("mixtral-8x7b")
    assert "tq-ok" in ok and "active" in ok         # MoE: total and active parameters
    hw = wizard.hardware_summary("l4-24gb", 2, "jetson-orin-nano-8gb", "edge")
    assert "2 × NVIDIA L4" in hw and "Jetson" in hw
    assert "tq-error" in wizard.hardware_summary("nope", 1, None, "hosted-api")


def test_device_choices_follow_the_target():
    from engine import hardware
    phones = [k for _, k in wizard.device_choices("phone")]
    assert phones and all(hardware.get(k).kind == "phone" for k in phones)
    assert wizard.device_choices("hosted-api") == []
    gpus = [k for _, k in wizard.device_choices("gpu-server")]
    assert set(gpus) == set(hardware.gpu_ids())


def test_dataset_upload_is_validated_with_a_preview(tmp_path, home):
    rows = [{"text": f"ticket {i} about billing", "label": "billing" if i % 2 else "tech"} for i in range(30)]
    rows.append({"text": "", "label": "tech"})
    p = tmp_path / "tickets.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    msg, df, n, saved_path = wizard.dataset_check(str(p))
    assert n == 31
    assert df is not None and len(df) > 0
    assert any("ticket 0 about billing" in str(v) for v in df.iloc[0].values)
    assert "classification" in msg and "31 rows" in msg
    assert "problem" in msg and "empty" in msg    # the empty text is reported, with the engine's words
    assert "labels: " in msg
    saved = list((home / "uploads" / "datasets").rglob("tickets.jsonl"))
    assert [str(x) for x in saved] == [saved_path]               # the path the launch form receives


def test_redact_hides_tokens():
    s = common.redact("loading with token hf_abcdefghijklmnopqrstuvwxyz0123 and Authorization: Bearer sk-xyz123")
    assert "hf_abcdefghij" not in s and "sk-xyz123" not in s and "hf_***" in s


def test_runtime_picker_offers_what_runs_on_the_serving_device_and_flows_into_the_scenario():
    from engine import hardware
    from engine.estimate import runtimes as R
    for dev, target in (("l4-24gb", "gpu-server"), ("rtx-4090-24gb", "consumer-gpu"), ("iphone-15-pro-8gb", "phone")):
        ch = wizard.runtime_choices(dev, target)
        assert [k for _, k in ch] == [r for r in R.ids() if R.get(r).runs_on(hardware.get(dev))]
        default = R.default_runtime(hardware.get(dev), target)[0]
        assert f"default here: {default}" in wizard.runtime_label(dev, target)
        assert dict((k, l) for l, k in ch)[default].endswith("(the default here)")
    assert "vllm" not in [k for _, k in wizard.runtime_choices("iphone-15-pro-8gb", "phone")]
    assert wizard.runtime_choices(None) == []
    form = {**wizard.DEFAULT_FORM, "target": "gpu-server", "deploy_device": "l4-24gb", "runtime": ["vllm"]}
    scn = wizard.scenario_from_form(form)
    assert scn["deploy"] == {"target": "gpu-server", "gpu": "l4-24gb", "runtime": "vllm"}     # one: only that
    assert parse_scenario(scn).deploy.runtime == "vllm"
    assert wizard.form_from_scenario(scn)["runtime"] == ["vllm"]                 # round trip (examples)
    assert wizard.scenario_from_form({**form, "runtime": "vllm"})["deploy"] == scn["deploy"]   # a plain name too
    for none in ([], "auto", "any", None):                                        # none: the advisor searches all
        assert "runtime" not in wizard.scenario_from_form({**form, "runtime": none})["deploy"]
    assert wizard.form_from_scenario({**scn, "deploy": {"target": "gpu-server"}})["runtime"] == []
    assert wizard.form_from_scenario({**scn, "deploy": {"target": "gpu-server", "runtime": "any"}})["runtime"] == []
    # several: searched in the order picked, repeats dropped; the YAML and the advisor read that list
    two = wizard.scenario_from_form({**form, "runtime": ["llama.cpp", "vllm", "llama.cpp"]})
    assert two["deploy"]["runtime"] == ["llama.cpp", "vllm"]
    assert "runtime: [llama.cpp, vllm]" in wizard.scenario_yaml(two)
    assert parse_scenario(two).deploy.runtime == ["llama.cpp", "vllm"]
    assert wizard.form_from_scenario(two)["runtime"] == ["llama.cpp", "vllm"]
    assert wizard.scenario_from_form(wizard.form_from_scenario(two))["deploy"] == two["deploy"]
    with pytest.raises(InputError, match="serving runtime mlx does not run on l4-24gb") as e:
        wizard.scenario_from_form({**form, "runtime": ["vllm", "mlx"]})
    assert e.value.field == "deploy.runtime" and wizard.group_of(e.value.field) == "hardware"
    # a hosted API has no device: the runtime is not asked
    hosted = wizard.scenario_from_form({**form, "target": "hosted-api", "runtime": ["vllm"]})
    assert "runtime" not in hosted["deploy"]
