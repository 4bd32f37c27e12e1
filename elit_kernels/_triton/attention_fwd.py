"""Triton forward of ``varlen_attention``: online softmax over packed ragged segments.

One program owns BLOCK_M queries of one segment and one query head, and streams that segment's keys
(of the kv head the query head shares, GQA) in BLOCK_N tiles, keeping a running max / sum in fp32
(flash-attention). It writes the output and the log-sum-exp per query row (natural log, ``[H, total_q]``
fp32) that the backward pass recomputes probabilities from.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import _common as C
from . import _tiles


@triton.jit(do_not_specialize=["S", "total_q", "total_k", "max_seqlen_q", "win_left", "win_right"])
def _varlen_attn_fwd_kernel(
    Q, K, V, OUT, LSE, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    S, total_q, total_k, max_seqlen_q, group, qk_scale, cap2, win_left, win_right,
    max_q_bucket, max_k_bucket,  # only read by the autotuner's key / pruning
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """out_i = sum_j p_ij v_j / l_i and lse_i = ln(l_i) + max_j s_ij with s_ij = scale * q_i . k_j over the
    keys row i sees and p_ij = exp(s_ij - max), accumulated block by block with a running max (base 2:
    ``qk_scale`` = scale * log2(e)). Rows that see no key store zeros and lse = +inf. WINDOW: key j is seen
    by row i only inside ``[i + Lk - Lq - win_left, i + Lk - Lq + win_right]`` (flash-attn's sliding window);
    SOFTCAP: ``s_ij = softcap * tanh(scale q_i . k_j / softcap)`` (``_common.scores``).

    The head dim is held as a main block of BLOCK_D columns and a tail of BLOCK_DT (``_common.head_blocks``):
    ``s = q0 k0^T + q1 k1^T`` and ``out = [p v0, p v1]``. Axis 0: (segment, query block) as
    ``segment_of_program`` maps it; axis 1: query head h, which reads kv head ``h // group`` (GQA by indexing).
    """
    C.static_checks(HEAD_DIM, BLOCK_D, BLOCK_DT, BLOCK_M, BLOCK_N, ALIGN)
    h = tl.program_id(1).to(tl.int64)
    hk = h // group
    seg, first, step, q_start, len_q = C.segment_of_program(CU_Q, S, total_q, max_seqlen_q, BLOCK_M)
    k_start, len_k = C.partner_rows(CU_K, seg, S, total_k)
    offs_n = tl.arange(0, BLOCK_N)
    for mb in range(first, tl.cdiv(len_q, BLOCK_M), step):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = offs_m < len_q
        q_rows = C.row_offsets(q_start, offs_m, stride_qt, h, stride_qh, ALIGN)
        q0, q1 = C.load_head(Q, q_rows, m_valid, HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)

        # Causal (bottom-right): query i sees key j iff j <= i + len_k - len_q; a window also bounds j from
        # below. Keys outside what the block's rows see are never loaded.
        lo, hi = C.key_range(mb * BLOCK_M, tl.minimum(mb * BLOCK_M + BLOCK_M, len_q) - 1, len_q, len_k, CAUSAL,
                             WINDOW, win_left, win_right)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc1 = acc0
        if BLOCK_DT > 0:
            acc1 = tl.zeros([BLOCK_M, BLOCK_DT], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            n_valid = cols < len_k
            k0, k1 = C.load_head(K, C.row_offsets(k_start, cols, stride_kt, hk, stride_kh, ALIGN), n_valid,
                                 HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
            v0, v1 = C.load_head(V, C.row_offsets(k_start, cols, stride_vt, hk, stride_vh, ALIGN), n_valid,
                                 HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
            s, _ = C.scores(C.dot_nt(q0, q1, k0, k1, BLOCK_DT, DOT_PREC), qk_scale, cap2, SOFTCAP)
            allowed = n_valid[None, :]
            if CAUSAL:
                allowed = allowed & (cols[None, :] <= offs_m[:, None] + (len_k - len_q))
            if WINDOW:
                allowed = allowed & C.in_window(offs_m[:, None], cols[None, :], len_k - len_q, win_left, win_right)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no visible key yet has m_new = -inf; subtracting 0 instead keeps
            # exp2(-inf - -inf) = NaN out: its p and alpha come out as exact zeros.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            p = p.to(v0.dtype)
            acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
            if BLOCK_DT > 0:
                acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
            m_i = m_new

        # Rows with no visible key (empty key segment, causal with len_q > len_k, rows past the packed
        # data) have l_i = 0 and acc = 0: they store exact zeros, and LSE = +inf so that backward's
        # exp2(s - lse) is 0 there.
        has_key = l_i > 0.0
        l_safe = tl.where(has_key, l_i, 1.0)[:, None]
        C.store_head(OUT, C.row_offsets(q_start, offs_m, stride_ot, h, stride_oh, ALIGN), m_valid,
                     acc0 / l_safe, acc1 / l_safe, HEAD_DIM, BLOCK_D, BLOCK_DT)
        lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) / C.LOG2E_C, float("inf"))
        tl.store(LSE + h * stride_lh + q_start + offs_m, lse, mask=m_valid)


# On CUDA the tile is autotuned per (length buckets, head dim, causal, dtype, fp32 dot precision) among the
# forward's entries of _tiles.TILES that fit the longest segments, unless autotuning is off (then
# _tiles.heuristic picks it); the choice is cached on disk (_tiles.autotuned).
_varlen_attn_fwd_kernel_tuned = _tiles.autotuned(
    "fwd", ["max_q_bucket", "max_k_bucket", "HEAD_DIM", "CAUSAL", "DOT_PREC"])(_varlen_attn_fwd_kernel)


def fwd_launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
               softmax_scale: float, causal: bool, window_left: int = -1, window_right: int = -1,
               softcap: float = 0.0):
    """``(args, meta, grid)`` of ``_varlen_attn_fwd_kernel`` for these tensors (shapes as in
    ``varlen_attn_fwd_triton``): positional arguments, constexprs other than the tile, and the grid as a
    function of the tile. Shared by the launcher and ``tools/triton_sm90_report.py``."""
    total_q, H, D = q.shape
    S = cu_seqlens_q.shape[0] - 1
    win_left, win_right, window = C.window_args(window_left, window_right)
    args = (q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            S, total_q, k.shape[0], max_seqlen_q, H // k.shape[1], *C.score_args(softmax_scale, softcap), win_left,
            win_right, C.bucket(max_seqlen_q), C.bucket(max_seqlen_k))
    meta = C.kernel_meta(D, q.dtype, causal, q, k, v, out, window=window, softcap=softcap > 0.0)

    def grid(m):
        return (C.num_programs(S, total_q, max_seqlen_q, m["BLOCK_M"]), H)

    return args, meta, grid


def varlen_attn_fwd_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                           softmax_scale: float, causal: bool, window_left: int = -1, window_right: int = -1,
                           softcap: float = 0.0):
    """Launch the forward kernel. q ``[total_q, H, D]``, k/v ``[total_k, H_kv, D]`` (``H % H_kv == 0``, any
    row/head strides with a unit head-dim stride), cu_seqlens int32 ``[S+1]``; ``window_left/right`` (-1:
    unbounded) and ``softcap`` (0: off) as in ``varlen_attention``.

    Returns ``(out [total_q, H, D] in q's dtype, lse [H, total_q] fp32)``; ``lse`` is +inf on rows
    that see no key, and rows past ``cu_seqlens_q[-1]`` get zeros. The grid follows the packed sizes, not
    ``max_seqlen_q`` alone (``_common.num_programs``); a segment longer than ``max_seqlen_q`` still gets
    the right answer. Inputs are assumed validated (``elit_kernels.attention.validate_inputs``).

    >>> out, lse = varlen_attn_fwd_triton(q, k, v, cu_q, cu_k, 17, 5, 64 ** -0.5, False)  # doctest: +SKIP
    """
    q, k, v = (C.last_dim_contiguous(t) for t in (q, k, v))
    cu_seqlens_q = cu_seqlens_q.contiguous()
    cu_seqlens_k = cu_seqlens_k.contiguous()
    total_q, H, D = q.shape
    out = C.alloc((total_q, H, D), q.dtype, q.device)
    lse = C.alloc((H, total_q), torch.float32, q.device)
    if total_q == 0 or H == 0:
        return out, lse
    args, meta, grid = fwd_launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  softmax_scale, causal, window_left, window_right, softcap)
    if C.interpreting():
        _varlen_attn_fwd_kernel[grid](*args, BLOCK_M=C.INTERP_BLOCK_M, BLOCK_N=C.INTERP_BLOCK_N, **meta)
    else:
        padded = C.padded_head_dim(D)
        chosen = _tiles.heuristic("fwd", C.bucket(max_seqlen_q), C.bucket(max_seqlen_k), padded)
        tiles = _tiles.fallbacks("fwd", chosen, padded)  # what fits when the GPU cannot hold a tile
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            if C.autotune_enabled():
                C.launch_autotuned("fwd", _varlen_attn_fwd_kernel_tuned, _varlen_attn_fwd_kernel, grid, args, meta,
                                   tiles, q.device)
            else:
                C.launch_fitting("fwd", _varlen_attn_fwd_kernel, grid, args, meta, tiles, q.device)
    return out, lse
