"""elit_kernels.flow against independent hand computations, with a recording fake model (fast: no network).

The fake's velocity is a known function of (x, t, y, budget), so the guidance combination, the calls each mode
makes (batches, budgets, dtypes) and the Euler / Heun integration can be recomputed here from their
definitions (docs/released_checkpoints.md §5) and compared exactly. Written against the mutation run
(benchmarks/results/mutation.md).
"""
from types import SimpleNamespace

import pytest
import torch

from elit_kernels.flow import (euler_sample, guided_velocity, logit_normal, rectified_flow_loss, sample_budgets)

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
        self.calls.append({"batch": b, "budgets": budgets, "dtype": x.dtype, "t_shape": tuple(t.shape), "y": y.tolist()})
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
    got = guided_velocity(m, x, t, y, budget, mode=mode, scale=s, weak_budget=weak)
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
    euler_sample(m, x, y, steps=1, guidance_interval=(0.5, 0.5))  # an empty-width interval is legal


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
    for lo, hi in [(1.0, 4), (1, 4.0), (-1, 4), (5, 4)]:
        with pytest.raises(ValueError, match="^j_min: expected ints 0 <= j_min <= j_max"):
            sample_budgets(2, lo, hi)


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
