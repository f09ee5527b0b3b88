"""The chunked linear cross-entropy (engine/runs/stages/loss.py) against the reference loss
(model(**batch).loss): same value and same gradients for full, LoRA, QLoRA and QAT models;
the reference where it cannot apply; and measured peak memory (CPU live-storage tracker)
dropping by the B x T x V term the estimate predicts."""
import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine import hardware, models  # noqa: E402
from engine.estimate import memory as M  # noqa: E402
from engine.runs.stages import loss as L  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def tiny_cfg(mt="llama", vocab=300, **kw):
    base = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
    base.update(kw)
    return transformers.AutoConfig.for_model(mt, **base)


def tiny_model(mt="llama", **kw):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_cfg(mt, **kw), dtype=torch.float32)


def batch(vocab=300, B=3, T=17):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100                      # a masked prompt
    mask = torch.ones_like(ids)
    mask[2, 11:] = 0                          # right padding, its labels ignored
    labels[2, 11:] = -100
    ids[2, 11:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, fn, b):
    model.zero_grad(set_to_none=True)
    loss = fn(model, b)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def assert_same(model, b, chunk=5, rtol=1e-5):
    ref, g_ref = loss_and_grads(model, L.reference_loss, b)
    got, g_got = loss_and_grads(model, lambda m, x: L.chunked_loss(m, x, chunk), b)
    assert got == pytest.approx(ref, rel=rtol)
    assert g_ref.keys() == g_got.keys() and g_ref
    for n in g_ref:
        torch.testing.assert_close(g_got[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)
    return ref


def test_mean_over_unmasked_shifted_tokens_by_hand():
    # a 1-layer "model": hidden states given, head W: loss = mean over t of lse(h_t W^T) - (h_t W^T)[y_{t+1}]
    torch.manual_seed(0)
    h = torch.randn(2, 4, 3, requires_grad=True)
    W = torch.randn(5, 3, requires_grad=True)
    y = torch.tensor([[1, 2, -100, 4], [0, -100, 3, 3]])
    lab = L.shifted_labels(y)
    assert lab.tolist() == [2, -100, 4, -100, -100, 3, 3, -100]
    loss = L.linear_cross_entropy(h.reshape(-1, 3), W, None, lab, chunk=3)
    logits = h.reshape(-1, 3) @ W.T
    terms = [torch.logsumexp(logits[i], 0) - logits[i, t] for i, t in enumerate(lab.tolist()) if t != -100]
    want = sum(terms) / len(terms)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    (2 * loss).backward()                     # grad_output 2 scales the stored gradients
    gh, gw = h.grad.clone(), W.grad.clone()
    h.grad = W.grad = None
    (2 * want).backward()
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, W.grad)


@pytest.mark.parametrize("mt", ["llama", "qwen2", "opt"])
def test_full_model_loss_and_gradients_equal_the_reference(mt):
    kw = {"ffn_dim": 64, "word_embed_proj_dim": 32, "max_position_embeddings": 64, "dropout": 0.0,
          "attention_dropout": 0.0} if mt == "opt" else {}
    model = tiny_model(mt, **kw)
    model.train()
    assert L.why_not_chunked(model) is None
    assert_same(model, batch(), chunk=5)
    assert_same(model, batch(), chunk=1000)   # one chunk


def test_untied_head_with_bias_and_tied_embeddings():
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same(model, batch(), chunk=4)       # the head's gradient adds to the embedding's


def test_lora_and_gradient_checkpointing_equal_the_reference():
    peft = pytest.importorskip("peft")
    model = tiny_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                          "down_proj"]))
    for n, p in model.named_parameters():      # B = 0 at init: move it so every adapter has a gradient
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    assert L.why_not_chunked(model) is None
    assert_same(model, batch(), chunk=6)


def test_qat_fake_quantized_model_equals_the_reference():
    pytest.importorskip("torchao")
    from engine.runs.stages.train import qat_prepare
    model = tiny_model()
    qat_prepare(model, "int8-dyn-act-int4-weight", 16, "cpu")
    model.train()
    assert_same(model, batch(), chunk=7, rtol=1e-4)


