"""Elementwise ops the model runs on packed tokens, with swappable implementations.

``"reference"`` is plain PyTorch (elit_kernels.reference.modulate): it takes the layout's ``TokenRuns`` and
broadcasts per-sample adaLN parameters over views of each run of equal-length samples. Compiled fused
versions register themselves here under their own name (for example ``"fused"`` from the C++/CUDA
extension); an implementation registered with ``takes_runs=False`` is handed the ``[T]`` token->sample index
instead. A model picks one with its ``elementwise=`` argument.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from .reference.modulate import gated_residual, layernorm_modulate


class ElementwiseImpl(NamedTuple):
    layernorm_modulate: Callable  # (x [T,C], shift [B,C], scale [B,C], tokens, eps) -> [T,C]
    gated_residual: Callable  # (x [T,C], y [T,C], gate [B,C], tokens) -> [T,C]
    takes_runs: bool = False  # tokens as a layout.TokenRuns (True) or a [T] long index (False)


ELEMENTWISE_IMPLS: dict[str, ElementwiseImpl] = {
    "reference": ElementwiseImpl(layernorm_modulate, gated_residual, takes_runs=True),
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
    return ElementwiseImpl(lambda x, sh, sc, runs, eps: lm(x, sh, sc, runs.index, eps),
                           lambda x, y, g, runs: gr(x, y, g, runs.index), takes_runs=True)
