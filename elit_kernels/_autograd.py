"""The autograd formula of every varlen attention forward op, written once.

Each backend pairs a forward op ``(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, *mask) -> (out, lse)``
with a backward op ``(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, *mask) -> (dq, dk, dv)``
(``*mask``: ``window_left, window_right, softcap`` where the op takes them)
(``elit::varlen_attn_fwd`` / ``_bwd`` in C++ and CUDA, ``*_triton``, ``*_torch``). ``lse`` is an
auxiliary output for the backward: it is marked non-differentiable (as flash-attn's softmax_lse).

The backward ops have no autograd formula of their own, so a second derivative (``create_graph=True``,
gradient penalties) through them would be silently wrong (a C++ op) or fail with a message that names the
backward op only. ``first_order_only`` makes every such backward refuse it with an error naming the forward
op and what to use instead; the ``reference`` backend (plain PyTorch) differentiates twice.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from ._amp import inputs_dtype


class _FirstOrderOnly(torch.autograd.Function):
    """Runs a backward op as one node whose own backward raises (the gradient of the gradient)."""

    @staticmethod
    def forward(ctx, name, hint, bwd_op, *args):
        ctx.name, ctx.hint = name, hint
        return bwd_op(*args)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.name}: double backward (a derivative of its gradient, as create_graph=True and "
                           f"gradient penalties need) is not supported; {ctx.hint}")


def alert_not_deterministic(name: str, why: str, instead: str) -> None:
    """What PyTorch's own ops do for a backward without a deterministic implementation, for ours: under
    ``torch.use_deterministic_algorithms(True)`` a RuntimeError naming ``name`` (``warn_only=True``: a UserWarning),
    saying ``why`` and what to use ``instead``; nothing otherwise."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    msg = (f"{name} does not have a deterministic implementation ({why}), but torch.use_deterministic_algorithms"
           f"(True) is on; {instead}")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(msg)


ATTENTION_HINT = "varlen_attention(..., backend='reference') differentiates twice (plain PyTorch)"


def first_order_only(name: str, hint: str, bwd_op: Callable, *args):
    """``bwd_op(*args)``; when a graph of the backward is being recorded (``create_graph=True``) its outputs
    come from a node that raises ``RuntimeError`` naming ``name`` (and ``hint``: what to use instead) if
    differentiated, instead of being silently treated as constants."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return _FirstOrderOnly.apply(name, hint, bwd_op, *args)
    return bwd_op(*args)


def saveable_index(t: torch.Tensor) -> torch.Tensor:
    """``t`` (an integer index or ``cu_seqlens`` that a backward needs), or a copy when it was made under
    ``torch.inference_mode()``: an index is structure a caller builds once, often under inference mode, and autograd
    refuses to save an inference tensor ("Inference tensors cannot be saved for backward", naming no argument;
    a fuzz). Its values are what the forward read, and nothing can change an inference tensor's values behind a
    version counter it does not have."""
    return t.clone() if t.is_inference() else t


def register_varlen_autograd(fwd_op, bwd_op: Callable) -> None:
    """Register the backward of ``fwd_op`` (an op name such as ``"elit::varlen_attn_fwd"`` or a custom op)
    as a call of ``bwd_op``, which refuses double backward (``first_order_only``)."""

    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, *args = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, saveable_index(cu_q), saveable_index(cu_k))
        ctx.args = tuple(args)  # max_q, max_k, scale, causal and the mask options
        ctx.mark_non_differentiable(lse)

    name = fwd_op if isinstance(fwd_op, str) else getattr(fwd_op, "_qualname", repr(fwd_op))

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        with inputs_dtype(q):  # a backward called under autocast runs in the inputs' dtype too (_amp)
            dq, dk, dv = first_order_only(name, ATTENTION_HINT, bwd_op, grad_out, q, k, v, out, lse, cu_q, cu_k,
                                          *ctx.args)
        return (dq, dk, dv, None, None) + (None,) * len(ctx.args)

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)
