"""Rectified flow for ELIT: the training loss with tail dropping, and samplers with CFG / AutoGuidance / CCFG.

Convention (the paper's): ``x_t = (1 - t) * x0 + t * noise``, the model predicts the velocity
``noise - x0``; sampling integrates from t = 1 (noise) to t = 0 (data).

Every bad argument raises TypeError or ValueError whose message starts with the argument's name. The checks run
once per call on Python values and tensor metadata (never on a device tensor's values: no host sync; a tensor
given for what is used on the host, ``euler_sample``'s ``guidance_interval`` or ``[steps]`` ``budget_schedule``, is
read once).
"""
from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from typing import Callable

import torch
import torch.nn.functional as F

from ._types import check_bool, first_few, is_int, is_int_array, is_real
from .layout import normalize_budgets


# --- argument checks, shared with elit_kernels.sample (which turns them into UsageError) ---------------------
def _check_int(name: str, v, lo: int, hi: int | None = None) -> int:
    """``v`` as a Python int in [lo, hi] (a NumPy integer is one, a bool is not); ValueError naming ``name``
    otherwise."""
    if not is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: expected an int {rng}, got {v!r}")
    return int(v)


def _check_real(name: str, v, lo: float | None = None, what: str = "") -> float:
    """``v`` as a finite Python float >= ``lo``: TypeError for a non-real (bool, str, None, complex, tensor),
    ValueError for NaN, ±inf or a value below ``lo``; both name ``name``. ``what`` is added to the message."""
    want = f"a finite real number{'' if lo is None else f' >= {lo:g}'}{what}"
    if not is_real(v):
        raise TypeError(f"{name}: expected {want}, got {type(v).__name__} ({v!r})")
    f = float(v)
    if not math.isfinite(f) or (lo is not None and f < lo):
        raise ValueError(f"{name}: expected {want}, got {v!r}")
    return f


def _check_bool(name: str, v) -> bool:
    """A flag must be a bool or NumPy's bool (``"no"`` or 1 would be read as true), returned as a Python bool;
    TypeError naming ``name`` otherwise (``_types.check_bool``)."""
    return check_bool(name, v)


def _check_tensor(name: str, v, *, floating: bool = False, what: str = "") -> torch.Tensor:
    """``v`` must be a torch.Tensor (a floating-point one with ``floating``); TypeError naming ``name``."""
    kind = "a floating-point tensor" if floating else "a tensor"
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected {kind}{what}, got {type(v).__name__}")
    if floating and not v.dtype.is_floating_point:
        raise TypeError(f"{name}: expected {kind}{what}, got {v.dtype} (an integer, bool or complex tensor would be "
                        "truncated or refused by the model: convert it with .float())")
    return v


def _check_model(name: str, model, guided: bool = False):
    """The velocity model: callable ``model(x, t, y, budgets)``; a guided sampler also needs ``null_class`` and
    ``cfg.latents_per_group`` (ElitDiT, PlainDiT, GraphedForward)."""
    if not callable(model):
        raise TypeError(f"{name}: expected a velocity model called as model(x, t, y, budgets) (e.g. ElitDiT), got "
                        f"{type(model).__name__}")
    if guided and (not hasattr(model, "null_class") or
                   not hasattr(getattr(model, "cfg", None), "latents_per_group")):
        raise TypeError(f"{name}: guidance needs a class-conditional model with null_class and cfg.latents_per_group "
                        f"(ElitDiT, PlainDiT), got {type(model).__name__}")
    return model


def _j_max(model) -> int:
    """J_max of ``model`` for the budget range check (no bound for a model without ``cfg.latents_per_group``)."""
    j = getattr(getattr(model, "cfg", None), "latents_per_group", None)
    return j if isinstance(j, int) else sys.maxsize


_BUDGET_KINDS = ("None (J_max), an int, a sequence of ints (one per sample), a 1-D integer tensor or NumPy "
                 "array")


