"""The contract: ``varlen_attention`` (validation + dispatch) and a flash-attn drop-in.

Every attention in ELIT is this one op; Read, Write and core attention differ only in cu_seqlens.
"""
from __future__ import annotations

import dataclasses
import operator
import os

import torch
import torch.nn.functional as F

from .backends import AttnInputs, Backend, select_backend

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_HEAD_DIM = 256
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

_validate_values = os.environ.get("ELIT_VALIDATE", "1") not in ("0", "false", "False", "")


def set_value_checks(enabled: bool) -> None:
    """Turn on/off the checks that read ``cu_seqlens`` values (a device-to-host copy).

    They run in eager mode by default (``ELIT_VALIDATE=0`` turns them off at import). They are always
    skipped under ``torch.compile`` tracing and CUDA-graph capture, where a host copy would break the
    graph; shape, dtype and device checks always run.

    Without them a wrong ``cu_seqlens`` still never makes a backend touch memory outside q/k/v and its
    outputs: the kernels (``triton``, ``cuda``, ``cpp``) clamp every element into ``[0, rows]`` (a segment that
    ends before it starts is empty), so a non-decreasing one that runs past the rows gives the attention over
    the clamped segments; the backends that read it on the host (``reference``, ``torch``, ``cpp``) raise
    ``ValueError`` (``RuntimeError`` from ``cpp``) naming it.
    """
    global _validate_values
    _validate_values = bool(enabled)


def value_checks_enabled() -> bool:
    return _validate_values


def _capturing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_cu(name: str, cu, total: int, max_name: str, max_len: int, check_values: bool) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor [num_segments + 1], got shape {tuple(cu.shape)}")
    if cu.shape[0] < 1:
        raise ValueError(f"{name}: expected at least one element (cu[0] = 0), got an empty tensor")
    if not check_values:
        return
    c = cu.tolist()
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


def _softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap: expected a float >= 0 (0: off), got {type(softcap).__name__}")
    if not softcap >= 0.0 or softcap == float("inf"):
        raise ValueError(f"softcap: expected a finite float >= 0 (0: off), got {softcap}")
    return float(softcap)


