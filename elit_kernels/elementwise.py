"""Elementwise ops the model runs on packed tokens, with swappable implementations.

``"reference"`` is plain PyTorch (elit_kernels.reference.modulate), fp32 inside (fp64 for fp64 input): it
takes the layout's ``TokenRuns`` and broadcasts per-sample adaLN parameters over views of each run of
equal-length samples. ``"native"`` (the models' default) is the same for fp32, and computes fp64 in fp64 and
fp16/bf16 in their own dtype, as the official ELIT code does: fewer bytes moved. Compiled fused versions
register themselves here under their own name (for example ``"fused"`` from the C++/CUDA extension); an
implementation registered with ``takes_runs=False`` is handed the ``[T]`` token->sample index instead. A model
picks one with its ``elementwise=`` argument.

Every implementation takes the same arguments and gives a result of x's dtype: x ``[T, C]`` (fp16, bf16, fp32 or
fp64) and per-sample parameters ``[B, C]`` (and ``y``) of any floating dtype, which need not be x's (under
``torch.autocast`` the adaLN parameters come out of a linear in the autocast dtype while x stays fp32). The
reference computes in fp32 (fp64 for fp64 x); ``"native"`` and ``"fused"`` cast the parameters and ``y`` to x's
dtype first. ``eps`` is checked by ``check_eps`` in every implementation: a finite real number >= 0
(``_types.is_real``: a bool, a str, a tensor or None is a TypeError naming ``eps``; NaN, ±inf or a negative value a
ValueError).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ._types import is_real
from .layout import TokenRuns
from .reference.modulate import _per_run, check_run_shapes, gated_residual, layernorm_modulate


class ElementwiseImpl(NamedTuple):
    layernorm_modulate: Callable  # (x [T,C], shift [B,C], scale [B,C], tokens, eps) -> [T,C]
    gated_residual: Callable  # (x [T,C], y [T,C], gate [B,C], tokens) -> [T,C]
    takes_runs: bool = False  # tokens as a layout.TokenRuns (True) or a [T] long index (False)


def check_eps(eps) -> float:
    """The LayerNorm epsilon ``eps`` of every ``layernorm_modulate`` implementation as a Python float: a finite real
    number >= 0 (a Python or NumPy int or float, ``_types.is_real``). TypeError naming ``eps`` for a bool, a str, a
    tensor or None (``float(True)`` would run with eps 1, ``float("1e-6")`` would parse a string); ValueError for
    NaN, ±inf or a negative value."""
    if type(eps) is float and 0.0 <= eps < math.inf:  # the model's every call (1e-6): no ABC check on the hot path
        return eps
    want = "a finite real number >= 0 (the LayerNorm epsilon, e.g. 1e-6)"
    if not is_real(eps):
        t = type(eps)
        what = f"{t.__name__} ({eps!r})" if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
        raise TypeError(f"eps: expected {want}, got {what}")
    f = float(eps)
    if not (math.isfinite(f) and f >= 0):
        raise ValueError(f"eps: expected {want}, got {eps!r}")
    return f


def reference_layernorm_modulate(x, shift, scale, tokens, eps: float = 1e-6):
    """``reference.modulate.layernorm_modulate`` with ``eps`` checked (``check_eps``): the ``"reference"``
    implementation."""
    return layernorm_modulate(x, shift, scale, tokens, check_eps(eps))


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it would be a no-op (a call costs ~1 us of host time)."""
    return t if t.dtype == dtype else t.to(dtype)


def native_layernorm_modulate(x, shift, scale, tokens, eps: float = 1e-6):
    """``LayerNorm(x) * (1 + scale) + shift`` computed in x's dtype, as the official ELIT code computes adaLN
    (``F.layer_norm`` accumulates its statistics in fp32 internally; the modulation is one fused multiply-add
    in x's dtype). fp32 inputs: the reference, bit for bit (the same ops); fp64 in fp64, as the reference. For
    fp16/bf16 it moves a third of the bytes of the reference's fp32 round trip (x.float(), fp32 LayerNorm
    and modulation, cast back): on an H200 the reference elementwise ops were where ELIT-SiT-XL/2 lost most of its
    9-10 % to the dense official way. ``eps``: ``check_eps``."""
    eps = check_eps(eps)
    runs = isinstance(tokens, TokenRuns)
    if x.dtype == torch.float32 and not runs:  # the gather path: the reference's ops (mul + add), bit for bit
        return layernorm_modulate(x, shift, scale, tokens, eps)
    c = x.shape[-1]
    shift, scale = _cast(shift, x.dtype), _cast(scale, x.dtype)

    def fn(xr, sh, sc):  # in x's dtype as the official code; parameters cast to it (for fp32 the reference's ops)
        return torch.addcmul(sh, F.layer_norm(xr, (c,), eps=eps), 1 + sc)

    if runs:
        out = _per_run(x, (shift, scale), tokens, fn)
        return out if out is not None else x.new_zeros(0, c)
    return fn(x, shift[tokens], scale[tokens])


def native_gated_residual(x, y, gate, tokens):
    """``x + gate * y`` in x's dtype for fp16/bf16/fp64 (one fused multiply-add, as the official code); fp32: the
    reference, bit for bit (the same ops). The result has x's dtype whatever the parameters' dtype."""
    runs = isinstance(tokens, TokenRuns)
    if x.dtype == torch.float32 and not runs:  # the gather path: the reference's ops (mul + add), bit for bit
        return gated_residual(x, y, gate, tokens)
    gate, y = _cast(gate, x.dtype), _cast(y, x.dtype)
    if runs:
        out = _per_run(x, (gate,), tokens, lambda xr, yr, g: torch.addcmul(xr, g, yr), others=(y,))
        return out if out is not None else x.clone()
    return torch.addcmul(x, gate[tokens], y)


ELEMENTWISE_IMPLS: dict[str, ElementwiseImpl] = {
    "reference": ElementwiseImpl(reference_layernorm_modulate, gated_residual, takes_runs=True),
    "native": ElementwiseImpl(native_layernorm_modulate, native_gated_residual, takes_runs=True),
}


def register_elementwise(name: str, impl: ElementwiseImpl) -> None:
    ELEMENTWISE_IMPLS[name] = impl


def get_elementwise(name: str) -> ElementwiseImpl:
    """The implementation ``name``, called with a ``TokenRuns`` as ``tokens`` whatever it takes."""
    try:
        impl = ELEMENTWISE_IMPLS[name]
    except KeyError:
        raise ValueError(f"elementwise: unknown implementation {name!r}; known: {', '.join(ELEMENTWISE_IMPLS)}") from None
    if impl.takes_runs:
        return impl
    lm, gr = impl.layernorm_modulate, impl.gated_residual

    # The shapes the run-taking implementations check (an index would broadcast a [1, C] parameter, or run a stale
    # [B + 1, C] one); the plain comparisons first, so that a good call pays no function call for them.
    def layernorm_modulate_runs(x, sh, sc, runs, eps):
        b = runs.batch
        if x.shape[0] != runs.total or sh.shape[0] != b or sc.shape[0] != b or sh.dim() != 2 or sc.dim() != 2:
            check_run_shapes(x, (sh, sc), runs)
        return lm(x, sh, sc, runs.index, eps)

    def gated_residual_runs(x, y, g, runs):
        n = runs.total
        if x.shape[0] != n or y.shape[0] != n or g.shape[0] != runs.batch or g.dim() != 2:
            check_run_shapes(x, (g,), runs, (y,))
        return gr(x, y, g, runs.index)

    return ElementwiseImpl(layernorm_modulate_runs, gated_residual_runs, takes_runs=True)
