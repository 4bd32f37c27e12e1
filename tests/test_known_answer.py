"""Dispatch never trusts a kernel that has not run correctly: first-use known-answer checks (known_answer.py),
exercised on CPU with deliberately broken fake backends."""
import warnings

import pytest
import torch

import elit_kernels
from elit_kernels import backends as B
from elit_kernels import known_answer as KA
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
        out = B.get_backend("reference").forward(inp)
        if self.bug == "scale":
            return out * 1.01
        if self.bug == "nan_row" and out.shape[0]:
            return torch.cat([out[:1] * float("nan"), out[1:]])
        if self.bug == "raise":
            raise RuntimeError("illegal memory access (simulated)")
        if self.bug == "grad":  # right forward, wrong backward
            return out + 0.5 * (out - out.detach())
        return out


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
        B._REGISTRY.pop(n, None)


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
        pytest.skip("the compiled cpp backend is not built here")
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
