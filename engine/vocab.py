"""The shared vocabulary: names every layer uses, defined once.

Training methods, precisions, QAT schemes, loss modes, LoRA target sets, strategy families and
model families, the stages a pipeline may have. The quantization methods and weight formats are
registries of their own (engine/quant.py, engine/estimate/formats.py); the byte units are
engine/fmt.py. Plain data: importing this loads nothing.
"""
from __future__ import annotations

# training methods (estimate train --method, a strategy's `train:`, the train stage's method)
TRAIN_METHODS = ("full", "lora", "qlora", "qat")
# what the train stage runs in several processes under FSDP (run spec resources: processes / gpus)
# (QLoRA: the 4-bit base replicated per rank, the rest sharded; QAT: fake-quantized linears sharded like any linear;
# QAT + LoRA is not: its end-of-training merge needs the whole model in one process)
MULTI_PROCESS_METHODS = ("full", "lora", "qlora", "qat")
# what a strategy's accuracy request says its weights were fine-tuned with (estimate accuracy --finetune)
FINETUNES = ("none", *TRAIN_METHODS)
# what the training estimate models (the reference recipe: bf16 weights and states, or fp32 weights
# under bf16 autocast) and what a run config may ask for (fp32: a CPU without fast bf16; estimated as fp32-amp)
PRECISIONS = ("bf16", "fp32-amp")
RUN_PRECISIONS = (*PRECISIONS, "fp32")

# QAT schemes of torchao (the train stage's `scheme`): what each fake-quantizes, its default group
# size, and the weights format `convert` turns the model into
QAT_SCHEMES = {
    "int4-weight-only": {"group_size": 128, "format": "torchao-int4", "act_bits": 16,
                         "what": "int4 weights (groups), activations in 16-bit"},
    "int8-dyn-act-int4-weight": {"group_size": 32, "format": "w4a8", "act_bits": 8,
                                 "what": "int4 weights (groups) and int8 dynamic per-token activations (8da4w)"},
}
DEFAULT_QAT_SCHEME = "int4-weight-only"

# the loss of a training step: reference = model(**batch).loss (DESIGN.md's recipe, full fp32 logits);
# chunked = the engine's linear cross-entropy over chunks of tokens (same loss and gradients)
LOSS_MODES = ("reference", "chunked")
DEFAULT_RUN_LOSS = "chunked"        # what a run uses unless its config says otherwise

# the optimizer of a training step: torch AdamW (the recipe), bitsandbytes AdamW8bit (blockwise 8-bit
# states), PagedAdamW8bit / PagedAdamW (states in unified memory that page to the host under pressure)
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit", "paged-adamw")
OPTIMIZER_NAMES = {"adamw": "AdamW", "adamw-8bit": "8-bit AdamW", "paged-adamw-8bit": "paged 8-bit AdamW",
                   "paged-adamw": "paged AdamW"}

# LoRA targets by their llama names; each architecture maps them onto its own modules
# (engine.models.lora_modules: phi3 qkv_proj/gate_up_proj, opt fc1/fc2, bloom query_key_value ...)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_TARGETS = LORA_TARGETS[:4]

# the families of the strategy catalog (DESIGN.md "Strategies"), not to be confused with model families
STRATEGY_FAMILIES = ("ptq-only", "finetune-then-quantize", "quantize-then-finetune", "joint-qat",
                     "finetune-only", "no-change")
# model families (presets/models, the accuracy model's rows)
MODEL_FAMILIES = ("llama-1", "llama-2", "llama-3", "mistral", "mixtral", "qwen2", "qwen3",
                  "gemma", "phi", "opt", "bloom")
# the stages a strategy's pipeline is made of (engine/runs/stages registers one function each)
STAGES = ("train", "merge", "quantize", "convert", "export", "evaluate")
