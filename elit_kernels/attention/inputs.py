"""The inputs of one ``varlen_attention`` call: ``AttnInputs``, ``SegmentRuns`` and ``validate_inputs``.

Nothing here imports the rest of the attention package: the registry, the known-answer gate, dispatch and the
backends all build on this module.
"""
from __future__ import annotations

import dataclasses
import itertools
import operator
import weakref

import torch

from .._env import env_flag
from .._transforms import _fwd, active_transform, peek
from .._types import check_bool, is_real


_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_HEAD_DIM = 256
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
# softmax_scale and softcap reach every kernel as float32: a scale past float32's max, or a softcap outside its normal
# range, overflows to inf or flushes to 0 (NaN scores and gradients), so they are refused; a scale below the normal
# range is legal (is_zero_scale: the fused kernels do not see it)
_F32_MAX = float(torch.finfo(torch.float32).max)
_F32_TINY = float(torch.finfo(torch.float32).tiny)


def is_zero_scale(scale: float) -> bool:
    """Whether ``softmax_scale`` may be 0 to a kernel that applies it in float32: 0, or below float32's normal
    range (``|scale| < 2**-126``, 1e-50 say), which rounds to 0 or is a subnormal that flush-to-zero code (CUDA
    built with fast math, as the flash-attn package is; ``torch.set_flush_denormal(True)`` on a CPU) reads as 0.
    Such kernels scale their masked ``-inf`` scores and ``0 * -inf`` is NaN, so a call with it is dispatched and run
    as a zero scale (the ``torch`` backend's grouped op, exact for any scale; FlashAttention-2 varlen refuses it).
    Found by a fuzz: ``1e-50`` was legal, nonzero to the ``== 0.0`` tests, and gave NaN through SDPA's
    ``is_causal``; a review found the subnormals under flush-to-zero."""
    return -_F32_TINY < scale < _F32_TINY


_validate_values = env_flag("ELIT_VALIDATE", True)



def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _as_length(name: str, n) -> int:
    """A segment length or count as an int >= 0 (NumPy integers accepted; bools, floats and strings refused)."""
    if isinstance(n, bool) or not (isinstance(n, int) or hasattr(n, "__index__")) or isinstance(n, torch.Tensor):
        raise TypeError(f"{name}: expected ints >= 0, got {type(n).__name__} ({n!r})")
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"{name}: segment lengths must be >= 0, got {n}")
    return n


#: a call whose host-side segments form at most this many runs of equal shape counts as "runs" (one dense
#: SDPA per run beats a ragged kernel there; the ``torch`` backend's dense path takes at most this many); more
#: runs count as "ragged" (``dispatch.shape_class``).
FEW_RUNS = 4
#: the most runs of equal segments the ``torch`` backend runs as one dense SDPA each (more: its grouped op
#: batches them better); a call without ``segments=`` carries the segments its value checks read up to this
#: many runs, so that its dense path reads nothing more (``_checked_segments``)
MAX_RUNS = 64


def _run_lengths(lq: list, lk: list, limit: int | None = None) -> tuple | None:
    """``((n_segments, Lq, Lk), ...)``: the maximal stretches of equal ``(lq[i], lk[i])`` (int lists of one
    length), counted at C speed (``list.count`` when uniform, else ``itertools.groupby``); None as soon as there
    are more than ``limit`` of them."""
    n = len(lq)
    if n and lq.count(lq[0]) == n and lk.count(lk[0]) == n:  # uniform: the common case
        return ((n, lq[0], lk[0]),)
    runs = []
    for (a, b), same in itertools.groupby(zip(lq, lk)):
        if limit is not None and len(runs) == limit:
            return None
        runs.append((len(list(same)), a, b))
    return tuple(runs)


