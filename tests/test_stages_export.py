"""The export stage for real: the project's HF -> GGUF writer read back with gguf.GGUFReader and
loaded in llama.cpp (llama-cpp-python), whose logits and held-out perplexity match the HF model's;
k-quants through llama.cpp's own quantizer; the runtime evaluation recorded per runtime; the vLLM
manifest of a GPTQ checkpoint; ExecuTorch's missing install said, not hidden."""
import json
import shutil

import pytest

from engine import strategies
from engine.errors import InputError
from engine.runs.context import StageContext
from engine.runs.stages import STAGES
from engine.spec.run import RunSpec

gguf = pytest.importorskip("gguf")

TRAIN = {"steps": 6, "batch_size": 4, "seq_len": 64, "learning_rate": 5e-3, "lora_rank": 8}
EVAL = {"max_examples": 8, "prompt_len": 16, "new_tokens": 4}


def has_llama_cpp():
    try:
        import llama_cpp  # noqa: F401
        return True
    except Exception:
        return False


needs_llama_cpp = pytest.mark.skipif(not has_llama_cpp(), reason="llama-cpp-python is not installed")


def micro_dir():
    from engine.runs import demo
    return demo.ensure_model("micro-llama")


def ctx_for(tmp_path, stage: dict, state=None, spec=None, strategy="bf16-baseline"):
    rs = RunSpec.parse(spec or {"model": "demo:micro-llama", "strategy": strategy, "train": TRAIN, "evaluate": EVAL,
                                "dataset": {"demo": "tickets", "max_examples": 40}, "device": "cpu"})
    events = []
    ctx = StageContext(run_id="t", spec=rs, strategy=strategies.get(strategy), stage=stage, index=0,
                       workdir=tmp_path, state=state if state is not None else {}, device="cpu",
                       emit=lambda type, **p: events.append((type, p)))
    return ctx, events


def tiny_qwen2(path, hidden=64, inter=128, layers=2, heads=4, kv=2, tied=True):
    """A random-init Qwen2 (q/k/v biases, tied embeddings) with the micro model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
                      tie_word_embeddings=tied, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0)
    m = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(path)
    AutoTokenizer.from_pretrained(micro_dir()).save_pretrained(path)
    return path


def tiny_llama_256(path):
    """A random-init Llama whose widths (256, 512) split into k-quants' 256-value super-blocks."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(micro_dir()).save_pretrained(path)
    return path


