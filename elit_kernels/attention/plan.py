"""``AttentionPlan``: ``varlen_attention`` over one fixed set of segments, checked once and run many times.

A model forward calls attention dozens of times over the same ``cu_seqlens`` (every core block shares one
layout), and a sampling run repeats that forward at every step. ``varlen_attention`` checks all of its
arguments and picks a backend on every call; a plan does that work once per input signature (shapes, dtypes,
devices, whether gradients are needed, ``backend=``) and afterwards a call costs a dictionary lookup, the
building of the validated inputs, and the backend itself. The plan/run split follows FlashInfer's wrappers
(``plan()`` once per batch layout, ``run()`` per layer).

What a plan remembers is dropped when it could be stale: a new input signature (which includes ``backend=`` and
``$ELIT_BACKEND``) runs the full checks and dispatch; registering a backend, changing the known-answer mode,
clearing or tuning dispatch decisions and ``tuning()`` all start a new dispatch generation
(``dispatch.generation``); turning the value checks on or off, and an in-place write to either ``cu_seqlens``
tensor (its version counter; an inference tensor keeps none), check again. Under ``torch.compile`` tracing and
CUDA-graph capture a call is exactly ``varlen_attention`` (nothing cached or read on the host; a graph runs that
Python once).
"""
from __future__ import annotations

import os

import torch

from . import dispatch as _dispatch
from . import inputs as _inputs
from . import known_answer as _ka
from . import registry as _registry
from .dispatch import select_backend
from .inputs import (AttnInputs, _as_int, _capturing, _check_cu, _check_cu_pair, _check_segments, _flag, _scale,
                     _softcap, _verify_segments_once, _window, tensor_version, validate_inputs, value_checks_enabled)
from .._amp import autocast_device, autocast_off
from .._transforms import _fwd, active_transform, peek
from .registry import kept_runner, run_backend

_MAX_SIGNATURES = 64  # input signatures one plan remembers (a model uses one or two per plan)
# $ELIT_BACKEND as a signature field, read on every call: os.environ.get costs ~1 us (it encodes the key and
# decodes the value); os.environ's own store, where CPython keeps it, is one dict lookup of the raw value.
_ENV_STORE = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("ELIT_BACKEND") if hasattr(os.environ, "encodekey") else None


def _env_backend():
    """``$ELIT_BACKEND``'s raw value (or None), for a signature: a change of it changes the signature."""
    if isinstance(_ENV_STORE, dict) and _ENV_KEY is not None:
        return _ENV_STORE.get(_ENV_KEY)
    return os.environ.get("ELIT_BACKEND")


def _epoch() -> tuple:
    """Everything outside the inputs that a cached decision depends on."""
    return _registry.generation, _ka.generation, _ka._mode, _dispatch.generation


