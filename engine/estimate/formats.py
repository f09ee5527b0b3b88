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

import functools
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
    mixture: str | None = None          # gguf: the per-tensor type mixture of presets/quant/gguf.yaml
    consts_bytes: int = 0               # per linear: fixed metadata tensors (compressed-tensors weight_shape)
    embed_quant: dict | None = None     # embeddings quantized too: {bits, group_size (None: per row), scale_bytes, zero_bytes}
    head_quant: dict | None = None      # lm_head quantized too (same keys; own_copy: a tied model's exported graph
                                        # holds its own quantized output projection)
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


KINDS = ("dense", "bnb-int8", "bnb-4bit", "gptq", "awq", "int8-channel", "int4-group", "intx-group", "fp8-row",
         "gguf")
SPEED_KEYS = ("decode_bw_efficiency", "layer_overhead_s", "prefill_efficiency")


def _format(f: dict) -> WeightFormat:
    fid = f.get("id")
    for key in ("name", "kind", "library", "serve_on"):
        if key not in f:
            raise InputError(f"weights format {fid!r}: {key} is required (presets/quant/formats.yaml)", field=key)
    if f["kind"] not in KINDS:
        raise choices(f"kind of format {fid}", f["kind"], KINDS)
    if f["kind"] == "gguf" and f.get("mixture") not in gguf_data()["mixtures"]:
        raise choices(f"mixture of format {fid}", f.get("mixture"), list(gguf_data()["mixtures"]))
    missing = [k for k in SPEED_KEYS if k not in (f.get("speed") or {})]
    if missing and (f.get("speed") or "transformers" in f.get("runtimes", ["transformers"])):
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
    consts = [("consts", fmt.consts_bytes)] if fmt.consts_bytes else []
    if k == "gguf":                     # the mixture's base type (per-layer types: gguf_linear_types)
        t = mixture(fmt)["base"]
        return [("data", ggml_bytes(t, i, o))] + ([("bias", 4 * o)] if lin.bias else [])
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
        return [("data", i * o), ("scales", fmt.scale_bytes * o), ("zeros", fmt.zero_bytes * o)] + consts + bias
    if k == "int4-group":
        return [("data", i * o / 2), ("scales", fmt.scale_bytes * groups * o),
                ("zeros", fmt.zero_bytes * groups * o)] + bias
    if k == "intx-group":
        sb = fmt.storage_bits or fmt.bits
        return [("data", i * o * sb / 8), ("scales", fmt.scale_bytes * groups * o),
                ("zeros", fmt.zero_bytes * groups * o)] + consts + bias
    if k == "fp8-row":
        return [("data", i * o), ("scales", fmt.scale_bytes * o)] + consts + bias
    raise ValueError(f"format kind {k!r} has no layout")  # data error in formats.yaml, not user input



# ---- GGUF (llama.cpp): block layouts and per-tensor mixtures (presets/quant/gguf.yaml) ------------

_GGUF: dict = {}

# Hugging Face linear name (its last part) -> llama.cpp tensor name
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "qkv_proj": "attn_qkv", "query_key_value": "attn_qkv", "dense": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "gate_up_proj": "ffn_up", "down_proj": "ffn_down",
              "w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down", "fc1": "ffn_up", "fc2": "ffn_down",
              "dense_h_to_4h": "ffn_up", "dense_4h_to_h": "ffn_down", "out_proj": "attn_output"}


def gguf_data() -> dict:
    if not _GGUF:
        _GGUF.update(load_yaml("quant/gguf.yaml"))
    return _GGUF


def mixture(fmt) -> dict:
    return gguf_data()["mixtures"][get(fmt).mixture]


