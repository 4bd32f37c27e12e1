"""The backend registry (backends.py): declarations -> reasons, dispatch order, and the texts people read.

Each declaration a backend makes is turned into one reason by the base class; these tests pin that each
reason appears exactly when its declaration excludes the inputs, and says what it excludes. The
dispatch errors and ``describe_backends`` rows are what a user sees when nothing can run, so their
content is pinned too."""
import dataclasses

import pytest
import torch

from elit_kernels import attention as B
from elit_kernels.attention import known_answer as KA
from elit_kernels.attention import AttnInputs
from elit_kernels.testing import random_varlen_inputs


def _inp(dtype=torch.float32, head_dim=16, heads=2, kv_heads=None, causal=False, return_lse=False,
         window=(-1, -1), softcap=0.0, lens_q=(3, 5), lens_k=(4, 2)):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs(list(lens_q), list(lens_k), heads, head_dim, dtype=dtype,
                                                   kv_heads=kv_heads, seed=5)
    return AttnInputs(q, k, v, cq, ck, mq, mk, head_dim ** -0.5, causal, return_lse, window[0], window[1], softcap)


class _Declared(B.Backend):
    """Declares one restriction of each kind."""

    name, priority = "_declared", -1000
    dtypes = (torch.float16,)
    devices = ("cuda",)
    head_dims = (64, 72, 128)
    supports_gqa = supports_lse = supports_window = supports_softcap = False

    def forward(self, inp):  # pragma: no cover - never dispatched to
        raise AssertionError("not to be run")


def test_attn_inputs_properties():
    plain = _inp(head_dim=24, heads=4, kv_heads=2, lens_q=(3, 5, 1), lens_k=(4, 2, 7))
    assert (plain.head_dim, plain.num_heads, plain.num_kv_heads, plain.num_segments) == (24, 4, 2, 3)
    assert not plain.has_window
    assert _inp(window=(3, -1)).has_window and _inp(window=(-1, 0)).has_window and _inp(window=(0, 0)).has_window


def test_each_declaration_gives_its_reason_only_when_it_excludes_the_inputs():
    b = _Declared()
    reasons = b.not_supported_reasons(_inp(head_dim=200, heads=4, kv_heads=2, return_lse=True, window=(3, 2),
                                           softcap=5.0))
    assert reasons == [
        "dtype torch.float32 not in ['torch.float16']",
        "needs cuda tensors, got device cpu",
        "head dim 200 too large (runs 64, 72, 128)",
        "no grouped-query attention (q has 4 heads, k/v 2)",
        "cannot return the softmax log-sum-exp (return_attn_probs=True)",
        "no sliding-window attention (window_size=(3, 2))",
        "no logit soft-capping (softcap=5.0)",
    ]
    # the same backend, inputs that each declaration allows: only dtype and device remain
    assert b.not_supported_reasons(_inp(head_dim=128)) == ["dtype torch.float32 not in ['torch.float16']",
                                                           "needs cuda tensors, got device cpu"]
    fp16 = _inp(dtype=torch.float16, head_dim=64)
    assert b.not_supported_reasons(fp16) == ["needs cuda tensors, got device cpu"]
    two = _Declared()
    two.devices = ("cuda", "cpu")
    assert two.not_supported_reasons(fp16) == []
    two.devices = None  # any device
    assert two.not_supported_reasons(fp16) == []
    two.devices = ("cuda", "xpu")
    assert two.not_supported_reasons(fp16) == ["needs cuda or xpu tensors, got device cpu"]


def test_the_base_backend_runs_everything_the_contract_allows():
    b = B.Backend()
    for inp in (_inp(), _inp(dtype=torch.float64, head_dim=256, heads=4, kv_heads=1, causal=True, return_lse=True,
                             window=(2, -1), softcap=3.0), _inp(dtype=torch.bfloat16, head_dim=1)):
        assert b.not_supported_reasons(inp) == []
    assert b.not_supported_reasons(_inp(head_dim=257)) == ["head dim 257 too large (runs 1..256)"]
    assert b.is_available() and b.known_answer
    assert repr(B.get_backend("torch")) == "<backend torch priority=10>"


