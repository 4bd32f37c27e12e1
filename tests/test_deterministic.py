"""``deterministic=True`` (flash-attn's flag, ``varlen_attention``'s, ``AttentionPlan``'s): when a backward follows,
only a backend that declares its backward deterministic on the inputs' device runs the call.

flash-attn honours the flag with a slower backward without atomics; the library kernels default dispatch prefers
on a GPU accumulate with atomics. Before this flag was honoured the drop-in accepted ``deterministic=True`` and
ran them anyway: gradients that differ run to run, with no word. On a CPU a registered spy that declares itself
non-deterministic stands in for them; the declarations of the real backends are pinned, and the CPU ones are
checked bit for bit."""
import numpy as np
import pytest
import torch

from elit_kernels import flash_attn_varlen_func, varlen_attention
from elit_kernels.attention import AttentionPlan, SegmentRuns, describe_backends, validate_inputs
from elit_kernels.attention import dispatch as D
from elit_kernels.attention import registry as R
from elit_kernels.testing import random_varlen_inputs

LENS_Q, LENS_K = [3, 5, 0, 4], [4, 2, 3, 4]


class _Atomic(R.Backend):
    """A CPU backend, first in default dispatch, whose backward says nothing about determinism (as a library
    kernel that accumulates with atomics): answers with the reference and counts its calls."""

    name, priority, known_answer, devices = "_atomic", 10_000, False, ("cpu",)

    def __init__(self):
        self.calls = 0

    def forward(self, inp):
        self.calls += 1
        return R.get_backend("reference").forward(inp)


@pytest.fixture
def atomic():
    b = R.register_backend(_Atomic())
    D.clear_decisions()
    yield b
    R._REGISTRY.pop(b.name, None)
    D.clear_decisions()


def _inputs(grad=True, seed=0):
    return random_varlen_inputs(LENS_Q, LENS_K, 2, 16, seed=seed, requires_grad=grad)


def test_deterministic_calls_with_a_backward_skip_backends_that_are_not(atomic):
    q, k, v, cq, ck, mq, mk = _inputs()
    want = varlen_attention(q, k, v, cq, ck, mq, mk, backend="reference")
    out = varlen_attention(q, k, v, cq, ck, mq, mk)  # not asked: the spy, first in line, runs it
    assert atomic.calls == 1 and torch.equal(out, want)
    # asked (and a decision for the same shapes is cached from the call above): another backend runs it
    out = varlen_attention(q, k, v, cq, ck, mq, mk, deterministic=True)
    assert atomic.calls == 1
    torch.testing.assert_close(out, want)
    inp = validate_inputs(q, k, v, cq, ck, mq, mk, deterministic=True)
    chosen = D.select_backend(inp)
    assert chosen.name != "_atomic" and (chosen.deterministic_devices is None or "cpu" in chosen.deterministic_devices)
    with torch.no_grad():  # no backward follows: nothing to be deterministic about
        varlen_attention(q, k, v, cq, ck, mq, mk, deterministic=True)
    assert atomic.calls == 2
    q2, k2, v2 = (t.detach() for t in (q, k, v))
    varlen_attention(q2, k2, v2, cq, ck, mq, mk, deterministic=True)
    assert atomic.calls == 3


def test_an_explicit_backend_that_is_not_deterministic_is_refused_by_name(atomic):
    q, k, v, cq, ck, mq, mk = _inputs()
    with pytest.raises(ValueError, match=r"^backend: backend '_atomic' cannot run these inputs \(.*, deterministic\): "
                       r"its backward is not deterministic on cpu \(deterministic=True asks for one\)$"):
        varlen_attention(q, k, v, cq, ck, mq, mk, backend="_atomic", deterministic=True)
    with pytest.raises(ValueError, match=r"^backend: backend 'torch_varlen' cannot run these inputs .*"):
        varlen_attention(q, k, v, cq, ck, mq, mk, backend="torch_varlen", deterministic=True)
    assert atomic.calls == 0
    with pytest.raises(TypeError, match=r"^deterministic: expected a bool, got str \('yes'\)$"):
        varlen_attention(q, k, v, cq, ck, mq, mk, deterministic="yes")


