"""Round 41 of the hostile-user findings (flow, elementwise ops, diffusers masks), each with the test that failed
before its fix:

3. ``elementwise="fused"`` takes every dtype combination ``"native"`` takes (parameters and ``y`` in a dtype other
   than x's, as ``torch.autocast`` makes them), with native's result dtype and within the dtype's error of it,
   gradients included; an ElitDiT with ``elementwise="fused"`` runs under ``torch.autocast`` as ``"native"`` does;
4. ``eps`` of every ``layernorm_modulate`` implementation is checked once (``elementwise.check_eps``): a bool, a str,
   a tensor or None is a TypeError naming ``eps``, NaN / inf / a negative value a ValueError; NumPy reals count;
6. ``rectified_flow_loss`` computes a float64 loss for float64 data and model (float32 for fp16/bf16/fp32);
7. ``weak_budget`` with ``scale == 0`` (no weak pass runs) is refused naming ``weak_budget``, as with mode
   ``none``/``cfg``;
8. ``guidance_interval`` takes a sequence of two reals or a 1-D tensor / NumPy array of two, nothing else (a dict,
   a set, an iterator, a 2-D array, tensor elements): ValueError naming it;
9. ``euler_sample``'s ``steps`` has an upper bound (``flow.MAX_STEPS``) checked before the times are allocated;
   the diffusers ``attention_bshd`` takes a 1-D ``[S_k]`` key mask as SDPA and diffusers read it, and a mask
   shape it refuses is called "not supported" unless it truly does not broadcast; ``rectified_flow_loss`` names
   ``x0`` (not the model's ``x``) for what the model refuses of x_t.

Every comparison is against the native path / plain PyTorch / float64 hand computations on fresh random inputs.
"""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from elit_kernels import _cext, flow
from elit_kernels.elementwise import get_elementwise
from elit_kernels.flow import euler_sample, guided_velocity, rectified_flow_loss
from elit_kernels.layout import TokenRuns
from elit_kernels.models import ElitDiT, elit_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

needs_fused = pytest.mark.skipif(not _cext.available(), reason=f"no compiled extension ({_cext.unavailable_reason})")

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
_ID = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _gen(seed=None):
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()) if seed is None else seed)


def _random_model(dtype=torch.float64, elementwise="native"):
    """A tiny ElitDiT with every weight random (adaLN-Zero initialises the gates and the final layer to zero)."""
    m = ElitDiT(elit_config("tiny", 64), backend="torch", elementwise=elementwise)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.to(dtype)


# --- 3. fused elementwise: every dtype combination native takes -------------------------------------------------