@pytest.mark.parametrize("declared,expect", [
    (dict(head_dims=(64, 72, 128)), {1: 64, 64: 64, 65: 72, 72: 72, 73: 128, 128: 128, 129: None}),
    (dict(head_dims=None, head_dim_multiple=8, max_head_dim=256), {1: 8, 8: 8, 9: 16, 20: 24, 256: 256, 249: 256,
                                                                   257: None}),
    (dict(head_dims=None, head_dim_multiple=1, max_head_dim=256), {1: 1, 7: 7, 256: 256, 257: None}),
    (dict(head_dims=None, head_dim_multiple=16, max_head_dim=96), {1: 16, 80: 80, 81: 96, 96: 96, 97: None}),
])
def test_run_head_dim_pads_to_the_next_native_dim(declared, expect):
    b = type("_Dims", (B.Backend,), declared)()
    assert {d: b.run_head_dim(d) for d in expect} == expect


def test_native_dims_text():
    assert B.Backend()._native_dims_text() == "1..256"
    assert type("_M", (B.Backend,), dict(head_dim_multiple=8, max_head_dim=128))()._native_dims_text() == \
        "multiples of 8 up to 128"
    assert _Declared()._native_dims_text() == "64, 72, 128"


def test_describe_inputs_names_every_option_that_is_set():
    assert B.describe_inputs(_inp()) == "q (8, 2, 16), k/v (6, 2, 16), 2 segments, torch.float32, cpu"
    full = _inp(heads=4, kv_heads=2, causal=True, return_lse=True, window=(3, 0), softcap=2.5)
    assert B.describe_inputs(full) == ("q (8, 4, 16), k/v (6, 2, 16), 2 segments, torch.float32, cpu, causal, "
                                       "return_lse, window_size=(3, 0), softcap=2.5")
    assert B.describe_inputs(_inp(window=(-1, 4))).endswith(", window_size=(-1, 4)")


@pytest.fixture
def registered():
    made = []

    def add(b):
        B.register_backend(b)
        made.append(b.name)
        return b

    was = KA.known_answer_checks()
    KA.set_known_answer_checks("off")
    yield add
    KA.set_known_answer_checks(was)
    for n in made:
        B.registry._REGISTRY.pop(n, None)


def test_explicit_backend_that_cannot_run_lists_every_reason(registered, monkeypatch):
    registered(_Declared())
    inp = _inp(heads=4, kv_heads=2)
    with pytest.raises(ValueError) as e:
        B.select_backend(inp, "_declared")
    assert str(e.value) == (
        f"backend: backend '_declared' cannot run these inputs ({B.describe_inputs(inp)}): "
        "dtype torch.float32 not in ['torch.float16']; needs cuda tensors, got device cpu; "
        "no grouped-query attention (q has 4 heads, k/v 2)")
    monkeypatch.setenv("ELIT_BACKEND", "_declared")  # the same through the environment names the variable
    with pytest.raises(ValueError, match=r"^ELIT_BACKEND: backend '_declared' cannot run"):
        B.select_backend(inp)
    monkeypatch.setenv("ELIT_BACKEND", "reference")
    assert B.select_backend(inp).name == "reference"
    assert B.select_backend(inp, "torch").name == "torch"  # the argument wins over the environment
    monkeypatch.delenv("ELIT_BACKEND")
    default = B.select_backend(inp).name
    monkeypatch.setenv("ELIT_BACKEND", "")  # empty: as if unset
    assert B.select_backend(inp).name == default


class _Unavailable(B.Backend):
    name, priority = "_unavailable", 10_000

    def is_available(self):
        return False

    def forward(self, inp):  # pragma: no cover
        raise AssertionError("not to be run")


class _Picky(B.Backend):
    name, priority, known_answer = "_picky", 9_000, False
    dtypes = (torch.float64,)

    def forward(self, inp):
        return torch.full_like(inp.q, 7.0)


def test_default_dispatch_takes_the_highest_priority_backend_that_can_run(registered):
    registered(_Unavailable())
    registered(_Picky())
    order = B.known_backends()
    assert order[:2] == ["_unavailable", "_picky"]
    prios = [B.get_backend(n).priority for n in order]
    assert prios == sorted(prios, reverse=True)
    assert B.select_backend(_inp(dtype=torch.float64)).name == "_picky"  # the unavailable one is passed over
    assert B.select_backend(_inp()).name not in ("_unavailable", "_picky")
    with pytest.raises(ValueError, match="not available in this environment"):
        B.select_backend(_inp(), "_unavailable")


