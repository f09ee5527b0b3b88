"""Runtime evaluation: an exported artifact measured in the runtime that serves it.

``RUNTIMES[runtime](ctx, export, tok, ds, examples) -> dict`` (one handler per runtime). The evaluate
stage calls it for each artifact of ``ctx.state["exports"]`` (the export stage's) and records the
result per runtime beside the Hugging Face figures. A runtime that is not on this machine, or needs
a device it does not have, is recorded as skipped with the reason.

    llama.cpp   llama-cpp-python on the CPU: the GGUF file loaded with llama.cpp, fed the same token
                ids the HF evaluation scores (the run's tokenizer), so the perplexities compare
                token for token; plus how often llama.cpp's own tokenizer (from the GGUF) splits the
                held-out text exactly as the HF tokenizer does
    vllm        needs a CUDA GPU and vLLM: skipped here with the reason
    executorch  the .pte loaded in ExecuTorch's runtime on the CPU (stages/executorch_pte.py: perplexity,
                prefill, decode one token per execution through the .pte's static KV cache, size, peak RSS);
                skipped with the reason where executorch is not installed

Measured (llama.cpp): perplexity / nll_per_token / scored_tokens (exp of the mean NLL of the held-out
answer tokens, as the HF evaluation), accuracy or JSON validity (greedy generation, as the HF
evaluation), prefill_ms (one llama_decode of ``prompt_len`` tokens, median of 3 after a warm-up),
decode_tokens_per_s ((new - 1) / time from the first generated token to the last, greedy, one token per
llama_decode), weights_bytes (llama_model_size: the tensors llama.cpp holds), size_on_disk_bytes,
peak_mem_bytes (the process's peak RSS from loading the file to the last measurement: the worker's
Python and libraries included, as on the HF side), threads.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from engine.runs.stages import common

HEADLINE = ("perplexity", "accuracy", "json_valid_rate", "prefill_ms", "decode_tokens_per_s", "size_on_disk_bytes",
            "weights_bytes", "tokenizer_agreement")


def threads() -> int:
    return common.cpu_threads()


def _log_softmax_at(logits, target: int) -> float:
    import numpy as np
    m = float(np.max(logits))
    return float(logits[target] - m - math.log(float(np.sum(np.exp(logits - m)))))


_prompt_ids = common.prompt_ids


def _llama_cpp(ctx, export: dict, tok, ds, examples) -> dict:
    from engine.runs import gguf_file
    why = gguf_file.llama_cpp_available()
    if why:
        return {"skipped": why}
    import llama_cpp
    import numpy as np
    from engine.runs.stages.scoring import task_accuracy
    es = ctx.spec.evaluate
    seq = ctx.spec.train.seq_len
    # the context holds the scored windows, the latency prompt and every task prompt with its answer
    # (generation answers up to 256 tokens)
    longest = max((len(tok(ex.prompt, add_special_tokens=True)["input_ids"]) for ex in examples if ex.prompt), default=0)
    n_ctx = max(seq, es.prompt_len + es.new_tokens, longest + 256 if es.task_accuracy else 0) + 8
    nt = threads()
    out: dict = {"runtime": "llama.cpp", "format": export["format"], "path": export["path"],
                 "llama_cpp_python": getattr(llama_cpp, "__version__", None), "threads": nt, "device": "cpu"}
    with common.PeakMemory("cpu") as pm:
        t0 = time.perf_counter()
        # scoring instance: logits for every position (what perplexity needs)
        llm = llama_cpp.Llama(model_path=export["path"], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                              n_threads=nt, n_threads_batch=nt, verbose=False, seed=0)
        out["load_s"] = round(time.perf_counter() - t0, 3)
        out["weights_bytes"] = int(llama_cpp.llama_model_size(llm.model))
        n_vocab = llm.n_vocab()
        secs = {"load": out["load_s"]}
        t_tok = time.perf_counter()
        # the tokenizer the GGUF carries, against the run's HF tokenizer, on the held-out text; the HF
        # tokenizer reads special-token text (a chat template's <|im_start|> ...) as those tokens, so
        # llama.cpp is asked to as well (special=True)
        same = 0
        for ex in examples:
            text = ex.prompt + ex.completion
            hf = tok(text, add_special_tokens=True)["input_ids"]
            same += llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == hf
        out["tokenizer_agreement"] = round(same / len(examples), 4) if examples else None
        secs["tokenizer_agreement"] = round(time.perf_counter() - t_tok, 3)
        t_ppl = time.perf_counter()
        if es.perplexity:
            nll, n = 0.0, 0
            for ids, labels in common.encode_all(tok, examples, seq):
                if ctx.should_stop():
                    break
                if len(ids) < 2:
                    continue
                llm.reset()
                llm.eval(ids)
                scores = llm.scores
                for t in range(len(ids) - 1):
                    y = labels[t + 1]
                    if y == -100:
                        continue
                    nll -= _log_softmax_at(np.asarray(scores[t], dtype=np.float64), y)
                    n += 1
            out.update({"perplexity": round(math.exp(nll / n), 4) if n else None,
                        "nll_per_token": round(nll / n, 5) if n else None, "scored_tokens": n})
        del llm
        secs["perplexity"] = round(time.perf_counter() - t_ppl, 3)
        # serving instance: logits of the last position only (what generation uses)
        llm = llama_cpp.Llama(model_path=export["path"], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=False,
                              n_threads=nt, n_threads_batch=nt, verbose=False, seed=0)
        eos = tok.eos_token_id

        def last_logits():
            ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(n_vocab,))

        def greedy(ids: list[int], max_new: int, stop_at_eos: bool = True, stamps: list | None = None) -> list[int]:
            llm.reset()
            llm.eval(ids)
            made = []
            for _ in range(max_new):
                t = int(np.argmax(last_logits()))
                if stamps is not None:
                    stamps.append(time.perf_counter())
                if stop_at_eos and t == eos:
                    break
                made.append(t)
                if len(made) == max_new:
                    break
                llm.eval([t])
            return made

        if es.task_accuracy and not ctx.should_stop():
            def gen(prompt: str, max_new: int) -> str:
                ids = tok(prompt, add_special_tokens=True)["input_ids"]
                return tok.decode(greedy(ids, max_new), skip_special_tokens=True)
            with common.timed(secs, "task"):
                out.update(task_accuracy(tok, ds, examples, ctx.should_stop, gen))
        if es.latency and not ctx.should_stop():
            ids = _prompt_ids(tok, examples, es.prompt_len)
            with common.timed(secs, "latency"):
                out.update(common.runtime_latency(llm.eval, greedy, ids, es.new_tokens, before=llm.reset))
        out["seconds"] = secs
        del llm
    out["peak_mem_bytes"], out["mem_source"] = pm.peak, pm.source
    out["size_on_disk_bytes"] = Path(export["path"]).stat().st_size
    return out


def _vllm(ctx, export, tok, ds, examples) -> dict:
    if ctx.device != "cuda":
        return {"skipped": "vLLM serves on a CUDA GPU; this run is on the CPU (the checkpoint and its manifest are "
                           "written; measure it with `vllm serve` on a GPU)"}
    try:
        import vllm  # noqa: F401
    except Exception as e:
        return {"skipped": f"vLLM is not installed here ({type(e).__name__})"}
    return {"skipped": "measuring in vLLM is not wired yet (the manifest names the method and kernel)"}


def _executorch(ctx, export, tok, ds, examples) -> dict:
    from engine.runs.stages.executorch_pte import measure
    return measure(ctx, export, tok, ds, examples)


# one handler per runtime: (ctx, export entry, tokenizer, dataset, held-out examples) -> measurements
RUNTIMES = {"llama.cpp": _llama_cpp, "vllm": _vllm, "executorch": _executorch}


def measure(ctx, export: dict, tok, ds, examples) -> dict:
    fn = RUNTIMES.get(export.get("runtime"))
    if fn is None:
        return {"runtime": export.get("runtime"), "format": export.get("format"),
                "skipped": f"no runtime evaluation for {export.get('runtime')!r} (known: {', '.join(RUNTIMES)})"}
    res = fn(ctx, export, tok, ds, examples)
    return {"runtime": export.get("runtime"), "format": export.get("format"), "role": export.get("role"),
            "path": export.get("path"), **res}
