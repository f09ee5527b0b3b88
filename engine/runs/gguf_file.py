"""The project's own Hugging Face -> GGUF writer, and k-quants through llama.cpp's quantizer.

    write(model_dir, out_path, outtype="f16") -> dict     a 16-bit HF checkpoint (safetensors) as a
                                                          GGUF file llama.cpp loads: tensors renamed
                                                          with gguf's tensor-name map, hyperparameters,
                                                          tokenizer (vocab, merges, special tokens,
                                                          add-BOS/EOS flags) and chat template
    quantize(src_gguf, out_path, qtype, threads) -> dict  llama.cpp's own quantizer
                                                          (llama_cpp.llama_model_quantize): q8_0, q6_k,
                                                          q5_k_m, q4_k_m, ... exactly the file llama.cpp's
                                                          llama-quantize tool makes
    read(path) -> dict                                    what a GGUF file holds (gguf.GGUFReader)

The writer needs numpy and the ``gguf`` package only (no torch): safetensors are read here with
numpy (bf16 widened through its bit pattern). Architectures: ``ARCHES`` (HF model_type -> gguf
architecture and whether q/k rows are re-ordered for llama.cpp's rotary layout).

Tokenizers: byte-level BPE tokenizers (tokenizer.json with a BPE model over GPT-2 byte symbols:
Llama 3, Qwen2, SmolLM, GPT-2, the demo models) are written as llama.cpp's ``gpt2`` tokenizer with
the pre-tokenizer ``PRE_TOKENIZERS`` recognises from tokenizer.json's pre_tokenizer; others are
refused with a message (a SentencePiece ``tokenizer.model`` is not read here).
"""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from engine.errors import InputError

# HF model_type -> (gguf MODEL_ARCH name, re-order q/k rows). llama.cpp's "llama" graph applies
# rotary embeddings to adjacent pairs (the original Meta layout); HF llama/mistral checkpoints hold
# q_proj/k_proj rows permuted for rotate-half, so the writer permutes them back. qwen2/qwen3 run
# llama.cpp's NEOX rotary (rotate-half) and keep HF's order.
ARCHES = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),
    "qwen2": ("QWEN2", False),
    "qwen3": ("QWEN3", False),
}

# llama.cpp pre-tokenizer names by the tokenizer.json pre_tokenizer they stand for (regexes as
# Hugging Face tokenizers write them; llama.cpp's llama-vocab.cpp holds its adapted versions)
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PRE_TOKENIZERS = {
    "gpt-2": "ByteLevel with its GPT-2 regex",
    "smollm": "Digits(individual) then ByteLevel with the GPT-2 regex",
    "llama-bpe": "Split(Llama 3 regex) then ByteLevel without regex",
    "qwen2": "Split(Qwen2 regex: single digits) then ByteLevel without regex",
}

OUTTYPES = ("f32", "f16", "bf16")            # written here; everything else goes through llama.cpp


# ---- safetensors, read with numpy ------------------------------------------------------------
_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I64": "<i8", "I32": "<i4"}


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InputError(f"{model_dir} has no .safetensors weights (the GGUF writer reads safetensors checkpoints; "
                         "save the model with save_pretrained(safe_serialization=True))", field="model")
    return files


def read_safetensors(model_dir) -> dict:
    """name -> float32 numpy array (memory-mapped where the file's dtype allows), for every tensor."""
    import numpy as np
    out = {}
    for f in _safetensors_files(Path(model_dir)):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        base = 8 + n
        mm = np.memmap(f, dtype=np.uint8, mode="r")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dt = _ST_DTYPES.get(info["dtype"])
            if dt is None:
                raise InputError(f"{f.name}: tensor {name} is {info['dtype']}; the GGUF writer takes a 16/32-bit "
                                 "checkpoint (export the merged 16-bit model, not a quantized one)", field="model")
            a, b = info["data_offsets"]
            arr = mm[base + a:base + b].view(dt).reshape(info["shape"])
            if info["dtype"] == "BF16":           # bf16 is the high half of a float32
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            out[name] = arr
    return out


# ---- tokenizer --------------------------------------------------------------------------------
def pre_tokenizer_name(tok_json: dict) -> str | None:
    """The llama.cpp pre-tokenizer that splits text as this tokenizer.json does, or None."""
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]

    def regex(s):
        p = s.get("pattern") or {}
        return p.get("Regex") or p.get("String")

    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(regex(steps[0]))
    return None


