"""Memory estimates: every term against arithmetic written out here, the weight layouts against
the bytes real quantized modules hold (bitsandbytes, torchao, gptqmodel on CPU), and the
activation model against a live-storage tracker around a real training step on the CPU."""
import importlib.util
import math
from pathlib import Path

import pytest

from engine import estimate, hardware, models
from engine.errors import InputError
from engine.estimate import formats as F
from engine.estimate import memory as M

ROOT = Path(__file__).resolve().parent.parent
GIB = 2 ** 30
# llama-3.1-8b
h, I, L, V, q, kv, H = 4096, 14336, 32, 128256, 4096, 1024, 32
LIN = [(h, q), (h, kv), (h, kv), (q, h), (h, I), (h, I), (I, h)]     # (in, out) of q k v o gate up down
H100 = hardware.get("h100-80gb")


def arch8b():
    return models.resolve("llama-3.1-8b")


# ---- weights by format ---------------------------------------------------------------------

def test_bf16_weights_are_every_parameter_twice_plus_rotary_buffers():
    b = F.weights_breakdown(arch8b(), "bf16", round_to=1)
    assert sum(b.values()) == 2 * 8_030_261_248 + 2 * 4 * 64      # + inv_freq, original_inv_freq fp32[64]
    assert b["embed_tokens"] == b["lm_head"] == 2 * V * h            # untied
    assert F.weights_breakdown(models.resolve("llama-3.2-1b"), "bf16")["lm_head"] == 0   # tied


