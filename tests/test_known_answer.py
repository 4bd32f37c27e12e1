"""Dispatch never trusts a kernel that has not run correctly: first-use known-answer checks (known_answer.py),
exercised on CPU with deliberately broken fake backends."""
import dataclasses
import warnings

import pytest
import torch

import elit_kernels
from elit_kernels import attention as B
from elit_kernels.attention import known_answer as KA
from elit_kernels import varlen_attention
from elit_kernels.testing import random_varlen_inputs


class _Fake(B.Backend):
    """A 'compiled kernel' on CPU: the reference, optionally broken in one way; counts its calls."""

    priority = 1000
    devices = ("cpu",)
    bug = None

    def __init__(self, name, bug=None):
        self.name, self.bug, self.calls = name, bug, 0

    def forward(self, inp):
        self.calls += 1
        res = B.get_backend("reference").forward(inp)
        out, lse = res if inp.return_lse else (res, None)
        if self.bug == "scale":
            out = out * 1.01
        elif self.bug == "nan_row" and out.shape[0]:
            out = torch.cat([out[:1] * float("nan"), out[1:]])
        elif self.bug == "raise":
            raise RuntimeError("illegal memory access (simulated)")
        elif self.bug == "grad":  # right forward, wrong backward
            out = out + 0.5 * (out - out.detach())
        elif self.bug == "bias":  # an error on every element, under the max rule's bound in bfloat16
            out = out + 0.015
        elif self.bug == "lse" and lse is not None:  # right output and gradients, wrong log-sum-exp
            lse = lse + 3.5
        return (out, lse) if inp.return_lse else out


@pytest.fixture
def fake():
    made = []

    def make(name, bug=None):
        b = B.register_backend(_Fake(name, bug))
        made.append(name)
        return b

    KA.clear_verdicts()
    was = KA.known_answer_checks()
    KA.set_known_answer_checks("on")
    yield make
    KA.set_known_answer_checks(was)
    KA.clear_verdicts()
    for n in made:
        B.registry._REGISTRY.pop(n, None)


def _inputs(requires_grad=False, seed=0):
    return random_varlen_inputs([5, 9], [6, 3], 2, 16, seed=seed, requires_grad=requires_grad)


@pytest.mark.parametrize("bug", ["scale", "nan_row", "raise"])
def test_a_broken_backend_is_warned_about_and_skipped(fake, bug):
    b = fake("_broken_fwd", bug)
    q, k, v, cq, ck, mq, mk = _inputs()
    with pytest.warns(RuntimeWarning, match="backend '_broken_fwd' failed its known-answer check on cpu float32"):
        out = varlen_attention(q, k, v, cq, ck, mq, mk)
    ref = varlen_attention(q, k, v, cq, ck, mq, mk, backend="reference")
    torch.testing.assert_close(out, ref)  # the next backend answered
    assert b.calls >= 1  # it was tried on the known-answer case ...
    calls = b.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ... once: the verdict is cached, no second warning
        varlen_attention(q, k, v, cq, ck, mq, mk)
    assert b.calls == calls
    key = next(k for k in KA.verdicts() if k[0] == "_broken_fwd")
    assert KA.verdicts()[key] is not None


def test_a_wrong_backward_is_caught_when_gradients_are_needed(fake):
    b = fake("_broken_bwd", "grad")
    q, k, v, cq, ck, mq, mk = _inputs()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        varlen_attention(q, k, v, cq, ck, mq, mk)  # inference: the forward is right, it is used
    assert b.calls > 1
    q, k, v, cq, ck, mq, mk = _inputs(requires_grad=True)
    with pytest.warns(RuntimeWarning, match="_broken_bwd.*with gradients.*dq"):
        out = varlen_attention(q, k, v, cq, ck, mq, mk)
    out.sum().backward()
    ref_q = q.detach().requires_grad_()
    varlen_attention(ref_q, k.detach(), v.detach(), cq, ck, mq, mk, backend="reference").sum().backward()
    torch.testing.assert_close(q.grad, ref_q.grad)


