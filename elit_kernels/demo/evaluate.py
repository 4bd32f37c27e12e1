"""Evaluation for the demo: held-out loss at every budget, a sample grid over budgets, the figures.

The held-out loss uses one fixed draw of (t, noise) per held-out image (``reps`` draws each), the same
draw for every budget, so the loss-vs-budget curve compares budgets and nothing else.
"""
from __future__ import annotations

import torch

from .._cli import write_output
from ..flow import euler_sample, logit_normal, rectified_flow_loss


@torch.no_grad()
def heldout_loss_by_budget(model, x: torch.Tensor, y: torch.Tensor, budgets, *, reps: int = 4, seed: int = 1234,
                           chunk: int = 512) -> dict[int, float]:
    """Mean rectified-flow loss on ``x``/``y`` (each image ``reps`` times) at each budget in ``budgets``."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = x.repeat(reps, 1, 1, 1), y.repeat(reps)
    n = xs.shape[0]
    t = logit_normal(n, generator=g)
    noise = torch.randn(xs.shape, generator=g)
    model.eval()
    out = {}
    for b in budgets:
        total = 0.0
        for i in range(0, n, chunk):
            sl = slice(i, i + chunk)
            m = xs[sl].shape[0]
            total += rectified_flow_loss(model, xs[sl], ys[sl], int(b), t=t[sl], noise=noise[sl]).item() * m
        out[int(b)] = total / n
    return out


def grid_budgets(j_min: int, j_max: int) -> list[int]:
    """Rows of the sample grid: j_min, the powers of two in between, and j_max."""
    rows = {j_min, j_max}
    p = 1
    while p < j_max:
        if p >= j_min:
            rows.add(p)
        p *= 2
    return sorted(rows)


@torch.no_grad()
def sample_grid(model, budgets, classes, *, steps: int = 32, seed: int = 4321, guidance: float = 0.0) -> torch.Tensor:
    """``[len(budgets), len(classes), C, H, W]`` samples; column c uses the same noise and class at every budget."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(classes), cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    y = torch.as_tensor(list(classes), dtype=torch.long)
    mode = "cfg" if guidance > 0 else "none"
    rows = [euler_sample(model, noise, y, steps=steps, budget=int(b), mode=mode, scale=guidance) for b in budgets]
    return torch.stack(rows)


def _mosaic(rows: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """``[R, C, 1, H, W]`` in [-1, 1] -> one ``[R*(H+pad)+pad, C*(W+pad)+pad]`` image in [0, 1]."""
    r, c, _, h, w = rows.shape
    img = torch.zeros(r * (h + pad) + pad, c * (w + pad) + pad)  # paper-white gaps once inverted
    for i in range(r):
        for j in range(c):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            img[y0:y0 + h, x0:x0 + w] = ((rows[i, j, 0] + 1) / 2).clamp(0, 1)
    return img


def write_grid_png(path: str, samples: torch.Tensor, budgets, groups: int, classes, data_row: torch.Tensor | None = None,
                   title: str = "") -> None:
    """Sample grid: one row per budget (plus an optional row of held-out data on top), one column per class. Written
    whole or not at all; ``_cli.OutputWriteError`` naming ``path`` when it cannot be."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no display needed

    labels = [f"J̃={b} (K={groups * b})" for b in budgets]
    rows = samples
    if data_row is not None:
        rows = torch.cat([data_row.unsqueeze(0), samples])
        labels = ["held-out data"] + labels
    img = _mosaic(rows)
    hh, ww = rows.shape[3], rows.shape[4]  # cell i spans pad + i*(hh+pad) .. + hh-1 (pad = 2)
    fig = Figure(figsize=(1.0 + 0.55 * rows.shape[1], 0.4 + 0.55 * rows.shape[0]), dpi=100)
    ax = fig.subplots()
    ax.imshow((1.0 - img).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")  # dark ink on white paper
    ax.set_yticks([2 + (hh + 2) * i + (hh - 1) / 2 for i in range(rows.shape[0])], labels, fontsize=8)
    ax.set_xticks([2 + (ww + 2) * j + (ww - 1) / 2 for j in range(rows.shape[1])], [str(c) for c in classes], fontsize=8)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    write_output(path, lambda tmp: fig.savefig(tmp, format="png"))  # whole or not at all


def write_loss_png(path: str, loss_by_budget: dict[int, float], j_min: int | None, groups: int, title: str = "") -> None:
    """Held-out loss against the budget J̃, with the training range ``j_min``..J_max shaded (the trained one, not the
    evaluated one; None: not known, nothing shaded). Written whole or not at all; ``_cli.OutputWriteError`` naming
    ``path`` when it cannot be."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no display needed

    bs = sorted(loss_by_budget)
    fig = Figure(figsize=(5.0, 3.2), dpi=100)
    ax = fig.subplots()
    if j_min is not None:
        ax.axvspan(j_min - 0.5, max(bs) + 0.5, color="tab:blue", alpha=0.07, lw=0,
                   label=f"trained budgets {j_min}..{max(bs)}")
    ax.plot(bs, [loss_by_budget[b] for b in bs], "o-", color="tab:blue", ms=4, label="held-out loss")
    ax.set_xlabel(f"latents per group J̃ (K = {groups}·J̃ latents)")
    ax.set_ylabel("held-out rectified-flow loss")
    ax.set_xticks(bs if len(bs) <= 16 else bs[:: max(1, len(bs) // 16)])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    write_output(path, lambda tmp: fig.savefig(tmp, format="png"))  # whole or not at all