def test_nf4_double_quant_by_hand():
    n = sum(i * o for i, o in LIN)                                   # 218,103,808 per layer
    blocks = sum(math.ceil(i * o / 64) for i, o in LIN)
    state2 = sum(4 * math.ceil(i * o / 64 / 256) for i, o in LIN)
    consts = 7 * (4 + 16 * 4 + 256 * 4)                              # offset, NF4 code, state2 code per linear
    quant = L * (n // 2 + blocks + state2 + consts)
    dense = 2 * (2 * V * h + L * 2 * h + h)                          # embeddings, lm_head, norms, final norm
    b = F.weights_breakdown(arch8b(), "nf4", round_to=1)
    assert b["block_linears"] + b["quant_scales"] == quant
    assert sum(b.values()) == quant + dense + 2 * 4 * 64
    # 4.127 bits per block-linear weight: 4 + 8/64 (uint8 absmax) + 32/(64*256) + constants
    assert 4.12 < 8 * quant / (L * n) < 4.13


def test_int8_gptq_awq_torchao_by_hand():
    a = arch8b()
    n = L * sum(i * o for i, o in LIN)
    outs = L * sum(o for _, o in LIN)
    ins = L * sum(i for i, _ in LIN)
    groups_x_out = L * sum(i // 128 * o for i, o in LIN)
    lin = lambda f: (lambda b: b["block_linears"] + b["quant_scales"])(F.weights_breakdown(a, f, round_to=1))
    assert lin("int8") == n + 4 * outs                                        # int8 + fp32 row scales
    assert lin("gptq-4bit") == n // 2 + groups_x_out // 2 + 2 * groups_x_out + 4 * ins   # qweight, qzeros, fp16 scales, g_idx
    assert lin("awq-4bit") == n // 2 + groups_x_out // 2 + 2 * groups_x_out
    assert lin("gptq-8bit") == n + groups_x_out + 2 * groups_x_out + 4 * ins
    assert lin("torchao-int8") == n + 5 * outs                                # + fp32 scale + int8 zero per row
    assert lin("torchao-int4") == n // 2 + 4 * groups_x_out                   # bf16 scale + zero per group
    assert lin("fp8") == n + 4 * outs


def test_cuda_allocator_rounds_each_tensor_to_512_bytes():
    one = models.arch_from_config(dict(model_type="llama", hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=1, num_attention_heads=2, vocab_size=64))
    exact = F.weights_breakdown(one, "nf4", round_to=1)["quant_scales"]
    cuda = F.weights_breakdown(one, "nf4", round_to=512)["quant_scales"]
    # per linear: absmax (n/64 B -> 512), state2.absmax (4 -> 512), offset (4 -> 512), code (64 -> 512),
    # state2 code (1024); the 4-bit data n/2 <= 4096 rounds up too
    assert cuda == 7 * (512 + 512 + 512 + 512 + 1024)
    assert exact < cuda


def test_group_size_must_divide_in_features():
    a = models.resolve("smollm2-135m")          # hidden 576 = 4.5 x 128
    with pytest.raises(InputError, match=r"group_size 128 does not divide in_features 576.*valid group sizes.*64"):
        estimate.estimate_infer(a, "gptq-4bit")
    r = estimate.estimate_infer(a, "gptq-4bit", group_size=64)
    assert r["inputs"]["group_size"] == 64
    with pytest.raises(InputError, match="no group size"):
        estimate.estimate_infer(a, "nf4", group_size=64)


def test_unknown_and_hosted_formats_are_refused_with_the_list():
    with pytest.raises(InputError, match="known: .*awq-4bit.*gptq-4bit.*nf4"):
        estimate.estimate_infer("llama-3.1-8b", "int3")
    with pytest.raises(InputError, match="'hosted' means a provider serves the model"):
        estimate.estimate_infer("llama-3.1-8b", "hosted")


def test_every_catalog_deploy_format_is_known():
    from engine import strategies
    for s in strategies.catalog():
        if s["deploy"] != "hosted":
            assert s["deploy"] in F.ids(), s["id"]


def test_bitsandbytes_leaves_fused_moe_experts_16bit():
    r = estimate.estimate_infer("mixtral-8x7b", "nf4", runtime="transformers")
    a = models.resolve("mixtral-8x7b")
    experts = sum(l.params for l in a.linears if l.count > 1) * a.num_layers
    assert r["weights_breakdown"]["unquantized_experts"] == 2 * experts
    assert any("fused 3-D" in n for n in r["notes"])
    g = estimate.estimate_infer("mixtral-8x7b", "gptq-4bit", runtime="transformers")
    assert g["weights_breakdown"]["unquantized_experts"] == 0 and g["weights_bytes"] < r["weights_bytes"] / 3


# ---- real modules on CPU: the layouts are what the libraries allocate ----------------------

def _tiny_hf(tmp_path, tie=False):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tie,
                                   max_position_embeddings=256)
    m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    m.save_pretrained(tmp_path)
    return cfg, models.arch_from_config(cfg.to_dict())


def _storage_bytes(model):
    bench = _bench()
    return bench.storage_bytes(model)


def _bench():
    spec = importlib.util.spec_from_file_location("estimates_vs_measured", ROOT / "bench" / "estimates_vs_measured.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("fmt", ["bf16", "int8", "nf4", "nf4-nodq", "fp4"])
def test_weights_equal_real_bitsandbytes_modules(tmp_path, fmt):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    cfg, arch = _tiny_hf(tmp_path)
    qc = {"bf16": None, "int8": transformers.BitsAndBytesConfig(load_in_8bit=True)}.get(fmt)
    if fmt in ("nf4", "nf4-nodq", "fp4"):
        qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4" if fmt == "fp4" else "nf4",
                                             bnb_4bit_use_double_quant=fmt != "nf4-nodq",
                                             bnb_4bit_compute_dtype=torch.bfloat16)
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, quantization_config=qc)
    assert _storage_bytes(m) == F.weights_bytes(arch, fmt, round_to=1)


