"""What every stage needs: the model to start from, the dataset, the tokenizer, dtypes,
batches of tokens, memory and size measurements.

torch and transformers are imported inside the functions (the UI imports engine.runs).

State handed from stage to stage (``ctx.state``):
    base_dir          the starting model (a local dir or a hub id), 16-bit
    model_dir         the current model (after train/merge/quantize/convert), a local dir
    quant             how model_dir is quantized: {"method", "bits", "group_size", ...} or None
    adapter_dir       LoRA adapters trained on adapter_base (not merged), or None
    adapter_base      the model the adapters sit on (dir) and its "quant"
    dataset           the engine.runs.data.Dataset of the run
    tokenizer_dir     where the tokenizer lives
"""
from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from pathlib import Path

from engine.errors import InputError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


# ---- the starting model ----------------------------------------------------------------------
def model_source(ref: str) -> str:
    """What from_pretrained loads for a RunSpec ``model``: a local dir, a hub id (presets map
    to their hub id), or a demo model (built on first use by the caller, see ``base_model``)."""
    from engine import models
    from engine.runs import demo
    if demo.is_demo(ref):
        return str(demo.model_dir(demo.model_name(ref)))
    path = Path(os.path.expanduser(ref))
    if path.is_dir():
        return str(path.resolve())
    presets = models.presets()
    if ref.lower() in presets:
        hub = presets[ref.lower()].get("hub_id")
        if not hub:
            raise InputError(f"model preset {ref!r} has no hub_id to load weights from", field="model")
        return hub
    return ref


def base_model(ctx) -> str:
    """The run's starting model, ready to load (a demo model is built here, once, and cached)."""
    if "base_dir" not in ctx.state:
        from engine.runs import demo, gguf
        ref = ctx.spec.model
        if demo.is_demo(ref):
            name = demo.model_name(ref)
            if not demo.is_built(name):
                ctx.log(f"preparing the demo model {name} (once; cached under {demo.cache_dir()})")
            path = demo.ensure_model(name, log=ctx.log, should_stop=ctx.should_stop)
            info = demo.build_info(name)
            if info and info.get("val_perplexity"):
                ctx.log(f"demo model {name}: {info.get('params', 0) / 1e6:.2f}M parameters, held-out perplexity "
                        f"{info.get('val_perplexity')} on stdlib docstrings")
            elif info:
                ctx.log(f"demo model {name}: {info.get('params', 0) / 1e6:.2f}M parameters; {info.get('note', '')}")
            ctx.state["base_dir"] = str(path)
        elif gguf.gguf_file(ref) is not None:        # a .gguf file: through transformers once, then a model dir
            src = gguf.gguf_file(ref)
            out = gguf.cache_dir_for(src)
            if not gguf.is_converted(out):
                ctx.log(f"converting {src.name} to a model dir (once; cached in {out})")
            ctx.state["base_dir"] = str(gguf.ensure_converted(src, log=ctx.log, out=out))
        else:
            ctx.state["base_dir"] = model_source(ref)
        ctx.state.setdefault("model_dir", ctx.state["base_dir"])
        ctx.state.setdefault("quant", None)
        ctx.state.setdefault("tokenizer_dir", ctx.state["base_dir"])
    return ctx.state["base_dir"]


def dataset(ctx):
    """The run's dataset (read, checked and split once per run), its prompts rendered by the
    model's chat template where the tokenizer has one (data.with_chat_template: training,
    calibration and evaluation all see the same prompts). Call it after ``base_model``."""
    from engine.runs import data
    if "dataset" not in ctx.state:
        ds = data.load(ctx.spec.dataset)
        ctx.state["dataset"] = ds
        ctx.log(f"dataset {Path(ds.source).name}: {ds.format} ({ds.task}), {len(ds.train)} training rows, "
                f"{len(ds.eval)} held-out rows")
    ds = ctx.state["dataset"]
    if ctx.state.get("tokenizer_dir") and not ctx.state.get("_chat_checked"):
        ctx.state["_chat_checked"] = True
        templated = data.with_chat_template(ds, load_tokenizer(ctx.state["tokenizer_dir"]))
        if templated is not ds:
            ctx.log("prompts rendered with the model's chat template (the user turn, then the assistant's header)")
            ctx.state["dataset"] = ds = templated
    return ds


