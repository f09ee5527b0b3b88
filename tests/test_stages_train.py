"""The train stage for real on the micro demo model (CPU, a few steps each): LoRA, full
fine-tune, QLoRA on an NF4 base, QAT with torchao fake quantization then convert. Loss must
fall, artifacts must load back, stop must save what was trained."""
import math

import pytest

from engine.runs.context import StageContext, stage_entry
from engine.runs.stages import common, run_inline
from engine.runs.stages.train import fit, lr_at
from engine.spec.run import RunSpec
from engine import strategies

TRAIN = {"steps": 8, "batch_size": 4, "seq_len": 64, "learning_rate": 5e-3, "lora_rank": 8}
EVAL = {"max_examples": 6, "prompt_len": 16, "new_tokens": 4}
PPL_ONLY = {"task_accuracy": False, "latency": False}          # keeps the other tests fast



def spec(strategy, **kw):
    base = {"model": "demo:micro-llama", "strategy": strategy, "dataset": {"demo": "tickets", "max_examples": 60},
            "train": dict(TRAIN), "evaluate": dict(EVAL), "device": "cpu"}
    for k, v in kw.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def steps_of(out):
    return [e for e in out["events"] if e["type"] == "step"]


def test_lr_schedule_by_hand():
    # warmup 2 of 10 steps at lr 1.0: 0.5, 1.0, then linear decay (10 - s) / 8
    got = [lr_at(s, 10, 1.0, 2) for s in range(10)]
    assert got[:2] == [0.5, 1.0]
    assert got[2:] == pytest.approx([(10 - s) / 8 for s in range(2, 10)])
    assert lr_at(0, 4, 0.1, 0) == pytest.approx(0.1) and lr_at(3, 4, 0.1, 0) == pytest.approx(0.025)


