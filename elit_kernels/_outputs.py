"""Output buffers of the kernels, and the poison switch that tests run them under.

``ELIT_POISON_OUTPUTS=1`` (read once, here, at import) or ``set_poison_outputs(True)`` fills every output a
kernel is meant to write in full with NaN before it runs, instead of leaving ``torch.empty``'s leftover
memory: a row or element a kernel forgets to write then fails the comparison with the reference rather than
passing on whatever the allocator handed back. It reaches every backend that allocates its outputs:

- Python-side buffers (the Triton launchers, the ``torch`` backend's grouped op) are allocated with
  ``new_output``;
- the compiled ops (``cpp``, ``cuda``, the ``fused`` elementwise ops) allocate in C++: ``elit_kernels._cext``
  registers a listener that hands the switch to ``_C`` (``csrc/elit_common.h``, ``new_output``).

Buffers a kernel *accumulates* into (``index_add_``) start at zero whatever the switch: zero is their value,
not a placeholder. Library kernels (``torch_varlen``, ``flash_attn``) allocate inside the library, out of
reach. The switch costs one fill per output: a debugging and test aid, off by default.

This module imports nothing from the package, so every kernel family can use it without an import cycle.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ._env import env_flag
from ._types import check_bool

_enabled = env_flag("ELIT_POISON_OUTPUTS", False)
_listeners: list[Callable[[bool], None]] = []


def poison_outputs_enabled() -> bool:
    """Whether kernel outputs are NaN-filled before the kernels write them (``ELIT_POISON_OUTPUTS``)."""
    return _enabled


def set_poison_outputs(enabled: bool) -> None:
    """Switch the NaN poisoning of kernel outputs on or off for every backend (tests; costs a fill per
    output). ``enabled``: a bool; TypeError otherwise."""
    global _enabled
    _enabled = check_bool("enabled", enabled)
    for fn in _listeners:
        fn(enabled)


def add_listener(fn: Callable[[bool], None]) -> None:
    """Call ``fn(enabled)`` now and whenever the switch changes (the compiled extension keeps its own copy)."""
    _listeners.append(fn)
    fn(_enabled)


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised buffer for a kernel to write in full: ``torch.empty(shape)``, NaN-filled when the
    switch is on."""
    if _enabled:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