def _tokenizer(w, model_dir: Path, n_vocab: int) -> dict:
    import gguf
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{model_dir} has no tokenizer.json: the GGUF writer takes a fast (tokenizers) "
                         "tokenizer; save it beside the model", field="model")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise InputError(f"the tokenizer of {model_dir.name} is {model.get('type')}"
                         f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}; "
                         "the GGUF writer writes byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM, GPT-2 style)",
                         field="model")
    vocab: dict = dict(model.get("vocab") or {})
    added = {t["content"]: t for t in tj.get("added_tokens") or []}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    if max(vocab.values()) >= n_vocab:
        raise InputError(f"the tokenizer has ids up to {max(vocab.values())} but the embedding only {n_vocab} rows",
                         field="model")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        a = added.get(text)
        types[i] = (gguf.TokenType.NORMAL if a is None else
                    gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    pre = pre_tokenizer_name(tj)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    # whether BOS/EOS are added: what the tokenizer does (tokenizers library), written explicitly so
    # llama.cpp does not fall back to its own default for the tokenizer type
    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(str(path))
    plain, full = hf.encode("a", add_special_tokens=False).ids, hf.encode("a", add_special_tokens=True).ids
    bos, eos = special.special_token_ids.get("bos"), special.special_token_ids.get("eos")
    special.add_special_token["bos"] = bos is not None and len(full) > len(plain) and full[0] == bos
    special.add_special_token["eos"] = eos is not None and len(full) > len(plain) and full[-1] == eos and \
        not (bos == eos and len(full) == len(plain) + 1 and special.add_special_token["bos"])
    special.add_special_token.pop("sep", None)
    special.add_to_gguf(w, quiet=True)
    return {"model": "gpt2", "pre": pre or "default", "pre_recognised": pre is not None, "tokens": len(vocab),
            "padded_to": n_vocab, "merges": len(special.merges), "special_token_ids": dict(special.special_token_ids),
            "add_special": dict(special.add_special_token), "chat_template": special.chat_template is not None}


# ---- the writer ---------------------------------------------------------------------------------
def _permute_rows(w, n_head: int):
    """q/k rows from rotate-half order (HF) to adjacent pairs (llama.cpp's llama rotary): within each
    head, row j of the first half and row j of the second half become rows 2j and 2j+1."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write(model_dir, out_path, outtype: str = "f16", name: str | None = None) -> dict:
    """Write a 16/32-bit HF checkpoint as GGUF. Returns what was written (arch, tensors and their
    types, tokenizer, bytes, seconds)."""
    import gguf
    import numpy as np
    t0 = time.perf_counter()
    model_dir, out_path = Path(model_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise InputError(f"the GGUF writer writes {', '.join(OUTTYPES)}; {outtype!r} goes through llama.cpp's "
                         "quantizer (quantize())", field="export.format")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{model_dir} is not a Hugging Face model dir (no config.json)", field="model")
    cfg = json.loads(cfg_path.read_text())
    mt = cfg.get("model_type")
    if mt not in ARCHES:
        raise InputError(f"the GGUF writer supports {', '.join(ARCHES)}; this model is {mt!r}", field="model")
    if cfg.get("quantization_config"):
        raise InputError(f"{model_dir.name} is a quantized checkpoint ({cfg['quantization_config'].get('quant_method')}); "
                         "export GGUF from the 16-bit model (GGUF quantizes it with llama.cpp's own types)",
                         field="strategy")
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rs_type = rs.get("rope_type") or rs.get("type")
    if rs_type not in (None, "default", "linear"):
        raise InputError(f"rope scaling {rs_type!r} is not written by this GGUF writer yet (default and linear are)",
                         field="model")
    arch_name, permute = ARCHES[mt]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    n_layer = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    tmap = gguf.get_tensor_name_map(arch, n_layer)
    tensors = read_safetensors(model_dir)
    n_vocab = int(tensors["model.embed_tokens.weight"].shape[0])
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}[outtype]

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".part")
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(name or model_dir.name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
    w.add_embedding_length(hidden)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps") or 1e-6))
    w.add_rope_freq_base(float(rs.get("rope_theta") or cfg.get("rope_theta") or 10000.0))
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if rs_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    w.add_vocab_size(n_vocab)
    w.add_file_type(ftype)
    tok = _tokenizer(w, model_dir, n_vocab)

    plan, skipped = [], []
    for hf_name, arr in tensors.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            skipped.append(hf_name)
            continue
        if hf_name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            skipped.append(hf_name)                     # llama.cpp reuses token_embd
            continue
        g_name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if g_name is None:
            raise InputError(f"no GGUF name for tensor {hf_name} of {mt} (gguf's tensor-name map); this writer "
                             "cannot place it", field="model")
        kind = "1d" if arr.ndim == 1 else "2d"
        if outtype == "f32" or kind == "1d":
            dtype, qtype = np.float32, gguf.GGMLQuantizationType.F32      # norms and biases stay f32 (llama.cpp's rule)
        elif outtype == "f16":
            dtype, qtype = np.float16, gguf.GGMLQuantizationType.F16
        else:
            dtype, qtype = np.uint16, gguf.GGMLQuantizationType.BF16
        if permute and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = n_head if ".q_proj." in hf_name else n_kv
            fix = lambda a, h=heads: _permute_rows(a, h)
        else:
            fix = None
        plan.append((g_name, hf_name, arr.shape, dtype, qtype, fix))

    def converted(hf_name, dtype, fix):
        a = np.asarray(tensors[hf_name], dtype=np.float32)
        if fix is not None:
            a = fix(a)
        if dtype is np.uint16:                          # bf16: round-to-nearest-even of the float32 bits
            b = a.view(np.uint32)
            return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
        return np.ascontiguousarray(a.astype(dtype))

    for g_name, _, shape, dtype, qtype, _ in plan:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        w.add_tensor_info(g_name, shape, np.dtype(dtype), nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    types: dict[str, int] = {}
    for g_name, hf_name, _, dtype, qtype, fix in plan:        # one tensor in memory at a time
        w.write_tensor_data(converted(hf_name, dtype, fix))
        types[qtype.name] = types.get(qtype.name, 0) + 1
    w.close()
    tmp.replace(out_path)
    return {"path": str(out_path), "arch": gguf.MODEL_ARCH_NAMES[arch], "model_type": mt, "outtype": outtype,
            "tensors": len(plan), "tensor_types": types, "skipped": skipped, "permuted_qk": permute,
            "tokenizer": tok, "size_on_disk_bytes": out_path.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 3)}


# ---- llama.cpp's quantizer -----------------------------------------------------------------------
def llama_cpp_available() -> str | None:
    """None when llama-cpp-python imports, else why not (the message a stage shows)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:                 # ImportError, or a shared library that does not load
        return (f"llama-cpp-python is not installed here ({type(e).__name__}: {e}); install the project's "
                "`export` extra (pip install -e '.[export]') to quantize and run GGUF files")
    return None


def ftype_of(qtype: str) -> int:
    """llama.cpp's file type (llama_ftype, the numbers of gguf.LlamaFileType) for a type name
    like q4_k_m, q8_0, q6_k."""
    import gguf
    try:
        return int(gguf.LlamaFileType[f"MOSTLY_{qtype.upper()}"])
    except KeyError:
        known = sorted(n[len("MOSTLY_"):].lower() for n in gguf.LlamaFileType.__members__ if n.startswith("MOSTLY_"))
        raise InputError(f"unknown GGUF type {qtype!r}; llama.cpp's types: {', '.join(known)}",
                         field="export.format") from None


def quantize(src, out_path, qtype: str, threads: int | None = None) -> dict:
    """Quantize a GGUF file with llama.cpp's own quantizer (llama_model_quantize)."""
    import os
    why = llama_cpp_available()
    if why:
        raise InputError(why, field="export.format")
    import llama_cpp
    ftype = ftype_of(qtype)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = int(threads or max(1, min(4, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out_path).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed on {src} -> {qtype} (return code {rc})")
    return {"path": str(out_path), "qtype": qtype, "ftype": ftype, "size_on_disk_bytes": out_path.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 3), "threads": params.nthread}


# ---- reading back ---------------------------------------------------------------------------------
def read(path) -> dict:
    """What a GGUF file holds: architecture, file type, tensor count and types per tensor, tokenizer
    fields (gguf.GGUFReader)."""
    import gguf
    r = gguf.GGUFReader(str(path))

    def field(key):
        f = r.get_field(key)
        if f is None:
            return None
        try:
            return f.contents()
        except Exception:                  # pragma: no cover - very old gguf
            return None

    arch = field("general.architecture")
    types: dict[str, int] = {}
    per_tensor = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        per_tensor[t.name] = t.tensor_type.name
    tokens = field("tokenizer.ggml.tokens") or []
    return {"arch": arch, "name": field("general.name"), "file_type": field("general.file_type"),
            "tensors": len(r.tensors), "tensor_types": types, "per_tensor": per_tensor,
            "block_count": field(f"{arch}.block_count"), "tokenizer_model": field("tokenizer.ggml.model"),
            "tokenizer_pre": field("tokenizer.ggml.pre"), "tokens": len(tokens),
            "merges": len(field("tokenizer.ggml.merges") or []),
            "bos_token_id": field("tokenizer.ggml.bos_token_id"), "eos_token_id": field("tokenizer.ggml.eos_token_id"),
            "add_bos_token": field("tokenizer.ggml.add_bos_token"),
            "chat_template": field("tokenizer.chat_template"), "size_on_disk_bytes": Path(path).stat().st_size}
