"""Tile tables of the Triton attention kernels: what the heuristic and the autotuner may run on a GPU.

Each kernel owns one dimension of a tile and loops over the other: the forward and dQ own BLOCK_M query
rows and loop over BLOCK_N keys; dK/dV owns BLOCK_N key rows and loops over BLOCK_M queries. The rows a
program owns carry fp32 accumulators over the whole (padded) head dim, so that is the dimension register
pressure grows with.

Every entry was compiled for sm_90 at head dims 64/72/128, bf16/fp16, causal or not
(``tools/triton_sm90_report.py``, Triton 3.6 and 3.8) and kept only when ptxas spills nothing, up to the
padded head dim it is marked for. Tiles with 16 or 32 owned rows use ``mma.sync`` (Triton replicates it
over the 4 warps); 64 and 128 use ``wgmma`` (one warpgroup per 64 rows, or 8 warps splitting the columns,
which halves the accumulator registers per thread: dK/dV and dQ need that).
"""
from __future__ import annotations

import functools
import inspect

import triton

# (BLOCK_M, BLOCK_N, num_warps, num_stages, largest padded head dim it runs at). Left out because they
# spilled on Triton 3.6 or 3.8: 32-row forward tiles with 32+ keys, 64x64 forward over 4 warps at D=128 (and
# 3 stages), 16/32-row tiles with 64 inner rows at D=72, 32-row dQ over 4 warps or 2 stages, dK/dV owning
# 32 keys (any warps / stages) and any 4-warp dK/dV owning 64 keys. Entries marked 256 also serve head dims above 128 (fp32 with unusual head dims),
# which the sm_90 report does not cover.
TILES = {
    "fwd": ((128, 64, 8, 2, 128), (128, 32, 8, 2, 128), (64, 64, 8, 2, 128), (64, 32, 4, 2, 128),
            (64, 16, 4, 2, 256), (32, 16, 4, 2, 256), (16, 32, 4, 2, 128), (16, 16, 4, 2, 256)),
    "dq": ((128, 32, 8, 2, 128), (128, 16, 8, 2, 128), (64, 32, 8, 2, 128), (64, 16, 8, 2, 256),
           (32, 16, 2, 1, 256), (16, 32, 4, 2, 128), (16, 16, 4, 2, 256)),
    "dkdv": ((16, 128, 8, 2, 80), (32, 64, 8, 2, 128), (16, 64, 8, 2, 128), (16, 16, 4, 2, 256)),
}
KERNELS = tuple(TILES)


def owned(kernel: str, m: int, n: int) -> tuple[int, int]:
    """``(owned rows, looped-over rows)`` of a (BLOCK_M, BLOCK_N) tile for this kernel."""
    return (n, m) if kernel == "dkdv" else (m, n)


def tile_ok(kernel: str, tile: tuple, qb: int, kb: int, padded: int) -> bool:
    """Whether ``tile`` may run for max-length buckets ``qb`` / ``kb`` at this padded head dim: marked for
    it, no larger than the segments in either dimension (mostly masked work otherwise), and owning at
    least half of ``min(bucket, 64)`` rows (many more programs and loop trips for no gain otherwise)."""
    m, n, _, _, max_padded = tile
    if padded > max_padded:
        return False
    rows, inner = owned(kernel, m, n)
    rb, ib = owned(kernel, qb, kb)
    return rows <= max(rb, 16) and inner <= max(ib, 16) and rows >= min(rb, 64) // 2


def candidates(kernel: str, qb: int, kb: int, padded: int) -> list[tuple]:
    """Tiles the autotuner times for these buckets (never empty: the heuristic tile at worst)."""
    keep = [t for t in TILES[kernel] if tile_ok(kernel, t, qb, kb, padded)]
    return keep or [heuristic(kernel, qb, kb, padded)]


def heuristic(kernel: str, qb: int, kb: int, padded: int) -> tuple:
    """The tile without autotuning: the most owned rows that fit the bucket (128 only for segments of
    1024+ rows, else at most 64), then the longest inner step that fits; the smallest tile when none fits."""
    rb, ib = owned(kernel, qb, kb)
    cap = 128 if rb >= 1024 else 64
    fits = [t for t in TILES[kernel] if t[4] >= padded and owned(kernel, t[0], t[1])[0] <= min(max(rb, 16), cap)
            and owned(kernel, t[0], t[1])[1] <= max(ib, 16)]
    if not fits:
        return min((t for t in TILES[kernel] if t[4] >= padded), key=lambda t: t[0] * t[1])
    return max(fits, key=lambda t: owned(kernel, t[0], t[1]))


@functools.lru_cache(maxsize=None)  # once per (kernel, tile, padded): the launchers ask on every launch
def fallbacks(kernel: str, tile: tuple, padded: int) -> tuple[dict, ...]:
    """``tile`` (a table entry) and then every smaller entry that runs at this padded head dim, largest first,
    as launch options (``_common.launch_fitting``): what a launch tries when the GPU cannot hold ``tile``
    (float32, or less shared memory per block than sm_90). Smaller: fewer (BLOCK_M x BLOCK_N x stages)
    elements staged, then fewer in one stage; every tile computes the same result (the kernels mask rows past
    a segment)."""
    def size(t):
        return t[0] * t[1] * t[3], t[0] * t[1]
    rest = sorted((t for t in TILES[kernel] if t[4] >= padded and size(t) < size(tile)), key=size, reverse=True)
    return tuple(dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for (m, n, w, s, _) in [tile, *rest])