def test_no_backend_error_lists_each_backend_with_its_reasons(registered):
    saved = dict(B.registry._REGISTRY)
    try:
        B.registry._REGISTRY.clear()
        registered(_Unavailable())
        registered(_Declared())
        inp = _inp(return_lse=True)
        with pytest.raises(ValueError) as e:
            B.select_backend(inp)
        assert str(e.value) == (
            f"no backend supports these inputs ({B.describe_inputs(inp)}):\n"
            "  _unavailable: not available in this environment\n"
            "  _declared: dtype torch.float32 not in ['torch.float16']; needs cuda tensors, got device cpu; "
            "cannot return the softmax log-sum-exp (return_attn_probs=True)")
    finally:
        B.registry._REGISTRY.clear()
        B.registry._REGISTRY.update(saved)


def test_describe_backends_rows(registered):
    registered(_Unavailable())
    registered(_Picky())
    rows = B.describe_backends()
    assert [r["name"] for r in rows] == B.known_backends()
    un = next(r for r in rows if r["name"] == "_unavailable")
    assert un == {"name": "_unavailable", "priority": 10_000, "available": False, "description": "",
                  "unavailable_reason": "not available in this environment",  # it states no reason of its own
                  "default_eligible": True, "deterministic_devices": ()}  # says nothing: deterministic nowhere
    ref = next(r for r in rows if r["name"] == "reference")
    assert ref["available"] is True and ref["priority"] == 0 and "the truth" in ref["description"]
    assert ref["deterministic_devices"] is None  # every device
    with_inp = {r["name"]: r for r in B.describe_backends(_inp())}
    assert with_inp["_unavailable"]["reasons"] == ["not available in this environment"]
    assert with_inp["_picky"]["reasons"] == ["dtype torch.float32 not in ['torch.float64']"]
    assert with_inp["reference"]["reasons"] == []
    assert all("reasons" not in r for r in rows)


def test_register_and_get_errors():
    with pytest.raises(TypeError, match="backend: expected an elit_kernels.Backend, got str"):
        B.register_backend("torch")
    with pytest.raises(TypeError, match="backend: expected a str or None, got int"):
        B.get_backend(3)
    with pytest.raises(ValueError, match=r"backend: unknown backend 'nope'; known backends: .*reference"):
        B.get_backend("nope")


def test_register_replaces_a_backend_of_the_same_name(registered):
    first = registered(_Picky())
    second = _Picky()
    assert B.register_backend(second) is second
    assert B.get_backend("_picky") is second and B.get_backend("_picky") is not first


def test_cuda_comparators_are_unavailable_without_cuda_and_declare_their_limits():
    assert B.get_backend("torch_varlen").default_eligible and B.get_backend("torch_varlen").known_answer
    fa = B.get_backend("flash_attn")  # a comparator: by name only
    assert fa.priority < 0 and not fa.known_answer and not fa.default_eligible
    for name in ("torch_varlen", "flash_attn"):
        b = B.get_backend(name)
        if not torch.cuda.is_available():
            assert not b.is_available()
        r = b.not_supported_reasons(_inp(heads=4, kv_heads=2, window=(1, 1), softcap=1.0, return_lse=True,
                                         head_dim=12))
        assert r[:2] == ["dtype torch.float32 not in ['torch.float16', 'torch.bfloat16']",
                         "needs cuda tensors, got device cpu"]
        assert {"cannot return the softmax log-sum-exp (return_attn_probs=True)",
                "no logit soft-capping (softcap=1.0)"} <= set(r)
        # GQA and windows: flash_attn declares none; torch_varlen what this torch's varlen_attn takes
        gqa = name == "torch_varlen" and "enable_gqa" in b.params
        window = name == "torch_varlen" and "window_size" in b.params
        assert ("no grouped-query attention (q has 4 heads, k/v 2)" in r) == (not gqa)
        assert ("no sliding-window attention (window_size=(1, 1))" in r) == (not window)
        assert b.run_head_dim(12) == 16
        # FlashAttention-2 scales its masked -inf scores: a zero scale is refused; a negative one runs as -q
        # with |scale| (torch_ops.positive_scale), so it is no reason. 1e-50 is 0 in float32 (a fuzz: NaN), 1e-45
        # a subnormal that flush-to-zero builds read as 0 (a review)
        for scale, refused in ((0.0, True), (-0.5, False), (0.5, False), (1e-50, True), (-1e-50, True),
                               (1e-45, True), (1e-38, True), (1.2e-38, False)):
            why = (f"softmax_scale {scale:g}: 0 or below float32's normal range, and FlashAttention-2 scales its "
                   "masked -inf scores (0 * -inf is NaN)")
            inp = dataclasses.replace(_inp(), softmax_scale=scale)
            assert (why in b.not_supported_reasons(inp)) == refused, (name, scale)


