"""Runs screen, a run's artifacts: what `python -m engine runs artifacts ID` lists, downloadable,
and "push to the Hub" through the CLI's own function.

``table(run)`` is the run's artifacts (engine.runs.artifacts.artifacts: kind, format, runtime, size,
what that runtime measured); ``download(run, index)`` the file a browser gets (a GGUF file as it is,
a checkpoint folder as a zip made once beside it), linked into a temp folder Gradio serves;
``push(run, repo, token)`` is engine.runs.artifacts.push_to_hub, the function `runs push` calls.

Only the run's own artifacts are served: the browser names an index into the run's list, never a
path, and the path must still resolve inside the workspace. A token typed on the page is used for
that one push and kept nowhere; without one, HF_TOKEN of the server's environment is used, except in
the public demo, where a visitor must bring their own (the server's token would push as its owner).
Messages are masked (ui.common.error_md), so a token never reaches the page.
"""
from __future__ import annotations

import html
import os
import tempfile
from pathlib import Path

from engine.errors import InputError
from ui.common import confine, error_md, ok_md, public_demo, unexpected_md

COLUMNS = ["#", "artifact", "kind", "runtime", "format", "size", "measured in its runtime", "on disk"]


def _size(n: int | None) -> str:
    if not n:
        return "—"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _measured(m: dict) -> str:
    parts = []
    if m.get("perplexity") is not None:
        parts.append(f"perplexity {m['perplexity']:.3f}")
    if m.get("accuracy") is not None:
        parts.append(f"accuracy {m['accuracy']:.2f}")
    if m.get("decode_tokens_per_s") is not None:
        parts.append(f"decode {m['decode_tokens_per_s']:.1f} tok/s")
    if m.get("prefill_ms") is not None:
        parts.append(f"prefill {m['prefill_ms']:.1f} ms")
    return ", ".join(parts) or "—"


def listed(run: dict | None) -> list[dict]:
    """The run's artifacts (engine.runs.artifacts.artifacts, the CLI's list)."""
    if not run:
        return []
    from engine.runs import artifacts as A
    return A.artifacts(run)


def table(run: dict | None) -> list[list]:
    """One row per artifact, in COLUMNS order (sizes in binary units, as `ls -h`)."""
    rows = []
    for i, a in enumerate(listed(run)):
        rows.append([i, Path(a["path"]).name + ("/" if a["is_dir"] else ""), a["kind"], a.get("runtime") or "—",
                     a.get("format") or "—", _size(a["bytes"]), _measured(a.get("measured") or {}),
                     "yes" if a["exists"] else "gone"])
    return rows


def choices(run: dict | None) -> list[tuple[str, int]]:
    """Dropdown entries (label, index) of the artifacts still on disk."""
    return [(f"{Path(a['path']).name}{' (folder → zip)' if a['is_dir'] else ''} · {a.get('runtime') or '—'} · "
             f"{_size(a['bytes'])}", i) for i, a in enumerate(listed(run)) if a["exists"]]


def summary(run: dict | None) -> str:
    arts = listed(run)
    if not run:
        return ""
    if not arts:
        return ok_md("This run has no artifacts (yet): they appear when a stage saves a model, an adapter or an "
                     "exported file.")
    exported = [a for a in arts if a["kind"].startswith("export:")]
    return ok_md(f"{len(arts)} artifact(s), {len(exported)} exported for a serving runtime · the same list as "
                 f"<code>python -m engine runs artifacts {html.escape(str(run.get('id')))} --json</code>")


def _serve_folder() -> Path:
    """Where downloads are linked for Gradio to serve (the system temp folder, which it may read)."""
    p = Path(tempfile.gettempdir()) / "tunequant-artifacts"
    p.mkdir(parents=True, exist_ok=True)
    return p


def download(run: dict | None, index) -> tuple[str | None, str]:
    """(a path Gradio may serve, message) for artifact ``index`` of the run: the file, or the folder as
    a zip (engine.runs.artifacts.download_path), hard-linked (copied across file systems) into the
    temp folder. Only the run's own artifacts, and only inside the workspace."""
    from engine.runs import artifacts as A
    arts = listed(run)
    try:
        i = int(index)
        if not 0 <= i < len(arts):
            raise ValueError
    except (TypeError, ValueError):
        return None, error_md("pick one of the run's artifacts")
    a = arts[i]
    try:
        src = confine(a["path"], "artifact")
        got = Path(A.download_path(str(src)))
        got = confine(got, "artifact")               # the zip is made beside the folder: still the workspace's
    except InputError as e:
        return None, error_md(e)
    except Exception as e:
        return None, unexpected_md(e, "preparing the download")
    dest_dir = _serve_folder() / str(run.get("id"))
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / got.name
    try:
        if dest.exists() and (dest.stat().st_size != got.stat().st_size or dest.stat().st_mtime < got.stat().st_mtime):
            dest.unlink()
        if not dest.exists():
            try:
                os.link(got, dest)
            except OSError:
                import shutil
                shutil.copyfile(got, dest)
    except OSError as e:
        return None, unexpected_md(e, "preparing the download")
    return str(dest), ok_md(f"{html.escape(got.name)} ready ({_size(got.stat().st_size)})"
                            + (": the folder as a zip archive" if a["is_dir"] else ""))


def push(run: dict | None, repo: str | None, token: str | None = None, private: bool = True) -> str:
    """Push the run's exported artifacts and a model card to a Hub repo: engine.runs.artifacts.push_to_hub,
    what `python -m engine runs push ID --repo OWNER/NAME` calls. The message never shows the token."""
    if not run:
        return error_md("attach a finished run first")
    token = (token or "").strip() or None
    if token is None and public_demo():
        return error_md("public demo: type your own Hugging Face write token to push (the server's HF_TOKEN is "
                        "not lent to visitors); nothing was uploaded")
    if token is None and not os.environ.get("HF_TOKEN"):
        return error_md("no Hugging Face write token: type one here, or start the app with HF_TOKEN in its "
                        "environment; nothing was uploaded")
    from engine.runs import artifacts as A
    try:
        out = A.push_to_hub(run, (repo or "").strip(), token=token, private=private)
    except InputError as e:
        return error_md(_scrub(str(e), token))
    except Exception as e:
        return error_md(_scrub(f"push failed: {type(e).__name__}: {e}", token))
    return ok_md(f"Pushed to <a href='{html.escape(out['url'])}' target='_blank'>{html.escape(out['repo'])}</a>: "
                 + html.escape(", ".join(out["uploaded"])))


def _scrub(text: str, token: str | None) -> str:
    """The typed token out of a message, whatever its shape (error_md masks hf_ tokens again)."""
    for t in (token, os.environ.get("HF_TOKEN")):
        if t:
            text = text.replace(t, "***")
    return text
