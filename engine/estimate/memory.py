"""GPU memory of training, inference, quantization and merge stages. Pure Python.

The reference recipe (DESIGN.md) is modelled tensor by tensor: what autograd saves in each
decoder layer for each method and dtype, the logits and cross-entropy buffers, the optimizer
and its foreach temporaries, and what stays alive in each phase of a training step. The peak
is the largest phase (forward end, loss backward, head backward, top/bottom layer backward,
optimizer step), not the sum of everything. Constants (CUDA context, cuBLAS workspace,
allocator slack, uncertainties) are data in presets/estimate/runtime.yaml.

Notation (per token, bytes): h hidden, q = heads x head_dim, kv = kv_heads x head_dim,
I intermediate, r LoRA rank, V vocab, H heads, T sequence length, BT = batch x T tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from engine import hardware, quant
from engine.errors import InputError
from engine.estimate import formats as F
from engine.models import PEFT_PARAM_WRAPPED, ModelArch, lora_param_count, lora_targets
from engine.fmt import GIB
from engine.presets import load_yaml
from engine.vocab import DEFAULT_QAT_SCHEME, LOSS_MODES, OPTIMIZERS, PRECISIONS, QAT_SCHEMES, TRAIN_METHODS

REFERENCE_GPU = "h100-80gb"
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "phi3")     # block modelled exactly (CPU-checked)
PERSISTENT_PARTS = ("weights", "adapters", "optimizer_states", "cublas_workspace")   # allocated once
CHUNK_LOGITS_BYTES = 128 * 2 ** 20    # the engine's chunked loss: one chunk's fp32 logits at most this


def loss_chunk_tokens(vocab: int, tokens: int) -> int:
    """Tokens per chunk of the engine's chunked loss (engine/runs/stages/loss.py uses this):
    one chunk's fp32 logits <= CHUNK_LOGITS_BYTES, at least 16 tokens, at most all of them."""
    return max(1, min(tokens, max(16, CHUNK_LOGITS_BYTES // (4 * vocab))))


def rt() -> dict:
    return load_yaml("estimate/runtime.yaml")


# ---- inputs ------------------------------------------------------------------------------

def positive_int(name: str, value, minimum: int = 1) -> int:
    try:
        ok = not isinstance(value, bool) and float(value) == int(float(value))
    except (TypeError, ValueError):
        ok = False
    if not ok or int(float(value)) < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}", field=name)
    return int(float(value))


def device(gpu) -> hardware.Device:
    """The device an estimate is for: a GPU id or a serving target id (None: the reference H100)."""
    return hardware.get(gpu or REFERENCE_GPU)


def context_bytes(dev: hardware.Device, kind: str = "infer", libraries: tuple[str, ...] = ()) -> tuple[int, int, int]:
    """CUDA context and what else the process holds outside the allocator: (value, low, high).

    The driver context of the device's architecture, plus what a training process loads
    (backward kernels, cuBLASLt workspaces, autograd streams) and what bitsandbytes loads
    (its CUDA library), as measured on the H100 reference (presets/estimate/runtime.yaml)."""
    c = rt()["cuda_context_gib"]
    gib = c["by_kind"].get(dev.kind, c["by_arch"].get(dev.arch, c["default"])) if dev.kind != "gpu" \
        else c["by_arch"].get(dev.arch, c["default"])
    if dev.kind == "gpu":
        extra = c.get("extra", {})
        gib += extra.get(kind, 0.0) + sum(extra.get(lib, 0.0) for lib in libraries if kind != "train")
    v = gib * GIB
    return int(v), int(v * c["low_factor"]), int(v * c["high_factor"])


def cublas_workspace(dev: hardware.Device) -> int:
    if dev.kind not in ("gpu", "edge"):
        return 0
    c = rt()["cublas_workspace_bytes"]
    return int(c["by_arch"].get(dev.arch, c["default"]))


def slack(kind: str) -> dict:
    return rt()["allocator_slack"][kind]


def slack_bytes(kind: str, peak: float, method: str | None = None, persistent: float | None = None) -> tuple[float, float]:
    """(slack bytes, as a fraction of the peak): reserved - allocated at the peak. Training with
    the persistent part known: persistent x its bytes + the method's fraction x the transient
    rest (presets/estimate/runtime.yaml, fitted on the H100 reference); else fraction x peak."""
    s = slack(kind)
    if kind == "train" and persistent is not None and method in s.get("by_method", {}) and peak:
        b = s["persistent"] * persistent + s["by_method"][method] * max(0.0, peak - persistent)
        return b, b / peak
    return s["fraction"] * peak, s["fraction"]


# ---- terms: a number with its formula and interval ----------------------------------------

@dataclass
class Term:
    name: str
    bytes: float
    formula: str
    rel: float = 0.0          # relative half-width of the interval

    def to_dict(self) -> dict:
        return {"bytes": int(round(self.bytes)), "low": int(round(self.bytes * (1 - self.rel))),
                "high": int(round(self.bytes * (1 + self.rel))), "formula": self.formula}


def _unc(key: str) -> float:
    return float(rt()["uncertainty"][key])


def _sum_terms(terms: list[Term]) -> tuple[int, int, int]:
    v = sum(t.bytes for t in terms)
    lo = sum(t.bytes * (1 - t.rel) for t in terms)
    hi = sum(t.bytes * (1 + t.rel) for t in terms)
    return int(round(v)), int(round(lo)), int(round(hi))


# ---- the training recipe as dtypes ---------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """What the reference recipe does for a method: the dtype (bytes) of every stream."""
    method: str
    precision: str
    dense: int               # bytes of parameters that are not quantized (embeddings, norms, lm_head, base linears)
    residual: int            # hidden-state stream between layers
    autocast: bool           # bf16 autocast around the forward (fp32-amp)
    adapters: bool           # LoRA adapters (peft keeps them fp32: autocast_adapter_dtype=True)
    base_trainable: bool     # block linears get gradients
    base_4bit: bool          # bitsandbytes NF4 base (output cast back to the input dtype)
    qat_act: bool = False    # QAT fake-quantizes activations too (8da4w)
    adapter_bytes: int = 4

    @property
    def trainable_dense(self) -> bool:
        return self.base_trainable


def recipe(method: str, precision: str = "bf16", qat_scheme: str = DEFAULT_QAT_SCHEME) -> Recipe:
    if method not in TRAIN_METHODS:
        raise InputError(f"method must be one of {', '.join(TRAIN_METHODS)}, got {method!r}", field="method")
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}", field="precision")
    if qat_scheme not in QAT_SCHEMES:
        raise InputError(f"qat_scheme must be one of {', '.join(QAT_SCHEMES)}, got {qat_scheme!r}", field="qat_scheme")
    amp = precision == "fp32-amp"
    if method == "qlora":
        if amp:
            raise InputError("precision fp32-amp does not apply to qlora: its base is NF4 with bf16 compute "
                             "(bnb_4bit_compute_dtype); use precision bf16, or method lora/full with fp32-amp",
                             field="precision")
        # prepare_model_for_kbit_training casts every non-4-bit parameter (embeddings, norms,
        # lm_head) to fp32, so the hidden states are fp32 from the embedding on
        return Recipe(method, precision, dense=4, residual=4, autocast=False, adapters=True,
                      base_trainable=False, base_4bit=True)
    dense = 4 if amp else 2
    return Recipe(method, precision, dense=dense, residual=dense, autocast=amp, adapters=method == "lora",
                  base_trainable=method in ("full", "qat"), base_4bit=False,
                  qat_act=method == "qat" and QAT_SCHEMES[qat_scheme]["act_bits"] < 16)


# ---- attention kernel choice -------------------------------------------------------------

def attention_kernel(arch: ModelArch, in_bytes: int, override: str | None = None) -> str:
    """Which SDPA backend torch picks on CUDA for the reference recipe.

    bf16/fp16 inputs -> flash (supports GQA via enable_gqa, head_dim <= 256). fp32 inputs:
    flash refuses the dtype; mem-efficient takes fp32 but not GQA, so GQA models fall to the
    math kernel, which materialises the T x T probabilities (torch docs of
    scaled_dot_product_attention: "GQA ... works only for Flash_attention and math kernel").
    """
    if arch.model_type == "bloom" or arch.model_type == "gemma2":
        return "eager"                      # ALiBi / logit softcapping: transformers' eager attention
    if override:
        return override                     # an SDPA backend forced (the CPU's flash kernel in the bench)
    if in_bytes == 2 and arch.head_dim <= 256:
        return "flash"
    if arch.num_kv_heads == arch.num_heads:
        return "efficient"
    return "math"


# ---- activations saved by one decoder layer ----------------------------------------------

def _consumers(rc: Recipe, n: int, in_bytes: int, in_features: int, rank: int, rg: bool,
               lora: bool = True) -> tuple[float, float, float]:
    """Bytes/token saved for ``n`` linears reading one tensor of ``in_features`` (dtype in_bytes).

    Returns (input bytes saved, of which shared with the producer's own tensor, LoRA A outputs).
    - trainable base linear: mm saves its input (the same tensor for all n), or under autocast
      one bf16 copy per linear when the input is fp32 (autocast caches only leaf weights);
      QAT 8da4w saves one fake-quantized copy per linear.
    - LoRA on a frozen base: peft casts the input to the adapter dtype (fp32) per linear: one
      fp32 copy per linear when the input is bf16, the input itself when it is already fp32;
      under autocast lora_A's F.linear casts it to bf16 again, one copy per linear.
    - a frozen base linear alone saves nothing (grad_input needs only the weight).
    """
    saved = shared = a_out = 0.0
    if rc.base_trainable:
        if rc.qat_act:
            saved += n * 2 * in_features
        elif rc.autocast and in_bytes != 2:
            saved += n * 2 * in_features
        else:
            saved += in_bytes * in_features
            shared += in_bytes * in_features
    if rc.adapters and lora:
        if rc.autocast:
            saved += n * 2 * in_features
            a_out += n * 2 * rank
        elif in_bytes == rc.adapter_bytes:
            if not (rc.base_trainable and not rc.autocast):
                saved += in_bytes * in_features
                shared += in_bytes * in_features
            a_out += n * rc.adapter_bytes * rank
        else:
            saved += n * rc.adapter_bytes * in_features
            a_out += n * rc.adapter_bytes * rank
    return saved, shared, a_out


def _out_bytes(rc: Recipe, in_bytes: int) -> int:
    """dtype of a block linear's output: bf16 under autocast; bnb 4-bit casts back to its input
    dtype; a bf16 base (+ fp32 LoRA, cast back by peft) gives bf16."""
    if rc.autocast:
        return 2
    if rc.base_4bit:
        return in_bytes
    return rc.dense


def _norm(rc: Recipe, kind: str, width: int, in_bytes: int, rg: bool, trainable: bool) -> tuple[float, int]:
    """Bytes/token a norm saves and its output dtype.

    RMSNorm (llama): x.to(fp32) is saved by pow and mul (4 bytes, the input itself when it is
    already fp32) + rsqrt (4 per row); weight * y saves y only when the weight trains.
    Gemma RMSNorm: the same, and output*(1+w) is fp32. LayerNorm: saves its input + mean/rstd.
    """
    w = rc.dense
    out = max(in_bytes, w)
    if kind == "layernorm":
        s = (in_bytes * width + 8) if (rg or trainable) else 0
        return s, in_bytes if not rc.autocast else 4
    s = (4 * width + 4) if rg else 0
    if trainable:
        s += (4 if kind == "gemma" else in_bytes) * width
    if kind == "gemma":
        out = in_bytes
    return s, out


def layer_saved(arch: ModelArch, rc: Recipe, seq_len: int, rank: int, rg: bool = True,
                kernel: str | None = None, targets=None) -> dict[str, float]:
    """Bytes per token one decoder layer keeps for backward, by part (rg: its input needs grad;
    ``targets``: the LoRA targets adapted, llama names, default every one the architecture takes).

    Exact for llama-like blocks (checked against a live-storage tracker on CPU); gemma, opt,
    bloom and MoE blocks are modelled as their nearest llama-like equivalent.
    """
    h, q, kv, H = arch.hidden_size, arch.num_heads * arch.head_dim, arch.kv_dim, arch.num_heads
    mt = arch.model_type
    moe = arch.num_experts > 0
    I = arch.intermediate_size
    ntok_I = I * (arch.experts_per_token if moe else 1)      # expert MLP rows per token
    R = rc.residual
    trainable_norm = rc.base_trainable
    norm_kind = "layernorm" if mt in ("opt", "bloom") else "gemma" if mt.startswith("gemma") else "rms"
    parts: dict[str, float] = {}
    lora_names = set(effective_targets(arch, targets))     # the adapted linears, by llama name

    # input norm
    s, Z = _norm(rc, norm_kind, h, R, rg, trainable_norm)
    parts["norms"] = s
    # q, k, v projections (fused in phi3 / bloom)
    fused_qkv = mt in ("phi3", "bloom")
    n_qkv = 1 if fused_qkv else 3
    if rc.adapters:          # the q/k/v linears with adapters (a fused qkv is one, named q_proj)
        n_qkv = len(lora_names & ({"q_proj"} if fused_qkv else {"q_proj", "k_proj", "v_proj"}))
    saved, shared, a_out = _consumers(rc, n_qkv, Z, h, rank, rg, lora=n_qkv > 0)
    parts["linear_inputs"] = saved
    parts["lora_a_outputs"] = a_out
    Q = _out_bytes(rc, Z)
    if mt in ("qwen3", "qwen3_moe", "gemma3", "gemma3_text"):       # per-head RMSNorm on q and k
        parts["norms"] += 4 * (q + kv) + (Q * (q + kv) if trainable_norm else 0)
        Q = max(Q, rc.dense) if norm_kind != "gemma" else Q
    rope = mt not in ("opt", "bloom")
    Qr = max(Q, R) if rope else Q                                   # cos/sin carry the hidden dtype
    K = 2 if rc.autocast else Qr
    kern = attention_kernel(arch, K, kernel)
    if kern in ("flash", "efficient"):
        lse = 4 * H if kern == "flash" else 4 * H * math.ceil(seq_len / 32) * 32 / seq_len
        parts["attention"] = K * q + 2 * K * kv + K * q + lse          # q, k, v, out, logsumexp
        if fused_qkv and not rc.autocast:
            parts["attention"] += Q * (q + kv)                         # v is a view of the fused qkv output
        out_saved_by_kernel = True
    elif kern == "math":
        # q*scale (reshaped copy), k expanded to all heads * scale, v expanded, T x T probs (fp32)
        parts["attention"] = 4 * q + 4 * q + 4 * q + 4 * H * seq_len
        out_saved_by_kernel = False
    else:   # eager: q, k and v copies (k/v expanded to all heads), fp32 softmax output and its bf16
        # cast; gemma2's logit softcapping keeps the tanh output too
        parts["attention"] = 3 * K * q + (4 + K + (K if mt == "gemma2" else 0)) * H * seq_len
        out_saved_by_kernel = False
    # o_proj reads the attention output (dtype K)
    saved, shared, a_out = _consumers(rc, 1, K, q, rank, True, lora="o_proj" in lora_names)
    parts["linear_inputs"] += saved - (shared if out_saved_by_kernel else 0)
    parts["lora_a_outputs"] += a_out
    if mt == "opt":                                                  # dropout masks (p=0.1 default)
        parts["norms"] += h
    # post-attention norm (input always needs grad: it depends on trained parameters)
    s, Z2 = _norm(rc, norm_kind, h, R, True, trainable_norm)
    parts["norms"] += s
    if mt in ("gemma2", "gemma3", "gemma3_text"):                    # post-attention / post-ffw norms
        s2, _ = _norm(rc, norm_kind, h, 2 if not rc.autocast else 2, True, trainable_norm)
        parts["norms"] += 2 * s2
    # MLP
    gated = mt not in ("opt", "bloom")
    n_up = 1 if (mt == "phi3" or not gated) else 2
    if rc.adapters:          # gate/up with adapters (phi3's fused gate_up and opt/bloom's fc1 are up_proj)
        n_up = len(lora_names & ({"up_proj"} if n_up == 1 else {"gate_proj", "up_proj"}))
    saved, shared, a_out = _consumers(rc, n_up, Z2, h, rank, True, lora=n_up > 0)
    down_lora = "down_proj" in lora_names
    if moe:
        parts["router"] = 4 * arch.num_experts + 2 * h * arch.experts_per_token   # fp32 logits, gathered rows
    parts["linear_inputs"] += saved
    parts["lora_a_outputs"] += a_out
    G = _out_bytes(rc, Z2)
    if gated:
        # act(gate) saves gate, mul saves act and up (phi3: gate and up are views of one
        # gate_up output, kept whole); the product is down_proj's input
        parts["mlp"] = 3 * G * ntok_I
        saved, shared, a_out = _consumers(rc, 1, G, ntok_I, rank, True, lora=down_lora)
        parts["linear_inputs"] += saved
    else:
        # opt: relu saves its output, which is fc2's input; bloom: gelu saves its input (fc1's
        # output) and fc2 reads the gelu output
        parts["mlp"] = G * ntok_I
        saved, shared, a_out = _consumers(rc, 1, G, ntok_I, rank, True, lora=down_lora)
        parts["linear_inputs"] += saved - (shared if mt == "opt" else 0)
    parts["lora_a_outputs"] += a_out
    if mt == "opt":
        parts["norms"] += h                                          # dropout mask after fc2
    return parts


def layer_weight_saved(arch: ModelArch, rc: Recipe, rg: bool = True) -> float:
    """Weight-sized tensors one layer keeps for backward (bytes, not per token).

    fp32-amp: autocast's bf16 copy of every linear weight is saved by its matmul (trainable
    weights are cached in autocast for the whole forward; frozen ones are cast per call).
    QAT: the fake-quantized bf16 copy of every linear weight.
    """
    lin = arch.linear_params_per_layer
    if rc.autocast:
        if rc.base_trainable:
            return 2 * lin
        qkv = sum(l.params for l in arch.linears if l.lora_target in ("q_proj", "k_proj", "v_proj"))
        return 2 * (lin - (0 if rg else qkv))
    if rc.method == "qat":
        return 2 * lin
    if rc.adapters and arch.num_experts and arch.model_type in PEFT_PARAM_WRAPPED:
        # peft adapts fused 3-D expert parameters through ParamWrapper, which builds W + B@A for
        # every expert each forward and keeps it for backward (~2.6 bytes per expert parameter,
        # fitted on CPU with peft 0.21)
        return rt()["moe_lora_param_wrapper_bytes"] * sum(l.params for l in arch.linears if l.count > 1)
    return 0.0


def layer_working(arch: ModelArch, rc: Recipe, grad_ckpt: bool) -> float:
    """Transient bytes per token of the top layer's backward beyond the saved activations.

    a * I + b * h with (a, b) per method fitted on CPU (presets/estimate/runtime.yaml
    layer_working): the recomputed layer's forward transients and the first MLP gradients
    (checkpointing), or the MLP gradients in flight while all activations are saved (none).
    """
    c = rt()["layer_working"]
    a, b = c[rc.method]["ckpt" if grad_ckpt else "no_ckpt"]
    # the widest linear output per token (llama gate/up: I; phi3's fused gate_up: 2I; MoE: top-k experts)
    W = max(l.out_features * (l.active if l.count > 1 else 1) for l in arch.linears)
    v = max(a * W + b * arch.hidden_size, 2 * W)
    if arch.model_type == "bloom":
        v += c["bloom_gelu_extra"] * W                # its python GeLU backward keeps ~5 I-sized temporaries
    return v * (c["fp32_amp_factor"] if rc.autocast else 1.0)


# ---- training -----------------------------------------------------------------------------

def effective_targets(arch: ModelArch, targets=None) -> tuple[str, ...]:
    """The LoRA targets (llama names) that get adapters on this architecture: ``targets`` (default
    all of them) among those the architecture has and peft adapts (engine.models.lora_targets).
    Module names a run config may give (``qkv_proj``) count by the target they stand for."""
    allowed = lora_targets(arch)
    if targets is None:
        return tuple(allowed)
    by_leaf = {lin.name.rsplit(".", 1)[-1]: lin.lora_target for lin in arch.linears if lin.lora_target}
    names = {by_leaf.get(t, t) for t in targets}
    return tuple(t for t in allowed if t in names)


def trainable_params(arch: ModelArch, rc: Recipe, rank: int, targets=None) -> int:
    if rc.adapters:
        return lora_param_count(arch, rank, effective_targets(arch, targets))
    return arch.total_params


def train_memory(arch: ModelArch, method: str, precision: str = "bf16", seq_len: int = 512,
                 batch_size: int = 4, grad_ckpt: bool = True, lora_rank: int = 16,
                 dev: hardware.Device | None = None, *, attn_kernel: str | None = None,
                 qat_scheme: str = DEFAULT_QAT_SCHEME, round_to: int = F.CUDA_BLOCK,
                 include_workspace: bool = True, loss: str = "reference",
                 loss_chunk: int | None = None, optimizer: str = "adamw", lora_targets=None) -> dict:
    """Peak memory of one steady-state training step (step >= 2: optimizer states exist).

    ``optimizer``: adamw (torch, foreach: states in the parameter dtype + one state-sized
    temporary), adamw-8bit (bitsandbytes: blockwise 8-bit states, fused update, no temporary),
    paged-adamw-8bit / paged-adamw (bitsandbytes paged states in unified memory: they page to
    the host while activations need the room, so they count only in the optimizer step phase).
    ``lora_targets``: the LoRA targets adapted (llama names or this model's module names; default
    every one the architecture takes, the reference recipe's seven).

    ``loss``: "reference" (DESIGN.md's recipe: model(**batch).loss, B x T x V fp32 buffers) or
    "chunked" (the engine's chunked linear cross-entropy, engine/runs/stages/loss.py) with
    ``loss_chunk`` tokens per chunk (None: ``loss_chunk_tokens``, as the engine picks).
    Returns peak_allocated_bytes, the breakdown at the peak phase (summing exactly to it),
    every phase's total, the terms with formulas and intervals, and notes.
    """
    if loss not in LOSS_MODES:
        raise InputError(f"loss must be one of {', '.join(LOSS_MODES)}, got {loss!r}", field="loss")
    dev = dev or device(None)
    rc = recipe(method, precision, qat_scheme)
    T, B = seq_len, batch_size
    BT = B * T
    L, h, V = arch.num_layers, arch.hidden_size, arch.vocab_size
    r = lora_rank
    approx = arch.model_type not in LLAMA_LIKE or arch.num_experts > 0
    act_rel = _unc("activations_approx" if approx else "activations")
    notes: list[str] = []

    # persistent: weights, adapters, optimizer states
    if rc.base_4bit:
        wb = F.weights_breakdown(arch, "nf4", round_to, dense_bytes=rc.dense)
        wformula = "NF4 double-quant block linears + fp32 embeddings/norms/lm_head (prepare_model_for_kbit_training)"
    else:
        wb = F.weights_breakdown(arch, "fp32" if rc.dense == 4 else "bf16", round_to)
        wformula = f"{rc.dense} bytes x {arch.total_params:,} parameters"
    weights = sum(wb.values())
    n_train = trainable_params(arch, rc, r, lora_targets)
    pb = rc.adapter_bytes if rc.adapters else rc.dense           # trainable parameter dtype
    adapters = n_train * pb if rc.adapters else 0
    grads = n_train * pb
    if optimizer not in OPTIMIZERS:
        raise InputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}", field="optimizer")
    paged = optimizer.startswith("paged")
    if optimizer == "adamw":
        states, opt_tmp = 2 * n_train * pb, n_train * pb          # foreach sqrt(exp_avg_sq)
        sformula = f"AdamW exp_avg + exp_avg_sq: 2 x {n_train:,} x {pb} B"
    elif optimizer.endswith("8bit"):
        b8 = rt()["optimizers"]["adamw-8bit"]["state_bytes_per_param"]
        states, opt_tmp = n_train * b8, 0
        sformula = f"bitsandbytes 8-bit AdamW: 2 uint8 states + fp32 absmax per 256 values = {b8} B x {n_train:,}"
    else:
        states, opt_tmp = 8 * n_train, 0
        sformula = f"bitsandbytes paged AdamW: 2 fp32 states x {n_train:,}"
    if paged:
        sformula += " (paged: resident only for the optimizer step)"
    ws = cublas_workspace(dev) if include_workspace else 0

    # activations
    kern = attention_kernel(arch, 2 if rc.autocast else (max(rc.residual, 2)), attn_kernel)
    first_rg = rc.base_trainable                                 # LoRA/QLoRA: frozen embeddings
    lay = layer_saved(arch, rc, T, r, rg=True, kernel=attn_kernel, targets=lora_targets)
    lay0 = layer_saved(arch, rc, T, r, rg=first_rg, kernel=attn_kernel, targets=lora_targets)
    per_layer_tok = sum(lay.values())
    layer0_tok = sum(lay0.values())
    wsaved = layer_weight_saved(arch, rc, True)
    wsaved0 = layer_weight_saved(arch, rc, first_rg)
    rope = arch.model_type not in ("opt", "bloom")
    R = rc.residual
    head_bytes = 4 if rc.base_4bit else 2                        # logits dtype (fp32 lm_head after the kbit upcast)
    glob = {
        "cos_sin": (2 * T * arch.head_dim * R) if rope else 0,  # position embeddings, batch dim 1
        "final_norm": BT * (4 * h + 4 + (R * h if rc.base_trainable else 0)),
        "head_input": BT * ((2 if rc.autocast else R) * h if rc.base_trainable else 0),
        "inputs": BT * 8 * 3,                                    # input_ids, labels, shifted labels (int64)
    }
    if grad_ckpt:
        stored = L * R * h * BT                                  # non-reentrant checkpoint keeps each layer's input
        acts_layers = stored
        acts_formula = f"grad checkpointing: {L} layers x {R} B x h={h} x BT={BT} (one hidden state per layer)"
    else:
        acts_layers = (per_layer_tok * (L - 1) + layer0_tok) * BT + wsaved * (L - 1) + wsaved0
        acts_formula = (f"{L} layers x {per_layer_tok:,.0f} B/token x BT={BT} "
                        f"({', '.join(f'{k} {v:,.0f}' for k, v in lay.items())})")
    autocast_cache = 0.0
    if rc.autocast and rc.base_trainable:
        autocast_cache = 2 * (arch.linear_params + (arch.lm_head_params or arch.embed_params))
    acts_global = sum(glob.values())
    ws_tok = layer_working(arch, rc, grad_ckpt)
    recompute = (per_layer_tok * BT + wsaved) if grad_ckpt else 0.0

    # loss: logits and cross-entropy buffers, per token x V
    BTV = BT * V
    loss_fwd = (head_bytes + (4 if head_bytes == 2 else 0) + 4) * BTV   # logits, fp32 upcast, log_softmax out
    loss_bwd = 12 * BTV                                                # + grad of nll, grad of log_softmax
    head_grad_w = (arch.lm_head_params or arch.embed_params) * rc.dense if rc.base_trainable else 0

    persistent = [
        Term("weights", weights, wformula, _unc("counted")),
        Term("adapters", adapters, f"LoRA r={r}: {n_train:,} params x {rc.adapter_bytes} B (peft keeps adapters fp32)",
             _unc("counted")) if rc.adapters else None,
        Term("optimizer_states", states, sformula, _unc("counted")),
        Term("cublas_workspace", ws, f"cuBLAS workspace on {dev.arch or dev.kind}", _unc("workspace")),
    ]
    persistent = [t for t in persistent if t and t.bytes]
    with_states = persistent
    if paged:                             # the states wait in host memory while activations need the room
        persistent = [t for t in persistent if t.name != "optimizer_states"]
    act_term = Term("activations", acts_layers + acts_global, acts_formula + f" + final norm, rope, ids {acts_global:,.0f}",
                    act_rel)
    kernel_rel = _unc("math_attention") if kern in ("math", "eager") else 0.0
    if kernel_rel:
        act_term.rel = max(act_term.rel, kernel_rel)

    phases: dict[str, list[Term]] = {}
    if autocast_cache:
        cache_t = Term("autocast_weight_cache", autocast_cache,
                       "bf16 copies of every trainable linear + lm_head weight, cached by autocast for the forward",
                       _unc("counted"))
    if loss == "chunked":
        # engine/runs/stages/loss.py: the gradient of the hidden states (and of the head weight,
        # when it trains) is made chunk by chunk in the forward; one chunk's logits, their fp32
        # copy (softmax and its gradient computed in place) and the gradient cast back are the
        # largest loss buffers. Backward scales the stored gradient (a second B*T*h copy).
        C = min(BT, loss_chunk) if loss_chunk else loss_chunk_tokens(V, BT)
        chunk_b = (head_bytes + 4 if head_bytes == 2 else 4) * C * V
        gh = BT * h * R
        head_g = [Term("gradients", head_grad_w, "lm_head gradient (made in the loss forward)", _unc("counted"))] \
            if head_grad_w else []
        phases["forward_end"] = persistent + [act_term] + ([cache_t] if autocast_cache and grad_ckpt else []) + [
            Term("logits_and_loss", gh + chunk_b,
                 f"chunked loss: grad of hidden B*T*h*{R} = {gh:,} + one chunk of C={C} tokens x V={V:,} x "
                 f"({str(head_bytes) + ' logits + 4 fp32' if head_bytes == 2 else '4 fp32 logits'}) = {chunk_b:,}",
                 _unc("loss"))] + head_g
        phases["loss_backward"] = persistent + [act_term, Term(
            "logits_and_loss", 2 * gh, f"stored grad of hidden x grad_output: 2 x B*T*h*{R}", _unc("loss"))] + head_g
    else:
        phases["forward_end"] = persistent + [act_term] + ([cache_t] if autocast_cache and grad_ckpt else []) + [
            Term("logits_and_loss", loss_fwd,
                 f"B*T*V = {BTV:,} x ({head_bytes} logits + {'4 fp32 upcast + ' if head_bytes == 2 else ''}4 log_softmax)",
                 _unc("loss"))]
        phases["loss_backward"] = persistent + [act_term, Term(
            "logits_and_loss", loss_bwd, f"B*T*V = {BTV:,} x 12 (log_softmax out + grad nll + grad log_softmax, fp32)",
            _unc("loss"))]
        phases["head_backward"] = persistent + [act_term, Term(
            "logits_and_loss", BTV * head_bytes + BT * h * head_bytes, "grad of logits + grad of the last hidden state",
            _unc("loss"))] + ([Term("gradients", head_grad_w, "lm_head gradient", _unc("counted"))] if head_grad_w else [])
    top = [act_term]
    if grad_ckpt:
        top.append(Term("recomputed_layer", recompute, f"one layer recomputed: {per_layer_tok:,.0f} B/token x BT",
                        act_rel))
    top.append(Term("layer_working", ws_tok * BT,
                    f"top layer's backward transients: ~{ws_tok:,.0f} B/token x BT (fitted a*I + b*h)", _unc("working")))
    if head_grad_w:
        top.append(Term("gradients", head_grad_w, "lm_head gradient", _unc("counted")))
    phases["top_layer_backward"] = persistent + top
    if rc.base_trainable:
        # layer 0's backward: every gradient above it exists; its own input, saved tensors and
        # transients are the only activations left
        layer0_grads = arch.linear_params_per_layer + arch.norm_params_per_layer
        bottom_acts = (R * h * BT if grad_ckpt else 0) + layer0_tok * BT + wsaved0
        phases["bottom_layer_backward"] = persistent + [
            Term("activations", bottom_acts, "layer 0's input and saved tensors", act_rel),
            Term("layer_working", ws_tok * BT, "layer 0's backward transients", _unc("working")),
            Term("gradients", grads - (arch.embed_params * rc.dense if not arch.tie_embeddings else 0)
                 - layer0_grads * rc.dense, "every gradient above layer 0", _unc("counted"))]
    phases["optimizer_step"] = with_states + [
        Term("gradients", grads, f"{n_train:,} trainable x {pb} B", _unc("counted"))] + ([
        Term("optimizer_temp", opt_tmp, "foreach AdamW: sqrt(exp_avg_sq) for all params at once", _unc("counted"))]
        if opt_tmp else [])

    totals = {name: _sum_terms(ts) for name, ts in phases.items()}
    peak_phase = max(totals, key=lambda k: totals[k][0])
    peak, low, high = totals[peak_phase]
    breakdown: dict[str, int] = {}
    for t in phases[peak_phase]:
        breakdown[t.name] = breakdown.get(t.name, 0) + int(round(t.bytes))
    # integer rounding: make the parts sum exactly to the peak
    diff = peak - sum(breakdown.values())
    if diff:
        k = max(breakdown, key=breakdown.get)
        breakdown[k] += diff

    terms = {t.name: t.to_dict() for t in phases[peak_phase]}
    if kern == "math":
        notes.append(f"attention runs SDPA's math kernel: inputs are fp32 and the model uses GQA "
                     f"({arch.num_heads} q / {arch.num_kv_heads} kv heads), which flash (bf16 only) and "
                     f"mem-efficient (no GQA) refuse; it stores H x T x T fp32 probabilities per layer "
                     f"({4 * arch.num_heads * T * BT:,.0f} B per layer here)")
    if rc.base_4bit:
        up = (wb["embed_tokens"] + wb["lm_head"] + wb["norms"] + wb["other"]) // 2
        notes.append(f"prepare_model_for_kbit_training upcasts embeddings, norms and lm_head to fp32 (+{up:,} B) "
                     "and with them the hidden states; skipping the upcast and training under bf16 autocast "
                     "would save that and the fp32 activations")
    if rc.adapters and not rc.autocast and rc.residual == 2:
        notes.append("peft keeps LoRA adapters in fp32 (autocast_adapter_dtype=True) and casts each adapted "
                     "linear's bf16 input to fp32, saving one fp32 copy per adapted linear; bf16 adapters would "
                     f"save {BT * _fp32_copies_saving(arch, lay):,.0f} B of activations")
    if loss == "reference":
        C = loss_chunk_tokens(V, BT)
        chunk_peak = max((head_bytes + 4 if head_bytes == 2 else 4) * C * V + BT * h * R, 2 * BT * h * R)
        notes.append(f"the engine's chunked loss (train.loss: chunked, estimate --loss chunked) never holds the "
                     f"B*T*V fp32 buffers: its loss term is {chunk_peak:,.0f} B instead of {loss_bwd:,.0f} B")
    else:
        notes.append(f"chunked loss: chunks of {C} tokens (fp32 logits of a chunk <= "
                     f"{CHUNK_LOGITS_BYTES // 2 ** 20} MiB); the reference recipe's loss holds {loss_bwd:,.0f} B")
    if approx:
        notes.append(f"{arch.model_type} block modelled from the llama-like block"
                     f"{' with top-' + str(arch.experts_per_token) + ' experts per token' if arch.num_experts else ''}; "
                     f"interval widened to +-{int(act_rel * 100)}% on activations")
        if arch.num_experts and rc.adapters:
            notes.append("transformers 5 stores MoE experts as fused 3-D parameters: " + (
                "peft adapts them through ParamWrapper, which materialises W + B@A per expert every forward"
                if arch.model_type in PEFT_PARAM_WRAPPED else
                "peft's target_modules reach the attention projections only") + " (peft 0.21 behaviour)")
    if T > arch.max_positions:
        notes.append(f"seq_len {T} exceeds the model's max_position_embeddings {arch.max_positions}")
    opt_alt = {}
    for name in ("adamw-8bit", "paged-adamw-8bit"):
        o = rt()["optimizers"][name]
        opt_alt[name] = {"optimizer_states": int(n_train * o["state_bytes_per_param"]), "note": o["note"]}
    return {
        "peak_allocated_bytes": peak, "low": low, "high": high, "peak_phase": peak_phase,
        "breakdown": breakdown, "terms": terms,
        "phases": {k: v[0] for k, v in totals.items()},
        "attention_kernel": kern, "trainable_params": n_train,
        "activations_per_layer_per_token": {k: int(round(v)) for k, v in lay.items()},
        "optimizer_alternatives": opt_alt, "notes": notes, "approximate": approx,
        "optimizer": optimizer, "optimizer_states_bytes": int(states),
        "persistent_bytes": int(sum(breakdown.get(k, 0) for k in PERSISTENT_PARTS)),
    }


