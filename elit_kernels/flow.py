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


def _per_sample(budget, b: int, j_max: int) -> list:
    """A budget argument (None = J_max, an int, or one per sample) as one int per sample."""
    if budget is None:
        return [j_max] * b
    if isinstance(budget, int) and not isinstance(budget, bool):
        return [budget] * b
    if isinstance(budget, torch.Tensor):
        budget = budget.tolist()
    out = list(budget)
    if len(out) != b:
        raise ValueError(f"budget: expected {b} budgets (one per sample), got {len(out)}")
    return out


def _model_dtype(model) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None else torch.float32


def guided_velocity(model, x, t, y, budget=None, *, mode: str = "none", scale: float = 0.0, weak_budget=None,
                    dtype: torch.dtype | None = None):
    """One guided velocity ``v = G_weak + (λ+1)·(G(x|c; J̃) − G_weak)`` = ``(λ+1)·G(x|c; J̃) − λ·G_weak``.

    - ``none`` (or ``scale == 0``): v = G(x | c; J̃), one pass.
    - ``cfg``: weak = G(x | ∅; J̃); one batch of 2B (the official CFG).
    - ``autoguidance``: weak = G(x | c; J̃_w) (the official ``autoguidance=True`` with an unconditional budget).
    - ``ccfg``: weak = G(x | ∅; J̃_w), and the conditional and weak passes run as **one** ragged batch
      (budgets ``[J̃]*B + [J̃_w]*B``), so the weak half costs only its own latents.
    - ``ccfg_two_pass``: the same maths as two forward passes (what the official code does).

    ``scale`` is λ = the official ``cfg_scale − 1`` (docs/released_checkpoints.md §5). ``budget`` / ``weak_budget``:
    None (J_max / max(1, J_max // 16), the official default 1/16), an int, or one int per sample (latents per
    group; ``elit_kernels.official.latents_for_budget`` converts the official float budgets). ``dtype``: the
    dtype the passes are cast to before they are combined and of the result (None = x's dtype).
    Works with ``PlainDiT`` for ``none`` and ``cfg`` (budget must be None there).
    """
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"mode: expected one of {GUIDANCE_MODES}, got {mode!r}")
    b = x.shape[0]
    t = t.expand(b) if t.dim() == 0 else t
    dtype = dtype or x.dtype
    if mode == "none" or scale == 0.0:
        return model(x, t, y, budget).to(dtype)
    null = torch.full_like(y, model.null_class)
    j_max = model.cfg.latents_per_group  # a PlainDiT refuses any budget but None itself, naming `budgets`
    if mode != "cfg" and weak_budget is None:
        weak_budget = max(1, j_max // 16)
    xx, tt = torch.cat([x, x]), torch.cat([t, t])
    if mode == "cfg":
        # Same budget for both halves: one batch of 2B is the standard way to run CFG.
        bud = None if budget is None else _per_sample(budget, b, j_max) * 2
        cond, weak = model(xx, tt, torch.cat([y, null]), bud).chunk(2)
    elif mode == "autoguidance":
        bud = _per_sample(budget, b, j_max) + _per_sample(weak_budget, b, j_max)
        cond, weak = model(xx, tt, torch.cat([y, y]), bud).chunk(2)
    elif mode == "ccfg":
        bud = _per_sample(budget, b, j_max) + _per_sample(weak_budget, b, j_max)
        cond, weak = model(xx, tt, torch.cat([y, null]), bud).chunk(2)
    else:  # ccfg_two_pass
        cond = model(x, t, y, budget)
        weak = model(x, t, null, weak_budget)
    cond, weak = cond.to(dtype), weak.to(dtype)
    return weak + (scale + 1.0) * (cond - weak)


def _check_interval(guidance_interval) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in guidance_interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval: expected (low, high) times in [0, 1], got {guidance_interval!r}") from None
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"guidance_interval: expected 0 <= low <= high <= 1, got {guidance_interval!r}")
    return low, high


def euler_sample(model, noise: torch.Tensor, y: torch.Tensor, *, steps: int = 32, budget=None,
                 budget_schedule: Sequence | Callable[[int], object] | None = None, mode: str = "none",
                 scale: float = 0.0, weak_budget=None, guidance_interval=(0.0, 1.0), heun: bool = False,
                 progress: bool = False, graphed: bool = False) -> torch.Tensor:
    """Integrate the flow ODE from t = 1 (``noise``) to t = 0 in ``steps`` steps, as the official
    ``samplers.euler_sampler`` does (docs/released_checkpoints.md §5).

    - Times ``linspace(1, 0, steps + 1)`` in float64; the state is float64 and each model call gets it cast
      to the model's dtype; the result is returned in ``noise``'s dtype.
    - ``x ← x + (t_next − t_cur)·d``; with ``heun=True`` every step but the last also evaluates d′ at
      (x_next, t_next) and takes ``x ← x + dt·(d + d′)/2``.
    - Guidance (``mode``, ``scale`` = λ = official ``cfg_scale − 1``, ``weak_budget``: see ``guided_velocity``)
      is on only when ``scale > 0`` and ``low <= t_cur <= high`` for ``guidance_interval=(low, high)``
      (inclusive; t_cur is the time at the start of the step, and decides both evaluations of a Heun step).
      Outside the interval a step is one conditional pass at the step's budget.

    ``budget``: None (J_max in every mode), an int, or one int per sample (latents per group).
    ``budget_schedule`` overrides it per step: a sequence of ``steps`` budgets or a callable ``step -> budget``.
    ``graphed``: replay each forward from a CUDA graph captured once per budget signature
    (``elit_kernels.models.capture``; a run keeps one or two signatures: guided and, outside the guidance
    interval, unguided). On a CPU, or where capture fails, it warns once and runs eagerly. A ``GraphedForward``
    passed as ``model`` is used as it is (its graphs then outlive the call).
    Raises ValueError naming ``steps``, ``budget_schedule``, ``mode``, ``scale`` or ``guidance_interval``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"mode: expected one of {GUIDANCE_MODES}, got {mode!r}")
    if not scale >= 0:
        raise ValueError(f"scale: expected λ >= 0 (the official cfg_scale − 1), got {scale!r}")
    low, high = _check_interval(guidance_interval)
    if budget_schedule is None:
        schedule = lambda i: budget  # noqa: E731
    elif callable(budget_schedule):
        schedule = budget_schedule
    else:
        if len(budget_schedule) != steps:
            raise ValueError(f"budget_schedule: expected {steps} budgets (one per step), got {len(budget_schedule)}")
        schedule = budget_schedule.__getitem__
    if graphed:
        from .models.capture import GraphedForward

        if not isinstance(model, GraphedForward):
            model = GraphedForward(model)
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    mdt = _model_dtype(model)
    x = noise.to(torch.float64)
    b = x.shape[0]
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling", leave=False)

    def velocity(xs, t, guided, bud):
        tt = torch.full((b,), float(t), device=xs.device, dtype=torch.float32)
        return guided_velocity(model, xs.to(mdt), tt, y, bud, mode=mode if guided else "none", scale=scale,
                               weak_budget=weak_budget, dtype=torch.float64)

    with torch.no_grad():
        for i in it:
            t_cur, t_next = ts[i].item(), ts[i + 1].item()
            guided = mode != "none" and scale > 0 and low <= t_cur <= high
            bud = schedule(i)
            d = velocity(x, t_cur, guided, bud)
            x_next = x + (t_next - t_cur) * d
            if heun and i < steps - 1:
                d2 = velocity(x_next, t_next, guided, bud)
                x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d2)
            x = x_next
    return x.to(noise.dtype)
