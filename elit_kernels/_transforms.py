"""Which autograd transform a call runs under, where the package's custom ops cannot follow it.

Every compiled, Triton and grouped-``torch`` attention op, and the fused elementwise ops, is a ``torch.library``
custom op with a backward formula (``torch.library.register_autograd``). PyTorch uses that formula for
ordinary reverse-mode autograd only: under forward-mode AD (``torch.func.jvp``, ``jacfwd``,
``torch.autograd.forward_ad``) such an op gives a **zero tangent, silently**, and under ``torch.func.grad`` /
``vjp`` / ``jacrev`` it fails with an error about ``setup_context`` that names neither the op nor a way out
(a fuzz, torch 2.14). ``active_transform`` names the transform so that dispatch sends the call to a backend
made of PyTorch's own differentiable ops (``Backend.supports_transforms``) and an op asked for by name refuses
with that name. ``torch.func.vmap`` alone is not one: PyTorch runs a custom op under it one sample at a time,
correctly.
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad as _fwd

FORWARD_MODE = "forward-mode AD (torch.func.jvp / jacfwd / torch.autograd.forward_ad)"
FUNC_GRAD = "torch.func.grad / vjp / jacrev"

try:
    from torch._C._functorch import TransformType as _TT
    from torch._C._functorch import peek_interpreter_stack as _peek
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _all_interpreters
except ImportError:  # pragma: no cover - a torch without functorch's interpreter stack
    _peek = _all_interpreters = _TT = None

_is_compiling = torch.compiler.is_compiling


def active_transform(*tensors) -> str | None:
    """``FORWARD_MODE`` when forward-mode AD is active and one of ``tensors`` carries a tangent, or a
    ``torch.func`` jvp/jacfwd transform is active; ``FUNC_GRAD`` under ``torch.func.grad`` / ``vjp`` / ``jacrev``;
    None otherwise, under ``vmap`` alone, and while ``torch.compile`` traces (dynamo handles the transforms it
    traces itself). 0.1 us when no transform is active (two reads)."""
    stack = _peek() if _peek is not None else None
    if stack is None and _fwd._current_level < 0:
        return None
    if _is_compiling():
        return None
    if stack is not None:
        kinds = {i.key() for i in _all_interpreters()}
        if _TT.Jvp in kinds:
            return FORWARD_MODE
        if _TT.Grad in kinds:
            return FUNC_GRAD
    if _fwd._current_level >= 0:
        for t in tensors:
            if isinstance(t, torch.Tensor) and _fwd.unpack_dual(t).tangent is not None:
                return FORWARD_MODE
    return None
