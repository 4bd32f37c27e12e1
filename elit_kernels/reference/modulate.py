"""Reference ragged elementwise ops of the ELIT model (packed tokens + a token->sample index).

adaLN conditioning is per sample; tokens of a ragged batch are packed ``[T, C]`` and find their
sample's shift/scale/gate through ``index`` ([T] long). Spatial tokens use the same ops with
``index = arange(B).repeat_interleave(N)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, index: torch.Tensor,
                       eps: float = 1e-6) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale[index]) + shift[index]`` (LayerNorm without affine, as DiT's adaLN).

    x ``[T, C]``, shift/scale ``[B, C]``, index ``[T]`` long -> ``[T, C]`` in x's dtype.

    >>> x = torch.randn(5, 8); s = torch.randn(2, 8); idx = torch.tensor([0, 0, 1, 1, 1])
    >>> layernorm_modulate(x, s, s, idx).shape
    torch.Size([5, 8])
    """
    h = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return (h * (1 + scale.float()[index]) + shift.float()[index]).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x + gate[index] * y``: x, y ``[T, C]``, gate ``[B, C]``, index ``[T]`` long -> ``[T, C]``."""
    return (x.float() + gate.float()[index] * y.float()).to(x.dtype)