def _elementwise_inputs(x_dtype, p_dtype, counts=(3, 0, 5, 5, 2), c=16):
    g = _gen()
    runs = TokenRuns.from_counts(list(counts))
    b, t = len(counts), runs.total

    def r(*shape, dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return runs, r(t, c, dtype=x_dtype), r(t, c, dtype=p_dtype), r(b, c, dtype=p_dtype), r(b, c, dtype=p_dtype), \
        r(b, c, dtype=p_dtype)


def _lnm64(x, shift, scale, index, eps=1e-6):
    """The float64 truth of ``LayerNorm(x) * (1 + scale) + shift`` with the parameters rounded to x's dtype first
    (what native and fused compute from)."""
    sh, sc = (p.to(x.dtype).double()[index] for p in (shift, scale))
    return F.layer_norm(x.double(), (x.shape[-1],), eps=eps) * (1 + sc) + sh


def _gr64(x, y, gate, index):
    return x.double() + gate.to(x.dtype).double()[index] * y.to(x.dtype).double()


def _max_err(a, ref):
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


def _within_native(fused, native, truth, what, compute_dtype):
    """fused's error against the float64 truth is at most twice native's, plus a few ulps of the dtype they compute
    in (x's: a parameter's gradient is a sum over its tokens in x's dtype, cast to the parameter's dtype after, so
    the two sum in different orders)."""
    assert fused.dtype == native.dtype, what
    assert fused.shape == native.shape, what
    eps = max(torch.finfo(fused.dtype).eps, torch.finfo(compute_dtype).eps)
    slack = 4 * eps * max(truth.abs().max().item() if truth.numel() else 0.0, 1.0)
    err_f, err_n = _max_err(fused, truth), _max_err(native, truth)
    assert err_f <= 2 * err_n + slack, f"{what}: fused error {err_f:.3g}, native {err_n:.3g}"


@needs_fused
@pytest.mark.parametrize("p_dtype", FLOATS, ids=_ID.get)
@pytest.mark.parametrize("x_dtype", FLOATS, ids=_ID.get)
def test_fused_elementwise_takes_every_dtype_combination_native_takes(x_dtype, p_dtype):
    runs, x, y, shift, scale, gate = _elementwise_inputs(x_dtype, p_dtype)
    idx = runs.index
    wl, wg = torch.randn(x.shape, dtype=torch.float64), torch.randn(x.shape, dtype=torch.float64)
    outs = {}
    for name in ("native", "fused"):
        ew = get_elementwise(name)
        for p in (x, y, shift, scale, gate):
            p.grad = None
        lnm = ew.layernorm_modulate(x, shift, scale, runs, 1e-6)
        gr = ew.gated_residual(x, y, gate, runs)
        ((lnm.double() * wl).sum() + (gr.double() * wg).sum()).backward()
        outs[name] = (lnm.detach(), gr.detach(), [p.grad.clone() for p in (x, y, shift, scale, gate)])
    assert outs["native"][0].dtype == x_dtype  # the contract the fused path must keep
    _within_native(outs["fused"][0], outs["native"][0], _lnm64(x, shift, scale, idx), "layernorm_modulate",
                   x_dtype)
    _within_native(outs["fused"][1], outs["native"][1], _gr64(x, y, gate, idx), "gated_residual", x_dtype)

    # gradients: the float64 truth of the same computation (parameters rounded to x's dtype), through autograd
    x64, y64, sh64, sc64, g64 = (p.detach().to(x_dtype).double().requires_grad_() for p in (x, y, shift, scale, gate))
    ((_lnm64(x64, sh64, sc64, idx) * wl).sum() + (_gr64(x64, y64, g64, idx) * wg).sum()).backward()
    truths = [x64.grad, y64.grad, sh64.grad, sc64.grad, g64.grad]
    for name, gf, gn, gt in zip(("x", "y", "shift", "scale", "gate"), outs["fused"][2], outs["native"][2], truths):
        assert gf.dtype == gn.dtype  # each gradient in its own parameter's dtype
        _within_native(gf, gn, gt, f"grad of {name}", x_dtype)


@needs_fused
def test_fused_model_runs_under_autocast_as_native():
    m = _random_model(torch.float32)
    g = _gen()
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([1, 2, 3])
    bud = [4, 2, 3]
    with torch.no_grad():
        eager = m(x, t, y, bud)  # fp32, no autocast: the scale of autocast's own error
    outs, grads = {}, {}
    for ew in ("native", "fused"):
        m.elementwise = ew
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x, t, y, bud)
        out.float().square().mean().backward()
        outs[ew], grads[ew] = out.detach(), [p.grad.clone() for p in m.parameters()]
    assert outs["fused"].dtype == outs["native"].dtype
    autocast_err = (outs["native"].float() - eager).abs().max().item()
    assert autocast_err > 0  # guard: autocast did change the computation
    assert (outs["fused"].float() - outs["native"].float()).abs().max().item() <= 2 * autocast_err
    for gf, gn in zip(grads["fused"], grads["native"]):
        assert gf.dtype == gn.dtype
        torch.testing.assert_close(gf, gn, rtol=0.05, atol=0.05 * gn.abs().max().item() + 1e-6)


# --- 4. eps: one check in every implementation ------------------------------------------------------------------

