"""Model architecture: what every estimate needs to know about a model, and where it comes from.

``resolve(ref)`` accepts, in this order:

1. a preset id from ``presets/models/`` (``llama-3.1-8b``) or a preset's hub id
   (``meta-llama/Llama-3.1-8B``: known offline);
2. a local model directory holding ``config.json``, or a path to a ``config.json``;
   a ``.gguf`` file (or a directory holding one and no config.json): the architecture is read from
   the GGUF metadata with the ``gguf`` package (``gguf_config``), no weights loaded;
3. a mapping: a ``config.json``-style dict, or ``{"params_b": 13, "family": "llama-2"}``;
4. any other hub id: its ``config.json`` through ``huggingface_hub`` when online.

The result is a ``ModelArch``: the shapes of every linear layer, the embeddings, the norms,
and MoE experts (total vs active), so weights, quantized bytes, LoRA parameters, KV cache and
FLOPs are counted from modules, not guessed from a parameter total. Pure Python: no torch.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine import demo_presets, safeload
from engine.errors import InputError
from engine.presets import load_dir
from engine.vocab import ATTENTION_TARGETS, LORA_TARGETS, MODEL_FAMILIES as FAMILIES


# model_type of config.json -> family, where the type alone tells it
_FAMILY_OF_TYPE = {
    "mistral": "mistral", "mixtral": "mixtral", "qwen2": "qwen2", "qwen2_moe": "qwen2",
    "qwen3": "qwen3", "qwen3_moe": "qwen3", "gemma": "gemma", "gemma2": "gemma",
    "gemma3": "gemma", "gemma3_text": "gemma", "phi3": "phi", "phi": "phi", "opt": "opt",
    "bloom": "bloom",
}


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block, as it appears in the Hugging Face module tree."""

    name: str             # module path below the block, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int
    bias: bool = False
    count: int = 1        # copies per block (MoE experts)
    active: int = 1       # copies used per token (MoE: experts per token)
    lora_target: str = ""  # which of LORA_TARGETS this is ("" if none)

    @property
    def params(self) -> int:
        return self.count * (self.in_features * self.out_features + (self.out_features if self.bias else 0))


