"""Reference ragged elementwise ops of the ELIT model (packed tokens, per-sample adaLN parameters).

adaLN conditioning is per sample; tokens of a ragged batch are packed ``[T, C]``. ``tokens`` says which
sample each row belongs to, either as a ``TokenRuns`` (runs of equal-length samples: each run is viewed as
``[samples, L, C]`` and the ``[B, C]`` parameters broadcast over it, no gather) or as a ``[T]`` long index
(the parameters are gathered per token). Both give the same values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import TokenRuns


def _rows_error(name: str, t: torch.Tensor, total: int) -> ValueError:
    return ValueError(f"{name}: has {t.shape[0]} rows, the token runs describe {total} (one row per token)")


def check_run_shapes(x: torch.Tensor, params: tuple, tokens: TokenRuns, others: tuple = ()) -> None:
    """ValueError naming ``x`` or ``y`` (``others``) when its rows are not the ``tokens.total`` the runs describe, and
    naming the parameters (``shift``/``scale``, ``gate``) when theirs are not the ``tokens.batch`` samples: a
    ``[1, C]`` one would broadcast one sample's parameters over the batch, silently. Every elementwise
    implementation's shapes are checked here (``_per_run``; ``elementwise.get_elementwise`` for one that takes an
    index)."""
    n = tokens.total
    if x.shape[0] != n:  # else the whole-run view would spread the samples' parameters over other rows
        raise _rows_error("x", x, n)
    for o in others:
        if o.shape[0] != n:
            raise _rows_error("y", o, n)
    for p in params:
        if p.dim() != 2 or p.shape[0] != tokens.batch:
            raise ValueError(f"{'shift/scale' if len(params) == 2 else 'gate'}: expected [{tokens.batch}, C] (one row "
                             f"per sample of the token runs), got shape {tuple(p.shape)}")


def _per_run(x: torch.Tensor, params: tuple, tokens: TokenRuns, fn, others: tuple = ()) -> torch.Tensor | None:
    """``fn(x_run [S, L, C], *others_run, *[p[s0:s1, None] for p in params]) -> [S, L, C]`` over every run (``others``:
    more ``[T, C]`` tensors, viewed as x is); one ``[T, C]`` result, or None when there is no token at all. ValueError
    naming ``x`` or ``y`` when its rows are not the ``tokens.total`` the runs describe, and naming the parameters
    (``shift``/``scale``, ``gate``) when theirs are not the ``tokens.batch`` samples (a ``[1, C]`` one broadcast one
    sample's parameters over the batch, silently).

    A ``tokens.whole`` run is viewed without slicing: a model's forward makes four of these calls per block, and
    on a GPU at small sizes what a call costs is its host time."""
    check_run_shapes(x, params, tokens, others)
    c = x.shape[-1]
    if tokens.whole:
        s = tokens.batch
        return fn(x.view(s, -1, c), *[o.view(s, -1, c) for o in others], *[p.unsqueeze(1) for p in params]).view(-1, c)
    parts = []
    for a, b, s0, s1 in tokens.runs:
        m = s1 - s0  # samples in this run
        parts.append(fn(x[a:b].view(m, -1, c), *[o[a:b].view(m, -1, c) for o in others],
                        *[p[s0:s1, None] for p in params]).reshape(b - a, c))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, index, eps: float = 1e-6) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale[sample]) + shift[sample]`` (LayerNorm without affine, as DiT's adaLN), in fp32
    (fp64 for fp64 input).

    x ``[T, C]``, shift/scale ``[B, C]``, index: a ``TokenRuns`` or a ``[T]`` long token->sample index ->
    ``[T, C]`` in x's dtype.

    >>> x = torch.randn(5, 8); s = torch.randn(2, 8); idx = torch.tensor([0, 0, 1, 1, 1])
    >>> a = layernorm_modulate(x, s, s, idx); b = layernorm_modulate(x, s, s, TokenRuns.from_counts([2, 3]))
    >>> a.shape, torch.allclose(a, b)
    (torch.Size([5, 8]), True)
    """
    acc = torch.promote_types(x.dtype, torch.float32)

    def fn(xr, sh, sc):
        h = F.layer_norm(xr.to(acc), (xr.shape[-1],), eps=eps)
        return torch.addcmul(sh.to(acc), h, 1 + sc.to(acc)).to(x.dtype)

    if isinstance(index, TokenRuns):
        out = _per_run(x, (shift, scale), index, fn)
        return out if out is not None else x.new_zeros(0, x.shape[-1])
    h = F.layer_norm(x.to(acc), (x.shape[-1],), eps=eps)
    return (h * (1 + scale.to(acc)[index]) + shift.to(acc)[index]).to(x.dtype)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, index) -> torch.Tensor:
    """``x + gate[sample] * y``: x, y ``[T, C]``, gate ``[B, C]``, index a ``TokenRuns`` or ``[T]`` long -> ``[T, C]``;
    in fp32 (fp64 for fp64 input)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    if isinstance(index, TokenRuns):
        out = _per_run(x, (gate,), index,
                       lambda xr, yr, g: torch.addcmul(xr.to(acc), g.to(acc), yr.to(acc)).to(x.dtype), others=(y,))
        return out if out is not None else x.clone()
    return (x.to(acc) + gate.to(acc)[index] * y.to(acc)).to(x.dtype)
