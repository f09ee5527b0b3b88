"""LoRA targets per architecture: the train stage maps the llama names (q_proj ... down_proj)
to each model's own modules through the table the planner counts with, so peft adapts exactly
the parameters the estimate counts (tiny random-init phi3, opt, bloom, mixtral, qwen2/3-moe)."""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from engine import models  # noqa: E402
from engine.runs.stages.loss import chunked_loss  # noqa: E402
from engine.runs.stages.train import lora_modules  # noqa: E402

ALL = list(models.LORA_TARGETS)
COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
EXTRA = {"phi3": {}, "opt": dict(ffn_dim=64, word_embed_proj_dim=32, dropout=0.0),
         "bloom": dict(n_head=4, n_layer=2), "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
         "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
         "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                           shared_expert_intermediate_size=32),
         "llama": {}}


def tiny(mt):
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(mt, **COMMON, **EXTRA[mt])
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


@pytest.mark.parametrize("mt,want,skipped", [
    ("llama", ALL, []),
    ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], []),
    ("opt", ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], ["gate_proj"]),
    ("bloom", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], ["gate_proj"]),
    # peft does not reach mixtral's fused 3-D experts: attention only (the planner counts the same)
    ("mixtral", ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]),
    # qwen3_moe: peft wraps the fused experts (ParamWrapper; gate_up_proj at rank 2r); qwen2_moe: only
    # the attention is adapted (peft would reach its shared expert alone, not the routed experts)
    ("qwen3_moe", ALL, []),
    ("qwen2_moe", ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]),
])
def test_all_seven_map_to_the_models_own_modules_and_the_planners_count(mt, want, skipped):
    model = tiny(mt)
    names, missing = lora_modules(model, ALL)
    assert names == want and missing == skipped
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=names))
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    arch = models.arch_from_config(model.config.to_dict())
    assert trainable == models.lora_param_count(arch, 4)                         # what the estimate counts
    # and it trains: one step of the chunked loss moves the adapters
    ids = torch.randint(3, 128, (2, 12))
    loss = chunked_loss(pm, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    loss.backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad and "lora_A" in n)


def test_a_subset_and_literal_module_names():
    phi3 = tiny("phi3")
    assert lora_modules(phi3, ["q_proj", "v_proj"]) == (["qkv_proj"], [])
    assert lora_modules(phi3, ["o_proj", "gate_up_proj"]) == (["o_proj", "gate_up_proj"], [])
    from engine.errors import InputError
    with pytest.raises(InputError, match="none of the LoRA targets"):
        lora_modules(phi3, ["c_attn"])