def _check_budget(name: str, budget, b: int, j_max: int, where: str = ""):
    """A budget argument as the model takes it (``layout.normalize_budgets``: None, an int, a sequence of ints, a
    1-D integer tensor or NumPy array of ``b``, each in [0, j_max]), refused naming ``name``; returned as Python
    values: an int as an int, a sequence or NumPy array as a list of ints, None as None. A tensor is returned as
    given, its values on its device (its dtype and length are checked here, its values by the model): no host
    sync."""
    if budget is None:
        return None
    if isinstance(budget, torch.Tensor):
        if budget.dim() != 1 or not _is_int_dtype(budget.dtype):
            raise TypeError(f"{name}: {where}expected {_BUDGET_KINDS}, got a {budget.dtype} tensor of shape "
                            f"{tuple(budget.shape)}")
        if budget.shape[0] != b:
            raise ValueError(f"{name}: {where}expected {b} budgets (one per sample), got {budget.shape[0]}")
        return budget
    if isinstance(budget, (str, bytes)) or not (is_int(budget) or isinstance(budget, Sequence) or
                                                 is_int_array(budget)):
        raise TypeError(f"{name}: {where}expected {_BUDGET_KINDS}, got {type(budget).__name__} ({budget!r}); "
                        "elit_kernels.official.latents_for_budget converts the official float budgets")
    try:
        per_sample = normalize_budgets(budget, b, j_max)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {where}{str(e).split(': ', 1)[-1]}") from None
    return int(budget) if is_int(budget) else per_sample


def _is_int_dtype(dt: torch.dtype) -> bool:
    return not (dt.is_floating_point or dt.is_complex or dt == torch.bool)


_MAX_DRAW = 2**63 - 2  # torch.randint's exclusive high (j_max + 1) is an int64


def _check_range(name: str, lo: int, hi: int) -> tuple[int, int]:
    if not (is_int(lo) and is_int(hi)) or not 0 <= lo <= hi <= _MAX_DRAW:
        raise ValueError(f"{name}: expected ints 0 <= j_min <= j_max <= 2**63 - 2, got j_min={lo!r}, j_max={hi!r}")
    return int(lo), int(hi)


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected None or a torch.Generator, got {type(generator).__name__}")


def sample_budgets(batch: int, j_min: int, j_max: int, *, per_sample: bool = False,
                   generator: torch.Generator | None = None) -> list[int]:
    """Tail dropping: J̃ ~ Uniform{j_min..j_max}, once for the batch (the paper) or per sample (ours).

    ``batch``: an int >= 0; ``j_min``/``j_max``: ints with 0 <= j_min <= j_max <= 2**63 - 2; ``per_sample``: a bool;
    ``generator``: None or a CPU torch.Generator. Returns ``batch`` Python ints. Raises ValueError naming
    ``batch`` or ``j_min``, TypeError naming ``per_sample`` or ``generator``.
    """
    batch = _check_int("batch", batch, 0)
    j_min, j_max = _check_range("j_min", j_min, j_max)
    per_sample = _check_bool("per_sample", per_sample)
    _check_generator(generator)
    n = batch if per_sample else 1
    draws = torch.randint(j_min, j_max + 1, (n,), generator=generator).tolist()
    return draws if per_sample else draws * batch


def logit_normal(batch: int, *, mean: float = 0.0, std: float = 1.0, generator=None, device="cpu") -> torch.Tensor:
    """t = sigmoid(N(mean, std²)) — the logit-normal timestep distribution: ``batch`` (int >= 0) float32 times
    on ``device``. ``mean``: a finite real; ``std``: a finite real >= 0; ``generator``: None or a CPU
    torch.Generator. Raises ValueError / TypeError naming ``batch``, ``mean``, ``std`` or ``generator``."""
    batch = _check_int("batch", batch, 0)
    mean = _check_real("mean", mean)
    std = _check_real("std", std, 0)
    _check_generator(generator)
    return torch.sigmoid(torch.randn(batch, generator=generator) * std + mean).to(device)