def test_the_drop_in_and_a_plan_pass_the_flag_on(atomic):
    q, k, v, cq, ck, mq, mk = _inputs()
    want = varlen_attention(q, k, v, cq, ck, mq, mk, backend="reference")
    for det in (True, 1):  # flash-attn's schema takes an int as its bool
        out = flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, deterministic=det)
        torch.testing.assert_close(out, want)
    assert atomic.calls == 0
    flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, deterministic=False)
    assert atomic.calls == 1
    seg = SegmentRuns.from_lengths(LENS_Q, LENS_K)
    plan = AttentionPlan(cq, ck, mq, mk, segments=seg, deterministic=True)
    for _ in range(2):  # the second call comes from the plan's cache
        torch.testing.assert_close(plan(q, k, v), want)
    assert atomic.calls == 1
    plain = AttentionPlan(cq, ck, mq, mk, segments=seg)
    plain(q, k, v)
    assert atomic.calls == 2
    with pytest.raises(TypeError, match=r"^deterministic: expected a bool"):
        AttentionPlan(cq, ck, mq, mk, deterministic="no")


def test_tuning_does_not_rank_a_class_on_its_deterministic_subset(atomic, monkeypatch):
    """A class's ranking serves every call of the class: timing only the deterministic candidates would drop the
    others from it."""
    timed = []
    monkeypatch.setattr(D, "tune_inputs", lambda inp, *a, **k: timed.append(inp))
    q, k, v, cq, ck, mq, mk = _inputs()
    with D.tuning(True):
        varlen_attention(q, k, v, cq, ck, mq, mk, deterministic=True)
        assert timed == []
        varlen_attention(q, k, v, cq, ck, mq, mk)
        assert len(timed) == 1


def test_declarations():
    """What each backend declares, and why (its docstring / module): the kernels of this package own their
    gradient rows (no atomics) on every device they run on; PyTorch's SDPA kernels and index_add_ on CUDA do not;
    flash-attn has a deterministic mode the backend asks for; torch_varlen has none."""
    rows = {r["name"]: r["deterministic_devices"] for r in describe_backends()}
    assert {n: rows[n] for n in ("reference", "torch", "cpp", "cuda", "triton", "triton_window", "torch_varlen",
                                 "flash_attn", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient") if n in rows} == {
        "reference": None, "torch": ("cpu",), "cpp": None, "cuda": None, "triton": None, "triton_window": None,
        "torch_varlen": (), "flash_attn": ("cuda",), "sdpa_cudnn": (), "sdpa_flash": (), "sdpa_efficient": ()}


@pytest.mark.parametrize("field,value,err", [
    ("deterministic_devices", "cpu", TypeError),  # a str, not a tuple: "c", "p", "u" would be device types
    ("deterministic_devices", ("CPU",), ValueError),  # never equal to a device's type: deterministic nowhere, silently
    ("deterministic_devices", ("cuda:0",), ValueError),
    ("deterministic_devices", ("",), ValueError),
    ("devices", ("cuda:0",), ValueError),
])
def test_a_bad_declaration_is_refused_at_registration(field, value, err):
    bad = type("Bad", (_Atomic,), {"name": "_bad_det", field: value})()
    with pytest.raises(err, match=rf"^backend: {field} must be "):
        R.register_backend(bad)
    assert "_bad_det" not in R.known_backends()


@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_the_cpu_backends_that_say_so_are_deterministic_bit_for_bit(backend):
    """Ten backward passes on the same inputs give the same gradients, bit for bit (two threads, GQA, causal)."""
    if backend == "cpp":
        from elit_kernels import _cext
        if _cext.unavailable_reason is not None:
            pytest.skip(f"cpp backend unavailable: {_cext.unavailable_reason}")
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([7, 33, 1, 20], [9, 40, 5, 20], 4, 32, seed=4, kv_heads=2,
                                                   requires_grad=True)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    seg = SegmentRuns.from_lengths([7, 33, 1, 20], [9, 40, 5, 20])
    grads = []
    for _ in range(10):
        out = varlen_attention(q, k, v, cq, ck, mq, mk, causal=True, backend=backend, deterministic=True,
                               segments=seg)
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    for g in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(g, grads[0]))


