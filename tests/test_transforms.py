"""Autograd transforms the custom ops cannot follow (``elit_kernels._transforms``).

PyTorch differentiates a ``torch.library`` custom op through its ``register_autograd`` formula in reverse mode
only: under forward-mode AD it gave every compiled, Triton and grouped-``torch`` op a zero tangent, silently, and
under ``torch.func.grad`` an error naming nothing (a fuzz). Default dispatch must give the true derivative (the
``torch`` backend's PyTorch ops, or the reference), a backend asked for by name must refuse naming the transform,
and the fused elementwise ops must refuse naming ``elementwise='fused'``. Every check compares with a plain fp64
softmax attention written here, on random inputs."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.func as tf
from torch.autograd import forward_ad as fwAD

from cases import backend_params
from elit_kernels import varlen_attention
from elit_kernels._transforms import FORWARD_MODE, FUNC_GRAD, active_transform
from elit_kernels.attention import AttentionPlan, SegmentRuns, get_backend


def _cu(lens):
    return torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)


def _truth(q, k, v, lens_q, lens_k, *, causal=False, softcap=0.0):
    """Per-segment fp64 softmax attention in plain differentiable ops (GQA by repeating k/v heads)."""
    rep = q.shape[1] // k.shape[1]
    outs, a, b = [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        qs, ks, vs = q[a:a + lq], k[b:b + lk].repeat_interleave(rep, 1), v[b:b + lk].repeat_interleave(rep, 1)
        s = torch.einsum("ihd,jhd->hij", qs, ks) * q.shape[-1] ** -0.5
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if causal:
            i = torch.arange(lq)[:, None]
            j = torch.arange(lk)[None]
            s = s.masked_fill(j > i + (lk - lq), float("-inf"))
        p = torch.softmax(s, -1) if lk else s.new_zeros(s.shape)
        outs.append(torch.einsum("hij,jhd->ihd", p, vs) if lk else qs.new_zeros(qs.shape))
        a, b = a + lq, b + lk
    outs.append(q.new_zeros((q.shape[0] - a,) + q.shape[1:]))  # rows past cu_seqlens_q[-1]
    return torch.cat(outs)


# (lengths q, lengths k, options): the SDPA path (few runs), many runs (the grouped op's path), single keys,
# empty segments and rows past the end, GQA, causal, softcap and LSE (which leave SDPA's path)
SHAPES = {
    "uniform": ([3, 3, 3], [4, 4, 4], {}),
    "many-runs": ([2, 3] * 40, [3, 2] * 40, {}),
    "single-key-empty": ([2, 0, 3], [1, 2, 0], {}),
    "gqa-causal": ([3, 4], [3, 5], {"causal": True, "heads_kv": 1}),
    "softcap": ([3, 2], [2, 4], {"softcap": 3.0}),
}


def _inputs(name, seed=0, extra_rows=1):
    lens_q, lens_k, opt = SHAPES[name]
    g = torch.Generator().manual_seed(seed)
    h, hkv = 2, opt.get("heads_kv", 2)
    q = torch.randn(sum(lens_q) + extra_rows, h, 4, dtype=torch.float64, generator=g)
    k = torch.randn(sum(lens_k), hkv, 4, dtype=torch.float64, generator=g)
    v = torch.randn(sum(lens_k), hkv, 4, dtype=torch.float64, generator=g)
    kw = {x: opt[x] for x in ("causal", "softcap") if x in opt}
    return q, k, v, lens_q, lens_k, kw


def _call(backend, lens_q, lens_k, kw):
    cq, ck = _cu(lens_q), _cu(lens_k)
    return lambda q, k, v: varlen_attention(q, k, v, cq, ck, max(lens_q), max(lens_k), backend=backend, **kw)


def test_active_transform_names_each_transform_and_nothing_else():
    seen = []

    def f(x):
        seen.append(active_transform(x))
        return x * 2

    x = torch.randn(3)
    f(x)
    tf.jvp(f, (x,), (x,))
    tf.grad(lambda x: f(x).sum())(x)
    tf.vmap(f)(torch.randn(2, 3))
    tf.grad(lambda x: tf.vmap(f)(x).sum())(torch.randn(2, 3))  # grad outside vmap: still a grad transform
    tf.jacfwd(tf.jacrev(lambda x: f(x).sum()))(x)  # hessian: forward over reverse
    with fwAD.dual_level():
        f(fwAD.make_dual(x, torch.ones_like(x)))
        f(x)  # a level is open but x carries no tangent
    assert seen == [None, FORWARD_MODE, FUNC_GRAD, None, FUNC_GRAD, FORWARD_MODE, FORWARD_MODE, None], seen


@pytest.mark.parametrize("shape", list(SHAPES))
def test_default_dispatch_gives_the_true_jvp(shape):
    q, k, v, lq, lk, kw = _inputs(shape)
    tq, tk, tv = (torch.randn_like(t) for t in (q, k, v))
    out, tangent = tf.jvp(_call(None, lq, lk, kw), (q, k, v), (tq, tk, tv))
    want, want_t = tf.jvp(lambda a, b, c: _truth(a, b, c, lq, lk, **kw), (q, k, v), (tq, tk, tv))
    assert want_t.abs().max() > 0.1  # a real tangent: zeros (the fault) cannot pass
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tangent, want_t, rtol=1e-9, atol=1e-9)
    with fwAD.dual_level():  # the same through torch.autograd.forward_ad
        dual = _call(None, lq, lk, kw)(fwAD.make_dual(q, tq), fwAD.make_dual(k, tk), fwAD.make_dual(v, tv))
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, want_t, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_default_dispatch_gives_the_true_func_grad(shape):
    q, k, v, lq, lk, kw = _inputs(shape, seed=1)
    w = torch.randn(q.shape, dtype=torch.float64)
    got = tf.grad(lambda a, b, c: (_call(None, lq, lk, kw)(a, b, c) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    want = tf.grad(lambda a, b, c: (_truth(a, b, c, lq, lk, **kw) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", backend_params(keep=lambda b: b.name not in ("reference",)))
def test_a_named_backend_runs_a_transform_correctly_or_refuses_naming_it(backend):
    q, k, v, lq, lk, kw = _inputs("uniform", seed=2)
    b = get_backend(backend)
    dt = torch.float32 if torch.float64 not in b.dtypes else torch.float64
    q, k, v = (t.to(dt) for t in (q, k, v))
    tq, tk, tv = (torch.randn_like(t) for t in (q, k, v))
    for transform, run in ((FORWARD_MODE, lambda f: tf.jvp(f, (q, k, v), (tq, tk, tv))[1]),
                           (FUNC_GRAD, lambda f: tf.grad(lambda a: f(a, k, v).sum())(q))):
        f = _call(backend, lq, lk, kw)
        if b.supports_transforms:
            want = run(lambda a, c, d: _truth(a, c, d, lq, lk, **kw))
            torch.testing.assert_close(run(f), want, rtol=1e-5, atol=1e-5)
        else:
            with pytest.raises(ValueError, match=rf"backend {backend!r} cannot run these inputs.*under "
                                                 rf"{transform.split(' ')[0]}.*'torch' and 'reference' backends"):
                run(f)


def test_vmap_alone_is_not_refused():
    """vmap runs a custom op one sample at a time, correctly: no backend refuses it."""
    lq, lk = [3, 2], [2, 4]
    qs = torch.randn(3, sum(lq), 2, 4, dtype=torch.float64)
    k, v = (torch.randn(sum(lk), 2, 4, dtype=torch.float64) for _ in range(2))
    want = torch.stack([_truth(q, k, v, lq, lk) for q in qs])
    for backend in ("cpp", "torch", None):
        if backend == "cpp" and not get_backend("cpp").is_available():
            print("cpp backend not built here: vmap checked on torch and default dispatch only")
            continue
        got = tf.vmap(lambda q: _call(backend, lq, lk, {})(q, k, v))(qs)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_a_plan_follows_the_transform_of_each_call():
    """An AttentionPlan keeps a runner per call signature; a jvp call after an ordinary one (and the other way
    round) must not reuse the other's runner (the kept SDPA runner has no forward derivative)."""
    q, k, v, lq, lk, _ = _inputs("uniform", seed=3, extra_rows=0)
    plan = AttentionPlan(_cu(lq), _cu(lk), 3, 4, segments=SegmentRuns.from_lengths(lq, lk))
    tq, tk, tv = (torch.randn_like(t) for t in (q, k, v))
    want, want_t = tf.jvp(lambda a, b, c: _truth(a, b, c, lq, lk), (q, k, v), (tq, tk, tv))
    for _ in range(2):
        torch.testing.assert_close(plan(q, k, v), want, rtol=1e-10, atol=1e-10)
        out, t = tf.jvp(plan, (q, k, v), (tq, tk, tv))
        torch.testing.assert_close(t, want_t, rtol=1e-9, atol=1e-9)