# ---- the writer ------------------------------------------------------------------------------
def test_gguf_written_reads_back(micro_home, tmp_path):
    from engine.runs import gguf_file
    src = tmp_path / "micro"
    shutil.copytree(micro_dir(), src)
    (src / "chat_template.jinja").write_text("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}")
    res = gguf_file.write(src, tmp_path / "m.gguf", outtype="f16")
    back = gguf_file.read(tmp_path / "m.gguf")
    cfg = json.loads((src / "config.json").read_text())
    n_layer = cfg["num_hidden_layers"]
    # llama: 9 tensors a block + token_embd, output_norm, output (untied)
    assert back["arch"] == "llama" and back["block_count"] == n_layer
    assert back["tensors"] == res["tensors"] == 9 * n_layer + 3
    assert back["tensor_types"] == {"F16": 7 * n_layer + 2, "F32": 2 * n_layer + 1}   # norms stay f32
    assert back["per_tensor"]["blk.0.attn_q.weight"] == "F16" and back["per_tensor"]["output_norm.weight"] == "F32"
    assert back["file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    # the tokenizer: every id, the merges, BOS as the HF tokenizer adds it, the chat template
    tj = json.loads((src / "tokenizer.json").read_text())
    assert back["tokenizer_model"] == "gpt2" and back["tokenizer_pre"] == "gpt-2"
    assert back["tokens"] == cfg["vocab_size"] and back["merges"] == len(tj["model"]["merges"]) > 0
    assert back["bos_token_id"] == cfg["bos_token_id"] and back["add_bos_token"] is True
    assert back["chat_template"] == (src / "chat_template.jinja").read_text()
    # q rows permuted to llama.cpp's rotary pairs, everything else as stored
    import numpy as np
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    t = {x.name: np.array(x.data) for x in r.tensors}
    hf = gguf_file.read_safetensors(src)
    q = hf["model.layers.0.self_attn.q_proj.weight"]
    heads, hd = cfg["num_attention_heads"], cfg["head_dim"]
    want = q.reshape(heads, 2, hd // 2, -1).swapaxes(1, 2).reshape(q.shape)
    assert np.array_equal(t["blk.0.attn_q.weight"].astype(np.float32), want.astype(np.float16).astype(np.float32))
    assert not np.array_equal(want, q)
    v = hf["model.layers.0.self_attn.v_proj.weight"]
    assert np.array_equal(t["blk.0.attn_v.weight"].astype(np.float32), v.astype(np.float16).astype(np.float32))


def test_writer_refuses_what_it_cannot_write(micro_home, tmp_path):
    from engine.runs import gguf_file
    src = tmp_path / "m"
    shutil.copytree(micro_dir(), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(InputError, match="supports llama, mistral, qwen2"):
        gguf_file.write(src, tmp_path / "x.gguf")
    (src / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(InputError, match="quantized checkpoint"):
        gguf_file.write(src, tmp_path / "x.gguf")
    with pytest.raises(InputError, match="llama.cpp's quantizer"):
        gguf_file.write(micro_dir(), tmp_path / "x.gguf", outtype="q4_k_m")


def _logits_hf(path, ids):
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return m(input_ids=torch.tensor([ids])).logits[0].numpy()


def _logits_llama_cpp(path, ids):
    import llama_cpp
    import numpy as np
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_ubatch=128, logits_all=True,
                          n_threads=2, verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)])
    del llm
    return out


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_computes_what_hf_computes(micro_home, tmp_path, arch):
    """The f32 GGUF in llama.cpp gives the HF model's logits (rotary layout, biases, tied head, norms
    all placed right); llama.cpp's tokenizer from the GGUF splits text as the HF tokenizer."""
    import numpy as np
    from engine.runs import gguf_file
    src = micro_dir() if arch == "llama" else tiny_qwen2(tmp_path / "qwen2")
    gguf_file.write(src, tmp_path / "m.gguf", outtype="f32")
    back = gguf_file.read(tmp_path / "m.gguf")
    assert back["arch"] == arch
    if arch == "qwen2":
        assert "blk.0.attn_q.bias" in back["per_tensor"] and "output.weight" not in back["per_tensor"]
    # the ids tokenizer.json gives (transformers' Qwen2 tokenizer class would re-split digits with Qwen's
    # own regex over this fixture's GPT-2-style tokenizer.json; a real Qwen2 tokenizer.json carries it)
    from tokenizers import Tokenizer
    text = "Return the order of Alice: 3 boxes to Lisbon, shipped 2024-05-01. Why? It's late!"
    ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode(text).ids
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=128, verbose=False, vocab_only=True)
    assert llm.tokenize(text.encode(), add_bos=True) == ids
    del llm
    ref, got = _logits_hf(src, ids), _logits_llama_cpp(tmp_path / "m.gguf", ids)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max()), np.abs(got - ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@needs_llama_cpp
def test_k_quants_through_llama_cpp(micro_home, tmp_path):
    """llama.cpp's quantizer makes the k-quant types; rows that do not split into 256-value
    super-blocks fall back per tensor (the micro model's width 128), and the stage says which."""
    from engine.runs import gguf_file
    src = tiny_llama_256(tmp_path / "l256")
    f16 = gguf_file.write(src, tmp_path / "m-f16.gguf", outtype="f16")
    sizes = {}
    for qtype, want in [("q8_0", {"Q8_0"}), ("q6_k", {"Q6_K"}), ("q5_k_m", {"Q5_K", "Q6_K"}),
                        ("q4_k_m", {"Q4_K", "Q6_K"})]:
        q = gguf_file.quantize(f16["path"], tmp_path / f"m-{qtype}.gguf", qtype, threads=2)
        back = gguf_file.read(q["path"])
        assert back["file_type"] == gguf_file.ftype_of(qtype)
        got = set(back["tensor_types"]) - {"F32"}
        assert got <= want | {"Q8_0"} and got & want, (qtype, back["tensor_types"])
        assert back["tensors"] == f16["tensors"] and back["tokens"] == 512
        sizes[qtype] = q["size_on_disk_bytes"]
    assert sizes["q4_k_m"] < sizes["q5_k_m"] < sizes["q6_k"] < sizes["q8_0"] < f16["size_on_disk_bytes"]
    # the micro model (width 128): llama.cpp keeps q4_k_m's tensors off Q4_K where rows are 128 wide
    m = gguf_file.write(micro_dir(), tmp_path / "micro-f16.gguf")
    q = gguf_file.quantize(m["path"], tmp_path / "micro-q4_k_m.gguf", "q4_k_m", threads=2)
    back = gguf_file.read(q["path"])
    assert not any(t.endswith("_K") for n, t in back["per_tensor"].items() if "attn_q" in n), back["per_tensor"]
    with pytest.raises(InputError, match="unknown GGUF type"):
        gguf_file.ftype_of("q4_k_x")


# ---- the stage ---------------------------------------------------------------------------------------
@needs_llama_cpp
def test_export_and_runtime_evaluation(micro_home, tmp_path):
    """export (gguf q4_k_m, the f16 it came from kept) -> evaluate: both files measured in llama.cpp,
    recorded per runtime; the f16 file's perplexity is the HF model's within 1%."""
    state: dict = {}
    ctx, events = ctx_for(tmp_path, {"stage": "export", "target": "gguf", "format": "gguf-q4_k_m"}, state)
    res = STAGES["export"](ctx)
    fmts = [e["format"] for e in res["exports"]]
    assert fmts == ["gguf-f16", "gguf-q4_k_m"] and [e["role"] for e in res["exports"]] == ["source", "deploy"]
    assert res["quantizer"]["fallback_tensors"]            # the micro model's 128-wide rows
    assert [p["kind"] for t, p in events if t == "artifact"] == ["export:gguf-f16", "export:gguf-q4_k_m"]
    ctx2, events2 = ctx_for(tmp_path, {"stage": "evaluate"}, state)
    ev = STAGES["evaluate"](ctx2)
    hf = ev["after"]
    rt = {m["format"]: m for m in ev["runtimes"]}
    f16, q4 = rt["gguf-f16"], rt["gguf-q4_k_m"]
    for m in (f16, q4):
        assert m["runtime"] == "llama.cpp" and m["scored_tokens"] == hf["scored_tokens"]
        assert m["decode_tokens_per_s"] > 0 and m["prefill_ms"] > 0 and m["weights_bytes"] > 0
        assert m["tokenizer_agreement"] == 1.0 and m["accuracy"] is not None
    assert abs(f16["perplexity"] / hf["perplexity"] - 1) < 0.01, (f16["perplexity"], hf["perplexity"])
    assert f16["vs_hf"]["perplexity_ratio"] == pytest.approx(f16["perplexity"] / hf["perplexity"], abs=1e-3)
    assert q4["perplexity"] != f16["perplexity"] and q4["size_on_disk_bytes"] < f16["size_on_disk_bytes"]
    names = {p["name"] for t, p in events2 if t == "eval"}
    assert {"llama.cpp:gguf-f16", "llama.cpp:gguf-q4_k_m", "after"} <= names
    assert any(t == "metric" and p["name"] == "llama.cpp:gguf-q4_k_m.perplexity" for t, p in events2)
    # where the time went: per model and per runtime, parts that add up to at most the whole
    assert {"load", "perplexity", "task", "latency"} <= set(hf["seconds"]) and q4["seconds"]["perplexity"] > 0
    assert sum(q4["seconds"].values()) <= q4["seconds_total"] + 0.01
    # evaluate.runtime_sources: false measures the deployed file only, and says why the f16 one is not
    spec = {"model": "demo:micro-llama", "strategy": "bf16-baseline", "train": TRAIN, "device": "cpu",
            "evaluate": {**EVAL, "runtime_sources": False, "before_and_after": False},
            "dataset": {"demo": "tickets", "max_examples": 40}}
    ctx3, events3 = ctx_for(tmp_path, {"stage": "evaluate"}, state, spec=spec)
    ev3 = STAGES["evaluate"](ctx3)
    assert [m["format"] for m in ev3["runtimes"]] == ["gguf-q4_k_m"]
    assert any(t == "log" and "gguf-f16" in p["message"] and "runtime_sources: false" in p["message"] for t, p in events3)


def test_export_refusals(micro_home, tmp_path):
    from engine.runs.stages.export import settings
    with pytest.raises(InputError, match="unknown export target"):
        settings({"stage": "export", "target": "onnx"})
    with pytest.raises(InputError, match="gguf-<type>"):
        settings({"stage": "export", "target": "gguf", "format": "q4_k_m"})
    ctx, _ = ctx_for(tmp_path, {"stage": "export", "target": "gguf"},
                     {"base_dir": str(micro_dir()), "model_dir": str(micro_dir()), "tokenizer_dir": str(micro_dir()),
                      "quant": {"method": "gptq", "library": "gptqmodel"}})
    with pytest.raises(InputError, match="already quantized"):
        STAGES["export"](ctx)
    ctx, _ = ctx_for(tmp_path, {"stage": "export", "target": "vllm"},
                     {"base_dir": str(micro_dir()), "model_dir": str(micro_dir()), "quant": None})
    with pytest.raises(InputError, match="GPTQ/AWQ checkpoint"):
        STAGES["export"](ctx)


def test_executorch_says_what_is_missing(micro_home, tmp_path):
    try:
        import executorch  # noqa: F401
        pytest.skip("executorch is installed here")
    except Exception:
        pass
    ctx, _ = ctx_for(tmp_path, {"stage": "export", "target": "executorch"},
                     {"base_dir": str(micro_dir()), "model_dir": str(micro_dir()), "quant": None})
    with pytest.raises(InputError, match="executorch is not installed.*not runnable here"):
        STAGES["export"](ctx)


def test_vllm_manifest_of_gptq_checkpoints(tmp_path):
    from engine.runs.stages.export import vllm_manifest
    def ckpt(**qc):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
        return d
    m = vllm_manifest(ckpt(quant_method="gptq", bits=4, group_size=128, sym=True, desc_act=False, checkpoint_format="gptq"))
    assert m["quantization"] == "gptq_marlin" and m["min_compute_capability"] == 8.0
    assert m["serve"].endswith("--quantization gptq_marlin") and m["verified_in_vllm"] is False
    m = vllm_manifest(ckpt(quant_method="gptq", bits=3, group_size=128, sym=True))
    assert m["quantization"] == "gptq"                  # Marlin takes 4/8-bit only
    m = vllm_manifest(ckpt(quant_method="gptq", bits=4, group_size=128, sym=False))
    assert m["quantization"] == "gptq"                  # nor asymmetric GPTQ
    m = vllm_manifest(ckpt(quant_method="awq", bits=4, group_size=128, zero_point=True))
    assert m["quantization"] == "awq_marlin"
    with pytest.raises(InputError, match="GPTQ or AWQ"):
        vllm_manifest(ckpt(quant_method="bitsandbytes"))
    with pytest.raises(InputError, match="`gptq` checkpoint format"):
        vllm_manifest(ckpt(quant_method="gptq", bits=4, group_size=128, checkpoint_format="gptq_v2"))


@pytest.mark.slow
def test_vllm_export_of_a_real_gptq_checkpoint(micro_home, tmp_path):
    """quantize (gptqmodel GPTQ 4-bit g64) -> export vllm: the checkpoint gptqmodel saved carries what
    vLLM reads (quant_method gptq, checkpoint_format gptq, sym) and the manifest picks gptq_marlin."""
    state: dict = {}
    ctx, _ = ctx_for(tmp_path, {"stage": "quantize", "method": "gptq", "bits": 4, "group_size": 64,
                                "calibration_samples": 8}, state)
    STAGES["quantize"](ctx)
    ctx, events = ctx_for(tmp_path, {"stage": "export", "target": "vllm"}, state)
    res = STAGES["export"](ctx)
    (e,) = res["exports"]
    out = tmp_path / "export-vllm"
    assert e["runtime"] == "vllm" and e["format"] == "gptq-4bit" and e["path"] == str(out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 64
    man = json.loads((out / "vllm_manifest.json").read_text())
    assert man["quantization"] == "gptq_marlin" and man["checkpoint"]["checkpoint_format"] == "gptq"
    assert any(f.suffix == ".safetensors" for f in out.iterdir()) and (out / "tokenizer.json").is_file()