def test_gpu_deterministic_backward_is_bitwise_repeatable():
    """On a GPU, default dispatch with deterministic=True leaves the library kernels (atomics) out and picks one
    declared deterministic on CUDA, whose gradients repeat bit for bit (bf16, ragged, GQA; tools/gpu_check.sh)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False): the GPU half of deterministic=True")
    lens_q, lens_k = [64, 200, 1, 128], [64, 300, 5, 128]
    q, k, v, cq, ck, mq, mk = random_varlen_inputs(lens_q, lens_k, 8, 64, seed=6, kv_heads=2, dtype=torch.bfloat16,
                                                   device="cuda", requires_grad=True)
    seg = SegmentRuns.from_lengths(lens_q, lens_k)
    inp = validate_inputs(q, k, v, cq, ck, mq, mk, segments=seg, deterministic=True)
    chosen = D.select_backend(inp)
    assert chosen.deterministic_devices is None or "cuda" in chosen.deterministic_devices, chosen.name
    dout = torch.randn_like(q)
    grads = []
    for _ in range(5):
        out = varlen_attention(q, k, v, cq, ck, mq, mk, segments=seg, deterministic=True)
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    for g in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(g, grads[0])), chosen.name


def test_numpys_false_is_false_under_pytorchs_switch(atomic):
    """np.False_ is a bool here like False: it must not turn PyTorch's switch off (it did: only `is False` was
    upgraded), and under the switch a refusal names the switch, not deterministic=True, as the cause."""
    q, k, v, cq, ck, mq, mk = _inputs()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for flag in (False, np.False_):
            varlen_attention(q, k, v, cq, ck, mq, mk, deterministic=flag)
            assert atomic.calls == 0, flag
        with pytest.raises(ValueError, match=r"its backward is not deterministic on cpu \(torch.use_deterministic_"
                           r"algorithms\(True\) asks for one\)$"):
            varlen_attention(q, k, v, cq, ck, mq, mk, backend="_atomic", deterministic=False)
    finally:
        torch.use_deterministic_algorithms(was)


def test_warn_only_runs_a_backend_asked_for_by_name_with_a_warning(atomic):
    """torch.use_deterministic_algorithms(True, warn_only=True): an op without a deterministic path warns and
    runs (PyTorch's semantics). Default dispatch still prefers a deterministic backend."""
    q, k, v, cq, ck, mq, mk = _inputs()
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    D._WARNED_NONDETERMINISTIC.discard("_atomic")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        varlen_attention(q, k, v, cq, ck, mq, mk)
        assert atomic.calls == 0
        with pytest.warns(UserWarning, match=r"backend '_atomic' runs under torch.use_deterministic_algorithms\(True, "
                          r"warn_only=True\), but its backward is not deterministic on cpu"):
            varlen_attention(q, k, v, cq, ck, mq, mk, backend="_atomic")
        assert atomic.calls == 1
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
        D._WARNED_NONDETERMINISTIC.discard("_atomic")


def test_a_forward_only_deterministic_call_still_tunes(atomic, monkeypatch):
    """Without a backward nothing is filtered, so the class may be timed as usual."""
    timed = []
    monkeypatch.setattr(D, "tune_inputs", lambda inp, *a, **k: timed.append(inp))
    q, k, v, cq, ck, mq, mk = _inputs(grad=False)
    with D.tuning(True):
        varlen_attention(q, k, v, cq, ck, mq, mk, deterministic=True)
    assert len(timed) == 1


def test_pytorchs_deterministic_switch_asks_for_it_too(atomic):
    """torch.use_deterministic_algorithms(True) (transformers' enable_full_determinism sets it) asks every op for a
    deterministic backward: default dispatch and a plan made before the switch honour it, and forget it after."""
    q, k, v, cq, ck, mq, mk = _inputs()
    plan = AttentionPlan(cq, ck, mq, mk)
    plan(q, k, v)
    assert atomic.calls == 1
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        varlen_attention(q, k, v, cq, ck, mq, mk)
        plan(q, k, v)  # its cached run was made before the switch
        assert atomic.calls == 1
        assert validate_inputs(q, k, v, cq, ck, mq, mk).deterministic is True
    finally:
        torch.use_deterministic_algorithms(was)
    plan(q, k, v)
    varlen_attention(q, k, v, cq, ck, mq, mk)
    assert atomic.calls == 3


def test_our_backwards_without_a_deterministic_path_alert_as_pytorchs_own_ops():
    """A backward of ours that sums with atomics (the fused elementwise ops on CUDA) does what PyTorch's own ops do
    under torch.use_deterministic_algorithms(True): raise naming the op, or warn with warn_only=True."""
    from elit_kernels._autograd import alert_not_deterministic

    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        alert_not_deterministic("elit::op", "why", "instead")  # off: nothing
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match=r"^elit::op does not have a deterministic implementation \(why\), but "
                           r"torch.use_deterministic_algorithms\(True\) is on; instead$"):
            alert_not_deterministic("elit::op", "why", "instead")
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match=r"^elit::op does not have a deterministic implementation"):
            alert_not_deterministic("elit::op", "why", "instead")
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)