def rectified_flow_loss(model, x0: torch.Tensor, y: torch.Tensor, budgets=None, *, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean squared error between ``model(x_t, t, y, budgets)`` and the velocity ``noise - x0``.

    ``x0``: a floating-point tensor ``[B, ...]``, B >= 1; ``y``: the class ids, a tensor ``[B]`` (values checked by the
    model); the model must return a velocity of x0's shape (ValueError naming ``model`` otherwise);
    ``budgets``: as the model takes them (checked by the model). ``t``: None (logit-normal draws) or a
    floating-point tensor of shape ``[B]``; ``noise``: None (standard normal) or a tensor of x0's shape, dtype
    and device (both drawn from ``generator``, None or a CPU torch.Generator).

    Returns a 0-dim tensor: float64 for a float64 ``x0``, float32 otherwise (fp16/bf16/fp32 ``x0``; the model's
    output and the target are cast to it before the mean). Raises TypeError / ValueError naming ``model``, ``x0``,
    ``y``, ``t``, ``noise`` or ``generator``; what the model checks of its ``x`` (x_t, of x0's shape, dtype and
    device: e.g. a dtype other than the model's) is raised naming ``x0``, and of ``t``, ``y`` and ``budgets``
    naming them.
    """
    _check_model("model", model)
    _check_tensor("x0", x0, floating=True, what=" [B, ...] of clean latents")
    if x0.dim() < 1:
        raise ValueError("x0: expected a tensor [B, ...] with a batch dimension, got a 0-dim tensor")
    if x0.shape[0] == 0:
        raise ValueError(f"x0: expected at least one sample (the loss is a mean over the batch), got shape "
                         f"{tuple(x0.shape)}")
    b = x0.shape[0]
    _check_y(y, b)
    _check_generator(generator)
    if t is None:
        t = logit_normal(b, generator=generator, device=x0.device)
    else:
        _check_tensor("t", t, floating=True, what=f" of times of shape [B] = ({b},)")
        if tuple(t.shape) != (b,):
            raise ValueError(f"t: expected one time per sample, shape ({b},), got {tuple(t.shape)}")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator).to(x0)
    else:
        _check_tensor("noise", noise, floating=True, what=f" of x0's shape {tuple(x0.shape)}")
    if noise.shape != x0.shape:
        raise ValueError(f"noise: expected shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    if noise.dtype != x0.dtype or noise.device != x0.device:
        raise ValueError(f"noise: expected x0's dtype and device ({x0.dtype}, {x0.device}), got {noise.dtype}, "
                         f"{noise.device}")
    tt = t.to(x0.dtype).view(b, *([1] * (x0.dim() - 1)))
    xt = (1 - tt) * x0 + tt * noise
    try:
        v = _call(model, xt, t, y, budgets)
    except (TypeError, ValueError) as e:
        # The model checks its x, here x_t = (1 - t)·x0 + t·noise: x0's shape, dtype and device. Its errors name
        # x; this function's argument is x0.
        msg = str(e)
        if type(e) not in (TypeError, ValueError) or not msg.startswith("x: "):
            raise
        raise type(e)(f"x0: {msg[3:]} (the model's x is x_t = (1 - t)·x0 + t·noise, of x0's shape, dtype and "
                      "device)") from None
    dt = torch.promote_types(x0.dtype, torch.float32)  # float32 for fp16/bf16/fp32, float64 for float64
    return F.mse_loss(v.to(dt), (noise - x0).to(dt))


GUIDANCE_MODES = ("none", "cfg", "autoguidance", "ccfg", "ccfg_two_pass")
#: the modes with a weak pass at its own budget (``weak_budget``); ``cfg`` uses ``budget`` for both halves
WEAK_MODES = ("autoguidance", "ccfg", "ccfg_two_pass")
_SCALE = " (λ = the official cfg_scale − 1)"


def _check_guidance(mode, scale, weak_budget) -> float:
    """``mode``, ``scale`` and ``weak_budget`` together, as elit-sample's rules: a scale > 0 needs a mode, a
    weak budget needs a mode with a weak pass and a scale > 0 (at scale 0 no weak pass runs). Returns scale as a
    float."""
    if not isinstance(mode, str) or mode not in GUIDANCE_MODES:
        raise ValueError(f"mode: expected one of {GUIDANCE_MODES}, got {mode!r}")
    scale = _check_real("scale", scale, 0, _SCALE)
    if mode == "none" and scale != 0:
        raise ValueError(f"mode: scale {scale:g} needs a guidance mode (cfg, autoguidance, ccfg, ccfg_two_pass); "
                         "with mode 'none' it would be ignored")
    if weak_budget is not None and mode not in WEAK_MODES:
        raise ValueError(f"weak_budget: only {', '.join(WEAK_MODES)} use a weak budget; mode is {mode!r} (it would "
                         "be ignored)")
    if weak_budget is not None and scale == 0:
        raise ValueError(f"weak_budget: scale is 0, so mode {mode!r} runs no weak pass (one conditional pass) and "
                         "the weak budget would be ignored; pass weak_budget=None, or a scale > 0")
    return scale


def _check_dtype(dtype) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected None (x's dtype) or a floating-point torch.dtype such as torch.float64, "
                        f"got {dtype!r}")


def _check_t(t, b: int, device) -> torch.Tensor:
    """``t`` of ``guided_velocity`` as a ``[b]`` tensor: a Python real (float32 on ``device``), a 0-dim tensor
    (expanded) or a ``[b]`` floating-point tensor."""
    if is_real(t):
        return torch.full((b,), float(t), dtype=torch.float32, device=device)
    _check_tensor("t", t, floating=True, what=f" of times of shape [B] = ({b},), a 0-dim one or a float")
    if t.dim() == 0:
        return t.expand(b)
    if tuple(t.shape) != (b,):
        raise ValueError(f"t: expected one time per sample, shape ({b},), or a 0-dim tensor, got {tuple(t.shape)}")
    return t


def _check_y(y, b: int) -> None:
    """``y`` a tensor of ``b`` class ids ``[b]`` (a model that is not ours may not check it, and a y of another
    length would broadcast or be cut); TypeError / ValueError naming ``y``."""
    _check_tensor("y", y, what=" of class ids [B]")
    if tuple(y.shape) != (b,):
        raise ValueError(f"y: expected one class id per sample, shape ({b},), got {tuple(y.shape)}")


def _call(model, x, t, y, budget) -> torch.Tensor:
    """``model(x, t, y, budget)``, checked to be a velocity of ``x``'s shape: a model that is not ours returning
    another shape would otherwise broadcast into the state silently. ValueError / TypeError naming ``model``."""
    v = model(x, t, y, budget)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"model: expected it to return the velocity, a tensor of x's shape {tuple(x.shape)}, got "
                        f"{type(v).__name__}")
    if v.shape != x.shape:
        raise ValueError(f"model: returned a velocity of shape {tuple(v.shape)}, expected x's shape {tuple(x.shape)}")
    return v


def _per_sample(budget, b: int, j_max: int) -> list:
    """A budget argument (None = J_max, an int, or one per sample; already checked) as one int per sample."""
    if budget is None:
        return [j_max] * b
    if isinstance(budget, int):
        return [budget] * b
    if isinstance(budget, torch.Tensor):
        budget = budget.tolist()
    return list(budget)


def _input_shape(model) -> tuple[int, int, int] | None:
    """``(C, H, W)`` the model takes (``cfg.in_channels``, ``cfg.input_size``), or None for a model without them."""
    cfg = getattr(model, "cfg", None)
    c, s = getattr(cfg, "in_channels", None), getattr(cfg, "input_size", None)
    return (c, s, s) if isinstance(c, int) and isinstance(s, int) else None


def _model_dtype(model) -> torch.dtype:
    params = getattr(model, "parameters", None)
    p = next(iter(params()), None) if callable(params) else None
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

    Arguments:
        model: called as ``model(x, t, y, budgets)``; a guided mode with ``scale > 0`` needs ``null_class`` and
            ``cfg.latents_per_group`` (``ElitDiT``; ``PlainDiT`` for ``none`` and ``cfg`` with budget None).
        x: a floating-point tensor ``[B, ...]``. t: a Python float, a 0-dim tensor (both used for every sample)
            or a floating-point tensor ``[B]``. y: class ids, a tensor ``[B]`` (checked by the model).
        mode: one of ``GUIDANCE_MODES``. scale: λ = the official ``cfg_scale − 1``, a finite real >= 0; a
            nonzero scale needs a mode other than ``none``.
        budget / weak_budget: None (J_max / max(1, J_max // 16), the official default 1/16), an int, a sequence
            of ints or a 1-D integer tensor or NumPy array (one per sample), each in [0, J_max] (latents per group,
            ints: ``elit_kernels.official.latents_for_budget`` converts the official float budgets).
            ``weak_budget`` only with ``autoguidance``, ``ccfg`` or ``ccfg_two_pass`` and a scale > 0 (scale 0 runs
            no weak pass).
        dtype: None (x's dtype) or a floating-point torch.dtype: the passes are cast to it before they are
            combined, and the result has it.

    Raises TypeError / ValueError naming ``model``, ``x``, ``t``, ``y``, ``mode``, ``scale``, ``budget``,
    ``weak_budget`` or ``dtype`` (the model itself names what it checks on values, e.g. ``budgets``, ``t``).
    """
    scale = _check_guidance(mode, scale, weak_budget)
    _check_model("model", model, guided=mode != "none" and scale > 0)
    _check_tensor("x", x, floating=True, what=" [B, ...]")
    if x.dim() < 1:
        raise ValueError("x: expected a tensor [B, ...] with a batch dimension, got a 0-dim tensor")
    b = x.shape[0]
    t = _check_t(t, b, x.device)
    _check_y(y, b)
    _check_dtype(dtype)
    j_max = _j_max(model)
    budget = _check_budget("budget", budget, b, j_max)
    weak_budget = _check_budget("weak_budget", weak_budget, b, j_max)
    return _velocity(model, x, t, y, budget, mode, scale, weak_budget, dtype or x.dtype)


def _velocity(model, x, t, y, budget, mode: str, scale: float, weak_budget, dtype: torch.dtype):
    """``guided_velocity`` on checked arguments (``t`` a ``[B]`` tensor): the sampler's per-step call."""
    b = x.shape[0]
    if mode == "none" or scale == 0.0:
        return _call(model, x, t, y, budget).to(dtype)
    null = torch.full_like(y, model.null_class)
    j_max = model.cfg.latents_per_group  # a PlainDiT refuses any budget but None itself, naming `budgets`
    if mode != "cfg" and weak_budget is None:
        weak_budget = max(1, j_max // 16)
    xx, tt = torch.cat([x, x]), torch.cat([t, t])
    if mode == "cfg":
        # Same budget for both halves: one batch of 2B is the standard way to run CFG.
        bud = None if budget is None else _per_sample(budget, b, j_max) * 2
        cond, weak = _call(model, xx, tt, torch.cat([y, null]), bud).chunk(2)
    elif mode == "autoguidance":
        bud = _per_sample(budget, b, j_max) + _per_sample(weak_budget, b, j_max)
        cond, weak = _call(model, xx, tt, torch.cat([y, y]), bud).chunk(2)
    elif mode == "ccfg":
        bud = _per_sample(budget, b, j_max) + _per_sample(weak_budget, b, j_max)
        cond, weak = _call(model, xx, tt, torch.cat([y, null]), bud).chunk(2)
    else:  # ccfg_two_pass
        cond = _call(model, x, t, y, budget)
        weak = _call(model, x, t, null, weak_budget)
    cond, weak = cond.to(dtype), weak.to(dtype)
    return weak + (scale + 1.0) * (cond - weak)


_INTERVAL_KINDS = ("a pair (low, high) of real times with 0 <= low <= high <= 1: a sequence of two reals (a tuple or "
                   "list), or a 1-D real tensor or NumPy array of two")


def _check_interval(guidance_interval) -> tuple[float, float]:
    """(low, high) guidance times with 0 <= low <= high <= 1, from a sequence of two reals (a tuple, a list: not a
    str, "01" is not (0, 1)) or a 1-D integer or floating tensor or NumPy array of two (read on the host once);
    ValueError naming ``guidance_interval`` for anything else: a dict (its keys) or a set (no order) is not a
    pair, a bool or a tensor is not a real."""
    g = guidance_interval
    what = f"{type(g).__name__} ({g!r})"
    if isinstance(g, torch.Tensor):
        what = f"a {g.dtype} tensor of shape {tuple(g.shape)}"
        if g.dim() == 1 and len(g) == 2 and (g.dtype.is_floating_point or _is_int_dtype(g.dtype)):
            g = g.tolist()
    elif type(g).__module__ == "numpy" and hasattr(g, "ndim") and hasattr(g, "tolist"):  # an ndarray
        what = f"a NumPy {g.dtype} array of shape {g.shape}"
        if g.ndim == 1 and len(g) == 2 and getattr(g.dtype, "kind", None) in ("f", "i", "u"):
            g = g.tolist()
    ok = isinstance(g, Sequence) and not isinstance(g, (str, bytes)) and len(g) == 2 and all(map(is_real, g))
    if not ok:
        raise ValueError(f"guidance_interval: expected {_INTERVAL_KINDS}, got {what}")
    low, high = float(g[0]), float(g[1])
    if not 0.0 <= low <= high <= 1.0:  # NaN fails every comparison
        raise ValueError(f"guidance_interval: expected 0 <= low <= high <= 1, got {guidance_interval!r}")
    return low, high


#: the most steps ``euler_sample`` takes: at least one forward each, so a million is days of a GPU's time; the float64
#: times ``[steps + 1]`` (8 MB at the bound) are allocated before the first step, and a typo such as 2**40 is named
#: here instead of failing the allocation
MAX_STEPS = 1_000_000


class NonFiniteSampleWarning(RuntimeWarning):
    """``euler_sample`` returned samples holding NaN or inf (``nonfinite_samples`` names them)."""


def nonfinite_samples(x: torch.Tensor) -> list[int]:
    """Indices along dim 0 of the samples of ``x`` (a tensor ``[B, ...]``) holding a NaN or an inf: one device read.
    TypeError naming ``x`` for anything but a tensor, ValueError for a 0-dim one (no samples to name)."""
    _check_tensor("x", x, what=" [B, ...]")
    if x.dim() == 0:
        raise ValueError("x: expected a tensor [B, ...] with a batch dimension, got a 0-dim tensor")
    if x.numel() == 0:
        return []
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    return bad.nonzero().flatten().tolist()


def _nonfinite_message(bad: list[int], b: int, in_state: bool, guided_scale: float, model_dtype: torch.dtype,
                       out_dtype: torch.dtype) -> str:
    """What ``euler_sample`` says of samples ``bad`` (of ``b``) that came out NaN or inf: ``in_state``, already in
    the float64 state (the model's outputs or guidance), else only when cast to ``out_dtype`` (noise's dtype);
    ``guided_scale``: the scale of the guided steps, 0 when no step was guided."""
    shown = first_few(bad)
    head = f"euler_sample: {len(bad)} of {b} samples hold NaN or inf (sample{'s' if len(bad) > 1 else ''} {shown}); "
    if not in_state:
        return head + (f"the float64 state is finite, but outside {out_dtype}'s range, the dtype of noise that the "
                       f"result takes: pass noise in a wider dtype (e.g. noise.float())")
    why = "the model returned NaN or inf"
    if guided_scale > 0:
        why = (f"guidance multiplies the difference of two velocities by scale = {guided_scale:g}: a scale too large "
               f"for {model_dtype} makes the state outgrow it (a smaller scale keeps it finite), or {why}")
    return head + why + " (a model in float16 overflows sooner than in bfloat16 or float32)"


def euler_sample(model, noise: torch.Tensor, y: torch.Tensor, *, steps: int = 32, budget=None,
                 budget_schedule: Sequence | Callable[[int], object] | None = None, mode: str = "none",
                 scale: float = 0.0, weak_budget=None, guidance_interval=(0.0, 1.0), heun: bool = False,
                 progress: bool = False, graphed: bool = False, callback: Callable[[int], object] | None = None
                 ) -> torch.Tensor:
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

    Arguments:
        model: as ``guided_velocity``'s. noise: a floating-point tensor ``[B, C, H, W]`` (integer or bool noise
            is refused: the result takes noise's dtype). y: class ids, a tensor ``[B]``. steps: an int in
            [1, ``MAX_STEPS``] (10**6).
        mode / scale / weak_budget: as ``guided_velocity`` (scale a finite real >= 0; a nonzero scale needs a
            mode; weak_budget only with autoguidance, ccfg or ccfg_two_pass, and a scale > 0).
        budget: None (J_max in every mode), an int, or one int per sample (latents per group; as
            ``guided_velocity``). budget_schedule: instead of ``budget`` (not with it), a sequence of ``steps``
            budgets (a list; a ``[steps]`` integer tensor, read on the host once; a ``[steps, B]`` one) or a
            callable ``step -> budget`` (its results are checked at each step).
        guidance_interval: a pair (low, high) of reals with 0 <= low <= high <= 1: a sequence of two (a tuple or a
            list; not a str, a dict or a set), or a 1-D integer or floating tensor or NumPy array of two (read on the
            host once). Other than the default (0.0, 1.0) only with a guided mode and a scale > 0 (it would be
            ignored).
        heun / progress / graphed: bools (NumPy's bool is one). ``progress`` shows a tqdm bar. ``graphed``: replay
            each forward from a CUDA graph captured once per budget signature (``elit_kernels.models.capture``; a
            run keeps one or two signatures: guided and, outside the guidance interval, unguided). On a CPU, or
            where capture fails, it warns once and runs eagerly. A ``GraphedForward`` passed as ``model`` is used as
            it is (its graphs then outlive the call); any other model must be an ``ElitDiT`` (a layout to capture:
            TypeError naming ``model`` otherwise).
        callback: None, or a callable called after each step with the step's index (0 .. steps - 1), on the host
            (its result is ignored; it reads nothing from the device, so on a GPU it runs as the step is queued):
            progress reporting for a caller that draws its own bar (``elit-sample`` does).

    Raises TypeError / ValueError naming ``model``, ``noise``, ``y``, ``steps``, ``budget``, ``budget_schedule``,
    ``mode``, ``scale``, ``weak_budget``, ``guidance_interval``, ``heun``, ``progress``, ``graphed`` or ``callback``;
    the checks run once per call (a callable schedule's result once per step), on Python values and tensor metadata
    only (a ``[steps]`` tensor ``budget_schedule`` and a tensor ``guidance_interval`` are read on the host once,
    before the first step). Warns ``NonFiniteSampleWarning`` naming the samples when the result holds NaN or inf (a
    guidance scale too large for the dtype, a model that overflows): one read of the result on the host, after the
    last step.
    """
    if not is_int(steps) or not 1 <= steps <= MAX_STEPS:  # named before the times [steps + 1] are allocated
        raise ValueError(f"steps: expected a positive int <= {MAX_STEPS:,} (flow.MAX_STEPS), got {steps!r}")
    steps = int(steps)
    scale = _check_guidance(mode, scale, weak_budget)
    low, high = _check_interval(guidance_interval)
    if (mode == "none" or scale == 0) and (low, high) != (0.0, 1.0):
        raise ValueError(f"guidance_interval: mode {mode!r} at scale {scale:g} guides no step, so the interval "
                         f"{(low, high)} would be ignored; leave the default (0.0, 1.0), or pass a guided mode and a "
                         "scale > 0")
    heun, progress, graphed = (_check_bool(name, flag) for name, flag in
                               (("heun", heun), ("progress", progress), ("graphed", graphed)))
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected None or a callable step -> None, got {type(callback).__name__} "
                        f"({callback!r})")
    _check_model("model", model, guided=mode != "none" and scale > 0)
    _check_tensor("noise", noise, floating=True, what=" [B, C, H, W] (the result takes its dtype)")
    if noise.dim() < 1:
        raise ValueError("noise: expected a tensor [B, C, H, W] with a batch dimension, got a 0-dim tensor")
    chw = _input_shape(model)
    if chw is not None and tuple(noise.shape[1:]) != chw:  # named here, not as the model's x at the first step
        raise ValueError(f"noise: expected [B, {chw[0]}, {chw[1]}, {chw[2]}] (the model's in_channels and "
                         f"input_size), got {tuple(noise.shape)}")
    b, j_max = noise.shape[0], _j_max(model)
    _check_y(y, b)
    weak_budget = _check_budget("weak_budget", weak_budget, b, j_max)
    if is_int_array(budget_schedule):  # NumPy: [steps] or [steps, B], as the lists it holds
        budget_schedule = budget_schedule.tolist()
    if isinstance(budget_schedule, torch.Tensor) and budget_schedule.dim() == 1:
        # one budget (every sample's) per step: read on the host once, before the loop, as a list of ints (a
        # [steps, B] tensor stays where it is: each step hands the model one row)
        if not _is_int_dtype(budget_schedule.dtype):
            raise TypeError(f"budget_schedule: expected an integer tensor of {steps} budgets (one per step), got "
                            f"{budget_schedule.dtype}")
        budget_schedule = budget_schedule.tolist()
    if budget_schedule is None:
        budget = _check_budget("budget", budget, b, j_max)
        schedule = lambda i: budget  # noqa: E731
    elif budget is not None:
        raise ValueError("budget_schedule: give budget or budget_schedule, not both (the schedule would override "
                         f"budget={budget!r})")
    elif callable(budget_schedule):
        def schedule(i):
            bud = budget_schedule(i)
            return _check_budget("budget_schedule", bud, b, j_max, f"step {i} returned {bud!r}: ")
    elif (isinstance(budget_schedule, Sequence) and not isinstance(budget_schedule, (str, bytes))) or \
            (isinstance(budget_schedule, torch.Tensor) and budget_schedule.dim() >= 2):
        if len(budget_schedule) != steps:
            raise ValueError(f"budget_schedule: expected {steps} budgets (one per step), got {len(budget_schedule)}")
        checked = [_check_budget("budget_schedule", budget_schedule[i], b, j_max, f"step {i}: ")
                   for i in range(steps)]
        schedule = checked.__getitem__
    else:
        raise TypeError(f"budget_schedule: expected None, a sequence of {steps} budgets (one per step) or a callable "
                        f"step -> budget, got {type(budget_schedule).__name__} ({budget_schedule!r})")
    if graphed:
        from .models.capture import GraphedForward

        if not isinstance(model, GraphedForward):
            model = GraphedForward(model)
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    mdt = _model_dtype(model)
    x = noise.to(torch.float64)
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling", leave=False)

    def velocity(xs, t, guided, bud):
        tt = torch.full((b,), float(t), device=xs.device, dtype=torch.float32)
        return _velocity(model, xs.to(mdt), tt, y, bud, mode if guided else "none", scale,
                         weak_budget if guided else None, torch.float64)

    any_guided = False
    with torch.no_grad():
        for i in it:
            t_cur, t_next = ts[i].item(), ts[i + 1].item()
            guided = mode != "none" and scale > 0 and low <= t_cur <= high
            any_guided |= guided
            bud = schedule(i)
            d = velocity(x, t_cur, guided, bud)
            x_next = x + (t_next - t_cur) * d
            if heun and i < steps - 1:
                d2 = velocity(x_next, t_next, guided, bud)
                x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d2)
            x = x_next
            if callback is not None:
                callback(i)
    out = x.to(noise.dtype)
    bad = nonfinite_samples(out)
    if bad:
        in_state = bool(nonfinite_samples(x[bad]))
        warnings.warn(_nonfinite_message(bad, b, in_state, scale if any_guided else 0.0, mdt, noise.dtype),
                      NonFiniteSampleWarning, stacklevel=2)
    return out