def current_model(ctx) -> str:
    base_model(ctx)
    return ctx.state["model_dir"]


# ---- devices and dtypes -------------------------------------------------------------------
def cpu_has_fast_bf16() -> bool:
    """bf16 matrix math in hardware (AVX512-BF16 or AMX); without it torch emulates bf16 on the
    CPU, many times slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def compute_dtype(ctx, warn: bool = True):
    """The dtype the model computes in. GPU: bf16 (fp16 where the GPU has no bf16) unless
    precision is fp32; CPU: fp32 unless the CPU has fast bf16 (a warning says so)."""
    import torch
    precision = ctx.spec.train.precision
    if ctx.device == "cuda":
        if precision == "fp32":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision != "fp32" and cpu_has_fast_bf16():
        return torch.bfloat16
    if warn and precision != "fp32" and not ctx.state.get("_warned_fp32"):
        ctx.state["_warned_fp32"] = True
        ctx.warn(f"precision {precision} asked for, but this CPU has no fast bf16 (no AVX512-BF16/AMX): "
                 "computing in fp32 (weights are still saved in their 16-bit dtype)")
    return torch.float32


def device_map(ctx):
    """The whole model on this process's GPU: 0, or a rank's own (its LOCAL_RANK) in a multi-process stage."""
    return {"": int((ctx.state.get("_dist") or {}).get("local_rank", 0))} if ctx.device == "cuda" else "cpu"


def saved_dtype(model_dir: str):
    """The dtype the checkpoint's config says (bf16 for most hub models), default bf16."""
    import json

    import torch
    cfg = Path(model_dir) / "config.json"
    name = None
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        name = c.get("dtype") or c.get("torch_dtype")
    return {"float32": torch.float32, "float16": torch.float16}.get(name, torch.bfloat16)


