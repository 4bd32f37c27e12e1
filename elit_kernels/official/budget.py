"""The released ELIT-SiT code's budget argument: one float, a fraction or a count (docs/released_checkpoints.md §4)."""
from __future__ import annotations

import math

from .._types import is_real
from ..models.config import ElitConfig


def latents_for_budget(budget, cfg) -> int:
    """The official ``inference_budget`` ``b`` -> J, latents kept per group (an int for ``ElitDiT``'s ``budgets``).

    - ``0 < b <= 1``: a fraction of the P latents of a group, ``J = int(P * (1 - (1 - b)))``, in Python floats
      and truncated as the official code computes it (0.3 at P = 16 -> 4, not 5; 1 is the full budget).
    - ``b > 1``: a count of latents over the whole image of N tokens, ``J = int(P * b / N)`` (48 of 64 tokens
      at P = 16 -> 12).

    ``cfg``: an ``ElitConfig`` (or a model with ``.cfg``) giving P (tokens per group), N (tokens) and J_max
    (``latents_per_group``); TypeError naming ``cfg`` for anything else. The official rule assumes J_max = P (the
    released preset); with a smaller J_max a budget giving J > J_max is refused (that model's forward would refuse
    J), never clamped. Raises TypeError for a non-number or bool, ValueError naming ``budget`` where the official
    code would assert or misbehave: ``b <= 0``, not finite, a count above N, or a budget that keeps 0 latents per
    group (the official assertion "some windows contain zero tokens"), and for J above J_max. ``b = None`` (``generate.py``'s default,
    which samples a training budget) is refused too: pass a budget, or use ``budgets=None`` (J_max) in ours.

    >>> from elit_kernels.models import elit_sit_config
    >>> cfg = elit_sit_config("XL/2", 256)  # P = 16, N = 256
    >>> [latents_for_budget(b, cfg) for b in (1.0, 0.5, 0.3, 0.0625, 64, 255)]
    [16, 8, 4, 1, 4, 15]
    """
    given = cfg
    cfg = getattr(cfg, "cfg", cfg)
    if not isinstance(cfg, ElitConfig):
        raise TypeError(f"cfg: expected an ElitConfig (or a model with .cfg), got {type(given).__name__}"
                        + (f" whose .cfg is {type(cfg).__name__}" if cfg is not given else ""))
    p, n, j_max = cfg.tokens_per_group, cfg.grid * cfg.grid, cfg.latents_per_group
    if budget is None:
        raise ValueError("budget: None is the official generate.py default, which draws a random training budget "
                         "(or fails without torch.distributed); pass a fraction in (0, 1] or a count in (1, "
                         f"{n}], or use budgets=None in ElitDiT for the full budget")
    if not is_real(budget):
        raise TypeError(f"budget: expected a float (fraction in (0, 1]) or a number (count in (1, {n}]), "
                        f"got {type(budget).__name__}")
    b = float(budget)
    if not math.isfinite(b) or b <= 0:
        raise ValueError(f"budget: expected a fraction in (0, 1] or a count of latents in (1, {n}], got {budget!r}")
    if b <= 1:
        j = int(p * (1 - (1 - b)))
        kind = f"fraction {budget!r} of P = {p}"
    else:
        if b > n:
            raise ValueError(f"budget: a count above 1 is latents over the whole image; it must be <= N = {n} "
                             f"tokens, got {budget!r}")
        j = int(p * b / n)
        kind = f"count {budget!r} of N = {n} tokens (P = {p})"
    if j < 1:
        smallest = f"{1 / p!r} as a fraction or {cfg.groups} as a count"
        raise ValueError(f"budget: the {kind} keeps 0 latents per group (the official code asserts 'some windows "
                         f"contain zero tokens'); the smallest budget is {smallest}")
    if j > j_max:
        raise ValueError(f"budget: the {kind} keeps {j} latents per group, above this config's J_max = {j_max} "
                         f"(latents_per_group; the official rule assumes J_max = P); the largest budget is "
                         f"{j_max / p!r} as a fraction or {j_max * cfg.groups} as a count")
    return j