class AttentionPlan:
    """Attention over fixed packed segments: ``plan = AttentionPlan(cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k, segments=...)`` once, then ``plan(q, k, v)`` per call, equal to ``varlen_attention(q, k, v,
    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)`` with the same keyword arguments.

    Arguments (as ``varlen_attention``'s): ``cu_seqlens_q`` / ``cu_seqlens_k`` int32 ``[S+1]``;
    ``max_seqlen_q`` / ``max_seqlen_k`` ints; ``segments`` (``SegmentRuns``, the lengths on the host: no device
    read, uniform segments run as one dense SDPA); ``softmax_scale`` (None: ``D**-0.5`` of the call's D),
    ``causal``, ``window_size``, ``softcap``, ``return_lse``, ``deterministic``.

    ``plan(q, k, v, backend=None)``: q ``[total_q, H, D]``, k/v ``[total_k, H_kv, D]``; returns ``out`` (or
    ``(out, lse)``) exactly as ``varlen_attention``. ``backend`` / ``$ELIT_BACKEND`` as there.

    Raises at construction the ``TypeError`` / ``ValueError`` of ``varlen_attention`` for the arguments given
    here (with ``segments``, its eager comparison with ``cu_seqlens`` included); at the first call of each
    input signature, those of the tensors and the value checks of ``cu_seqlens``.

        >>> from elit_kernels import SegmentRuns, varlen_attention
        >>> cu = torch.tensor([0, 4, 8], dtype=torch.int32)
        >>> plan = AttentionPlan(cu, cu, 4, 4, segments=SegmentRuns.from_lengths([4, 4], [4, 4]))
        >>> q = torch.randn(8, 2, 16)
        >>> torch.allclose(plan(q, q, q), varlen_attention(q, q, q, cu, cu, 4, 4))
        True
    """

    def __init__(self, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, segments=None, softmax_scale=None,
                 causal=False, window_size=(-1, -1), softcap=0.0, return_lse=False, deterministic=False):
        # The checks that need no q/k/v run now, so a bad argument is named where the plan is made; the first call
        # of each signature runs validate_inputs in full (q/k/v against all of this).
        eager = not _capturing()
        max_q, max_k = _as_int("max_seqlen_q", max_seqlen_q), _as_int("max_seqlen_k", max_seqlen_k)
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            _check_cu(name, cu)  # type, dtype, rank; values below or at the first call
        _check_cu_pair(cu_seqlens_q, cu_seqlens_k)
        if cu_seqlens_k.device != cu_seqlens_q.device:
            raise ValueError(f"cu_seqlens_k: on device {cu_seqlens_k.device}, but cu_seqlens_q is on "
                             f"{cu_seqlens_q.device}")
        if segments is not None:
            _check_segments(segments, cu_seqlens_q, max_q, max_k)
            if eager and value_checks_enabled():
                _verify_segments_once(segments, cu_seqlens_q, cu_seqlens_k)
        if softmax_scale is not None:
            softmax_scale = _scale(softmax_scale)
        causal, return_lse = _flag("causal", causal), _flag("return_lse", return_lse)
        deterministic = _flag("deterministic", deterministic)
        window_size = _window(window_size, False)  # ints (a caller's list or tensor may change later)
        softcap = _softcap(softcap)
        # private, with read-only properties: the cached runs hold these, so they must not change behind them
        self._cu_q, self._cu_k, self._max_q, self._max_k = cu_seqlens_q, cu_seqlens_k, max_q, max_k
        self._segments = segments
        self._kw = dict(softmax_scale=softmax_scale, causal=causal, return_lse=return_lse, window_size=window_size,
                        softcap=softcap, deterministic=deterministic)
        self._runs: dict = {}  # signature -> (backend, AttnInputs fields other than q/k/v, its plan_runner or None)
        self._state = None  # (_epoch(), value checks on, torch's deterministic switch, cu versions) of the cached runs

    cu_seqlens_q = property(lambda self: self._cu_q, doc="int32 ``[S+1]``, as given")
    cu_seqlens_k = property(lambda self: self._cu_k, doc="int32 ``[S+1]``, as given")
    max_seqlen_q = property(lambda self: self._max_q, doc="int, as given")
    max_seqlen_k = property(lambda self: self._max_k, doc="int, as given")
    segments = property(lambda self: self._segments, doc="``SegmentRuns`` or None, as given")

    def _full(self, q, k, v, backend):
        kw = self._kw
        inp = validate_inputs(q, k, v, self._cu_q, self._cu_k, self._max_q, self._max_k, kw["softmax_scale"],
                              kw["causal"], return_lse=kw["return_lse"], window_size=kw["window_size"],
                              softcap=kw["softcap"], segments=self._segments, deterministic=kw["deterministic"],
                              derive_segments=False)  # kept across calls: only the caller's segments hold
        return inp, select_backend(inp, backend)

    def __call__(self, q, k, v, *, backend=None):
        if _capturing():  # traced or captured: the plain path (once per graph; it reads nothing on the host)
            inp, b = self._full(q, k, v, backend)
            return run_backend(b, inp)
        env = _env_backend() if backend is None else None  # read per call, as varlen_attention reads it
        try:
            key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
                   (q.requires_grad or k.requires_grad or v.requires_grad) and torch.is_grad_enabled(), backend, env,
                   None if peek() is None and _fwd._current_level < 0 else active_transform(q, k, v)) \
                if backend is None or type(backend) is str else None  # a backend that is not a name: checks say so
        except AttributeError:  # not tensors: the full checks name the argument
            key = None
        state = (_epoch(), _inputs._validate_values, torch.are_deterministic_algorithms_enabled(),
                 tensor_version(self._cu_q), tensor_version(self._cu_k))
        if state != self._state:
            self._runs.clear()
            self._state = state
        hit = self._runs.get(key) if key is not None else None
        if hit is not None and _registry._REGISTRY.get(hit[0].name) is hit[0]:
            b, fields, runner = hit
            if runner is not None:
                amp = autocast_device(q)
                if amp is None:
                    return runner(q, k, v)
                with autocast_off(amp):  # as run_backend: out in q's dtype
                    return runner(q, k, v)
            inp = object.__new__(AttnInputs)
            d = inp.__dict__
            d.update(fields)
            d["q"], d["k"], d["v"] = q, k, v
            return run_backend(b, inp)
        inp, b = self._full(q, k, v, backend)
        if key is not None:
            if len(self._runs) >= _MAX_SIGNATURES:
                self._runs.pop(next(iter(self._runs)))
            self._runs[key] = (b, {f: x for f, x in inp.__dict__.items() if f not in ("q", "k", "v")},
                               kept_runner(b, inp))
        return run_backend(b, inp)

    def __repr__(self) -> str:
        return (f"AttentionPlan({self._cu_q.shape[0] - 1} segments, max_seqlen_q={self._max_q}, "
                f"max_seqlen_k={self._max_k}, segments {'on the host' if self._segments is not None else 'unknown'})")
