"""Weight formats: the registry (presets/quant/formats.yaml, one entry per format) and the bytes a
model occupies in GPU memory, module by module.

``get(id)`` is a format's entry: its layout, the library that runs it, its speed constants (the
Hugging Face path, engine/estimate/latency.py), the device kinds that serve it and the runtimes that
load it. ``register(entry)`` adds one at run time. ``weights_breakdown(arch, fmt)`` counts every
tensor a loaded model holds: the block linears in the format's layout (packed data, scales, zeros,
g_idx, quant-state constants), and what stays 16-bit (embeddings, lm_head, norms, biases, MoE routers,
and fused MoE experts that a library does not quantize). Counted from ``ModelArch.linears``,
never as params x bits. Pure Python.

On CUDA the caching allocator rounds every allocation up to 512 bytes, which is what
``torch.cuda.memory_allocated()`` reports; ``round_to=512`` applies that per tensor (it matters
for bitsandbytes' small per-layer quant-state tensors). ``round_to=1`` gives storage bytes, as
counted on CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from engine.errors import InputError, choices
from engine.models import Linear, ModelArch
from engine.presets import load_yaml

CUDA_BLOCK = 512          # c10 CUDACachingAllocator kMinBlockSize: every block is a multiple of 512 bytes
NOT_FORMATS = {"hosted": "'hosted' means a provider serves the model (no weights on your hardware): "
                         "it has no memory or latency estimate here"}


@dataclass(frozen=True)
class WeightFormat:
    id: str
    name: str
    kind: str
    library: str
    bits: float = 16
    bytes_per_param: float = 2          # dense formats
    group_size: int | None = None       # gptq / awq / int4 / intx
    blocksize: int | None = None        # bitsandbytes 4-bit
    double_quant: bool = False
    scale_bytes: int = 2
    zero_bytes: int = 0
    storage_bits: int | None = None     # intx: bits one value occupies in memory
    quantizes_fused_experts: bool = True
    requires_fp8: bool = False
    tensor_cores: str | None = None     # int8 | fp8: weights and activations both quantized, matmuls on those units
    evidence: str = ""
    speed: dict = field(default_factory=dict, compare=False)      # decode_bw_efficiency, layer_overhead_s, prefill_efficiency
    serve_on: tuple[str, ...] = ()                                # device kinds whose serving stack runs it
    runtimes: tuple[str, ...] = ()                                # runtimes that load the checkpoint
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def quantized(self) -> bool:
        return self.kind != "dense"

    @property
    def grouped(self) -> bool:
        return self.kind in ("gptq", "awq", "int4-group", "intx-group")

    def with_group_size(self, group_size: int | None) -> "WeightFormat":
        if group_size is None or group_size == self.group_size:
            return self
        if not self.grouped:
            raise InputError(f"weights {self.id!r} has no group size (it is {self.kind}); "
                             "group_size applies to gptq-*, awq-4bit, torchao-int4, w4a8", field="group_size")
        if group_size != -1 and group_size <= 0:
            raise InputError(f"group_size must be positive or -1 (one group per row), got {group_size}",
                             field="group_size")
        return replace(self, group_size=group_size)


KINDS = ("dense", "bnb-int8", "bnb-4bit", "gptq", "awq", "int8-channel", "int4-group", "intx-group", "fp8-row")
SPEED_KEYS = ("decode_bw_efficiency", "layer_overhead_s", "prefill_efficiency")


def _format(f: dict) -> WeightFormat:
    fid = f.get("id")
    for key in ("name", "kind", "library", "speed", "serve_on"):
        if key not in f:
            raise InputError(f"weights format {fid!r}: {key} is required (presets/quant/formats.yaml)", field=key)
    if f["kind"] not in KINDS:
        raise choices(f"kind of format {fid}", f["kind"], KINDS)
    missing = [k for k in SPEED_KEYS if k not in (f.get("speed") or {})]
    if missing:
        raise InputError(f"weights format {fid!r}: speed needs {', '.join(missing)}", field="speed")
    known = {k: (tuple(f[k]) if k in ("serve_on", "runtimes") else f[k])
             for k in WeightFormat.__dataclass_fields__ if k in f and k != "raw"}
    return WeightFormat(**known, raw=f)


_CACHE: dict[str, WeightFormat] = {}


def formats() -> dict[str, WeightFormat]:
    """Every weights format by id: presets/quant/formats.yaml, then the ones ``register`` added."""
    if not _CACHE:
        _CACHE.update({f["id"]: _format(f) for f in load_yaml("quant/formats.yaml")})
    return _CACHE


def register(entry: dict) -> WeightFormat:
    """Add a weights format at run time (an entry shaped as in formats.yaml); returns it."""
    fmt = _format(entry)
    if fmt.id in formats():
        raise InputError(f"weights format {fmt.id!r} already exists", field="formats")
    _CACHE[fmt.id] = fmt
    return fmt


def unregister(format_id: str) -> None:
    """Drop a format ``register`` added (the registry's own stay)."""
    if format_id not in {f["id"] for f in load_yaml("quant/formats.yaml")}:
        _CACHE.pop(format_id, None)


def ids() -> list[str]:
    return list(formats())


def get(fmt) -> WeightFormat:
    """A weights format by id (``nf4``, ``gptq-4bit``...); unknown ids list the known ones."""
    if isinstance(fmt, WeightFormat):
        return fmt
    key = str(fmt).strip().lower()
    if key in NOT_FORMATS:
        raise InputError(f"weights {fmt!r}: {NOT_FORMATS[key]}; weights formats: {', '.join(ids())}",
                         field="weights")
    if key not in formats():
        raise choices("weights", fmt, ids())
    return formats()[key]


def _round(n: float, round_to: int) -> int:
    n = int(math.ceil(n))
    if n <= 0:
        return 0
    return -(-n // round_to) * round_to


def check_group_size(arch: ModelArch, fmt: WeightFormat) -> None:
    """GPTQ/AWQ/int4 groups must tile every quantized linear's input features."""
    g = fmt.group_size
    if not fmt.grouped or g in (None, -1):
        return
    for lin in arch.linears:
        if lin.count > 1 and not fmt.quantizes_fused_experts:
            continue
        if lin.in_features % g:
            ins = sorted({l.in_features for l in arch.linears})
            valid = [c for c in (16, 32, 64, 128, 256, 512, 1024) if all(i % c == 0 for i in ins)]
            raise InputError(
                f"group_size {g} does not divide in_features {lin.in_features} of {lin.name} in {arch.name}; "
                f"valid group sizes for this model: {', '.join(map(str, valid + [-1]))} (-1 = one group per row)",
                field="group_size")


def linear_tensors(fmt: WeightFormat, lin: Linear) -> list[tuple[str, float]]:
    """The tensors one copy of a block Linear holds in this format: [(part, bytes)].

    part is one of: data (the weight values), scales, zeros, g_idx, consts (quant-state
    constants), bias.
    """
    i, o = lin.in_features, lin.out_features
    k = fmt.kind
    bias = [("bias", 2 * o)] if lin.bias else []
    if k == "dense":
        return [("data", fmt.bytes_per_param * i * o)] + ([("bias", fmt.bytes_per_param * o)] if lin.bias else [])
    if k == "bnb-int8":
        return [("data", i * o), ("scales", 4 * o)] + bias
    if k == "bnb-4bit":
        n = i * o
        blocks = math.ceil(n / fmt.blocksize)
        t = [("data", math.ceil(n / 2)), ("consts", 16 * 4)]            # packed values, NF4/FP4 code table
        if fmt.double_quant:
            t += [("scales", blocks),                                    # absmax quantized to uint8
                  ("scales", 4 * math.ceil(blocks / 256)),               # state2.absmax fp32 per 256 blocks
                  ("consts", 4), ("consts", 256 * 4)]                    # offset, state2 dynamic code
        else:
            t += [("scales", 4 * blocks)]                                # absmax fp32
        return t + bias
    g = i if fmt.group_size in (None, -1) else fmt.group_size
    groups = math.ceil(i / g)
    if k == "gptq":
        b = fmt.bits
        return [("data", 4 * math.ceil(i * b / 32) * o), ("zeros", 4 * groups * math.ceil(o * b / 32)),
                ("scales", 2 * groups * o), ("g_idx", 4 * i)] + bias
    if k == "awq":
        b = fmt.bits
        return [("data", 4 * i * math.ceil(o * b / 32)), ("zeros", 4 * groups * math.ceil(o * b / 32)),
                ("scales", 2 * groups * o)] + bias
    if k == "int8-channel":
        return [("data", i * o), ("scales", fmt.scale_bytes * o), ("zeros", fmt.zero_bytes * o)] + bias
    if k == "int4-group":
        return [("data", i * o / 2), ("scales", fmt.scale_bytes * groups * o),
                ("zeros", fmt.zero_bytes * groups * o)] + bias
    if k == "intx-group":
        sb = fmt.storage_bits or fmt.bits
        return [("data", i * o * sb / 8), ("scales", fmt.scale_bytes * groups * o),
                ("zeros", fmt.zero_bytes * groups * o)] + bias
    if k == "fp8-row":
        return [("data", i * o), ("scales", fmt.scale_bytes * o)] + bias
    raise ValueError(f"format kind {k!r} has no layout")  # data error in formats.yaml, not user input


def weights_breakdown(arch: ModelArch, fmt="bf16", round_to: int = CUDA_BLOCK,
                      dense_bytes: float | None = None) -> dict[str, int]:
    """Bytes of a loaded model by part; the values sum to the weights' memory.

    Parts: block_linears (quantized data, or 16-bit), quant_scales (scales + zeros + g_idx +
    constants), linear_biases, embed_tokens, lm_head, norms (per-layer norms and routers),
    other (final norm, learned positions), unquantized_experts (fused MoE experts a library
    leaves 16-bit), buffers (rotary inv_freq). ``dense_bytes`` overrides the 2 bytes of what
    stays unquantized (4 after peft's prepare_model_for_kbit_training upcast).
    """
    fmt = get(fmt)
    check_group_size(arch, fmt)
    d = fmt.bytes_per_param if not fmt.quantized else 2
    d = d if dense_bytes is None else dense_bytes
    parts = {"block_linears": 0, "quant_scales": 0, "linear_biases": 0, "unquantized_experts": 0}
    for lin in arch.linears:
        if lin.count > 1 and fmt.quantized and not fmt.quantizes_fused_experts:
            # transformers 5 stores experts as fused 3-D parameters; nn.Linear replacement skips them
            parts["unquantized_experts"] += arch.num_layers * lin.count * _round(
                d * (lin.in_features * lin.out_features + (lin.out_features if lin.bias else 0)), 1)
            continue
        per_copy = {"block_linears": 0, "quant_scales": 0, "linear_biases": 0}
        for part, nbytes in linear_tensors(fmt, lin):
            key = {"data": "block_linears", "bias": "linear_biases"}.get(part, "quant_scales")
            if part == "bias" and fmt.quantized and fmt.kind not in ("gptq", "awq"):
                nbytes = d * lin.out_features        # bnb / torchao keep the module's 16-bit bias
            per_copy[key] += _round(nbytes, round_to)
        for key, v in per_copy.items():
            parts[key] += arch.num_layers * lin.count * v
    parts["embed_tokens"] = _round(d * arch.embed_params, round_to)
    parts["lm_head"] = _round(d * arch.lm_head_params, round_to)
    parts["norms"] = arch.num_layers * _round(d * arch.norm_params_per_layer, 1)
    parts["other"] = _round(d * arch.extra_params, 1)
    parts["buffers"] = rotary_buffer_bytes(arch)
    return {k: int(val) for k, val in parts.items()}


def rotary_buffer_bytes(arch: ModelArch) -> int:
    """Rotary embedding buffers: inv_freq and original_inv_freq, fp32 [head_dim/2] each."""
    if arch.model_type in ("opt", "bloom"):
        return 0
    n = 2 * 4 * (arch.head_dim // 2)
    if arch.model_type in ("gemma3", "gemma3_text"):
        n *= 2                                  # local and global rotary embeddings
    return n


def weights_bytes(arch: ModelArch, fmt="bf16", round_to: int = CUDA_BLOCK) -> int:
    return sum(weights_breakdown(arch, fmt, round_to).values())


def bytes_read_per_token(arch: ModelArch, fmt="bf16") -> float:
    """Weight bytes one decode step streams from memory: every active block linear (MoE: the
    routed experts only), norms, lm_head (the embedding is a row gather, not a read)."""
    fmt = get(fmt)
    b = weights_breakdown(arch, fmt, round_to=1)
    if arch.num_experts:
        frac = arch.experts_per_token / arch.num_experts
        dense_lin = [l for l in arch.linears if l.count == 1]
        sub = replace(arch, linears=tuple(dense_lin))
        sub_b = weights_breakdown(sub, fmt, round_to=1)
        expert_bytes = (b["block_linears"] + b["quant_scales"] + b["linear_biases"] + b["unquantized_experts"]
                        - sub_b["block_linears"] - sub_b["quant_scales"] - sub_b["linear_biases"])
        linears = sub_b["block_linears"] + sub_b["quant_scales"] + sub_b["linear_biases"] + frac * expert_bytes
    else:
        linears = b["block_linears"] + b["quant_scales"] + b["linear_biases"]
    head = b["lm_head"] if not arch.tie_embeddings else b["embed_tokens"]
    return linears + b["norms"] + head
