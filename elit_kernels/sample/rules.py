"""What sample i is, from the settings and i alone: its noise, label, budget and batch (docs/sampling.md)."""
from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction

import numpy as np
import torch

from .._types import is_int, is_real

_PHI64 = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: the Weyl sequence of the budget-mix assignment


class UsageError(ValueError):
    """A bad argument; ``arg`` is the parameter (the CLI flag is ``--`` + arg with dashes)."""

    def __init__(self, arg: str, message: str):
        self.arg, self.message = arg, message
        super().__init__(f"{arg}: {message}")


class SamplingError(RuntimeError):
    """Sampling failed on some rank; what was written before stays on disk (rerun to resume)."""


def sample_seed(seed: int, index: int) -> int:
    """The 64-bit seed of sample ``index``'s noise: ``SeedSequence([seed, index]).generate_state(1, uint64)``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def sample_noise(seed: int, indices, shape) -> torch.Tensor:
    """Noise ``[len(indices), *shape]`` float32 on the CPU: sample i is ``torch.randn(shape)`` from a CPU
    ``torch.Generator`` seeded with ``sample_seed(seed, i)``, whatever the batch, rank or device."""
    out = torch.empty(len(indices), *shape)
    for k, i in enumerate(indices):
        out[k] = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(sample_seed(seed, i)))
    return out


def sample_labels(classes, indices) -> list[int]:
    """Class of sample i: ``classes[i % len(classes)]`` (all classes balanced when N is a multiple)."""
    return [int(classes[i % len(classes)]) for i in indices]


def parse_budget_mix(mix, name: str = "budget_mix") -> list[tuple[int, Fraction]]:
    """A budget mix as ``[(J, weight), ...]``: from the CLI's string ``"64:0.5,16:0.25,4:0.25"`` ->
    ``[(64, 1/2), (16, 1/4), (4, 1/4)]``, or from a sequence of ``(J, weight)`` pairs, through the same checks:
    J an int (latents per group; a float such as 2.7 is refused, not truncated), each J once, a weight a finite
    real number > 0 (weights are normalised; a weight is kept exactly as a Fraction). Raises UsageError naming
    ``name`` (``budget_mix``)."""
    if isinstance(mix, str):
        items = []
        for item in mix.split(","):
            j, sep, w = item.strip().partition(":")
            try:
                jj, ww = int(j), Fraction(w.strip())
            except (ValueError, ZeroDivisionError):
                jj = ww = None
            if not sep or jj is None or ww <= 0:
                raise UsageError(name, f"expected J:WEIGHT,... with J an int (latents per group) and a weight "
                                       f"> 0, e.g. 16:0.5,4:0.5; got {item.strip()!r}")
            items.append((jj, ww))
    elif isinstance(mix, bytes) or not isinstance(mix, Iterable):
        raise UsageError(name, f"expected a string J:WEIGHT,... or a sequence of (J, weight) pairs, got "
                               f"{type(mix).__name__} ({mix!r})")
    else:
        items = []
        for item in mix:
            try:
                j, w = item
            except (TypeError, ValueError):
                raise UsageError(name, f"expected (J, weight) pairs, got {item!r}") from None
            if not is_int(j):
                raise UsageError(name, f"J (latents per group) must be an int, got {j!r} in {item!r}")
            if not is_real(w) or not math.isfinite(w) or w <= 0:
                raise UsageError(name, f"a weight must be a finite real number > 0, got {w!r} in {item!r}")
            items.append((int(j), Fraction(w)))
    if not items:
        raise UsageError(name, "no J:WEIGHT entries")
    seen = set()
    for jj, _ in items:
        if jj in seen:
            raise UsageError(name, f"J = {jj} appears twice")
        seen.add(jj)
    return items


def mix_budgets(mix, indices) -> list[int]:
    """Budget J of each sample of a mix: entry k such that u_i falls in the k-th slice of the cumulative normalised
    weights, u_i = ((i + 1)·0x9E3779B97F4A7C15 mod 2^64) / 2^64 (a golden-ratio sequence: every run of consecutive
    indices holds the mix's proportions closely). Depends on the index only. ``mix``: as ``parse_budget_mix``
    takes it (a string or (J, weight) pairs), checked the same way (UsageError naming ``mix``)."""
    mix = parse_budget_mix(mix, "mix")
    total = sum(w for _, w in mix)
    cums, acc = [], Fraction(0)
    for j, w in mix:
        acc += w / total
        cums.append((acc, j))
    out = []
    for i in indices:
        u = Fraction(((i + 1) * _PHI64) % 2 ** 64, 2 ** 64)
        out.append(next(j for c, j in cums if u < c))
    return out


def plan_batches(budgets, batch_size: int) -> list[list[int]]:
    """The canonical batches: the indices of each budget (largest first) in index order, cut every
    ``batch_size``. A sample's batch depends on its index, its budget and ``batch_size`` only (not on the world
    size or on what a resumed run finds on disk), so its result is bitwise reproducible."""
    by: dict[int, list[int]] = {}
    for i, j in enumerate(budgets):
        by.setdefault(j, []).append(i)
    return [by[j][k:k + batch_size] for j in sorted(by, reverse=True) for k in range(0, len(by[j]), batch_size)]