def test_torch_varlen_reads_what_this_torch_takes_from_the_signature(monkeypatch):
    # varlen_attn's arguments changed across torch releases (is_causal, then window_size; enable_gqa): the backend
    # reads them from the source without importing the module, declares GQA / windows only where they exist, and
    # passes flash-attn's window (causal: right side 0) and enable_gqa.
    from elit_kernels.attention.backends import library as L

    assert L.function_parameters("elit_kernels.attention.backends.library", "function_parameters") == {"module", "name"}
    assert L.function_parameters("elit_kernels.attention.backends.library", "no_such_function") == frozenset()
    assert L.function_parameters("no_such_module_elit", "f") == frozenset()
    inp = _inp()
    for params, gqa, window in ((frozenset({"window_size", "enable_gqa"}), True, True),
                                (frozenset({"is_causal"}), False, False)):
        monkeypatch.setattr(L, "function_parameters", lambda module, name, p=params: p)
        b = L.TorchVarlenBackend()
        assert (b.supports_gqa, b.supports_window) == (gqa, window)
        assert b.call_kwargs(inp) == {}
        causal = {"window_size": (-1, 0)} if window else {"is_causal": True}
        assert b.call_kwargs(dataclasses.replace(inp, causal=True)) == causal
        if window:
            assert b.call_kwargs(dataclasses.replace(inp, causal=True, window_left=3)) == {"window_size": (3, 0)}
            assert b.call_kwargs(dataclasses.replace(inp, window_left=3, window_right=2)) == {"window_size": (3, 2)}
            assert b.call_kwargs(dataclasses.replace(inp, window_right=2)) == {"window_size": (-1, 2)}
        assert b.call_kwargs(_inp(heads=4, kv_heads=2)) == {"enable_gqa": True, "max_q": 5}
        # FlashAttention-2 varlen's max_seqlen_q == 1 GQA path (heads folded into rows) mis-assigns rows around an
        # empty query segment or rows past the packed data: a bound of 2 (still an upper bound) avoids it
        assert b.call_kwargs(_inp(heads=4, kv_heads=2, lens_q=(1, 0), lens_k=(4, 2)))["max_q"] == 2
        assert ("sliding window" in b.description) == window and ("GQA" in b.description) == gqa
        # FA2 varlen sets an open right side to max_seqlen_k when the left is bounded: refused where a segment
        # has more than max_seqlen_k + 1 queries (it would not be open there); causal and short segments run
        long_q = _inp(lens_q=(8, 2), lens_k=(2, 2))
        why = "a window open on the right with segments of up to 8 queries over 2 keys"
        for w, refused in (((1, -1), True), ((1, 5), True), ((1, 1), False), ((-1, 1), False)):
            r = b.not_supported_reasons(dataclasses.replace(long_q, window_left=w[0], window_right=w[1]))
            assert any(x.startswith(why) for x in r) == (refused and window), (w, r)
        r = b.not_supported_reasons(dataclasses.replace(long_q, causal=True, window_left=1))
        assert not any(x.startswith(why) for x in r)
        r = b.not_supported_reasons(dataclasses.replace(_inp(), window_left=1))
        assert not any(x.startswith(why) for x in r)


def test_the_masked_known_answer_case_is_what_the_backend_declares():
    # a masked kind (window or softcap) is checked on the window and the softcap the backend declares: torch_varlen
    # has windows and no softcap, so a case with both would fail it and skip it for every window call
    from elit_kernels.attention.known_answer import _masked_case

    class B:
        supports_window, supports_softcap = True, False
    assert _masked_case(B) == {"window_size": (3, 2), "softcap": 0.0}
    B.supports_window, B.supports_softcap = False, True
    assert _masked_case(B) == {"window_size": (-1, -1), "softcap": 5.0}
    B.supports_window = True
    assert _masked_case(B) == {"window_size": (3, 2), "softcap": 5.0}