def ggml_bytes(ggml_type: str, in_features: int, out_features: int) -> float:
    """Bytes of a [out, in] tensor stored as a ggml type: rows of in_features values in blocks."""
    block, size = gguf_data()["ggml_types"][ggml_type]
    return out_features * math.ceil(in_features / block) * size


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _rule(rule, i: int, n: int, arch: ModelArch | None, base: str) -> str:
    if isinstance(rule, str):
        return rule
    if "more_bits" in rule:
        return rule["more_bits"] if use_more_bits(i, n) else base
    if "first_n" in rule:
        k, t = rule["first_n"]
        return t if i < k else rule["else"]
    if "first_frac" in rule:
        d, t = rule["first_frac"]
        return t if i < n // d else rule["else"]
    if "gqa_at_least" in rule:
        g, t = rule["gqa_at_least"]
        return t if arch is not None and arch.num_heads // max(arch.num_kv_heads, 1) >= g else rule["else"]
    raise ValueError(f"gguf mixture rule {rule!r} is not understood")    # data error in gguf.yaml


def _fallback(t: str, in_features: int) -> str:
    """k-quants need rows that are a multiple of 256: llama.cpp falls back per tensor."""
    block = gguf_data()["ggml_types"][t][0]
    if in_features % block:
        return gguf_data()["k_fallback"].get(t, t)
    return t


def gguf_tensor_type(fmt, name: str, layer: int, arch: ModelArch, in_features: int) -> str:
    """The ggml type llama-quantize gives tensor ``name`` (attn_v, ffn_down, output, token_embd...)
    of decoder layer ``layer`` in this mixture (presets/quant/gguf.yaml; src/llama-quant.cpp)."""
    mx = mixture(fmt)
    base = mx["base"]
    if base in ("f16", "bf16", "f32", "q8_0"):        # not a quantization mixture: one type throughout
        return base
    n = arch.num_layers
    t = _rule(mx[name], layer, n, arch, base) if name in mx else base
    if arch.num_experts == 8:                          # llama.cpp's 8-expert rules
        if name in ("attn_k", "attn_v"):
            t = "q8_0"
        elif name == "attn_output" and mx.get("moe_attn_output"):
            t = "q5_k"
    if name == "attn_v" and n == 80 and t in ("q3_k", "q4_k"):   # LLM_TYPE_70B: attn_v is 8x smaller than attn_q
        t = "q5_k"
    return _fallback(t, in_features)


def gguf_linear_types(arch: ModelArch, fmt) -> list[dict[str, str]]:
    """Per decoder layer, the ggml type of each block linear (by its Hugging Face name)."""
    out = []
    for i in range(arch.num_layers):
        out.append({lin.name: gguf_tensor_type(fmt, GGUF_NAMES.get(lin.name.rsplit(".", 1)[-1], lin.name), i, arch,
                                               lin.in_features) for lin in arch.linears})
    return out


def gguf_breakdown(arch: ModelArch, fmt) -> dict[str, int]:
    """Bytes of a GGUF file's tensors (what llama.cpp loads onto the device), by the parts of
    weights_breakdown: block linears in their per-layer types, token_embd and output in theirs,
    1-D tensors (norms, biases) f32."""
    fmt = get(fmt)
    parts = {"block_linears": 0, "quant_scales": 0, "linear_biases": 0, "unquantized_experts": 0}
    for types in gguf_linear_types(arch, fmt):
        for lin in arch.linears:
            parts["block_linears"] += lin.count * ggml_bytes(types[lin.name], lin.in_features, lin.out_features)
            if lin.bias:
                parts["linear_biases"] += lin.count * 4 * lin.out_features
    h, V = arch.hidden_size, arch.vocab_size
    head_t = gguf_tensor_type(fmt, "output", 0, arch, h)
    embd_t = head_t if arch.tie_embeddings else gguf_tensor_type(fmt, "token_embd", 0, arch, h)
    parts["embed_tokens"] = int(ggml_bytes(embd_t, h, V))
    parts["lm_head"] = 0 if arch.tie_embeddings else int(ggml_bytes(head_t, h, V))
    parts["norms"] = arch.num_layers * 4 * arch.norm_params_per_layer
    parts["other"] = 4 * arch.extra_params
    parts["buffers"] = 0
    return {k: int(v) for k, v in parts.items()}