def test_the_fused_elementwise_backward_on_a_cpu_is_deterministic_and_does_not_alert():
    """The C++ CPU kernels own their rows (no atomics): under the switch they run, and repeat bit for bit."""
    from elit_kernels import _cext

    if _cext.unavailable_reason is not None:
        pytest.skip(f"the compiled extension is unavailable: {_cext.unavailable_reason}")
    g = torch.Generator().manual_seed(8)
    x = torch.randn(12, 16, generator=g, requires_grad=True)
    shift, scale, gate = (torch.randn(3, 16, generator=g, requires_grad=True) for _ in range(3))
    index = torch.tensor([0] * 5 + [1] * 4 + [2] * 3)
    dout = torch.randn(12, 16, generator=g)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(3):
            out = _cext.gated_residual(_cext.layernorm_modulate(x, shift, scale, index), x, gate, index)
            grads.append(torch.autograd.grad(out, (x, shift, scale, gate), dout))
    finally:
        torch.use_deterministic_algorithms(was)
    assert all(torch.equal(a, b) for g2 in grads[1:] for a, b in zip(g2, grads[0]))


def test_gpu_fused_elementwise_backward_alerts_under_the_switch():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is False): the fused CUDA backward's alert")
    from elit_kernels import _cext

    if _cext.unavailable_reason is not None or not _cext.has_kernel("layernorm_modulate_cuda"):
        pytest.skip(f"the fused CUDA kernels are not built here ({_cext.unavailable_reason or 'no CUDA kernels'})")
    x = torch.randn(12, 16, device="cuda", requires_grad=True)
    shift, scale = (torch.randn(3, 16, device="cuda", requires_grad=True) for _ in range(2))
    index = torch.tensor([0] * 5 + [1] * 4 + [2] * 3, device="cuda")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = _cext.layernorm_modulate(x, shift, scale, index)
        with pytest.raises(RuntimeError, match=r"elit::layernorm_modulate_bwd does not have a deterministic"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)


class _DetElsewhere(_Atomic):
    """Deterministic on two device types, neither of them the CPU."""

    name, priority, deterministic_devices = "_det_elsewhere", 9_000, ("cuda", "mps")


