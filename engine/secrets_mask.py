"""Access tokens never written or shown: ``redact(text)`` masks every Hugging Face token shape
(``hf_`` followed by letters and digits, any length), API keys (``api_``, ``sk-``, GitHub
``gh*_``) and bearer/``token=`` values (a plain word after ``token:`` is prose, not a value). The run store, the worker's log, reports, exports and
the app's messages pass through it (docs/guarantees.md)."""
from __future__ import annotations

import re

# names of libraries and settings that start with hf_ (not tokens): hf_hub_download, hf_transfer, ...
_NOT_TOKENS = frozenset({"hub", "transfer", "xet", "api", "home", "token", "device", "quantizer", "model",
                         "config", "dataset", "datasets", "utils", "file", "repo", "url", "cache", "endpoint",
                         "generate"})          # hf_generate: the planner's Hugging Face generate estimate
# a token is a value, never a key: a shape followed by `":` / `':` is a JSON or dict key of the record
# itself (estimate.infer.hf_generate was stored as "hf_***" and read back as missing)
_TOKEN_RE = re.compile(r"(?<![A-Za-z0-9])(hf_[A-Za-z0-9]+|api_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9_-]{16,}"
                       r"|gh[pousr]_[A-Za-z0-9]{16,})(?![A-Za-z0-9]*[\"']\s*:)")
_BEARER_RE = re.compile(r"(?i)(authorization:\s*bearer\s+|token[\"']?\s*[:=]\s*[\"']?)([^\s\"',]+)")
# after "token:" / "token=", a plain word of prose is not a secret ("no token: set HF_TOKEN", "token: required"):
# letters only, lower case or Capitalized, shorter than any token shape; digits, symbols, mixed case or length
# make it a value to mask (a bearer header's value always is)
_WORD_RE = re.compile(r"[A-Z]?[a-z]{1,15}")
MASK = "***"


def _mask(m: re.Match) -> str:
    tok = m.group(0)
    if tok.startswith("hf_") and tok[3:].lower() in _NOT_TOKENS:
        return tok
    return tok[:3] + MASK


def redact_tokens(text):
    """``text`` with token shapes masked (hf_..., api_..., sk-..., gh*_...); what the run store,
    events.jsonl and the worker's log get (JSON text stays valid JSON)."""
    if not text or not isinstance(text, str):
        return text
    return _TOKEN_RE.sub(_mask, text)


def redact(text):
    """``text`` with access tokens masked, bearer headers and ``token=...`` values too (what the
    app shows); non-strings are returned as they are."""
    if not text or not isinstance(text, str):
        return text
    text = redact_tokens(text)
    return _BEARER_RE.sub(_mask_value, text)


def _mask_value(m: re.Match) -> str:
    key, value = m.group(1), m.group(2)
    if value == MASK or (not key.lower().startswith("authorization") and _WORD_RE.fullmatch(value)):
        return m.group(0)
    return key + MASK