def test_fused_elementwise_refuses_a_transform_and_native_gives_the_true_jvp():
    from elit_kernels.elementwise import ELEMENTWISE_IMPLS, get_elementwise
    from elit_kernels.layout import TokenRuns

    runs = TokenRuns.from_counts([3, 0, 2])
    x = torch.randn(5, 6, dtype=torch.float64)
    sh, sc, gate = (torch.randn(3, 6, dtype=torch.float64) for _ in range(3))
    y, tx = torch.randn_like(x), torch.randn_like(x)
    want = tf.jvp(lambda a: get_elementwise("reference").layernorm_modulate(a, sh, sc, runs, 1e-6), (x,), (tx,))[1]
    assert want.abs().max() > 0.1
    got = tf.jvp(lambda a: get_elementwise("native").layernorm_modulate(a, sh, sc, runs, 1e-6), (x,), (tx,))[1]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if "fused" not in ELEMENTWISE_IMPLS:
        pytest.skip("the compiled extension is not built here: no fused elementwise ops to check")
    fused = get_elementwise("fused")
    with pytest.raises(NotImplementedError, match=r"elementwise='fused' \(layernorm_modulate\).*forward-mode AD.*"
                                                  r"elementwise='native'"):
        tf.jvp(lambda a: fused.layernorm_modulate(a, sh, sc, runs, 1e-6), (x,), (tx,))
    with pytest.raises(NotImplementedError, match=r"elementwise='fused' \(gated_residual\).*torch\.func\.grad"):
        tf.grad(lambda a: fused.gated_residual(a, y, gate, runs).sum())(x)
    # outside a transform the fused ops still run (and differentiate in reverse mode)
    xr = x.clone().requires_grad_()
    fused.gated_residual(xr, y, gate, runs).sum().backward()
    torch.testing.assert_close(xr.grad, torch.ones_like(x))


