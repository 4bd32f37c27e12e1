"""Elementwise ops the model runs on packed tokens, with swappable implementations.

``"reference"`` is plain PyTorch (elit_kernels.reference.modulate). Compiled fused versions register
themselves here under their own name (for example ``"fused"`` from the C++/CUDA extension); a model
picks one with its ``elementwise=`` argument.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from ..reference.modulate import gated_residual, layernorm_modulate


class ElementwiseImpl(NamedTuple):
    layernorm_modulate: Callable  # (x [T,C], shift [B,C], scale [B,C], index [T], eps) -> [T,C]
    gated_residual: Callable  # (x [T,C], y [T,C], gate [B,C], index [T]) -> [T,C]


ELEMENTWISE_IMPLS: dict[str, ElementwiseImpl] = {
    "reference": ElementwiseImpl(layernorm_modulate, gated_residual),
}


def register_elementwise(name: str, impl: ElementwiseImpl) -> None:
    ELEMENTWISE_IMPLS[name] = impl


def get_elementwise(name: str) -> ElementwiseImpl:
    try:
        return ELEMENTWISE_IMPLS[name]
    except KeyError:
        raise ValueError(f"elementwise: unknown implementation {name!r}; known: {', '.join(ELEMENTWISE_IMPLS)}") from None
