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


def test_a_local_copy_of_a_preset_model_gets_the_presets_family(tmp_path):
    # SmolLM2 is a llama model_type with 8k positions and a 49k vocabulary: by type and size alone it
    # reads as llama-2, yet it is the preset's llama-3-generation model (the demo GGUF is such a copy)
    cfg = dict(models.presets()["smollm2-135m"]["config"])
    assert models.family_of(cfg, "model") == "llama-2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    a = models.resolve(str(tmp_path))
    assert a.family == "llama-3" and any("preset smollm2-135m" in n for n in a.notes)
    # one size off and it is no longer that network: the type-and-size guess applies again
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 31}))
    b = models.resolve(str(tmp_path))
    assert b.family == "llama-2" and not any("preset" in n for n in b.notes)


def test_size_only_is_marked_approximate():
    a = models.resolve({"params_b": 13, "family": "llama-2"})
    assert a.approximate and abs(a.total_params - 13e9) / 13e9 < 0.03
    with pytest.raises(InputError, match="family"):
        models.resolve({"params_b": 13, "family": "nope"})
    with pytest.raises(InputError, match="params_b"):
        models.resolve({"params_b": -1, "family": "llama-2"})


def test_unknown_model_lists_the_closest_presets(tmp_path):
    with pytest.raises(InputError, match="Closest presets: llama-3.1-8b, "):
        models.resolve("llama-3.1-8x")
    assert models.closest_presets("Qwen/Qwen2.5-7X")[0] == "qwen2.5-7b"     # by the name part of a hub id
    assert models.closest_presets("meta-llama/Llama-3.1-8X")[0] == "llama-3.1-8b"
    with pytest.raises(InputError, match="config.json"):
        models.resolve(str(tmp_path))           # dir without config.json


def test_offline_hub_id_says_what_works(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="Offline, use a preset"):
        models.resolve("some-org/some-unknown-model")
    with pytest.raises(InputError, match=r"closest: qwen2\.5-7b, "):
        models.resolve("Qwen/Qwen2.5-7X")


def test_a_config_file_is_named_after_its_model(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}
    (tmp_path / "h1").mkdir()
    (tmp_path / "h1" / "my-llama.json").write_text(json.dumps(cfg))
    assert models.resolve(str(tmp_path / "h1" / "my-llama.json")).name == "my-llama"
    (tmp_path / "h2").mkdir()
    (tmp_path / "h2" / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "acme/support-llama"}))
    assert models.resolve(str(tmp_path / "h2" / "config.json")).name == "support-llama"


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


# ---- GGUF files (llama.cpp's format) as a model source ------------------------------------------

def write_gguf(path, *, layers=2, hidden=64, ffn=128, heads=4, kv=2, vocab=96, tied=True, arch="llama"):
    """A small real GGUF file (gguf.GGUFWriter): llama metadata and f32 tensors of those shapes."""
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("test-gguf")
    w.add_block_count(layers)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_context_length(256)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list([f"t{i}" for i in range(vocab)])
    hd = hidden // heads
    w.add_tensor("token_embd.weight", np.zeros((vocab, hidden), np.float32))
    for i in range(layers):
        for n, shape in (("attn_q", (heads * hd, hidden)), ("attn_k", (kv * hd, hidden)), ("attn_v", (kv * hd, hidden)),
                         ("attn_output", (hidden, heads * hd)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                         ("ffn_down", (hidden, ffn))):
            w.add_tensor(f"blk.{i}.{n}.weight", np.zeros(shape, np.float32))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    if not tied:
        w.add_tensor("output.weight", np.zeros((vocab, hidden), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_file_is_read_from_its_metadata_without_torch(tmp_path):
    """A .gguf path (or a dir holding one) resolves from the file's metadata: the same architecture
    a config.json of those sizes gives, its parameters equal to the tensors the file holds."""
    pytest.importorskip("gguf")
    import gguf
    from engine.models import resolve
    for tied in (True, False):
        p = write_gguf(tmp_path / f"m-{tied}.gguf", tied=tied)
        arch = resolve(str(p))
        same = models.arch_from_config({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
                                 "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "vocab_size": 96, "tie_word_embeddings": tied, "max_position_embeddings": 256})
        assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.vocab_size,
                arch.intermediate_size, arch.tie_embeddings, arch.max_positions) == (2, 64, 4, 2, 96, 128, tied, 256)
        assert arch.total_params == same.total_params
        in_file = sum(int(t.n_elements) for t in gguf.GGUFReader(str(p)).tensors)
        assert arch.total_params == in_file
        assert arch.source == f"gguf:{p}" and "F32" in arch.notes[-1]
    (tmp_path / "dir").mkdir()
    write_gguf(tmp_path / "dir" / "only.gguf", layers=3)
    assert resolve(str(tmp_path / "dir")).num_layers == 3
    import subprocess
    import sys
    code = f"import sys; from engine.models import resolve; resolve({str(p)!r}); print(sorted(m for m in ('torch', " \
           "'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_bad_gguf_files_exit_2_naming_the_problem(tmp_path):
    """Through the estimate CLI: a truncated GGUF, a file that is not GGUF, a missing one."""
    pytest.importorskip("gguf")
    import json
    import os
    import subprocess
    import sys
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[: len(good) - 100])
    (tmp_path / "cut-early.gguf").write_bytes(good[:300])
    (tmp_path / "text.gguf").write_text("model: not really\n")
    want = {"cut.gguf": "truncated", "cut-early.gguf": "truncated or corrupt GGUF", "text.gguf": "is not a GGUF file",
            "gone.gguf": "not found"}
    for name, says in want.items():
        p = subprocess.run([sys.executable, "-m", "engine", "estimate", "train", "--model", str(tmp_path / name),
                            "--method", "lora", "--json"], capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(__file__)))
        assert p.returncode == 2, (name, p.stdout, p.stderr)
        msg = json.loads(p.stdout)["error"]
        assert says in msg and name in msg, (name, msg)
    ok = subprocess.run([sys.executable, "-m", "engine", "estimate", "train", "--model", str(tmp_path / "good.gguf"),
                         "--method", "lora", "--json"], capture_output=True, text=True,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["peak_allocated_bytes"] > 0


def test_a_scenario_names_a_gguf_file(tmp_path):
    """A scenario's model may be a .gguf path: the advisor ranks the catalog on the file's architecture."""
    pytest.importorskip("gguf")
    from engine import advisor
    p = write_gguf(tmp_path / "m.gguf", layers=4, hidden=128, ffn=256, vocab=512)
    out = advisor.recommend({"model": str(p), "task": "classification", "examples": 500,
                             "hardware": {"gpu": "t4-16gb"}}, what_if=False)
    assert out["recommended"] and all(e["feasible"] for e in out["ranked"] if e["strategy"] in ("qlora", "ptq-nf4"))