def test_weights_equal_real_torchao_int8(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tq = pytest.importorskip("torchao.quantization")
    cfg, arch = _tiny_hf(tmp_path)
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    # lm_head stays 16-bit, as transformers' TorchAoConfig does
    tq.quantize_(m, tq.Int8WeightOnlyConfig(), filter_fn=lambda mod, name: isinstance(mod, torch.nn.Linear)
                 and "lm_head" not in name)
    assert _storage_bytes(m) == F.weights_bytes(arch, "torchao-int8", round_to=1)


@pytest.mark.parametrize("fmt", ["gptq-2bit", "gptq-3bit", "gptq-4bit", "gptq-8bit", "awq-4bit"])
def test_gptq_awq_layout_equals_gptqmodel_buffers(fmt):
    torch = pytest.importorskip("torch")
    pytest.importorskip("gptqmodel")
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
    f = F.get(fmt)
    for lin in models.resolve("qwen2.5-0.5b").linears:           # q/k/v carry biases
        cls = AwqTorchLinear if f.kind == "awq" else TorchLinear
        mod = cls(bits=int(f.bits), group_size=128, sym=f.kind == "gptq", desc_act=False,
                  in_features=lin.in_features, out_features=lin.out_features, bias=lin.bias,
                  pack_dtype=torch.int32, backend=None, adapter=None, register_buffers=True)
        real = sum(b.untyped_storage().nbytes() for b in mod.buffers())
        assert real == sum(n for _, n in F.linear_tensors(f, lin)), (fmt, lin.name)


# ---- training: terms by hand ---------------------------------------------------------------

def test_lora_layer_activations_by_hand():
    r = estimate.estimate_train("llama-3.1-8b", "lora", lora_rank=16)
    per = r["activations_per_layer_per_token"]
    # 2 norms keep fp32 x (4h) + rsqrt (4); peft casts the bf16 input of each of the 7 adapted linears
    # to fp32 for its fp32 adapter (q,k,v,gate,up: 4h each; o: 4q; down: 4I); SDPA flash keeps q,k,v,out
    # (bf16) + fp32 logsumexp; the MLP keeps gate, act and up (bf16); LoRA A outputs 7 x 4r
    assert per["norms"] == 2 * (4 * h + 4)
    assert per["linear_inputs"] == 5 * 4 * h + 4 * q + 4 * I
    assert per["attention"] == 2 * q + 2 * 2 * kv + 2 * q + 4 * H
    assert per["mlp"] == 3 * 2 * I
    assert per["lora_a_outputs"] == 7 * 4 * 16
    assert sum(per.values()) == 28 * h + 8 * q + 4 * kv + 10 * I + 4 * H + 28 * 16 + 8


def test_full_and_qlora_layer_activations_by_hand():
    full = estimate.estimate_train("llama-3.1-8b", "full")["activations_per_layer_per_token"]
    # norms: x32 (4h) + rsqrt + y (2h, the weight trains); linears save their bf16 inputs once
    assert sum(full.values()) == 2 * (4 * h + 4 + 2 * h) + (2 * h + 2 * h + 2 * I) + (4 * q + 4 * kv + 4 * H) + 6 * I
    ql = estimate.estimate_train("llama-3.1-8b", "qlora", seq_len=512)
    # fp32 hidden states (prepare_model_for_kbit_training) -> GQA in fp32 -> SDPA math kernel:
    # q copy, k and v expanded to 32 heads, T x T fp32 probabilities, output copy
    assert ql["attention_kernel"] == "math"
    per = ql["activations_per_layer_per_token"]
    assert per["attention"] == 3 * 4 * q + 4 * H * 512
    assert sum(per.values()) == 16 * h + 16 * q + 16 * I + 4 * H * 512 + 28 * 16 + 8
    assert any("math kernel" in n for n in ql["notes"])
    mha = estimate.estimate_train("llama-2-7b", "qlora")          # no GQA: mem-efficient takes fp32
    assert mha["attention_kernel"] == "efficient"


def test_lora_with_checkpointing_peaks_at_the_loss():
    B, T = 4, 512
    r = estimate.estimate_train("llama-3.1-8b", "lora", seq_len=T, batch_size=B, grad_ckpt=True)
    assert r["peak_phase"] == "loss_backward"
    b = r["breakdown"]
    # log_softmax output + grad of nll + grad of log_softmax, all fp32 [B*T, V]
    assert b["logits_and_loss"] == 12 * B * T * V
    lora = L * 16 * (2 * (h + q) + 2 * (h + kv) + 2 * (h + I) + (I + h))
    assert b["adapters"] == 4 * lora and b["optimizer_states"] == 8 * lora
    assert b["weights"] == 2 * 8_030_261_248 + 2 * 4 * 64
    assert b["cublas_workspace"] == 32 * 2 ** 20
    # checkpointing keeps each layer's bf16 input; + final norm (4h+4), rope cos/sin, token ids
    assert b["activations"] == L * 2 * h * B * T + B * T * (4 * h + 4) + 2 * T * 128 * 2 + B * T * 24
    assert sum(b.values()) == r["peak_allocated_bytes"]
    assert r["low"] < r["peak_allocated_bytes"] < r["high"]


def test_full_bf16_peaks_at_the_optimizer_step():
    r = estimate.estimate_train("llama-3.1-8b", "full", seq_len=512, batch_size=1)
    n = 8_030_261_248
    assert r["peak_phase"] == "optimizer_step"
    # bf16 weights + grads + 2 AdamW states + foreach's sqrt(exp_avg_sq): 10 bytes per parameter
    assert r["breakdown"] == {"weights": 2 * n + 512, "optimizer_states": 4 * n, "cublas_workspace": 32 * 2 ** 20,
                              "gradients": 2 * n, "optimizer_temp": 2 * n}
    assert not r["fits"]                 # 74.8 GiB allocated + context + slack > 79.6 GiB usable
    amp = estimate.estimate_train("llama-3.2-1b", "full", precision="fp32-amp", seq_len=128, batch_size=1)
    n1 = models.resolve("llama-3.2-1b").total_params
    assert amp["breakdown"]["optimizer_states"] == 8 * n1 and amp["breakdown"]["gradients"] == 4 * n1


def test_device_bytes_add_context_and_slack_and_decide_fit():
    r = estimate.estimate_train("llama-3.1-8b", "qlora", gpu="rtx-4090-24gb")
    # ada context + what a training process loads (presets/estimate/runtime.yaml, measured on the H100)
    ctx = int((0.45 + 0.52) * GIB)
    assert r["cuda_context_bytes"] == ctx
    # allocator slack as measured on the H100: 3 % of what is allocated once (weights, adapters,
    # optimizer states) + QLoRA's 53 % of what churns (activations, loss, temporaries)
    p = sum(r["breakdown"].get(k, 0) for k in ("weights", "adapters", "optimizer_states", "cublas_workspace"))
    slack = 0.03 * p + 0.53 * (r["peak_allocated_bytes"] - p)
    assert r["allocator_slack_bytes"] == round(slack)
    assert r["device_bytes"] == round(r["peak_allocated_bytes"] + slack + ctx)
    inf = estimate.estimate_infer("llama-3.1-8b", "nf4", gpu="rtx-4090-24gb", runtime="transformers")
    assert inf["cuda_context_bytes"] == int((0.45 + 0.29) * GIB)                   # + bitsandbytes' library
    assert inf["device_bytes"] == round(inf["peak_allocated_bytes"] * 1.05 + inf["cuda_context_bytes"])
    assert r["fits"] == (r["device_bytes"] <= hardware.get("rtx-4090-24gb").memory_bytes)
    assert r["device_low"] < r["device_bytes"] < r["device_high"]


def test_feasibility_the_advisor_relies_on():
    assert not estimate.estimate_train("llama-2-13b", "full", gpu="rtx-4090-24gb")["fits"]
    assert estimate.estimate_train("llama-2-13b", "qlora", gpu="rtx-4090-24gb")["fits"]
    assert not estimate.estimate_train("llama-3.1-70b", "qlora", gpu="rtx-4090-24gb")["fits"]
    assert estimate.estimate_train("llama-3.1-70b", "qlora", gpu="a100-80gb")["fits"]


def test_checkpointing_and_sizes_move_memory_the_right_way():
    base = dict(model="qwen2.5-0.5b", method="lora", seq_len=512, batch_size=4)
    ck = estimate.estimate_train(**base, grad_ckpt=True)["peak_allocated_bytes"]
    no = estimate.estimate_train(**base, grad_ckpt=False)["peak_allocated_bytes"]
    assert ck < no
    big = estimate.estimate_train(**{**base, "batch_size": 8}, grad_ckpt=False)
    small = estimate.estimate_train(**base, grad_ckpt=False)
    assert big["breakdown"]["activations"] == pytest.approx(2 * small["breakdown"]["activations"], rel=1e-3)


def test_bad_training_inputs_name_the_field():
    with pytest.raises(InputError, match="seq_len"):
        estimate.estimate_train("llama-3.1-8b", "lora", seq_len=-1)
    with pytest.raises(InputError, match="batch_size"):
        estimate.estimate_train("llama-3.1-8b", "lora", batch_size=0)
    with pytest.raises(InputError, match="method must be one of full, lora, qlora, qat"):
        estimate.estimate_train("llama-3.1-8b", "dora")
    with pytest.raises(InputError, match="fp32-amp does not apply to qlora"):
        estimate.estimate_train("llama-3.1-8b", "qlora", precision="fp32-amp")
    with pytest.raises(InputError, match="unknown model"):
        estimate.estimate_train("no-such-model", "lora")
    with pytest.raises(InputError, match="serving target"):
        estimate.estimate_train("llama-3.2-1b", "lora", gpu="iphone-15-pro-8gb")


def test_qat_keeps_fake_quantized_weight_copies():
    full = estimate.estimate_train("llama-3.2-1b", "full", grad_ckpt=False)
    qat = estimate.estimate_train("llama-3.2-1b", "qat", grad_ckpt=False)
    lin = models.resolve("llama-3.2-1b").linear_params
    assert qat["breakdown"]["activations"] - full["breakdown"]["activations"] == 2 * lin


# ---- inference -----------------------------------------------------------------------------

def test_kv_cache_is_gqa_aware_and_generation_peak_covers_it():
    B, P, N = 8, 512, 128
    r = estimate.estimate_infer("llama-3.1-8b", "bf16", batch_size=B, prompt_len=P, new_tokens=N, runtime="transformers")
    assert r["kv_cache_bytes"] == B * (P + N - 1) * 2 * L * kv * 2      # K and V, 8 kv heads x 128, bf16
    assert r["peak_allocated_bytes"] > r["weights_bytes"] + r["kv_cache_bytes"]
    assert sum(r["breakdown"].values()) == r["peak_allocated_bytes"]
    assert r["weights_bytes"] == F.weights_bytes(arch8b(), "bf16")
    # generate computes last-position logits only (logits_to_keep=1): B x V x (bf16 + fp32 copy)
    assert r["breakdown"]["logits"] == B * V * 6


def test_quantized_inference_is_smaller_and_ordered():
    w = {f: estimate.estimate_infer("llama-3.1-8b", f)["weights_bytes"] for f in
         ("bf16", "int8", "gptq-8bit", "nf4", "gptq-4bit", "gptq-3bit", "gptq-2bit")}
    # GPTQ g128 costs 4 + 16/128 (fp16 scale) + 4/128 (zero) bits + a 4-byte g_idx per input feature;
    # NF4 with double quantization 4 + 8/64 + 32/16384 bits: NF4 is the smaller 4-bit format
    assert w["bf16"] > w["gptq-8bit"] > w["int8"] > w["gptq-4bit"] > w["nf4"] > w["gptq-3bit"] > w["gptq-2bit"]


def test_serving_targets_have_no_cuda_context():
    # the HF path on a CPU target, and ExecuTorch on a phone (transformers does not run on phones)
    r = estimate.estimate_infer("llama-3.2-1b", "w4a8", gpu="cpu-x86-pytorch")
    assert r["cuda_context_bytes"] == 0 and r["gpu"] == "cpu-x86-pytorch" and r["runtime"]["id"] == "transformers"
    r = estimate.estimate_infer("llama-3.2-1b", "executorch-8da4w", gpu="iphone-15-pro-8gb")
    assert r["cuda_context_bytes"] == 0 and r["gpu"] == "iphone-15-pro-8gb" and r["runtime"]["id"] == "executorch"


# ---- stage estimates -------------------------------------------------------------------------

def test_gptq_calibration_memory_by_hand():
    r = estimate.estimate_quantize("llama-3.1-8b", "gptq", bits=4, group_size=128, calibration_samples=128, seq_len=2048)
    b = r["breakdown"]
    assert b["calibration_activations"] == 2 * 2 * 128 * 2048 * h     # layer inputs + outputs, bf16
    # Hessian + inverse of the widest input (down_proj, 14336^2 fp32), 3 fp32 copies of the largest
    # weight, and the q/k/v Hessians accumulated together (3 x 4096^2 fp32)
    assert b["hessian_and_work"] == 2 * 4 * I * I + 3 * 4 * h * I + 3 * 4 * h * h
    assert sum(b.values()) == r["peak_allocated_bytes"] and r["time_s"] > 0
    with pytest.raises(InputError, match="calibration_samples"):
        estimate.estimate_quantize("llama-3.1-8b", "gptq", calibration_samples=0)
    with pytest.raises(InputError, match="quantize method"):
        estimate.estimate_quantize("llama-3.1-8b", "magic")


def test_merge_memory_holds_the_16bit_model():
    r = estimate.estimate_merge("llama-3.1-8b")
    assert r["breakdown"]["weights_16bit"] >= 2 * 8_030_261_248
    q = estimate.estimate_merge("llama-3.1-8b", base="nf4")
    assert q["peak_allocated_bytes"] > r["peak_allocated_bytes"] and "quantized_base" in q["breakdown"]


def test_estimates_are_fast_and_torch_free():
    import subprocess
    import sys
    code = ("import time, sys; from engine import estimate; estimate.estimate_train('llama-3.1-8b','lora');"
            "t=time.perf_counter()\nfor m in ('lora','qlora','full'): estimate.estimate_train('llama-3.1-8b', m)\n"
            "estimate.estimate_infer('llama-3.1-8b','nf4', batch_size=8)\n"
            "print((time.perf_counter()-t)/4*1000, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    ms, has_torch, has_tf = out.split()
    assert float(ms) < 100 and has_torch == "False" and has_tf == "False"


# ---- the activation model against a real training step (CPU live-storage tracker) ----------

def _tracked(method, grad_ckpt, mt="llama", lora_targets=None):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    bench = _bench()
    cfg = transformers.AutoConfig.for_model(mt, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                            vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                            use_cache=False)
    case = dict(method=method, grad_ckpt=grad_ckpt, seq_len=32, batch_size=2, lora_targets=lora_targets)
    measured = bench.train_case(cfg, case, "cpu", {})["peak_allocated_bytes"]
    arch = models.arch_from_config(cfg.to_dict())
    pred = M.train_memory(arch, method, "bf16", 32, 2, grad_ckpt, 16, hardware.get("cpu-server-64gb"),
                          attn_kernel="flash", round_to=1, include_workspace=False,
                          lora_targets=lora_targets)["peak_allocated_bytes"]
    return measured, pred


@pytest.mark.parametrize("method,grad_ckpt", [("lora", False), ("full", True)])
def test_training_step_matches_live_storage_on_cpu(method, grad_ckpt):
    measured, pred = _tracked(method, grad_ckpt)
    assert pred == pytest.approx(measured, rel=0.05)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")])
def test_a_subset_of_lora_targets_matches_live_storage_on_cpu(targets):
    """LoRA on some projections only (what a run's train.lora_targets may ask): adapters, their
    gradients and states, and the saved inputs of the adapted linears alone."""
    measured, pred = _tracked("lora", False, lora_targets=list(targets))
    full_measured, _ = _tracked("lora", False)
    assert measured < full_measured                     # fewer adapters really hold less
    assert pred == pytest.approx(measured, rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("method,grad_ckpt,mt", [(m, c, t) for m in ("lora", "qlora", "full") for c in (True, False)
                                                 for t in ("llama", "qwen2", "qwen3", "mistral")])
def test_training_step_matches_live_storage_on_cpu_all(method, grad_ckpt, mt):
    measured, pred = _tracked(method, grad_ckpt, mt)
    assert pred == pytest.approx(measured, rel=0.08)
