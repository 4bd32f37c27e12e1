"""Shared launch-time helpers for the Triton attention kernels (block choice, dtype flags, poisoning)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# In-kernel copy (jit functions read module constants only as constexpr).
LOG2E_C: tl.constexpr = tl.constexpr(1.4426950408889634)

# Debug aid (docs/design.md §4): fill kernel outputs with NaN before launch so an element a kernel
# forgets to write fails the tests instead of passing on leftover memory.
_poison_outputs = os.environ.get("ELIT_POISON_OUTPUTS", "0") not in ("0", "", "false", "False")


def set_poison_outputs(enabled: bool) -> None:
    """NaN-fill every output buffer of the Triton kernels before they run (tests; costs a memset)."""
    global _poison_outputs
    _poison_outputs = bool(enabled)


def poison_outputs_enabled() -> bool:
    return _poison_outputs


def alloc(shape, dtype, device) -> torch.Tensor:
    if _poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def interpreting() -> bool:
    """True when Triton runs kernels through its NumPy interpreter (read at launch, not import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexpr flags that depend on the dtype and on the interpreter.

    UPCAST: the interpreter multiplies bf16 bit patterns in tl.dot (triton#11584), so dot operands
    are widened to fp32 there; on a GPU bf16 goes to the tensor cores as is.
    DOT_PREC: fp32 inputs would silently run as TF32 on tensor cores (10-bit mantissa), which breaks
    the fp32 tolerance; "ieee" keeps fp32 exact. 16-bit inputs ignore the setting.
    """
    return {
        "UPCAST": bool(interpreting() and dtype == torch.bfloat16),
        "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32",
    }


def block_d(head_dim: int) -> int:
    # tl.arange needs a power of two and tl.dot a K of at least 16: D=72 runs as 128 with a mask.
    return max(16, triton.next_power_of_2(head_dim))


def bucket(n: int) -> int:
    """Autotune key for a max length: its power-of-two bucket (>= 16), so every new budget (a new
    max_seqlen) does not trigger a fresh tuning run, while Read/Write (<=64) and core (up to 4096)
    shapes still tune separately."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


# Under the interpreter every program is Python over NumPy: the smallest legal tiles keep the
# dots cheap and autotuning (many timed reruns) would only multiply the cost.
INTERP_BLOCK_M = 16
INTERP_BLOCK_N = 16


# Autotuning compiles every candidate tile on first use of a (length bucket, head dim, causal,
# dtype) key: seconds each, so an uncached test matrix can spend many minutes compiling. It is on by
# default for real runs; ELIT_TRITON_AUTOTUNE=0 (or set_autotune(False)) uses the heuristic tile.
_autotune = os.environ.get("ELIT_TRITON_AUTOTUNE", "1") not in ("0", "", "false", "False")


def set_autotune(enabled: bool) -> None:
    """Autotune tiles on CUDA (True) or use ``heuristic_tile`` (False)."""
    global _autotune
    _autotune = bool(enabled)


def autotune_enabled() -> bool:
    return _autotune


# (BLOCK_M, BLOCK_N, num_warps, num_stages). A curated list rather than a full product: ELIT's
# Read/Write segments (1-64 tokens) want 16-64 row tiles, core (up to 4096) 64-128; after
# pruning to the length bucket each key times about 2-7 candidates.
_TILES = ((16, 16, 2, 2), (32, 16, 4, 2), (64, 16, 4, 2), (16, 32, 4, 2), (16, 64, 4, 2), (32, 32, 4, 2),
          (32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 8, 2), (128, 64, 8, 2))


def tile_configs(stages=(2, 3)):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for (m, n, w, s) in _TILES if s in stages]


def _tile_ok(m: int, n: int, qb: int, kb: int, bd: int) -> bool:
    # Larger than the longest segment: mostly masked work. Much smaller than it (below half of
    # min(bucket, 64)): too many programs / loop trips for no gain. Head dims > 128 spill
    # registers / overflow shared memory with the big tiles.
    if m > qb or n > kb:
        return False
    if m < min(qb, 64) // 2 or n < min(kb, 64) // 2:
        return False
    return not (bd > 128 and m * n > 64 * 64)


def prune_by_length(configs, named_args, **kwargs):
    """``early_config_prune`` for the autotuners: keep tiles that fit the bucketed max lengths."""
    args = dict(named_args)
    args.update(kwargs)
    qb, kb, bd = args["max_q_bucket"], args["max_k_bucket"], args["BLOCK_D"]
    keep = [c for c in configs if _tile_ok(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], qb, kb, bd)]
    return keep or [configs[0]]