@dataclasses.dataclass(frozen=True)
class SegmentRuns:
    """The segment lengths of one call, known on the host: maximal stretches of consecutive segments with
    equal ``(Lq, Lk)``, as Python ints.

    ``runs``: ``((n_segments, Lq, Lk), ...)`` in segment order; ``total_q = sum(n * Lq)``, ``total_k =
    sum(n * Lk)`` (rows past them are outside every segment). Derived on construction: ``num_segments``,
    ``max_q``, ``max_k``, ``uniform`` (at most one run) and ``offsets``, one ``(n, Lq, Lk, q_start, q_stop,
    k_start, k_stop)`` per run. A caller that built ``cu_seqlens`` from the same
    ints (``elit_kernels.layout.ElitLayout`` does, once per forward) passes this to ``varlen_attention(...,
    segments=)``: then no backend reads ``cu_seqlens`` back to the host (no device sync), dispatch can tell a
    uniform call (one run: every segment the same shape, which runs as one dense SDPA on a
    ``[S, H, L, D]`` view) from a ragged one, and the eager checks compare these ints with the tensors
    instead of reading the tensors.

    >>> r = SegmentRuns.from_lengths([2, 2, 1], [4, 4, 4]); r.runs, r.uniform, r.num_segments
    (((2, 2, 4), (1, 1, 4)), False, 3)
    """

    runs: tuple
    total_q: int
    total_k: int

    def __post_init__(self):
        if not isinstance(self.runs, tuple):
            raise TypeError(f"segments: runs must be a tuple of (n_segments, Lq, Lk) tuples, got "
                            f"{type(self.runs).__name__}")
        if not (_is_int(self.total_q) and _is_int(self.total_k)):
            raise TypeError(f"segments: total_q and total_k must be ints, got {type(self.total_q).__name__} and "
                            f"{type(self.total_k).__name__}")
        merged = []
        for r in self.runs:
            if not (isinstance(r, tuple) and len(r) == 3 and all(_is_int(x) for x in r)):
                raise TypeError(f"segments: each run must be a tuple (n_segments, Lq, Lk) of ints, got {r!r}")
            if r[0] < 1 or r[1] < 0 or r[2] < 0:
                raise ValueError(f"segments: run {r!r} needs n_segments >= 1 and lengths >= 0")
            if merged and merged[-1][1:] == r[1:]:  # runs are maximal: ((1, 2, 2), (1, 2, 2)) is ((2, 2, 2),)
                merged[-1] = (merged[-1][0] + r[0], r[1], r[2])
            else:
                merged.append(r)
        if len(merged) != len(self.runs):  # one object per call shape: equality, hashing, dispatch's uniform class
            object.__setattr__(self, "runs", tuple(merged))
        tq = tk = ns = mq = mk = 0
        offsets = []
        for n, lq, lk in self.runs:
            offsets.append((n, lq, lk, tq, tq + n * lq, tk, tk + n * lk))
            tq, tk, ns, mq, mk = tq + n * lq, tk + n * lk, ns + n, max(mq, lq), max(mk, lk)
        if (self.total_q, self.total_k) != (tq, tk):
            raise ValueError(f"segments: total_q/total_k ({self.total_q}, {self.total_k}) do not match the runs' "
                             f"({tq}, {tk})")
        # derived once (the object is frozen): every attention call of a forward reads them
        for name, val in (("num_segments", ns), ("max_q", mq), ("max_k", mk), ("uniform", len(self.runs) <= 1),
                          ("offsets", tuple(offsets)), ("_hash", hash((self.runs, tq, tk)))):
            object.__setattr__(self, name, val)

    def __hash__(self):
        return self._hash

    @classmethod
    def from_lengths(cls, lengths_q, lengths_k) -> "SegmentRuns":
        """From per-segment lengths (sequences of ints of equal length; NumPy integers are accepted)."""
        for name, seq in (("lengths_q", lengths_q), ("lengths_k", lengths_k)):
            if isinstance(seq, (str, bytes, dict, torch.Tensor)) or not hasattr(seq, "__iter__") \
                    or getattr(seq, "ndim", 1) != 1:  # a NumPy array of another rank
                raise TypeError(f"{name}: expected a sequence of ints >= 0 (one per segment), got {type(seq).__name__}"
                                + (f" of shape {tuple(seq.shape)}" if hasattr(seq, "shape") else ""))
        lq, lk = [_as_length("lengths_q", n) for n in lengths_q], [_as_length("lengths_k", n) for n in lengths_k]
        if len(lq) != len(lk):
            raise ValueError(f"lengths_k: has {len(lk)} segments, lengths_q has {len(lq)}; they must match")
        if any(n < 0 for n in lq + lk):
            raise ValueError("lengths_q, lengths_k: segment lengths must be >= 0")
        return cls(_run_lengths(lq, lk), sum(lq), sum(lk))

    @classmethod
    def uniform_runs(cls, n_segments: int, len_q: int, len_k: int) -> "SegmentRuns":
        """``n_segments`` segments of ``len_q`` queries and ``len_k`` keys each (ints >= 0)."""
        n_segments, len_q, len_k = (_as_length(name, v) for name, v in
                                    (("n_segments", n_segments), ("len_q", len_q), ("len_k", len_k)))
        runs = ((n_segments, len_q, len_k),) if n_segments else ()
        return cls(runs, n_segments * len_q, n_segments * len_k)