def _fp32_copies_saving(arch: ModelArch, lay: dict) -> float:
    """Per token per model: half of the fp32 input copies LoRA saves (bf16 instead of fp32)."""
    return arch.num_layers * lay.get("linear_inputs", 0) / 2


# ---- inference ----------------------------------------------------------------------------

def kv_cache_bytes(arch: ModelArch, batch: int, tokens: int, bytes_per_elem: float = 2.0) -> float:
    return batch * tokens * arch.kv_cache_bytes_per_token(bytes_per_elem)


def infer_memory(arch: ModelArch, fmt, batch_size: int = 1, prompt_len: int = 512, new_tokens: int = 128,
                 dev: hardware.Device | None = None, round_to: int = F.CUDA_BLOCK,
                 include_workspace: bool = True) -> dict:
    """Memory of greedy ``generate`` with a DynamicCache (transformers 5).

    Prefill runs the prompt through one layer at a time (no autograd: transients only) and
    computes logits for the last position only (generate sets logits_to_keep=1). Decode grows
    the cache by torch.cat per layer (old + new copy of one layer alive during the cat).
    """
    dev = dev or device(None)
    fmt = F.get(fmt)
    B, P, N = batch_size, prompt_len, new_tokens
    wb = F.weights_breakdown(arch, fmt, round_to)
    weights = sum(wb.values())
    ws = cublas_workspace(dev) if include_workspace else 0
    h, V = arch.hidden_size, arch.vocab_size
    I = arch.intermediate_size * (arch.experts_per_token if arch.num_experts else 1)
    q, kv = arch.num_heads * arch.head_dim, arch.kv_dim
    BP = B * P
    approx = arch.model_type not in LLAMA_LIKE or arch.num_experts > 0
    # prefill transients of one layer (bf16 activations): MLP gate/act/up/product alive together,
    # the RMSNorm fp32 upcast, attention q/k/v + rotated copies + output
    mlp = 3 * 2 * I + 2 * h
    attn = 2 * (2 * q + 3 * kv) + 2 * q + 4 * arch.num_heads
    norm = 3 * 4 * h
    per_tok = max(mlp, attn, norm) + 2 * h                           # + the residual stream
    per_layer = 0.0
    biggest = max(l.in_features * l.out_features for l in arch.linears)
    biggest_out = max(l.out_features for l in arch.linears)
    if fmt.kind == "bnb-4bit":
        per_layer = 2 * biggest                                      # dequantized bf16 weight (M > 1)
    elif fmt.kind == "bnb-int8":
        per_tok += 4 * biggest_out + h                               # int32 matmul output + int8 input
        # LLM.int8's outlier decomposition: fp16 working copies of the weight (1.5 x the largest
        # linear in fp16 matches the H100 reference's 8B generate peak; the small models hide it)
        per_layer = 1.5 * 2 * biggest
    kv_prompt = kv_cache_bytes(arch, B, P)
    kv_end = kv_cache_bytes(arch, B, P + N - 1)
    kv_layer_end = kv_end / arch.num_layers / 2                     # one layer's K (or V)
    logits = B * V * (2 + 4)                                         # last-position logits + fp32 copy
    ids = B * (P + N) * 8 * 2
    rel_w = _unc("counted")
    wrk = _unc("working")
    pre = [Term("weights", weights, f"{fmt.id}: " + ", ".join(f"{k} {v:,}" for k, v in wb.items() if v), rel_w),
           Term("kv_cache", kv_prompt, f"2 x {arch.num_layers} layers x {kv} kv dim x 2 B x B*prompt={BP}", 0.0),
           Term("prefill_working", per_tok * BP + per_layer,
                f"one layer's transients: ~{per_tok:,.0f} B/token x {BP} tokens"
                + (f" + {per_layer:,.0f} B dequantized weight" if per_layer else ""), wrk),
           Term("logits", logits, f"B x V x (2 + 4 fp32 copy)", 0.0),
           Term("cublas_workspace", ws, "cuBLAS workspace", _unc("workspace")),
           Term("inputs", ids, "token ids", 0.0)]
    dec = [Term("weights", weights, f"{fmt.id} weights", rel_w),
           Term("kv_cache", kv_end + kv_layer_end,
                f"B x (prompt + new - 1) = {B * (P + N - 1)} tokens x {arch.kv_cache_bytes_per_token(2):,.0f} B "
                "+ one layer's K during torch.cat", 0.0),
           Term("decode_working", B * (per_tok + 4 * biggest_out) + (2 * biggest if fmt.kind == "bnb-4bit" and B > 1 else 0)
                + (per_layer if fmt.kind == "bnb-int8" else 0),
                "one token per sequence through one layer", wrk),
           Term("logits", logits, "B x V x (2 + 4 fp32 copy)", 0.0),
           Term("cublas_workspace", ws, "cuBLAS workspace", _unc("workspace")),
           Term("inputs", ids, "token ids", 0.0)]
    pre = [t for t in pre if t.bytes]
    dec = [t for t in dec if t.bytes]
    tp, td = _sum_terms(pre), _sum_terms(dec)
    peak_phase, terms = ("prefill", pre) if tp[0] >= td[0] else ("decode", dec)
    peak, low, high = max(tp, td, key=lambda x: x[0])
    breakdown = {t.name: int(round(t.bytes)) for t in terms}
    diff = peak - sum(breakdown.values())
    if diff:
        breakdown["weights"] += diff
    notes = []
    if fmt.quantized and arch.num_experts and not fmt.quantizes_fused_experts:
        notes.append(f"{fmt.library} replaces nn.Linear only: transformers 5 keeps MoE experts as fused 3-D "
                     f"parameters, so {wb['unquantized_experts']:,} B of experts stay 16-bit")
    if P + N > arch.max_positions:
        notes.append(f"prompt + new tokens ({P + N}) exceed max_position_embeddings {arch.max_positions}")
    if approx:
        notes.append(f"{arch.model_type} transients modelled from the llama-like block")
    return {"weights_bytes": weights, "weights_breakdown": wb, "peak_allocated_bytes": peak, "low": low,
            "high": high, "peak_phase": peak_phase, "breakdown": breakdown,
            "terms": {t.name: t.to_dict() for t in terms},
            "phases": {"prefill": tp[0], "decode": td[0]},
            "kv_cache_bytes_end": int(kv_end), "notes": notes, "approximate": approx}


