"""Shared launch-time helpers for the Triton attention kernels (block choice, dtype flags, output buffers)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

# Every output buffer comes from the package's one allocator: with the poison switch on (ELIT_POISON_OUTPUTS=1,
# elit_kernels/_outputs.py) it is NaN-filled before launch, so an element a kernel forgets to write fails the
# tests instead of passing on leftover memory.
from .._env import env_flag, triton_interpreted
from .._precision import fp32_matmul_precision
from .._types import check_bool
from .._outputs import new_output as alloc  # noqa: F401
from ._scale import LOG2E, score_args  # noqa: F401  (score_args: the kernels' scale arguments)

# In-kernel copy (jit functions read module constants only as constexpr).
LOG2E_C: tl.constexpr = tl.constexpr(1.4426950408889634)


interpreting = triton_interpreted  # True when Triton runs kernels through its interpreter (read at each call)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of every ``tl.dot`` for inputs of this dtype: float32 follows PyTorch's float32
    matmul setting (``fp32_matmul_precision``: ``"tf32"``, tensor cores with a 10-bit mantissa, or ``"ieee"``,
    exact float32 on the CUDA cores, many times slower); float16 / bfloat16 dots run on the tensor cores in
    their own precision, where Triton ignores the argument (``"tf32"``, its default, is passed). Triton's
    interpreter always multiplies float32 exactly, whatever the argument."""
    return fp32_matmul_precision() if dtype == torch.float32 else "tf32"


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexpr flags that depend on the dtype, the interpreter and PyTorch's float32 matmul setting.

    UPCAST: the interpreter multiplies bf16 bit patterns in tl.dot (triton#11584), so dot operands
    are widened to fp32 there; on a GPU bf16 goes to the tensor cores as is.
    DOT_PREC: ``dot_precision(dtype)``, read at each launch (a changed setting compiles the other variant).
    """
    return {
        "UPCAST": bool(interpreting() and dtype == torch.bfloat16),
        "DOT_PREC": dot_precision(dtype),
    }


def head_blocks(head_dim: int) -> tuple[int, int]:
    """``(BLOCK_D, BLOCK_DT)``: the head dim as a power-of-two main column block (unmasked when a tail
    follows) plus a power-of-two tail block masked past ``head_dim`` (0: no tail), both >= 16 (tl.dot's
    smallest K). Two blocks when they are narrower than the next power of two: D=72 runs as 64 + 16
    (80 columns of tensor-core work, not 128), D=96 as 64 + 32, D=40 as 32 + 16; 64 and 128 as one block.
    """
    full = max(16, triton.next_power_of_2(head_dim))
    main = max(16, full // 2 if full > head_dim else full)
    if main >= head_dim:
        return main, 0
    tail = max(16, triton.next_power_of_2(head_dim - main))
    return (main, tail) if main + tail < full else (full, 0)


def padded_head_dim(head_dim: int) -> int:
    """Columns of tensor-core work per head row: ``sum(head_blocks(head_dim))``."""
    return sum(head_blocks(head_dim))


def row_align(*tensors: torch.Tensor) -> int:
    """``ALIGN`` for the kernels: elements per 16 bytes when every row and head stride of these
    ``[rows, heads, D]`` tensors is a multiple of it, else 1. The kernels promise Triton (``tl.multiple_of``)
    that each row offset is a multiple of ALIGN; with a 16-byte aligned base pointer (which Triton
    checks itself) every row then starts on 16 bytes and tiles load as 16-byte vectors / ``cp.async``.
    Without it, D=72 (a 144-byte row) falls back to 2-byte loads."""
    a = 16 // tensors[0].element_size()
    return a if all(t.stride(0) % a == 0 and t.stride(1) % a == 0 for t in tensors) else 1


def kernel_meta(head_dim: int, dtype: torch.dtype, causal: bool, *tensors: torch.Tensor, window: bool = False,
                softcap: bool = False) -> dict:
    """The constexpr arguments every attention kernel takes except the tile: head blocks, causal, window,
    softcap, the dtype flags (``dot_flags``) and ``ALIGN`` (``row_align`` of the tensors the kernel tiles)."""
    bd, bdt = head_blocks(head_dim)
    return dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_DT=bdt, CAUSAL=bool(causal), WINDOW=bool(window),
                SOFTCAP=bool(softcap), ALIGN=row_align(*tensors), **dot_flags(dtype))


def bucket(n: int) -> int:
    """Autotune key for a max length: its power-of-two bucket (>= 16), so every new budget (a new
    max_seqlen) does not trigger a fresh tuning run, while Read/Write (<=64) and core (up to 4096)
    shapes still tune separately."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


#: (kernel, device, argument dtypes, constexprs, first tile) -> the tile of its fallback list that launched
_FITTING: dict[tuple, dict] = {}


def launch_fitting(name: str, jit, grid, args: tuple, meta: dict, tiles: Sequence[dict], device) -> dict:
    """Launch ``jit[grid](*args, **meta, **tile)`` with the first of ``tiles`` this GPU can run; returns that tile.

    ``tiles``: launch options, the chosen tile first, then smaller ones (dicts of tile constexprs and
    ``num_warps`` / ``num_stages``; they override ``meta``). The tile tables were compiled spill-free for sm_90 in
    16-bit types (``tools/triton_sm90_report.py``); float32 doubles a tile's shared memory, and GPUs with less
    shared memory per block than an H100's 227 KB (A100: 163 KB, consumer Ampere / Ada cards: 99 KB) cannot hold
    every tile. Triton raises ``OutOfResources`` for such a tile when it loads the compiled kernel, before anything
    runs, so the next tile is tried; the one that launched is remembered for this (kernel, device, dtypes,
    constexprs), so later calls go straight to it. ``name``: the kernel, for the error. Raises RuntimeError naming
    the kernel, the device and what it lacks when no tile fits.
    """
    def key():
        return (name, device, tuple([a.dtype for a in args if isinstance(a, torch.Tensor)]), tuple(meta.items()),
                tuple(tiles[0].items()))
    # Until some tile has failed to fit in this process, no key is built (microseconds per launch saved).
    known = _FITTING.get(key()) if _FITTING else None
    tried = []
    for tile in ([known] if known is not None else tiles):
        try:
            jit[grid](*args, **{**meta, **tile})
        except OutOfResources as e:
            tried.append(f"{_tile_name(tile)}: {e.name} {e.required} > {e.limit}")
            continue
        if tile is not tiles[0]:
            _FITTING[key()] = tile
        return tile
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor)), None)
    raise RuntimeError(f"{name}: no tile of this kernel fits {device} ({gpu}) at head dim {meta.get('HEAD_DIM')} in "
                       f"{dtype}: {'; '.join(tried)}. Run these inputs in bfloat16 / float16, or on another "
                       "backend (backend='torch')")


