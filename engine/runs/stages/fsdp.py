"""FSDP2 in the train stage of a multi-process run (each rank: engine/runs/stages/rank.py).

Each rank runs the same train stage as a single process (engine/runs/stages/train.py) with
``ctx.state["_dist"]`` set, and the stage then:
  - shards the model with FSDP2 full sharding (``fully_shard`` on every decoder layer, then on
    the whole model; bf16 parameters with fp32 gradient reduction on GPUs);
  - feeds each rank every world-th micro-batch of the one shuffled stream, so a step sees the
    same world x accum micro-batches a single process with ``grad_accum`` x world would;
  - agrees once per step on stopping (rank 0 reads the stop file the worker writes) and on the
    step's loss (mean over ranks), tokens (sum) and each rank's memory (``sync``);
  - gathers the full weights on rank 0 (CPU) and saves them once, as a single process would
    (``save``).
"""
from __future__ import annotations


def shard(ctx, model):
    """FSDP2 full sharding: each decoder layer its own unit, then the whole model (embeddings,
    final norm, output head). GPUs: bf16 parameters for compute, fp32 gradient reduction."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kw = {}
    if ctx.device == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # bitsandbytes 4-bit weights (QLoRA) stay whole on every rank: FSDP2 would turn a Params4bit into a plain
    # DTensor and lose its quantization state, and their packed uint8 storage cannot carry gradients'
    # floating dtype; the frozen 4-bit base is replicated, the adapters and the rest sharded
    packed = {p for p in model.parameters() if type(p).__name__ == "Params4bit"}
    if packed:
        kw["ignored_params"] = packed
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        from engine.errors import InputError
        raise InputError(f"FSDP: no decoder layers found to shard in {type(base).__name__} "
                         "(its _no_split_modules name none of its modules)", field="resources")
    for m in layers:
        fully_shard(m, **kw)
    fully_shard(model, **kw)
    # a GPTQ base (gptqmodel: packed qweight/qzeros/scales are module buffers) stays whole too: FSDP2 shards parameters
    held = [b for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx")]
    d = ctx.state["_dist"]
    ctx.log(f"FSDP2 full sharding over {d['world']} processes ({d['backend']}): {len(layers)} decoder layers + "
            f"the rest of the model as {len(layers) + 1} units"
            + ("; bf16 parameters, fp32 gradient reduction" if ctx.device == "cuda" else "")
            + (f"; the {len(packed)} bitsandbytes 4-bit weights replicated on every rank (FSDP2 ignored_params: "
               f"{sum(p.numel() * p.element_size() for p in packed) / 2**20:.1f} MiB each)" if packed else "")
            + (f"; the {len(held)} buffers of the GPTQ base (qweight, qzeros, scales, g_idx) whole on "
               f"every rank (FSDP2 shards parameters, not buffers: "
               f"{sum(b.numel() * b.element_size() for b in held) / 2**20:.2f} MiB each)" if held else ""))
    return model


def sync(loss: float, tokens: int, positions: int, mem):
    """Once per step on every rank: (mean loss, summed tokens, summed positions, {mem_bytes: the
    largest rank's, mem_bytes_ranks: each rank's})."""
    import torch
    import torch.distributed as dist
    world = dist.get_world_size()
    t = torch.tensor([float(loss), float(tokens), float(positions)], dtype=torch.float64)
    dist.all_reduce(t)
    mems = torch.zeros(world, dtype=torch.float64)
    mems[dist.get_rank()] = float(mem or 0)
    dist.all_reduce(mems)
    ranks = [int(x) for x in mems.tolist()]
    return float(t[0]) / world, int(t[1]), int(t[2]), {"mem_bytes": max(ranks), "mem_bytes_ranks": ranks}


def save(ctx, method: str, model, tok, save_fn) -> dict:
    """Gather the full weights to rank 0's CPU memory (LoRA: the adapters alone) and save them
    once with the single-process save (``save_fn``); every rank gets the same result back."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from engine.vocab import MULTI_PROCESS_METHODS
    if method not in MULTI_PROCESS_METHODS:
        from engine.errors import InputError
        raise InputError(f"multi-process training saves {', '.join(MULTI_PROCESS_METHODS)} runs; got {method}",
                         field="resources")
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                               ignore_frozen_params=method in ("lora", "qlora")))
    box = [None]
    if dist.get_rank() == 0:
        box[0] = save_fn(ctx, method, model, tok, state_dict=sd)
    dist.barrier()
    return box[0] or {}


