"""RunSpec: everything a run needs, as a YAML/JSON file or a dict (``presets/runs/*.yaml``).

The strategy (a catalog id of presets/strategies.yaml) says which stages run; the sections
below give their parameters. A stage's own entry in the catalog (e.g. ``bits: 4``) is the
default; ``quantize:`` here overrides it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.errors import InputError
from engine.safeload import load_yaml_file
from engine.vocab import DEFAULT_RUN_LOSS, LORA_TARGETS, LOSS_MODES, OPTIMIZERS, RUN_PRECISIONS


# the largest values a run takes (beyond them a run is meaningless here, and the message says the limit)
MAX_SEQ_LEN = 1_048_576
MAX_LORA_RANK = 4096
MAX_BATCH = 65_536
MAX_STEPS = 10_000_000


class _Strict(BaseModel):
    # NaN and inf are refused everywhere (a learning rate of .inf trains nothing)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataSpec(_Strict):
    path: str | None = None            # JSONL/CSV file; None with `demo:` set
    demo: str | None = None            # a demo dataset the project builds (e.g. "tickets", "json-extraction")
    format: Literal["auto", "text", "instruction", "chat", "classification"] = "auto"
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    max_examples: int | None = Field(None, gt=0)
    seed: int = 0


class TrainParams(_Strict):
    steps: int | None = Field(None, gt=0, le=MAX_STEPS)      # wins over epochs when set
    epochs: float = Field(1.0, gt=0, le=10_000)
    learning_rate: float = Field(2e-4, gt=0, le=10)
    batch_size: int = Field(4, gt=0, le=MAX_BATCH)
    grad_accum: int = Field(1, gt=0, le=MAX_BATCH)
    seq_len: int = Field(512, gt=0, le=MAX_SEQ_LEN)
    # gradient (activation) checkpointing, non-reentrant; `gradient_checkpointing` (the HF/LLaMA-Factory name) too
    grad_ckpt: bool = Field(True, validation_alias=AliasChoices("grad_ckpt", "gradient_checkpointing"))
    lora_rank: int = Field(16, gt=0, le=MAX_LORA_RANK)
    lora_alpha: float | None = None            # default 2 * rank (the reference recipe)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    precision: Literal[RUN_PRECISIONS] = "bf16"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = 1.0
    # chunked: linear cross-entropy over chunks of tokens, no B x T x V logits (stages/loss.py);
    # reference: model(**batch).loss as DESIGN.md's recipe. Same loss and gradients.
    loss: Literal[LOSS_MODES] = DEFAULT_RUN_LOSS
    loss_chunk_tokens: int | None = Field(None, gt=0)   # None: one chunk's fp32 logits <= 128 MiB
    # adamw: torch.optim.AdamW (the recipe); adamw-8bit: bitsandbytes AdamW8bit (blockwise 8-bit
    # states); paged-*: bitsandbytes paged states in unified memory (page to the host under pressure)
    optimizer: Literal[OPTIMIZERS] = "adamw"
    # pack whole examples into sequences of seq_len (each keeps its own positions and attends
    # only to itself): fewer padded positions per step
    packing: bool = False
    # training checkpoints (stages/checkpoint.py): every save_steps optimizer steps (and when stopped) the
    # trainable weights + optimizer state (torch.distributed.checkpoint; sharded per rank under FSDP) go to
    # <run workdir>/checkpoints/checkpoint-<step>/; save_total_limit keeps the last K
    save_steps: int | None = Field(None, gt=0)
    save_total_limit: int | None = Field(None, gt=0)
    # continue from a checkpoint: its folder, a run's workdir or a run id (the last checkpoint there);
    # the same method, model, batch_size, sequences per step, seq_len and seed
    resume_from_checkpoint: str | None = None


class QuantParams(_Strict):
    """Overrides of the strategy's quantize stage (None: keep the catalog's value)."""
    bits: int | None = Field(None, ge=2, le=8)
    group_size: int | None = Field(None, ge=-1, le=MAX_SEQ_LEN)   # -1 or None: per-channel where the method allows
    calibration_samples: int | None = Field(None, gt=0, le=1_000_000)
    double_quant: bool | None = None


class ExportParams(_Strict):
    """Overrides of the strategy's export stage (None: keep the catalog's value)."""
    format: str | None = None                  # e.g. gguf-q4_k_m, gguf-q8_0, gguf-f16 (a gguf target)
    threads: int | None = Field(None, gt=0)    # llama.cpp quantizer threads
    kv_cache: bool | None = None               # executorch: the .pte holds a static KV cache (default true)


class EvalSpec(_Strict):
    perplexity: bool = True
    task_accuracy: bool = True
    latency: bool = True
    before_and_after: bool = True              # evaluate the starting model too
    max_examples: int = Field(64, gt=0, le=10_000_000)
    prompt_len: int = Field(64, gt=0, le=MAX_SEQ_LEN)
    new_tokens: int = Field(32, gt=0, le=MAX_SEQ_LEN)
    runtime: bool = True                       # measure exported artifacts in their runtime (llama.cpp ...)
    runtime_sources: bool = True               # ... the source files too (the f16 GGUF a k-quant was made from)
    # lm-evaluation-harness tasks (engine/runs/stages/harness.py): "run" = the run's own held-out rows as
    # a local task (offline); any other name is a harness task whose dataset comes from the Hub
    harness: list[str] = Field(default_factory=list, max_length=16)
    harness_limit: int | None = Field(None, gt=0, le=100_000)   # documents per task (default max_examples)

    @model_validator(mode="after")
    def _harness_names(self):
        import re
        bad = [t for t in self.harness if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}", t)]
        if bad:
            raise ValueError(f"harness task names are letters, digits, _ . - (e.g. run, hellaswag): {bad[0]!r}")
        return self


class Resources(_Strict):
    """How many processes the train stage runs in (torchrun + FSDP2 full sharding; the other
    stages run once, in the worker). ``processes: N`` on the CPU (gloo), ``gpus: N`` on N GPUs
    of one machine (NCCL, bf16 mixed precision). Neither: one process, as before."""
    processes: int | None = Field(None, ge=1, le=64)
    gpus: int | None = Field(None, ge=1, le=64)

    @model_validator(mode="after")
    def _one(self):
        if self.processes is not None and self.gpus is not None:
            raise ValueError("give processes (CPU) or gpus (GPU), not both")
        return self

    @property
    def world_size(self) -> int:
        return self.gpus or self.processes or 1


class RunSpec(_Strict):
    name: str = ""
    model: str                                  # preset id, local dir or hub id
    strategy: str                               # catalog id (presets/strategies.yaml)
    dataset: DataSpec = Field(default_factory=DataSpec)
    train: TrainParams = Field(default_factory=TrainParams)
    quantize: QuantParams = Field(default_factory=QuantParams)
    export: ExportParams = Field(default_factory=ExportParams)
    evaluate: EvalSpec = Field(default_factory=EvalSpec)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    seed: int = 0
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="after")
    def _resources_match_device(self):
        if self.resources.gpus and self.device == "cpu":
            raise ValueError("resources.gpus asks for GPUs but device is cpu; use resources.processes on the CPU")
        if self.resources.processes and self.device == "cuda":
            raise ValueError("resources.processes is for CPU runs (gloo); on GPUs use resources.gpus")
        return self

    @property
    def world_size(self) -> int:
        """Processes the train stage runs in (1: the worker itself)."""
        return self.resources.world_size

    @classmethod
    def parse(cls, data: dict) -> "RunSpec":
        """Validate a dict; errors name the field and what is allowed."""
        if not isinstance(data, dict):
            raise InputError("a run config must be a mapping (YAML/JSON object)")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            msgs = []
            for err in e.errors():
                where = ".".join(str(x) for x in err["loc"]) or "config"
                msgs.append(f"{where}: {err['msg']}")
            first = e.errors()[0]["loc"]
            raise InputError("bad run config: " + "; ".join(msgs),
                             field=".".join(str(x) for x in first) if first else None)

    @classmethod
    def load(cls, path: str | Path) -> "RunSpec":
        p = Path(path)
        if not p.is_file():
            raise InputError(f"run config {str(path)!r} not found", field="config")
        return cls.parse(load_yaml_file(p, "run config", field="config"))

    @field_validator("quantize")
    @classmethod
    def _group(cls, q):
        if q.group_size == 0:
            raise ValueError("group_size 0 has no meaning: give a group size (32, 64, 128, ...) or -1 for "
                             "per-channel")
        return q

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")