# ---- quantization and merge stages -------------------------------------------------------

def quantize_memory(arch: ModelArch, method: str, bits: int = 4, group_size: int = 128,
                    calibration_samples: int = 128, seq_len: int = 2048,
                    dev: hardware.Device | None = None) -> dict:
    """GPU memory of a quantize stage (``method``: an id of the method registry, engine/quant.py).

    Methods that calibrate (gptq: ``calibration: hessian``, awq: ``scale-search``; gptqmodel,
    layer by layer): one decoder layer on the GPU in 16-bit, the calibration inputs and outputs
    of that layer for all samples (16-bit), the forward transients of one calibration sample, and
    while one linear is quantized its Hessian and inverse (fp32 [in, in]) and fp32 working copies
    of its weight, or AWQ's scaled weight copies. The rest of the model waits on the CPU. The
    data-free methods (bitsandbytes, torchao) quantize while loading: the quantized model plus
    the largest 16-bit tensor in flight.
    """
    dev = dev or device(None)
    if str(method or "").strip().lower() not in {*quant.ids(), *(a for m in quant.methods().values() for a in m.aliases)}:
        raise InputError(f"quantize method must be one of {', '.join(quant.ids())}, got {method!r}", field="method")
    m = quant.get(method)
    bits = positive_int("bits", bits)
    n = positive_int("calibration_samples", calibration_samples)
    T = positive_int("seq_len", seq_len)
    ws = cublas_workspace(dev)
    h = arch.hidden_size
    terms: list[Term] = []
    notes: list[str] = []
    if m.calibration:
        if bits not in m.bits:
            raise InputError(f"{m.id} supports bits {', '.join(map(str, m.bits))}, got {bits}", field="bits")
        fmt = F.get(m.format_for(bits)).with_group_size(group_size)
        F.check_group_size(arch, fmt)
        c = rt()["calibration"][m.calibration]
        layer16 = 2 * (arch.linear_params_per_layer + arch.norm_params_per_layer)
        calib = 2 * (2 * n * T * h)                                   # layer inputs + outputs, 16-bit
        ntok = c["batch_size"] * T
        I = arch.intermediate_size * (arch.experts_per_token if arch.num_experts else 1)
        fwd = ntok * (3 * 2 * I + 4 * 4 * h) + c["batch_size"] * arch.num_heads * T * 4 * 0
        biggest_in = max(l.in_features for l in arch.linears)
        biggest = max(l.in_features * l.out_features for l in arch.linears)
        if m.calibration == "hessian":
            per_lin = c["hessian_copies"] * c["hessian_bytes_per_elem"] * biggest_in ** 2 \
                + c["weight_work_copies"] * 4 * biggest
            hess_all = sum(4 * l.in_features ** 2 * l.count for l in arch.linears
                           if l.lora_target in ("q_proj", "k_proj", "v_proj"))
            work = Term("hessian_and_work", per_lin + hess_all,
                        f"Hessian + inverse fp32 {biggest_in}^2 x {c['hessian_copies']} + {c['weight_work_copies']} fp32 "
                        f"copies of the largest weight; q/k/v Hessians accumulate together", _unc("working"))
        else:
            per_lin = 2 * biggest * 3 + 2 * ntok * I * 2
            work = Term("scale_search", per_lin, f"AWQ grid search ({c['grid']} ratios): scaled weight copies + outputs",
                        _unc("working"))
        qlayer = F.weights_breakdown(replace(arch, num_layers=1), fmt, F.CUDA_BLOCK)
        terms = [Term("layer_16bit", layer16, "one decoder layer in 16-bit", _unc("counted")),
                 Term("calibration_activations", calib, f"{n} samples x {T} tokens x h={h} x 2 B, layer inputs + outputs",
                      _unc("counted")),
                 Term("forward_working", fwd, "one calibration sample through the layer", _unc("working")),
                 work,
                 Term("quantized_layer", qlayer["block_linears"] + qlayer["quant_scales"], "packed result of the layer",
                      _unc("counted")),
                 Term("embeddings", 2 * arch.embed_params, "embedding on the GPU to build the first layer's inputs",
                      _unc("counted")),
                 Term("cublas_workspace", ws, "cuBLAS workspace", _unc("workspace"))]
        notes.append("gptqmodel keeps the model on the CPU and moves one layer at a time; calibration inputs stay on the GPU")
    else:
        fmt_id = m.format_for()
        wq = F.weights_bytes(arch, fmt_id)
        biggest = max(max(l.in_features * l.out_features for l in arch.linears), arch.embed_params)
        terms = [Term("quantized_weights", wq, f"{fmt_id} weights", _unc("counted")),
                 Term("tensor_in_flight", 2 * biggest + 4 * max(l.in_features * l.out_features for l in arch.linears) / 64,
                      "the largest 16-bit tensor being loaded and quantized", _unc("working")),
                 Term("cublas_workspace", ws, "cuBLAS workspace", _unc("workspace"))]
        notes.append("quantized while loading (from_pretrained with a quantization_config): one 16-bit tensor at a time")
    terms = [t for t in terms if t.bytes]
    peak, low, high = _sum_terms(terms)
    breakdown = {t.name: int(round(t.bytes)) for t in terms}
    breakdown[max(breakdown, key=breakdown.get)] += peak - sum(breakdown.values())
    return {"peak_allocated_bytes": peak, "low": low, "high": high, "breakdown": breakdown,
            "terms": {t.name: t.to_dict() for t in terms}, "notes": notes}