def dot_ops_per_token(arch: ModelArch, fmt) -> float | None:
    """Instructions llama.cpp's GPU decode kernels issue per token to unpack and dot the weights: every
    active block linear and the output projection, each in its ggml type, times that type's
    ``dot_ops_per_weight`` (presets/quant/gguf.yaml, counted from the block layout's vec-dot). None
    for a format that is not GGUF (its runtimes' kernels are not counted this way)."""
    fmt = get(fmt)
    if fmt.kind != "gguf":
        return None
    ops = gguf_data()["dot_ops_per_weight"]
    total = 0.0
    for types in gguf_linear_types(arch, fmt):
        for lin in arch.linears:
            total += lin.active * lin.in_features * lin.out_features * ops[types[lin.name]]
    head_t = gguf_tensor_type(fmt, "output", 0, arch, arch.hidden_size)
    return total + arch.vocab_size * arch.hidden_size * ops[head_t]


def bits_per_weight(arch: ModelArch, fmt) -> float:
    """Stored bits per parameter of the whole model in this format (what llama.cpp prints as BPW)."""
    return 8 * weights_bytes(arch, fmt, 1) / arch.total_params


def _quant_matrix(rows: int, cols: int, q: dict) -> int:
    """A [rows, cols] matrix quantized to q['bits'] with a scale (and zero) per group of
    q['group_size'] along cols (None: one per row)."""
    g = q.get("group_size") or cols
    groups = math.ceil(cols / g)
    return int(math.ceil(rows * cols * q["bits"] / 8)
               + rows * groups * (q.get("scale_bytes", 2) + q.get("zero_bytes", 0)))


def weights_breakdown(arch: ModelArch, fmt="bf16", round_to: int = CUDA_BLOCK,
                      dense_bytes: float | None = None) -> dict[str, int]:
    """Bytes of a loaded model by part; the values sum to the weights' memory.

    Parts: block_linears (quantized data, or 16-bit), quant_scales (scales + zeros + g_idx +
    constants), linear_biases, embed_tokens, lm_head, norms (per-layer norms and routers),
    other (final norm, learned positions), unquantized_experts (fused MoE experts a library
    leaves 16-bit), buffers (rotary inv_freq). ``dense_bytes`` overrides the 2 bytes of what
    stays unquantized (4 after peft's prepare_model_for_kbit_training upcast).
    Pure in its inputs: cached by (architecture, format entry, rounding, dense bytes); a copy is
    returned so no caller can change what the cache holds.
    """
    fmt = get(fmt)
    try:
        return dict(_breakdown_cached(arch, fmt, round_to, dense_bytes))
    except TypeError:                     # an entry with a dict-valued field is not hashable: compute it
        return _breakdown(arch, fmt, round_to, dense_bytes)


@functools.lru_cache(maxsize=4096)
def _breakdown_cached(arch: ModelArch, fmt: WeightFormat, round_to: int, dense_bytes: float | None) -> dict:
    return _breakdown(arch, fmt, round_to, dense_bytes)


def _breakdown(arch: ModelArch, fmt: WeightFormat, round_to: int, dense_bytes: float | None) -> dict[str, int]:
    if fmt.kind == "gguf":
        return gguf_breakdown(arch, fmt)
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
    parts["embed_tokens"] = _round(_quant_matrix(arch.vocab_size, arch.hidden_size, fmt.embed_quant)
                                   if fmt.embed_quant else d * arch.embed_params, round_to)
    parts["lm_head"] = _round(_quant_matrix(arch.vocab_size, arch.hidden_size, fmt.head_quant)
                              if fmt.head_quant and arch.lm_head_params else d * arch.lm_head_params, round_to)
    if fmt.head_quant and arch.tie_embeddings and fmt.head_quant.get("own_copy"):
        # the exported graph keeps its own quantized copy of the tied output projection
        parts["lm_head"] = _round(_quant_matrix(arch.vocab_size, arch.hidden_size, fmt.head_quant), round_to)
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
    head = b["lm_head"] or b["embed_tokens"]          # tied: the embedding matrix is the output projection
    return linears + b["norms"] + head