def validate_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                    *, return_lse: bool = False, window_size=(-1, -1), softcap=0.0) -> AttnInputs:
    """Check every argument of ``varlen_attention`` and return the resolved ``AttnInputs``.

    Raises ``TypeError``/``ValueError`` whose message starts with the offending argument's name.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name}: expected shape [total_tokens, num_heads, head_dim] (3-D), got {t.dim()}-D shape {tuple(t.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"q: dtype {q.dtype} not supported; expected one of {[str(d) for d in _SUPPORTED_DTYPES]}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} does not match q's dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: on device {t.device}, but q is on {q.device}")
        if t.shape[2] != q.shape[2]:
            raise ValueError(f"{name}: head dim {t.shape[2]} does not match q's head dim {q.shape[2]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v: has {v.shape[1]} heads, k has {k.shape[1]}; they must match")
    h, h_kv = q.shape[1], k.shape[1]
    if h_kv == 0 or h % h_kv != 0:
        raise ValueError(f"k: has {h_kv} heads, which does not divide q's {h} heads (grouped-query attention "
                         "needs num_heads % num_kv_heads == 0)")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v: has {v.shape[0]} tokens, k has {k.shape[0]}; they must match")
    d = q.shape[2]
    if d < 1 or d > _MAX_HEAD_DIM:
        raise ValueError(f"q: head dim {d} not supported; expected 1..{_MAX_HEAD_DIM}")
    max_seqlen_q = _as_int("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _as_int("max_seqlen_k", max_seqlen_k)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_cu(name, cu, 0, "", 0, check_values=False)  # type, dtype and rank first
        if cu.device != q.device:
            raise ValueError(f"{name}: on device {cu.device}, but q is on {q.device}")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(
            f"cu_seqlens_k: has {cu_seqlens_k.shape[0]} elements but cu_seqlens_q has {cu_seqlens_q.shape[0]}; "
            "both must be [num_segments + 1]")
    if _validate_values and not _capturing():
        _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q, True)
        _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k, True)
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    left, right = _window(window_size, causal)
    return AttnInputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(softmax_scale), causal,
                      bool(return_lse), left, right, _softcap(softcap))


def run_backend(b: Backend, inp: AttnInputs):
    """Run validated ``inp`` on backend ``b``: zero-pads the head dim to one ``b`` runs natively (the
    scale stays that of the real D, already in ``inp``) and slices the output back, as flash-attn's
    wrapper does. Returns ``out``, or ``(out, lse)`` when ``inp.return_lse``."""
    d = inp.head_dim
    d_run = b.run_head_dim(d)
    if d_run != d:
        pad = (0, d_run - d)
        inp = dataclasses.replace(inp, q=F.pad(inp.q, pad), k=F.pad(inp.k, pad), v=F.pad(inp.v, pad))
    res = b.forward(inp)
    out, lse = res if inp.return_lse else (res, None)
    if d_run != d:
        out = out[..., :d]
    if inp.return_lse:
        return out, lse.detach()
    return out


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     softmax_scale=None, causal=False, backend=None, return_lse=False, window_size=(-1, -1),
                     softcap=0.0):
    """Attention over packed ragged segments.

    Arguments:
        q: ``[total_q, H, D]``, float16 / bfloat16 / float32 / float64, any D in 1..256 (a backend that
            cannot run D natively gets it zero-padded and the output sliced back).
        k, v: ``[total_k, H_kv, D]``, q's dtype and device. ``H_kv`` must divide ``H`` (GQA / MQA): query
            head h reads kv head ``h // (H // H_kv)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[S+1]``, start at 0, non-decreasing. Segment i:
            ``q[cu_q[i]:cu_q[i+1]]`` attends to ``k/v[cu_k[i]:cu_k[i+1]]``. The last element may be
            smaller than the row count (static buffers): q rows past ``cu_q[-1]`` get exact zeros and
            zero gradients, k/v rows past ``cu_k[-1]`` are never read.
        max_seqlen_q, max_seqlen_k: the longest segment (an upper bound is fine: the cost does not grow
            with it). A Python int, a NumPy integer, or a 0-dim integer tensor (``.item()``: a CUDA tensor
            costs a host sync; pass ints under CUDA graphs / ``torch.compile``).
        softmax_scale: float, default ``D**-0.5`` of the real D.
        causal: bottom-right aligned mask, as flash-attn: query i sees key j iff ``j <= i + Lk - Lq``.
        window_size: ``(left, right)`` ints >= -1, sliding-window (local) attention with flash-attn's
            semantics: query i of a segment sees key j iff ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``
            (bottom-right aligned; -1 leaves that side unbounded; with ``causal`` the right side is 0).
            Default ``(-1, -1)``: no window.
        softcap: float >= 0; when > 0 the logits are capped as flash-attn and Gemma-2 do,
            ``s = softcap * tanh(softmax_scale * q.k / softcap)``, before masking and softmax. 0: off.
        backend: a registered backend name (``elit_kernels.known_backends()``); None picks
            ``$ELIT_BACKEND`` or the highest-priority backend that supports the inputs.
        return_lse: also return the log-sum-exp of each query row.

    Returns:
        ``out [total_q, H, D]`` in q's dtype; with ``return_lse``, ``(out, lse)`` where ``lse`` is
        ``[H, total_q]`` float32 (float64 for float64 inputs), natural log of the row's softmax
        denominator, +inf for rows that see no key (empty key segment, causal with Lq > Lk, a window that
        leaves the row no key, rows past
        ``cu_q[-1]``), not differentiable. A query that sees no key gets exact zeros, never NaN.

    Raises:
        TypeError / ValueError naming the argument for invalid input (the checks that read
        ``cu_seqlens`` values run in eager mode only; ``window_size``: TypeError unless a pair of ints,
        ValueError for a side < -1; ``softcap``: ValueError when negative); ValueError listing every reason when no backend
        (or not the one asked for) can run the inputs.

    The first seven arguments match ``flash_attn_varlen_func``::

        >>> q = torch.randn(9, 4, 64); k = v = torch.randn(12, 4, 64)
        >>> cu_q = torch.tensor([0, 4, 9], dtype=torch.int32); cu_k = torch.tensor([0, 5, 12], dtype=torch.int32)
        >>> varlen_attention(q, k, v, cu_q, cu_k, 5, 7).shape
        torch.Size([9, 4, 64])
    """
    inp = validate_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                          return_lse=return_lse, window_size=window_size, softcap=softcap)
    return run_backend(select_backend(inp, backend), inp)
