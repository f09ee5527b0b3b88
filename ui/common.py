"""What every screen shares: where the workspace is, safety rules, engine access, formatting.

Nothing here imports torch (the app must start without it): the engine's planner is pure
Python and ``engine.runs.api`` starts a worker process for the heavy work.
"""
from __future__ import annotations

import html
import os
import re
import shutil
import hashlib
from pathlib import Path

from engine.errors import InputError
from engine.workspace import home

ROOT = Path(__file__).resolve().parent.parent

# Upload limits (bytes): one place, used by the handlers and by launch(max_file_size=...).
MAX_CONFIG_BYTES = 1_000_000          # a config.json is a few KB
MAX_DATASET_BYTES = 50_000_000        # JSONL/CSV for a fine-tune demo; bigger sets: put them in the workspace
MAX_GGUF_BYTES = 200_000_000          # a small GGUF model (the demo's SmolLM2-135M Q4_1 is 98 MB); bigger: the workspace
MAX_UPLOAD = "200mb"                  # Gradio's own cap: the largest of the above


# ---- where things live ------------------------------------------------------------------

def workspace() -> Path:
    """The folder the app may read models/datasets from and write uploads/runs to.

    ``$TUNEQUANT_HOME`` (default ``./workspace``, engine.workspace.home): uploads, runs and the
    database share one folder.
    """
    return home()


def public_demo() -> bool:
    """Public demo mode: planning works, launching GPU runs is off (CPU demo runs only).

    ``TUNEQUANT_PUBLIC_DEMO=1`` turns it on, ``=0`` off; on a Hugging Face Space
    (``SPACE_ID`` set) it is on unless turned off.
    """
    flag = os.environ.get("TUNEQUANT_PUBLIC_DEMO")
    if flag is not None and flag.strip() != "":
        return flag.strip().lower() not in ("0", "false", "no", "off")
    return bool(os.environ.get("SPACE_ID"))


def confine(path: str | os.PathLike, field: str) -> Path:
    """``path`` resolved, if it lies inside the workspace; otherwise an InputError for ``field``.

    Symlinks are resolved first, so a link inside the workspace pointing out of it is refused too.
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute():
        p = workspace() / p
    p = p.resolve()
    ws = workspace()
    if p != ws and ws not in p.parents:
        raise InputError(f"{field}: {str(path)!r} is outside the workspace {ws}; put the file under it "
                         f"(or upload it) — the app reads nothing else from disk", field=field)
    return p


def upload_roots() -> list[Path]:
    """Where an uploaded file may come from: Gradio's upload folder (``GRADIO_TEMP_DIR``, default
    ``<tmp>/gradio``: what Gradio itself received) and the workspace."""
    import tempfile
    gradio_dir = os.environ.get("GRADIO_TEMP_DIR") or str(Path(tempfile.gettempdir()) / "gradio")
    return [Path(gradio_dir).expanduser().resolve(), workspace()]


def upload_source(src: str | os.PathLike, field: str) -> Path:
    """The resolved path of a file handed to a handler as an upload, if it lies inside
    ``upload_roots()`` (symlinks resolved); any other server path is refused, so an API call with
    a FileData path of its own choosing cannot make the app read, show or copy that file."""
    p = Path(os.path.expanduser(str(src))).resolve()
    if not any(p == r or r in p.parents for r in upload_roots()):
        raise InputError(f"{field}: {Path(str(src)).name!r} was not uploaded to this app; upload the file "
                         f"(the app reads only its own uploads and files inside the workspace)", field=field)
    return p


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def user_model(ref: str, field: str = "model") -> str:
    """A model reference typed by a user: a demo model, a preset (or its hub id) or a hub id
    ``org/name`` stay as they are; anything else is a path (``engine/../../x``, ``~/m``, a name
    that exists on disk) and must resolve, symlinks included, inside the workspace: returned
    absolute (``confine``) so the engine never resolves it against its own working directory."""
    from engine import models
    ref = str(ref).strip()
    if not ref or ref.startswith("demo:"):
        return ref
    ps = models.presets()
    if ref.lower() in ps or ref.lower() in {str(p.get("hub_id", "")).lower() for p in ps.values()}:
        return ref
    parts = ref.replace("\\", "/").split("/")
    hub_like = bool(_HUB_ID.match(ref)) and not any(x in ("", ".", "..") for x in parts)
    exists = Path(ref).exists() or (workspace() / ref).exists()
    if (hub_like or "/" not in ref and not ref.startswith((".", "~"))) and not exists:
        return ref                   # a hub id, or a name that is nothing on disk (the engine says unknown)
    return str(confine(ref, field))


def save_upload(src: str | os.PathLike | None, kind: str, max_bytes: int, suffixes: tuple[str, ...],
                field: str) -> Path | None:
    """Copy an uploaded file (Gradio's temp path) into ``workspace/uploads/<kind>/``.

    The copy is named by its content hash (same file, same path: runs and scenarios that
    reference it stay valid). Checks size and extension; returns None when nothing was uploaded.
    """
    if not src:
        return None
    src = upload_source(src, field)
    if not src.is_file():
        raise InputError(f"{field}: the upload {src.name!r} is gone; upload it again", field=field)
    size = src.stat().st_size
    if size > max_bytes:
        raise InputError(f"{field}: {src.name} is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB",
                         field=field)
    if size == 0:
        raise InputError(f"{field}: {src.name} is empty", field=field)
    if suffixes and src.suffix.lower() not in suffixes:
        raise InputError(f"{field}: {src.name} must be one of {', '.join(suffixes)}", field=field)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    dest = workspace() / "uploads" / kind / digest / _safe_name(src.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        shutil.copyfile(src, dest)
    return dest


def _safe_name(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).strip("._") or "upload"
    return name[:100]


# ---- secrets ----------------------------------------------------------------------------

from engine.secrets_mask import redact   # noqa: E402,F401  (one mask for the app, the store and the logs)


# ---- messages -----------------------------------------------------------------------------

def error_md(e: BaseException | str) -> str:
    """An inline message for bad input: what is wrong and what would work; never a traceback."""
    msg = str(e) if not isinstance(e, str) else e
    msg = redact(msg.strip()) or "invalid input"
    if len(msg) > 700:
        msg = msg[:700] + " ..."
    return f'<div class="tq-error" role="alert">⚠ {html.escape(msg)}</div>'


def ok_md(text: str) -> str:
    return f'<div class="tq-ok">{text}</div>'


def unexpected_md(e: BaseException, what: str) -> str:
    """A failure that is not the user's input: say what failed, in one line, without a traceback."""
    first = (str(e).splitlines() or [""])[0][:300]
    return error_md(f"{what} failed: {type(e).__name__}: {first}")


# ---- formatting -----------------------------------------------------------------------------

from engine.fmt import GB, duration, gb, num, usd   # noqa: F401  (one place; re-exported for ui/)
