"""flash-attn's varlen functions, same signatures, our backends underneath: switch with an import.

    from elit_kernels import flash_attn_varlen_func  # instead of: from flash_attn import flash_attn_varlen_func

Supported as in flash-attn: GQA / MQA (k/v with fewer heads), any head dim 1..256, ``return_attn_probs``
(returns ``(out, softmax_lse, None)``), the packed ``qkv`` / ``kv`` layouts, ``max_seqlen_*`` as ints,
NumPy integers or 0-dim integer tensors, and buffers longer than the packed data. Not implemented:
dropout, sliding windows, softcap, ALiBi and paged KV; asking for them raises ``NotImplementedError``
naming the argument rather than being ignored.
"""
from __future__ import annotations

import torch

from .attention import varlen_attention


def _refuse_unsupported(dropout_p, window_size, softcap, alibi_slopes, block_table=None) -> None:
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p: only 0.0 is supported, got {dropout_p}")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"window_size: sliding-window attention is not supported, got {tuple(window_size)}")
    if softcap != 0.0:
        raise NotImplementedError(f"softcap: only 0.0 is supported, got {softcap}")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not supported")
    if block_table is not None:
        raise NotImplementedError("block_table: paged KV caches are not supported")


def _run(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, return_attn_probs, backend):
    if not return_attn_probs:
        return varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=softmax_scale, causal=causal,
                                backend=backend)
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=softmax_scale, causal=causal,
                                backend=backend, return_lse=True)
    # flash-attn's third value is the attention probabilities of its dropout tests; we have none.
    return out, lse, None


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, backend=None):
    """Drop-in for ``flash_attn.flash_attn_varlen_func``.

    Arguments:
        q: ``[total_q, H, D]``; k, v: ``[total_k, H_kv, D]`` with ``H % H_kv == 0`` (query head h reads kv
            head ``h // (H // H_kv)``); fp16 / bf16 / fp32 / fp64, D in 1..256.
        cu_seqlens_q, cu_seqlens_k: int32 ``[S+1]``; rows past their last element are allowed (q rows get
            zeros and zero gradients, k/v rows are never read).
        max_seqlen_q, max_seqlen_k: int, NumPy integer or 0-dim integer tensor (a CUDA tensor costs a host
            sync), at least the longest segment.
        softmax_scale: default ``D**-0.5``. causal: bottom-right aligned.
        deterministic: accepted; every backward here is deterministic.
        return_attn_probs: also return ``softmax_lse``.
        backend: keyword only, ours: a backend name as in ``varlen_attention``.

    Returns:
        ``out [total_q, H, D]``, or with ``return_attn_probs`` ``(out, softmax_lse, None)``:
        ``softmax_lse [H, total_q]`` float32 (float64 for float64 inputs), natural log, +inf for rows that
        see no key, not differentiable.

    Raises:
        NotImplementedError naming ``dropout_p`` (non-zero), ``window_size``, ``softcap``, ``alibi_slopes``
        or ``block_table``; otherwise what ``varlen_attention`` raises.
    """
    _refuse_unsupported(dropout_p, window_size, softcap, alibi_slopes, block_table)
    return _run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                return_attn_probs, backend)


def _check_packed(name: str, t, n: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4 or t.shape[1] != n:
        raise ValueError(f"{name}: expected shape {layout}, got {tuple(t.shape)}")


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, backend=None):
    """Drop-in for ``flash_attn.flash_attn_varlen_qkvpacked_func``: self-attention on ``qkv [total, 3, H, D]``.

    q, k and v are the strided views ``qkv[:, 0]``, ``qkv[:, 1]``, ``qkv[:, 2]``: the Triton backend reads
    them in place; the C++ CPU kernels take row strides too; the CUDA kernels copy only views they cannot
    load with aligned 16-byte vectors. ``cu_seqlens`` / ``max_seqlen`` serve both q and k. Returns and
    raises as ``flash_attn_varlen_func`` (a ``ValueError`` naming ``qkv`` for a wrong layout).
    """
    _refuse_unsupported(dropout_p, window_size, softcap, alibi_slopes)
    _check_packed("qkv", qkv, 3, "[total, 3, num_heads, head_dim]")
    q, k, v = qkv.unbind(1)
    return _run(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale, causal, return_attn_probs,
                backend)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, backend=None):
    """Drop-in for ``flash_attn.flash_attn_varlen_kvpacked_func``: ``q [total_q, H, D]`` attends to
    ``kv [total_k, 2, H_kv, D]`` (keys ``kv[:, 0]``, values ``kv[:, 1]``, strided views; ``H % H_kv == 0``).
    Returns and raises as ``flash_attn_varlen_func`` (a ``ValueError`` naming ``kv`` for a wrong layout).
    """
    _refuse_unsupported(dropout_p, window_size, softcap, alibi_slopes)
    _check_packed("kv", kv, 2, "[total_k, 2, num_kv_heads, head_dim]")
    k, v = kv.unbind(1)
    return _run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                return_attn_probs, backend)
