"""Hooks that let a long library call see the run's stop flag (imports torch only when used)."""
from __future__ import annotations

import contextlib

from engine.runs.context import StageStopped


@contextlib.contextmanager
def stop_between_layers(should_stop, model, backward: bool = False):
    """While inside: every decoder layer's forward (and with ``backward``, its backward) first
    checks ``should_stop()`` and raises StageStopped when a stop was asked: a library's
    layer-by-layer loop (gptqmodel's quantize) or a long training step then ends at the next
    layer instead of finishing every layer."""
    import torch
    layers = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks") and len(mod):
            layers = mod
            break
    handles = []

    def check(*_):
        if should_stop():
            raise StageStopped("stopped on request between decoder layers")
    if layers is not None:
        handles = [layer.register_forward_pre_hook(check) for layer in layers]
        if backward:
            handles += [layer.register_full_backward_pre_hook(check) for layer in layers]
    try:
        yield layers
    finally:
        for h in handles:
            h.remove()