IMPLS = ["native", "reference", pytest.param("fused", marks=needs_fused)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("eps, err", [(True, TypeError), (np.True_, TypeError), ("1e-6", TypeError),
                                      (torch.tensor(1e-6), TypeError), (None, TypeError), (1j, TypeError),
                                      (float("nan"), ValueError), (float("inf"), ValueError), (-1e-6, ValueError)],
                         ids=["True", "np.True_", "str", "tensor", "None", "complex", "nan", "inf", "negative"])
def test_elementwise_eps_is_checked_in_every_implementation(impl, eps, err):
    runs, x, _, shift, scale, _ = _elementwise_inputs(torch.float32, torch.float32)
    with pytest.raises(err, match="^eps: expected a finite real number >= 0"):
        get_elementwise(impl).layernorm_modulate(x, shift, scale, runs, eps)


@needs_fused
def test_fused_eps_direct_call_is_checked_and_numpy_reals_count():
    runs, x, _, shift, scale, _ = _elementwise_inputs(torch.float32, torch.float32)
    with pytest.raises(TypeError, match="^eps: "):
        _cext.layernorm_modulate(x, shift, scale, runs.index, eps=True)
    for eps in (np.float32(1e-3), np.int64(0), 0, 1e-5):
        got = _cext.layernorm_modulate(x, shift, scale, runs.index, eps)
        want = get_elementwise("native").layernorm_modulate(x, shift, scale, runs, float(eps))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- 6. the loss in float64 for float64 data ------------------------------------------------------------------

@pytest.mark.parametrize("dtype, loss_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                               (torch.bfloat16, torch.float32)], ids=["fp64", "fp32", "bf16"])
def test_rectified_flow_loss_dtype_follows_the_data(dtype, loss_dtype):
    m = _random_model(dtype)
    g = _gen()
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    noise = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    t, y, bud = torch.rand(3, generator=g), torch.tensor([0, 5, 9]), [4, 1, 3]
    loss = rectified_flow_loss(m, x0, y, bud, t=t, noise=noise)
    assert loss.dtype == loss_dtype and loss.dim() == 0
    tt = t.to(dtype).view(3, 1, 1, 1)
    v = m((1 - tt) * x0 + tt * noise, t, y, bud).detach()  # with grad, as the loss (bf16 no_grad paths differ)
    want = ((v.to(loss_dtype) - (noise - x0).to(loss_dtype)) ** 2).mean()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss.detach(), want, rtol=tol, atol=0)


# --- 7. weak_budget with scale 0 ------------------------------------------------------------------------------

class Fake(torch.nn.Module):
    """v(x, t, y, J) = a·x + t + 0.1·y + 0.01·J per sample, with a random a; the guided modes' attributes."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a = torch.nn.Parameter(torch.rand((), dtype=torch.float64).to(dtype) + 0.25)
        self.cfg = SimpleNamespace(latents_per_group=16)
        self.null_class = 7

    def forward(self, x, t, y, budgets=None):
        b = x.shape[0]
        bud = [16] * b if budgets is None else ([budgets] * b if isinstance(budgets, int) else list(budgets))
        shape = (b,) + (1,) * (x.dim() - 1)
        j = torch.tensor(bud, dtype=x.dtype).view(shape)
        return self.a.to(x.dtype) * x + t.to(x.dtype).view(shape) + 0.1 * y.to(x.dtype).view(shape) + 0.01 * j


def _xy(b=3):
    g = _gen()
    return torch.randn(b, 2, 4, 4, generator=g), torch.randint(0, 7, (b,), generator=g)


@pytest.mark.parametrize("mode", ["autoguidance", "ccfg", "ccfg_two_pass"])
def test_weak_budget_with_scale_zero_is_refused(mode):
    m, (x, y) = Fake(), _xy()
    with pytest.raises(ValueError, match="^weak_budget: scale is 0"):
        guided_velocity(m, x, 0.5, y, 4, mode=mode, scale=0.0, weak_budget=2)
    with pytest.raises(ValueError, match="^weak_budget: scale is 0"):
        euler_sample(m, x, y, steps=2, budget=4, mode=mode, scale=0, weak_budget=1)
    # without the weak budget, scale 0 is one conditional pass, as mode "none"
    with torch.no_grad():
        got = guided_velocity(m, x, 0.5, y, 4, mode=mode, scale=0.0)
        want = guided_velocity(m, x, 0.5, y, 4)
    assert torch.equal(got, want)


# --- 8. guidance_interval forms -------------------------------------------------------------------------------

@pytest.mark.parametrize("interval", [
    {0.25: 1, 0.75: 2}, {0.25, 0.75}, frozenset({0.25, 0.75}), iter([0.25, 0.75]), (v for v in (0.25, 0.75)),
    torch.tensor([[0.25, 0.75]]), torch.tensor([True, True]), torch.tensor([0.25, 0.5, 0.75]),
    np.array([[0.25, 0.75]]), np.array([True, True]), np.array(["0.25", "0.75"]),
    [torch.tensor(0.25), torch.tensor(0.75)], (np.bool_(False), 1.0), [0.25, 1j],
], ids=["dict", "set", "frozenset", "iterator", "generator", "2-D tensor", "bool tensor", "3 tensor", "2-D array",
        "bool array", "str array", "tensor elements", "np.bool_ element", "complex element"])
def test_guidance_interval_takes_only_pairs(interval):
    m, (x, y) = Fake(), _xy()
    with pytest.raises(ValueError, match="^guidance_interval: expected a pair"):
        euler_sample(m, x, y, steps=4, mode="cfg", scale=1.0, guidance_interval=interval)


@pytest.mark.parametrize("interval", [[0.25, 0.75], torch.tensor([0.25, 0.75]), torch.tensor([0.25, 0.75]).half(),
                                      np.array([0.25, 0.75]), np.array([0, 1]), torch.tensor([0, 1]),
                                      (np.float64(0.25), np.float32(0.75)), range(0, 2)],
                         ids=["list", "tensor", "fp16 tensor", "array", "int array", "int tensor", "NumPy floats",
                              "range"])
def test_guidance_interval_accepted_forms_match_the_tuple(interval):
    m, (x, y) = Fake(), _xy()
    as_tuple = tuple(float(v) for v in (interval.tolist() if hasattr(interval, "tolist") else interval))
    kw = dict(steps=4, budget=8, mode="ccfg", scale=1.5, weak_budget=2)
    want = euler_sample(m, x, y, guidance_interval=as_tuple, **kw)
    assert torch.equal(euler_sample(m, x, y, guidance_interval=interval, **kw), want)
    assert not torch.equal(want, euler_sample(m, x, y, steps=4, budget=8))  # guard: some step was guided


# --- 9. the small ones ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [2**40, flow.MAX_STEPS + 1, np.int64(2**62)])
def test_euler_steps_has_an_upper_bound_named_before_allocating(steps):
    m, (x, y) = Fake(), _xy()
    with pytest.raises(ValueError, match=rf"^steps: expected a positive int <= {flow.MAX_STEPS:,} \(flow.MAX_STEPS\), "
                                         "got"):
        euler_sample(m, x, y, steps=steps)
    assert "[1, ``MAX_STEPS``]" in euler_sample.__doc__


def _sdpa_bshd(q, k, v, mask):
    """SDPA's math backend (its documented broadcasting of ``attn_mask``; the CPU flash kernel of some torch
    versions raises IndexError for a 1-D mask) on ``[B, S, H, D]``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("kind", ["bool", "additive -1e4", "additive finfo.min", "additive -inf"])