def merge_memory(arch: ModelArch, base: str = "bf16", lora_rank: int = 16,
                 dev: hardware.Device | None = None) -> dict:
    """Merging LoRA adapters into a 16-bit model (peft merge_and_unload).

    bf16 base: the model + adapters + for the linear being merged delta = B @ A in fp32 and its
    bf16 cast. A 4-bit base (QLoRA) is first dequantized to bf16: the 16-bit model is built
    while the 4-bit one is still resident.
    """
    dev = dev or device(None)
    base = F.get(base)
    r = positive_int("lora_rank", lora_rank)
    w16 = F.weights_bytes(arch, "bf16")
    lora = 4 * arch.lora_params(r)
    biggest = max(l.in_features * l.out_features for l in arch.linears)
    terms = [Term("weights_16bit", w16, "the merged model in bf16", _unc("counted")),
             Term("adapters", lora, f"LoRA r={r} fp32", _unc("counted")),
             Term("delta", biggest * (4 + 2), "B @ A of the largest linear in fp32 + its bf16 cast", _unc("counted")),
             Term("cublas_workspace", cublas_workspace(dev), "cuBLAS workspace", _unc("workspace"))]
    if base.quantized:
        terms.append(Term("quantized_base", F.weights_bytes(arch, base), f"{base.id} base still resident while dequantizing",
                          _unc("counted")))
    terms = [t for t in terms if t.bytes]
    peak, low, high = _sum_terms(terms)
    breakdown = {t.name: int(round(t.bytes)) for t in terms}
    breakdown["weights_16bit"] += peak - sum(breakdown.values())
    return {"peak_allocated_bytes": peak, "low": low, "high": high, "breakdown": breakdown,
            "terms": {t.name: t.to_dict() for t in terms}, "notes": []}


def device_bytes(peak: int, low: int, high: int, dev: hardware.Device, kind: str, method: str | None = None,
                 libraries: tuple[str, ...] = (), persistent: float | None = None) -> dict:
    """What the GPU must have: peak + CUDA context + allocator slack, with its interval."""
    ctx, ctx_lo, ctx_hi = context_bytes(dev, kind, libraries)
    s = slack(kind)
    sl, frac = slack_bytes(kind, peak, method, persistent)
    value = peak + ctx + sl
    lo = low + ctx_lo + low * min(s["low"], frac)
    hi = high + ctx_hi + high * max(s["high"], frac)
    return {"device_bytes": int(round(value)), "device_low": int(round(lo)), "device_high": int(round(hi)),
            "cuda_context_bytes": ctx, "allocator_slack_bytes": int(round(sl)),
            "usable_bytes": dev.memory_bytes, "fits": value <= dev.memory_bytes,
            "fits_high": hi <= dev.memory_bytes}
