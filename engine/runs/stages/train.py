"""The train stage: full fine-tune, LoRA, QLoRA (NF4 or a GPTQ base; QA-LoRA group-aligned
adapters where peft allows), and QAT (torchao fake quantization, optionally with LoRA).

One plain training loop for all of them (``fit``, engine/runs/stages/loop.py): torch AdamW, loss from ``labels``,
gradient accumulation, gradient clipping, linear warmup then linear decay, and a step event
with loss, learning rate, tokens/s, memory and ETA.

The recipe follows DESIGN.md: LoRA rank r, alpha 2r, dropout 0 on all seven projections
(those the model has); QLoRA = NF4 with double quantization, ``prepare_model_for_kbit_training``,
same adapters; non-reentrant gradient checkpointing when asked; full fine-tune with bf16
weights and optimizer states (``precision: bf16``) or fp32 weights under bf16 autocast
(``fp32-amp``). On a CPU without fast bf16 everything computes in fp32 (a warning says so).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from pathlib import Path

from engine.errors import InputError
from engine.vocab import DEFAULT_QAT_SCHEME, QAT_SCHEMES, TRAIN_METHODS
from engine.runs.context import NonFiniteLoss
from engine.runs.stages import common
from engine.runs.stages.loop import fit, lr_at, seed_everything  # noqa: F401  (lr_at: the schedule fit follows)
from engine.runs.stages.loss import make_loss

EMIT_EVERY_S = 0.5          # step events: every step, but at most two a second (plus the last)


# ---- models for each method ---------------------------------------------------------------------
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "query_key_value": ("q_proj", "k_proj", "v_proj"),
         "gate_up_proj": ("gate_proj", "up_proj")}


def lora_modules(model, wanted: list[str]) -> tuple[list[str], list[str]]:
    """(peft target_modules, wanted names not in this model). Names among the llama seven
    (q_proj ... down_proj) map to this architecture's own modules through the table the
    planner counts with (engine.models.lora_modules over ModelArch.linears); any
    other name is taken as a module name as given."""
    from engine import models
    cfg = getattr(model, "config", None)
    try:
        arch = models.arch_from_config(cfg.to_dict())
    except Exception:                                   # noqa: BLE001 - a config the planner cannot read
        arch = None
    canonical = [t for t in wanted if t in models.LORA_TARGETS]
    names = [t for t in wanted if t not in models.LORA_TARGETS]
    if arch is not None and canonical:
        names = models.lora_modules(arch, canonical) + names
    else:
        names = canonical + names
    wrapped = arch is not None and arch.model_type in models.PEFT_PARAM_WRAPPED   # peft maps expert params itself
    leaf = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    found = [n for n in names if n in leaf or (wrapped and n in ("gate_proj", "up_proj", "down_proj"))]
    if not found:
        common.present_targets(model, names)             # raises, naming the model's modules
    covered = set(found) | {lin.lora_target for lin in (arch.linears if arch else ())
                            if lin.name.rsplit(".", 1)[-1] in found}
    for n in found:                                     # fused projections stand for several targets
        covered |= set(FUSED.get(n, ()))
    return found, [t for t in wanted if t not in covered and t not in found]


def lora_config(ctx, model, **extra):
    from peft import LoraConfig
    tp = ctx.spec.train
    targets, missing = lora_modules(model, tp.lora_targets)
    if missing:
        ctx.log(f"LoRA targets not in this model, skipped: {', '.join(missing)}")
    if sorted(targets) != sorted(t for t in tp.lora_targets if t in targets):
        ctx.log(f"LoRA on {', '.join(targets)} (this model's names for {', '.join(tp.lora_targets)})")
    return LoraConfig(r=tp.lora_rank, lora_alpha=tp.lora_alpha or 2 * tp.lora_rank, lora_dropout=tp.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM", **extra)


def _full_model(ctx):
    import torch
    if ctx.state.get("quant"):
        raise InputError(f"a full fine-tune needs a 16-bit model, but the model at this stage is quantized "
                         f"({ctx.state['quant'].get('method')}); train before quantizing, or use qlora",
                         field="strategy")
    dtype = common.compute_dtype(ctx)
    autocast = None
    # fp32-amp: fp32 master weights, 16-bit math under autocast, on a GPU and on a CPU with fast bf16
    # alike (where the CPU computes in fp32 anyway there is nothing to autocast). Plain bf16 keeps the
    # weights and AdamW states in bf16, the reference recipe: an update below half a bf16 step is lost.
    if ctx.spec.train.precision == "fp32-amp" and dtype != torch.float32:
        autocast, dtype = dtype, torch.float32
    model = common.load_model(ctx, common.current_model(ctx), dtype=dtype)
    return model, autocast


def _lora_model(ctx):
    from peft import get_peft_model
    if ctx.state.get("quant"):
        return _qlora_model(ctx)
    model = common.load_model(ctx, common.current_model(ctx))
    if ctx.spec.train.grad_ckpt:
        common.checkpointing(model)
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(ctx, model))
    ctx.state["adapter_base"] = {"dir": common.current_model(ctx), "quant": None}
    return model


def nf4_config(ctx, method: str = "nf4", double_quant: bool = True):
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=common.compute_dtype(ctx))


def _gptq_weights(q: dict) -> bool:
    """Whether a quantized base holds GPTQ-layout weights (what peft's QA-LoRA pools groups of)."""
    from engine import quant
    from engine.estimate import formats
    try:
        m = quant.get(q.get("method"))
    except Exception:                                   # noqa: BLE001 - a base the registry does not know
        return False
    return formats.get(m.format_for(q.get("bits"))).kind == "gptq"


def _qlora_model(ctx):
    from peft import get_peft_model, prepare_model_for_kbit_training
    quant = ctx.state.get("quant")
    path = common.current_model(ctx)
    if quant:
        ctx.log(f"adapters on the {quant['method']} model of the previous stage ({path})")
        model = common.load_model(ctx, path, quant=quant)
        base = {"dir": path, "quant": quant}
    else:                                            # the reference recipe: quantize to NF4 while loading
        ctx.log("no quantized model yet: loading the 16-bit model as NF4 (double quantization) for QLoRA")
        model = common.load_model(ctx, path, quantization_config=nf4_config(ctx))
        base = {"dir": path, "quant": {"library": "bitsandbytes", "method": "nf4", "bits": 4,
                                       "double_quant": True, "on_load": True}}
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ctx.spec.train.grad_ckpt,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    extra = {}
    if ctx.stage.get("group_aligned"):
        if _gptq_weights(base["quant"]) and base["quant"].get("group_size", -1) > 0:
            extra = {"use_qalora": True, "qalora_group_size": base["quant"]["group_size"]}
            ctx.log(f"QA-LoRA: adapter inputs pooled per quantization group of {base['quant']['group_size']} "
                    "(peft use_qalora)")
            ctx.warn("QA-LoRA: peft trains group-pooled adapters on the GPTQ base but cannot merge them into the "
                     "int4 zero points (its QA-LoRA merge is not implemented for GPTQ layers); the served model "
                     "is the GPTQ checkpoint plus the adapter")
        else:
            ctx.warn(f"group-aligned (QA-LoRA) adapters need a GPTQ base with a group size; the base here is "
                     f"{base['quant'].get('method')}: trained plain LoRA adapters instead")
    model = get_peft_model(model, lora_config(ctx, model, **extra))
    trainable_4bit(model)
    ctx.state["adapter_base"] = base
    return model


def trainable_4bit(model) -> int:
    """Keep a bitsandbytes 4-bit base differentiable; returns how many layers were unpacked.

    On a CPU with AVX512-BF16, bitsandbytes (0.49+) repacks a Linear4bit's weight into an
    inference layout the first time the layer runs in eval mode on an input without grad (the
    chunked loss's check against the reference does exactly that), and from then on computes the
    layer with ``gemv_4bit``, which has no autograd formula: the gradient stops at every 4-bit
    matmul and only the adapters' own branches and the residual stream carry it, so QLoRA barely
    learns (same losses at any learning rate). A model that trains turns the repacking off and
    undoes any that happened (the served/evaluated model still gets it)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    from bitsandbytes.nn import Linear4bit
    n = 0
    for mod in model.modules():
        if not isinstance(mod, Linear4bit):
            continue
        mod.support_avx512bf16_for_cpu = False
        w = mod.weight
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
            n += 1
    return n


# ---- QAT (the schemes: engine.vocab.QAT_SCHEMES) ----------------------------------------------------


def torchao_config(scheme: str, group_size: int, device: str, bits: int = 4):
    """(QAT prepare config, convert config, what it is, a note when the CPU changes the target).

    int8-dyn-act-int4-weight: Int8DynamicActivationIntxWeightConfig(int4, PerGroup), CPU and GPU
    alike (torchao infers the int8 per-token activation and int4 group weight fake quantizers).
    int4-weight-only: on a GPU Int4WeightOnlyConfig (torchao's int4 fake quantizer while training;
    converted to the tile-packed tinygemm layout that torch's CUDA kernel serves); on the CPU
    torchao has no int4 weight-only kernel, so IntxWeightOnlyConfig(int4, PerGroup) stands in."""
    import torch
    from torchao.quantization import (Int4WeightOnlyConfig, Int8DynamicActivationIntxWeightConfig,
                                      IntxWeightOnlyConfig, PerGroup)
    from torchao.quantization.qat import QATConfig
    wdtype = getattr(torch, f"int{bits}")
    if scheme == "int8-dyn-act-int4-weight":
        base = Int8DynamicActivationIntxWeightConfig(weight_dtype=wdtype, weight_granularity=PerGroup(group_size))
        return (QATConfig(base, step="prepare"), QATConfig(base, step="convert"),
                f"torchao Int8DynamicActivationIntxWeightConfig(int{bits} weights, group {group_size}; "
                "int8 per-token activations)", None)
    if scheme == "int4-weight-only":
        if device == "cuda" and bits == 4:
            from torchao.quantization.quantize_.workflows import Int4PackingFormat
            served = Int4WeightOnlyConfig(group_size=group_size, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)
            return (QATConfig(Int4WeightOnlyConfig(group_size=group_size), step="prepare"),
                    QATConfig(served, step="convert"),
                    f"torchao Int4WeightOnlyConfig(group {group_size}, tile-packed for tinygemm)", None)
        base = IntxWeightOnlyConfig(weight_dtype=wdtype, granularity=PerGroup(group_size))
        return (QATConfig(base, step="prepare"), QATConfig(base, step="convert"),
                f"torchao IntxWeightOnlyConfig(int{bits}, group {group_size})",
                f"torchao's int4 weight-only kernels need a GPU: on the CPU the QAT target is IntxWeightOnlyConfig"
                f"(int{bits}, group {group_size}) - int{bits} grouped weights served by torchao's portable kernel")
    raise InputError(f"unknown QAT scheme {scheme!r}; known: {', '.join(QAT_SCHEMES)}", field="strategy")


def not_lm_head(module, fqn: str) -> bool:
    """Which modules torchao quantizes: every Linear but the output head (kept 16-bit, as the
    transformers TorchAoConfig loader does)."""
    import torch
    return isinstance(module, torch.nn.Linear) and not fqn.endswith("lm_head") and "lora_" not in fqn


def qat_prepare(model, scheme: str, group_size: int, device: str):
    from torchao.quantization import quantize_
    prepare, _, what, cpu_note = torchao_config(scheme, group_size, device)
    quantize_(model, prepare, filter_fn=not_lm_head)
    return what, cpu_note


def check_group(model, group_size: int, what: str) -> None:
    bad = {n: k for n, k in common.linear_in_features(model).items() if group_size > 0 and k % group_size}
    if bad:
        raise InputError(f"{what}: group size {group_size} does not divide the input size of "
                         + ", ".join(f"{n} ({k})" for n, k in bad.items()) + "; pick a group size that divides "
                         "them (e.g. 32 or 64)", field="quantize.group_size")


def _qat_model(ctx):
    from peft import get_peft_model
    st = ctx.stage
    scheme = st.get("scheme", DEFAULT_QAT_SCHEME)
    gs = int(st.get("group_size") or QAT_SCHEMES.get(scheme, {}).get("group_size", 32))
    path = common.current_model(ctx)
    if ctx.state.get("quant"):
        raise InputError("QAT trains a 16-bit model with fake quantization; the model at this stage is already "
                         "quantized", field="strategy")
    if (Path(path) / "config.json").is_file():
        check_group(path, gs, "QAT")
    model = common.load_model(ctx, path)
    what, cpu_note = qat_prepare(model, scheme, gs, ctx.device)
    if cpu_note:
        ctx.warn(cpu_note)
    ctx.log(f"QAT: fake quantization {what} on every linear but lm_head (straight-through gradients)")
    if st.get("lora"):
        model = get_peft_model(model, lora_config(ctx, model))
        ctx.warn("QAT + LoRA: adapters train on the frozen fake-quantized base (torchao quantizes W, not W + BA, "
                 "during training); at the end they are merged and the merged weights are quantized by convert")
    elif ctx.spec.train.grad_ckpt:
        common.checkpointing(model)
    ctx.state["qat"] = {"scheme": scheme, "group_size": gs, "what": what, "lora": bool(st.get("lora"))}
    return model


# ---- the stage ----------------------------------------------------------------------------------------
def train(ctx) -> dict:
    dist = ctx.state.get("_dist")          # set in each rank of a multi-process run (stages/fsdp.py)
    if ctx.spec.world_size > 1 and dist is None:
        from engine.runs import distributed   # this is the worker: start the ranks and supervise them
        common.base_model(ctx)                # a demo model is built here, once, not by N ranks at a time
        return distributed.supervise(ctx)
    import torch
    method = ctx.stage.get("method", "lora")
    tp = ctx.spec.train
    world, rank = (dist["world"], dist["rank"]) if dist else (1, 0)
    common.base_model(ctx)
    ds = common.dataset(ctx)
    seed_everything(ctx.spec.seed)
    common.quiet_libraries()
    tok = common.load_tokenizer(ctx.state["tokenizer_dir"])
    autocast = None
    if method == "full":
        model, autocast = _full_model(ctx)
        if tp.grad_ckpt:
            common.checkpointing(model)
    elif method == "lora":
        model = _lora_model(ctx)
    elif method == "qlora":
        model = _qlora_model(ctx)
    elif method == "qat":
        model = _qat_model(ctx)
    else:
        raise InputError(f"unknown training method {method!r}; known: {', '.join(TRAIN_METHODS)}", field="strategy")
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    pairs = common.encode_all(tok, ds.train, tp.seq_len)
    n_examples = len(pairs)
    if tp.packing:
        pairs = common.pack(pairs, tp.seq_len)
        ctx.log(f"packing: {n_examples} examples in {len(pairs)} sequences of <= {tp.seq_len} tokens")
    steps = tp.steps or max(1, math.ceil(tp.epochs * len(pairs) / (tp.batch_size * tp.grad_accum * world)))
    ctx.log(f"train {method}: {n_train:,} trainable of {n_all:,} parameters; {steps} steps of "
            f"{tp.batch_size}x{tp.grad_accum} sequences{f' x {world} processes' if dist else ''} "
            f"(<= {tp.seq_len} tokens), lr {tp.learning_rate:g}, "
            f"optimizer {tp.optimizer}, {'gradient checkpointing, ' if tp.grad_ckpt else ''}device {ctx.device}")
    ck, resumed = checkpointer(ctx, method, world, steps)
    sync = None
    if dist:
        from engine.runs.stages import fsdp
        model = fsdp.shard(ctx, model)
        sync = fsdp.sync
    last = [0.0]

    def on_step(s):
        if not math.isfinite(s["loss"]):           # every step, not only the ones emitted
            raise NonFiniteLoss.at(s["step"], s["loss"])
        now = time.perf_counter()
        if s["step"] in (1, s["total"]) or now - last[0] >= EMIT_EVERY_S:
            last[0] = now
            ctx.emit("step", **s)

    base_cfg = getattr(model.get_base_model() if hasattr(model, "get_base_model") else model, "config", None)
    additive = getattr(base_cfg, "_attn_implementation", "sdpa") == "eager"    # eager adds the mask to the scores
    it = common.batches(pairs, tp.batch_size, ctx.spec.seed, tok.pad_token_id, ctx.device, additive)
    if resumed:    # the micro-batches the checkpoint's steps consumed, of every rank: the stream goes on after them
        it = itertools.islice(it, resumed["step"] * resumed["sequences_per_step"] // tp.batch_size, None)
    if dist:       # every rank walks the same shuffled stream and takes every world-th micro-batch: one step
        it = itertools.islice(it, rank, None, world)    # sees the world x accum micro-batches one process would
    first = next(it)
    loss_mode_asked = tp.loss
    if dist and tp.loss == "chunked":
        loss_mode_asked = "reference"
        ctx.log("loss: the reference loss (the chunked loss reads the output head's weight outside its forward, "
                "where FSDP keeps it sharded)")
    with (torch.autocast(device_type="cuda" if ctx.device == "cuda" else "cpu", dtype=autocast)
          if autocast is not None else contextlib.nullcontext()):
        loss_fn, loss_mode, loss_why = make_loss(model, loss_mode_asked, tp.loss_chunk_tokens,
                                                 {k: v for k, v in first.items() if not k.startswith("_")},
                                                 log=ctx.log, warn=ctx.warn)
    it = itertools.chain([first], it)
    hist = fit(model, it, steps=steps, lr=tp.learning_rate, warmup=tp.warmup_steps, accum=tp.grad_accum,
               max_grad_norm=tp.max_grad_norm, on_step=on_step, should_stop=ctx.should_stop,
               autocast_dtype=autocast, device=ctx.device, mem_fn=lambda: common.mem_now(ctx.device), loss_fn=loss_fn,
               optimizer=tp.optimizer, sync=sync, checkpoint=ck)
    model.eval()
    # what the optimizer stepped (saving below casts a full fine-tune back to the base's dtype)
    weights_dtype = str(next(p for p in model.parameters() if p.requires_grad).dtype).replace("torch.", "")
    if hist["stopped"]:
        ctx.warn(f"stopped after {hist['steps']} of {steps} steps; saving what was trained")
    out = fsdp.save(ctx, method, model, tok, _save) if dist else _save(ctx, method, model, tok)
    k = max(1, min(5, len(hist["losses"]) // 4))
    res = {"method": method, "steps": hist["steps"], "total_steps": steps, "stopped": hist["stopped"],
           "optimizer": tp.optimizer, "grad_accum": tp.grad_accum, "micro_batch": tp.batch_size,
           "grad_ckpt": tp.grad_ckpt, "packing": tp.packing,
           **({"packed_examples": n_examples, "packed_sequences": len(pairs)} if tp.packing else {}),
           "trainable_params": n_train, "params": n_all,
           "weights_dtype": weights_dtype,
           "autocast": str(autocast).replace("torch.", "") if autocast is not None else None, "tokens": hist["tokens"], "loss_mode": loss_mode,
           **({"loss_fallback": loss_why} if loss_why else {}),
           "tokens_per_s": hist["tokens_per_s"], "train_s": hist["wall_s"],
           "positions_per_s": hist["positions_per_s"],
           "mean_batch_len": round(hist["positions"] / max(1, hist["steps"] * tp.grad_accum * tp.batch_size), 1),
           "loss_first": _mean(hist["losses"][:k]), "loss_last": _mean(hist["losses"][-k:]),
           "losses": [round(x, 4) for x in hist["losses"]], **out}
    if ck is not None:
        res["checkpoints"] = ck.saved
        if resumed:
            res["resumed_from"] = {"path": str(ck.resume), "step": resumed["step"],
                                   "processes": resumed.get("processes", 1)}
    for name in ("loss_first", "loss_last"):
        if res[name] is not None:
            ctx.emit("metric", name=f"train.{name}", value=res[name], unit="nats/token")
    if res["tokens_per_s"]:
        ctx.emit("metric", name="train.tokens_per_s", value=res["tokens_per_s"], unit="tokens/s")
    del model
    if ctx.device == "cuda":
        torch.cuda.empty_cache()
    return res


def checkpointer(ctx, method: str, world: int, steps: int):
    """(Checkpointer or None, the resume checkpoint's trainer state or None) for train.save_steps /
    train.resume_from_checkpoint (stages/checkpoint.py)."""
    tp = ctx.spec.train
    if not tp.save_steps and not tp.resume_from_checkpoint:
        return None, None
    from engine.runs.stages import checkpoint as ckp
    where = ckp.find(tp.resume_from_checkpoint) if tp.resume_from_checkpoint else None
    state = ckp.read_state(where) if where else None
    if state:
        ckp.check_resume(state, ctx.spec, method, world, steps)
    meta = {**ckp.identity(ctx.spec, method, world), "processes": world, "grad_accum": tp.grad_accum,
            "strategy": ctx.spec.strategy, "run_id": ctx.run_id}
    adapters = method in ("lora", "qlora") or bool(ctx.stage.get("lora"))
    ck = ckp.Checkpointer(ctx.workdir, tp.save_steps, tp.save_total_limit, meta, resume=where, log=ctx.log,
                          artifact=lambda p, kind: common.artifact(ctx, p, kind), lora=adapters)
    if tp.save_steps:
        ctx.log(f"checkpoints every {tp.save_steps} steps ({'the adapters' if adapters else 'every weight'} and the "
                f"optimizer state, torch.distributed.checkpoint{', sharded per rank' if world > 1 else ''}) in "
                f"{ck.folder}" + (f", the last {tp.save_total_limit} kept" if tp.save_total_limit else ""))
    return ck, state


def _mean(xs):
    return round(sum(xs) / len(xs), 4) if xs else None


def _save(ctx, method: str, model, tok, state_dict=None) -> dict:
    """Save what was trained for the next stages. ``state_dict``: the full (unsharded) weights a
    multi-process run gathered on rank 0 (its model is sharded; stages/fsdp.py)."""
    wd = Path(ctx.workdir)
    if method == "full":
        out = wd / "model-full"
        if state_dict is None:
            model.to(common.base_dtype(ctx))
            model.save_pretrained(out)
        else:
            dtype = common.base_dtype(ctx)
            model.save_pretrained(out, state_dict={k: v.to(dtype) if v.is_floating_point() else v
                                                   for k, v in state_dict.items()})
        tok.save_pretrained(out)
        ctx.state.update(model_dir=str(out), quant=None, adapter_dir=None)
        return {"model_dir": common.artifact(ctx, out, "model")}
    if method in ("lora", "qlora"):
        out = wd / "adapter"
        model.save_pretrained(out, **({"state_dict": state_dict} if state_dict is not None else {}))
        tok.save_pretrained(out)
        ctx.state["adapter_dir"] = str(out)
        return {"adapter_dir": common.artifact(ctx, out, "adapter"),
                "adapter_bytes": common.weights_bytes_on_disk(str(out))}
    # qat: keep the fake-quantized model for convert; also save its float weights
    q = ctx.state["qat"]
    if q["lora"]:
        adapter = wd / "adapter"
        model.save_pretrained(adapter)
        common.artifact(ctx, adapter, "adapter")
        model = model.merge_and_unload()
    out = wd / "qat-trained"
    sd = {k: v for k, v in (model.state_dict() if state_dict is None else state_dict).items()
          if "fake_quantizer" not in k}
    model.save_pretrained(out, state_dict=sd)
    tok.save_pretrained(out)
    if state_dict is None:
        q["model"] = model                           # the live fake-quantized model, for convert
    # (several processes: convert reloads the gathered weights from qat-trained/ and prepares them again)
    q["trained_dir"] = str(out)
    ctx.state.update(model_dir=str(out), quant=None, adapter_dir=None)
    return {"qat_trained_dir": common.artifact(ctx, out, "model"), "qat": q["what"]}
