"""Triton window attention: ``varlen_attention`` for segments of at most 128 keys, forward and backward.

ELIT's Read (J <= 64 latent queries x P = 64 spatial keys per window) and Write (P queries x J keys) are
thousands of tiny segments. The general kernels (``attention_fwd`` / ``attention_bwd``) launch one program
per (segment, 16-64 query rows, head) and stream keys with an online softmax; here a segment's keys fit one
tile, so:

* the whole key segment is one ``[BLOCK_N, D]`` tile (``BLOCK_N`` = the power of two >= ``max_seqlen_k``,
  16..128): one max, one exp, one sum per row, no running rescale;
* one program owns one segment and a block of ``HEADS`` kv heads (and every query head that shares them,
  GQA), so 4096 windows x 16 heads are 4096 x 16 / HEADS programs, not 65536 under-filled ones. The forward
  runs (kv head, query head, query block) as one flat loop, which Triton's pipeliner can prefetch across;
* K/V rows are read as contiguous 16-byte vectors (``_common.row_offsets``), once per (segment, kv head) for
  Read/Write (no GQA, one query block; a query head sharing the kv head or a second query block re-reads the
  tile, from L2 in practice), QK^T and PV run on the tensor cores (``tl.dot``, tiles of at least 16 rows: a Read with J = 4 queries
  pads its query tile to 16 masked rows), D = 72 as 64 + 16 columns (``_common.head_blocks``);
* the backward has the same structure in two kernels, P recomputed from the forward's LSE: dq (a flat loop
  like the forward's, which also writes ``delta = rowsum(dO * O)``), then dK/dV, where the program that owns
  a segment's keys walks every query row that sees them (no atomics, deterministic; above 80 padded columns
  a 128-key tile in two 64-key blocks). One fused kernel spilled registers at D = 72 on sm_90 (every tile
  tried), the split ones do not.

The contract is ``varlen_attention``'s without causal masks, windows or softcap (ELIT's Read/Write use none):
empty key segments give exact zeros and LSE +inf, empty query segments zero dk/dv, rows past
``cu_seqlens[-1]`` zeros (q rows: out, dq; k/v rows: dk, dv). A segment longer than the tile (a
``max_seqlen_k`` smaller than a real segment, possible only with the value checks off) yields NaN for that
segment's outputs and gradients, never a silently truncated softmax.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import _common as C
from . import _tiles

#: the most keys one segment may have: they are one register tile
MAX_KEYS = 128


@triton.jit
def _segment(CU_Q, CU_K, seg, S, total_q, total_k):
    """``(q_start, len_q, k_start, len_k)`` of segment ``seg`` (``cu_seqlens`` elements clamped into the
    tensors, ``_common.clamp_row``). Segment ``S`` is the q rows past ``CU_Q[S]``: no keys (zeros, LSE +inf)."""
    q_start = C.clamp_row(tl.load(CU_Q + seg), total_q)
    q_end = tl.where(seg < S, C.clamp_row(tl.load(CU_Q + tl.minimum(seg + 1, S)), total_q), total_q)
    k_start = C.clamp_row(tl.load(CU_K + seg), total_k)
    k_end = C.clamp_row(tl.load(CU_K + tl.minimum(seg + 1, S)), total_k)
    len_k = tl.where(seg < S, tl.maximum(k_end - k_start, 0), 0)
    return q_start, tl.maximum(q_end - q_start, 0), k_start, len_k


@triton.jit(do_not_specialize=["S", "total_q", "total_k"])
def _window_attn_fwd_kernel(
    Q, K, V, OUT, LSE, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    S, total_q, total_k, group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, ALIGN: tl.constexpr,
):
    """For every query row i of segment ``program_id(0)`` and query head h of the kv heads
    ``program_id(1) * HEADS + [0, HEADS)``: ``s_ij = qk_scale * q_i . k_j`` (base 2) over the segment's
    ``len_k <= BLOCK_N`` keys, ``out_i = sum_j exp2(s_ij - m_i) v_j / l_i`` and ``lse_i = ln(l_i) + m_i ln 2``
    (+inf and zeros for a row with no key). Query head h reads kv head ``h // group``."""
    C.static_checks(HEAD_DIM, BLOCK_D, BLOCK_DT, BLOCK_M, BLOCK_N, ALIGN)
    seg = tl.program_id(0).to(tl.int64)
    hk0 = tl.program_id(1).to(tl.int64) * HEADS
    q_start, len_q, k_start, len_k = _segment(CU_Q, CU_K, seg, S, total_q, total_k)
    offs_n = tl.arange(0, BLOCK_N)
    n_valid = offs_n < len_k
    # Keys past the tile: max_seqlen_k understated the segment. NaN, not a softmax over its first keys.
    fits = len_k <= BLOCK_N
    q_needed = len_k > 0  # rows that see no key store zeros without reading q
    n_qb = tl.cdiv(len_q, BLOCK_M)
    per_kv = group * n_qb
    # One flat loop over (kv head, query head of its group, query block): one K/V tile load per trip in the
    # usual Read/Write case (group 1, one query block), which the pipeliner can issue ahead of the dots.
    for it in range(0, HEADS * per_kv):
        hk = hk0 + it // per_kv
        r = it % per_kv
        h = hk * group + r // n_qb
        offs_m = (r % n_qb) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_valid = offs_m < len_q
        k0, k1 = C.load_head(K, C.row_offsets(k_start, offs_n, stride_kt, hk, stride_kh, ALIGN), n_valid,
                             HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
        v0, v1 = C.load_head(V, C.row_offsets(k_start, offs_n, stride_vt, hk, stride_vh, ALIGN), n_valid,
                             HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
        q0, q1 = C.load_head(Q, C.row_offsets(q_start, offs_m, stride_qt, h, stride_qh, ALIGN), m_valid & q_needed,
                             HEAD_DIM, BLOCK_D, BLOCK_DT, UPCAST)
        s = C.dot_nt(q0, q1, k0, k1, BLOCK_DT, DOT_PREC) * qk_scale
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m = tl.max(s, 1)
        # A row with no key has m = -inf: subtracting 0 keeps exp2(-inf - -inf) = NaN out (p = 0 exactly).
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2(s - m_safe[:, None])
        l = tl.sum(p, 1)
        has_key = l > 0.0
        inv_l = tl.where(fits, 1.0 / tl.where(has_key, l, 1.0), float("nan"))
        p = p.to(v0.dtype)
        o0 = tl.dot(p, v0, input_precision=DOT_PREC) * inv_l[:, None]
        o1 = o0
        if BLOCK_DT > 0:
            o1 = tl.dot(p, v1, input_precision=DOT_PREC) * inv_l[:, None]
        C.store_head(OUT, C.row_offsets(q_start, offs_m, stride_ot, h, stride_oh, ALIGN), m_valid, o0, o1,
                     HEAD_DIM, BLOCK_D, BLOCK_DT)
        lse = tl.where(has_key, (m_safe + tl.log2(tl.where(has_key, l, 1.0))) / C.LOG2E_C, float("inf"))
        lse = tl.where(fits, lse, float("nan"))
        tl.store(LSE + h * stride_lh + q_start + offs_m, lse, mask=m_valid)


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


#: fewest programs ``heads_per_program`` aims to leave (132 SMs on an H100/H200, several programs each)
MIN_PROGRAMS = 1024


def heads_per_program(num_segments: int, kv_heads: int, cap: int) -> int:
    """kv heads per program: the largest power of two that divides ``kv_heads`` (so no head is masked), is at
    most ``cap`` and still leaves at least ``MIN_PROGRAMS`` programs (a GPU needs several per SM to hide the
    memory latency of such short programs)."""
    n = 1
    while (n * 2 <= cap and kv_heads % (n * 2) == 0
           and (num_segments + 1) * (kv_heads // (n * 2)) >= MIN_PROGRAMS):
        n *= 2
    return n


def tile(kernel: str, max_seqlen_q: int, max_seqlen_k: int, head_dim: int, num_segments: int,
         kv_heads: int) -> dict:
    """Launch parameters of ``kernel`` ("fwd", "dq" or "dkdv"): ``BLOCK_M``, ``BLOCK_N``, ``HEADS``,
    ``num_warps``, ``num_stages`` (dkdv: also ``KEY_TILE``). ``BLOCK_N`` holds the longest key segment (dkdv:
    ``KEY_TILE`` does, walked in blocks of ``BLOCK_N`` = ``_tiles.window_key_block`` rows); ``BLOCK_M`` and the
    warps come from ``_tiles.window_tile`` (the tiles the sm_90 report compiled spill-free); under the interpreter
    the query tile is 16 rows (the smallest tl.dot tile)."""
    bn = window_block_n(max_seqlen_k)
    bm, warps, stages = _tiles.window_tile(kernel, C.bucket(max_seqlen_q), bn, C.padded_head_dim(head_dim))
    if C.interpreting():
        bm = C.INTERP_BLOCK_M
    cap = _tiles.WINDOW_HEADS[kernel]
    blocks = dict(BLOCK_M=bm, BLOCK_N=bn, HEADS=heads_per_program(num_segments, kv_heads, cap), num_warps=warps,
                  num_stages=stages)
    if kernel == "dkdv":  # keys in blocks of BLOCK_N rows of the forward's tile
        blocks.update(KEY_TILE=bn, BLOCK_N=_tiles.window_key_block(bn, C.padded_head_dim(head_dim)))
    return blocks


def window_block_n(max_seqlen_k: int) -> int:
    """The key tile: the power of two >= ``max_seqlen_k`` (at least 16, tl.dot's smallest)."""
    return max(16, triton.next_power_of_2(max(int(max_seqlen_k), 1)))


def check_max_seqlen_k(max_seqlen_k: int) -> None:
    if max_seqlen_k > MAX_KEYS:
        raise ValueError(f"max_seqlen_k: the window kernel holds a segment's keys in one tile of at most {MAX_KEYS} "
                         f"rows, got max_seqlen_k={max_seqlen_k} (use the 'triton' backend for longer segments)")


def fwd_launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale: float, blocks: dict):
    """``(args, meta, grid)`` of ``_window_attn_fwd_kernel`` for these tensors and ``blocks`` (``tile("fwd",
    ...)``: BLOCK_M, BLOCK_N, HEADS): positional arguments, every constexpr (the tile included) and the grid.
    Shared by the launcher and ``tools/triton_sm90_report.py``."""
    total_q, H, D = q.shape
    H_kv = k.shape[1]
    S = cu_seqlens_q.shape[0] - 1
    args = (q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            S, total_q, k.shape[0], H // H_kv, softmax_scale * C.LOG2E)
    meta = _meta(D, q.dtype, blocks, q, k, v, out)
    return args, meta, (S + 1, H_kv // blocks["HEADS"])


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
               S, total_q, k.shape[0], H // H_kv, softmax_scale, softmax_scale * C.LOG2E)
    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                 dout.stride(0), dout.stride(1), lse.stride(0), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                 S, total_q, k.shape[0], H // H_kv, softmax_scale, softmax_scale * C.LOG2E)
    return {name: (a, _meta(D, q.dtype, blocks[name], *tensors), (S + 1, H_kv // blocks[name]["HEADS"]))
            for name, a, tensors in (("dq", dq_args, (q, k, v, out, dout, dq)), ("dkdv", dkdv_args, (q, k, v, dout, dk, dv)))}


def _meta(D: int, dtype: torch.dtype, blocks: dict, *tensors) -> dict:
    bd, bdt = C.head_blocks(D)
    return dict(HEAD_DIM=D, BLOCK_D=bd, BLOCK_DT=bdt, ALIGN=C.row_align(*tensors), **C.dot_flags(dtype),
                **{k: blocks[k] for k in ("BLOCK_M", "BLOCK_N", "KEY_TILE", "HEADS") if k in blocks})


def _compile_opts(blocks: dict) -> dict:
    return {} if C.interpreting() else dict(num_warps=blocks["num_warps"], num_stages=blocks["num_stages"])


def window_attn_fwd_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                           softmax_scale: float):
    """Launch the forward. q ``[total_q, H, D]``, k/v ``[total_k, H_kv, D]`` (``H % H_kv == 0``; any row / head
    strides with a unit head-dim stride), cu_seqlens int32 ``[S+1]``, every key segment at most
    ``max_seqlen_k <= 128`` keys (``max_seqlen_q``: any bound on the query segments; it sizes the query tile).

    Returns ``(out [total_q, H, D] in q's dtype, lse [H, total_q] fp32)``: lse +inf and out zeros on rows with
    no key (empty key segment, rows past ``cu_seqlens_q[-1]``). Raises ValueError naming ``max_seqlen_k`` when it
    is above 128. Inputs are assumed validated (``elit_kernels.attention.validate_inputs``).

    >>> out, lse = window_attn_fwd_triton(q, k, v, cu_q, cu_k, 4, 64, 72 ** -0.5)  # doctest: +SKIP
    """
    check_max_seqlen_k(max_seqlen_k)
    q, k, v = (C.last_dim_contiguous(t) for t in (q, k, v))
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    total_q, H, D = q.shape
    out = C.alloc((total_q, H, D), q.dtype, q.device)
    lse = C.alloc((H, total_q), torch.float32, q.device)
    if total_q == 0 or H == 0:
        return out, lse
    blocks = tile("fwd", max_seqlen_q, max_seqlen_k, D, cu_seqlens_q.shape[0] - 1, k.shape[1])
    args, meta, grid = fwd_launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, blocks)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _window_attn_fwd_kernel[grid](*args, **meta, **_compile_opts(blocks))
    return out, lse


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
            kernel[grid](*args, **meta, **_compile_opts(blocks[name]))
    return dq, dk, dv