def configs(kernel: str) -> list:
    """The kernel's table as ``triton.Config`` objects for ``triton.autotune``."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for (m, n, w, s, _) in TILES[kernel]]


#: whether the installed Triton can keep an autotuning choice on disk (``triton.autotune(cache_results=...)``)
AUTOTUNE_CACHES = "cache_results" in inspect.signature(triton.autotune).parameters


def autotuned(kernel: str, key: list[str]):
    """``triton.autotune`` over ``kernel``'s tiles, pruned to ``candidates`` per call, keyed by ``key`` (plus the
    argument dtypes, which Triton adds). The choice is cached on disk where the installed Triton can
    (``cache_results``, Triton >= 3.3): in Triton's cache directory (``TRITON_CACHE_DIR``), keyed by the Triton
    version, the GPU architecture, the kernel source, the candidate tiles and the key, so a new process reuses
    it instead of timing every candidate again (seconds per key). H100 and H200 share an architecture (sm_90)
    and so share a cached choice."""
    kwargs = dict(configs=configs(kernel), key=key, prune_configs_by={"early_config_prune": pruner(kernel)})
    if AUTOTUNE_CACHES:
        kwargs["cache_results"] = True
    return triton.autotune(**kwargs)


def as_tile(c) -> tuple:
    """The table entry of a ``triton.Config``."""
    key = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
    return next((t for kern in KERNELS for t in TILES[kern] if t[:4] == key), (*key, 0))


def pruner(kernel: str):
    """``early_config_prune`` for this kernel's autotuner: the configs of ``candidates``."""
    def prune(cfgs, named_args, **kwargs):
        args = dict(named_args, **kwargs)
        keep = candidates(kernel, args["max_q_bucket"], args["max_k_bucket"], args["BLOCK_D"] + args["BLOCK_DT"])
        return [c for c in cfgs if as_tile(c)[:4] in {t[:4] for t in keep}] or cfgs[-1:]
    return prune


# Window kernels (``attention_window``): the key tile is a whole segment (BLOCK_N = 16..128, from the longest
# key segment), so only the query tile and the warps are chosen here. Entries (largest BLOCK_N, largest padded
# head dim, smallest BLOCK_M, largest BLOCK_M, num_warps, num_stages), the first that covers the key tile and head
# dim applies. Every entry compiled spill-free for sm_90 at head dims 64/72/128 (tools/triton_sm90_report.py,
# Triton 3.8; a sweep of BLOCK_M 16/32/64 x BLOCK_N 16..128 x 4/8 warps chose them). Left out because they
# spilled: dq at D=72 with 128 keys and 16 or 32 query rows (any warps; 64 rows fit), dq with 16 rows over 8 warps
# at D=72, dK/dV with 32+ query rows per step at D=72 and most 4-warp dK/dV tiles past 32 keys. Not yet timed on a
# GPU: the warps and head blocks per program are first guesses.
WINDOW_TILES = {
    "fwd": ((64, 128, 16, 64, 4, 2), (128, 80, 16, 64, 4, 2), (128, 128, 16, 32, 4, 2)),
    "dq": ((64, 128, 16, 64, 4, 2), (128, 64, 16, 64, 8, 2), (128, 80, 64, 64, 8, 2), (128, 128, 16, 32, 8, 2)),
    "dkdv": ((32, 128, 16, 16, 4, 2), (128, 128, 16, 16, 8, 2)),  # BLOCK_N: window_key_block
}
#: kv heads one window program owns at most (``attention_window.heads_per_program``)
WINDOW_HEADS = {"fwd": 4, "dq": 4, "dkdv": 2}
#: dK/dV walks a key tile in blocks of at most this many keys above this padded head dim: (padded, keys). Its
#: dK and dV accumulators for 128 keys x 128 columns spilled on sm_90 (16 query rows, 8 warps, 1-3 stages).
WINDOW_DKDV_KEY_BLOCK = (80, 64)


def window_key_block(bn: int, padded: int) -> int:
    """Key rows per step of the window dK/dV kernel for a key tile of ``bn`` rows: the whole tile, or
    ``WINDOW_DKDV_KEY_BLOCK`` rows above its padded head dim."""
    above, keys = WINDOW_DKDV_KEY_BLOCK
    return min(bn, keys) if padded > above else bn


def window_tile(kernel: str, qb: int, bn: int, padded: int) -> tuple[int, int, int]:
    """``(BLOCK_M, num_warps, num_stages)`` of window kernel ``kernel`` ("fwd", "dq", "dkdv") for a query-length
    bucket ``qb``, key tile ``bn`` (16..128) and padded head dim (<= 128): the first entry of ``WINDOW_TILES``
    that covers ``bn`` and ``padded``; BLOCK_M is ``qb`` clamped into the entry's range."""
    for max_n, max_padded, m_min, m_max, warps, stages in WINDOW_TILES[kernel]:
        if bn <= max_n and padded <= max_padded:
            return max(m_min, min(qb, m_max)), warps, stages
    raise ValueError(f"window_tile: no {kernel} tile for {bn} keys at padded head dim {padded} (at most 128 each)")