@pytest.mark.parametrize("preset", ["paper", "released"])
def test_model_jvp_and_func_grad_match_the_reference_model(preset):
    """The ELIT model (default dispatch, mixed budgets: SDPA runs, single-key Write segments, an empty sample)
    under torch.func.jvp and torch.func.grad equals the reference backend's model."""
    from elit_kernels.models import ElitDiT, elit_config
    from elit_kernels.models.config import RELEASED_SWITCHES

    cfg = elit_config("tiny", 64, **(RELEASED_SWITCHES if preset == "released" else {}))
    torch.manual_seed(0)
    models = {be: ElitDiT(cfg, backend=be).double() for be in (None, "reference")}
    with torch.no_grad():
        for p in models[None].parameters():
            p.add_(torch.randn_like(p) * 0.05)  # the zero-initialised adaLN and final layers: every path live
    models["reference"].load_state_dict(models[None].state_dict())
    budgets = [4, 1, 0, 2]
    x = torch.randn(4, cfg.in_channels, cfg.input_size, cfg.input_size, dtype=torch.float64)
    t, y = torch.rand(4, dtype=torch.float64), torch.randint(0, cfg.num_classes, (4,))
    tx = torch.randn_like(x)
    res = {be: tf.jvp(lambda a: m(a, t, y, budgets), (x,), (tx,)) for be, m in models.items()}
    assert res["reference"][1].abs().max() > 1e-3
    torch.testing.assert_close(res[None][1], res["reference"][1], rtol=1e-9, atol=1e-9)
    w = torch.randn_like(res[None][0])
    grads = {be: tf.grad(lambda a: (m(a, t, y, budgets) * w).sum())(x) for be, m in models.items()}
    torch.testing.assert_close(grads[None], grads["reference"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", backend_params(default=True))
def test_cu_seqlens_made_under_inference_mode_train(backend):
    """cu_seqlens built once under torch.inference_mode() (a layout made for sampling) then used in a training
    call: every backend gives the reference's gradients (the custom ops' backward saved them: "Inference tensors
    cannot be saved for backward", naming nothing)."""
    lq, lk = [3, 0, 2], [2, 3, 1]
    with torch.inference_mode():
        cq, ck = _cu(lq), _cu(lk)
    b = get_backend(backend) if backend is not None else None
    dt = torch.float64 if b is None or torch.float64 in b.dtypes else torch.float32
    q, k, v = (torch.randn(sum(n), 2, 4, dtype=dt, requires_grad=True) for n in (lq, lk, lk))
    try:
        out = varlen_attention(q, k, v, cq, ck, 3, 3, backend=backend)
    except ValueError as e:
        pytest.skip(f"backend {backend!r} does not run this case: {e}")
    w = torch.randn_like(out)
    (out * w).sum().backward()
    got = [t.grad for t in (q, k, v)]
    want = torch.autograd.grad((_truth(q, k, v, lq, lk) * w).sum(), (q, k, v))
    tol = 1e-9 if dt == torch.float64 else 1e-5
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, rtol=tol, atol=tol)


def test_a_transform_traced_by_compile_gives_the_true_derivative():
    """A jvp (or forward-AD level) inside a torch.compile region: dynamo traces the transform, and the check of
    a plain call cannot read which one it is; the torch backend's compiled path is the grouped custom op, which got
    a zero tangent (a review). Default dispatch and 'torch' must give the true JVP, fullgraph too."""
    q, k, v, lq, lk, _ = _inputs("uniform", seed=4, extra_rows=0)
    seg = SegmentRuns.from_lengths(lq, lk)
    cq, ck = _cu(lq), _cu(lk)
    tq = torch.randn_like(q)
    want = tf.jvp(lambda a: _truth(a, k, v, lq, lk), (q,), (tq,))[1]
    for backend in (None, "torch"):
        def f(a):
            return varlen_attention(a, k, v, cq, ck, 3, 4, backend=backend, segments=seg)

        got = torch.compile(lambda a: tf.jvp(f, (a,), (tq,))[1], backend="aot_eager", fullgraph=True)(q)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # torch.func.grad traced by compile: the check breaks the graph and the call runs eagerly, where it is seen
    w = torch.randn(q.shape, dtype=torch.float64)
    want_g = tf.grad(lambda a: (_truth(a, k, v, lq, lk) * w).sum())(q)
    got_g = torch.compile(tf.grad(lambda a: (varlen_attention(a, k, v, cq, ck, 3, 4, segments=seg) * w).sum()),
                          backend="aot_eager")(q)
    torch.testing.assert_close(got_g, want_g, rtol=1e-9, atol=1e-9)


def test_nested_func_grad_runs_a_kernel_with_a_second_derivative():
    """grad of grad: PyTorch's fused SDPA kernels have no second derivative (their backward's derivative is not
    implemented); with two torch.func.grad levels on the stack the torch backend pins SDPA's math kernel."""
    q, k, v, lq, lk, _ = _inputs("uniform", seed=5)
    w = torch.randn(q.shape, dtype=torch.float64)

    def hvp_like(fn):
        g = tf.grad(lambda a: (fn(a, k, v) * w).sum())
        return tf.grad(lambda a: (g(a) * w).sum())(q)

    want = hvp_like(lambda a, b, c: _truth(a, b, c, lq, lk))
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(hvp_like(_call(None, lq, lk, {})), want, rtol=1e-9, atol=1e-9)


def test_the_decision_key_and_a_plan_signature_hold_the_transform():
    """A decision cached for a plain call must not answer the same call under a transform (on a GPU the plain
    call's choice is a kernel whose op the transform cannot follow), nor the other way round."""
    from elit_kernels.attention import dispatch as D
    from elit_kernels.attention import validate_inputs

    q, k, v, lq, lk, _ = _inputs("uniform", seed=6)
    cq, ck = _cu(lq), _cu(lk)
    keys = {}

    def key(name):
        def f(a):
            keys[name] = D._decision_key(validate_inputs(a, k, v, cq, ck, 3, 4))
            return a
        return f

    key("plain")(q)
    tf.jvp(key("jvp"), (q,), (q,))
    tf.grad(lambda a: key("grad")(a).sum())(q)
    assert len(set(keys.values())) == 3, keys