@dataclasses.dataclass(frozen=True)
class AttnInputs:
    """Validated arguments of one ``varlen_attention`` call (softmax_scale already resolved).

    ``k``/``v`` may have fewer heads than ``q`` (grouped-query attention: ``H % H_kv == 0``); ``q`` and
    ``k``/``v`` may hold rows past ``cu_seqlens_*[-1]`` (never read; those output rows are zeros).
    ``segments``: the host-side ``SegmentRuns`` when the caller passed them, or when the eager value checks read
    them and they form at most ``MAX_RUNS`` runs (``_checked_segments``); None: only the tensors know.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    softmax_scale: float
    causal: bool
    return_lse: bool = False
    #: sliding window (flash-attn semantics), -1 = unbounded side; with ``causal`` the right side is -1
    #: here (causal already bounds it at 0).
    window_left: int = -1
    window_right: int = -1
    #: logit soft-capping ``softcap * tanh(s / softcap)``; 0 = off.
    softcap: float = 0.0
    segments: SegmentRuns | None = None
    #: the caller asked for a deterministic backward (flash-attn's ``deterministic=True``, or PyTorch's
    #: ``torch.use_deterministic_algorithms(True)``): only backends whose backward is deterministic on this device
    #: (``Backend.deterministic_devices``) run it when one follows.
    deterministic: bool = False
    #: the eager value checks read ``cu_seqlens`` and found more than ``MAX_RUNS`` runs of equal segments: no
    #: path for at most that many runs applies, so the ``torch`` backend goes straight to its grouped op instead of
    #: reading the lengths again to find that out (one device sync fewer on a GPU)
    many_runs: bool = False
    #: the autograd transform the call runs under that custom ops cannot follow (``_transforms.active_transform``:
    #: forward-mode AD, ``torch.func.grad``); None for every ordinary call. Only backends declaring
    #: ``supports_transforms`` (PyTorch's own ops) run it.
    transform: str | None = None

    @property
    def has_window(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def num_heads(self) -> int:
        return self.q.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1

    @property
    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and (self.q.requires_grad or self.k.requires_grad or self.v.requires_grad)


def _check_segments(segments, cu_q, max_q: int, max_k: int, q=None, k=None) -> None:
    """``segments`` against ``cu_seqlens_q``'s segment count, the max lengths and (given) the tensors' row counts:
    host ints only, no device read. ``AttentionPlan`` checks without q/k when it is made."""
    if not isinstance(segments, SegmentRuns):
        raise TypeError(f"segments: expected an elit_kernels.attention.SegmentRuns or None, got {type(segments).__name__}")
    if segments.num_segments != cu_q.shape[0] - 1:
        raise ValueError(f"segments: describes {segments.num_segments} segments, cu_seqlens_q has {cu_q.shape[0] - 1}")
    if q is not None and segments.total_q > q.shape[0]:
        raise ValueError(f"segments: {segments.total_q} query rows, q holds {q.shape[0]}")
    if k is not None and segments.total_k > k.shape[0]:
        raise ValueError(f"segments: {segments.total_k} key rows, k/v hold {k.shape[0]}")
    if segments.max_q > max_q:
        raise ValueError(f"max_seqlen_q: {max_q} is smaller than the longest segment ({segments.max_q}) in segments")
    if segments.max_k > max_k:
        raise ValueError(f"max_seqlen_k: {max_k} is smaller than the longest segment ({segments.max_k}) in segments")


def _check_cu_pair(cu_q, cu_k) -> None:
    """Both ``cu_seqlens`` describe the same segments: one element more than the segment count each."""
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError(f"cu_seqlens_k: has {cu_k.shape[0]} elements but cu_seqlens_q has {cu_q.shape[0]}; "
                         "both must be [num_segments + 1]")


def tensor_version(t: torch.Tensor) -> int:
    """``t``'s in-place version counter (it grows with every in-place write); -1 for an inference tensor (made
    under ``torch.inference_mode()``), which keeps none, so an in-place write to one is not seen."""
    return -1 if t.is_inference() else t._version


_VERIFIED: dict = {}  # (id(cu_q), id(cu_k), segments) -> (weakref cu_q, weakref cu_k, versions) already compared
_VERIFIED_MAX = 256


def _verify_segments_once(segments, cu_q, cu_k) -> None:
    """Eager value check of ``segments`` against ``cu_seqlens``, once per (cu_seqlens tensors, segments): the model
    hands the same layout tensors to every block, so a forward reads them at most once per layout (on a GPU that
    first read is a device sync; later calls cost a dictionary lookup). The record holds weak references and the
    tensors' version counters, so a new tensor (even at a freed tensor's address) or an in-place write is checked
    again; a write that bypasses the version counter (``.data``, a NumPy view, an inference tensor) is not seen. Raises ValueError
    naming ``segments`` when a segment's length differs from what ``cu_seqlens`` says (every backend would
    otherwise read its own source of lengths: a silent disagreement)."""
    if cu_q.device.type == "meta":
        return
    key = (id(cu_q), id(cu_k), segments)
    rec = _VERIFIED.get(key)
    if rec is not None and rec[0]() is cu_q and rec[1]() is cu_k and rec[2] == (tensor_version(cu_q),
                                                                                 tensor_version(cu_k)):
        return
    c = torch.stack([cu_q, cu_k]).tolist() if cu_q.shape == cu_k.shape else [cu_q.tolist(), cu_k.tolist()]
    i = 0
    for n, lq, lk in segments.runs:
        for _ in range(n):
            got = (c[0][i + 1] - c[0][i], c[1][i + 1] - c[1][i])
            if got != (lq, lk):
                raise ValueError(f"segments: segment {i} has (Lq, Lk) = ({lq}, {lk}) in segments but {got} in "
                                 "cu_seqlens_q/cu_seqlens_k; build both from the same lengths")
            i += 1
    if c[0][0] != 0 or c[1][0] != 0:
        raise ValueError("segments: cu_seqlens_q and cu_seqlens_k must start at 0 (they describe the segments)")
    if len(_VERIFIED) >= _VERIFIED_MAX:
        _VERIFIED.pop(next(iter(_VERIFIED)))
    _VERIFIED[key] = (weakref.ref(cu_q), weakref.ref(cu_k), (tensor_version(cu_q), tensor_version(cu_k)))


def set_value_checks(enabled: bool) -> None:
    """Turn on/off the checks that read ``cu_seqlens`` values (a device-to-host copy).

    They run in eager mode by default (``ELIT_VALIDATE=0`` turns them off at import). They are always
    skipped under ``torch.compile`` tracing and CUDA-graph capture, where a host copy would break the
    graph; shape, dtype and device checks always run.

    Without them a wrong ``cu_seqlens`` still never makes a backend touch memory outside q/k/v and its
    outputs: the kernels (``triton``, ``cuda``, ``cpp``) clamp every element into ``[0, rows]`` (a segment that
    ends before it starts is empty), so a non-decreasing one that runs past the rows gives the attention over
    the clamped segments (``triton_window``, whose one key tile is sized by ``max_seqlen_k``, gives NaN for a
    segment longer than that, never a softmax over its first keys); the backends that read it on the host
    (``reference``, ``torch``, ``cpp``) raise ``ValueError`` (``RuntimeError`` from ``cpp``) naming it.

    ``enabled``: a bool (NumPy's bool is one); anything else, 0 and 1 included, is a TypeError naming it.
    """
    global _validate_values
    _validate_values = check_bool("enabled", enabled)


def value_checks_enabled() -> bool:
    return _validate_values


def _capturing() -> bool:
    """Under ``torch.compile`` tracing or CUDA-graph capture (no capture before CUDA is initialised; checking
    that first keeps this cheap on the hot path)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _check_cu(name: str, cu) -> None:
    """Type, dtype and rank of a ``cu_seqlens`` (its values: ``_checked_segments``)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor [num_segments + 1], got shape {tuple(cu.shape)}")
    if cu.shape[0] < 1:
        raise ValueError(f"{name}: expected at least one element (cu[0] = 0), got an empty tensor")


def _cu_lengths(name: str, c: list, total: int, max_name: str, max_len: int) -> list:
    """The value checks of one ``cu_seqlens`` read to the host (``c``: its values): starts at 0, non-decreasing,
    within ``total`` rows, no segment longer than ``max_len``. Returns the segment lengths."""
    if c[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {name}[0] = {c[0]}")
    lens = [b - a for a, b in zip(c[:-1], c[1:])]
    if any(n < 0 for n in lens):
        i = next(i for i, n in enumerate(lens) if n < 0)
        raise ValueError(f"{name}: must be non-decreasing, but {name}[{i + 1}] = {c[i + 1]} < {name}[{i}] = {c[i]}")
    if c[-1] > total:
        raise ValueError(f"{name}: last element {c[-1]} is past the end of the packed tokens ({total} rows); "
                         "it must be <= the row count")
    longest = max(lens, default=0)
    if longest > max_len:
        raise ValueError(f"{max_name}: {max_len} is smaller than the longest segment ({longest}) in {name}")
    return lens


def _checked_segments(cu_q, cu_k, rows_q: int, rows_k: int, max_q: int, max_k: int, derive: bool = True):
    """The eager value checks of a call made without ``segments``, reading both ``cu_seqlens`` in one host copy
    (one device sync on a GPU, where two ``.tolist()`` were two), and what the values read say for free: the
    segments as ``SegmentRuns`` when they form at most ``MAX_RUNS`` runs of equal shape, so that a flash-attn
    style call with uniform segments is dispatched as one (dense SDPA on views; ``dispatch.shape_class``), the
    ``torch`` backend's dense path reads nothing more (its grouped op, for LSE, softcap or more runs, still
    does), and the window kernels size their key tile from the real longest segment. None for more runs (the
    kernels take ``cu_seqlens`` as they are), for meta tensors (no values) and with ``derive=False`` (the checks
    alone). Raises ValueError naming the ``cu_seqlens`` or ``max_seqlen`` at fault (``_cu_lengths``)."""
    if cu_q.device.type == "meta":
        return None
    c = [cu_q.tolist(), cu_k.tolist()] if cu_q.device.type == "cpu" else torch.stack([cu_q, cu_k]).tolist()
    lq = _cu_lengths("cu_seqlens_q", c[0], rows_q, "max_seqlen_q", max_q)
    lk = _cu_lengths("cu_seqlens_k", c[1], rows_k, "max_seqlen_k", max_k)
    return _few_run_segments(lq, lk, c[0][-1], c[1][-1]) if derive else None


def _few_run_segments(lq: list, lk: list, total_q: int, total_k: int) -> SegmentRuns | None:
    """``SegmentRuns`` of these segment lengths (int lists) when they form at most ``MAX_RUNS`` runs, else None;
    counting stops at ``MAX_RUNS + 1`` runs (building every run of a ragged call cost ~7 us a run on the CPU)."""
    runs = _run_lengths(lq, lk, MAX_RUNS)
    return None if runs is None else SegmentRuns(runs, total_q, total_k)


def _as_int(name: str, n) -> int:
    """A max length as a Python int: ints, NumPy integers and 0-dim integer tensors (``.item()``: a host
    sync for a CUDA tensor) are accepted. An int is returned as is, so that under
    ``torch.compile(dynamic=True)`` it stays symbolic (``operator.index`` would specialise the graph on its
    value: one recompile per new length)."""
    if isinstance(n, torch.Tensor):
        if n.dim() != 0 or n.dtype not in _INT_DTYPES:
            raise TypeError(f"{name}: expected an int or a 0-dim integer tensor, got a tensor of shape "
                            f"{tuple(n.shape)} and dtype {n.dtype}")
        n = n.item()
    if isinstance(n, bool):
        raise TypeError(f"{name}: expected an int, got bool")
    if not isinstance(n, (int, torch.SymInt)):
        try:
            n = operator.index(n)  # NumPy integer, anything with __index__
        except TypeError:
            raise TypeError(f"{name}: expected an int (or a NumPy integer / 0-dim integer tensor), got "
                            f"{type(n).__name__}") from None
    if n < 0:
        raise ValueError(f"{name}: must be >= 0, got {n}")
    return n


def _window(window_size, causal: bool) -> tuple[int, int]:
    """``window_size`` as ``(left, right)`` ints, -1 for an unbounded side; with ``causal`` the right side is
    the causal bound (flash-attn sets it to 0), stored as -1 since ``causal`` already applies it."""
    try:
        if not isinstance(window_size, (tuple, list, torch.Tensor)):
            raise TypeError
        left, right = window_size
    except (TypeError, ValueError):
        raise TypeError(f"window_size: expected a pair (left, right) of ints >= -1 (-1: unbounded), got "
                        f"{window_size!r}") from None
    sides = []
    for side, n in (("left", left), ("right", right)):
        if isinstance(n, torch.Tensor) and n.dim() == 0 and n.dtype in _INT_DTYPES:
            n = n.item()
        if isinstance(n, bool):
            raise TypeError(f"window_size: {side} must be an int >= -1 (-1: unbounded), got bool")
        if not isinstance(n, (int, torch.SymInt)):  # an int stays symbolic under dynamic shapes (as _as_int)
            try:
                n = operator.index(n)
            except TypeError:
                raise TypeError(f"window_size: {side} must be an int >= -1 (-1: unbounded), got "
                                f"{type(n).__name__}") from None
        if n < -1:
            raise ValueError(f"window_size: {side} must be >= -1 (-1: unbounded), got {n}")
        sides.append(n)
    left, right = sides
    return left, (-1 if causal else right)


def _flag(name: str, value) -> bool:
    """A user's bool argument ``name`` (``causal``, ``return_lse``): ``_types.check_bool``."""
    return check_bool(name, value)