@dataclass(frozen=True)
class ModelArch:
    name: str
    family: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    max_positions: int
    num_experts: int = 0          # 0: dense
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    linears: tuple[Linear, ...] = ()   # per decoder block
    norm_params_per_layer: int = 0     # norm weights (and biases) in one block
    extra_params: int = 0              # final norm, position embeddings, router... (16-bit)
    source: str = ""                   # "preset:llama-3.1-8b", "file:/x/config.json", "hub:org/m", "size-only"
    hub_id: str = ""
    approximate: bool = False          # True when only size and family were given
    notes: tuple[str, ...] = ()

    # ---- counts -------------------------------------------------------------------------
    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Parameters of the output projection that are not shared with the embedding."""
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    @property
    def linear_params_per_layer(self) -> int:
        return sum(l.params for l in self.linears)

    @property
    def linear_params(self) -> int:
        """All block linears: what quantization (GPTQ, NF4, int8...) replaces."""
        return self.num_layers * self.linear_params_per_layer

    @property
    def total_params(self) -> int:
        return (self.linear_params + self.num_layers * self.norm_params_per_layer
                + self.embed_params + self.lm_head_params + self.extra_params)

    @property
    def active_params(self) -> int:
        """Parameters touched per token (MoE: only the routed experts)."""
        act = sum(l.params // l.count * l.active for l in self.linears)
        return (self.num_layers * (act + self.norm_params_per_layer)
                + self.embed_params + self.lm_head_params + self.extra_params)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_cache_bytes_per_token(self, bytes_per_elem: float = 2.0) -> float:
        """K and V for every layer (GQA-aware: kv heads, not attention heads)."""
        return 2 * self.num_layers * self.kv_dim * bytes_per_elem

    def lora_params(self, rank: int, targets=LORA_TARGETS) -> int:
        """LoRA A (r x in) and B (out x r) on every targeted linear (all experts for MoE)."""
        per = sum(l.count * rank * (l.in_features + l.out_features)
                  for l in self.linears if l.lora_target in targets)
        return self.num_layers * per

    def to_dict(self) -> dict:
        return {
            "name": self.name, "family": self.family, "model_type": self.model_type,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_layers": self.num_layers, "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "tie_embeddings": self.tie_embeddings,
            "max_positions": self.max_positions, "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "total_params": self.total_params, "active_params": self.active_params,
            "source": self.source, "approximate": self.approximate, "notes": list(self.notes),
        }


# ---- LoRA on this architecture (what peft adapts; the train stage and the estimates share it) --

# MoE types whose fused expert parameters peft (0.21) maps target_modules gate/up/down onto
# (ParamWrapper); on the others (mixtral) LoRA reaches the attention projections only
PEFT_PARAM_WRAPPED = ("qwen3_moe",)     # qwen2_moe: peft reaches the shared expert's nn.Linear only


def lora_targets(arch: ModelArch) -> tuple[str, ...]:
    """The LoRA targets (llama names) peft can adapt on this architecture."""
    if arch.num_experts and arch.model_type not in PEFT_PARAM_WRAPPED:
        return ATTENTION_TARGETS
    return LORA_TARGETS


def lora_modules(arch: ModelArch, targets=LORA_TARGETS) -> list[str]:
    """peft ``target_modules`` for LoRA targets given by their llama names (q_proj ... down_proj):
    the module names this architecture uses for them (ModelArch.linears: phi3 qkv_proj/gate_up_proj,
    opt out_proj/fc1/fc2, bloom query_key_value/dense/dense_h_to_4h/dense_4h_to_h), restricted
    to what peft adapts (MoE experts only where peft wraps them). The train stage adapts these
    modules and the estimate counts the same ones."""
    allowed = lora_targets(arch)
    out: list[str] = []
    for lin in arch.linears:
        leaf = lin.name.rsplit(".", 1)[-1]
        if lin.lora_target in targets and lin.lora_target in allowed and leaf not in out:
            out.append(leaf)
    return out


def lora_param_count(arch: ModelArch, rank: int, targets=None) -> int:
    """LoRA parameters peft creates for this architecture (targets: lora_targets(arch)).
    Where peft wraps fused MoE experts (ParamWrapper), the fused gate_up_proj [E, 2I, h] gets
    rank 2r over E experts, 2r·E·(h + 2I), where two separate gate/up adapters would be
    2r·E·(h + I): checked against peft 0.21 on tiny random-init models."""
    targets = lora_targets(arch) if targets is None else targets
    n = arch.lora_params(rank, targets)
    if arch.num_experts and arch.model_type in PEFT_PARAM_WRAPPED and {"gate_proj", "up_proj"} <= set(targets):
        n += arch.num_layers * 2 * rank * arch.num_experts * arch.moe_intermediate_size
    return n


# ---- parsing config.json ------------------------------------------------------------------

def _get(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def family_of(cfg: dict, name: str = "") -> str:
    """Guess the family from model_type and the name (llama's generations share a type)."""
    mt = cfg.get("model_type", "")
    if mt in _FAMILY_OF_TYPE:
        return _FAMILY_OF_TYPE[mt]
    low = name.lower()
    if mt == "llama" or "llama" in low:
        if cfg.get("vocab_size", 0) >= 100000 or "llama-3" in low or "llama3" in low:
            return "llama-3"
        if cfg.get("max_position_embeddings", 0) >= 4096 or "llama-2" in low:
            return "llama-2"
        return "llama-1"
    return mt or "unknown"


def arch_from_config(cfg: dict, name: str = "", source: str = "", family: str = "",
                     hub_id: str = "") -> ModelArch:
    """Build a ModelArch from a Hugging Face ``config.json`` dict."""
    if not isinstance(cfg, dict):
        raise InputError(f"config of {name or 'model'} must be a JSON object, not a {type(cfg).__name__}",
                         field="model")
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:   # multimodal wrapper: the text tower
        cfg = {**cfg["text_config"], "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}
    _check_sizes(cfg, name)
    cfg = {k: (int(v) if k in _SIZE_FIELDS and isinstance(v, float) else v) for k, v in cfg.items()}
    mt = cfg.get("model_type", "")
    if not isinstance(mt, str):
        raise InputError(f"config of {name or 'model'}: model_type must be a string, got {mt!r}", field="model")
    h = _get(cfg, "hidden_size", "n_embd", "d_model")
    layers = _get(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(cfg, "num_attention_heads", "n_head", "num_heads")
    vocab = _get(cfg, "vocab_size")
    missing = [k for k, v in (("hidden_size", h), ("num_hidden_layers", layers),
                              ("num_attention_heads", heads), ("vocab_size", vocab)) if not v]
    if missing:
        raise InputError(f"config of {name or 'model'} lacks {', '.join(missing)}; "
                         "give a causal LM config.json (llama, mistral, mixtral, qwen2/3, gemma, phi3, opt, bloom)",
                         field="model")
    kv = _get(cfg, "num_key_value_heads", default=heads)
    hd = _get(cfg, "head_dim", default=h // heads)
    inter = _get(cfg, "intermediate_size", "ffn_dim", "n_inner", default=4 * h)
    tie = bool(cfg.get("tie_word_embeddings", True if mt in ("opt", "bloom", "gpt2") else False))
    maxpos = _get(cfg, "max_position_embeddings", "n_positions", "seq_length", default=2048)
    experts = _get(cfg, "num_local_experts", "num_experts", default=0) or 0
    topk = _get(cfg, "num_experts_per_tok", default=0) if experts else 0
    moe_inter = _get(cfg, "moe_intermediate_size", default=inter) if experts else 0
    notes = []
    linears: list[Linear]
    extra = h  # final norm weight
    if mt == "opt":
        b = cfg.get("enable_bias", True)
        linears = [Linear("self_attn.q_proj", h, h, b, lora_target="q_proj"),
                   Linear("self_attn.k_proj", h, h, b, lora_target="k_proj"),
                   Linear("self_attn.v_proj", h, h, b, lora_target="v_proj"),
                   Linear("self_attn.out_proj", h, h, b, lora_target="o_proj"),
                   Linear("fc1", h, inter, b, lora_target="up_proj"),
                   Linear("fc2", inter, h, b, lora_target="down_proj")]
        norm = 2 * 2 * h                       # two LayerNorms with bias
        extra = 2 * h + (maxpos + 2) * h       # final LayerNorm + learned positions (offset 2)
        kv, hd = heads, h // heads
    elif mt == "bloom":
        inter = 4 * h
        linears = [Linear("self_attention.query_key_value", h, 3 * h, True, lora_target="q_proj"),
                   Linear("self_attention.dense", h, h, True, lora_target="o_proj"),
                   Linear("mlp.dense_h_to_4h", h, inter, True, lora_target="up_proj"),
                   Linear("mlp.dense_4h_to_h", inter, h, True, lora_target="down_proj")]
        norm = 2 * 2 * h
        extra = 2 * h + 2 * h                  # final LayerNorm + embedding LayerNorm
        kv, hd = heads, h // heads
    else:  # llama-like decoders: llama, mistral, mixtral, qwen2/3(+moe), gemma 1/2/3, phi3
        qkv_bias = bool(cfg.get("attention_bias", mt in ("qwen2", "qwen2_moe")))
        if mt == "phi3":
            linears = [Linear("self_attn.qkv_proj", h, (heads + 2 * kv) * hd, qkv_bias, lora_target="q_proj"),
                       Linear("self_attn.o_proj", heads * hd, h, lora_target="o_proj"),
                       Linear("mlp.gate_up_proj", h, 2 * inter, lora_target="up_proj"),
                       Linear("mlp.down_proj", inter, h, lora_target="down_proj")]
            notes.append("phi3 fuses q/k/v and gate/up: LoRA targets qkv_proj, o_proj, gate_up_proj, down_proj")
        else:
            linears = [Linear("self_attn.q_proj", h, heads * hd, qkv_bias, lora_target="q_proj"),
                       Linear("self_attn.k_proj", h, kv * hd, qkv_bias, lora_target="k_proj"),
                       Linear("self_attn.v_proj", h, kv * hd, qkv_bias, lora_target="v_proj"),
                       Linear("self_attn.o_proj", heads * hd, h, lora_target="o_proj")]
            if experts:
                pre = "block_sparse_moe.experts" if mt == "mixtral" else "mlp.experts"
                linears += [Linear(f"{pre}.gate_proj", h, moe_inter, count=experts, active=topk, lora_target="gate_proj"),
                            Linear(f"{pre}.up_proj", h, moe_inter, count=experts, active=topk, lora_target="up_proj"),
                            Linear(f"{pre}.down_proj", moe_inter, h, count=experts, active=topk, lora_target="down_proj")]
                extra += 0  # router counted in norm_params below (kept 16-bit, tiny)
                shared = _get(cfg, "shared_expert_intermediate_size", default=0) if mt == "qwen2_moe" else 0
                if shared:       # Qwen2-MoE: one always-on shared expert (plain nn.Linear) and its sigmoid gate
                    linears += [Linear("mlp.shared_expert.gate_proj", h, shared, lora_target="gate_proj"),
                                Linear("mlp.shared_expert.up_proj", h, shared, lora_target="up_proj"),
                                Linear("mlp.shared_expert.down_proj", shared, h, lora_target="down_proj"),
                                Linear("mlp.shared_expert_gate", h, 1)]
            else:
                linears += [Linear("mlp.gate_proj", h, inter, lora_target="gate_proj"),
                            Linear("mlp.up_proj", h, inter, lora_target="up_proj"),
                            Linear("mlp.down_proj", inter, h, lora_target="down_proj")]
        norm = (4 if mt in ("gemma2", "gemma3", "gemma3_text") else 2) * h
        if mt in ("qwen3", "qwen3_moe", "gemma3", "gemma3_text"):
            norm += 2 * hd                     # q_norm and k_norm
        if experts:
            norm += h * experts                # router (gate) weight: not quantized by GPTQ/bnb
    if not family:
        known = _preset_with_architecture(cfg)
        if known:
            family = presets()[known]["family"]
            notes.append(f"family {family}: the architecture is preset {known}'s (layer sizes, heads, vocabulary)")
        else:
            family = family_of(cfg, name)
    return ModelArch(
        name=name or cfg.get("_name_or_path", "") or mt, family=family, model_type=mt,
        hidden_size=h, intermediate_size=moe_inter if experts else inter, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, head_dim=hd, vocab_size=vocab, tie_embeddings=tie,
        max_positions=maxpos, num_experts=experts, experts_per_token=topk,
        moe_intermediate_size=moe_inter, linears=tuple(linears), norm_params_per_layer=norm,
        extra_params=extra, source=source, hub_id=hub_id, notes=tuple(notes),
    )


# ---- presets and resolution ---------------------------------------------------------------

def presets() -> dict[str, dict]:
    """Every model preset, keyed by id."""
    return load_dir("models")


# the fields that make two configs the same network; a local copy of a preset model (a config.json
# folder or a GGUF file, whose name says nothing) then gets the preset's family, as its hub id would
_SAME_NETWORK = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "vocab_size")


def _preset_with_architecture(cfg: dict) -> str:
    """The preset whose config has exactly ``cfg``'s network shape, if all such presets share a family."""
    if any(cfg.get(k) is None for k in _SAME_NETWORK):
        return ""
    same = [pid for pid, p in presets().items()
            if p.get("family") and all(p.get("config", {}).get(k) == cfg.get(k) for k in _SAME_NETWORK)]
    return sorted(same)[0] if same and len({presets()[pid]["family"] for pid in same}) == 1 else ""


def preset_ids() -> list[str]:
    return sorted(presets())


def _from_preset(pid: str) -> ModelArch:
    p = presets()[pid]
    return arch_from_config(p["config"], name=pid, source=f"preset:{pid}", family=p.get("family", ""),
                            hub_id=p.get("hub_id", ""))


def from_size(params_b: float, family: str) -> ModelArch:
    """An architecture of the family scaled to ``params_b`` billion parameters.

    Takes the family's preset nearest in size and scales its depth; estimates made from it are
    marked approximate, since width, vocabulary and attention layout are the neighbour's.
    """
    try:
        params_b = float(params_b)
    except (TypeError, ValueError):
        raise InputError(f"params_b must be a number of billions of parameters, got {params_b!r}", field="params_b")
    if not 0.01 <= params_b <= 2000:
        raise InputError(f"params_b must be between 0.01 and 2000 (billions), got {params_b}", field="params_b")
    fam = [pid for pid, p in presets().items() if p.get("family") == family]
    if not fam:
        raise InputError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}", field="family")
    near = min(fam, key=lambda pid: abs(presets()[pid]["params_b"] - params_b) / params_b)
    base = _from_preset(near)
    per_layer = base.linear_params_per_layer + base.norm_params_per_layer
    fixed = base.total_params - base.num_layers * per_layer
    layers = max(1, round((params_b * 1e9 - fixed) / per_layer))
    arch = replace(base, num_layers=layers, name=f"{family}-{params_b:g}b", source="size-only",
                   approximate=True, hub_id="",
                   notes=base.notes + (f"only size and family given: {near}'s width with {layers} layers",))
    return arch


def _read_config(path: Path) -> dict:
    text = safeload.read_text(path, "config.json", field="model")
    try:
        cfg = safeload.loads_json(text, f"config.json {path}", field="model")
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}", field="model")
    if not isinstance(cfg, dict):
        raise InputError(f"{path} must hold a JSON object (a model's config.json), not a {type(cfg).__name__}",
                         field="model")
    return cfg


# the config.json fields the architecture is built from: each must be a whole number in this range
_SIZE_FIELDS = {"hidden_size": 2**20, "n_embd": 2**20, "d_model": 2**20, "num_hidden_layers": 10_000,
                "n_layer": 10_000, "num_layers": 10_000, "num_attention_heads": 65_536, "n_head": 65_536,
                "num_heads": 65_536, "vocab_size": 2**24, "num_key_value_heads": 65_536, "head_dim": 65_536,
                "intermediate_size": 2**22, "ffn_dim": 2**22, "n_inner": 2**22,
                "max_position_embeddings": 2**26, "n_positions": 2**26, "seq_length": 2**26,
                "num_local_experts": 65_536, "num_experts": 65_536, "num_experts_per_tok": 65_536,
                "moe_intermediate_size": 2**22}


def _check_sizes(cfg: dict, name: str) -> None:
    """Refuse a config whose size fields are not whole numbers in range (a string, NaN, 1e400,
    -64): the estimates built on them would be meaningless (negative memory that "fits")."""
    for k, high in _SIZE_FIELDS.items():
        v = cfg.get(k)
        if v is None:
            continue
        ok = safeload.finite_number(v) and float(v).is_integer()
        if not ok or not (1 <= v <= high) and not (k in ("num_local_experts", "num_experts",
                                                           "num_experts_per_tok") and v == 0):
            raise InputError(f"config of {name or 'model'}: {k} must be a whole number from 1 to {high:,}, "
                             f"got {v!r}", field="model")


def closest_presets(ref: str, n: int = 6) -> list[str]:
    """The ``n`` preset ids nearest to what was typed (difflib's ratio against the preset id and the
    name part of its hub id), closest first: what a person who mistyped a model most likely meant."""
    import difflib
    want = str(ref).strip().lower().rsplit("/", 1)[-1]
    ps = presets()

    def score(pid: str) -> float:
        names = (pid, str(ps[pid].get("hub_id", "")).lower().rsplit("/", 1)[-1])
        return max(difflib.SequenceMatcher(None, want, x).ratio() for x in names if x)
    return sorted(ps, key=lambda pid: (-score(pid), pid))[:n]


def resolve(ref) -> ModelArch:
    """Resolve a model reference (see the module docstring) to its architecture."""
    if isinstance(ref, ModelArch):
        return ref
    if isinstance(ref, dict):
        if "params_b" in ref and "hidden_size" not in ref:
            if "family" not in ref:
                raise InputError("a model given by size needs a family too, e.g. {params_b: 13, family: llama-2}; "
                                 f"families: {', '.join(FAMILIES)}", field="model")
            return from_size(ref["params_b"], ref["family"])
        return arch_from_config(ref, name=ref.get("_name_or_path", ""), source="config")
    if not isinstance(ref, str) or not ref.strip():
        raise InputError("model is required: a preset id (e.g. llama-3.1-8b), a local model dir, "
                         "a config.json path or a hub id", field="model")
    ref = ref.strip()
    if ref.startswith("demo:"):                  # the project's own offline demo models (presets/demo/models.yaml)
        name = demo_presets.model_name(ref)
        return arch_from_config(demo_presets.hf_config(name), name=ref, source=f"demo:{name}")
    ps = presets()
    if ref.lower() in ps:
        return _from_preset(ref.lower())
    by_hub = {p.get("hub_id", "").lower(): pid for pid, p in ps.items()}
    if ref.lower() in by_hub:
        return _from_preset(by_hub[ref.lower()])
    path = Path(os.path.expanduser(ref))
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return from_gguf(ggufs[0])
            if ggufs:
                raise InputError(f"{path} holds several GGUF files ({', '.join(g.name for g in ggufs)}); "
                                 "name the one to use", field="model")
            raise InputError(f"{path} is a directory without config.json (or a .gguf file); point at a saved "
                             "model dir", field="model")
        return arch_from_config(_read_config(path / "config.json"), name=path.name, source=f"dir:{path}")
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise InputError(f"GGUF file {str(path)!r} not found", field="model")
        return from_gguf(path)
    if path.is_file():
        # a file named after its model keeps that name; a plain config.json is named by the model it
        # says it is (_name_or_path), else by its folder
        cfg = _read_config(path)
        named = str(cfg.get("_name_or_path") or "").rstrip("/").rsplit("/", 1)[-1]
        name = path.stem if path.stem.lower() != "config" else (named or path.parent.name or path.stem)
        return arch_from_config(cfg, name=name, source=f"file:{path}")
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        return _from_hub(ref)
    raise InputError(f"unknown model {ref!r}: not a preset, a local dir or a config.json. "
                     f"Closest presets: {', '.join(closest_presets(ref))}", field="model")


# ---- GGUF files (llama.cpp's format): the architecture from the metadata ------------------------

# GGUF general.architecture -> config.json model_type (llama.cpp names; mistral is stored as llama)
GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen2moe": "qwen2_moe", "qwen3": "qwen3",
              "qwen3moe": "qwen3_moe", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text",
              "phi3": "phi3", "bloom": "bloom"}
