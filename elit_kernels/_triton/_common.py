"""Shared launch-time helpers for the Triton attention kernels (block choice, dtype flags, poisoning)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

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


@triton.jit
def segment_block(CU_Q, CU_K, max_len, BLOCK: tl.constexpr):
    """Map program id 0 to (block index inside its segment, q start, q length, k start, k length).

    Axis 0 flattens (segment, block): the segment count (thousands for Read/Write) can exceed the
    65535 limit of grid axes 1 and 2. The grid is sized by ``max_len`` (no host sync to learn each
    length), so a block may lie past the end of a shorter segment: callers return early then.
    """
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(max_len, BLOCK)
    seg = pid // n_blocks
    q_start = tl.load(CU_Q + seg).to(tl.int64)
    len_q = tl.load(CU_Q + seg + 1).to(tl.int64) - q_start
    k_start = tl.load(CU_K + seg).to(tl.int64)
    len_k = tl.load(CU_K + seg + 1).to(tl.int64) - k_start
    return pid % n_blocks, q_start, len_q, k_start, len_k