def test_qlora_nf4_equals_the_reference(tmp_path):
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    tiny_model(intermediate_size=64).save_pretrained(tmp_path)
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantization_config=qc,
                                                              device_map={"": "cpu"})
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                 gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    assert type(model.get_base_model().model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert_same(model, batch(), chunk=8, rtol=1e-4)


def test_falls_back_where_the_logits_are_modified():
    model = tiny_model("gemma2", final_logit_softcapping=30.0, query_pre_attn_scalar=8, head_dim=8)
    why = L.why_not_chunked(model)
    assert "final_logit_softcapping" in why
    seen = []
    fn, mode, reason = L.make_loss(model, "chunked", log=seen.append)
    assert fn is L.reference_loss and mode == "reference" and reason == why
    assert seen and "reference loss" in seen[0]
    fn, mode, reason = L.make_loss(tiny_model(), "reference")
    assert mode == "reference" and reason is None


def test_first_batch_check_catches_a_wrong_chunked_loss():
    model = tiny_model()
    b = batch()
    assert L.check_against_reference(model, b) is None
    with torch.no_grad():                      # a head the decoder path does not see: scale the logits
        model.lm_head.register_forward_hook(lambda mod, inp, out: out * 10)
    msg = L.check_against_reference(model, b)
    assert msg and "differs" in msg
    _, mode, _ = L.make_loss(model, "chunked", first_batch=b)
    assert mode == "reference"


def test_unknown_mode_is_refused():
    from engine.errors import InputError
    with pytest.raises(InputError, match="train.loss"):
        L.make_loss(tiny_model(), "fused")


# ---- memory: the measured drop is the estimate's B*T*V term -------------------------------------

def _bench():
    spec = importlib.util.spec_from_file_location("estimates_vs_measured", ROOT / "bench" / "estimates_vs_measured.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("method", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_peak_memory_drops_by_the_predicted_logits_term(method):
    pytest.importorskip("peft")
    bench = _bench()
    cfg = tiny_cfg(vocab=4096, hidden_size=64, intermediate_size=192, num_attention_heads=4, head_dim=16)
    arch = models.arch_from_config(cfg.to_dict())
    cpu = hardware.get("cpu-server-64gb")
    meas, pred = {}, {}
    for loss in ("reference", "chunked"):
        case = dict(method=method, grad_ckpt=True, seq_len=32, batch_size=4, loss=loss, loss_chunk=16)
        meas[loss] = bench.train_case(cfg, case, "cpu", {})["peak_allocated_bytes"]
        pred[loss] = M.train_memory(arch, method, "bf16", 32, 4, True, 16, cpu, attn_kernel="flash", round_to=1,
                                    include_workspace=False, loss=loss, loss_chunk=16)["peak_allocated_bytes"]
    BTV = 4 * 32 * 4096
    if method == "lora":                       # the loss is the reference's peak: most of 12 B*T*V goes
        assert meas["reference"] - meas["chunked"] > 9 * BTV
    assert meas["reference"] - meas["chunked"] == pytest.approx(pred["reference"] - pred["chunked"], rel=0.1)
    assert pred["chunked"] == pytest.approx(meas["chunked"], rel=0.08)
    assert pred["reference"] == pytest.approx(meas["reference"], rel=0.05)


@pytest.mark.parametrize("dtype,head_bytes", [("float32", 4), ("bfloat16", 2)])
def test_the_loss_holds_one_chunk_as_the_estimate_says(dtype, head_bytes):
    """The loss forward's own peak (live-storage tracker): grad of the hidden states + one chunk of
    (2 + 4) C*V bytes for a bf16 head (logits + fp32 copy, softmax in place), 4 C*V for an fp32 one."""
    bench = _bench()
    dt = getattr(torch, dtype)
    N, h, V, C = 256, 64, 4096, 16
    hid = torch.randn(N, h, dtype=dt, requires_grad=True)
    W = torch.randn(V, h, dtype=dt)
    y = torch.randint(0, V, (N,))
    with bench.LiveStorage() as live:
        L.linear_cross_entropy(hid, W, None, y, C)
    want = (head_bytes + 4 if head_bytes == 2 else 4) * C * V + N * h * head_bytes
    assert live.peak == pytest.approx(want, rel=0.02)
    assert live.peak < 0.1 * 12 * N * V                   # the reference's B*T*V buffers


def test_estimate_chunked_loss_term_by_hand():
    """llama-3.2-1b LoRA, B=4, T=512, checkpointing: chunk = 128 MiB / (4 V) tokens."""
    a = models.resolve("llama-3.2-1b")
    V, h, BT = a.vocab_size, a.hidden_size, 4 * 512
    C = (128 * 2 ** 20) // (4 * V)
    assert M.loss_chunk_tokens(V, BT) == C == 261
    ref = M.train_memory(a, "lora", loss="reference")
    ch = M.train_memory(a, "lora", loss="chunked")
    assert ref["peak_phase"] == "loss_backward" and ref["breakdown"]["logits_and_loss"] == 12 * BT * V
    assert "head_backward" not in ch["phases"]
    fwd = ch["phases"]["forward_end"] - ref["phases"]["forward_end"]
    # forward end: (2 + 4 + 4) B*T*V of the reference becomes grad of hidden (bf16) + a chunk's (2 + 4) C*V
    assert fwd == (BT * h * 2 + 6 * C * V) - 10 * BT * V
    assert ch["phases"]["loss_backward"] - ref["phases"]["loss_backward"] == 2 * BT * h * 2 - 12 * BT * V
    assert ch["peak_allocated_bytes"] < ref["peak_allocated_bytes"] - 2.5 * 2 ** 30
    # qlora: fp32 head -> fp32 logits only; full: the head's gradient exists from the loss on
    q = M.train_memory(a, "qlora", loss="chunked")
    assert q["phases"]["forward_end"] - M.train_memory(a, "qlora")["phases"]["forward_end"] == \
        BT * h * 4 + 4 * C * V - 8 * BT * V
    f = M.train_memory(a, "full", loss="chunked", grad_ckpt=True)
    assert "logits" not in f["peak_phase"]
    with pytest.raises(Exception, match="loss must be one of"):
        M.train_memory(a, "lora", loss="fused")


# ---- on CUDA (bench/gpu_session.sh tests) ---------------------------------------------------------

@pytest.mark.gpu
def test_cuda_bf16_chunked_loss_matches_and_saves_the_predicted_memory():
    """bf16 on CUDA: the same loss and gradients within bf16 rounding, and max_memory_allocated
    drops by what the estimate's loss term predicts (32k vocabulary, 4 x 512 tokens)."""
    peft = pytest.importorskip("peft")
    cfg = tiny_cfg(vocab=32000, hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64)

    def build():
        torch.manual_seed(0)
        with torch.device("cuda"):
            m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
        return peft.get_peft_model(m, peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (4, 512), generator=g).cuda()
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    peaks, losses = {}, {}
    for name, fn in (("reference", L.reference_loss), ("chunked", lambda m, x: L.chunked_loss(m, x))):
        model = build()
        model.train()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = fn(model, b)
        loss.backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        losses[name] = loss.item()
        del model, loss
    assert losses["chunked"] == pytest.approx(losses["reference"], rel=1e-2)
    BT, V = 4 * 512, 32000
    C = M.loss_chunk_tokens(V, BT)                       # 1048 tokens: 128 MiB of fp32 logits
    assert peaks["reference"] > 12 * BT * V                # the reference's fp32 loss buffers
    # chunked: one chunk's bf16 logits + fp32 copy (6 C V) instead of 12 B T V
    assert peaks["reference"] - peaks["chunked"] > 12 * BT * V - 6 * C * V - 64 * 2 ** 20
