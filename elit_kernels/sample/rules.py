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
            try:
                w = Fraction(w)  # ints, floats (NumPy float64 too), Fractions, Decimals: exactly
            except TypeError:
                w = Fraction(float(w))  # other reals (NumPy float32 / float16): their exact value as a float
            items.append((int(j), w))
    if not items:
        raise UsageError(name, "no J:WEIGHT entries")
    seen = set()
    for jj, _ in items:
        if jj in seen:
            raise UsageError(name, f"J = {jj} appears twice")
        seen.add(jj)
    return items


def _mix_table(mix) -> tuple[np.ndarray, list[int]]:
    """The slices of a mix as integers: ``(thresholds, js)``, where u_i falls in slice k when
    ``x_i = (i + 1)·PHI64 mod 2^64`` is below ``ceil(c_k·2^64)`` (c_k the k-th cumulative normalised weight) and not
    below the thresholds before it: ``u < c`` holds exactly when the integer ``x < ceil(c·2^64)``. A threshold of
    2^64 or more (the last one, c = 1) holds every x: only those below 2^64 are listed, ascending."""
    mix = parse_budget_mix(mix, "mix")
    total = sum(w for _, w in mix)
    acc, th = Fraction(0), []
    for _, w in mix:
        acc += w / total
        t = -((-acc.numerator * 2 ** 64) // acc.denominator)  # ceil(acc * 2^64), exactly
        if t < 2 ** 64:
            th.append(t)
    return np.array(th, dtype=np.uint64), [j for j, _ in mix]


def _mix_of(table, idx: np.ndarray) -> np.ndarray:
    """J of each index in ``idx`` (uint64, each < 2^64 - 1), from ``_mix_table``'s ``table``: numpy's uint64
    product wraps modulo 2^64, which is the rule's ``mod 2^64``."""
    th, js = table
    x = (idx + np.uint64(1)) * np.uint64(_PHI64)
    return np.asarray(js, dtype=np.int64)[np.searchsorted(th, x, side="right")]


def mix_budgets(mix, indices) -> list[int]:
    """Budget J of each sample of a mix: entry k such that u_i falls in the k-th slice of the cumulative normalised
    weights, u_i = ((i + 1)·0x9E3779B97F4A7C15 mod 2^64) / 2^64 (a golden-ratio sequence: every run of consecutive
    indices holds the mix's proportions closely). Depends on the index only. ``mix``: as ``parse_budget_mix``
    takes it (a string or (J, weight) pairs), checked the same way (UsageError naming ``mix``). Computed in integers
    (exactly the rule), a million indices at a time."""
    table = _mix_table(mix)
    if isinstance(indices, range) and indices.step == 1 and 0 <= indices.start and indices.stop < 2 ** 63:
        return mix_range(table, indices.start, indices.stop).tolist()
    idx = list(indices)
    if not all(is_int(i) and 0 <= i < 2 ** 64 - 1 for i in idx):  # outside uint64: the rule in Python integers
        return [_slow_mix(table, int(i)) for i in idx]
    out: list[int] = []
    for k in range(0, len(idx), 1 << 20):
        out += _mix_of(table, np.array(idx[k:k + (1 << 20)], dtype=np.uint64)).tolist()
    return out


def mix_range(table, start: int, stop: int) -> np.ndarray:
    """J of the indices ``start..stop-1`` (int64 array) of a mix's ``_mix_table``, a million at a time."""
    out = np.empty(max(0, stop - start), dtype=np.int64)
    for a in range(start, stop, 1 << 20):
        b = min(a + (1 << 20), stop)
        out[a - start:b - start] = _mix_of(table, np.arange(a, b, dtype=np.uint64))
    return out


def _slow_mix(table, i: int) -> int:
    th, js = table
    x = ((i + 1) * _PHI64) % 2 ** 64
    return js[sum(1 for t in th.tolist() if t <= x)]


def budget_rule(budgets):
    """``budget_at(a, b)``: the budgets of indices ``a..b-1`` as an int64 array, for any indices (past N too), for
    ``plan_batches``. ``budgets``: one J for every sample (an int), or a mix as ``mix_budgets`` takes it."""
    if is_int(budgets):
        j = int(budgets)
        return lambda a, b: np.full(max(0, b - a), j, dtype=np.int64)
    table = _mix_table(budgets)
    return lambda a, b: mix_range(table, a, b)


#: the padding of a last batch (``plan_batches``) is looked for among the indices below this: a constant, so that a
#: batch never depends on N (N is at most ``run.MAX_SAMPLES``, far below), and bounding the search for a budget of
#: a tiny weight (its next indices may lie billions of indices on)
PAD_HORIZON = 2 ** 28


def budgets_after(budget_at, j: int, start: int, count: int) -> list[int]:
    """The first ``count`` indices ``i >= start`` (below ``PAD_HORIZON``) whose budget is ``j``; ``budget_at(a, b)``
    gives the budgets of indices ``a..b-1``. Fewer when the horizon comes first."""
    found: list[int] = []
    a, step = start, max(64, 4 * count)
    while len(found) < count and a < PAD_HORIZON:
        b = min(a + step, PAD_HORIZON)
        hits = np.flatnonzero(np.asarray(budget_at(a, b)) == j)
        found += (hits[:count - len(found)] + a).tolist()
        a, step = b, min(2 * step, 1 << 22)
    return found


def plan_batches(budgets, batch_size: int, budget_at=None) -> list[list[int]]:
    """The canonical batches: the indices of each budget (largest first) in index order, cut every
    ``batch_size``.

    With ``budget_at`` (``budget_at(a, b)``: the budgets of indices ``a..b-1``, any b > a, by the same rule as
    ``budgets``), the last batch of each budget is filled up to ``batch_size`` with that budget's next indices past
    N = ``len(budgets)`` (``budgets_after``): their samples are computed with the batch and not written. Then every
    batch is the k-th ``batch_size`` indices of its budget, the same whatever N: a sample's batch depends on its
    index, its budget and ``batch_size`` only (not on N, the world size or what a resumed run finds on disk), so
    its result is bitwise reproducible, and a run grown to a larger N computes its earlier samples in the same
    batches. Without ``budget_at`` the last batch of each budget holds only indices below N."""
    by: dict[int, list[int]] = {}
    for i, j in enumerate(budgets):
        by.setdefault(j, []).append(i)
    out = []
    for j in sorted(by, reverse=True):
        idx = by[j]
        if budget_at is not None and len(idx) % batch_size:
            idx = idx + budgets_after(budget_at, j, len(budgets), batch_size - len(idx) % batch_size)
        out += [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]
    return out