# ---- loading ----------------------------------------------------------------------------------
def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def quiet_libraries() -> None:
    """Keep the run log readable: the libraries' per-call warnings (bitsandbytes' dtype casts,
    gptqmodel's banners) say nothing the events do not."""
    import logging
    import warnings
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
    for name in ("transformers.modeling_utils", "transformers.quantizers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:      # pragma: no cover - logging niceties only
        pass


def load_model(ctx, path: str, quant: dict | None = None, dtype=None, quantization_config=None):
    """from_pretrained on the run's device. A quantized checkpoint (bitsandbytes, GPTQ/AWQ,
    torchao) loads through the quantization_config saved in its config.json."""
    import torch
    from transformers import AutoModelForCausalLM
    quiet_libraries()
    if quant and quant.get("library") == "gptqmodel":
        setup_gptqmodel()
    if quant and quant.get("library") == "torchao" and quantization_config is None:
        # torchao tensors keep the scales of the dtype they were quantized in, and transformers
        # refuses to cast a quantized model: compute in the checkpoint's dtype
        dtype = saved_dtype(path)
    dtype = dtype or compute_dtype(ctx)
    kw = {"dtype": dtype, "device_map": device_map(ctx)}
    if quantization_config is not None:
        kw["quantization_config"] = quantization_config
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if quant and quant.get("library") == "bitsandbytes" and dtype == torch.float32:
        upcast_unquantized(model, dtype)
    return model


def upcast_unquantized(model, dtype) -> None:
    """A saved bitsandbytes checkpoint reloads its unquantized weights (embeddings, lm_head,
    norms) in their saved 16-bit dtype whatever dtype is asked for; where the run computes in
    fp32 (a CPU without fast bf16) cast those up (lossless), leaving the quantized ones alone."""
    import torch
    plain = (torch.Tensor, torch.nn.Parameter)          # not bnb's Params4bit / Int8Params
    for mod in model.modules():
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if type(t) in plain and t.is_floating_point() and t.dtype != dtype:
                t.data = t.data.to(dtype)


def setup_gptqmodel() -> None:
    """gptqmodel sizes its CPU thread pools from this variable (unset, it can ask for more
    workers than a small machine has and refuse to start)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(2, os.cpu_count() or 1))))


def checkpointing(model) -> None:
    """Non-reentrant gradient (activation) checkpointing, under either transformers name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def present_targets(model, wanted: list[str]) -> list[str]:
    """The LoRA target names of ``wanted`` that exist as linear layers in the model."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    found = [t for t in wanted if t in names]
    if not found:
        raise InputError(f"none of the LoRA targets {', '.join(wanted)} exists in this model; its modules "
                         f"include {', '.join(sorted(n for n in names if n)[:30])}", field="train.lora_targets")
    return found


# ---- tokens and batches -------------------------------------------------------------------------
def encode_example(tok, ex, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) pairs of one example: prompt + completion + EOS, labels -100 on the
    prompt (loss and held-out perplexity count the completion). A prompt too long to fit is
    cut from the left (its first token, BOS, kept); a plain-text row (no prompt) longer than
    seq_len becomes several consecutive windows."""
    p_ids = tok(ex.prompt, add_special_tokens=True)["input_ids"] if ex.prompt else \
        tok("", add_special_tokens=True)["input_ids"]
    c_ids = tok(ex.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if not ex.prompt:                                   # plain text: every token counts
        ids = p_ids + c_ids
        out = []
        for i in range(0, len(ids), seq_len):
            w = ids[i:i + seq_len]
            if len(w) < 2 and out:
                break
            labels = list(w)
            if i == 0 and p_ids:
                labels[0] = -100                        # BOS is given, not predicted
            out.append((w, labels))
        return out
    if len(p_ids) + len(c_ids) > seq_len:
        head = p_ids[:1]
        room = seq_len - len(c_ids) - len(head)
        if room <= 0:                                   # the answer alone fills the window
            p_ids, c_ids = head, c_ids[:seq_len - len(head)]
        else:
            p_ids = head + p_ids[len(p_ids) - room:]
    return [(p_ids + c_ids, [-100] * len(p_ids) + c_ids)]


def encode_all(tok, examples, seq_len: int) -> list[tuple[list[int], list[int]]]:
    return [pair for ex in examples for pair in encode_example(tok, ex, seq_len)]


def pack(pairs, seq_len: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Whole examples packed first-fit-decreasing into sequences of at most ``seq_len`` tokens:
    (ids, labels, position_ids) with the positions restarting at 0 for each example (RoPE sees
    each example from position 0); collate() builds the block-diagonal causal mask that keeps
    each example's attention to itself."""
    bins: list[list] = []
    for ids, labels in sorted(pairs, key=lambda p: -len(p[0])):
        for b in bins:
            if b[0] + len(ids) <= seq_len:
                b[0] += len(ids)
                b[1].append((ids, labels))
                break
        else:
            bins.append([len(ids), [(ids, labels)]])
    out = []
    for _, items in bins:
        ids = [t for a, _ in items for t in a]
        labels = [t for _, b in items for t in b]
        pos = [i for a, _ in items for i in range(len(a))]
        out.append((ids, labels, pos))
    return out


def packed_mask(position_ids, additive: bool = False):
    """The 4-D attention mask of packed rows: causal within each example, nothing across
    (a new example starts where the position drops back). Boolean (True = attend) for SDPA;
    ``additive`` (0 / -inf, fp32) for eager attention, which adds the mask to the scores."""
    import torch
    start = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
    seg = start.cumsum(-1)                                              # [B, T] example index per token
    n = position_ids.shape[1]
    allow = (seg[:, :, None] == seg[:, None, :]) & torch.tril(torch.ones(n, n, dtype=torch.bool,
                                                                         device=position_ids.device))
    allow = allow[:, None]
    if additive:
        return torch.zeros(allow.shape, dtype=torch.float32, device=allow.device).masked_fill(
            ~allow, torch.finfo(torch.float32).min)
    return allow


def collate(pairs, pad_id: int, device: str, additive_mask: bool = False):
    """Pad a list of (ids, labels) to the longest, as tensors on ``device``. Packed items
    (ids, labels, position_ids) also give position_ids and the block-diagonal 4-D mask of
    packed_mask(); ``_tokens`` counts their real tokens (not a model input)."""
    import torch
    if pairs and len(pairs[0]) == 3:
        n = max(len(p[0]) for p in pairs)
        ids = torch.full((len(pairs), n), pad_id, dtype=torch.long)
        labels = torch.full((len(pairs), n), -100, dtype=torch.long)
        pos = torch.zeros((len(pairs), n), dtype=torch.long)
        for i, (a, b, c) in enumerate(pairs):
            ids[i, :len(a)] = torch.tensor(a)
            labels[i, :len(b)] = torch.tensor(b)
            pos[i, :len(c)] = torch.tensor(c)
            pos[i, len(c):] = torch.arange(n - len(c))          # padding: a sequence of its own, never scored
        dev = "cuda" if device == "cuda" else "cpu"
        return {"input_ids": ids.to(dev), "position_ids": pos.to(dev), "labels": labels.to(dev),
                "attention_mask": packed_mask(pos, additive_mask).to(dev), "_tokens": sum(len(p[0]) for p in pairs)}
    n = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), n), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), n), dtype=torch.long)
    for i, (a, b) in enumerate(pairs):
        ids[i, :len(a)] = torch.tensor(a)
        labels[i, :len(b)] = torch.tensor(b)
        mask[i, :len(a)] = 1
    dev = "cuda" if device == "cuda" else "cpu"
    return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev)}