def test_positive_scale_keeps_the_scores_and_the_gradient():
    from elit_kernels.attention.backends.torch_ops import positive_scale

    q = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 2, 8, dtype=torch.float64)
    for scale in (-0.3, 0.3):
        q2, s2 = positive_scale(q, scale)
        assert s2 == abs(scale) and torch.equal(s2 * (q2 * k).sum(-1), scale * (q * k).sum(-1))
        g, = torch.autograd.grad((s2 * q2 * k).sum(), q)
        assert torch.equal(g, scale * k)


def test_a_scale_that_is_zero_in_float32_runs_as_zero():
    """A fuzz: softmax_scale 1e-50 is legal and nonzero, but 0 in float32, where SDPA applies it: the torch backend
    (first on the CPU) and the drop-in gave NaN through SDPA's is_causal (0 * -inf on the masked scores); a review:
    a subnormal scale (1e-40) does the same under flush-to-zero. Every zero test reads a scale below float32's
    normal range as 0 now (``is_zero_scale``), so it takes the grouped op, exact for any scale."""
    from elit_kernels import flash_attn_func, varlen_attention
    from elit_kernels.attention.inputs import is_zero_scale

    tiny = torch.finfo(torch.float32).tiny  # 2**-126
    assert is_zero_scale(0.0) and is_zero_scale(-0.0) and is_zero_scale(1e-50) and is_zero_scale(-2.0 ** -149)
    assert is_zero_scale(tiny / 2) and is_zero_scale(-tiny * 0.999)
    assert not is_zero_scale(tiny) and not is_zero_scale(-tiny) and not is_zero_scale(0.3)
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([5, 3], [5, 3], 2, 16, seed=4)
    was = torch.set_flush_denormal(True)  # what a fast-math CUDA build does to subnormals (False: unsupported here)
    try:
        for scale in (1e-50, -1e-50, 1e-46, 1e-40, -1e-39):
            want = varlen_attention(q, k, v, cq, ck, mq, mk, causal=True, softmax_scale=scale, backend="reference")
            for backend in ("torch", None):
                got = varlen_attention(q, k, v, cq, ck, mq, mk, causal=True, softmax_scale=scale, backend=backend)
                torch.testing.assert_close(got, want, msg=f"{backend} at softmax_scale {scale}, flush-to-zero {was}")
    finally:
        torch.set_flush_denormal(False)
    x = torch.randn(1, 6, 2, 16)
    got = flash_attn_func(x, x, x, softmax_scale=1e-50, causal=True)
    want = flash_attn_func(x, x, x, softmax_scale=0.0, causal=True)  # the mean of the visible values
    torch.testing.assert_close(got, want)
    assert not got.isnan().any()


def test_triton_refuses_a_scale_its_float32_arguments_cannot_hold():
    """A fuzz: the Triton kernels take ``scale * log2(e)`` (or ``scale / softcap`` and ``softcap * log2(e)``) as
    float32 arguments; a legal scale above ~2.36e38, a softcap likewise, or scale / softcap past float32 (1e30 /
    1e-30) became inf and every output NaN. Now the backends refuse them, naming the argument, and default dispatch
    runs another backend (the reference's answer, finite)."""
    from elit_kernels import varlen_attention
    from elit_kernels._triton._scale import score_args, score_args_reason

    assert score_args_reason(0.125) is None and score_args_reason(2e38) is None and score_args_reason(0.1, 30.0) is None
    assert "softmax_scale -2.5e+38 * log2(e)" in score_args_reason(-2.5e38)
    assert "softcap 3e+38 * log2(e)" in score_args_reason(0.1, 3e38)
    assert "softmax_scale / softcap = 1e+30 / 1e-30" in score_args_reason(1e30, 1e-30)
    with pytest.raises(ValueError, match="softmax_scale 2.5e"):
        score_args(2.5e38)
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([4, 3], [4, 5], 2, 16, seed=6)
    q = q * 1e-30  # scores near 1 at the huge scale
    for kw, named in ((dict(softmax_scale=2.5e38), "softmax_scale 2.5e+38"),
                      (dict(softmax_scale=1e30, softcap=1e-30), "softmax_scale / softcap"),
                      (dict(softmax_scale=1e-30, softcap=3e38), "softcap 3e+38")):
        want = varlen_attention(q, k, v, cq, ck, mq, mk, backend="reference", **kw)
        got = varlen_attention(q, k, v, cq, ck, mq, mk, **kw)
        assert not want.isnan().any()
        torch.testing.assert_close(got, want)
        for name in ("triton", "triton_window"):
            if name == "triton_window" and "softcap" in kw:
                continue  # it refuses every softcap
            b = B.get_backend(name)
            if not b.is_available():
                print(f"{name} not checked: {b.unavailable_reason}")
                continue
            with pytest.raises(ValueError, match=named.replace("+", r"\+")):
                varlen_attention(q, k, v, cq, ck, mq, mk, backend=name, **kw)