def test_a_correct_backend_passes_and_is_used(fake):
    b = fake("_good")
    q, k, v, cq, ck, mq, mk = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        varlen_attention(q, k, v, cq, ck, mq, mk)
    n = b.calls
    varlen_attention(q, k, v, cq, ck, mq, mk)
    assert b.calls == n + 1  # used for the real call, not re-checked
    assert KA.verdicts()[("_good", "cpu", "float32", 16, False, False, False, False)] is None
    assert KA.verify_backend("_good", "cpu", torch.float32, 16, grad=True) is None


def test_explicit_backend_and_off_mode_skip_the_check(fake):
    b = fake("_broken_explicit", "scale")
    q, k, v, cq, ck, mq, mk = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        varlen_attention(q, k, v, cq, ck, mq, mk, backend="_broken_explicit")  # asked for: used as is
        assert b.calls == 1
        KA.set_known_answer_checks("off")
        varlen_attention(q, k, v, cq, ck, mq, mk)  # off: trusted by priority
    assert b.calls == 2
    KA.set_known_answer_checks("auto")  # auto: CUDA inputs only, so a CPU call is not checked either
    varlen_attention(q, k, v, cq, ck, mq, mk)
    assert b.calls == 3
    with pytest.raises(ValueError, match="mode"):
        KA.set_known_answer_checks("always")


def test_under_compile_a_cached_failure_still_skips(fake):
    fake("_broken_compiled", "scale")
    q, k, v, cq, ck, mq, mk = _inputs()
    with pytest.warns(RuntimeWarning):
        varlen_attention(q, k, v, cq, ck, mq, mk)  # eager warm-up caches the verdict
    f = torch.compile(lambda *a: varlen_attention(*a), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(q, k, v, cq, ck, mq, mk), varlen_attention(q, k, v, cq, ck, mq, mk, backend="reference"))


def test_real_compiled_backends_pass_their_checks_on_cpu(fake):
    # the cpp kernels (when built) and the torch backend path: their verdicts are real, not assumed
    names = [r["name"] for r in elit_kernels.describe_backends() if r["available"] and r["name"] in ("cpp",)]
    if not names:
        pytest.skip("the compiled cpp backend is not available here: "
                    + (B.get_backend("cpp").unavailable_reason or "not registered"))
    for dt in (torch.float32, torch.float64):
        for causal in (False, True):
            assert KA.verify_backend("cpp", "cpu", dt, 72, causal=causal, gqa=True) is None


