"""``AttentionPlan`` (elit_kernels/attention/plan.py): the same answers as ``varlen_attention``, the argument
checks and dispatch run once per input signature, and nothing cached survives what could make it stale."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from cases import CASES, cases

import elit_kernels
from elit_kernels.attention import AttentionPlan, SegmentRuns, dispatch as D, known_answer as KA, plan as P
from elit_kernels.attention import registry as R, varlen_attention
from elit_kernels.testing import random_varlen_inputs


def _case_inputs(case, seed=0, grad=False, dtype=torch.float32):
    lens_q, lens_k = case.lens
    return random_varlen_inputs(lens_q, lens_k, 2, 12, dtype=dtype, seed=seed, kv_heads=case.kv_heads,
                                extra_q=case.extra_q, extra_k=case.extra_k, requires_grad=grad)


class _Count:
    """Counts the plan module's calls of validate_inputs and select_backend."""

    def __init__(self, monkeypatch):
        self.validate = self.select = 0
        real_v, real_s = P.validate_inputs, P.select_backend

        def v(*a, **k):
            self.validate += 1
            return real_v(*a, **k)

        def s(*a, **k):
            self.select += 1
            return real_s(*a, **k)

        monkeypatch.setattr(P, "validate_inputs", v)
        monkeypatch.setattr(P, "select_backend", s)


@pytest.mark.parametrize("with_segments", [False, True], ids=["tensors", "segments"])
@pytest.mark.parametrize("case", cases("contract"))
def test_a_plan_gives_what_varlen_attention_gives_values_lse_and_gradients(case, with_segments):
    lens_q, lens_k = case.lens
    seg = SegmentRuns.from_lengths(lens_q, lens_k) if with_segments else None
    kw = dict(causal=case.causal, window_size=case.window, softcap=case.softcap, segments=seg)
    scale = {} if case.scale is None else {"softmax_scale": case.scale}
    plan = AttentionPlan(*_case_inputs(case)[3:], **kw, **scale)
    lse_plan = AttentionPlan(*_case_inputs(case)[3:], return_lse=True, softmax_scale=0.3, **kw)
    for seed in (1, 2):  # the second call of a signature takes the cached path
        q, k, v, cq, ck, mq, mk = _case_inputs(case, seed=seed, grad=True)
        want = varlen_attention(q, k, v, cq, ck, mq, mk, **kw, **scale)
        got = plan(q, k, v)
        assert torch.equal(got, want)
        gw = torch.autograd.grad(want, (q, k, v), torch.ones_like(want))
        gg = torch.autograd.grad(got, (q, k, v), torch.ones_like(got))
        assert all(torch.equal(a, b) for a, b in zip(gg, gw))
        with torch.no_grad():
            o1, l1 = lse_plan(q, k, v)
            o2, l2 = varlen_attention(q, k, v, cq, ck, mq, mk, return_lse=True, softmax_scale=0.3, **kw)
        assert torch.equal(o1, o2) and torch.equal(l1, l2)


def test_checks_and_dispatch_run_once_per_signature(monkeypatch):
    n = _Count(monkeypatch)
    case = CASES["core-uniform"]
    q, k, v, cq, ck, mq, mk = _case_inputs(case)
    plan = AttentionPlan(cq, ck, mq, mk, segments=SegmentRuns.from_lengths(*case.lens))
    for _ in range(3):
        plan(q, k, v)
    assert (n.validate, n.select) == (1, 1)
    for other in (dict(dtype=torch.float64), dict(grad=True)):  # a new signature: checked and dispatched again
        q2, k2, v2 = _case_inputs(case, **other)[:3]
        plan(q2, k2, v2)
        plan(q2, k2, v2)
    with torch.no_grad():  # gradients not needed: the first signature again
        plan(q2, k2, v2)
    plan(q, k, v, backend="reference")
    plan(q, k, v, backend="reference")
    assert (n.validate, n.select) == (4, 4)
    q3 = torch.randn(q.shape[0], q.shape[1], 16)
    with pytest.raises(ValueError, match="k: head dim 12 does not match q's head dim 16"):
        plan(q3, k, v)