def launch_autotuned(name: str, tuned, jit, grid, args: tuple, meta: dict, tiles: Sequence[dict], device) -> None:
    """Launch ``tuned`` (``jit`` under ``triton.autotune``); where it raises ``OutOfResources``, ``launch_fitting``
    over ``tiles`` instead. Triton's autotuner skips the candidates a GPU cannot hold when it times several, but
    runs a lone candidate (one left after pruning) untimed, so that one can still be too big."""
    try:
        tuned[grid](*args, **meta)
    except OutOfResources:
        launch_fitting(name, jit, grid, args, meta, tiles, device)


def _tile_name(tile: dict) -> str:
    dims = "x".join(str(tile[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_T") if k in tile)
    return f"{dims} w{tile.get('num_warps', '?')} s{tile.get('num_stages', '?')}"


# Under the interpreter every program is Python over NumPy: the smallest legal tiles keep the
# dots cheap and autotuning (many timed reruns) would only multiply the cost.
INTERP_BLOCK_M = 16
INTERP_BLOCK_N = 16


# Autotuning compiles every candidate tile on first use of a (length bucket, head dim, causal,
# dtype) key: seconds each, so an uncached test matrix can spend many minutes compiling. It is on by
# default for real runs; ELIT_TRITON_AUTOTUNE=0 (or set_autotune(False)) uses the heuristic tile.
_autotune = env_flag("ELIT_TRITON_AUTOTUNE", True)


def set_autotune(enabled: bool) -> None:
    """Autotune tiles on CUDA (True) or use ``_tiles.heuristic`` (False). ``enabled``: a bool (NumPy's bool is
    one); anything else is a TypeError naming it."""
    global _autotune
    _autotune = check_bool("enabled", enabled)


def autotune_enabled() -> bool:
    return _autotune


def num_programs(num_segments: int, total: int, max_len: int, block: int) -> int:
    """Programs along axis 0 for rows tiled by ``block`` (see ``segment_of_program``): one per (segment,
    block) up to ``max_len`` plus the rows past the packed data, or, when ``max_len`` would launch more
    than that, at most ``total // block + num_segments + 1``, whatever ``max_len`` says."""
    dense = (num_segments + 1) * triton.cdiv(max(int(max_len), 1), block)
    return min(dense, total // block + num_segments + 1)


@triton.jit
def clamp_row(x, total):
    """A ``cu_seqlens`` element as a row index inside ``[0, total]`` (int64). The kernels read every element
    through it, so inconsistent ``cu_seqlens`` (values past the row count or negative, as a compiled graph
    that skips the value checks may pass) never address a row outside the tensors."""
    return tl.minimum(tl.maximum(x.to(tl.int64), 0), total)


@triton.jit
def segment_of_program(CU, S, total, max_len, BLOCK: tl.constexpr):
    """Map program id 0 to ``(segment, first block, block step, segment row start, segment row count)``
    along the axis that ``CU`` (int32 ``[S+1]``) cuts into segments; the caller loops over the blocks
    ``range(first, cdiv(count, BLOCK), step)``.

    Segment ``S`` is the rows past ``CU[S]`` up to ``total`` (a buffer longer than the packed data): a
    segment with no partner rows, so the kernels write zeros there without a separate launch.

    Every ``CU`` element is clamped into ``[0, total]`` (``clamp_row``) and a count below zero is 0, so
    whatever ``CU`` holds, a segment's rows lie inside ``[0, total)``.

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
            below = clamp_row(tl.load(CU + mid), total) // BLOCK + mid <= pid
            lo = tl.where(below, mid, lo)
            hi = tl.where(below, hi, mid)
        seg = lo
        first = pid - (clamp_row(tl.load(CU + seg), total) // BLOCK + seg)
    else:
        seg = pid // nb
        first = pid % nb
    start = clamp_row(tl.load(CU + seg), total)
    end = tl.where(seg < S, clamp_row(tl.load(CU + tl.minimum(seg + 1, S)), total), total)
    count = tl.maximum(end - start, 0)
    step = tl.where(search, tl.maximum(tl.cdiv(count, BLOCK), 1), nb)
    return seg, first, step, start, count


@triton.jit
def partner_rows(CU, seg, S, total):
    """``(row start, row count)`` of segment ``seg`` along the other axis (``total`` rows; elements clamped
    as in ``segment_of_program``); the tail segment ``S`` has none."""
    start = clamp_row(tl.load(CU + seg), total)
    end = clamp_row(tl.load(CU + tl.minimum(seg + 1, S)), total)
    return start, tl.maximum(end - start, 0)


# A window side of -1 (unbounded) reaches the kernels as this many keys, so the bounds need no branch; it
# stays far below int32 overflow for any row and key index.
WINDOW_UNBOUNDED = 1 << 30


def window_args(window_left: int, window_right: int) -> tuple[int, int, bool]:
    """``(win_left, win_right, WINDOW)`` for the kernels: -1 -> ``WINDOW_UNBOUNDED``; WINDOW is False when
    neither side is bounded (the kernels then skip the window code)."""
    window = window_left >= 0 or window_right >= 0
    return (window_left if window_left >= 0 else WINDOW_UNBOUNDED,
            window_right if window_right >= 0 else WINDOW_UNBOUNDED, window)


@triton.jit
def visible_keys(rows, len_q, len_k, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, win_left, win_right):
    """Keys query ``rows`` (positions in a segment of ``len_q`` queries, ``len_k`` keys) may see: key j with
    ``diag = row + len_k - len_q`` is seen iff ``j <= diag`` (causal), ``diag - win_left <= j <= diag +
    win_right`` (window; flash-attn's semantics)."""
    diag = rows + len_k - len_q
    hi = rows * 0 + len_k - 1
    lo = rows * 0
    if CAUSAL:
        hi = tl.minimum(hi, diag)
    if WINDOW:
        hi = tl.minimum(hi, diag + win_right)
        lo = tl.maximum(lo, diag - win_left)
    return tl.maximum(hi - lo + 1, 0)


@triton.jit
def key_range(row_first, row_last, len_q, len_k, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, win_left, win_right):
    """``[lo, hi)``: the keys that any query row in ``row_first..row_last`` may see (loop bounds)."""
    diag = len_k - len_q
    lo = len_k * 0
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(hi, row_last + 1 + diag)
    if WINDOW:
        hi = tl.minimum(hi, row_last + 1 + diag + win_right)
        lo = tl.maximum(lo, row_first + diag - win_left)
    return lo, tl.maximum(hi, 0)


@triton.jit
def in_window(i, j, diag, win_left, win_right):
    """Key j is inside query i's window (broadcasting): ``i + diag - win_left <= j <= i + diag + win_right``."""
    return (j >= i + diag - win_left) & (j <= i + diag + win_right)


@triton.jit
def tanh(x):
    """tanh in fp32 from exp2 alone (the interpreter has no libdevice): an odd Taylor polynomial below
    |x| = 1/8 (error < 2e-10 relative), ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|)`` above."""
    ax = tl.abs(x)
    e = tl.exp2(ax * (-2.0 * LOG2E_C))
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.125, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def scores(dot, qk_scale, cap2, SOFTCAP: tl.constexpr):
    """``(s, th)``: base-2 logits from ``dot = q.k`` and, with SOFTCAP, ``th = tanh(scale q.k / softcap)``
    (``s = th * softcap * log2(e)``; the backward multiplies ds by ``1 - th^2``). ``score_args`` gives
    ``qk_scale`` and ``cap2``. Without SOFTCAP ``th`` is ``dot`` (unused)."""
    if SOFTCAP:
        th = tanh(dot * qk_scale)
        s = th * cap2
    else:
        th = dot
        s = dot * qk_scale
    return s, th


@triton.jit
def row_offsets(start, rows, stride_t, head, stride_h, ALIGN: tl.constexpr):
    """Element offsets ``(start + rows) * stride_t + head * stride_h`` of tile rows ``[R]`` (int64),
    declared multiples of ``ALIGN`` (``row_align`` checked the strides) so that Triton can prove 16-byte
    aligned rows and emit vector loads / ``cp.async`` even when the head stride (72 at D=72) is not a
    multiple of 16 elements, which is all its own argument specialisation looks for."""
    return tl.multiple_of((start + rows) * stride_t + head * stride_h, ALIGN)


@triton.jit
def _cols_mask(row_mask, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    # A block inside the head dim needs no column mask (its constancy would only limit the vector width).
    if COL0 + WIDTH <= HEAD_DIM:
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & ((COL0 + tl.arange(0, WIDTH)) < HEAD_DIM)[None, :]
    return mask


@triton.jit
def load_head(P, row_off, row_mask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
              UPCAST: tl.constexpr):
    """Rows ``P[row_off + c]`` as ``(main [R, BLOCK_D], tail [R, BLOCK_DT])`` column blocks, zeros where
    ``row_mask`` [R] is false or a column is past ``HEAD_DIM``; the tail is the main block itself when
    ``BLOCK_DT == 0`` (never read then). ``UPCAST`` widens to fp32 (interpreter bf16 dots)."""
    cols = tl.arange(0, BLOCK_D)
    t0 = tl.load(P + row_off[:, None] + cols[None, :], mask=_cols_mask(row_mask, 0, BLOCK_D, HEAD_DIM), other=0.0)
    if UPCAST:
        t0 = t0.to(tl.float32)
    t1 = t0
    if BLOCK_DT > 0:
        cols_t = BLOCK_D + tl.arange(0, BLOCK_DT)
        t1 = tl.load(P + row_off[:, None] + cols_t[None, :], mask=_cols_mask(row_mask, BLOCK_D, BLOCK_DT, HEAD_DIM),
                     other=0.0)
        if UPCAST:
            t1 = t1.to(tl.float32)
    return t0, t1


@triton.jit
def store_head(P, row_off, row_mask, x0, x1, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DT: tl.constexpr):
    """Store the column blocks ``(x0 [R, BLOCK_D], x1 [R, BLOCK_DT])`` (as ``load_head`` splits them) to
    ``P[row_off + c]`` in P's dtype, for rows where ``row_mask`` holds and columns below ``HEAD_DIM``."""
    cols = tl.arange(0, BLOCK_D)
    tl.store(P + row_off[:, None] + cols[None, :], x0.to(P.dtype.element_ty),
             mask=_cols_mask(row_mask, 0, BLOCK_D, HEAD_DIM))
    if BLOCK_DT > 0:
        cols_t = BLOCK_D + tl.arange(0, BLOCK_DT)
        tl.store(P + row_off[:, None] + cols_t[None, :], x1.to(P.dtype.element_ty),
                 mask=_cols_mask(row_mask, BLOCK_D, BLOCK_DT, HEAD_DIM))


@triton.jit
def dot_nt(a0, a1, b0, b1, BLOCK_DT: tl.constexpr, DOT_PREC: tl.constexpr):
    """``a @ b^T`` [R, C] fp32 over the head dim held as column blocks: ``a0 b0^T + a1 b1^T`` (the tail
    dot accumulates into the main one; skipped when ``BLOCK_DT == 0``)."""
    acc = tl.dot(a0, tl.trans(b0), input_precision=DOT_PREC)
    if BLOCK_DT > 0:
        acc = tl.dot(a1, tl.trans(b1), acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def static_checks(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, ALIGN: tl.constexpr):
    """Tile invariants every attention kernel relies on (``head_blocks``, ``row_align``)."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16, "tiles of at least 16 rows (tl.dot)")
    tl.static_assert(BLOCK_D >= 16 and (BLOCK_D & (BLOCK_D - 1)) == 0, "main head block: a power of two >= 16")
    tl.static_assert(BLOCK_D + BLOCK_DT >= HEAD_DIM, "head blocks cover the head dim")
    tl.static_assert(BLOCK_DT == 0 or (BLOCK_D < HEAD_DIM and BLOCK_DT >= 16 and (BLOCK_DT & (BLOCK_DT - 1)) == 0),
                     "tail block: a power of two >= 16 after an unmasked main block")
    tl.static_assert(ALIGN >= 1 and (ALIGN & (ALIGN - 1)) == 0, "ALIGN: a power of two")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any row / head strides but need unit stride along the head dim."""
    return t if t.stride(-1) == 1 else t.contiguous()
