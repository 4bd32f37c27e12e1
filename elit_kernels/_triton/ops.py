"""``elit::varlen_attn_fwd_triton`` / ``elit::varlen_attn_bwd_triton``: the Triton kernels as torch custom ops.

Custom ops (with fake impls and a registered autograd formula) are opaque to torch.compile: it
traces one node per call and never tries to trace through the Triton launch, so a Read -> core ->
Write model compiles with ``fullgraph=True``. Max lengths travel as Python ints in the schema, so
no host sync is needed to size the grid.
"""
from __future__ import annotations

import torch

from .attention_bwd import varlen_attn_bwd_triton as _bwd_launch
from .attention_fwd import varlen_attn_fwd_triton as _fwd_launch


@torch.library.custom_op("elit::varlen_attn_fwd_triton", mutates_args=())
def varlen_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                       cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                       causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: returns ``(out [total_q, H, D], lse [H, total_q] fp32)``."""
    return _fwd_launch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)


@varlen_attn_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    total_q, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((h, total_q), dtype=torch.float32)


@torch.library.custom_op("elit::varlen_attn_bwd_triton", mutates_args=())
def varlen_attn_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                       max_seqlen_k: int, softmax_scale: float,
                       causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: returns ``(dq, dk, dv)``; deterministic (no atomics)."""
    return _bwd_launch(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       softmax_scale, causal)


@varlen_attn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, causal)
    # LSE is an auxiliary output for the backward, not a differentiable result.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, scale, causal = ctx.args
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = varlen_attn_bwd_op(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal)
    return dq, dk, dv, None, None, None, None, None, None


varlen_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)
