"""The attention contract: ``varlen_attention`` over packed ragged segments, and where each part lives.

- ``inputs``: ``AttnInputs``, ``SegmentRuns``, ``validate_inputs`` and the value-check switch;
- ``registry``: the ``Backend`` base class, ``register_backend``, ``run_backend``;
- ``known_answer``: the first-use check that keeps a wrong kernel out of default dispatch;
- ``dispatch``: which backend runs a call (explicit choice, tuned or measured ranking, static order);
- ``plan``: ``AttentionPlan``, ``varlen_attention`` over fixed segments checked once and run many times (the model's
  path);
- ``backends``: one module per backend family (``pytorch``, ``library``, ``triton``, ``compiled``).

Imports run one way: ``inputs`` <- ``registry`` <- ``known_answer`` <- ``dispatch`` <- ``plan`` <- this module; the
backends import ``inputs`` and ``registry`` only. Every attention in ELIT is ``varlen_attention``; Read, Write
and core attention differ only in ``cu_seqlens``.
"""
from __future__ import annotations

from . import backends  # noqa: F401  (registers every built-in backend)
from .dispatch import select_backend, tune_inputs, tuning
from .inputs import AttnInputs, SegmentRuns, set_value_checks, validate_inputs, value_checks_enabled
from .plan import AttentionPlan
from .registry import (Backend, describe_backends, describe_inputs, get_backend, known_backends, register_backend,
                       registered_backends, run_backend)

__all__ = ["AttentionPlan", "AttnInputs", "Backend", "SegmentRuns", "describe_backends", "describe_inputs", "get_backend", "known_backends",
           "register_backend", "registered_backends", "run_backend", "select_backend", "set_value_checks",
           "tune_inputs", "tuning", "validate_inputs", "value_checks_enabled", "varlen_attention"]


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     softmax_scale=None, causal=False, backend=None, return_lse=False, window_size=(-1, -1),
                     softcap=0.0, segments=None, deterministic=False):
    """Attention over packed ragged segments.

    Arguments:
        q: ``[total_q, H, D]``, a dense (strided) tensor, float16 / bfloat16 / float32 / float64, H >= 1, any D
            in 1..256 (a backend that cannot run D natively gets it zero-padded and the output sliced back).
        k, v: ``[total_k, H_kv, D]``, q's dtype and device. ``H_kv`` must divide ``H`` (GQA / MQA): query
            head h reads kv head ``h // (H // H_kv)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[S+1]``, start at 0, non-decreasing. Segment i:
            ``q[cu_q[i]:cu_q[i+1]]`` attends to ``k/v[cu_k[i]:cu_k[i+1]]``. The last element may be
            smaller than the row count (static buffers): q rows past ``cu_q[-1]`` get exact zeros and
            zero gradients, k/v rows past ``cu_k[-1]`` are never read.
        max_seqlen_q, max_seqlen_k: the longest segment (an upper bound is fine: the cost does not grow
            with it, and a bound past the row count is taken as the row count). A Python int, a NumPy integer,
            or a 0-dim integer tensor (``.item()``: a CUDA tensor costs a host sync; pass ints under CUDA graphs /
            ``torch.compile``).
        softmax_scale: float, default ``D**-0.5`` of the real D; finite, ``|scale| <= 3.4e38`` (the kernels
            compute scores in float32).
        causal: bottom-right aligned mask, as flash-attn: query i sees key j iff ``j <= i + Lk - Lq``.
        window_size: ``(left, right)`` ints >= -1, sliding-window (local) attention with flash-attn's
            semantics: query i of a segment sees key j iff ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``
            (bottom-right aligned; -1 leaves that side unbounded; with ``causal`` the right side is 0). A side that
            reaches past every segment (``left >= max_seqlen_k``, ``right >= max_seqlen_q``) is unbounded too.
            A tuple, a list or a 2-element tensor. Default ``(-1, -1)``: no window.
        softcap: float, 0 (off) or in float32's normal range ``[1.18e-38, 3.4e38]``; when > 0 the logits are
            capped as flash-attn and Gemma-2 do, ``s = softcap * tanh(softmax_scale * q.k / softcap)``, before
            masking and softmax.
        backend: a registered backend name (``elit_kernels.known_backends()``); None picks
            ``$ELIT_BACKEND`` or, by default dispatch, the fastest backend measured for this GPU and shape
            class that can run the inputs (``elit_kernels.attention.dispatch``).
        segments: optional ``SegmentRuns``, the segment lengths as host ints (the ELIT layout passes them).
            With it nothing reads ``cu_seqlens`` back to the host (no device sync; CUDA-graph capture and
            ``torch.compile`` hold), uniform segments run as one dense SDPA, and the eager value checks
            compare it with the tensors instead: ``cu_seqlens`` must hold the same lengths.
        return_lse: bool, also return the log-sum-exp of each query row.
        deterministic: bool (flash-attn's ``deterministic``). When a backward will follow (q, k or v requires
            grad, grad mode on), run only on a backend whose backward gives the same gradients bit for bit on
            every run (``Backend.deterministic_devices``: ``reference``, ``cpp``, ``triton``, ``triton_window``,
            ``cuda``; ``torch`` on the CPU only; not the library kernels on a GPU, which accumulate with
            atomics). Default dispatch then picks the fastest of those, without on-device tuning; an explicit
            backend that is not deterministic there is a ValueError saying so. No effect on a forward alone.
            ``torch.use_deterministic_algorithms(True)`` asks for it too (as it does of every PyTorch op).

    Returns:
        ``out [total_q, H, D]`` in q's dtype; with ``return_lse``, ``(out, lse)`` where ``lse`` is
        ``[H, total_q]`` float32 (float64 for float64 inputs), natural log of the row's softmax
        denominator, +inf for rows that see no key (empty key segment, causal with Lq > Lk, a window that
        leaves the row no key, rows past
        ``cu_q[-1]``), not differentiable. A query that sees no key gets exact zeros, never NaN.

    Raises:
        TypeError / ValueError naming the argument for invalid input (the checks that read
        ``cu_seqlens`` values run in eager mode only; ``window_size``: TypeError unless a pair of ints,
        ValueError for a side < -1; ``softmax_scale`` / ``softcap``: ValueError outside the ranges above;
        ``return_lse`` / ``deterministic``: TypeError unless a bool); ValueError listing every reason when no backend (or not the one
        asked for) can run the inputs.

    The first seven arguments match ``flash_attn_varlen_func``::

        >>> q = torch.randn(9, 4, 64); k = v = torch.randn(12, 4, 64)
        >>> cu_q = torch.tensor([0, 4, 9], dtype=torch.int32); cu_k = torch.tensor([0, 5, 12], dtype=torch.int32)
        >>> varlen_attention(q, k, v, cu_q, cu_k, 5, 7).shape
        torch.Size([9, 4, 64])
    """
    inp = validate_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                          return_lse=return_lse, window_size=window_size, softcap=softcap, segments=segments,
                          deterministic=deterministic)
    return run_backend(select_backend(inp, backend), inp)
