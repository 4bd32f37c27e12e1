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


@triton.jit
def _varlen_attn_bwd_preprocess_kernel(
    OUT, DOUT, DELTA, total_q,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_dh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # Rows are independent of segments here, so the grid runs over packed tokens directly.
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (t < total_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    t64 = t.to(tl.int64)
    o = tl.load(OUT + t64[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DOUT + t64[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h * stride_dh + t64, delta, mask=t < total_q)


@triton.jit(do_not_specialize=["S", "total_k", "max_seqlen_k"])
def _varlen_attn_bwd_dkdv_kernel(
    Q, K, V, DOUT, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    S, total_k, max_seqlen_k, group, sm_scale, qk_scale,
    max_q_bucket, max_k_bucket,  # only read by the autotuner's key / pruning
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """For the keys j of one block and one kv head, over every query row i that sees them and every
    query head h sharing the kv head: ``p_ij = exp(s_ij - lse_i)``, ``dv_j = sum p_ij dO_i``,
    ``ds_ij = p_ij (dO_i . v_j - delta_i)``, ``dk_j = scale * sum ds_ij q_i``. A row with a single
    visible key has p = 1 and ds = 0 exactly (as the softmax's own backward), not their rounded values.

    Axis 0: (segment, key block) as ``segment_of_program`` maps it over keys; axis 1: kv head.
    """
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    hk = tl.program_id(1).to(tl.int64)
    seg, first, step, k_start, len_k = C.segment_of_program(CU_K, S, total_k, max_seqlen_k, BLOCK_N)
    q_start, len_q = C.partner_rows(CU_Q, seg, S)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    for nb in range(first, tl.cdiv(len_k, BLOCK_N), step):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_valid = offs_n < len_k
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + (k_start + offs_n)[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        v = tl.load(V + (k_start + offs_n)[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        # Causal: key j is seen by query i iff i >= j - (len_k - len_q); query blocks before the first
        # such row are skipped (lo is rounded down to a block boundary so row tiles stay aligned).
        lo = 0
        if CAUSAL:
            first_row = tl.maximum(nb * BLOCK_N - (len_k - len_q), 0)
            lo = (first_row // BLOCK_M) * BLOCK_M

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        # Query segments with no rows (len_q = 0, the tail segment among them) skip the loop and store
        # zero dK/dV, as required.
        for g in range(0, group):
            h = hk * group + g
            for start_m in range(lo, len_q, BLOCK_M):
                rows = start_m + offs_m
                m_valid = rows < len_q
                q_mask = m_valid[:, None] & d_valid[None, :]
                q = tl.load(Q + (q_start + rows)[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask,
                            other=0.0)
                do = tl.load(DOUT + (q_start + rows)[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                             mask=q_mask, other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                # Padded rows get lse = +inf, so their probabilities are exactly 0 (as are rows that saw
                # no key in the forward, which stored +inf).
                lse = tl.load(LSE + h * stride_lh + q_start + rows, mask=m_valid, other=float("inf")) * C.LOG2E_C
                delta = tl.load(DELTA + h * stride_lh + q_start + rows, mask=m_valid, other=0.0)
                # Work in the transposed [keys, queries] orientation so dK/dV accumulate with plain dots.
                sT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
                allowed = n_valid[:, None] & m_valid[None, :]
                if CAUSAL:
                    allowed = allowed & (offs_n[:, None] <= rows[None, :] + (len_k - len_q))
                single = (C.visible_keys(rows, len_q, len_k, CAUSAL) == 1)[None, :]
                pT = tl.where(allowed, tl.where(single, 1.0, tl.exp2(sT - lse[None, :])), 0.0)
                dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
                dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
                dsT = tl.where(single, 0.0, pT * (dpT - delta[None, :]))
                dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)

        dk = dk * sm_scale
        tl.store(DK + (k_start + offs_n)[:, None] * stride_dkt + hk * stride_dkh + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + (k_start + offs_n)[:, None] * stride_dvt + hk * stride_dvh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["S", "total_q", "max_seqlen_q"])
def _varlen_attn_bwd_dq_kernel(
    Q, K, V, DOUT, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_lh, stride_dqt, stride_dqh,
    S, total_q, max_seqlen_q, group, sm_scale, qk_scale,
    max_q_bucket, max_k_bucket,  # only read by the autotuner's key / pruning
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """For the query rows i of one block and one query head: ``dq_i = scale * sum_j ds_ij k_j`` with
    ``ds_ij = p_ij (dO_i . v_j - delta_i)`` over the keys the row sees (kv head ``h // group``); zero for a
    row with a single visible key or none. Axis 0 as in the forward; axis 1: query head.
    """
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    h = tl.program_id(1).to(tl.int64)
    hk = h // group
    seg, first, step, q_start, len_q = C.segment_of_program(CU_Q, S, total_q, max_seqlen_q, BLOCK_M)
    k_start, len_k = C.partner_rows(CU_K, seg, S)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    for mb in range(first, tl.cdiv(len_q, BLOCK_M), step):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = offs_m < len_q
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask,
                    other=0.0)
        do = tl.load(DOUT + (q_start + offs_m)[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                     mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + h * stride_lh + q_start + offs_m, mask=m_valid, other=float("inf")) * C.LOG2E_C
        delta = tl.load(DELTA + h * stride_lh + q_start + offs_m, mask=m_valid, other=0.0)
        multi = (C.visible_keys(offs_m, len_q, len_k, CAUSAL) > 1)[:, None]

        hi = len_k
        if CAUSAL:
            last_row = tl.minimum(mb * BLOCK_M + BLOCK_M, len_q) - 1
            hi = tl.maximum(tl.minimum(len_k, last_row + 1 + len_k - len_q), 0)

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + offs_n
            n_valid = cols < len_k
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(K + (k_start + cols)[:, None] * stride_kt + hk * stride_kh + offs_d[None, :], mask=kv_mask,
                        other=0.0)
            v = tl.load(V + (k_start + cols)[:, None] * stride_vt + hk * stride_vh + offs_d[None, :], mask=kv_mask,
                        other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            allowed = m_valid[:, None] & n_valid[None, :] & multi
            if CAUSAL:
                allowed = allowed & (cols[None, :] <= offs_m[:, None] + (len_k - len_q))
            p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

        dq = dq * sm_scale
        tl.store(DQ + (q_start + offs_m)[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=q_mask)


# Same tile list as the forward (without the 3-stage variant: the backward's loop bodies already
# hold more live tiles); pruning keeps only tiles that fit the longest segments.
_KEY = ["max_q_bucket", "max_k_bucket", "HEAD_DIM", "CAUSAL"]
_varlen_attn_bwd_dkdv_kernel_tuned = triton.autotune(
    configs=C.tile_configs(stages=(2,)), key=_KEY, prune_configs_by={"early_config_prune": C.prune_by_length},
)(_varlen_attn_bwd_dkdv_kernel)
_varlen_attn_bwd_dq_kernel_tuned = triton.autotune(
    configs=C.tile_configs(stages=(2,)), key=_KEY, prune_configs_by={"early_config_prune": C.prune_by_length},
)(_varlen_attn_bwd_dq_kernel)


def varlen_attn_bwd_triton(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                           max_seqlen_k: int, softmax_scale: float, causal: bool):
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
    total_k, H_kv = k.shape[0], k.shape[1]
    S = cu_seqlens_q.shape[0] - 1
    dq = C.alloc(q.shape, q.dtype, q.device)
    dk = C.alloc(k.shape, k.dtype, k.device)
    dv = C.alloc(v.shape, v.dtype, v.device)
    if H == 0:
        return dq, dk, dv
    bd = C.block_d(D)
    delta = C.alloc((H, total_q), torch.float32, q.device)
    interp = C.interpreting()
    tuned = not interp and C.autotune_enabled()
    if interp:
        fixed = dict(BLOCK_M=C.INTERP_BLOCK_M, BLOCK_N=C.INTERP_BLOCK_N)
    else:
        bm, bn, warps, stages = C.heuristic_tile(max_seqlen_q, max_seqlen_k, bd, backward=True)
        fixed = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    meta = dict(HEAD_DIM=D, BLOCK_D=bd, CAUSAL=bool(causal), **C.dot_flags(q.dtype))
    buckets = (C.bucket(max_seqlen_q), C.bucket(max_seqlen_k))
    qk_scale = softmax_scale * C.LOG2E
    group = H // H_kv
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if total_q > 0:
            block_t = 16 if interp else 64
            _varlen_attn_bwd_preprocess_kernel[(triton.cdiv(total_q, block_t), H)](
                out, dout, delta, total_q, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
                delta.stride(0), HEAD_DIM=D, BLOCK_D=bd, BLOCK_T=block_t)
        if total_k > 0:
            args = (q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                    dout.stride(0), dout.stride(1), lse.stride(0), dk.stride(0), dk.stride(1),
                    dv.stride(0), dv.stride(1), S, total_k, max_seqlen_k, group, softmax_scale, qk_scale, *buckets)

            def grid_k(m):
                return (C.num_programs(S, total_k, max_seqlen_k, m["BLOCK_N"]), H_kv)

            if not tuned:
                _varlen_attn_bwd_dkdv_kernel[grid_k](*args, **fixed, **meta)
            else:
                _varlen_attn_bwd_dkdv_kernel_tuned[grid_k](*args, **meta)
        if total_q > 0:
            args = (q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
                    q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                    dout.stride(0), dout.stride(1), lse.stride(0), dq.stride(0), dq.stride(1),
                    S, total_q, max_seqlen_q, group, softmax_scale, qk_scale, *buckets)

            def grid_q(m):
                return (C.num_programs(S, total_q, max_seqlen_q, m["BLOCK_M"]), H)

            if not tuned:
                _varlen_attn_bwd_dq_kernel[grid_q](*args, **fixed, **meta)
            else:
                _varlen_attn_bwd_dq_kernel_tuned[grid_q](*args, **meta)
    return dq, dk, dv
