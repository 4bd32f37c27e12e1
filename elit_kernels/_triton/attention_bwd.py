"""Triton backward of ``varlen_attention``: dq, dk, dv from the forward's LSE.

Three kernels, no atomics, so the gradients are **deterministic by construction** (every output
element is written by exactly one program, which reduces in a fixed order):

* ``_varlen_attn_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` per query row and head.
* ``_varlen_attn_bwd_dkdv_kernel``: one program per (segment, key block, kv head) walks the query
  blocks that can see its keys, for every query head sharing the kv head (GQA), and accumulates dK
  and dV in registers.
* ``_varlen_attn_bwd_dq_kernel``: one program per (segment, query block, query head) walks the key
  blocks and accumulates dQ.

flash-attn's single-pass backward instead accumulates dQ with atomics across key blocks, which is
faster for long sequences but non-deterministic; recomputing QK^T twice is cheap at ELIT's lengths.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import _common as C
from . import _tiles


@triton.jit
def _varlen_attn_bwd_preprocess_kernel(
    OUT, DOUT, DELTA, total_q,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_dh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_T: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """``delta_t = sum_d dO_td * O_td`` (fp32) for BLOCK_T packed rows t of query head h (axis 0: row
    block, axis 1: h); rows are independent of segments here, so the grid runs over packed tokens."""
    tl.static_assert(BLOCK_D + BLOCK_DT >= HEAD_DIM)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64)
    t_valid = t < total_q
    t64 = t.to(tl.int64)
    o0, o1 = C.load_head(OUT, C.row_offsets(0, t64, stride_ot, h, stride_oh, ALIGN), t_valid,
                         HEAD_DIM, BLOCK_D, BLOCK_DT, True)
    do0, do1 = C.load_head(DOUT, C.row_offsets(0, t64, stride_dot, h, stride_doh, ALIGN), t_valid,
                           HEAD_DIM, BLOCK_D, BLOCK_DT, True)
    delta = tl.sum(o0 * do0, 1)
    if BLOCK_DT > 0:
        delta += tl.sum(o1 * do1, 1)
    tl.store(DELTA + h * stride_dh + t64, delta, mask=t_valid)


@triton.jit(do_not_specialize=["S", "total_q", "total_k", "max_seqlen_k", "win_left", "win_right"])
def _varlen_attn_bwd_dkdv_kernel(
    Q, K, V, DOUT, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    S, total_q, total_k, max_seqlen_k, group, sm_scale, qk_scale, cap2, win_left, win_right,
    max_q_bucket, max_k_bucket,  # only read by the autotuner's key / pruning
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """For the keys j of one block and one kv head, over every query row i that sees them and every
    query head h sharing the kv head: ``p_ij = exp(s_ij - lse_i)``, ``dv_j = sum p_ij dO_i``,
    ``ds_ij = p_ij (dO_i . v_j - delta_i)``, ``dk_j = scale * sum ds_ij q_i``. A row with a single
    visible key has p = 1 and ds = 0 exactly (as the softmax's own backward), not their rounded values.
    WINDOW limits the rows to those whose window holds the key; SOFTCAP multiplies ds by ``1 - tanh^2``
    (the derivative of ``softcap * tanh(scale q.k / softcap)`` over ``scale q.k``).
    Head-dim vectors are held as (main, tail) column blocks (``_common.head_blocks``).

    Axis 0: (segment, key block) as ``segment_of_program`` maps it over keys; axis 1: kv head.
    """
    C.static_checks(HEAD_DIM, BLOCK_D, BLOCK_DT, BLOCK_M, BLOCK_N, ALIGN)
    hk = tl.program_id(1).to(tl.int64)
    seg, first, step, k_start, len_k = C.segment_of_program(CU_K, S, total_k, max_seqlen_k, BLOCK_N)
    q_start, len_q = C.partner_rows(CU_Q, seg, S, total_q)
    offs_m = tl.arange(0, BLOCK_M)
    for nb in range(first, tl.cdiv(len_k, BLOCK_N), step):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_valid = offs_n < len_k
        k0, k1 = C.load_head(K, C.row_offsets(k_start, offs_n, stride_kt, hk, stride_kh, ALIGN), n_valid,
                             HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
        v0, v1 = C.load_head(V, C.row_offsets(k_start, offs_n, stride_vt, hk, stride_vh, ALIGN), n_valid,
                             HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)

        # Causal: key j is seen by query i iff i >= j - (len_k - len_q); query blocks before the first
        # such row are skipped (lo is rounded down to a block boundary so row tiles stay aligned).
        # A window also bounds the rows from above: key j is seen only by rows i <= j - (len_k - len_q) + win_left.
        lo = 0
        hi_q = len_q
        if CAUSAL:
            first_row = tl.maximum(nb * BLOCK_N - (len_k - len_q), 0)
            lo = (first_row // BLOCK_M) * BLOCK_M
        if WINDOW:
            first_row = tl.maximum(nb * BLOCK_N - (len_k - len_q) - win_right, 0)
            lo = tl.maximum(lo, (first_row // BLOCK_M) * BLOCK_M)
            hi_q = tl.maximum(tl.minimum(len_q, nb * BLOCK_N + BLOCK_N - (len_k - len_q) + win_left), 0)

        dk0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dk1 = dk0
        dv1 = dv0
        if BLOCK_DT > 0:
            dk1 = tl.zeros([BLOCK_N, BLOCK_DT], dtype=tl.float32)
            dv1 = tl.zeros([BLOCK_N, BLOCK_DT], dtype=tl.float32)
        # Query segments with no rows (len_q = 0, the tail segment among them) skip the loop and store
        # zero dK/dV, as required.
        for g in range(0, group):
            h = hk * group + g
            for start_m in range(lo, hi_q, BLOCK_M):
                rows = start_m + offs_m
                m_valid = rows < len_q
                q0, q1 = C.load_head(Q, C.row_offsets(q_start, rows, stride_qt, h, stride_qh, ALIGN), m_valid,
                                     HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
                do0, do1 = C.load_head(DOUT, C.row_offsets(q_start, rows, stride_dot, h, stride_doh, ALIGN),
                                       m_valid, HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
                # Padded rows get lse = +inf, so their probabilities are exactly 0 (as are rows that saw
                # no key in the forward, which stored +inf), and zero q / dO rows. Keys past the segment are
                # never stored and only feed their own dK/dV rows, so only the causal mask is needed here.
                lse = tl.load(LSE + h * stride_lh + q_start + rows, mask=m_valid, other=float("inf")) * C.LOG2E_C
                delta = tl.load(DELTA + h * stride_lh + q_start + rows, mask=m_valid, other=0.0)
                # Work in the transposed [keys, queries] orientation so dK/dV accumulate with plain dots.
                sT, thT = C.scores(C.dot_nt(k0, k1, q0, q1, BLOCK_DT, DOT_PREC), qk_scale, cap2, SOFTCAP)
                single = (C.visible_keys(rows, len_q, len_k, CAUSAL, WINDOW, win_left, win_right) == 1)[None, :]
                pT = tl.where(single, 1.0, tl.exp2(sT - lse[None, :]))
                if CAUSAL:
                    pT = tl.where(offs_n[:, None] <= rows[None, :] + (len_k - len_q), pT, 0.0)
                if WINDOW:
                    pT = tl.where(C.in_window(rows[None, :], offs_n[:, None], len_k - len_q, win_left, win_right),
                                  pT, 0.0)
                pT_lo = pT.to(do0.dtype)
                dv0 = tl.dot(pT_lo, do0, dv0, input_precision=DOT_PREC)
                if BLOCK_DT > 0:
                    dv1 = tl.dot(pT_lo, do1, dv1, input_precision=DOT_PREC)
                dpT = C.dot_nt(v0, v1, do0, do1, BLOCK_DT, DOT_PREC)
                dsT = tl.where(single, 0.0, pT * (dpT - delta[None, :]))
                if SOFTCAP:
                    dsT = dsT * (1.0 - thT * thT)
                dsT = dsT.to(q0.dtype)
                dk0 = tl.dot(dsT, q0, dk0, input_precision=DOT_PREC)
                if BLOCK_DT > 0:
                    dk1 = tl.dot(dsT, q1, dk1, input_precision=DOT_PREC)

        C.store_head(DK, C.row_offsets(k_start, offs_n, stride_dkt, hk, stride_dkh, ALIGN), n_valid,
                     dk0 * sm_scale, dk1 * sm_scale, HEAD_DIM, BLOCK_D, BLOCK_DT)
        C.store_head(DV, C.row_offsets(k_start, offs_n, stride_dvt, hk, stride_dvh, ALIGN), n_valid,
                     dv0, dv1, HEAD_DIM, BLOCK_D, BLOCK_DT)


@triton.jit(do_not_specialize=["S", "total_q", "total_k", "max_seqlen_q", "win_left", "win_right"])
def _varlen_attn_bwd_dq_kernel(
    Q, K, V, DOUT, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_lh, stride_dqt, stride_dqh,
    S, total_q, total_k, max_seqlen_q, group, sm_scale, qk_scale, cap2, win_left, win_right,
    max_q_bucket, max_k_bucket,  # only read by the autotuner's key / pruning
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """For the query rows i of one block and one query head: ``dq_i = scale * sum_j ds_ij k_j`` with
    ``ds_ij = p_ij (dO_i . v_j - delta_i)`` over the keys the row sees (kv head ``h // group``); zero for a
    row with a single visible key or none; WINDOW and SOFTCAP as in the dK/dV kernel. Head-dim vectors as
    (main, tail) column blocks. Axis 0 as in the forward; axis 1: query head.
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
        q0, q1 = C.load_head(Q, C.row_offsets(q_start, offs_m, stride_qt, h, stride_qh, ALIGN), m_valid,
                             HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
        do0, do1 = C.load_head(DOUT, C.row_offsets(q_start, offs_m, stride_dot, h, stride_doh, ALIGN), m_valid,
                               HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
        lse = tl.load(LSE + h * stride_lh + q_start + offs_m, mask=m_valid, other=float("inf")) * C.LOG2E_C
        delta = tl.load(DELTA + h * stride_lh + q_start + offs_m, mask=m_valid, other=0.0)
        multi = (C.visible_keys(offs_m, len_q, len_k, CAUSAL, WINDOW, win_left, win_right) > 1)[:, None]

        lo, hi = C.key_range(mb * BLOCK_M, tl.minimum(mb * BLOCK_M + BLOCK_M, len_q) - 1, len_q, len_k, CAUSAL,
                             WINDOW, win_left, win_right)

        dq0 = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dq1 = dq0
        if BLOCK_DT > 0:
            dq1 = tl.zeros([BLOCK_M, BLOCK_DT], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            n_valid = cols < len_k
            k0, k1 = C.load_head(K, C.row_offsets(k_start, cols, stride_kt, hk, stride_kh, ALIGN), n_valid,
                                 HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
            v0, v1 = C.load_head(V, C.row_offsets(k_start, cols, stride_vt, hk, stride_vh, ALIGN), n_valid,
                                 HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
            s, th = C.scores(C.dot_nt(q0, q1, k0, k1, BLOCK_DT, DOT_PREC), qk_scale, cap2, SOFTCAP)
            allowed = m_valid[:, None] & n_valid[None, :] & multi
            if CAUSAL:
                allowed = allowed & (cols[None, :] <= offs_m[:, None] + (len_k - len_q))
            if WINDOW:
                allowed = allowed & C.in_window(offs_m[:, None], cols[None, :], len_k - len_q, win_left, win_right)
            p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
            dp = C.dot_nt(do0, do1, v0, v1, BLOCK_DT, DOT_PREC)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - th * th)
            ds = ds.to(k0.dtype)
            dq0 = tl.dot(ds, k0, dq0, input_precision=DOT_PREC)
            if BLOCK_DT > 0:
                dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PREC)

        C.store_head(DQ, C.row_offsets(q_start, offs_m, stride_dqt, h, stride_dqh, ALIGN), m_valid,
                     dq0 * sm_scale, dq1 * sm_scale, HEAD_DIM, BLOCK_D, BLOCK_DT)


# Each backward kernel has its own tiles (_tiles.TILES): dK/dV owns keys and wants many of them with few
# queries per step, dQ the reverse; pruning keeps only tiles that fit the longest segments. Tuned per
# (length buckets, head dim, causal, dtype, fp32 dot precision): TF32 and IEEE fp32 dots favour different tiles.
_KEY = ["max_q_bucket", "max_k_bucket", "HEAD_DIM", "CAUSAL", "DOT_PREC"]
_varlen_attn_bwd_dkdv_kernel_tuned = _tiles.autotuned("dkdv", _KEY)(_varlen_attn_bwd_dkdv_kernel)
_varlen_attn_bwd_dq_kernel_tuned = _tiles.autotuned("dq", _KEY)(_varlen_attn_bwd_dq_kernel)


def bwd_launches(dout, q, k, v, out, lse, delta, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                 max_seqlen_k: int, softmax_scale: float, causal: bool, window_left: int = -1, window_right: int = -1,
                 softcap: float = 0.0) -> dict:
    """``{"preprocess" | "dkdv" | "dq": (args, meta, grid)}`` for the three backward kernels on these tensors
    (shapes as in ``varlen_attn_bwd_triton``, ``delta`` ``[H, total_q]`` fp32): positional arguments,
    constexprs other than the tile (the preprocess takes BLOCK_T) and the grid as a function of the tile.
    Shared by the launcher and ``tools/triton_sm90_report.py``."""
    total_q, H, D = q.shape
    total_k, H_kv = k.shape[0], k.shape[1]
    S = cu_seqlens_q.shape[0] - 1
    buckets = (C.bucket(max_seqlen_q), C.bucket(max_seqlen_k))
    qk_scale, cap2 = C.score_args(softmax_scale, softcap)
    win_left, win_right, window = C.window_args(window_left, window_right)
    meta = C.kernel_meta(D, q.dtype, causal, q, k, v, dout, dq, dk, dv, window=window, softcap=softcap > 0.0)
    pre_meta = dict(HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], BLOCK_DT=meta["BLOCK_DT"], ALIGN=C.row_align(out, dout))
    pre = ((out, dout, delta, total_q, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
            delta.stride(0)), pre_meta, lambda m: (triton.cdiv(total_q, m["BLOCK_T"]), H))
    dkdv = ((q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
             q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
             dout.stride(0), dout.stride(1), lse.stride(0), dk.stride(0), dk.stride(1),
             dv.stride(0), dv.stride(1), S, total_q, total_k, max_seqlen_k, H // H_kv, softmax_scale, qk_scale, cap2,
             win_left, win_right, *buckets),
            meta, lambda m: (C.num_programs(S, total_k, max_seqlen_k, m["BLOCK_N"]), H_kv))
    dq_ = ((q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), lse.stride(0), dq.stride(0), dq.stride(1),
            S, total_q, total_k, max_seqlen_q, H // H_kv, softmax_scale, qk_scale, cap2, win_left, win_right, *buckets),
           meta, lambda m: (C.num_programs(S, total_q, max_seqlen_q, m["BLOCK_M"]), H))
    return {"preprocess": pre, "dkdv": dkdv, "dq": dq_}


# Rows per preprocess program (BLOCK_T) on a GPU.
PRE_BLOCK_T = 64


def varlen_attn_bwd_triton(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                           max_seqlen_k: int, softmax_scale: float, causal: bool, window_left: int = -1,
                           window_right: int = -1, softcap: float = 0.0):
    """Gradients of ``varlen_attention``. dout/q/out ``[total_q, H, D]``, k/v ``[total_k, H_kv, D]``,
    lse ``[H, total_q]`` fp32 from ``varlen_attn_fwd_triton``. Returns ``(dq, dk, dv)`` in the inputs'
    dtype; dk/dv sum over the query heads that share a kv head, and rows past ``cu_seqlens_*[-1]`` get
    zeros. Deterministic: reruns give bitwise-identical gradients.

    >>> dq, dk, dv = varlen_attn_bwd_triton(do, q, k, v, out, lse, cu_q, cu_k, 17, 5, 0.125, False)  # doctest: +SKIP
    """
    dout, q, k, v, out = (C.last_dim_contiguous(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    cu_seqlens_q = cu_seqlens_q.contiguous()
    cu_seqlens_k = cu_seqlens_k.contiguous()
    total_q, H, D = q.shape
    total_k = k.shape[0]
    dq = C.alloc(q.shape, q.dtype, q.device)
    dk = C.alloc(k.shape, k.dtype, k.device)
    dv = C.alloc(v.shape, v.dtype, v.device)
    if H == 0:
        return dq, dk, dv
    delta = C.alloc((H, total_q), torch.float32, q.device)
    launches = bwd_launches(dout, q, k, v, out, lse, delta, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                            max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap)
    interp = C.interpreting()
    tuned = not interp and C.autotune_enabled()
    tile_key = (C.bucket(max_seqlen_q), C.bucket(max_seqlen_k), C.padded_head_dim(D))
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if total_q > 0:
            args, meta, grid = launches["preprocess"]
            _varlen_attn_bwd_preprocess_kernel[grid](*args, BLOCK_T=16 if interp else PRE_BLOCK_T, **meta)
        for name, kernel, tuned_kernel, rows in (("dkdv", _varlen_attn_bwd_dkdv_kernel,
                                                  _varlen_attn_bwd_dkdv_kernel_tuned, total_k),
                                                 ("dq", _varlen_attn_bwd_dq_kernel, _varlen_attn_bwd_dq_kernel_tuned,
                                                  total_q)):
            if rows == 0:
                continue
            args, meta, grid = launches[name]
            if interp:
                kernel[grid](*args, BLOCK_M=C.INTERP_BLOCK_M, BLOCK_N=C.INTERP_BLOCK_N, **meta)
                continue
            tiles = _tiles.fallbacks(name, _tiles.heuristic(name, *tile_key), tile_key[2])
            if tuned:
                C.launch_autotuned(name, tuned_kernel, kernel, grid, args, meta, tiles, q.device)
            else:
                C.launch_fitting(name, kernel, grid, args, meta, tiles, q.device)
    return dq, dk, dv