GPU_KA = [(b, dt, d) for b in ("cuda", "triton") for dt in ("bf16", "fp16") for d in (64, 72, 128)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: checks the real kernels against the reference there")
@pytest.mark.parametrize("backend,dtype,head_dim", GPU_KA, ids=[f"{b}-{dt}-d{d}" for b, dt, d in GPU_KA])
def test_known_answer_on_gpu(backend, dtype, head_dim):
    # tools/gpu_check.sh runs these first: a compiled backend that fails here would be skipped by dispatch
    if not B.get_backend(backend).is_available():
        pytest.skip(f"backend {backend!r} is not available on this machine")
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    failures = {(causal, gqa): KA.verify_backend(backend, "cuda", dt, head_dim, causal=causal, gqa=gqa)
                for causal in (False, True) for gqa in (False, True)}
    assert all(v is None for v in failures.values()), failures


def test_verdict_keys_name_each_kind_and_the_warning_names_it(fake):
    # the cache key separates every kind the check covers: a verdict for one never answers for another
    b = fake("_keys", "scale")
    for kw, grad, key, new_kind in [
        (dict(), False, ("_keys", "cpu", "float32", 16, False, False, False, False), True),
        (dict(causal=True), False, ("_keys", "cpu", "float32", 16, True, False, False, False), True),
        (dict(window_size=(2, 1)), False, ("_keys", "cpu", "float32", 16, False, False, False, True), True),
        (dict(softcap=3.0), False, ("_keys", "cpu", "float32", 16, False, False, False, True), False),
        (dict(), True, ("_keys", "cpu", "float32", 16, False, False, True, False), True),
    ]:
        q, k, v, cq, ck, mq, mk = _inputs(requires_grad=grad)
        pattern = "backend '_keys' failed its known-answer check on cpu float32, head dim 16" + (
            ", causal" if kw.get("causal") else "") + (", with gradients" if grad else "")
        calls = b.calls
        if new_kind:
            with pytest.warns(RuntimeWarning, match=pattern + ": "):
                varlen_attention(q, k, v, cq, ck, mq, mk, **kw)
            assert b.calls > calls  # the case ran
        else:  # softcap shares the masked kind the window case checked: the cached verdict answers
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                varlen_attention(q, k, v, cq, ck, mq, mk, **kw)
            assert b.calls == calls
        assert key in KA.verdicts(), (kw, grad, sorted(KA.verdicts()))
        assert KA.verdicts()[key].startswith(("out", "dq"))
    assert len([k for k in KA.verdicts() if k[0] == "_keys"]) == 4  # window and softcap share the masked kind
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([5, 9], [6, 3], 4, 16, seed=3, kv_heads=2)
    with pytest.warns(RuntimeWarning, match=r"head dim 16, GQA: "):
        varlen_attention(q, k, v, cq, ck, mq, mk)
    assert ("_keys", "cpu", "float32", 16, False, True, False, False) in KA.verdicts()


def test_the_key_uses_the_head_dim_the_backend_runs_at(fake):
    b = fake("_padded")
    b.head_dims = (32,)  # a 20-dim problem runs zero-padded at 32
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([5, 9], [6, 3], 2, 20, seed=4)
    torch.testing.assert_close(varlen_attention(q, k, v, cq, ck, mq, mk),
                               varlen_attention(q, k, v, cq, ck, mq, mk, backend="reference"))
    assert ("_padded", "cpu", "float32", 32, False, False, False, False) in KA.verdicts()


def test_auto_mode_checks_cuda_inputs_only_and_modes_read_back(fake):
    b = fake("_auto")
    KA.set_known_answer_checks("auto")
    assert KA.known_answer_checks() == "auto"
    q, k, v, cq, ck, mq, mk = _inputs()
    varlen_attention(q, k, v, cq, ck, mq, mk)
    assert b.calls == 1 and not any(k[0] == "_auto" for k in KA.verdicts())  # used without a check
    for mode in ("on", "off"):
        KA.set_known_answer_checks(mode)
        assert KA.known_answer_checks() == mode
    b.known_answer = False  # a backend that opts out is never checked, whatever the mode
    KA.set_known_answer_checks("on")
    varlen_attention(q, k, v, cq, ck, mq, mk)
    assert b.calls == 2 and not any(k[0] == "_auto" for k in KA.verdicts())


def test_verify_backend_forwards_its_arguments_and_caches(fake):
    fake("_verify_good")
    bad = fake("_verify_bad", "grad")
    assert KA.verify_backend("_verify_good", "cpu", torch.float64, 24, causal=True, gqa=True, grad=True) is None
    assert KA.verdicts()[("_verify_good", "cpu", "float64", 24, True, True, True, False)] is None
    n = bad.calls
    # wrong only in its backward: passes without gradients, fails with them, naming the gradient
    assert KA.verify_backend("_verify_bad", "cpu", torch.float32, 16, grad=False) is None
    assert bad.calls == n + 2  # the output, then the log-sum-exp
    err = KA.verify_backend("_verify_bad", "cpu", torch.float32, 16, grad=True)
    assert err is not None and "dq" in err
    assert KA.verdicts()[("_verify_bad", "cpu", "float32", 16, False, False, True, False)] == err


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(dtype="float32"), TypeError, "dtype: expected one of torch.float64, torch.float32, torch.float16, "
                                       "torch.bfloat16, got 'float32'"),
    (dict(dtype=torch.int32), TypeError, "dtype: expected one of .* got torch.int32"),
    (dict(head_dim=0), ValueError, r"head_dim: expected an int in \[1, 256\], got 0"),
    (dict(head_dim="64"), ValueError, r"head_dim: expected an int in \[1, 256\], got '64'"),
    (dict(head_dim=1000), ValueError, r"head_dim: expected an int in \[1, 256\], got 1000"),
    (dict(causal="yes"), TypeError, r"causal: expected a bool, got str \('yes'\)"),
    (dict(grad=1), TypeError, r"grad: expected a bool, got int \(1\)"),
])
def test_verify_backend_blames_its_arguments_not_the_backend(fake, kwargs, err, match):
    # a bad argument is the caller's fault: raised by name, and no failed verdict is cached for the backend (a
    # cached failure would take a correct backend out of dispatch)
    b = fake("_verify_args")
    before = dict(KA.verdicts())
    with pytest.raises(err, match="^" + match):
        KA.verify_backend("_verify_args", **{"device": "cpu", "dtype": torch.float32, **kwargs})
    assert KA.verdicts() == before and b.calls == 0