@pytest.mark.parametrize("sq", [5, 3])
def test_diffusers_one_dimensional_key_mask_matches_sdpa(kind, sq):
    from elit_kernels.integrations.diffusers import attention_bshd, elit_dispatch_attention

    g = _gen()
    b, sk, h, d = 3, 5, 4, 8
    q = torch.randn(b, sq, h, d, generator=g)
    k, v = torch.randn(b, sk, h, d, generator=g), torch.randn(b, sk, h, d, generator=g)
    keep = torch.rand(sk, generator=g) < 0.6
    keep[int(torch.randint(0, sk, (1,), generator=g))] = True  # at least one key: SDPA gives NaN rows otherwise
    if kind == "bool":
        mask = keep
    else:
        fill = {"additive -1e4": -1e4, "additive finfo.min": torch.finfo(torch.float32).min,
                "additive -inf": float("-inf")}[kind]
        mask = torch.zeros(sk).masked_fill(~keep, fill)
    want = _sdpa_bshd(q, k, v, mask)  # SDPA (diffusers' native backend) broadcasts [S_k] over batch, heads, queries
    torch.testing.assert_close(want, _sdpa_bshd(q, k, v, mask.view(1, 1, 1, sk)), rtol=0, atol=0)
    for got in (attention_bshd(q, k, v, mask, backend="reference"),
                elit_dispatch_attention(q, k, v, mask, elit_backend="reference")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_diffusers_refused_mask_shapes_say_why_truly():
    from elit_kernels.integrations.diffusers import attention_bshd

    g = _gen()
    b, s, h, d = 3, 5, 2, 8
    q = torch.randn(b, s, h, d, generator=g)
    per_query = torch.rand(s, s, generator=g) < 0.7  # [S_q, S_k]: SDPA broadcasts it, diffusers reads 2-D as [B, S_k]
    per_query[:, 0] = True
    _sdpa_bshd(q, q, q, per_query)  # broadcasts
    with pytest.raises(ValueError, match=r"^attn_mask: shape \(5, 5\) is not supported; expected \[S_k\]"):
        attention_bshd(q, q, q, per_query, backend="reference")
    wrong_sk = torch.ones(s + 1, dtype=torch.bool)
    with pytest.raises(RuntimeError):
        _sdpa_bshd(q, q, q, wrong_sk)  # does not broadcast
    with pytest.raises(ValueError, match=r"^attn_mask: shape \(6,\) does not broadcast to \[batch=3, heads=2, "):
        attention_bshd(q, q, q, wrong_sk, backend="reference")


def test_rectified_flow_loss_names_x0_for_what_the_model_refuses_of_x():
    m = _random_model(torch.float32)
    g = _gen()
    y = torch.tensor([1, 2])
    with pytest.raises(TypeError, match=r"^x0: dtype torch.float64 does not match the model's parameters"):
        rectified_flow_loss(m, torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), y, 4)
    with pytest.raises(ValueError, match=r"^x0: expected \[B, 4, 8, 8\], got \(2, 3, 8, 8\)"):
        rectified_flow_loss(m, torch.randn(2, 3, 8, 8, generator=g), y, 4)
    # what the model names by the loss's own argument names is left as it is
    with pytest.raises(ValueError, match="^budgets: "):
        rectified_flow_loss(m, torch.randn(2, 4, 8, 8, generator=g), y, 10**6)
    # a valid call still equals the hand formula in float32
    x0, noise, t = (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g),
                    torch.rand(2, generator=g))
    loss = rectified_flow_loss(m, x0, y, 4, t=t, noise=noise)
    tt = t.view(2, 1, 1, 1)
    with torch.no_grad():
        want = F.mse_loss(m((1 - tt) * x0 + tt * noise, t, y, 4), noise - x0)
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-6)
