"""Triton window attention, backward: dq, dk, dv of ``attention_window``'s forward (key segments of at most
128 keys), P recomputed from the forward's LSE, in two kernels with the forward's structure:

* ``_window_attn_bwd_dq_kernel``: one program per (segment, block of kv heads), the forward's flat loop over
  (kv head, query head, query block); it also writes ``delta = rowsum(dO * O)`` (fp32) for the next kernel;
* ``_window_attn_bwd_dkdv_kernel``: one program per (segment, block of kv heads) owns every key of the segment
  (walked in blocks of ``BLOCK_N`` rows of the forward's ``KEY_TILE``) and every query row that sees them, so
  dK/dV need no atomics: every gradient is written by one program, deterministically.

One fused kernel (dq, dk and dv from one program) spilled registers at D = 72 on sm_90 for every tile tried.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import _common as C
from .attention_window import _meta, _segment, check_max_seqlen_k, launch, tile


@triton.jit(do_not_specialize=["S", "total_q", "total_k"])
def _window_attn_bwd_dq_kernel(
    Q, K, V, OUT, DOUT, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_dot, stride_doh, stride_lh, stride_dqt, stride_dqh,
    S, total_q, total_k, group, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, ALIGN: tl.constexpr,
):
    """dq of the query rows of segment ``program_id(0)`` for the query heads of the kv heads ``program_id(1) *
    HEADS + [0, HEADS)``, and ``delta_i = dO_i . O_i`` (fp32, stored for the dK/dV kernel): ``p_ij = exp(s_ij -
    lse_i)``, ``ds_ij = p_ij (dO_i . v_j - delta_i)``, ``dq_i = scale sum_j ds_ij k_j``. A segment with one key
    has ds = 0 exactly (as the softmax's own backward); rows with no key (empty key segment, rows past
    ``CU_Q[S]``) get dq = 0 and delta = 0. Same flat loop as the forward."""
    C.static_checks(HEAD_DIM, BLOCK_D, BLOCK_DT, BLOCK_M, BLOCK_N, ALIGN)
    seg = tl.program_id(0).to(tl.int64)
    hk0 = tl.program_id(1).to(tl.int64) * HEADS
    q_start, len_q, k_start, len_k = _segment(CU_Q, CU_K, seg, S, total_q, total_k)
    offs_n = tl.arange(0, BLOCK_N)
    n_valid = offs_n < len_k
    # An understated max_seqlen_k: NaN gradients for the segment (its forward gave NaN too).
    g_scale = tl.where(len_k <= BLOCK_N, sm_scale, float("nan"))
    multi = len_k > 1
    n_qb = tl.cdiv(len_q, BLOCK_M)
    per_kv = group * n_qb
    for it in range(0, HEADS * per_kv):
        hk = hk0 + it // per_kv
        r = it % per_kv
        h = hk * group + r // n_qb
        rows = (r % n_qb) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = rows < len_q
        ld = m_valid & (len_k > 0)  # rows that see no key read nothing
        do0, do1 = C.load_head(DOUT, C.row_offsets(q_start, rows, stride_dot, h, stride_doh, ALIGN), ld,
                               HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
        o0, o1 = C.load_head(OUT, C.row_offsets(q_start, rows, stride_ot, h, stride_oh, ALIGN), ld,
                             HEAD_DIM, BLOCK_D, BLOCK_DT, True)
        delta = tl.sum(o0 * do0.to(tl.float32), 1)
        if BLOCK_DT > 0:
            delta += tl.sum(o1 * do1.to(tl.float32), 1)
        tl.store(DELTA + h * stride_lh + q_start + rows, delta, mask=m_valid)
        k0, k1 = C.load_head(K, C.row_offsets(k_start, offs_n, stride_kt, hk, stride_kh, ALIGN), n_valid,
                             HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
        v0, v1 = C.load_head(V, C.row_offsets(k_start, offs_n, stride_vt, hk, stride_vh, ALIGN), n_valid,
                             HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
        q0, q1 = C.load_head(Q, C.row_offsets(q_start, rows, stride_qt, h, stride_qh, ALIGN), ld,
                             HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
        lse = tl.load(LSE + h * stride_lh + q_start + rows, mask=ld, other=float("inf")) * C.LOG2E_C
        s = C.dot_nt(q0, q1, k0, k1, BLOCK_DT, DOT_PREC) * qk_scale
        p = tl.where(n_valid[None, :] & multi, tl.exp2(s - lse[:, None]), 0.0)
        dp = C.dot_nt(do0, do1, v0, v1, BLOCK_DT, DOT_PREC)
        ds = (p * (dp - delta[:, None])).to(k0.dtype)
        dq0 = tl.dot(ds, k0, input_precision=DOT_PREC)
        dq1 = dq0
        if BLOCK_DT > 0:
            dq1 = tl.dot(ds, k1, input_precision=DOT_PREC)
        C.store_head(DQ, C.row_offsets(q_start, rows, stride_dqt, h, stride_dqh, ALIGN), m_valid, dq0 * g_scale,
                     dq1 * g_scale, HEAD_DIM, BLOCK_D, BLOCK_DT)


@triton.jit
def _fill_rows(P, start, rows, mask, stride_t, head, stride_h, value, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, ALIGN: tl.constexpr):
    """``P[start + rows, head, :HEAD_DIM] = value`` where ``mask``; a scalar broadcast (no constant tile is
    materialised in registers)."""
    off = C.row_offsets(start, rows, stride_t, head, stride_h, ALIGN)
    cols = tl.arange(0, BLOCK_D)
    tl.store(P + off[:, None] + cols[None, :], value.to(P.dtype.element_ty),
             mask=mask[:, None] & (cols < HEAD_DIM)[None, :])
    if BLOCK_DT > 0:
        cols_t = BLOCK_D + tl.arange(0, BLOCK_DT)
        tl.store(P + off[:, None] + cols_t[None, :], value.to(P.dtype.element_ty),
                 mask=mask[:, None] & (cols_t < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=["S", "total_q", "total_k"])
def _window_attn_bwd_dkdv_kernel(
    Q, K, V, DOUT, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_lh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    S, total_q, total_k, group, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEY_TILE: tl.constexpr, HEADS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, ALIGN: tl.constexpr,
):
    """dk, dv of the keys of segment ``program_id(0)`` for the kv heads ``program_id(1) * HEADS + [0, HEADS)``,
    summed over the query heads that share each kv head: ``dv_j = sum_i p_ij dO_i``, ``dk_j = scale sum_i
    ds_ij q_i`` (``delta`` from the dq kernel). One program owns all of a segment's keys (the forward's
    ``KEY_TILE``, walked in blocks of ``BLOCK_N`` rows: P comes from the LSE, so key blocks are independent) and
    every query row that sees them: no atomics. A segment with one key has p = 1 and ds = 0 exactly. Keys of a
    segment with no queries get zeros; program ``(S, .)`` writes zeros on the k/v rows past ``CU_K[S]``."""
    C.static_checks(HEAD_DIM, BLOCK_D, BLOCK_DT, BLOCK_M, BLOCK_N, ALIGN)
    tl.static_assert(KEY_TILE % BLOCK_N == 0, "key blocks tile the forward's key tile")
    seg = tl.program_id(0).to(tl.int64)
    hk0 = tl.program_id(1).to(tl.int64) * HEADS
    q_start, len_q, k_start, len_k = _segment(CU_Q, CU_K, seg, S, total_q, total_k)
    offs_m = tl.arange(0, BLOCK_M)
    fits = len_k <= KEY_TILE
    g_scale = tl.where(fits, 1.0, float("nan"))
    single = len_k == 1
    n_qb = tl.cdiv(len_q, BLOCK_M)
    n_kb = tl.cdiv(tl.minimum(len_k, KEY_TILE), BLOCK_N)
    for it in range(0, HEADS * n_kb):
        hk = hk0 + it // n_kb
        offs_n = (it % n_kb) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_valid = offs_n < len_k
        k0, k1 = C.load_head(K, C.row_offsets(k_start, offs_n, stride_kt, hk, stride_kh, ALIGN), n_valid,
                             HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
        v0, v1 = C.load_head(V, C.row_offsets(k_start, offs_n, stride_vt, hk, stride_vh, ALIGN), n_valid,
                             HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
        dk0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dk1 = dk0
        dv1 = dv0
        if BLOCK_DT > 0:
            dk1 = tl.zeros([BLOCK_N, BLOCK_DT], dtype=tl.float32)
            dv1 = tl.zeros([BLOCK_N, BLOCK_DT], dtype=tl.float32)
        # Keys without queries (len_q = 0, the tail segment among them) skip the loop and store zeros.
        for r in range(0, group * n_qb):
            h = hk * group + r // n_qb
            rows = (r % n_qb) * BLOCK_M + offs_m
            m_valid = rows < len_q
            q0, q1 = C.load_head(Q, C.row_offsets(q_start, rows, stride_qt, h, stride_qh, ALIGN), m_valid,
                                 HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
            do0, do1 = C.load_head(DOUT, C.row_offsets(q_start, rows, stride_dot, h, stride_doh, ALIGN), m_valid,
                                   HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
            lse = tl.load(LSE + h * stride_lh + q_start + rows, mask=m_valid, other=float("inf")) * C.LOG2E_C
            delta = tl.load(DELTA + h * stride_lh + q_start + rows, mask=m_valid, other=0.0)
            # [keys, queries] orientation: dK/dV accumulate with plain dots. Padded query rows have lse = +inf
            # (p = 0) and zero q / dO.
            sT = C.dot_nt(k0, k1, q0, q1, BLOCK_DT, DOT_PREC) * qk_scale
            pT = tl.where(single, 1.0, tl.exp2(sT - lse[None, :]))
            pT = tl.where(n_valid[:, None] & m_valid[None, :], pT, 0.0)
            pT_lo = pT.to(do0.dtype)
            dv0 = tl.dot(pT_lo, do0, dv0, input_precision=DOT_PREC)
            if BLOCK_DT > 0:
                dv1 = tl.dot(pT_lo, do1, dv1, input_precision=DOT_PREC)
            dpT = C.dot_nt(v0, v1, do0, do1, BLOCK_DT, DOT_PREC)
            dsT = tl.where(single, 0.0, pT * (dpT - delta[None, :])).to(q0.dtype)
            dk0 = tl.dot(dsT, q0, dk0, input_precision=DOT_PREC)
            if BLOCK_DT > 0:
                dk1 = tl.dot(dsT, q1, dk1, input_precision=DOT_PREC)
        C.store_head(DK, C.row_offsets(k_start, offs_n, stride_dkt, hk, stride_dkh, ALIGN), n_valid,
                     dk0 * (sm_scale * g_scale), dk1 * (sm_scale * g_scale), HEAD_DIM, BLOCK_D, BLOCK_DT)
        C.store_head(DV, C.row_offsets(k_start, offs_n, stride_dvt, hk, stride_dvh, ALIGN), n_valid,
                     dv0 * g_scale, dv1 * g_scale, HEAD_DIM, BLOCK_D, BLOCK_DT)
    # Key rows past the tile (an understated max_seqlen_k) get NaN rather than stale memory; the k/v rows past
    # cu_seqlens_k[-1] belong to no segment: zero gradients, written by the tail program. Neither loop runs
    # for a regular segment that fits its tile.
    tail_start = C.clamp_row(tl.load(CU_K + S), total_k)
    n_fill = tl.where(seg == S, total_k - tail_start, tl.where(fits, 0, len_k - KEY_TILE))
    fill_start = tl.where(seg == S, tail_start, k_start + KEY_TILE)
    fill = tl.where(seg == S, 0.0, float("nan"))
    for nb in range(0, tl.cdiv(n_fill, BLOCK_N)):
        rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        for i in range(0, HEADS):
            _fill_rows(DK, fill_start, rows, rows < n_fill, stride_dkt, hk0 + i, stride_dkh, fill, HEAD_DIM, BLOCK_D,
                       BLOCK_DT, ALIGN)
            _fill_rows(DV, fill_start, rows, rows < n_fill, stride_dvt, hk0 + i, stride_dvh, fill, HEAD_DIM, BLOCK_D,
                       BLOCK_DT, ALIGN)


def bwd_launches(dout, q, k, v, out, lse, delta, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale: float,
                 blocks: dict) -> dict:
    """``{"dq" | "dkdv": (args, meta, grid)}`` of the two backward kernels (as ``fwd_launch``; ``blocks``: each
    kernel's ``tile``). ``delta`` ``[H, total_q]`` fp32 is written by the dq kernel and read by the dK/dV
    kernel, so dq runs first."""
    total_q, H, D = q.shape
    H_kv = k.shape[1]
    S = cu_seqlens_q.shape[0] - 1
    dq_args = (q, k, v, out, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
               q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), lse.stride(0), dq.stride(0), dq.stride(1),
               S, total_q, k.shape[0], H // H_kv, softmax_scale, C.score_args(softmax_scale)[0])
    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                 dout.stride(0), dout.stride(1), lse.stride(0), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                 S, total_q, k.shape[0], H // H_kv, softmax_scale, C.score_args(softmax_scale)[0])
    return {name: (a, _meta(D, q.dtype, blocks[name], *tensors), (S + 1, H_kv // blocks[name]["HEADS"]))
            for name, a, tensors in (("dq", dq_args, (q, k, v, out, dout, dq)), ("dkdv", dkdv_args, (q, k, v, dout, dk, dv)))}


def window_attn_bwd_triton(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                           max_seqlen_k: int, softmax_scale: float):
    """Gradients of ``window_attn_fwd_triton``: dout/q/out ``[total_q, H, D]``, k/v ``[total_k, H_kv, D]``, lse
    ``[H, total_q]`` fp32 from the forward. Returns ``(dq, dk, dv)`` in the inputs' dtype (dk/dv summed over
    the query heads sharing a kv head; rows past ``cu_seqlens_*[-1]`` zeros). One program per (segment, kv
    heads) writes every gradient of its segment: no atomics, bitwise reproducible.

    >>> dq, dk, dv = window_attn_bwd_triton(do, q, k, v, out, lse, cu_q, cu_k, 4, 64, 72 ** -0.5)  # doctest: +SKIP
    """
    check_max_seqlen_k(max_seqlen_k)
    dout, q, k, v, out = (C.last_dim_contiguous(t) for t in (dout, q, k, v, out))
    lse = lse.contiguous()
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    dq = C.alloc(q.shape, q.dtype, q.device)
    dk = C.alloc(k.shape, k.dtype, k.device)
    dv = C.alloc(v.shape, v.dtype, v.device)
    total_q, H, D = q.shape
    if H == 0 or (total_q == 0 and k.shape[0] == 0):
        return dq, dk, dv
    delta = C.alloc((H, total_q), torch.float32, q.device)
    n_seg, H_kv = cu_seqlens_q.shape[0] - 1, k.shape[1]
    blocks = {name: tile(name, max_seqlen_q, max_seqlen_k, D, n_seg, H_kv) for name in ("dq", "dkdv")}
    launches = bwd_launches(dout, q, k, v, out, lse, delta, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                            blocks)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        for name, kernel in (("dq", _window_attn_bwd_dq_kernel), ("dkdv", _window_attn_bwd_dkdv_kernel)):
            args, meta, grid = launches[name]
            launch(name, kernel, grid, args, meta, blocks[name], q.device)
    return dq, dk, dv