def test_a_wrong_log_sum_exp_fails_the_case_by_name(fake):
    # right output and gradients, LSE off by 3.5: dispatch must not hand this backend return_lse calls
    b = fake("_bad_lse", "lse")
    err = KA._run_case(b, torch.device("cpu"), torch.float32, 16, False, False, True)
    assert err is not None and err.startswith("lse"), err
    assert KA._run_case(fake("_good_lse"), torch.device("cpu"), torch.float32, 16, True, True, True,
                        masked=True) is None


def test_run_case_reports_an_exception_by_type_and_message(fake):
    b = fake("_raises", "raise")
    err = KA._run_case(b, torch.device("cpu"), torch.float32, 16, False, False, False)
    assert err == "raised RuntimeError: illegal memory access (simulated)"
    b.bug = "scale"
    err = KA._run_case(b, torch.device("cpu"), torch.float32, 16, True, True, False, masked=True)
    assert err is not None and err.startswith("out") and "\n" not in err


class _Spy(_Fake):
    """The reference, recording what each call was handed; ``bug`` as _Fake plus 'dq'/'dk'/'dv' (one wrong
    gradient: that input enters as ``t + 0.5 (t - t.detach())``, same forward) and 'tiny' (off by 1e-7)."""

    def __init__(self, name, bug=None):
        super().__init__(name, bug if bug in (None, "scale", "raise", "grad") else None)
        self.seen, self.douts, self.extra = [], [], bug

    def not_supported_reasons(self, inp):  # the spies record the output and gradient runs only
        return ["no log-sum-exp (a spy)"] if inp.return_lse else super().not_supported_reasons(inp)

    def forward(self, inp):
        self.seen.append(dict(heads=inp.num_heads, kv_heads=inp.num_kv_heads, head_dim=inp.head_dim, dtype=inp.q.dtype,
                              window=(inp.window_left, inp.window_right), softcap=inp.softcap, causal=inp.causal,
                              grad=inp.q.requires_grad, q=inp.q.detach().clone()))
        if self.extra in ("dq", "dk", "dv"):
            t = getattr(inp, self.extra[1])
            inp = dataclasses.replace(inp, **{self.extra[1]: t + 0.5 * (t - t.detach())})
        out = super().forward(inp)
        if out.requires_grad:  # record the cotangent the case hands back
            out.register_hook(lambda g: self.douts.append(g.detach().clone()))
        return out + 1e-7 if self.extra == "tiny" else out


@pytest.fixture
def spy(fake):
    """Registers _Spy backends (checks on, verdicts cleared by ``fake``); removed afterwards."""
    made = []

    def make(name, bug=None):
        made.append(B.register_backend(_Spy(name, bug)))
        return made[-1]

    yield make
    for s in made:
        B.registry._REGISTRY.pop(s.name, None)


def test_the_case_run_is_the_kind_asked_for(spy):
    """gqa, masked (window + softcap), gradients, dtype, head dim and causal each reach the case the backend runs."""
    s = spy("_spy_kind")
    cpu = torch.device("cpu")
    for gqa in (False, True):
        for masked in (False, True):
            for grad in (False, True):
                s.seen.clear()
                assert KA._run_case(s, cpu, torch.float64, 24, True, gqa, grad, masked) is None
                assert len(s.seen) == 1
                seen = s.seen[0]
                assert (seen["heads"], seen["kv_heads"]) == ((4, 2) if gqa else (2, 2))
                assert seen["window"] == ((3, -1) if masked else (-1, -1))  # causal bounds the right side
                assert seen["softcap"] == (5.0 if masked else 0.0)
                assert seen["grad"] is grad and seen["dtype"] == torch.float64 and seen["head_dim"] == 24
                assert seen["causal"] is True
    s.seen.clear()
    KA._run_case(s, cpu, torch.float32, 16, False, False, False)
    KA._run_case(s, cpu, torch.float32, 16, False, False, False)
    assert s.seen[0]["window"] == (-1, -1)  # masked defaults to False
    assert torch.equal(s.seen[0]["q"], s.seen[1]["q"])  # a fixed case: the same inputs in every call and process


