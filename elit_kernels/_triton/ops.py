"""``elit::varlen_attn_{fwd,bwd}_triton`` and ``elit::window_attn_{fwd,bwd}_triton``: the Triton kernels as torch
custom ops.

Custom ops (with fake impls and a registered autograd formula) are opaque to torch.compile: it
traces one node per call and never tries to trace through the Triton launch, so a Read -> core ->
Write model compiles with ``fullgraph=True``. Max lengths travel as Python ints in the schema, so
no host sync is needed to size the grid. The fake impls return what the launchers allocate:
contiguous tensors, whatever the input strides.
"""
from __future__ import annotations

import torch

from .._autograd import register_varlen_autograd
from .attention_bwd import varlen_attn_bwd_triton
from .attention_fwd import varlen_attn_fwd_triton
from .attention_window import window_attn_fwd_triton
from .attention_window_bwd import window_attn_bwd_triton


@torch.library.custom_op("elit::varlen_attn_fwd_triton", mutates_args=())
def varlen_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                       cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                       causal: bool, window_left: int = -1, window_right: int = -1,
                       softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: returns ``(out [total_q, H, D], lse [H, total_q] fp32)``; k/v ``[total_k, H_kv, D]``;
    sliding window (-1: unbounded side) and softcap (0: off) as in ``varlen_attention``."""
    return varlen_attn_fwd_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                  causal, window_left, window_right, softcap)


@varlen_attn_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left=-1,
      window_right=-1, softcap=0.0):
    total_q, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((h, total_q), dtype=torch.float32)


@torch.library.custom_op("elit::varlen_attn_bwd_triton", mutates_args=())
def varlen_attn_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                       max_seqlen_k: int, softmax_scale: float, causal: bool, window_left: int = -1,
                       window_right: int = -1, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: returns ``(dq, dk, dv)``; deterministic (no atomics)."""
    return varlen_attn_bwd_triton(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  softmax_scale, causal, window_left, window_right, softcap)


@varlen_attn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left=-1, window_right=-1, softcap=0.0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


register_varlen_autograd(varlen_attn_fwd_op, varlen_attn_bwd_op)


@torch.library.custom_op("elit::window_attn_fwd_triton", mutates_args=())
def window_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                       cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                       softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Window forward (key segments of at most 128 keys, ``max_seqlen_k <= 128``; no causal mask, window or
    softcap): returns ``(out [total_q, H, D], lse [H, total_q] fp32)``; k/v ``[total_k, H_kv, D]``."""
    return window_attn_fwd_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)


@window_attn_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    total_q, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((h, total_q), dtype=torch.float32)


@torch.library.custom_op("elit::window_attn_bwd_triton", mutates_args=())
def window_attn_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                       max_seqlen_k: int, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window backward: returns ``(dq, dk, dv)``; deterministic (no atomics)."""
    return window_attn_bwd_triton(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  softmax_scale)


@window_attn_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


register_varlen_autograd(window_attn_fwd_op, window_attn_bwd_op)
