"""elit_kernels.flow against independent hand computations, with a recording fake model (fast: no network).

The fake's velocity is a known function of (x, t, y, budget), so the guidance combination, the calls each mode
makes (batches, budgets, dtypes) and the Euler / Heun integration can be recomputed here from their
definitions (docs/released_checkpoints.md §5) and compared exactly. Written against the mutation run
(benchmarks/results/mutation.md).
"""
import contextlib
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from elit_kernels.flow import (NonFiniteSampleWarning, _check_int, euler_sample, guided_velocity, logit_normal,
                               nonfinite_samples, rectified_flow_loss, sample_budgets)

J_MAX, NULL = 32, 7


class Fake(torch.nn.Module):
    """v(x, t, y, J) = a·x + t + 0.1·y + 0.01·J per sample (J = J_max for None); records every call."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.5, dtype=dtype))
        self.cfg = SimpleNamespace(latents_per_group=J_MAX)
        self.null_class = NULL
        self.calls = []

    def forward(self, x, t, y, budgets=None):
        b = x.shape[0]
        bud = [J_MAX] * b if budgets is None else ([budgets] * b if isinstance(budgets, int) else list(budgets))
        self.calls.append({"batch": b, "budgets": budgets, "dtype": x.dtype, "t_shape": tuple(t.shape), "t_dtype": t.dtype,
                           "y": y.tolist()})
        shape = (b,) + (1,) * (x.dim() - 1)
        j = torch.tensor(bud, dtype=x.dtype).view(shape)
        return (self.a.to(x.dtype) * x + t.to(x.dtype).view(shape) + 0.1 * y.to(x.dtype).view(shape) + 0.01 * j).to(
            self.a.dtype)


def v(x, t, y, j):
    """The fake's velocity by hand, float64."""
    b = x.shape[0]
    shape = (b,) + (1,) * (x.dim() - 1)
    t = torch.as_tensor(t, dtype=torch.float64).expand(b)
    jj = torch.as_tensor(j, dtype=torch.float64).expand(b) if not isinstance(j, list) else torch.tensor(j, dtype=torch.float64)
    return 0.5 * x + t.reshape(shape) + 0.1 * y.double().reshape(shape) + 0.01 * jj.reshape(shape)


