"""Autocast around the attention ops: they run in their inputs' dtype whatever autocast says.

The contract is that ``out`` has q's dtype and the reference accumulates in fp32. Under autocast PyTorch's own
ops inside a backend (SDPA, matmul) are cast to the autocast dtype: the ``torch`` backend returned bf16 for fp32
inputs, and the reference ran its matmuls in bf16 (a fuzz). The ops switch autocast off around their forward and
their registered backward. Inputs made under autocast by a model's linear layers are already in its dtype, so
the ELIT model runs as before.
"""
from __future__ import annotations

import contextlib

import torch

_any_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)
_disable = getattr(torch._C, "_DisableAutocast", None)


def autocast_device(t: torch.Tensor) -> str | None:
    """``t``'s device type when autocast is on for it, else None (0.15 us when autocast is off everywhere)."""
    if _any_enabled is not None and not _any_enabled():
        return None
    dev = t.device.type
    try:
        return dev if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev) else None
    except RuntimeError:  # a device type autocast does not know
        return None


def autocast_off(device_type: str):
    """A context with autocast off: ``torch._C._DisableAutocast`` eagerly (0.5 us, against 3.3 us for
    ``torch.autocast(enabled=False)``, whose exit also clears the autocast weight cache when nesting drops to 0),
    ``torch.autocast`` under ``torch.compile`` tracing, which traces it."""
    if _disable is None or torch.compiler.is_compiling():
        return torch.autocast(device_type, enabled=False)
    return _disable()


@contextlib.contextmanager
def inputs_dtype(t: torch.Tensor):
    """Autocast off for ``t``'s device while the block runs, when it is on; nothing otherwise."""
    dev = autocast_device(t)
    if dev is None:
        yield
    else:
        with autocast_off(dev):
            yield