def test_bad_tensors_are_named_on_every_call():
    case = CASES["core-uniform"]
    q, k, v, cq, ck, mq, mk = _case_inputs(case)
    plan = AttentionPlan(cq, ck, mq, mk)
    plan(q, k, v)
    with pytest.raises(TypeError, match="q: expected a torch.Tensor, got list"):
        plan([1.0], k, v)
    with pytest.raises(TypeError, match="k: dtype torch.float64 does not match q's dtype torch.float32"):
        plan(q, k.double(), v)
    with pytest.raises(ValueError, match="cu_seqlens_q: last element 48 is past the end of the packed tokens"):
        plan(q[:40], k, v)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(cu_seqlens_q=[0, 4]), TypeError, "cu_seqlens_q: expected a torch.Tensor, got list"),
    (dict(cu_seqlens_k=torch.tensor([0, 24, 48])), TypeError, "cu_seqlens_k: expected dtype torch.int32"),
    (dict(cu_seqlens_k=torch.tensor([0, 48], dtype=torch.int32)), ValueError,
     "cu_seqlens_k: has 2 elements but cu_seqlens_q has 3"),
    (dict(max_seqlen_q=-1), ValueError, "max_seqlen_q: must be >= 0, got -1"),
    (dict(max_seqlen_k="24"), TypeError, "max_seqlen_k: expected an int"),
    (dict(segments=SegmentRuns.from_lengths([24], [24])), ValueError,
     "segments: describes 1 segments, cu_seqlens_q has 2"),
    (dict(segments=SegmentRuns.from_lengths([20, 24], [24, 24])), ValueError,
     r"segments: segment 0 has \(Lq, Lk\) = \(20, 24\) in segments but \(24, 24\)"),
    (dict(segments=(24, 24)), TypeError, "segments: expected an elit_kernels.attention.SegmentRuns or None, got tuple"),
    (dict(softmax_scale="0.1"), TypeError, "softmax_scale: expected a float or None, got str"),
    (dict(causal=1), TypeError, "causal: expected a bool, got int"),
    (dict(causal=torch.tensor(True)), TypeError, "causal: expected a bool, got torch.Tensor"),
    (dict(window_size=(-2, 0)), ValueError, "window_size: left must be >= -1"),
    (dict(softcap=-1.0), ValueError, r"softcap: expected 0 \(off\) or a finite float in float32's normal range"),
    (dict(softmax_scale=float("inf")), ValueError, "softmax_scale: expected a finite float within float32's range"),
    (dict(return_lse="False"), TypeError, "return_lse: expected a bool, got str"),
    (dict(window_size={1: 0, 2: 0}), TypeError, r"window_size: expected a pair \(left, right\)"),
    (dict(window_size=iter([1, 1])), TypeError, r"window_size: expected a pair \(left, right\)"),
])
def test_bad_plan_arguments_are_named_when_the_plan_is_made(kwargs, err, match):
    cq = ck = torch.tensor([0, 24, 48], dtype=torch.int32)
    args = dict(cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=24, max_seqlen_k=24)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        AttentionPlan(args.pop("cu_seqlens_q"), args.pop("cu_seqlens_k"), args.pop("max_seqlen_q"),
                      args.pop("max_seqlen_k"), **args)