def heuristic_tile(max_q: int, max_k: int, bd: int, backward: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) without autotuning: the tile the length buckets
    suggest (16 rows for 1-16 token Read/Write segments, 64-128 for long core segments). The
    backward keeps more tiles live per step (q, dO, k, v, and a dK/dV or dQ accumulator), so its
    tiles stay at 64 and shrink further for large head dims."""
    qb, kb = bucket(max_q), bucket(max_k)
    big = 128 if (bd <= 128 and qb >= 1024 and not backward) else 64
    m, n = min(qb, big), min(kb, 64)
    if bd > 128:
        m, n = min(m, 32 if backward else 64), min(n, 32)
    return m, n, (8 if m >= 128 else 4), 2


def num_programs(num_segments: int, total: int, max_len: int, block: int) -> int:
    """Programs along axis 0 for rows tiled by ``block`` (see ``segment_of_program``): one per (segment,
    block) up to ``max_len`` plus the rows past the packed data, or, when ``max_len`` would launch more
    than that, at most ``total // block + num_segments + 1``, whatever ``max_len`` says."""
    dense = (num_segments + 1) * triton.cdiv(max(int(max_len), 1), block)
    return min(dense, total // block + num_segments + 1)


@triton.jit
def segment_of_program(CU, S, total, max_len, BLOCK: tl.constexpr):
    """Map program id 0 to ``(segment, first block, block step, segment row start, segment row count)``
    along the axis that ``CU`` (int32 ``[S+1]``) cuts into segments; the caller loops over the blocks
    ``range(first, cdiv(count, BLOCK), step)``.

    Segment ``S`` is the rows past ``CU[S]`` up to ``total`` (a buffer longer than the packed data): a
    segment with no partner rows, so the kernels write zeros there without a separate launch.

    Two mappings, picked from the launch shape alone (no host read of CU) exactly as ``num_programs``
    sizes the grid:
    - dense: ``cdiv(max_len, BLOCK)`` programs per segment, program p -> segment ``p // nb``, block
      ``p % nb``, stepping by ``nb``, so a segment longer than ``max_len`` is still covered in full;
    - search, when max_len is slack enough that dense would launch more programs than
      ``total // BLOCK + S + 1``: segment s owns programs ``[CU[s] // BLOCK + s, CU[s+1] // BLOCK + s + 1)``,
      enough for all of its blocks at any length; a binary search over CU finds it.
    The segment count (thousands for Read/Write) stays on axis 0: axes 1 and 2 stop at 65535.
    """
    pid = tl.program_id(0).to(tl.int64)
    nb = tl.cdiv(tl.maximum(max_len, 1), BLOCK).to(tl.int64)
    n_search = total // BLOCK + S + 1
    search = (S + 1) * nb > n_search
    if search:
        lo = pid * 0
        hi = lo + S + 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            below = tl.load(CU + mid).to(tl.int64) // BLOCK + mid <= pid
            lo = tl.where(below, mid, lo)
            hi = tl.where(below, hi, mid)
        seg = lo
        first = pid - (tl.load(CU + seg).to(tl.int64) // BLOCK + seg)
    else:
        seg = pid // nb
        first = pid % nb
    start = tl.load(CU + seg).to(tl.int64)
    end = tl.where(seg < S, tl.load(CU + tl.minimum(seg + 1, S)).to(tl.int64), total)
    count = end - start
    step = tl.where(search, tl.maximum(tl.cdiv(count, BLOCK), 1), nb)
    return seg, first, step, start, count


@triton.jit
def partner_rows(CU, seg, S):
    """``(row start, row count)`` of segment ``seg`` along the other axis; the tail segment ``S`` has none."""
    start = tl.load(CU + seg).to(tl.int64)
    end = tl.load(CU + tl.minimum(seg + 1, S)).to(tl.int64)
    return start, end - start


@triton.jit
def visible_keys(rows, len_q, len_k, CAUSAL: tl.constexpr):
    """Keys query ``rows`` (positions in a segment of ``len_q`` queries, ``len_k`` keys) may see."""
    if CAUSAL:
        n = tl.minimum(tl.maximum(rows + len_k - len_q + 1, 0), len_k)
    else:
        n = rows * 0 + len_k
    return n


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any row / head strides but need unit stride along the head dim."""
    return t if t.stride(-1) == 1 else t.contiguous()