GGUF_INSTALL = "pip install gguf==0.19.0 (./dev.sh setup installs it)"


def _gguf_value(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    v = f.contents()
    if isinstance(v, list):              # per-layer arrays (some models vary heads or ffn by layer)
        v = max(v) if v and all(isinstance(x, (int, float)) for x in v) else v
    return v


def read_gguf(path) -> "object":
    """A ``gguf.GGUFReader`` on ``path`` (memory-mapped; reads the header, metadata and tensor
    table, not the weights). InputError naming the problem: not a GGUF file, truncated or
    corrupt, or the gguf package missing."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise InputError(f"cannot read GGUF file {path}: {e.strerror or e}", field="model")
    if magic != b"GGUF":
        raise InputError(f"{path} is not a GGUF file: it starts with {magic!r}, a GGUF file with b'GGUF'",
                         field="model")
    try:
        import gguf
    except ImportError:
        raise InputError(f"reading {path.name} needs the gguf package: {GGUF_INSTALL}", field="model") from None
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:                       # noqa: BLE001 - the reader raises numpy errors on short files
        raise InputError(f"{path} is a truncated or corrupt GGUF file ({size} bytes; reading its header and "
                         f"tensor table failed: {type(e).__name__}: {str(e)[:160]})", field="model") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise InputError(f"{path} is a truncated GGUF file: its tensors end at byte {end}, the file has {size}",
                         field="model")
    return reader


_GGUF_CACHE: dict = {}          # (resolved path, size, mtime_ns) -> the config, or the InputError it gave


def gguf_config(path) -> dict:
    """A config.json-style dict of the model in a GGUF file, from its metadata (no torch, no
    weights): model_type, layers, hidden size, heads, kv heads, head dim, vocabulary, ffn size,
    experts, context, rope base, norm epsilon, and tied embeddings (no ``output.weight`` tensor).
    ``_gguf`` adds what the file stores: its tensor types by count and its file type.

    Remembered per file version (path, size, modification time): the gguf package parses every
    metadata array (a 49k-token vocabulary is ~7 s on 2 cores), and one dashboard recompute resolves
    the model several times."""
    p = Path(path)
    try:
        st = p.resolve().stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key and key in _GGUF_CACHE:
        got = _GGUF_CACHE[key]
        if isinstance(got, InputError):
            raise InputError(str(got), field=got.field)
        return copy.deepcopy(got)
    try:
        cfg = _gguf_config(path)
    except InputError as e:
        if key:
            _GGUF_CACHE[key] = e
        raise
    if key:
        if len(_GGUF_CACHE) > 64:
            _GGUF_CACHE.clear()
        _GGUF_CACHE[key] = copy.deepcopy(cfg)
    return cfg


def _gguf_config(path) -> dict:
    reader = read_gguf(path)
    arch = _gguf_value(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise InputError(f"{Path(path).name}: GGUF architecture {arch!r} is not one this planner counts; known: "
                         f"{', '.join(GGUF_ARCHS)}", field="model")
    a = f"{arch}."
    g = lambda k: _gguf_value(reader, a + k)      # noqa: E731
    names = {t.name: t for t in reader.tensors}
    vocab = g("vocab_size")
    if not vocab:
        toks = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(toks.data) if toks is not None else (int(names["token_embd.weight"].shape[-1])
                                                       if "token_embd.weight" in names else None)
    experts = g("expert_count") or 0
    mt = GGUF_ARCHS[arch]
    if mt == "llama" and experts:
        mt = "mixtral"
    cfg = {"model_type": mt, "num_hidden_layers": g("block_count"), "hidden_size": g("embedding_length"),
           "intermediate_size": g("feed_forward_length"), "num_attention_heads": g("attention.head_count"),
           "num_key_value_heads": g("attention.head_count_kv") or g("attention.head_count"),
           "vocab_size": vocab, "max_position_embeddings": g("context_length"),
           "tie_word_embeddings": "output.weight" not in names,
           "attention_bias": "blk.0.attn_q.bias" in names}
    if g("attention.key_length"):
        cfg["head_dim"] = g("attention.key_length")
    if g("rope.freq_base"):
        cfg["rope_theta"] = g("rope.freq_base")
    if g("attention.layer_norm_rms_epsilon"):
        cfg["rms_norm_eps"] = g("attention.layer_norm_rms_epsilon")
    if experts:
        cfg.update(num_local_experts=experts, num_experts_per_tok=g("expert_used_count"),
                   moe_intermediate_size=g("expert_feed_forward_length") or g("feed_forward_length"))
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size") if not cfg.get(k)]
    if missing:
        raise InputError(f"{Path(path).name}: the GGUF metadata lacks {', '.join(missing)} "
                         f"({a}block_count / embedding_length / attention.head_count, tokenizer.ggml.tokens)",
                         field="model")
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    cfg["_gguf"] = {"architecture": arch, "name": _gguf_value(reader, "general.name"),
                    "tensor_types": dict(sorted(types.items(), key=lambda kv: -kv[1])),
                    "file_bytes": Path(path).stat().st_size}
    return cfg


def from_gguf(path) -> ModelArch:
    path = Path(path)
    cfg = gguf_config(path)
    info = cfg.pop("_gguf")
    arch = arch_from_config(cfg, name=path.stem, source=f"gguf:{path}")
    stored = ", ".join(f"{n} {k}" for k, n in info["tensor_types"].items())
    return replace(arch, notes=arch.notes + (f"read from the GGUF metadata of {path.name} ({info['architecture']}); "
                                             f"the file stores its tensors as {stored}: estimates treat it as the "
                                             "16-bit model those weights came from",))


def _reachable(url: str, timeout_s: float = 2.0) -> bool:
    """Whether a TCP connection to the host of ``url`` opens within ``timeout_s`` (DNS included)."""
    import socket
    from urllib.parse import urlparse
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout_s):
            return True
    except OSError:
        return False


def _from_hub(repo_id: str) -> ModelArch:
    """Fetch config.json of a hub model (needs the network; offline it says so)."""
    try:
        from huggingface_hub import constants, hf_hub_download  # light: no torch
        # offline (HF_HUB_OFFLINE or no route to the hub) only the local cache can answer: asking the hub
        # would retry with back-off for ~25 s before failing, so probe once and go local straight away
        local = bool(constants.HF_HUB_OFFLINE) or not _reachable(constants.ENDPOINT)
        path = hf_hub_download(repo_id, "config.json", local_files_only=local)
    except Exception as e:  # offline, gated, missing: say which and what works offline
        if local:
            raise InputError(f"the model hub ({constants.ENDPOINT}) is not reachable from this machine"
                             f"{' (HF_HUB_OFFLINE is set)' if constants.HF_HUB_OFFLINE else ''} and config.json "
                             f"of {repo_id!r} is not in the local hub cache. Offline, use a preset "
                             f"(closest: {', '.join(closest_presets(repo_id))}), a local model dir or a config.json path",
                             field="model") from None
        raise InputError(f"could not fetch config.json of hub model {repo_id!r} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else 'no detail'}). Offline, use a preset "
                         f"(closest: {', '.join(closest_presets(repo_id))}), a local dir or a config.json path",
                         field="model")
    return arch_from_config(_read_config(Path(path)), name=repo_id.split("/")[-1], source=f"hub:{repo_id}",
                            hub_id=repo_id)