def test_numpy_bools_are_taken_as_bools():
    # np.True_ (what array.any() returns) is a bool to a plan, as to varlen_attention: same answer as True
    cq = ck = torch.tensor([0, 24, 48], dtype=torch.int32)
    q, k, v = (torch.randn(48, 2, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    plan = AttentionPlan(cq, ck, 24, 24, causal=np.True_, return_lse=np.True_)
    out, lse = plan(q, k, v)
    want, want_lse = varlen_attention(q, k, v, cq, ck, 24, 24, causal=True, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    assert not torch.equal(out, varlen_attention(q, k, v, cq, ck, 24, 24, causal=False))  # the flag mattered


class _Spy(R.Backend):
    name, priority, known_answer, devices = "_plan_spy", 100_000, False, ("cpu",)

    def __init__(self):
        self.calls = 0

    def forward(self, inp):
        self.calls += 1
        return R.get_backend("reference").forward(inp)


def test_a_cached_decision_is_dropped_whenever_dispatch_could_change(monkeypatch):
    case = CASES["core-uniform"]
    q, k, v, cq, ck, mq, mk = _case_inputs(case)
    plan = AttentionPlan(cq, ck, mq, mk, segments=SegmentRuns.from_lengths(*case.lens))
    n = _Count(monkeypatch)
    was = KA.known_answer_checks()
    spy = _Spy()
    try:
        plan(q, k, v)
        R.register_backend(spy)  # a new backend of the highest priority: the next call must use it
        plan(q, k, v)
        assert spy.calls == 1
        R._REGISTRY.pop(spy.name)  # removed behind the registry's back: the cached backend is not used
        plan(q, k, v)
        assert spy.calls == 1
        count = n.select
        for change in (lambda: KA.set_known_answer_checks("off"), KA.clear_verdicts, D.clear_decisions):
            change()
            plan(q, k, v)
            assert n.select == count + 1, change
            count += 1
        with D.tuning(False):  # entering and leaving tuning() re-dispatches
            plan(q, k, v)
        plan(q, k, v)
        assert n.select == count + 2
    finally:
        R._REGISTRY.pop(spy.name, None)
        KA.set_known_answer_checks(was)
        D.clear_decisions()


def test_an_in_place_write_to_cu_seqlens_is_checked_again(monkeypatch):
    case = CASES["core-uniform"]
    q, k, v, cq, ck, mq, mk = _case_inputs(case)
    cq, ck = cq.clone(), ck.clone()
    plan = AttentionPlan(cq, ck, mq, mk, segments=SegmentRuns.from_lengths(*case.lens))
    plan(q, k, v)
    cq[1] = 20  # the segments now disagree with cu_seqlens_q
    with pytest.raises(ValueError, match=r"segments: segment 0 has \(Lq, Lk\) = \(24, 24\) in segments but \(20, 24\)"):
        plan(q, k, v)


def test_under_capture_a_call_is_the_plain_path(monkeypatch):
    # a backend's reasons can differ under capture (the torch backend refuses inputs whose lengths it would read
    # on the host), so a capture never reuses an eager decision, and nothing made there is kept
    case = CASES["core-uniform"]
    q, k, v, cq, ck, mq, mk = _case_inputs(case)
    plan = AttentionPlan(cq, ck, mq, mk)
    plan(q, k, v)
    n = _Count(monkeypatch)
    monkeypatch.setattr(P, "_capturing", lambda: True)
    plan(q, k, v)
    plan(q, k, v)
    assert (n.validate, n.select) == (2, 2) and len(plan._runs) == 1


def test_the_environment_override_is_read_on_every_call(monkeypatch):
    case = CASES["core-uniform"]
    q, k, v, cq, ck, mq, mk = _case_inputs(case)
    plan = AttentionPlan(cq, ck, mq, mk)
    monkeypatch.setenv("ELIT_BACKEND", "reference")
    want_ref = plan(q, k, v)
    monkeypatch.delenv("ELIT_BACKEND")
    assert torch.equal(plan(q, k, v), varlen_attention(q, k, v, cq, ck, mq, mk))
    monkeypatch.setenv("ELIT_BACKEND", "nope")  # after cached calls: still refused, as varlen_attention refuses it
    with pytest.raises(ValueError, match="ELIT_BACKEND='nope': unknown backend 'nope'"):
        plan(q, k, v)
    monkeypatch.setenv("ELIT_BACKEND", "reference")
    assert torch.equal(plan(q, k, v), want_ref)
    assert P._env_backend() is not None
    monkeypatch.setattr(P, "_ENV_STORE", None)  # where os.environ keeps no raw store: the documented read
    assert P._env_backend() == "reference"
    monkeypatch.delenv("ELIT_BACKEND")
    assert P._env_backend() is None


def test_a_backend_that_is_not_a_name_is_named_in_the_error():
    case = CASES["core-uniform"]
    q, k, v, cq, ck, mq, mk = _case_inputs(case)
    plan = AttentionPlan(cq, ck, mq, mk)
    for bad in (["torch"], {"torch": 1}, 3):
        with pytest.raises(TypeError, match="backend: expected a str or None, got"):
            plan(q, k, v, backend=bad)


def test_turning_the_value_checks_back_on_checks_again():
    from elit_kernels.attention import set_value_checks

    case = CASES["core-odd"]
    q, k, v, cq, ck, mq, mk = _case_inputs(case)
    set_value_checks(False)
    try:
        plan = AttentionPlan(cq, ck, 2, 2)  # shorter than the longest segment: unchecked now
        plan(q, k, v)
        set_value_checks(True)
        with pytest.raises(ValueError, match=r"max_seqlen_q: 2 is smaller than the longest segment \(63\)"):
            plan(q, k, v)
    finally:
        set_value_checks(True)


def test_what_a_plan_was_made_with_cannot_change_behind_it():
    cq = torch.tensor([0, 3, 8], dtype=torch.int32)
    ck = torch.tensor([0, 4, 10], dtype=torch.int32)
    window = [1, 1]
    plan = AttentionPlan(cq, ck, 5, 6, window_size=window)
    window[0] = 0  # the caller's list changes after the plan was made: the plan keeps what it was given
    q, k = torch.randn(8, 2, 16), torch.randn(10, 2, 16)
    assert torch.equal(plan(q, k, k), varlen_attention(q, k, k, cq, ck, 5, 6, window_size=(1, 1)))
    window = torch.tensor([1, 1])  # a tensor is read into ints when the plan is made, as a list is copied
    plan = AttentionPlan(cq, ck, 5, 6, window_size=window)
    window.fill_(0)
    assert torch.equal(plan(q.double(), k.double(), k.double()),
                       varlen_attention(q.double(), k.double(), k.double(), cq, ck, 5, 6, window_size=(1, 1)))
    for name in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "segments"):
        with pytest.raises(AttributeError):
            setattr(plan, name, None)
    assert plan.cu_seqlens_q is cq and plan.max_seqlen_k == 6 and plan.segments is None
    with pytest.raises(ValueError, match=r"max_seqlen_q: 4 is smaller than the longest segment \(5\) in segments"):
        AttentionPlan(cq, ck, 4, 6, segments=SegmentRuns.from_lengths([3, 5], [4, 6]))
    with pytest.raises(ValueError, match=r"max_seqlen_k: 5 is smaller than the longest segment \(6\) in segments"):
        AttentionPlan(cq, ck, 5, 5, segments=SegmentRuns.from_lengths([3, 5], [4, 6]))


def test_a_plan_remembers_a_bounded_number_of_signatures(monkeypatch):
    monkeypatch.setattr(P, "_MAX_SIGNATURES", 2)
    cq = ck = torch.tensor([0, 3], dtype=torch.int32)
    plan = AttentionPlan(cq, ck, 3, 3)
    for d in (8, 12, 16):
        x = torch.randn(3, 1, d)
        plan(x, x, x)
    assert len(plan._runs) == 2 and [k[0][-1] for k in plan._runs] == [12, 16]  # the oldest went


def test_a_plan_compiles_without_graph_breaks():
    case = CASES["core-uniform"]
    q, k, v, cq, ck, mq, mk = _case_inputs(case)
    plan = AttentionPlan(cq, ck, mq, mk, segments=SegmentRuns.from_lengths(*case.lens))
    plan(q, k, v)  # a cached eager signature: tracing must not use (or change) the cache
    compiled = torch.compile(lambda q, k, v: plan(q, k, v) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), plan(q, k, v) * 2)


def test_the_model_forward_checks_and_dispatches_only_on_a_layouts_first_forward(monkeypatch):
    from elit_kernels.models import ElitDiT, elit_config
    from elit_kernels.models.elit_dit import attention_plans

    torch.manual_seed(0)
    cfg = elit_config("tiny", 64)
    m = ElitDiT(cfg, backend="torch").eval()
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    t, y = torch.rand(2), torch.tensor([0, 1])
    with torch.no_grad():
        first = m(x, t, y, [3, 1])
        n = _Count(monkeypatch)
        again = m(x, t, y, [3, 1])
    assert torch.equal(first, again) and (n.validate, n.select) == (0, 0)
    lay = m.layout([3, 1], 2, "cpu")
    plans = attention_plans(lay)
    assert set(plans) == {"image", "read", "core", "write"} and attention_plans(lay) is plans
    assert plans["core"].segments is lay.core_segments and plans["read"].cu_seqlens_q is lay.read_args[0]
    assert "AttentionPlan(" in repr(plans["core"]) and "segments on the host" in repr(plans["core"])


def test_the_plan_is_public():
    assert elit_kernels.attention.AttentionPlan is AttentionPlan


def test_the_overhead_measurement_times_the_added_work_and_restores_the_backend_call():
    from elit_kernels import attention as A
    from elit_kernels.bench.attention_cases import dispatch_overhead_us

    real = A.run_backend
    o = dispatch_overhead_us("cpu", torch.float32, 2, 16, reps=3)
    assert A.run_backend is real and P.run_backend is real
    assert all("plan_runner" not in vars(b) for b in R._REGISTRY.values())  # the no-op runner is gone again
    assert set(o) == {"added_us", "plan_added_us", "direct_us", "backend"}
    assert all(o[k] > 0 for k in ("added_us", "plan_added_us", "direct_us")) and o["backend"] in R.known_backends()


def test_inference_tensors_as_cu_seqlens_work_in_varlen_attention_and_a_plan():
    # inference tensors keep no version counter; the once-per-layout check and the plan read it
    from elit_kernels.attention.inputs import tensor_version

    case = CASES["core-uniform"]
    q, k, v, cq, ck, mq, mk = _case_inputs(case)
    seg = SegmentRuns.from_lengths(*case.lens)
    want = varlen_attention(q, k, v, cq, ck, mq, mk, segments=seg)
    with torch.inference_mode():
        icq, ick = cq.clone(), ck.clone()
        assert tensor_version(icq) == -1
        plan = AttentionPlan(icq, ick, mq, mk, segments=seg)
        for _ in range(2):
            assert torch.equal(varlen_attention(q, k, v, icq, ick, mq, mk, segments=seg), want)
            assert torch.equal(plan(q, k, v), want)
    c = cq.clone()
    before = tensor_version(c)
    c.add_(0)
    assert tensor_version(c) == before + 1


def test_under_capture_the_backend_argument_still_decides(monkeypatch):
    case = CASES["core-uniform"]
    q, k, v, cq, ck, mq, mk = _case_inputs(case)
    plan = AttentionPlan(cq, ck, mq, mk)
    monkeypatch.setattr(P, "_capturing", lambda: True)
    with pytest.raises(ValueError, match="backend: unknown backend 'no_such_backend'"):
        plan(q, k, v, backend="no_such_backend")


@pytest.mark.parametrize("grad", ["q", "k", "v"])
def test_any_input_that_needs_gradients_is_a_new_signature(monkeypatch, grad):
    # a decision made without gradients may pick a forward-only path: one tensor needing them must dispatch again
    n = _Count(monkeypatch)
    case = CASES["core-uniform"]
    q, k, v, cq, ck, mq, mk = _case_inputs(case)
    plan = AttentionPlan(cq, ck, mq, mk)
    plan(q, k, v)
    t = dict(q=q, k=k, v=v)
    t[grad] = t[grad].clone().requires_grad_(True)
    out = plan(t["q"], t["k"], t["v"])
    assert out.requires_grad and n.select == 2


def test_a_plan_keeps_no_tensor_of_its_calls_alive():
    import gc
    import weakref

    case = CASES["core-uniform"]
    q, k, v, cq, ck, mq, mk = _case_inputs(case)
    plan = AttentionPlan(cq, ck, mq, mk)
    refs = [weakref.ref(t) for t in (q, k, v)]
    out = plan(q, k, v)
    del q, k, v, out
    gc.collect()
    assert [r() for r in refs] == [None, None, None] and len(plan._runs) == 1


def test_a_plan_with_no_rows_and_its_description():
    cu0 = torch.zeros(1, dtype=torch.int32)
    empty = torch.randn(0, 2, 8)
    plan = AttentionPlan(cu0, cu0, 0, 0)
    assert plan(empty, empty, empty).shape == (0, 2, 8) and (plan.max_seqlen_q, plan.max_seqlen_k) == (0, 0)
    assert repr(plan) == "AttentionPlan(0 segments, max_seqlen_q=0, max_seqlen_k=0, segments unknown)"
    cq = torch.tensor([0, 3, 8], dtype=torch.int32)
    seg = SegmentRuns.from_lengths([3, 5], [3, 5])
    assert repr(AttentionPlan(cq, cq, 5, 6, segments=seg)) == \
        "AttentionPlan(2 segments, max_seqlen_q=5, max_seqlen_k=6, segments on the host)"


def _torch_inp(lens_q, lens_k, *, heads=4, kv_heads=None, extra_q=0, extra_k=0, seed=0, grad=False, **kw):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs(lens_q, lens_k, heads, 8, seed=seed, kv_heads=kv_heads,
                                                   extra_q=extra_q, extra_k=extra_k, extra_fill=None,
                                                   requires_grad=grad)
    seg = SegmentRuns.from_lengths(lens_q, lens_k)
    return P.validate_inputs(q, k, v, cq, ck, mq, mk, kw.pop("softmax_scale", None), kw.pop("causal", False),
                             segments=seg, **kw)


@pytest.mark.parametrize("lens_q, lens_k, kw", [
    ([4] * 3, [6] * 3, {}),  # a Read-like call
    ([6] * 3, [4] * 3, dict(softmax_scale=0.7)),  # a Write-like call, a given scale
    ([5] * 2, [5] * 2, dict(causal=True)),  # causal with Lq == Lk: SDPA's own causal mask
    ([3] * 4, [2] * 4, dict(kv_heads=2)),  # GQA, two keys a segment (the fewest the view path takes)
])
def test_the_torch_backends_kept_runner_is_its_forward_exactly(lens_q, lens_k, kw):
    """``dense_runner`` (what a plan keeps for a call of one run of equal segments, so later calls cost one SDPA's
    host time) gives the torch backend's forward bit for bit, values and gradients."""
    from elit_kernels.attention.backends import torch_ops

    kw = dict(kw)
    kv = kw.pop("kv_heads", None)
    inp = _torch_inp(lens_q, lens_k, kv_heads=kv, grad=True, **kw)
    run = torch_ops.dense_runner(inp)
    assert run is not None
    want = R.run_backend(R.get_backend("torch"), inp)
    got = run(inp.q, inp.k, inp.v)
    assert torch.equal(got, want) and got.shape == inp.q.shape
    gw = torch.autograd.grad(want, (inp.q, inp.k, inp.v), torch.ones_like(want))
    gg = torch.autograd.grad(got, (inp.q, inp.k, inp.v), torch.ones_like(got))
    assert all(torch.equal(a, b) for a, b in zip(gg, gw))
    fresh = _torch_inp(lens_q, lens_k, kv_heads=kv, seed=5, **kw)  # kept across calls: only q/k/v change
    assert torch.equal(run(fresh.q, fresh.k, fresh.v), R.run_backend(R.get_backend("torch"), fresh))


@pytest.mark.parametrize("lens_q, lens_k, kw, why", [
    ([4] * 3, [1] * 3, {}, "single key: out = v, its own path"),
    ([4] * 3, [0] * 3, {}, "no key: zeros"),
    ([0] * 3, [4] * 3, {}, "no query"),
    ([2] * 3, [4] * 3, dict(causal=True), "causal with Lq != Lk: a bottom-right mask"),
    ([4] * 3, [4] * 3, dict(window_size=(1, 1)), "a sliding window"),
    ([4] * 3, [4] * 3, dict(softcap=5.0), "soft-capping"),
    ([4] * 3, [4] * 3, dict(return_lse=True), "the LSE"),
    ([4] * 3, [4] * 3, dict(extra_q=2), "query rows past the segments"),
    ([4] * 3, [4] * 3, dict(extra_k=2), "key rows past the segments"),
    ([], [], {}, "no segment at all"),
    ([4, 4, 2], [4, 4, 4], {}, "two runs"),
])
def test_the_kept_runner_declines_every_call_it_does_not_run_exactly(lens_q, lens_k, kw, why):
    from elit_kernels.attention.backends import torch_ops

    kw = dict(kw)
    inp = _torch_inp(lens_q, lens_k, extra_q=kw.pop("extra_q", 0), extra_k=kw.pop("extra_k", 0), **kw)
    assert torch_ops.dense_runner(inp) is None, why
    if lens_q:
        q, k, v, cq, ck, mq, mk = random_varlen_inputs(lens_q, lens_k, 4, 8)
        assert torch_ops.dense_runner(P.validate_inputs(q, k, v, cq, ck, mq, mk, None, False,
                                                        derive_segments=False)) is None  # no segments


def test_a_plan_runs_a_uniform_call_through_its_kept_runner_and_a_ragged_one_through_the_backend(monkeypatch):
    calls = []
    real = P.run_backend
    monkeypatch.setattr(P, "run_backend", lambda b, inp: calls.append(b.name) or real(b, inp))
    for lens_q, lens_k, backend_calls in (([4] * 3, [6] * 3, 1), ([4, 4, 2], [6, 6, 6], 3)):
        cq, ck = (torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32) for lens in (lens_q, lens_k))
        plan = AttentionPlan(cq, ck, max(lens_q), max(lens_k), segments=SegmentRuns.from_lengths(lens_q, lens_k))
        calls.clear()
        for seed in range(3):
            q, k, v = random_varlen_inputs(lens_q, lens_k, 4, 8, seed=seed)[:3]
            assert torch.equal(plan(q, k, v, backend="torch"), varlen_attention(q, k, v, cq, ck, max(lens_q),
                                                                              max(lens_k), backend="torch"))
        assert calls == ["torch"] * backend_calls, (lens_q, calls)  # uniform: only the first call


