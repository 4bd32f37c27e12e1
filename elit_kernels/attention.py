"""The contract: ``varlen_attention`` (validation + dispatch) and a flash-attn drop-in.

Every attention in ELIT is this one op; Read, Write and core attention differ only in cu_seqlens.
"""
from __future__ import annotations

import os

import torch

from .backends import AttnInputs, select_backend

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_HEAD_DIM = 256

_validate_values = os.environ.get("ELIT_VALIDATE", "1") not in ("0", "false", "False", "")


def set_value_checks(enabled: bool) -> None:
    """Turn on/off the checks that read ``cu_seqlens`` values (a device-to-host copy).

    They run in eager mode by default (``ELIT_VALIDATE=0`` turns them off at import). They are always
    skipped under ``torch.compile`` tracing and CUDA-graph capture, where a host copy would break the
    graph; shape, dtype and device checks always run.
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
    if c[-1] != total:
        raise ValueError(f"{name}: last element must equal the total token count {total}, got {c[-1]}")
    longest = max(lens, default=0)
    if longest > max_len:
        raise ValueError(f"{max_name}: {max_len} is smaller than the longest segment ({longest}) in {name}")


def validate_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal) -> AttnInputs:
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
        if t.shape[1] != q.shape[1]:
            raise ValueError(f"{name}: has {t.shape[1]} heads, q has {q.shape[1]} (grouped-query attention is not supported)")
        if t.shape[2] != q.shape[2]:
            raise ValueError(f"{name}: head dim {t.shape[2]} does not match q's head dim {q.shape[2]}")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v: has {v.shape[0]} tokens, k has {k.shape[0]}; they must match")
    d = q.shape[2]
    if d < 1 or d > _MAX_HEAD_DIM or d % 8 != 0:
        raise ValueError(f"q: head dim {d} not supported; expected a multiple of 8 in [8, {_MAX_HEAD_DIM}]")
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"{name}: expected a Python int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"{name}: must be >= 0, got {n}")
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
    return AttnInputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(softmax_scale), causal)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     softmax_scale=None, causal=False, backend=None):
    """Attention over packed ragged segments.

    q ``[total_q, H, D]``, k/v ``[total_k, H, D]``; ``cu_seqlens_*`` int32 ``[S+1]`` with ``cu[0] = 0``,
    non-decreasing, ending at the token count. Segment i: ``q[cu_q[i]:cu_q[i+1]]`` attends to
    ``k/v[cu_k[i]:cu_k[i+1]]``. Returns ``[total_q, H, D]`` in q's dtype. A query whose key segment is
    empty gets exact zeros (and zero gradients). ``softmax_scale`` defaults to ``D**-0.5``; ``causal``
    aligns the mask bottom-right as flash-attn does. ``backend`` names a registered backend
    (``elit_kernels.known_backends()``); None picks ``$ELIT_BACKEND`` or the best that supports the inputs.

    The first seven arguments match ``flash_attn_varlen_func``::

        >>> q = torch.randn(9, 4, 64); k = v = torch.randn(12, 4, 64)
        >>> cu_q = torch.tensor([0, 4, 9], dtype=torch.int32); cu_k = torch.tensor([0, 5, 12], dtype=torch.int32)
        >>> varlen_attention(q, k, v, cu_q, cu_k, 5, 7).shape
        torch.Size([9, 4, 64])
    """
    inp = validate_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    return select_backend(inp, backend).forward(inp)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, backend=None):
    """Drop-in for ``flash_attn.flash_attn_varlen_func``: same signature, our backends underneath.

    Options we do not implement (dropout, sliding window, softcap, ALiBi, returning attention
    probabilities, paged KV) raise ``NotImplementedError`` naming the argument rather than being ignored.
    ``deterministic`` is accepted (our backends' backward passes are deterministic or say otherwise).
    """
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p: only 0.0 is supported, got {dropout_p}")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"window_size: sliding-window attention is not supported, got {tuple(window_size)}")
    if softcap != 0.0:
        raise NotImplementedError(f"softcap: only 0.0 is supported, got {softcap}")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not supported")
    if return_attn_probs:
        raise NotImplementedError("return_attn_probs: returning attention probabilities is not supported")
    if block_table is not None:
        raise NotImplementedError("block_table: paged KV caches are not supported")
    return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            softmax_scale=softmax_scale, causal=causal, backend=backend)