def _xty(b=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # drawn in ``dtype`` itself: float64 values that float32 cannot hold, so a float32 detour shows
    return (torch.randn(b, 2, 2, 2, generator=g, dtype=dtype), torch.rand(b, generator=g), torch.tensor([1, 2, 3][:b]))


@pytest.mark.parametrize("mode", ["cfg", "autoguidance", "ccfg", "ccfg_two_pass"])
def test_guided_velocity_combination_and_calls(mode):
    x, t, y = _xty()
    m, s, budget, weak = Fake(), 0.75, [4, 8, 2], 1
    got = guided_velocity(m, x, t, y, budget, mode=mode, scale=s, weak_budget=None if mode == "cfg" else weak)
    xd = x.double()
    cond = v(xd, t, y, budget)
    weak_v = {"cfg": v(xd, t, torch.full_like(y, NULL), budget), "autoguidance": v(xd, t, y, weak),
              "ccfg": v(xd, t, torch.full_like(y, NULL), weak), "ccfg_two_pass": v(xd, t, torch.full_like(y, NULL), weak)}[mode]
    want = weak_v + (s + 1.0) * (cond - weak_v)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    calls = [(c["batch"], c["budgets"]) for c in m.calls]
    assert calls == {"cfg": [(6, budget * 2)], "autoguidance": [(6, budget + [weak] * 3)],
                     "ccfg": [(6, budget + [weak] * 3)], "ccfg_two_pass": [(3, budget), (3, weak)]}[mode]


def test_guided_velocity_defaults():
    """mode 'none' and scale 0 by default (one plain pass); the weak budget defaults to max(1, J_max // 16) as
    an int; budget None stays None for CFG; a 0-dim t is expanded to the batch; the result takes x's dtype."""
    x, t, y = _xty(dtype=torch.float64)
    m = Fake()
    out = guided_velocity(m, x, t, y, 4)
    assert [(c["batch"], c["budgets"]) for c in m.calls] == [(3, 4)] and out.dtype == torch.float64
    torch.testing.assert_close(out, v(x, t, y, 4).to(torch.float32).double())
    m.calls.clear()
    guided_velocity(m, x, t, y, 4, mode="cfg", scale=0.0)  # scale 0: guidance off, one pass
    assert len(m.calls) == 1 and m.calls[0]["batch"] == 3
    m.calls.clear()
    guided_velocity(m, x, torch.tensor(0.3), y, None, mode="ccfg", scale=1.0)
    (c,) = m.calls
    assert c["budgets"] == [J_MAX] * 3 + [2] * 3 and all(type(j) is int for j in c["budgets"])  # 32 // 16
    assert c["t_shape"] == (6,)
    m.calls.clear()
    guided_velocity(m, x, t, y, None, mode="cfg", scale=1.0)
    assert m.calls[0]["budgets"] is None and m.calls[0]["y"] == [1, 2, 3, NULL, NULL, NULL]
    m.calls.clear()
    guided_velocity(m, x, t, y, 5, mode="autoguidance", scale=1.0, weak_budget=[1, 2, 3])
    assert m.calls[0]["budgets"] == [5, 5, 5, 1, 2, 3]
    with pytest.raises(ValueError, match="^budget: expected 3 budgets"):
        guided_velocity(m, x, t, y, [1, 2], mode="ccfg", scale=1.0)


def _euler_by_hand(x, y, steps, j, heun=False, guided_at=lambda t: False, s=0.0, weak=None):
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    x = x.double()
    for i in range(steps):
        tc, tn = ts[i].item(), ts[i + 1].item()

        def vel(xs, tt):
            c = v(xs.float().double(), tt, y, j)  # the fake sees the state cast to its dtype (float32)
            c = c.float().double()
            if not guided_at(tc):
                return c
            w = v(xs.float().double(), tt, torch.full_like(y, NULL), weak).float().double()
            return w + (s + 1.0) * (c - w)
        d = vel(x, tc)
        xn = x + (tn - tc) * d
        if heun and i < steps - 1:
            xn = x + (tn - tc) * (0.5 * d + 0.5 * vel(xn, tn))
        x = xn
    return x


class NanAt(Fake):
    """The fake, whose velocity for sample ``k`` of every call is NaN."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x, t, y, budgets=None):
        out = super().forward(x, t, y, budgets)
        out[self.k] = float("nan")
        return out


def test_euler_warns_naming_the_samples_that_come_out_nan_or_inf():
    """A result holding NaN or inf is never returned silently: a guidance scale float32 cannot carry (the state
    grows as scale) and a model returning NaN for one sample are named, sample by sample; a finite run is silent."""
    x, _, y = _xty()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(euler_sample(Fake(), x, y, steps=3, mode="cfg", scale=3.0)).all()
    with pytest.warns(NonFiniteSampleWarning, match=r"^euler_sample: 3 of 3 samples hold NaN or inf \(samples 0, "
                      r"1, 2\); guidance multiplies .* by scale = 1e\+40: a scale too large for torch.float32 makes "
                      r"the state outgrow it"):
        got = euler_sample(Fake(), x, y, steps=3, mode="cfg", scale=1e40)
    assert nonfinite_samples(got) == [0, 1, 2]
    with pytest.warns(NonFiniteSampleWarning, match=r"^euler_sample: 1 of 3 samples hold NaN or inf \(sample 1\); "
                      r"the model returned NaN or inf \(a model"):
        got = euler_sample(NanAt(1), x, y, steps=2)
    assert nonfinite_samples(got) == [1] and torch.isfinite(got[[0, 2]]).all()
    # guidance on, but its interval holds no step: the guidance is not what to blame
    with pytest.warns(NonFiniteSampleWarning, match=r"\(sample 1\); the model returned NaN or inf \(a model"):
        euler_sample(NanAt(1), x, y, steps=2, mode="cfg", scale=0.5, guidance_interval=(0.0, 0.1))
    # finite in the float64 state, outside float16 (noise's dtype, which the result takes): that is the cause
    def grows(xx, tt, yy, budgets=None):  # x_next = x + 0.5 * 20 x: 6e4 (float16 holds it) -> 6.6e5 (it does not)
        return -20.0 * xx
    with pytest.warns(NonFiniteSampleWarning, match=r"3 of 3 samples .* the float64 state is finite, but outside "
                      r"torch.float16's range, the dtype of noise that the result takes: pass noise in a wider dtype"):
        euler_sample(grows, torch.full_like(x, 6e4).half(), y, steps=2)
    # ten bad samples: the first eight named, then "..." (a long batch does not make a page-long warning)
    x10 = torch.randn(10, *x.shape[1:])
    with pytest.warns(NonFiniteSampleWarning, match=r"^euler_sample: 10 of 10 samples hold NaN or inf \(samples 0, "
                      r"1, 2, 3, 4, 5, 6, 7, \.\.\.\); the model returned"):
        euler_sample(NanAt(slice(None)), x10, torch.arange(10), steps=2)
    assert nonfinite_samples(torch.tensor([[1.0, float("inf")], [0.0, 2.0]])) == [0]
    assert nonfinite_samples(torch.empty(0, 3)) == []
    with pytest.raises(TypeError, match=r"^x: expected a tensor \[B, \.\.\.\], got ndarray"):
        nonfinite_samples(np.array([np.nan]))
    with pytest.raises(ValueError, match=r"^x: expected a tensor \[B, \.\.\.\] with a batch dimension"):
        nonfinite_samples(torch.tensor(float("nan")))


@pytest.mark.parametrize("wrong", [lambda x: x[:1], lambda x: x[:, :1], lambda x: x.flatten(1), lambda x: None])
def test_a_velocity_of_another_shape_is_refused_not_broadcast(wrong):
    """A model that is not ours may return a velocity of another shape; broadcast into the state it would give
    every sample a wrong sample, silently. The samplers and the loss name it; a y of another length likewise."""
    x, t, y = _xty()

    class Wrong(Fake):
        def forward(self, xx, tt, yy, budgets=None):
            return wrong(super().forward(xx, tt, yy, budgets))
    model = Wrong()
    err = TypeError if wrong(x) is None else ValueError
    for call in (lambda: euler_sample(model, x, y, steps=1), lambda: guided_velocity(model, x, t, y),
                 lambda: guided_velocity(model, x, t, y, mode="ccfg_two_pass", scale=1.0),
                 lambda: rectified_flow_loss(model, x, y)):
        with pytest.raises(err, match=r"^model: (returned a velocity of shape|expected it to return the velocity)"):
            call()
    for call in (lambda: euler_sample(Fake(), x, y[:2], steps=1), lambda: guided_velocity(Fake(), x, t, y[:2]),
                 lambda: rectified_flow_loss(Fake(), x, torch.tensor([[1, 2, 3]]))):
        with pytest.raises(ValueError, match=r"^y: expected one class id per sample, shape \(3,\)"):
            call()


@pytest.mark.parametrize("heun", [False, True])
def test_euler_and_heun_match_a_hand_integration(heun):
    x, _, y = _xty()
    m = Fake()
    got = euler_sample(m, x, y, steps=5, budget=[4, 8, 2], heun=heun)
    want = _euler_by_hand(x, y, 5, [4, 8, 2], heun=heun)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got.double(), want.float().double(), rtol=0, atol=1e-6)
    assert len(m.calls) == (5 + 4 if heun else 5)
    assert all(c["budgets"] == [4, 8, 2] and c["dtype"] == torch.float32 for c in m.calls)


def test_euler_state_is_float64_and_calls_get_the_model_dtype():
    """A float64 model sees float64 states; the float64 integration matches the hand one to 1e-12."""
    x, _, y = _xty(dtype=torch.float64)
    m = Fake(dtype=torch.float64)
    got = euler_sample(m, x, y, steps=7)  # 1/7 steps: times float32 cannot hold
    assert all(c["dtype"] == torch.float64 for c in m.calls) and got.dtype == torch.float64
    ts = torch.linspace(1.0, 0.0, 8, dtype=torch.float64)
    want = x.clone()
    for i in range(7):
        t32 = torch.tensor(ts[i].item(), dtype=torch.float32).item()  # the model gets t in float32 (official)
        want = want + (ts[i + 1] - ts[i]).item() * v(want, t32, y, J_MAX)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_euler_guidance_interval_is_inclusive_and_weak_budget_reaches_the_weak_pass():
    x, _, y = _xty()
    m = Fake()
    # steps=4: t_cur = 1, 0.75, 0.5, 0.25. Interval [0.5, 0.75] (both ends on the grid) guides steps 1 and 2.
    got = euler_sample(m, x, y, steps=4, budget=8, mode="ccfg_two_pass", scale=0.5, weak_budget=3,
                       guidance_interval=(0.5, 0.75))
    want = _euler_by_hand(x, y, 4, 8, guided_at=lambda t: 0.5 <= t <= 0.75, s=0.5, weak=3)
    torch.testing.assert_close(got.double(), want.float().double(), rtol=0, atol=1e-6)
    assert [c["budgets"] for c in m.calls] == [8, 8, 3, 8, 3, 8]
    m.calls.clear()
    euler_sample(m, x, y, steps=2, mode="cfg", scale=0.0)  # scale 0: never guided
    assert [c["batch"] for c in m.calls] == [3, 3]
    m.calls.clear()
    euler_sample(m, x, y, steps=1, mode="cfg", scale=0.5, guidance_interval=(0.5, 0.5))  # an empty-width interval
    assert [c["batch"] for c in m.calls] == [3]  # is legal: t_cur = 1 is outside it, unguided
    for kw in (dict(), dict(mode="cfg", scale=0.0)):  # guides no step: an interval given would be ignored
        with pytest.raises(ValueError, match=r"^guidance_interval: mode '(none|cfg)' at scale 0 guides no step"):
            euler_sample(m, x, y, steps=1, guidance_interval=(0.2, 0.9), **kw)
        euler_sample(m, x, y, steps=1, guidance_interval=[0.0, 1.0], **kw)  # the default, in any form, is fine


def test_euler_defaults_and_schedules(capsys):
    x, _, y = _xty()
    m = Fake()
    euler_sample(m, x, y)
    assert len(m.calls) == 32  # steps default, no guidance
    assert capsys.readouterr().err == ""  # no progress bar unless asked
    m.calls.clear()
    euler_sample(m, x, y, steps=3, budget_schedule=lambda i: i + 1)
    assert [c["budgets"] for c in m.calls] == [1, 2, 3]
    m.calls.clear()
    euler_sample(m, x, y, steps=2, budget_schedule=[5, 6], heun=True)
    assert [c["budgets"] for c in m.calls] == [5, 5, 6]
    m.calls.clear()  # a [steps] integer tensor: one int per step, as the list; a [steps, B] one: one row per step
    euler_sample(m, x, y, steps=2, budget_schedule=torch.tensor([5, 6]))
    assert [c["budgets"] for c in m.calls] == [5, 6] and all(type(c["budgets"]) is int for c in m.calls)
    m.calls.clear()
    rows = torch.tensor([[1, 2, 3], [4, 5, 6]])
    euler_sample(m, x, y, steps=2, budget_schedule=rows)
    assert len(m.calls) == 2 and all(torch.equal(c["budgets"], r) for c, r in zip(m.calls, rows))
    assert euler_sample(m, x, y, steps=1).shape == x.shape  # the smallest legal step count


@pytest.mark.parametrize("steps", [0, -1, True, 2.0, "4"])
def test_euler_steps_errors(steps):
    x, _, y = _xty()
    with pytest.raises(ValueError, match="^steps: expected a positive int"):
        euler_sample(Fake(), x, y, steps=steps)


def test_rectified_flow_loss_by_hand():
    x0, t, y = _xty(dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = Fake(dtype=torch.float64)
    loss = rectified_flow_loss(m, x0, y, [1, 2, 3], t=t, noise=noise)
    tt = t.double().view(3, 1, 1, 1)
    xt = (1 - tt) * x0 + tt * noise
    want = ((v(xt, t.double(), y, [1, 2, 3]) - (noise - x0)) ** 2).mean()
    torch.testing.assert_close(loss.double(), want.float().double(), rtol=1e-6, atol=0)
    assert m.calls[0]["budgets"] == [1, 2, 3]
    # defaults: t logit-normal and noise normal from the generator, on x0's device
    a = rectified_flow_loss(m, x0, y, generator=torch.Generator().manual_seed(5))
    b = rectified_flow_loss(m, x0, y, generator=torch.Generator().manual_seed(5))
    assert a == b


def test_logit_normal_mean_and_std():
    g = torch.Generator().manual_seed(3)
    got = logit_normal(6, mean=1.5, std=0.5, generator=g)
    want = torch.sigmoid(torch.randn(6, generator=torch.Generator().manual_seed(3)) * 0.5 + 1.5)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sample_budgets_range_and_generator():
    assert sample_budgets(4, 0, 0) == [0, 0, 0, 0]  # j_min = 0 is legal
    assert sample_budgets(3, 2, 2, per_sample=True) == [2, 2, 2]
    a = sample_budgets(64, 0, 9, per_sample=True, generator=torch.Generator().manual_seed(0))
    b = sample_budgets(64, 0, 9, per_sample=True, generator=torch.Generator().manual_seed(0))
    assert a == b and set(a) <= set(range(10)) and len(set(a)) > 3
    for lo, hi in [(1.0, 4), (1, 4.0), (-1, 4), (5, 4), (0, 2**63 - 1)]:
        with pytest.raises(ValueError, match="^j_min: expected ints 0 <= j_min <= j_max"):
            sample_budgets(2, lo, hi)
    top = 2**63 - 2  # the largest j_max torch.randint can draw up to (its exclusive high is an int64): inclusive
    assert all(0 <= j <= top for j in sample_budgets(3, 0, top, per_sample=True))


class NoParams(torch.nn.Module):
    """A model without parameters (e.g. a wrapper): the samplers call it in float32."""

    cfg = SimpleNamespace(latents_per_group=J_MAX)
    null_class = NULL

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def forward(self, x, t, y, budgets=None):
        self.dtypes.append(x.dtype)
        return 0.5 * x


def test_parameterless_model_runs_in_float32():
    x, _, y = _xty(dtype=torch.float64)
    m = NoParams()
    out = euler_sample(m, x, y, steps=2)
    assert m.dtypes == [torch.float32, torch.float32] and out.dtype == torch.float64


def test_guidance_scale_defaults_to_off():
    """A mode without a scale is λ = 0: one plain pass (guided_velocity) / one pass per step (euler_sample)."""
    x, t, y = _xty()
    m = Fake()
    guided_velocity(m, x, t, y, 4, mode="cfg")
    assert [c["batch"] for c in m.calls] == [3]
    m.calls.clear()
    euler_sample(m, x, y, steps=2, mode="ccfg")
    assert [c["batch"] for c in m.calls] == [3, 3]


def test_loss_feeds_the_model_in_its_dtype():
    """x_t is built in x0's dtype (t is cast), so a bf16 model gets bf16 inputs."""
    x0, t, y = _xty()
    m = Fake(dtype=torch.bfloat16)
    rectified_flow_loss(m, x0.bfloat16(), y, t=t)
    assert m.calls[0]["dtype"] == torch.bfloat16



# --- bad arguments: each refused by name (TypeError / ValueError whose message starts "name: "), before any pass ---
GUIDED = ["cfg", "autoguidance", "ccfg", "ccfg_two_pass"]
WEAK = ["autoguidance", "ccfg", "ccfg_two_pass"]


def _both(m, x, t, y, **kw):
    """guided_velocity and euler_sample with the same arguments: each must refuse them the same way."""
    steps = kw.pop("steps", 2)
    return [lambda: guided_velocity(m, x, t, y, **kw), lambda: euler_sample(m, x, y, steps=steps, **kw)]


@pytest.mark.parametrize("scale,err", [(float("inf"), ValueError), (float("-inf"), ValueError),
                                       (float("nan"), ValueError), (-2, ValueError), (-1e-9, ValueError),
                                       (True, TypeError), ("a", TypeError), (None, TypeError), (1j, TypeError),
                                       (torch.tensor(1.0), TypeError), ([1.0], TypeError)])
def test_scale_must_be_a_finite_real_number(scale, err):
    x, t, y = _xty()
    m = Fake()
    for call in _both(m, x, t, y, mode="cfg", scale=scale):
        with pytest.raises(err, match=r"^scale: expected a finite real number >= 0 \(λ = the official cfg_scale"):
            call()
    assert m.calls == []


def test_scale_accepts_any_real_number_type():
    x, t, y = _xty()
    want = guided_velocity(Fake(), x, t, y, 4, mode="cfg", scale=1.5)
    for s in (np.float64(1.5), np.float32(1.5)):
        assert torch.equal(guided_velocity(Fake(), x, t, y, 4, mode="cfg", scale=s), want)
    assert torch.equal(guided_velocity(Fake(), x, t, y, 4, mode="cfg", scale=2),
                       guided_velocity(Fake(), x, t, y, 4, mode="cfg", scale=2.0))


@pytest.mark.parametrize("make", [lambda z: z.long(), lambda z: z > 0, lambda z: z.to(torch.complex64),
                                  lambda z: z.numpy(), lambda z: z.tolist(), lambda z: None])
def test_noise_and_x_must_be_floating_tensors(make):
    x, t, y = _xty()
    m = Fake()
    with pytest.raises(TypeError, match="^noise: expected a floating-point tensor"):
        euler_sample(m, make(x), y, steps=2)
    with pytest.raises(TypeError, match="^x: expected a floating-point tensor"):
        guided_velocity(m, make(x), t, y)
    with pytest.raises(TypeError, match="^x0: expected a floating-point tensor"):
        rectified_flow_loss(m, make(x), y)
    assert m.calls == []


def test_noise_of_the_wrong_size_is_named_as_noise():
    """euler_sample checks noise against the model's (in_channels, input_size) before the first step: the error
    names noise (the sampler's argument), not x (the model's), and the model is never called."""
    from elit_kernels.models import ElitDiT, elit_config

    m = ElitDiT(elit_config("tiny", 64))
    calls = []
    m.register_forward_pre_hook(lambda *a: calls.append(1))
    y = torch.tensor([1, 2])
    for shape in ((2, 4, 16, 16), (2, 3, 8, 8), (2, 4, 8)):
        with pytest.raises(ValueError, match=re.escape(f"noise: expected [B, 4, 8, 8] (the model's in_channels and "
                                                       f"input_size), got {shape}")):
            euler_sample(m, torch.randn(shape), y, steps=2)
    assert calls == []
    assert euler_sample(m, torch.randn(2, 4, 8, 8), y, steps=1).shape == (2, 4, 8, 8)


def test_model_and_y_are_named():
    x, t, y = _xty()
    for call in _both(None, x, t, y) + [lambda: rectified_flow_loss(None, x, y)]:
        with pytest.raises(TypeError, match="^model: expected a velocity model"):
            call()
    # guidance needs null_class and cfg.latents_per_group; a bare function has neither (no AttributeError)
    for call in _both(lambda x, t, y, b=None: x, x, t, y, mode="ccfg", scale=1.0):
        with pytest.raises(TypeError, match="^model: guidance needs a class-conditional model"):
            call()
    for call in _both(Fake(), x, t, y.tolist()) + [lambda: rectified_flow_loss(Fake(), x, y.tolist())]:
        with pytest.raises(TypeError, match="^y: expected a tensor"):
            call()


@pytest.mark.parametrize("kw,name", [
    (dict(mode="none", scale=1.0), "mode"),  # a scale without a mode would be ignored
    (dict(scale=0.5), "mode"),
    (dict(mode="cfg", scale=1.0, weak_budget=1), "weak_budget"),  # cfg has no weak pass
    (dict(mode="none", weak_budget=1), "weak_budget"),
    (dict(mode="cfg", weak_budget=[1, 2, 3]), "weak_budget"),
    (dict(mode="CFG", scale=1.0), "mode"),
    (dict(mode=None), "mode"),
])
def test_arguments_that_would_be_ignored_are_refused(kw, name):
    x, t, y = _xty()
    m = Fake()
    for call in _both(m, x, t, y, **kw):
        with pytest.raises(ValueError, match=f"^{name}: "):
            call()
    assert m.calls == []


BAD_BUDGETS = [(2.0, TypeError), (0.5, TypeError), (np.float64(2), TypeError), ("4", TypeError), (True, TypeError),
               (np.True_, TypeError), ([1, 2], ValueError), ([1, 2, 3, 4], ValueError), ([1, 2.0, 3], TypeError),
               ([1, np.True_, 3], TypeError), (np.array([1.0, 2.0, 3.0]), TypeError), (np.array([[1, 2, 3]]), TypeError),
               (np.array([1, 2]), ValueError),
               (33, ValueError), ([1, -1, 2], ValueError), (torch.tensor([1.0, 2.0, 3.0]), TypeError),
               (torch.tensor([[1, 2, 3]]), TypeError), (torch.tensor([1, 2]), ValueError), ({1: 2}, TypeError)]


@pytest.mark.parametrize("mode", ["none"] + GUIDED)
@pytest.mark.parametrize("budget,err", BAD_BUDGETS)
def test_every_mode_checks_budget_by_name(mode, budget, err):
    x, t, y = _xty()
    m = Fake()
    for call in _both(m, x, t, y, budget=budget, mode=mode, scale=0.0 if mode == "none" else 1.0):
        with pytest.raises(err, match="^budget: "):
            call()
    assert m.calls == []


@pytest.mark.parametrize("mode", WEAK)
@pytest.mark.parametrize("weak,err", BAD_BUDGETS)
def test_every_weak_mode_checks_weak_budget_by_name(mode, weak, err):
    x, t, y = _xty()
    m = Fake()
    for call in _both(m, x, t, y, budget=4, mode=mode, scale=1.0, weak_budget=weak):
        with pytest.raises(err, match="^weak_budget: "):
            call()
    assert m.calls == []


@pytest.mark.parametrize("numpy_form", [np.int64(2), [np.int64(2), np.int32(4), 1], np.array([2, 4, 1]),
                                        np.array([2, 4, 1], dtype=np.uint8)],
                         ids=["scalar", "list-of-numpy-ints", "int64-array", "uint8-array"])
def test_numpy_budgets_are_ints(numpy_form):
    # What indexing an array gives (np.int64) is an int to the samplers, as to the model: the model gets the
    # same Python ints it would from the equivalent list, so its output and a capture signature are the same.
    x, t, y = _xty()
    python_form = numpy_form.tolist() if isinstance(numpy_form, (np.ndarray, np.integer)) else \
        [int(j) for j in numpy_form]
    got, want = Fake(), Fake()
    for m, bud, weak, steps, heun in ((got, numpy_form, np.int64(1), np.int64(2), np.True_),
                                      (want, python_form, 1, 2, True)):
        out = [guided_velocity(m, x, t, y, bud, mode="ccfg", scale=1.0, weak_budget=weak),
               euler_sample(m, x, y, steps=steps, budget=bud, heun=heun, mode="autoguidance", scale=0.5,
                            weak_budget=weak),
               euler_sample(m, x, y, steps=steps, budget_schedule=np.array([bud] * 2) if m is got else [bud] * 2)]
        if m is got:
            got_out = out
    for a, b in zip(got_out, out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(got.calls) == len(want.calls)
    for c, w in zip(got.calls, want.calls):
        assert c["budgets"] == w["budgets"]  # Python ints: equal lists, not NumPy arrays
        assert all(type(j) is int for j in ([c["budgets"]] if isinstance(c["budgets"], int) else c["budgets"]))


def test_valid_budget_forms_reach_the_model_unchanged():
    """An int tensor budget is checked by its dtype and length only (its values stay on the device)."""
    x, t, y = _xty()
    m = Fake()
    bud = torch.tensor([4, 8, 2])
    euler_sample(m, x, y, steps=1, budget=bud)
    assert m.calls[0]["budgets"] is bud
    m.calls.clear()
    guided_velocity(m, x, t, y, (4, 8, 2), mode="ccfg", scale=1.0, weak_budget=range(1, 4))
    assert m.calls[0]["budgets"] == [4, 8, 2, 1, 2, 3]


@pytest.mark.parametrize("kw,err,msg", [
    (dict(budget_schedule=4), TypeError, "^budget_schedule: expected None, a sequence of 2 budgets"),
    (dict(budget_schedule="ab"), TypeError, "^budget_schedule: expected None"),
    (dict(budget_schedule=torch.tensor(4)), TypeError, "^budget_schedule: expected None"),
    (dict(budget_schedule=[4, 2.0]), TypeError, "^budget_schedule: step 1: "),
    (dict(budget_schedule=[4, [1, 2]]), ValueError, "^budget_schedule: step 1: expected 3 budgets"),
    (dict(budget_schedule=[4, 2, 1]), ValueError, "^budget_schedule: expected 2 budgets"),
    (dict(budget_schedule=lambda i: 2.5), TypeError, "^budget_schedule: step 0 returned 2.5: "),
    (dict(budget_schedule=lambda i: 4 if i == 0 else 99), ValueError, "^budget_schedule: step 1 returned 99: "),
    (dict(budget_schedule=[4, 2], budget=4), ValueError, "^budget_schedule: give budget or budget_schedule"),
])
def test_budget_schedule_errors_name_it(kw, err, msg):
    x, _, y = _xty()
    with pytest.raises(err, match=msg):
        euler_sample(Fake(), x, y, steps=2, **kw)


def test_a_tensor_schedule_is_one_row_per_step():
    x, _, y = _xty()
    m = Fake()
    euler_sample(m, x, y, steps=2, budget_schedule=torch.tensor([[4, 8, 2], [1, 1, 1]]))
    assert [c["budgets"].tolist() for c in m.calls] == [[4, 8, 2], [1, 1, 1]]


def test_guided_velocity_takes_a_float_t_and_checks_t_and_dtype():
    x, t, y = _xty()
    want = guided_velocity(Fake(), x, torch.full((3,), 0.5), y, 4, mode="ccfg", scale=1.0)
    for tt in (0.5, np.float64(0.5), torch.tensor(0.5)):
        assert torch.equal(guided_velocity(Fake(), x, tt, y, 4, mode="ccfg", scale=1.0), want)
    for tt, err in (("0.5", TypeError), (True, TypeError), (None, TypeError), (torch.tensor([1, 0, 1]), TypeError),
                    (torch.rand(2), ValueError), (torch.rand(3, 1), ValueError)):
        with pytest.raises(err, match="^t: "):
            guided_velocity(Fake(), x, tt, y)
    for dt in ("float64", torch.int64, torch.bool, float, 1):
        with pytest.raises(TypeError, match="^dtype: expected None .* floating-point torch.dtype"):
            guided_velocity(Fake(), x, t, y, dtype=dt)


@pytest.mark.parametrize("kw,err,name", [
    (dict(t=torch.rand(2)), ValueError, "t"), (dict(t=torch.rand(3, 1)), ValueError, "t"),
    (dict(t=torch.tensor([0, 1, 0])), TypeError, "t"), (dict(t=0.5), TypeError, "t"),
    (dict(noise=torch.zeros(3, 2, 2, 2, dtype=torch.long)), TypeError, "noise"),
    (dict(noise=np.zeros((3, 2, 2, 2))), TypeError, "noise"), (dict(noise=torch.zeros(3, 2)), ValueError, "noise"),
    (dict(generator=3), TypeError, "generator"),
])
def test_rectified_flow_loss_errors_name_the_argument(kw, err, name):
    x0, _, y = _xty()
    m = Fake()
    with pytest.raises(err, match=f"^{name}: "):
        rectified_flow_loss(m, x0, y, **kw)
    assert m.calls == []


@pytest.mark.parametrize("call,err,name", [
    (lambda: sample_budgets(-1, 0, 2), ValueError, "batch"), (lambda: sample_budgets(2.5, 0, 2), ValueError, "batch"),
    (lambda: sample_budgets(True, 0, 2), ValueError, "batch"), (lambda: sample_budgets("3", 0, 2), ValueError, "batch"),
    (lambda: sample_budgets(2, True, 2), ValueError, "j_min"),
    (lambda: sample_budgets(2, 0, 2, per_sample="yes"), TypeError, "per_sample"),
    (lambda: sample_budgets(2, 0, 2, generator=0), TypeError, "generator"),
    (lambda: logit_normal(-1), ValueError, "batch"), (lambda: logit_normal(2, std=-1.0), ValueError, "std"),
    (lambda: logit_normal(2, std=float("nan")), ValueError, "std"),
    (lambda: logit_normal(2, mean=float("inf")), ValueError, "mean"), (lambda: logit_normal(2, mean="0"), TypeError, "mean"),
])
def test_draws_errors_name_the_argument(call, err, name):
    with pytest.raises(err, match=f"^{name}: "):
        call()


def test_empty_batches_are_legal():
    assert sample_budgets(0, 1, 4) == [] and sample_budgets(0, 1, 4, per_sample=True) == []
    assert logit_normal(0).shape == (0,)


@pytest.mark.parametrize("interval", ["01", b"01", ("0", "1"), (True, 1), (0, False), (0,), (0, 0.5, 1), None, 0.5,
                                      (float("nan"), 1), (0, float("inf")), (torch.zeros(2), 1)])
def test_guidance_interval_errors(interval):
    x, _, y = _xty()
    with pytest.raises(ValueError, match="^guidance_interval: expected"):
        euler_sample(Fake(), x, y, steps=2, mode="cfg", scale=1.0, guidance_interval=interval)


@pytest.mark.parametrize("name", ["heun", "progress", "graphed"])
@pytest.mark.parametrize("value", ["yes", "no", 1, 0, None, np.int64(1), torch.tensor(True)])
def test_flags_must_be_bools(name, value):
    x, _, y = _xty()
    m = Fake()
    with pytest.raises(TypeError, match=f"^{name}: expected a bool, got "):
        euler_sample(m, x, y, steps=2, **{name: value})
    assert m.calls == []


class NullOnly:
    """A callable with null_class but no cfg.latents_per_group: not enough for guidance."""

    null_class = NULL

    def __call__(self, x, t, y, budgets=None):
        return x


_KINDS = "None (J_max), an int, a sequence of ints (one per sample), a 1-D integer tensor or NumPy array"
_FLOAT_HINT = " (an integer, bool or complex tensor would be truncated or refused by the model: convert it with .float())"


@pytest.mark.parametrize("call,err,msg", [
    (lambda x, t, y: logit_normal(2, mean="0"), TypeError, "mean: expected a finite real number, got str ('0')"),
    (lambda x, t, y: logit_normal(2, std=-1.0), ValueError, "std: expected a finite real number >= 0, got -1.0"),
    (lambda x, t, y: logit_normal(2, generator=3), TypeError, "generator: expected None or a torch.Generator, got int"),
    (lambda x, t, y: sample_budgets(-1, 0, 2), ValueError, "batch: expected an int >= 0, got -1"),
    (lambda x, t, y: rectified_flow_loss(Fake(), x.tolist(), y), TypeError,
     "x0: expected a floating-point tensor [B, ...] of clean latents, got list"),
    (lambda x, t, y: rectified_flow_loss(Fake(), x[0, 0, 0, 0], y), ValueError,
     "x0: expected a tensor [B, ...] with a batch dimension, got a 0-dim tensor"),
    (lambda x, t, y: rectified_flow_loss(Fake(), x, y.tolist()), TypeError, "y: expected a tensor of class ids [B], got list"),
    (lambda x, t, y: rectified_flow_loss(Fake(), x, y, t=torch.tensor([0, 1, 0])), TypeError,
     "t: expected a floating-point tensor of times of shape [B] = (3,), got torch.int64" + _FLOAT_HINT),
    (lambda x, t, y: rectified_flow_loss(Fake(), x, y, noise=np.zeros((3, 2, 2, 2))), TypeError,
     "noise: expected a floating-point tensor of x0's shape (3, 2, 2, 2), got ndarray"),
    (lambda x, t, y: rectified_flow_loss(Fake(), x, y, noise=torch.randn_like(x).double()), ValueError,
     "noise: expected x0's dtype and device (torch.float32, cpu), got torch.float64, cpu"),
    (lambda x, t, y: rectified_flow_loss(Fake(), x[:0], y[:0]), ValueError,
     "x0: expected at least one sample (the loss is a mean over the batch), got shape (0, 2, 2, 2)"),
    (lambda x, t, y: sample_budgets(2, 0, 2**63 - 1), ValueError,
     "j_min: expected ints 0 <= j_min <= j_max <= 2**63 - 2, got j_min=0, j_max=9223372036854775807"),
    # t and noise given: the generator is never used, and still refused
    (lambda x, t, y: rectified_flow_loss(Fake(), x, y, t=t, noise=torch.randn_like(x), generator=3), TypeError,
     "generator: expected None or a torch.Generator, got int"),
    (lambda x, t, y: guided_velocity(Fake(), x.tolist(), t, y), TypeError, "x: expected a floating-point tensor [B, ...], got list"),
    (lambda x, t, y: guided_velocity(Fake(), x, "0.5", y), TypeError,
     "t: expected a floating-point tensor of times of shape [B] = (3,), a 0-dim one or a float, got str"),
    (lambda x, t, y: guided_velocity(Fake(), x, t, y.tolist()), TypeError, "y: expected a tensor of class ids [B], got list"),
    (lambda x, t, y: guided_velocity(Fake(), x, t, y, 2.0), TypeError,
     f"budget: expected {_KINDS}, got float (2.0); elit_kernels.official.latents_for_budget converts the official "
     "float budgets"),
    (lambda x, t, y: guided_velocity(Fake(), x, t, y, torch.tensor([True, False, True])), TypeError,
     f"budget: expected {_KINDS}, got a torch.bool tensor of shape (3,)"),
    (lambda x, t, y: guided_velocity(Fake(), x, t, y, torch.ones(3, dtype=torch.complex64)), TypeError,
     f"budget: expected {_KINDS}, got a torch.complex64 tensor of shape (3,)"),
    (lambda x, t, y: guided_velocity(NullOnly(), x, t, y, mode="ccfg", scale=1.0), TypeError,
     "model: guidance needs a class-conditional model with null_class and cfg.latents_per_group (ElitDiT, PlainDiT), "
     "got NullOnly"),
    (lambda x, t, y: euler_sample(Fake(), x.tolist(), y), TypeError,
     "noise: expected a floating-point tensor [B, C, H, W] (the result takes its dtype), got list"),
    (lambda x, t, y: euler_sample(Fake(), x, y.tolist()), TypeError, "y: expected a tensor of class ids [B], got list"),
    (lambda x, t, y: euler_sample(NullOnly(), x, y, mode="ccfg", scale=1.0), TypeError,
     "model: guidance needs a class-conditional model with null_class and cfg.latents_per_group (ElitDiT, PlainDiT), "
     "got NullOnly"),
    # the model's own message is kept whole after the argument name and the step, ": " inside it included
    (lambda x, t, y: euler_sample(Fake(), x, y, steps=2, budget_schedule=lambda i: [4, {"j": 2}, 8]), TypeError,
     "budget_schedule: step 0 returned [4, {'j': 2}, 8]: expected ints, got dict ({'j': 2})"),
    (lambda x, t, y: guided_velocity(Fake(), x, t, y, [4, "a: b", 8]), TypeError,
     "budget: expected ints, got str ('a: b')"),
    # a [steps] tensor schedule holds one int budget per step: a float one is refused before any step
    (lambda x, t, y: euler_sample(Fake(), x, y, steps=2, budget_schedule=torch.tensor([4.0, 2.0])), TypeError,
     "budget_schedule: expected an integer tensor of 2 budgets (one per step), got torch.float32"),
    (lambda x, t, y: euler_sample(Fake(), x, y, steps=2, budget_schedule=torch.tensor([4, 2, 1])), ValueError,
     "budget_schedule: expected 2 budgets (one per step), got 3"),
])
def test_error_messages_name_the_argument_and_what_it_expects(call, err, msg):
    x, t, y = _xty()
    with pytest.raises(err, match="^" + re.escape(msg) + "$"):
        call(x, t, y)


def test_check_int_range_is_inclusive_and_named():
    """The CLI's int check (elit-sample --latents): both ends of [lo, hi] are legal, the message gives the range."""
    assert _check_int("latents", 32, 1, 32) == 32 and _check_int("latents", 1, 1, 32) == 1
    for v in (33, 0):
        with pytest.raises(ValueError, match="^" + re.escape(f"latents: expected an int in [1, 32], got {v}") + "$"):
            _check_int("latents", v, 1, 32)
    with pytest.raises(ValueError, match="^" + re.escape("latents: expected an int >= 1, got 0") + "$"):
        _check_int("latents", 0, 1)


def test_a_plain_function_model_runs_unguided_with_any_budget():
    """A callable without cfg or parameters: no J_max bound on budgets, float32 inputs, and a guided mode at
    scale 0 (one plain pass) needs no null_class."""
    x, t, y = _xty(dtype=torch.float64)
    dtypes = []

    def f(xs, ts, ys, budgets=None):
        dtypes.append(xs.dtype)
        return 0.5 * xs

    for kw in (dict(), dict(mode="cfg", scale=0.0)):
        torch.testing.assert_close(guided_velocity(f, x, t, y, 100, **kw), 0.5 * x, rtol=0, atol=0)
        got = euler_sample(f, x, y, steps=2, budget=100, **kw)
        torch.testing.assert_close(got, x.float().double() * 0.75 ** 2, rtol=0, atol=1e-7)  # x ← x − 0.5·0.5·x
    assert set(dtypes[-2:]) == {torch.float32}


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def test_a_float_t_becomes_float32_on_x_device():
    seen = []

    def f(xs, ts, ys, budgets=None):
        seen.append((ts.dtype, ts.device.type, ts.shape))
        return xs

    x = torch.zeros(3, 2, device="meta")
    guided_velocity(f, x, 0.25, torch.zeros(3, dtype=torch.long, device="meta"))
    assert seen == [(torch.float32, "meta", (3,))]
    x, _, y = _xty(dtype=torch.float64)
    with _default_dtype(torch.float64):  # t stays float32 (as the official sampler's), whatever the default
        out = guided_velocity(Fake(dtype=torch.float64), x, 0.1, y, 4)
        guided_velocity(f, x, 0.1, y)
    assert seen[-1] == (torch.float32, "cpu", (3,))
    torch.testing.assert_close(out, v(x, torch.tensor(0.1, dtype=torch.float32).item(), y, 4), rtol=0, atol=1e-12)


def test_guided_velocity_combines_the_passes_in_the_requested_dtype():
    x, t, y = _xty()
    m = Fake()
    got = guided_velocity(m, x, t, y, 4, mode="ccfg", scale=0.5, weak_budget=1, dtype=torch.float16)
    ref = Fake()
    cond, weak = ref(x, t, y, 4).half(), ref(x, t, torch.full_like(y, NULL), 1).half()
    assert got.dtype == torch.float16
    assert torch.equal(got, weak + 1.5 * (cond - weak))


def test_guided_euler_combines_the_passes_in_float64():
    """The float32 passes are combined in float64 (the state's dtype), not in the model's."""
    x, _, y = _xty(dtype=torch.float64)
    s = 0.3
    got = euler_sample(Fake(), x, y, steps=3, budget=8, mode="ccfg_two_pass", scale=s, weak_budget=3)
    ref, want = Fake(), x.clone()
    ts = torch.linspace(1.0, 0.0, 4, dtype=torch.float64)
    for i in range(3):
        tc, tn = ts[i].item(), ts[i + 1].item()
        tt = torch.full((3,), tc, dtype=torch.float32)
        c = ref(want.float(), tt, y, 8).double()
        w = ref(want.float(), tt, torch.full_like(y, NULL), 3).double()
        want = want + (tn - tc) * (w + (s + 1.0) * (c - w))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_sampler_runs_eagerly_unless_graphed():
    """No CUDA-graph wrapper (and its CPU warning) by default; graphed=True needs a model it can capture (an
    ElitDiT: tests/test_capture.py runs one), and says so for one without a layout instead of failing at capture."""
    x, _, y = _xty()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        euler_sample(Fake(), x, y, steps=2)
    with pytest.raises(TypeError, match=r"^model: expected an ElitDiT \(a module with cfg, layout and forward\), "
                       "got Fake"):
        euler_sample(Fake(), x, y, steps=2, graphed=True)


def test_one_dim_inputs_are_a_batch_of_scalars():
    x, t, y = _xty(dtype=torch.float64)
    x1 = x[:, 0, 0, 0].contiguous()
    noise = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    loss = rectified_flow_loss(Fake(dtype=torch.float64), x1, y, t=t, noise=noise)
    xt = (1 - t.double()) * x1 + t.double() * noise
    torch.testing.assert_close(loss.double(), ((v(xt, t.double(), y, J_MAX) - (noise - x1)) ** 2).mean().float().double())
    got = euler_sample(Fake(), x1.float(), y, steps=3, budget=4)
    assert got.shape == (3,)
    torch.testing.assert_close(got.double(), _euler_by_hand(x1.float(), y, 3, 4).float().double(), rtol=0, atol=1e-6)


def test_euler_accumulates_in_float64_and_hands_the_model_float32_times():
    """The sampler's state is float64 whatever the noise's dtype (one rounding at the end: float32 noise gives
    the float64 run's result rounded once); t reaches the model as float32 even under a float64 default dtype;
    a guided mode at scale 0 is guidance off: one pass per step."""
    x, _, y = _xty()
    m = Fake()
    got = euler_sample(m, x, y, steps=8, budget=4)
    want = euler_sample(m, x.double(), y, steps=8, budget=4).float()
    assert got.dtype == torch.float32 and torch.equal(got, want)
    m.calls.clear()
    with _default_dtype(torch.float64):
        euler_sample(m, x, y, steps=2)
    assert [c["t_dtype"] for c in m.calls] == [torch.float32] * 2
    m.calls.clear()
    euler_sample(m, x, y, steps=3, mode="cfg", scale=0.0)
    assert len(m.calls) == 3 and all(c["batch"] == x.shape[0] for c in m.calls)