def test_a_pinned_sdpa_backend_keeps_its_kernel_choice_in_the_runner(monkeypatch):
    """The sdpa_* backends (CUDA only) pin one SDPA kernel; their runner enters the same ``sdpa_kernel`` context
    on every call (checked on CPU by recording the context it enters)."""
    import contextlib

    import torch.nn.attention as tna

    entered = []

    @contextlib.contextmanager
    def record(kernel):
        entered.append(kernel)
        yield

    monkeypatch.setattr(tna, "sdpa_kernel", record)
    b = R.get_backend("sdpa_flash")
    inp = _torch_inp([4] * 3, [6] * 3)
    run = b.plan_runner(inp)
    out = run(inp.q, inp.k, inp.v)
    run(inp.q, inp.k, inp.v)
    assert entered == [tna.SDPBackend.FLASH_ATTENTION] * 2
    assert torch.equal(out, R.run_backend(R.get_backend("torch"), inp))
    assert b.plan_runner(_torch_inp([4, 2], [6, 6])) is None


def test_a_plan_asks_for_no_runner_when_the_backend_pads_the_head_dim():
    # the runner runs the call as given; a backend that zero-pads D (run_backend's job) must take the full path
    class Padding(R.Backend):
        name, priority, known_answer, devices, head_dim_multiple = "_plan_pad", 100_000, False, ("cpu",), 16
        asked = 0

        def forward(self, inp):
            return R.get_backend("reference").forward(inp)

        def plan_runner(self, inp):
            Padding.asked += 1
            return lambda q, k, v: q.new_full(q.shape, float("nan"))

    lens = [4] * 3
    cq = torch.tensor([0, 4, 8, 12], dtype=torch.int32)
    try:
        R.register_backend(Padding())
        for d, asked in ((12, 0), (16, 1)):  # 12 runs padded to 16: no runner; 16 natively: the runner is kept
            plan = AttentionPlan(cq, cq, 4, 4, segments=SegmentRuns.from_lengths(lens, lens))
            q, k, v = (torch.randn(12, 2, d) for _ in range(3))
            Padding.asked = 0
            outs = [plan(q, k, v) for _ in range(2)]
            assert Padding.asked == asked, d
            assert not outs[0].isnan().any() and outs[1].isnan().all() == bool(asked), d  # the kept runner ran
    finally:
        R._REGISTRY.pop("_plan_pad", None)
        D.clear_decisions()
