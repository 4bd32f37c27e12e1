"""Whether this machine can hold tensors on a device: one answer for the model loaders and the layouts."""
from __future__ import annotations

import torch

from ._types import first_sentence


def device_problem(dev: torch.device) -> str | None:
    """Why tensors cannot be put on ``dev`` here, or None when they can. A device type with a torch module that
    answers ``is_available()`` (cuda, mps, xpu, ...) is asked that, and its index checked against
    ``device_count()``; any other type (ipu, xla, hpu, a backend not built in) is tried with an empty tensor."""
    if dev.type in ("cpu", "meta"):
        return None
    module = getattr(torch, dev.type, None)
    available = getattr(module, "is_available", None)
    if callable(available):
        if not available():
            return f"{dev} requested, but torch.{dev.type}.is_available() is False"
        count = getattr(module, "device_count", None)
        n = count() if callable(count) else 0
        if dev.index is not None and n and dev.index >= n:
            return f"{dev} requested, but torch.{dev.type}.device_count() is {n} (indices 0 to {n - 1})"
        return None
    try:
        torch.empty(0, device=dev)
    except Exception as e:  # torch's answer differs by type: RuntimeError, NotImplementedError, ModuleNotFoundError
        return f"{dev} requested, but this torch cannot put tensors there ({first_sentence(e, limit=200)})"
    return None
