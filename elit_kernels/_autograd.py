"""The autograd formula of every varlen attention forward op, written once.

Each backend pairs a forward op ``(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, *mask) -> (out, lse)``
with a backward op ``(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, *mask) -> (dq, dk, dv)``
(``*mask``: ``window_left, window_right, softcap`` where the op takes them)
(``elit::varlen_attn_fwd`` / ``_bwd`` in C++ and CUDA, ``*_triton``, ``*_torch``). ``lse`` is an
auxiliary output for the backward: it is marked non-differentiable (as flash-attn's softmax_lse).
"""
from __future__ import annotations

from typing import Callable

import torch


def register_varlen_autograd(fwd_op, bwd_op: Callable) -> None:
    """Register the backward of ``fwd_op`` (an op name such as ``"elit::varlen_attn_fwd"`` or a custom op)
    as a call of ``bwd_op``."""

    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, *args = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = tuple(args)  # max_q, max_k, scale, causal and the mask options
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = bwd_op(grad_out, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
        return (dq, dk, dv, None, None) + (None,) * len(ctx.args)

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)