def test_a_refusal_names_the_devices_a_backend_is_deterministic_on(atomic):
    """A backend deterministic on other device types registers, and its reason on a CPU names them all; one declared
    deterministic on the CPU has no reason there."""
    b = R.register_backend(_DetElsewhere())
    try:
        inp = validate_inputs(*_inputs(), deterministic=True)
        assert R.reasons(b, inp) == [("its backward is not deterministic on cpu (deterministic=True asks for one; "
                                      "it is on cuda and mps)")]
        b.deterministic_devices = ("cpu",)
        assert R.reasons(b, inp) == []
    finally:
        R._REGISTRY.pop(b.name, None)
        D.clear_decisions()


class _Float64Only(_Atomic):
    """Like the spy, but runs float64 only: float32 inputs give it a reason besides determinism."""

    name, dtypes = "_atomic64", (torch.float64,)


def test_warn_only_warns_once_and_keeps_every_other_reason(atomic):
    """Under warn_only a backend asked for by name warns once (per backend, not per call) for its non-deterministic
    backward, and that reason alone is waived: another one (here its dtypes) is still a ValueError naming it, with a
    backward to follow or not."""
    import re
    import warnings

    q, k, v, cq, ck, mq, mk = _inputs()
    was, was_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    f64 = R.register_backend(_Float64Only())
    for n in ("_atomic", "_atomic64"):
        D._WARNED_NONDETERMINISTIC.discard(n)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(2):
                varlen_attention(q, k, v, cq, ck, mq, mk, backend="_atomic")
        assert atomic.calls == 2
        assert [str(w.message) for w in seen if "elit_kernels: backend" in str(w.message)] == [
            ("elit_kernels: backend '_atomic' runs under torch.use_deterministic_algorithms(True, warn_only=True), but "
             "its backward is not deterministic on cpu (torch.use_deterministic_algorithms(True) asks for one)")]
        dtype_reason = "dtype torch.float32 not in ['torch.float64']"
        q2, k2, v2 = (t.detach() for t in (q, k, v))  # no backward: the dtype is its only reason
        with pytest.raises(ValueError, match=r"^backend: backend '_atomic64' cannot run these inputs \(.*\): "
                           + re.escape(dtype_reason) + "$"):
            varlen_attention(q2, k2, v2, cq, ck, mq, mk, backend="_atomic64")
        refused = r"^backend: backend '_atomic64' cannot run these inputs \(.*\): " + re.escape(dtype_reason) + "$"
        warned = r"backend '_atomic64' runs under"
        with pytest.warns(UserWarning, match=warned), pytest.raises(ValueError, match=refused):
            varlen_attention(q, k, v, cq, ck, mq, mk, backend="_atomic64")
        assert f64.calls == 0
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn)
        for n in ("_atomic", "_atomic64"):
            D._WARNED_NONDETERMINISTIC.discard(n)
        R._REGISTRY.pop(f64.name, None)
        D.clear_decisions()


class _LseOff(_Atomic):
    """Not deterministic anywhere (the default declaration); out and gradients are the reference's, the lse 0.5 off."""

    name = "_lse_off_det"

    def forward(self, inp):
        res = super().forward(inp)
        return (res[0], res[1] + 0.5) if inp.return_lse else res


def test_the_known_answer_check_of_the_lse_runs_under_pytorchs_switch():
    """The known-answer case checks a backend's lse on a forward-only call: under torch.use_deterministic_algorithms
    (True) a backend whose backward is not deterministic still returns an lse there, and a wrong one is caught."""
    from elit_kernels.attention import known_answer as KA

    b = R.register_backend(_LseOff())
    before = dict(KA._VERDICTS)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        verdict = KA.verify_backend(b.name, device="cpu", dtype=torch.float32, head_dim=16)
    finally:
        torch.use_deterministic_algorithms(was)
        R._REGISTRY.pop(b.name, None)
        KA._VERDICTS.clear()
        KA._VERDICTS.update(before)
        D.clear_decisions()
    assert verdict is not None and verdict.startswith("lse: "), verdict
