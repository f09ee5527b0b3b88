"""The registry of post-training quantization methods (presets/quant/methods.yaml).

One data entry per method: the library whose handler runs it in the quantize stage, the weights
format it produces (presets/quant/formats.yaml, engine/estimate/formats.py), the widths it takes,
its stage parameters and their defaults, how it calibrates (if at all), whether its kernels need
CUDA, and the accuracy model's request for its weights. Every module that needs to know about a
method asks here; adding a method is an entry in methods.yaml (plus a handler, only for a library
the quantize stage does not know yet). ``register`` adds one at run time (tests, plugins).

    get(method_id) -> Method            aliases resolve; an unknown id is an InputError listing the known
    ids() -> list[str]                  every method, in registry order
    settings(stage: dict) -> dict       the stage's parameters: params (stage value or default) + fixed
    Method.format_for(bits) -> str      the weights format id it produces at that width
    Method.accuracy_request(s) -> dict  the accuracy model's method/w_bits/a_bits/group_size/per_channel

Pure Python; never imports torch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from engine.errors import InputError, choices
from engine.presets import load_yaml

CALIBRATIONS = ("hessian", "scale-search")
CPU_MODES = ("run", "refuse", "stand-in")


@dataclass(frozen=True)
class Method:
    id: str
    name: str
    library: str
    format: str
    bits: tuple[int, ...]
    params: dict = field(default_factory=dict, compare=False)
    fixed: dict = field(default_factory=dict, compare=False)
    calibration: str | None = None
    gpu_only: bool = False
    cpu: str = "run"
    accuracy: dict = field(default_factory=dict, compare=False)
    config: dict = field(default_factory=dict, compare=False)
    bits_note: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def default_bits(self) -> int:
        return int(self.params.get("bits", self.fixed.get("bits", self.bits[0])))

    def format_for(self, bits: int | None = None) -> str:
        """The weights format this method produces at ``bits`` (default: its default width)."""
        return self.format.format(bits=self.default_bits if bits is None else int(bits))

    def accuracy_request(self, stage: dict) -> dict:
        """The accuracy model's request (estimate_accuracy keywords) for weights this method made
        with the stage's settings: method, w_bits, a_bits, group_size or per_channel."""
        s = settings({**stage, "method": self.id})
        a = self.accuracy
        out = {"method": a["method"], "w_bits": s["bits"]}
        if a.get("a_bits"):
            out["a_bits"] = a["a_bits"]
        if a.get("act_granularity"):
            out["act_granularity"] = a["act_granularity"]
        if a.get("per_channel"):
            out["per_channel"] = True
        gs = a.get("group_size")
        if gs is not None:
            out["group_size"] = int(str(gs).format(group_size=s.get("group_size")))
        return out

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _method(e: dict) -> Method:
    mid = e.get("id")
    for key in ("name", "library", "format", "bits", "accuracy"):
        if key not in e:
            raise InputError(f"quantization method {mid!r}: {key} is required (presets/quant/methods.yaml)",
                             field=key)
    if e.get("calibration") not in (None, *CALIBRATIONS):
        raise choices(f"calibration of method {mid}", e["calibration"], CALIBRATIONS)
    if e.get("cpu", "run") not in CPU_MODES:
        raise choices(f"cpu of method {mid}", e["cpu"], CPU_MODES)
    if "method" not in e["accuracy"]:
        raise InputError(f"quantization method {mid!r}: accuracy needs the accuracy model's method", field="accuracy")
    known = set(Method.__dataclass_fields__)
    extra = sorted(set(e) - known - {"summary"})
    if extra:
        raise InputError(f"quantization method {mid!r}: unknown key(s) {', '.join(extra)}; known: "
                         f"{', '.join(sorted(known))}", field="methods")
    return Method(**{k: (tuple(v) if k in ("bits", "aliases") else v) for k, v in e.items() if k in known})


@functools.lru_cache(maxsize=1)
def _loaded() -> dict[str, Method]:
    out: dict[str, Method] = {}
    for e in load_yaml("quant/methods.yaml"):
        m = _method(e)
        if m.id in out:
            raise InputError(f"quantization method {m.id!r} is defined twice", field="methods")
        out[m.id] = m
    return out


_REGISTERED: dict[str, Method] = {}


def methods() -> dict[str, Method]:
    """Every method by id: presets/quant/methods.yaml, then the ones ``register`` added."""
    return {**_loaded(), **_REGISTERED}


def ids() -> list[str]:
    return list(methods())


def register(entry: dict) -> Method:
    """Add a method at run time (an entry shaped as in methods.yaml); returns it. Its format must be a
    format of the registry (engine/estimate/formats.py; the catalog check says when it is not); its
    library needs a quantize-stage handler to run."""
    m = _method(entry)
    if m.id in methods():
        raise InputError(f"quantization method {m.id!r} already exists", field="methods")
    _REGISTERED[m.id] = m
    return m


def unregister(method_id: str) -> None:
    _REGISTERED.pop(method_id, None)


def get(method_id) -> Method:
    """A method by id or alias (case-insensitive); InputError naming the known ones."""
    key = str(method_id or "").strip().lower()
    ms = methods()
    if key in ms:
        return ms[key]
    for m in ms.values():
        if key in m.aliases:
            return m
    raise choices("quantization method", method_id, ms)


def settings(stage: dict) -> dict:
    """The quantize stage's parameters: ``method`` (the canonical id), every param of the method (the
    stage's value, else the default) and its fixed values."""
    m = get(stage.get("method"))
    out = {"method": m.id}
    for key, default in m.params.items():
        v = stage.get(key)
        if isinstance(default, bool):
            out[key] = default if v is None else bool(v)
        elif isinstance(default, int):
            out[key] = int(v or default)
        else:
            out[key] = default if v is None else v
    out.update(m.fixed)
    return out
