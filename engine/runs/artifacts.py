"""A run's artifacts as a person takes them away: listed with their runtime, downloadable (a file
as it is, a checkpoint folder as a zip archive), pushed to the Hugging Face Hub with a model card.

    artifacts(run) -> [{kind, format, runtime, path, is_dir, bytes, exists, measured}]
    download_path(path) -> str            a file itself; a folder zipped once beside it (<folder>.zip)
    model_card(run, artifact) -> str     the strategy, what was measured (runtime figures too) and the estimate
    push_to_hub(run, repo_id, token=None, private=True, kinds=None) -> {"repo", "url", "uploaded"}
        HF_TOKEN from the environment unless given; never printed or returned. Offline
        (HF_HUB_OFFLINE=1, or no network) it raises InputError and uploads nothing.

No torch: plain files and huggingface_hub (a base dependency).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from engine.errors import InputError
from engine.record import RunRecord

RUNTIME_OF_KIND = {"model": "transformers", "quantized-model": "transformers", "adapter": "transformers (peft)"}


def _bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def artifacts(run: dict) -> list[dict]:
    """The run's artifacts (its ``artifact`` events, in order), each with the runtime that loads it and,
    for exported ones, what that runtime measured."""
    rec = RunRecord.of(run)
    measured = {m.get("path"): m for m in rec.runtime_evals}
    out, seen = [], set()
    for a in rec.artifacts:
        path, kind = a.get("path"), str(a.get("kind") or "")
        if not path or path in seen:
            continue
        seen.add(path)
        p = Path(path)
        fmt = kind.split(":", 1)[1] if kind.startswith("export:") else None
        m = measured.get(path) or {}
        runtime = m.get("runtime") or ("llama.cpp" if fmt and fmt.startswith("gguf-") else
                                       "vllm" if (p / "vllm_manifest.json").is_file() else RUNTIME_OF_KIND.get(kind))
        out.append({"kind": kind, "format": fmt, "runtime": runtime, "path": path, "is_dir": p.is_dir(),
                    "exists": p.exists(), "bytes": _bytes(p),
                    "measured": {k: m[k] for k in ("perplexity", "decode_tokens_per_s", "prefill_ms", "accuracy")
                                 if m.get(k) is not None}})
    return out


def download_path(path: str) -> str:
    """What a browser downloads for an artifact: the file, or the folder as a zip (made once)."""
    p = Path(path)
    if p.is_file():
        return str(p)
    if not p.is_dir():
        raise InputError(f"artifact {path} is not on this machine any more", field="artifact")
    z = p.with_name(p.name + ".zip")
    if not z.is_file() or z.stat().st_mtime < max(f.stat().st_mtime for f in p.rglob("*") if f.is_file()):
        tmp = shutil.make_archive(str(p.with_name(p.name + ".zip.part")), "zip", root_dir=p)
        os.replace(tmp, z)
    return str(z)


def model_card(run: dict, artifact: dict | None = None) -> str:
    rec = RunRecord.of(run)
    lines = [f"# {rec.name or rec.id}", "", f"Made by tunequant run `{rec.id}`: strategy `{rec.strategy}` on "
             f"`{rec.model}`, dataset {rec.dataset}, device {rec.device}.", ""]
    if artifact:
        lines += [f"Artifact: `{Path(artifact['path']).name}` ({artifact.get('format') or artifact['kind']}), served by "
                  f"{artifact.get('runtime') or 'transformers'}.", ""]
    lines += ["## Measured (held-out rows of the run's dataset)", "", "| model | perplexity | task | prefill ms | "
              "decode tokens/s | size on disk |", "|---|---|---|---|---|---|"]

    def row(name, m):
        task = next((f"{k} {m[k]}" for k in ("accuracy", "exact_match", "field_match", "json_valid_rate")
                     if m.get(k) is not None), "")
        size = m.get("size_on_disk_bytes")
        return (f"| {name} | {m.get('perplexity', '')} | {task} | {m.get('prefill_ms', '')} | "
                f"{m.get('decode_tokens_per_s', '')} | {f'{size / 2**20:.2f} MiB' if size else ''} |")
    for name in ("before", "after"):
        if rec.evals.get(name):
            lines.append(row(f"{name} (transformers)", rec.evals[name]))
    for m in rec.runtime_evals:
        if not m.get("skipped"):
            lines.append(row(f"{m['format']} ({m['runtime']})", m))
    inf = (rec.estimate or {}).get("infer") or {}
    acc = (rec.estimate or {}).get("accuracy") or {}
    if inf or acc:
        lines += ["", "## Estimated before the run (tunequant planner)", ""]
        if inf.get("decode_tokens_per_s") is not None:
            lines.append(f"- decode: {inf['decode_tokens_per_s']:.1f} tokens/s, weights {inf.get('weights_bytes', 0) / 2**20:.1f} MiB "
                         f"on {inf.get('gpu')}")
        if acc.get("ppl_ratio") is not None:
            lines.append(f"- perplexity ratio (quantized / 16-bit): {acc['ppl_ratio']:.3f} "
                         f"(interval retention {acc.get('low')}..{acc.get('high')})")
    return "\n".join(lines) + "\n"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def push_to_hub(run: dict, repo_id: str, token: str | None = None, private: bool = True,
                kinds: tuple[str, ...] | None = None) -> dict:
    """Upload the run's exported artifacts (or those of ``kinds``) and a model card to a Hub model
    repo. Nothing is uploaded, and InputError says why, when there is no token, the Hub is off
    (HF_HUB_OFFLINE) or unreachable; the token never appears in a message."""
    token = token or os.environ.get("HF_TOKEN")
    if not token:
        raise InputError("no Hugging Face token: set HF_TOKEN (a write token) to push", field="token")
    if not repo_id or "/" not in repo_id:
        raise InputError(f"repo must be 'owner/name', got {repo_id!r}", field="repo")
    items = [a for a in artifacts(run) if a["exists"] and
             (a["kind"] in kinds if kinds else a["kind"].startswith("export:"))]
    if not items:
        raise InputError("this run has no exported artifact on this machine to push", field="artifact")
    if _offline():
        raise InputError("the Hub is off here (HF_HUB_OFFLINE=1): nothing was uploaded", field="network")
    from huggingface_hub import HfApi
    api = HfApi(token=token, endpoint=os.environ.get("HF_ENDPOINT") or None)

    def scrub(e: Exception) -> str:
        return str(e).replace(token, "***")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except Exception as e:                          # no network, bad token, no rights: nothing uploaded yet
        raise InputError(f"could not create {repo_id} on the Hub ({type(e).__name__}: {scrub(e)}): nothing was "
                         "uploaded", field="network") from None
    uploaded = []
    try:
        api.upload_file(path_or_fileobj=model_card(run, items[0]).encode(), path_in_repo="README.md",
                        repo_id=repo_id)
        for a in items:
            p = Path(a["path"])
            if p.is_dir():
                api.upload_folder(folder_path=str(p), path_in_repo=p.name, repo_id=repo_id)
            else:
                api.upload_file(path_or_fileobj=str(p), path_in_repo=p.name, repo_id=repo_id)
            uploaded.append(p.name)
    except Exception as e:
        raise InputError(f"upload to {repo_id} failed after {len(uploaded)} artifact(s) ({type(e).__name__}: "
                         f"{scrub(e)})", field="network") from None
    return {"repo": repo_id, "url": f"https://huggingface.co/{repo_id}", "uploaded": ["README.md", *uploaded]}