def test_comparator_missing_module_is_unavailable():
    class _Missing(B.backends.library._CudaLibrary):
        name, module = "_missing", "elit_kernels_no_such_module"

    assert _Missing().is_available() is False


def test_torch_backend_returns_lse_on_request_and_takes_softcap_through_the_op():
    tb = B.get_backend("torch")
    ref = B.get_backend("reference")
    for kw in (dict(return_lse=True), dict(softcap=2.0), dict(return_lse=True, softcap=2.0, causal=True)):
        inp = _inp(**kw)
        got, want = tb.forward(inp), ref.forward(inp)
        if inp.return_lse:
            assert isinstance(got, tuple) and len(got) == 2
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
        else:
            assert isinstance(got, torch.Tensor)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert tb.not_supported_reasons(_inp()) == []


def test_torch_backend_takes_the_run_path_exactly_when_it_may(monkeypatch):
    """Eager, no LSE, no softcap: sdpa_over_runs first, handed the real scale and window; otherwise the op."""
    from elit_kernels.attention.backends import torch_ops as TA

    calls = []
    orig = TA.sdpa_over_runs

    def spy(q, k, v, cq, ck, scale, causal, wl=-1, wr=-1, *, segments=None):
        calls.append((scale, causal, wl, wr))
        return orig(q, k, v, cq, ck, scale, causal, wl, wr, segments=segments)

    monkeypatch.setattr(TA, "sdpa_over_runs", spy)
    tb = B.get_backend("torch")
    with torch.no_grad():
        plain = dataclasses.replace(_inp(causal=True, window=(2, -1)), softmax_scale=0.37)
        out = tb.forward(plain)
        assert calls == [(0.37, True, 2, -1)]
        torch.testing.assert_close(out, B.get_backend("reference").forward(plain), rtol=1e-5, atol=1e-6)
        tb.forward(_inp(return_lse=True))
        tb.forward(_inp(softcap=1.5))
    assert len(calls) == 1  # LSE and softcap go to the grouped op


def test_every_unavailable_backend_says_why():
    """describe_backends(): each backend that cannot run here states a reason; each one that can states none."""
    rows = B.describe_backends()
    assert rows, rows
    for r in rows:
        if r["available"]:
            assert r["unavailable_reason"] is None, r
        else:
            assert isinstance(r["unavailable_reason"], str) and len(r["unavailable_reason"]) > 20, r
            assert r["unavailable_reason"] != "not available in this environment", r  # a real reason, not the generic one


def test_comparator_reasons_name_what_is_missing(monkeypatch):
    fa = B.get_backend("flash_attn")
    monkeypatch.setattr(fa, "module", "_elit_no_such_module")
    assert not fa.is_available()
    assert fa.unavailable_reason.startswith("_elit_no_such_module is not importable (No module named")
    monkeypatch.setattr(fa, "module", "math")  # importable: then only the device is missing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fa.unavailable_reason == "no CUDA device (torch.cuda.is_available() is False)"
    assert B.describe_backends()[[r["name"] for r in B.describe_backends()].index("flash_attn")]["unavailable_reason"] \
        == "no CUDA device (torch.cuda.is_available() is False)"


