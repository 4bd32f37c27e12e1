"""Which autograd transform a call runs under, where the package's custom ops cannot follow it.

Every compiled, Triton and grouped-``torch`` attention op, and the fused elementwise ops, is a ``torch.library``
custom op with a backward formula (``torch.library.register_autograd``). PyTorch uses that formula for
ordinary reverse-mode autograd only: under forward-mode AD (``torch.func.jvp``, ``jacfwd``,
``torch.autograd.forward_ad``) such an op gives a **zero tangent, silently**, and under ``torch.func.grad`` /
``vjp`` / ``jacrev`` it fails with an error about ``setup_context`` that names neither the op nor a way out
(a fuzz, torch 2.14). ``active_transform`` names the transform so that dispatch sends the call to a backend
made of PyTorch's own differentiable ops (``Backend.supports_transforms``) and an op asked for by name refuses
with that name. ``torch.func.vmap`` alone is not one: PyTorch runs a custom op under it one sample at a time,
correctly. Transforms traced by ``torch.compile`` are seen too (as ``TRACED``: dynamo cannot read which one).
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad as _fwd

FORWARD_MODE = "forward-mode AD (torch.func.jvp / jacfwd / torch.autograd.forward_ad)"
FUNC_GRAD = "torch.func.grad / vjp / jacrev"
FUNC_GRAD_NESTED = "nested torch.func.grad / vjp / jacrev (a derivative of a derivative)"
TRACED = "an autograd transform traced by torch.compile (torch.func or forward-mode AD)"

try:
    from torch._C._functorch import TransformType as _TT
    from torch._C._functorch import maybe_current_level as _level
    from torch._C._functorch import peek_interpreter_stack as peek
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _all_interpreters
except ImportError:  # pragma: no cover - a torch without functorch's interpreter stack
    _TT = _all_interpreters = None

    def peek():
        return None

    def _level():
        return None

_is_compiling = torch.compiler.is_compiling


def active_transform(*tensors) -> str | None:
    """``FORWARD_MODE`` when forward-mode AD is active and one of ``tensors`` carries a tangent, or a ``torch.func``
    jvp/jacfwd transform is active; ``FUNC_GRAD`` under one ``torch.func.grad`` / ``vjp`` / ``jacrev``,
    ``FUNC_GRAD_NESTED`` under more than one (PyTorch's fused SDPA kernels have no second derivative); ``TRACED``
    when ``torch.compile`` traces code under forward-mode AD (a jvp too); None otherwise, and under ``vmap`` alone.
    While ``torch.compile`` traces code under another functorch transform (``grad``, ``vmap``) the check is a graph
    break (an error with ``fullgraph=True``), and the call runs eagerly, where it is seen. 0.1 to 0.2 us (CPU) when
    no transform is active; callers on a hot path first test ``peek() is None and _fwd._current_level < 0`` inline
    (no functorch interpreter, no forward-AD level: two reads) and call this only when that fails."""
    if _is_compiling():
        # dynamo reads the interpreter stack as never empty, so it decides here: a forward-AD level (jvp sets one
        # too) is a transform; maybe_current_level() is folded to None outside any functorch transform, and inside
        # one dynamo cannot trace it: a graph break (the call then runs eagerly, where the check below names the
        # transform) or, under fullgraph=True, an error. Never the custom op's silent zero tangent.
        if _fwd._current_level >= 0 or _level() is not None:
            return TRACED
        return None
    stack = peek()
    if stack is None and _fwd._current_level < 0:
        return None
    if stack is not None:
        kinds = [i.key() for i in _all_interpreters()]
        if _TT.Jvp in kinds:
            return FORWARD_MODE
        grads = kinds.count(_TT.Grad)
        if grads:
            return FUNC_GRAD if grads == 1 else FUNC_GRAD_NESTED
    if _fwd._current_level >= 0:
        for t in tensors:
            if isinstance(t, torch.Tensor) and _fwd.unpack_dual(t).tangent is not None:
                return FORWARD_MODE
    return None
