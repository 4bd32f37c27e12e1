"""Triton window attention: ``varlen_attention`` for segments of at most 128 keys; the forward and the launch
helpers both directions share (the backward: ``attention_window_bwd``).

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
            S, total_q, k.shape[0], H // H_kv, C.score_args(softmax_scale)[0])
    meta = _meta(D, q.dtype, blocks, q, k, v, out)
    return args, meta, (S + 1, H_kv // blocks["HEADS"])


def _meta(D: int, dtype: torch.dtype, blocks: dict, *tensors) -> dict:
    bd, bdt = C.head_blocks(D)
    return dict(HEAD_DIM=D, BLOCK_D=bd, BLOCK_DT=bdt, ALIGN=C.row_align(*tensors), **C.dot_flags(dtype),
                **{k: blocks[k] for k in ("BLOCK_M", "BLOCK_N", "KEY_TILE", "HEADS") if k in blocks})


def fallbacks(kernel: str, blocks: dict) -> list[dict]:
    """Launch options of window kernel ``kernel`` (its ``tile``), then smaller ones, for
    ``_common.launch_fitting``: the query tile halved down to 16 rows (fwd, dq: the program loops over query
    blocks) or the key block halved down to 16 rows (dkdv: it walks the key tile in blocks), then one pipeline
    stage. The same result from each; less shared memory, for float32 or GPUs with less than sm_90's."""
    dim = "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"
    t = {k: blocks[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
    out = [t]
    while t[dim] > 16:
        t = dict(t, **{dim: t[dim] // 2})
        out.append(t)
    if t["num_stages"] > 1:
        out.append(dict(t, num_stages=1))
    return out


def launch(kernel: str, jit, grid, args: tuple, meta: dict, blocks: dict, device) -> None:
    """Launch window kernel ``kernel`` with ``blocks`` (its ``tile``): as is under the interpreter, else the
    first of ``fallbacks`` the GPU can hold (``_common.launch_fitting``)."""
    if C.interpreting():
        jit[grid](*args, **meta)
    else:
        C.launch_fitting(f"window_{kernel}", jit, grid, args, meta, fallbacks(kernel, blocks), device)


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
        launch("fwd", _window_attn_fwd_kernel, grid, args, meta, blocks, q.device)
    return out, lse
