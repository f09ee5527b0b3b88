"""Model resolution: presets, config files, local dirs, size-only, and counts checked by hand
and against modules that transformers really builds."""
import json

import pytest

from engine import models
from engine.errors import InputError


def test_llama31_8b_counts_by_hand():
    a = models.resolve("llama-3.1-8b")
    h, i, L, v, kv = 4096, 14336, 32, 128256, 8 * 128
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h      # q,o + k,v + mlp + 2 norms
    assert a.total_params == L * per_layer + 2 * v * h + h       # untied embeddings + final norm
    assert a.total_params == 8_030_261_248
    assert a.kv_cache_bytes_per_token(2) == 2 * 32 * 1024 * 2    # 128 KiB per token in bf16
    # LoRA r=16 on all seven projections: 16*(in+out) each
    lora = L * 16 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
    assert a.lora_params(16) == lora == 41_943_040


def test_every_preset_matches_its_published_size():
    for pid in models.preset_ids():
        a = models.resolve(pid)
        published = models.presets()[pid]["params_b"] * 1e9
        assert abs(a.total_params - published) / published < 0.01, pid


def test_moe_active_vs_total():
    a = models.resolve("mixtral-8x7b")
    assert a.num_experts == 8 and a.experts_per_token == 2
    assert 46.5e9 < a.total_params < 46.9e9
    assert 12.7e9 < a.active_params < 13.0e9


def test_tied_and_hub_id_and_case():
    a = models.resolve("meta-llama/Llama-3.2-1B")
    assert a.tie_embeddings and a.lm_head_params == 0 and a.head_dim == 64
    assert models.resolve("LLAMA-3.2-1B").name == "llama-3.2-1b"


def test_config_json_file_and_dir(tmp_path):
    cfg = dict(models.presets()["qwen2.5-0.5b"]["config"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    a = models.resolve(str(tmp_path))
    b = models.resolve(str(tmp_path / "config.json"))
    assert a.total_params == b.total_params == models.resolve("qwen2.5-0.5b").total_params
    assert a.family == "qwen2" and a.source.startswith("dir:")


def test_size_only_is_marked_approximate():
    a = models.resolve({"params_b": 13, "family": "llama-2"})
    assert a.approximate and abs(a.total_params - 13e9) / 13e9 < 0.03
    with pytest.raises(InputError, match="family"):
        models.resolve({"params_b": 13, "family": "nope"})
    with pytest.raises(InputError, match="params_b"):
        models.resolve({"params_b": -1, "family": "llama-2"})


def test_unknown_model_lists_presets(tmp_path):
    with pytest.raises(InputError, match="llama-3.1-8b"):
        models.resolve("no-such-model")
    with pytest.raises(InputError, match="config.json"):
        models.resolve(str(tmp_path))           # dir without config.json


def test_offline_hub_id_says_what_works(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="Offline, use a preset"):
        models.resolve("some-org/some-unknown-model")


@pytest.mark.parametrize("pid", ["llama-3.2-1b", "qwen2.5-0.5b", "qwen3-0.6b", "gemma-2-2b", "phi-3-mini",
                                 "opt-125m", "bloom-560m", "mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b",
                                 "gemma-3-1b"])
def test_counts_match_transformers_modules(pid):
    """Shrink the preset (2 layers, small width) and compare with what transformers builds."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = dict(models.presets()[pid]["config"])
    shrink = {"num_hidden_layers": 2, "n_layer": 2, "vocab_size": 512}
    for k in ("hidden_size", "intermediate_size", "ffn_dim", "moe_intermediate_size", "word_embed_proj_dim",
              "shared_expert_intermediate_size"):
        if k in cfg:
            cfg[k] = max(cfg[k] // 16, 32)
    if "head_dim" in cfg:
        cfg["head_dim"] = 16
    for k, v in shrink.items():
        if k in cfg or k == "vocab_size":
            cfg[k] = v
    if "num_local_experts" in cfg or "num_experts" in cfg:
        cfg["num_local_experts" if "num_local_experts" in cfg else "num_experts"] = 4
    cfg.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    mt = cfg.pop("model_type")
    cfg.pop("architectures", None)
    hf_cfg = transformers.AutoConfig.for_model(mt, **cfg)
    with torch.device("meta"):
        m = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    real = sum(p.numel() for p in m.parameters())     # parameters() counts tied weights once
    ours = models.arch_from_config(hf_cfg.to_dict(), name=pid)
    assert ours.total_params == real, (pid, ours.total_params, real)
    linear_real = sum(mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)
                      for name, mod in m.named_modules()
                      if isinstance(mod, torch.nn.Linear) and "lm_head" not in name
                      and not name.endswith((".gate", ".router")))
    if ours.num_experts == 0:
        assert ours.linear_params == linear_real, pid


def test_demo_models_resolve_offline_without_a_build():
    """`demo:NAME` is the project's own model (presets/demo/models.yaml): the planner reads its config,
    so estimates for the demo runs need no build and no hub."""
    from engine.models import resolve
    arch = resolve("demo:tiny-llama")
    assert (arch.hidden_size, arch.num_layers, arch.vocab_size) == (256, 4, 2048)
    # 2 x 2048 x 256 (untied embeddings) + 4 x (attention 256x(256+2x128+256) + mlp 3x256x512 + 2 norms) + final norm
    assert arch.total_params == 2 * 2048 * 256 + 4 * (256 * 768 + 3 * 256 * 512 + 2 * 256) + 256 == 3_410_176
    with pytest.raises(InputError, match="known: demo:tiny-llama"):
        resolve("demo:nope")


def test_unreachable_hub_fails_fast_with_what_works_offline(tmp_path):
    """No route to the hub: one quick probe, then the local cache only (no ~25 s of retries)."""
    import json
    import os
    import subprocess
    import sys
    import time
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))   # port 9: nothing listens
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "engine", "estimate", "train", "--model", "someorg/somemodel",
                        "--method", "lora", "--json"], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    took = time.perf_counter() - t0
    assert p.returncode == 2, p.stderr
    msg = json.loads(p.stdout)["error"]
    assert "not reachable" in msg and "local hub cache" in msg
    assert "preset" in msg and "config.json path" in msg
    assert "Retrying" not in p.stderr, f"the hub was retried ({took:.1f} s) instead of answering from the cache"