def test_dispatch_and_verify_forward_the_kind(spy):
    s = spy("_spy_dispatch")
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([5, 9], [6, 3], 4, 16, seed=3, kv_heads=2)
    varlen_attention(q, k, v, cq, ck, mq, mk, window_size=(4, 1))
    case = s.seen[0]  # the known-answer case comes before the real call
    assert (case["heads"], case["kv_heads"], case["window"], case["softcap"]) == (4, 2, (3, 2), 5.0)
    s.seen.clear()
    q, k, v, cq, ck, mq, mk = _inputs()
    varlen_attention(q, k, v, cq, ck, mq, mk)
    assert (s.seen[0]["heads"], s.seen[0]["kv_heads"], s.seen[0]["window"]) == (2, 2, (-1, -1))
    for gqa in (False, True):
        s.seen.clear()
        assert KA.verify_backend("_spy_dispatch", "cpu", torch.float32, 16, gqa=gqa, grad=False) is None
        assert (s.seen[0]["heads"], s.seen[0]["kv_heads"]) == ((4, 2) if gqa else (2, 2))
        assert s.seen[0]["window"] == (-1, -1) and s.seen[0]["grad"] is False


def test_verify_backend_defaults(spy):
    """Documented defaults: head dim 64, not causal, no GQA, with gradients (the device is passed: no GPU here)."""
    s = spy("_spy_defaults")
    assert KA.verify_backend("_spy_defaults", "cpu", torch.float32) is None
    seen = s.seen[0]
    assert (seen["head_dim"], seen["causal"], seen["heads"], seen["kv_heads"], seen["grad"]) == (64, False, 2, 2, True)
    assert ("_spy_defaults", "cpu", "float32", 64, False, False, True, False) in KA.verdicts()
    assert len(s.douts) == 1  # the backward ran: gradients are checked by default