@pytest.mark.parametrize("installed", [False, True])
def test_triton_reason_and_suggestion_fit_what_is_missing(monkeypatch, installed):
    """Without triton the error says to install it and does not suggest TRITON_INTERPRET=1 as the remedy (the
    interpreter is part of triton); with triton and no GPU it points to the interpreter."""
    from elit_kernels.attention.backends import triton as TB

    monkeypatch.setattr(TB, "_HAS_TRITON", installed)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tb = B.get_backend("triton")
    row = next(r for r in B.describe_backends() if r["name"] == "triton")
    assert row["available"] is False and row["unavailable_reason"] == tb.unavailable_reason
    with pytest.raises(ValueError) as e:
        B.select_backend(_inp(), "triton")
    msg = str(e.value)
    if installed:
        assert tb.unavailable_reason.startswith("no CUDA device")
        assert "TRITON_INTERPRET=1 (set before the first Triton call)" in msg
        assert "CPU tensors run only under TRITON_INTERPRET=1" in msg
    else:
        assert tb.unavailable_reason.startswith("triton is not installed (pip install triton;")
        assert "triton is not installed (pip install triton;" in msg
        assert "CPU tensors run only under TRITON_INTERPRET=1" not in msg and "set before the first Triton call" not in msg


class _Pads(B.Backend):
    """Runs only head dim 16: what it receives is recorded, and the pad columns of its output are garbage that
    run_backend must slice away."""

    name, priority, known_answer = "_pads", -1000, False
    head_dims = (16,)

    def forward(self, inp):
        self.got = inp
        res = B.get_backend("reference").forward(inp)
        out, lse = res if inp.return_lse else (res, None)
        out = out.clone()
        out[..., 12:] = 1e4
        return (out, lse) if inp.return_lse else out


@pytest.mark.parametrize("return_lse", [False, True])
def test_run_backend_zero_pads_q_k_v_to_the_native_head_dim_and_slices_the_output(registered, return_lse):
    b = registered(_Pads())
    inp = _inp(head_dim=12, return_lse=return_lse)
    res = B.run_backend(b, inp)
    want = B.run_backend(B.get_backend("reference"), inp)
    out, lse = res if return_lse else (res, None)
    for name in ("q", "k", "v"):  # every one padded with zeros to 16, its first 12 columns the caller's
        t, orig = getattr(b.got, name), getattr(inp, name)
        assert t.shape[-1] == 16 and torch.equal(t[..., :12], orig) and not t[..., 12:].any(), name
    assert b.got.softmax_scale == inp.softmax_scale == 12 ** -0.5  # the real D's scale, not the padded one's
    assert out.shape == inp.q.shape and torch.allclose(out, want[0] if return_lse else want, atol=1e-5)
    if return_lse:
        assert not lse.requires_grad and torch.allclose(lse, want[1], atol=1e-5)
    b.got = None
    B.run_backend(b, _inp(head_dim=16))  # a native dim runs as it is
    assert b.got.q.shape[-1] == 16


def test_minimum_compute_capability_is_checked_on_cuda_inputs_only(monkeypatch):
    import types

    class _Hopper(B.Backend):
        name = "_hopper"
        min_compute_capability = (9, 0)

    inp = _inp()
    on_gpu = dataclasses.replace(inp, q=types.SimpleNamespace(device=torch.device("cuda", 0), dtype=inp.q.dtype,
                                                              shape=inp.q.shape))
    monkeypatch.setitem(B.registry._CC, 0, (8, 0))
    assert _Hopper().not_supported_reasons(on_gpu) == [
        "needs a GPU of compute capability 9.0 or newer, this one is 8.0"]
    monkeypatch.setitem(B.registry._CC, 0, (9, 0))
    assert _Hopper().not_supported_reasons(on_gpu) == []
    monkeypatch.setitem(B.registry._CC, 0, (8, 0))
    assert _Hopper().not_supported_reasons(inp) == []  # a CPU tensor has no compute capability to check
    assert B.Backend().not_supported_reasons(on_gpu) == []  # no minimum declared: nothing to read
    # a device without an index is the current one
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    current = dataclasses.replace(on_gpu, q=types.SimpleNamespace(device=torch.device("cuda"), dtype=inp.q.dtype,
                                                                  shape=inp.q.shape))
    assert _Hopper().not_supported_reasons(current) == [
        "needs a GPU of compute capability 9.0 or newer, this one is 8.0"]
    assert None not in B.registry._CC