def _scale(softmax_scale) -> float:
    """A user's ``softmax_scale`` as a float: finite and within float32's range (the kernels' score dtype)."""
    if not is_real(softmax_scale):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    scale = float(softmax_scale)  # compared as a Python float: a NumPy float16 would overflow casting the bound
    if not abs(scale) <= _F32_MAX:
        raise ValueError(f"softmax_scale: expected a finite float within float32's range (|scale| <= {_F32_MAX:.4g}), "
                         f"got {softmax_scale}")
    return scale


def _softcap(softcap) -> float:
    if not is_real(softcap):
        raise TypeError(f"softcap: expected a float >= 0 (0: off), got {type(softcap).__name__}")
    cap = float(softcap)  # as softmax_scale: NumPy float16 compared with float32's bounds would overflow
    if cap != 0.0 and not _F32_TINY <= cap <= _F32_MAX:
        raise ValueError(f"softcap: expected 0 (off) or a finite float in float32's normal range [{_F32_TINY:.4g}, "
                         f"{_F32_MAX:.4g}], got {softcap}")
    return cap


def validate_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                    causal=False, *, return_lse: bool = False, window_size=(-1, -1), softcap=0.0,
                    segments=None, deterministic: bool = False, derive_segments: bool = True) -> AttnInputs:
    """Check every argument of ``varlen_attention`` and return the resolved ``AttnInputs``.

    With ``segments`` (a ``SegmentRuns``) the per-call checks compare the segments with the tensors' shapes, and
    the eager value check compares them with ``cu_seqlens`` once per (cu_seqlens pair, segments)
    (``_verify_segments_once``): no host read after the first call with a layout. Without it, the eager value
    checks read both ``cu_seqlens`` in one host copy, and the result carries the segments those values give when
    they form at most ``MAX_RUNS`` runs (``_checked_segments``: a uniform call then runs as dense SDPA); not with
    ``derive_segments=False`` (``AttentionPlan``, which keeps the result for later calls whose ``cu_seqlens``
    may have been rewritten in place where no version counter sees it, e.g. a static buffer made under
    ``torch.inference_mode()``).

    Raises ``TypeError``/``ValueError`` whose message starts with the offending argument's name.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    qs, ks, vs, qdt, dev = q.shape, k.shape, v.shape, q.dtype, q.device  # read once: this runs on every call
    for name, ts in (("q", qs), ("k", ks), ("v", vs)):
        if len(ts) != 3:
            raise ValueError(f"{name}: expected shape [total_tokens, num_heads, head_dim] (3-D), got {len(ts)}-D "
                             f"shape {tuple(ts)}")
    if qdt not in _SUPPORTED_DTYPES:
        raise TypeError(f"q: dtype {qdt} not supported; expected one of {[str(d) for d in _SUPPORTED_DTYPES]}")
    if k.dtype != qdt or v.dtype != qdt or k.device != dev or v.device != dev or ks[2] != qs[2] or vs[2] != qs[2]:
        for name, t, ts in (("k", k, ks), ("v", v, vs)):  # the slow path names the first mismatch
            if t.dtype != qdt:
                raise TypeError(f"{name}: dtype {t.dtype} does not match q's dtype {qdt}")
            if t.device != dev:
                raise ValueError(f"{name}: on device {t.device}, but q is on {dev}")
            if ts[2] != qs[2]:
                raise ValueError(f"{name}: head dim {ts[2]} does not match q's head dim {qs[2]}")
    if vs[1] != ks[1]:
        raise ValueError(f"v: has {vs[1]} heads, k has {ks[1]}; they must match")
    h, h_kv = qs[1], ks[1]
    if h == 0:
        raise ValueError(f"q: has 0 heads; expected at least 1 (shape {tuple(qs)})")
    if h_kv == 0 or h % h_kv != 0:
        raise ValueError(f"k: has {h_kv} heads, which does not divide q's {h} heads (grouped-query attention "
                         "needs num_heads % num_kv_heads == 0)")
    if vs[0] != ks[0]:
        raise ValueError(f"v: has {vs[0]} tokens, k has {ks[0]}; they must match")
    d = qs[2]
    if d < 1 or d > _MAX_HEAD_DIM:
        raise ValueError(f"q: head dim {d} not supported; expected 1..{_MAX_HEAD_DIM}")
    if type(max_seqlen_q) is not int or max_seqlen_q < 0:  # ints are the common case: one type check each
        max_seqlen_q = _as_int("max_seqlen_q", max_seqlen_q)
    if type(max_seqlen_k) is not int or max_seqlen_k < 0:
        max_seqlen_k = _as_int("max_seqlen_k", max_seqlen_k)
    # A loose bound is legal; no segment is longer than the rows it indexes, so a bound past them is the row count
    # (kernels size grids and tiles by it: a bound near 2**31 or 2**63 would overflow their index arithmetic).
    if max_seqlen_q > qs[0]:
        max_seqlen_q = qs[0]
    if max_seqlen_k > ks[0]:
        max_seqlen_k = ks[0]
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not (type(cu) is torch.Tensor and cu.dtype == torch.int32 and cu.dim() == 1 and cu.shape[0] >= 1):
            _check_cu(name, cu)  # type, dtype and rank: raises naming the fault
        if cu.device != dev:
            raise ValueError(f"{name}: on device {cu.device}, but q is on {dev}")
    _check_cu_pair(cu_seqlens_q, cu_seqlens_k)
    if type(derive_segments) is not bool:
        derive_segments = _flag("derive_segments", derive_segments)
    # bounded: max_seqlen_q/k are known to bound every segment (the segments were checked against them, or the
    # value checks read cu_seqlens and raise otherwise); else only the row counts are (a caller who switched the
    # checks off, or a trace, may pass a max_seqlen below a segment: flash-attn's contract, not enforced here)
    bounded = segments is not None
    many_runs = False
    if segments is not None:
        _check_segments(segments, cu_seqlens_q, max_seqlen_q, max_seqlen_k, q, k)
        if _validate_values and not _capturing():
            _verify_segments_once(segments, cu_seqlens_q, cu_seqlens_k)
    elif _validate_values and not _capturing():
        segments = _checked_segments(cu_seqlens_q, cu_seqlens_k, qs[0], ks[0], max_seqlen_q, max_seqlen_k,
                                     derive_segments)
        bounded = True
        many_runs = segments is None and derive_segments and cu_seqlens_q.device.type != "meta"
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    elif type(softmax_scale) is not float or not abs(softmax_scale) <= _F32_MAX:
        softmax_scale = _scale(softmax_scale)
    if type(causal) is not bool:
        causal = _flag("causal", causal)
    if type(return_lse) is not bool:
        return_lse = _flag("return_lse", return_lse)
    try:  # the default needs nothing resolved; a side that is a multi-element tensor cannot be compared: _window names it
        default = type(window_size) is tuple and window_size == (-1, -1) and not causal
    except RuntimeError:
        default = False
    if default:
        left, right = -1, -1
    else:
        left, right = _window(window_size, causal)
        # A side that reaches past every segment is unbounded (a query sees keys j with j - i - (Lk - Lq) in
        # [1 - Lk, Lq - 1]); stored as -1 so that no kernel adds a huge side to a position and overflows. What
        # bounds every segment: max_seqlen when checked (``bounded``), else the row counts (a too-small unchecked
        # max_seqlen turned a real window into none: the torch backend, which follows the data, was wrong).
        if left >= (max_seqlen_k if bounded else ks[0]):
            left = -1
        if right >= (max_seqlen_q if bounded else qs[0]):
            right = -1
    if type(softcap) not in (float, int) or softcap != 0.0:
        softcap = _softcap(softcap)
    if type(deterministic) is not bool:
        deterministic = _flag("deterministic", deterministic)
    if not deterministic and torch.are_deterministic_algorithms_enabled():  # PyTorch's switch asks it of every op
        deterministic = True
    transform = None if peek() is None and _fwd._current_level < 0 else active_transform(q, k, v)  # inlined first test
    # The dataclass's own __init__ sets its 17 fields one frozen setattr at a time (2.2 us on this project's
    # CPU, on every attention call); one __dict__ update builds the same object (fields, equality, frozenness;
    # validate_inputs as a whole went from 9.5 to 7.1 us).
    inp = object.__new__(AttnInputs)
    inp.__dict__.update(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                        max_seqlen_k=max_seqlen_k, softmax_scale=float(softmax_scale), causal=causal,
                        return_lse=return_lse, window_left=left, window_right=right, softcap=float(softcap),
                        segments=segments, deterministic=deterministic, many_runs=many_runs,
                        transform=transform)
    return inp