def test_lora_trains_saves_and_evaluates(micro_home, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out = run_inline(spec("lora"), tmp_path)
    tr, ev = out["stages"]["train#0"], out["stages"]["evaluate#1"]
    assert tr["method"] == "lora" and tr["steps"] == 8 and not tr["stopped"]
    assert tr["loss_mode"] == "chunked" and "loss_fallback" not in tr       # the default train.loss
    assert tr["loss_last"] < tr["loss_first"]
    # rank 8 on all seven projections of 2 layers: 8 * (in + out) each
    h, kv, i = 128, 64, 256
    per_layer = 8 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
    assert tr["trainable_params"] == 2 * per_layer == 32_768
    st = steps_of(out)
    assert st[0]["step"] == 1 and st[-1]["step"] == 8 and st[-1]["total"] == 8
    assert all(s["tokens_per_s"] > 0 and s["mem_bytes"] > 0 and s["lr"] > 0 for s in st)
    assert st[-1]["eta_s"] == 0
    # padded positions per second (what the planner's tokens/s counts) >= real tokens per second
    assert tr["positions_per_s"] >= tr["tokens_per_s"] > 0
    assert 0 < tr["mean_batch_len"] <= RunSpec.parse(spec("lora")).train.seq_len
    # the adapter loads back on the base
    base = AutoModelForCausalLM.from_pretrained(out["state"]["base_dir"])
    model = PeftModel.from_pretrained(base, tr["adapter_dir"])
    assert model.peft_config["default"].r == 8 and model.peft_config["default"].lora_alpha == 16
    assert set(model.peft_config["default"].target_modules) == set(RunSpec.parse(spec("lora")).train.lora_targets)
    # evaluation before and after, on the same held-out rows
    b, a = ev["before"], ev["after"]
    assert b["scored_tokens"] == a["scored_tokens"] > 0
    assert a["perplexity"] < b["perplexity"]                    # tuned on this task's answers
    assert ev["compare"]["perplexity_ratio"] == pytest.approx(a["perplexity"] / b["perplexity"], rel=1e-3)
    for m in (a, b):
        assert 0 <= m["accuracy"] <= 1 and m["generated"] == 6
        assert m["prefill_ms"] > 0 and m["decode_tokens_per_s"] > 0 and m["peak_mem_bytes"] > 0
    assert a["size_on_disk_bytes"] == b["size_on_disk_bytes"] + a["adapter_bytes"]
    names = {e["name"] for e in out["events"] if e["type"] == "metric"}
    assert {"before.perplexity", "after.perplexity", "train.loss_last", "compare.perplexity_ratio"} <= names


def test_qlora_on_nf4_base(micro_home, tmp_path):
    out = run_inline(spec("qlora", train={"grad_ckpt": False}, evaluate={**PPL_ONLY, "before_and_after": False}),
                     tmp_path)
    q, tr = out["stages"]["quantize#0"], out["stages"]["train#1"]
    assert q["quant"]["method"] == "nf4" and q["quant"]["double_quant"]
    assert q["size_on_disk_bytes"] < 0.6 * q["source_size_on_disk_bytes"]
    assert tr["method"] == "qlora" and tr["loss_last"] < tr["loss_first"]
    assert out["state"]["adapter_base"]["quant"]["method"] == "nf4"
    after = out["stages"]["evaluate#2"]["after"]
    assert "nf4" in after["model"] and "adapter" in after["model"] and math.isfinite(after["perplexity"])


def test_qlora_backpropagates_through_the_4bit_base_after_an_eval_forward(micro_home, tmp_path):
    """The QLoRA model the train stage builds must pass gradients through its NF4 matmuls even
    after the chunked loss's check (an eval-mode forward without grad): on an AVX512-BF16 CPU
    bitsandbytes then repacked the weights into an inference layout whose matmul (gemv_4bit) has
    no autograd formula, the gradient reached the adapters only through their own branches and the
    residual stream, and QLoRA on the real demo model gave the same losses at any learning rate.
    The adapters' gradients must equal those of the same model that never ran in eval mode."""
    import torch
    from engine.runs.stages.train import _qlora_model, seed_everything
    from engine.runs.stages.loss import chunked_loss, make_loss
    rs = RunSpec.parse(spec("qlora", train={"grad_ckpt": False}))
    strat = strategies.get("qlora")
    ctx = StageContext(run_id="t", spec=rs, strategy=strat, stage={"stage": "train", "method": "qlora"}, index=1,
                       workdir=tmp_path, state={}, device="cpu", emit=lambda type, **p: None)
    tok = common.load_tokenizer(common.base_model(ctx))
    ds = common.dataset(ctx)
    batch = common.collate(common.encode_all(tok, ds.train[:4], 64), tok.pad_token_id, "cpu")

    def built():
        seed_everything(0)
        return _qlora_model(ctx)

    def grads(model):
        model.train()
        chunked_loss(model, batch).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    ref = grads(built())                                     # never evaluated: bitsandbytes' autograd path
    model = built()
    _, mode, why = make_loss(model, "chunked", None, batch)  # the check runs the model in eval mode
    assert mode == "chunked" and why is None
    got = grads(model)
    assert got.keys() == ref.keys() and len(got) == 2 * 2 * 7          # A and B of 7 projections x 2 layers
    first_b = [n for n in got if ".layers.0." in n and "lora_B" in n]
    assert first_b and all(float(ref[n].abs().max()) > 0 for n in first_b)
    for n in got:
        assert torch.allclose(got[n], ref[n], rtol=1e-3, atol=1e-6), n


def test_full_finetune_then_int8(micro_home, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    out = run_inline(spec("full-then-int8", train={"steps": 6, "learning_rate": 2e-3}, evaluate=PPL_ONLY), tmp_path)
    tr = out["stages"]["train#0"]
    assert tr["trainable_params"] == tr["params"] == 426_624
    assert tr["loss_last"] < tr["loss_first"]
    m = AutoModelForCausalLM.from_pretrained(out["stages"]["quantize#1"]["model_dir"])
    assert isinstance(m.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    assert out["stages"]["evaluate#2"]["after"]["perplexity"] < out["stages"]["evaluate#2"]["before"]["perplexity"]


@pytest.mark.parametrize("precision,weights,autocast", [("fp32-amp", "float32", "bfloat16"),
                                                          ("bf16", "bfloat16", None)])
def test_full_finetune_precision_on_a_cpu_with_fast_bf16(micro_home, tmp_path, monkeypatch, precision, weights,
                                                         autocast):
    # fp32-amp keeps fp32 master weights under bf16 autocast on such a CPU too (it silently trained in
    # pure bf16 there, where small updates are lost); bf16 is the recipe's bf16 weights and states
    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: True)
    out = run_inline(spec("full-finetune", train={"steps": 2, "precision": precision},
                          evaluate={**PPL_ONLY, "before_and_after": False}), tmp_path)
    tr = out["stages"]["train#0"]
    assert (tr["weights_dtype"], tr["autocast"]) == (weights, autocast)
    assert all(math.isfinite(x) for x in tr["losses"])


def test_qat_prepare_train_convert(micro_home, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    out = run_inline(spec("qat-int8", train={"steps": 6, "learning_rate": 2e-3}, evaluate=PPL_ONLY), tmp_path)
    tr, cv = out["stages"]["train#0"], out["stages"]["convert#1"]
    assert tr["loss_last"] < tr["loss_first"]
    assert "Int8DynamicActivationIntxWeightConfig" in tr["qat"] and cv["quant"]["group_size"] == 32
    m = AutoModelForCausalLM.from_pretrained(cv["model_dir"])
    w = m.model.layers[1].self_attn.o_proj.weight
    assert type(w).__name__ == "IntxUnpackedToInt8Tensor"
    assert int(w.qdata.min()) >= -8 and int(w.qdata.max()) <= 7      # int4 values in int8 storage
    assert isinstance(m.lm_head.weight, torch.nn.Parameter) and type(m.lm_head.weight.data).__name__ == "Tensor"
    ev = out["stages"]["evaluate#2"]
    assert ev["after"]["perplexity"] < ev["before"]["perplexity"]


def test_stop_saves_what_was_trained(micro_home, tmp_path):
    rs = RunSpec.parse(spec("lora", train={"steps": 50}))
    strat = strategies.get("lora")
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] > 3
    events = []
    ctx = StageContext(run_id="t", spec=rs, strategy=strat, stage=stage_entry(strat, 0, rs), index=0,
                       workdir=tmp_path, state={}, device="cpu",
                       emit=lambda type, **p: events.append((type, p)), should_stop=should_stop)
    from engine.runs.stages import STAGES
    res = STAGES["train"](ctx)
    assert res["stopped"] and res["steps"] == 3 and res["total_steps"] == 50
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert any(t == "warning" and "stopped after 3 of 50" in p["message"] for t, p in events)


def test_encoding_masks_prompt_and_keeps_answer(micro_home):
    from engine.runs import demo
    from engine.runs.data import Example
    tok = common.load_tokenizer(str(demo.model_dir("micro-llama")))
    ex = Example(prompt="### Text:\nrefund me\n\n### Label:\n", completion="billing")
    [(ids, labels)] = common.encode_example(tok, ex, 64)
    p = tok(ex.prompt)["input_ids"]
    c = tok(ex.completion, add_special_tokens=False)["input_ids"]
    assert ids == p + c + [tok.eos_token_id]
    assert labels == [-100] * len(p) + c + [tok.eos_token_id]
    # too long: the prompt is cut from the left (BOS kept), the answer stays whole
    [(ids2, labels2)] = common.encode_example(tok, ex, len(c) + 4)
    assert len(ids2) == len(c) + 4 and ids2[0] == tok.bos_token_id and ids2[-len(c) - 1:] == c + [tok.eos_token_id]
    # plain text longer than the window: consecutive windows, every token but BOS scored
    long = Example(prompt="", completion="word " * 100)
    pairs = common.encode_example(tok, long, 32)
    n = len(tok("word " * 100)["input_ids"]) + 1
    assert sum(len(i) for i, _ in pairs) == n and all(len(i) <= 32 for i, _ in pairs)
    assert pairs[0][1][0] == -100 and pairs[1][1] == pairs[1][0]


def test_fit_needs_trainable_parameters():
    import torch
    from engine.errors import InputError
    m = torch.nn.Linear(2, 2)
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(InputError, match="no trainable parameters"):
        fit(m, iter([]), steps=1, lr=1e-3)


def test_chunked_and_reference_loss_train_the_same(micro_home, tmp_path, monkeypatch):
    """Through the stage: the default chunked loss and the recipe's loss give the same loss curve;
    where the chunked loss cannot apply the stage warns and trains with the reference."""
    from engine.runs.stages import loss as L
    kw = dict(train={"steps": 3, "grad_ckpt": False}, evaluate={**PPL_ONLY, "before_and_after": False})
    a = run_inline(spec("lora", **kw), tmp_path / "a")["stages"]["train#0"]
    b = run_inline(spec("lora", train={**kw["train"], "loss": "reference"}, evaluate=kw["evaluate"]),
                   tmp_path / "b")["stages"]["train#0"]
    assert a["loss_mode"] == "chunked" and b["loss_mode"] == "reference"
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-4)
    monkeypatch.setattr(L, "why_not_chunked", lambda model: "the model modifies its logits (test)")
    out = run_inline(spec("lora", **kw), tmp_path / "c")
    c = out["stages"]["train#0"]
    assert c["loss_mode"] == "reference" and c["loss_fallback"] == "the model modifies its logits (test)"
    assert any(e["type"] == "warning" and "chunked loss not used" in e["message"] for e in out["events"])
    assert c["losses"] == pytest.approx(b["losses"], rel=1e-4)


# ---- the configurations the advisor's search picks: accumulation, 8-bit / paged AdamW, packing -------

def test_grad_accumulation_and_8bit_paged_adamw_train(micro_home, tmp_path, monkeypatch):
    """Micro-batch 1 x 4 accumulation with bitsandbytes' paged 8-bit AdamW: the run really uses
    them (uint8 states for every tensor of >= 4096 values, as bitsandbytes quantizes them), and the
    loss falls. A full fine-tune, so the micro model has tensors that large."""
    import bitsandbytes as bnb
    import torch
    import importlib
    loop = importlib.import_module("engine.runs.stages.loop")
    seen = {}
    real = loop.make_optimizer

    def spy(name, params, lr, weight_decay=0.0):
        seen["opt"] = real(name, params, lr, weight_decay)
        return seen["opt"]

    monkeypatch.setattr(loop, "make_optimizer", spy)
    out = run_inline(spec("full-finetune", train={"batch_size": 1, "grad_accum": 4, "optimizer": "paged-adamw-8bit",
                                                  "steps": 6},
                          evaluate={**PPL_ONLY, "before_and_after": False}), tmp_path)
    tr = out["stages"]["train#0"]
    assert tr["optimizer"] == "paged-adamw-8bit" and tr["grad_accum"] == 4 and tr["micro_batch"] == 1
    assert tr["loss_last"] < tr["loss_first"]
    opt = seen["opt"]
    assert isinstance(opt, bnb.optim.PagedAdamW8bit)
    big = [p for p in opt.state if p.numel() >= 4096]
    assert big and all(opt.state[p]["state1"].dtype == torch.uint8 for p in big)
    assert any("optimizer paged-adamw-8bit" in e.get("message", "") for e in out["events"] if e["type"] == "log")


def test_accumulation_gives_the_gradient_of_the_full_batch(micro_home, monkeypatch):
    """accum x micro-batch = one batch: the same gradient, so the same update (plain SGD here, so
    the parameters show the gradient itself)."""
    import copy
    import importlib
    import torch
    loop = importlib.import_module("engine.runs.stages.loop")
    monkeypatch.setattr(loop, "make_optimizer", lambda name, params, lr, weight_decay=0.0:
                        torch.optim.SGD(params, lr=lr))
    from engine.runs import demo
    from transformers import AutoModelForCausalLM
    fit = loop.fit
    path = demo.ensure_model("micro-llama")
    torch.manual_seed(0)
    m1 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m2 = copy.deepcopy(m1)
    ids = torch.randint(0, m1.config.vocab_size, (4, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    halves = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(4)]
    fit(m1, iter([batch]), steps=1, lr=1e-2, accum=1, max_grad_norm=0)
    fit(m2, iter(halves), steps=1, lr=1e-2, accum=4, max_grad_norm=0)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_packing_keeps_each_example_to_itself(micro_home, tmp_path):
    """Packed sequences: positions restart per example and the loss of a packed batch equals the
    token-weighted loss of its examples run one by one (no attention across examples), with SDPA
    (boolean mask) and eager attention (additive mask)."""
    import torch
    from engine.runs.stages import common as C
    from transformers import AutoModelForCausalLM
    pairs = [([5, 6, 7, 8], [-100, 6, 7, 8]), ([9, 10, 11], [-100, 10, 11]), ([12, 13, 14, 15, 16], [-100] * 2 + [14, 15, 16])]
    packed = C.pack(pairs, 9)
    assert [len(p[0]) for p in packed] == [9, 3]
    assert packed[0][2] == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    out = run_inline(spec("lora", train={"packing": True, "steps": 4, "seq_len": 256},
                          evaluate={**PPL_ONLY, "before_and_after": False}), tmp_path)
    tr = out["stages"]["train#0"]
    assert tr["packing"] and tr["packed_sequences"] < tr["packed_examples"]
    assert tr["loss_mode"] == "chunked" and "loss_fallback" not in tr         # the 4-D mask reaches both losses
    assert tr["loss_last"] < tr["loss_first"]
    for impl in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(out["state"]["base_dir"], dtype=torch.float32,
                                                     attn_implementation=impl).eval()
        with torch.no_grad():
            b = C.collate(packed[:1], 0, "cpu", additive_mask=impl == "eager")
            b.pop("_tokens")
            together = float(model(**b).loss)
            sep, n = 0.0, 0
            for ids, labels in (pairs[2], pairs[0]):                  # the first packed sequence
                x = torch.tensor([ids])
                y = torch.tensor([labels])
                k = int((y[:, 1:] != -100).sum())
                sep += float(model(input_ids=x, labels=y).loss) * k
                n += k
        assert together == pytest.approx(sep / n, rel=1e-4), impl