def test_the_case_cotangent_is_fixed(spy):
    s = spy("_spy_dout")
    for _ in range(2):
        assert KA._run_case(s, torch.device("cpu"), torch.float32, 16, False, False, True) is None
    assert len(s.douts) == 2 and torch.equal(s.douts[0], s.douts[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer of the default device")
def test_verify_backend_without_cuda_names_the_device(spy):
    s = spy("_spy_nocuda")
    with pytest.raises(ValueError, match=r"^device: 'cuda' is not available here"):
        KA.verify_backend("_spy_nocuda")  # default device "cuda"
    with pytest.raises(ValueError, match=r"^device: 'cuda:1' is not available"):
        KA.verify_backend("_spy_nocuda", torch.device("cuda", 1))
    assert s.calls == 0 and not any(key[0] == "_spy_nocuda" for key in KA.verdicts())


@pytest.mark.parametrize("which", ["dq", "dk", "dv"])
def test_a_wrong_gradient_is_named(spy, which):
    s = spy("_spy_" + which, which)
    err = KA._run_case(s, torch.device("cpu"), torch.float32, 16, False, False, True)
    assert err is not None and err.startswith(which), err
    assert KA._run_case(s, torch.device("cpu"), torch.float32, 16, False, False, False) is None  # forward is right


def test_the_truth_is_fp64_and_the_low_reference_runs_in_the_dtype(spy, monkeypatch):
    """An fp64 truth for every dtype: an fp32 one would share the fp32 (on a GPU under TF32, the TF32) roundings
    of an fp32 kernel, so the rule would compare the kernel with itself."""
    ref = B.get_backend("reference")
    dtypes = []
    orig = ref.forward
    monkeypatch.setattr(ref, "forward", lambda inp: dtypes.append(inp.q.dtype) or orig(inp))
    s = spy("_spy_dtypes")
    for dt, want in ((torch.float64, [torch.float64, torch.float64]), (torch.float32, [torch.float64, torch.float32]),
                     (torch.bfloat16, [torch.float64, torch.bfloat16])):
        dtypes.clear()
        assert KA._run_case(s, torch.device("cpu"), dt, 16, False, False, False) is None
        assert dtypes == [dt, *want], dt  # the spy (itself the reference), the truth, the reference in dt


def test_fp64_kernels_are_held_to_fp64_accuracy(spy):
    s = spy("_spy_tiny", "tiny")  # off by 1e-7: fine for fp32, wrong for fp64
    assert KA._run_case(s, torch.device("cpu"), torch.float32, 16, False, False, False) is None
    err = KA._run_case(s, torch.device("cpu"), torch.float64, 16, False, False, False)
    assert err is not None and err.startswith("out")


@pytest.mark.parametrize("message,want", [("x" * 400, "x" * 300), ("", ""), ("first\nsecond", "first")])
def test_an_exception_is_reported_in_one_bounded_line(fake, message, want):
    b = fake("_raises_msg")

    def boom(inp):
        raise RuntimeError(message)

    b.forward = boom
    assert KA._run_case(b, torch.device("cpu"), torch.float32, 16, False, False, False) == f"raised RuntimeError: {want}"


def test_unknown_mode_from_the_environment_reads_as_auto(monkeypatch):
    monkeypatch.setattr(KA, "_mode", "sometimes")
    assert KA.known_answer_checks() == "auto"


def test_while_tracing_an_unchecked_kind_is_trusted_and_not_cached(fake, monkeypatch):
    b = fake("_traced", "scale")
    q, k, v, cq, ck, mq, mk = _inputs()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    inp = B.AttnInputs(q, k, v, cq, ck, mq, mk, 0.25, False)
    assert KA.check_dispatch(b, inp) is None  # no case can run while tracing: trusted
    assert b.calls == 0 and not any(key[0] == "_traced" for key in KA.verdicts())


def test_every_mode_change_and_clear_is_a_new_generation():
    # dispatch keys its cached decisions on the generation: each change must give a value not seen before
    was = KA.known_answer_checks()
    seen = [KA.generation]
    for step in (lambda: KA.set_known_answer_checks("on"), KA.clear_verdicts, lambda: KA.set_known_answer_checks(was),
                 KA.clear_verdicts):
        step()
        assert KA.generation not in seen, seen
        seen.append(KA.generation)


def test_a_bias_under_the_max_rules_bound_is_caught_in_bfloat16(fake):
    """+0.015 on every output: within ``2*max|low - ref| + atol`` in bfloat16, so only the RMS rule sees it."""
    fake("_biased", "bias")
    verdict = KA.verify_backend("_biased", "cpu", torch.bfloat16, 64, grad=False)
    assert verdict is not None and "out: RMS err" in verdict, verdict
    fake("_good_bf16")
    assert KA.verify_backend("_good_bf16", "cpu", torch.bfloat16, 64, grad=True) is None


def test_a_verdict_for_device_cuda_is_the_one_dispatch_looks_up(fake, monkeypatch):
    """``verify_backend(device="cuda")`` stores its verdict under the current device's index, which is what a
    CUDA tensor's device says (``cuda:0``): dispatch finds it under compile / capture (no GPU needed: the
    availability check and the case are stubbed)."""
    b = fake("_cuda_verdict")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(KA, "_run_case", lambda *a, **k: "failed (stub)")
    assert KA.verify_backend("_cuda_verdict", "cuda", torch.bfloat16, 64, grad=False) == "failed (stub)"
    looked_up = KA._key(b, torch.device("cuda", 0), torch.bfloat16, 64, False, False, False)
    assert KA.verdicts().get(looked_up) == "failed (stub)", KA.verdicts()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert KA._key(b, "cuda", torch.bfloat16, 64, False, False, False)[1] == "cuda:1"
    assert KA._key(b, torch.device("cpu"), torch.bfloat16, 64, False, False, False)[1] == "cpu"


def test_verify_backend_takes_numpy_ints_and_checks_masked_kinds(fake):
    np = pytest.importorskip("numpy")
    fake("_np_good")
    assert KA.verify_backend("_np_good", "cpu", torch.float32, np.int64(16), grad=False, masked=True) is None
    keys = [k for k in KA.verdicts() if k[0] == "_np_good"]
    assert keys == [("_np_good", "cpu", "float32", 16, False, False, False, True)], keys
    fake("_masked_bias", "bias")
    assert "RMS err" in KA.verify_backend("_masked_bias", "cpu", torch.bfloat16, 16, grad=False, masked=True)
    for bad, match in ((dict(dtype=torch.float8_e4m3fn), "dtype: expected one of"),
                       (dict(masked="yes"), "masked: expected a bool")):
        args = dict(name="_np_good", device="cpu", dtype=torch.float32, head_dim=16)
        args.update(bad)
        with pytest.raises((TypeError, ValueError), match=match):
            KA.verify_backend(**args)


def test_fp32_verdicts_on_cuda_carry_the_matmul_precision_and_tf32_gets_tf32_tolerances(fake):
    """Triton's fp32 kernels follow PyTorch's float32 matmul setting (TF32 or exact): a verdict found under one
    setting is not reused under the other, and under TF32 the case is held to float16's tolerances (TF32's 10-bit
    mantissa), where an exact-fp32 reference's small matmuls would otherwise blame a correct TF32 kernel
    (found reading the GPU-only code paths). CPU verdicts are unchanged."""
    b = fake("_tf32")
    was = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        tf32 = KA._key(b, torch.device("cuda", 0), torch.float32, 64, False, False, False)
        assert tf32[2] == "float32/tf32"
        assert KA._tolerances("cuda:0", torch.float32) == KA._tolerances("cpu", torch.float16)
        assert KA._tolerances("cpu", torch.float32) == (1e-5, 1e-6, 1e-5)  # the CPU never multiplies in TF32
        assert KA._key(b, "cpu", torch.float32, 64, False, False, False)[2] == "float32"
        torch.set_float32_matmul_precision("highest")
        ieee = KA._key(b, torch.device("cuda", 0), torch.float32, 64, False, False, False)
        assert ieee[2] == "float32/ieee" and ieee != tf32
        assert KA._tolerances("cuda:0", torch.float32) == (1e-5, 1e-6, 1e-5)
        assert KA._key(b, torch.device("cuda", 0), torch.bfloat16, 64, False, False, False)[2] == "bfloat16"
    finally:
        torch.set_float32_matmul_precision(was)


def test_the_reference_runs_with_deterministic_algorithms_off_and_the_switch_is_restored(fake, monkeypatch):
    """Under ``torch.use_deterministic_algorithms(True)`` the reference's cuBLAS matmuls raise on CUDA without
    CUBLAS_WORKSPACE_CONFIG; the check took that for the kernel's failure and skipped a correct kernel for the
    process. The reference now runs with the switch off (simulated on CPU: a reference that raises under it)."""
    ref = B.get_backend("reference")
    real_forward = ref.forward

    class _Good(_Fake):
        def forward(self, inp):
            return real_forward(inp)

    def strict(inp):
        if torch.are_deterministic_algorithms_enabled():
            raise RuntimeError("Deterministic behavior was enabled ... CUBLAS_WORKSPACE_CONFIG (simulated)")
        return real_forward(inp)
    monkeypatch.setattr(ref, "forward", strict)
    b = B.register_backend(_Good("_det_good"))
    try:
        for warn_only in (False, True):
            torch.use_deterministic_algorithms(True, warn_only=warn_only)
            try:
                assert KA._run_case(b, torch.device("cpu"), torch.float32, 16, False, False, True) is None
                assert torch.are_deterministic_algorithms_enabled()
                assert torch.is_deterministic_algorithms_warn_only_enabled() == warn_only
            finally:
                torch.use_deterministic_algorithms(False)
    finally:
        B.registry._REGISTRY.pop("_det_good", None)


def test_a_cpu_verdict_is_found_whatever_index_it_was_asked_with(fake):
    """A CPU tensor's device is "cpu": verify_backend(name, "cpu:0") must store its verdict where dispatch looks."""
    b = fake("_cpu0")
    assert KA._key(b, "cpu:0", torch.float32, 16, False, False, False) == KA._key(b, "cpu", torch.float32, 16, False,
                                                                                 False, False)
    assert KA.verify_backend("_cpu0", "cpu:0", torch.float32, 16, grad=False) is None
    assert ("_cpu0", "cpu", "float32", 16, False, False, False, False) in KA.verdicts()
