"""Rectified flow for ELIT: the training loss with tail dropping, and samplers with CFG / AutoGuidance / CCFG.

Convention (the paper's): ``x_t = (1 - t) * x0 + t * noise``, the model predicts the velocity
``noise - x0``; sampling integrates from t = 1 (noise) to t = 0 (data).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def _check_range(name: str, lo: int, hi: int) -> None:
    if not (isinstance(lo, int) and isinstance(hi, int)) or not 0 <= lo <= hi:
        raise ValueError(f"{name}: expected ints 0 <= j_min <= j_max, got j_min={lo!r}, j_max={hi!r}")


def sample_budgets(batch: int, j_min: int, j_max: int, *, per_sample: bool = False,
                   generator: torch.Generator | None = None) -> list[int]:
    """Tail dropping: J̃ ~ Uniform{j_min..j_max}, once for the batch (the paper) or per sample (ours)."""
    _check_range("j_min", j_min, j_max)
    n = batch if per_sample else 1
    draws = torch.randint(j_min, j_max + 1, (n,), generator=generator).tolist()
    return draws if per_sample else draws * batch


def logit_normal(batch: int, *, mean: float = 0.0, std: float = 1.0, generator=None, device="cpu") -> torch.Tensor:
    """t = sigmoid(N(mean, std²)) — the logit-normal timestep distribution."""
    return torch.sigmoid(torch.randn(batch, generator=generator) * std + mean).to(device)


def rectified_flow_loss(model, x0: torch.Tensor, y: torch.Tensor, budgets=None, *, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean squared error between ``model(x_t, t, y, budgets)`` and the velocity ``noise - x0``.

    ``t`` defaults to logit-normal draws, ``noise`` to standard normal (both from ``generator``).
    """
    b = x0.shape[0]
    if t is None:
        t = logit_normal(b, generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator).to(x0)
    if noise.shape != x0.shape:
        raise ValueError(f"noise: expected shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    tt = t.to(x0.dtype).view(b, *([1] * (x0.dim() - 1)))
    xt = (1 - tt) * x0 + tt * noise
    return F.mse_loss(model(xt, t, y, budgets).float(), (noise - x0).float())


GUIDANCE_MODES = ("none", "cfg", "autoguidance", "ccfg", "ccfg_two_pass")


def guided_velocity(model, x, t, y, budget, *, mode: str = "none", scale: float = 0.0, weak_budget=None):
    """One guided velocity ``v = (λ+1)·G(x|c; J̃) − λ·G_weak``.

    - ``cfg``: weak = G(x | ∅; J̃)
    - ``autoguidance``: weak = G(x | c; J̃_w)
    - ``ccfg``: weak = G(x | ∅; J̃_w), and the conditional and weak passes run as **one** ragged batch
      (budgets ``[J̃]*B + [J̃_w]*B``), so the weak half costs only its own latents.
    - ``ccfg_two_pass``: the same maths as two forward passes (what the official code does).

    ``budget``/``weak_budget`` are an int or one int per sample; ``weak_budget`` defaults to
    max(1, J_max // 16) as in the official code.
    """
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"mode: expected one of {GUIDANCE_MODES}, got {mode!r}")
    b = x.shape[0]
    t = t.expand(b) if t.dim() == 0 else t
    if mode == "none" or scale == 0.0:
        return model(x, t, y, budget)
    j_max = model.cfg.latents_per_group
    if weak_budget is None:
        weak_budget = max(1, j_max // 16)
    null = torch.full_like(y, model.null_class)

    def per_sample(bud):
        return [bud] * b if isinstance(bud, int) else list(bud)

    if mode == "cfg":
        # Same budget for both halves: one batch of 2B is the standard way to run CFG.
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), per_sample(budget) * 2)
        cond, weak = v.chunk(2)
    elif mode == "autoguidance":
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), per_sample(budget) + per_sample(weak_budget))
        cond, weak = v.chunk(2)
    elif mode == "ccfg":
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), per_sample(budget) + per_sample(weak_budget))
        cond, weak = v.chunk(2)
    else:  # ccfg_two_pass
        cond = model(x, t, y, budget)
        weak = model(x, t, null, weak_budget)
    return (scale + 1.0) * cond - scale * weak


def euler_sample(model, noise: torch.Tensor, y: torch.Tensor, *, steps: int = 32, budget=None,
                 budget_schedule: Sequence | Callable[[int], object] | None = None, mode: str = "none",
                 scale: float = 0.0, weak_budget=None, progress: bool = False) -> torch.Tensor:
    """Integrate the flow ODE from t = 1 (``noise``) to t = 0 with ``steps`` Euler steps.

    ``budget`` is used at every step (None = J_max, an int, or one int per sample). ``budget_schedule``
    overrides it per step: a sequence of ``steps`` budgets or a callable ``step -> budget``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if budget_schedule is None:
        schedule = lambda i: budget  # noqa: E731
    elif callable(budget_schedule):
        schedule = budget_schedule
    else:
        if len(budget_schedule) != steps:
            raise ValueError(f"budget_schedule: expected {steps} budgets (one per step), got {len(budget_schedule)}")
        schedule = budget_schedule.__getitem__
    ts = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    x = noise
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling", leave=False)
    with torch.no_grad():
        for i in it:
            t = ts[i].expand(x.shape[0])
            v = guided_velocity(model, x, t, y, schedule(i), mode=mode, scale=scale, weak_budget=weak_budget)
            x = x + (ts[i + 1] - ts[i]) * v
    return x