def batches(pairs, batch_size: int, seed: int, pad_id: int, device: str, additive_mask: bool = False):
    """An endless iterator of shuffled batches (a new order every epoch)."""
    import random
    rng = random.Random(seed)
    order = list(range(len(pairs)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            chunk = [pairs[j] for j in order[i:i + batch_size]]
            if len(chunk) < batch_size and len(pairs) >= batch_size:
                continue                    # keep every batch full-sized (steady step times)
            yield collate(chunk, pad_id, device, additive_mask)


# ---- measurements --------------------------------------------------------------------------
def rss_bytes() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def rss_peak() -> int | None:
    """The process's peak RSS so far (Linux VmHWM; elsewhere the current RSS)."""
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return rss_bytes()


def mem_now(device: str) -> int:
    """Memory in use right now: CUDA allocated bytes, or the process's RSS on the CPU."""
    if device == "cuda":
        import torch
        return int(torch.cuda.memory_allocated())
    return rss_bytes()


class PeakMemory:
    """Peak memory over a block: CUDA max_memory_allocated (reset at the start), or on the CPU
    the process's peak RSS (Linux VmHWM, reset through /proc/self/clear_refs; elsewhere a
    100 Hz sampler). The worker measures each stage the same way; a stage that measures a
    phase of its own (evaluate: one per model) resets the counters, so the stage's own peak
    then covers its last phase."""

    def __init__(self, device: str):
        self.device = device
        self.peak = None
        self._stop = threading.Event()
        self._thread = None
        self._sampled = 0

    def __enter__(self):
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return self
        except OSError:
            self._sampled = rss_bytes()

            def sample():
                while not self._stop.wait(0.01):
                    self._sampled = max(self._sampled, rss_bytes())
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
            return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()
            self.peak = int(torch.cuda.max_memory_allocated())
            self.source = "cuda_max_memory_allocated"
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak, self.source = self._sampled, "cpu_peak_rss_sampled"
        else:
            m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            self.peak, self.source = int(m.group(1)) * 1024, "cpu_peak_rss"
        return False


def tensor_bytes(t) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses (torchao quantized tensors keep
    their int data, scales and zero points as inner tensors)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def model_bytes(model) -> int:
    """The loaded model's parameters and buffers as stored (quantized ones at their packed size)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += tensor_bytes(t)
    return total


def weights_bytes_on_disk(path: str | None) -> int:
    """Bytes of the weight files in a model or adapter dir (config/tokenizer files excluded)."""
    if not path or not Path(path).is_dir():
        return 0
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def dir_bytes(path: str | None) -> int:
    if not path or not Path(path).is_dir():
        return 0
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_tokenizer(ctx, out_dir: Path) -> None:
    """Put the run's tokenizer beside a saved model (so the dir loads on its own)."""
    if (out_dir / "tokenizer_config.json").is_file() or (out_dir / "tokenizer.json").is_file():
        return
    load_tokenizer(ctx.state.get("tokenizer_dir") or base_model(ctx)).save_pretrained(out_dir)


def artifact(ctx, path: Path, kind: str) -> str:
    ctx.emit("artifact", path=str(path), kind=kind)
    return str(path)


@contextlib.contextmanager
def timed(out: dict, key: str):
    t0 = time.perf_counter()
    yield
    out[key] = round(time.perf_counter() - t0, 3)


def linear_in_features(model) -> dict[str, int]:
    """in_features of the block linears (for group-size checks): from a model dir's config.json,
    a config dict or an engine.models.ModelArch."""
    import json
    from engine import models
    if isinstance(model, (str, Path)):
        model = json.loads((Path(model) / "config.json").read_text())
    arch = model if isinstance(model, models.ModelArch) else models.arch_from_config(model)
    return {lin.name: lin.in_features for lin in arch.linears}


def base_dtype(ctx):
    """The 16-bit dtype the starting checkpoint is stored in (what saved models keep)."""
    import torch
    base = ctx.state.get("base_dir")
    return saved_dtype(base) if base and Path(base).is_dir() else torch.bfloat16


def cpu_threads() -> int:
    """Threads a CPU runtime evaluation uses (llama.cpp, ExecuTorch): the cores, at most 8."""
    import os
    return max(1, min(8, os.cpu_count() or 1))


def runtime_latency(prefill, greedy, ids: list[int], new_tokens: int, before=lambda: None) -> dict:
    """Prefill and decode speed of a runtime's own loop (llama.cpp, ExecuTorch): ``prefill(ids)`` once
    as a warm-up, then 3 timed (``before()`` untimed ahead of each: a cache reset), median in ms;
    ``greedy(ids, n, stop_at_eos=False, stamps=list)`` stamps each generated token, and decode
    tokens/s is (stamped tokens - 1) over first to last stamp."""
    import statistics
    before()
    prefill(ids)
    times = []
    for _ in range(3):
        before()
        t0 = time.perf_counter()
        prefill(ids)
        times.append(time.perf_counter() - t0)
    stamps: list[float] = []
    made = greedy(ids, new_tokens, stop_at_eos=False, stamps=stamps)
    decode_s = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return {"prompt_tokens": len(ids), "new_tokens": len(made),
            "prefill_ms": round(statistics.median(times) * 1e3, 3),
            "decode_tokens_per_s": round((len(stamps) - 1) / decode_s, 2) if decode_s > 0 else None}


def prompt_ids(tok, examples, prompt_len: int) -> list[int]:
    """``prompt_len`` real held-out tokens (the ones the HF latency measurement uses)."""
    ids: list[int] = tok("", add_special_tokens=True)["input_ids"]
    for ex in examples * (1 + prompt_len // 8):
        if len(ids) >= prompt_len:
            break
        ids += tok(ex.prompt + ex.completion, add_special_tokens=False)["input_ids"]
    return ids[:prompt_len]
