"""Every input check of varlen_attention raises an error that names the offending argument."""
import numpy as np
import pytest
import torch

from elit_kernels import set_value_checks, value_checks_enabled, varlen_attention
from elit_kernels.attention.inputs import MAX_RUNS
from elit_kernels.testing import random_varlen_inputs


@pytest.fixture
def args():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 5], [4, 2], 2, 64, seed=11)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=mk)


_POSITIONAL = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


def call(a, **kw):
    """varlen_attention with ``a``'s seven positional arguments and any keyword a case put in ``a``."""
    extra = {n: x for n, x in a.items() if n not in _POSITIONAL}
    return varlen_attention(*(a[n] for n in _POSITIONAL), **extra, **kw)


def i32(*xs):
    return torch.tensor(xs, dtype=torch.int32)


CASES = {
    "q-rank": (lambda a: a.update(q=a["q"][:, 0]), ValueError, r"^q: .*3-D"),
    "k-rank": (lambda a: a.update(k=a["k"][None]), ValueError, r"^k: .*3-D"),
    "q-not-tensor": (lambda a: a.update(q=[1, 2]), TypeError, r"^q: expected a torch.Tensor"),
    "k-not-tensor": (lambda a: a.update(k=None), TypeError, r"^k: expected a torch.Tensor"),
    "v-not-tensor": (lambda a: a.update(v=a["v"].numpy()), TypeError, r"^v: expected a torch.Tensor"),
    "q-no-heads": (lambda a: a.update(q=a["q"][:, :0]), ValueError, r"^q: has 0 heads; expected at least 1"),
    "q-sparse": (lambda a: a.update(q=a["q"].to_sparse()), TypeError, r"^q: expected a dense \(strided\) tensor"),
    "k-heads": (lambda a: a.update(k=torch.randn(6, 3, 64), v=torch.randn(6, 3, 64)), ValueError,
                r"^k: has 3 heads, which does not divide q's 2 heads"),
    "v-heads": (lambda a: a.update(v=a["v"][:, :1]), ValueError, r"^v: has 1 heads, k has 2"),
    "v-rank": (lambda a: a.update(v=a["v"][:, 0]), ValueError, r"^v: .*3-D"),
    "v-headdim": (lambda a: a.update(v=a["v"][..., :32]), ValueError, r"^v: head dim 32"),
    "k-headdim": (lambda a: a.update(k=a["k"][..., :32]), ValueError, r"^k: head dim 32 does not match q's head dim 64"),
    "v-tokens": (lambda a: a.update(v=a["v"][:5]), ValueError, r"^v: has 5 tokens"),
    "k-dtype": (lambda a: a.update(k=a["k"].half()), TypeError, r"^k: dtype torch.float16"),
    "v-dtype": (lambda a: a.update(v=a["v"].half()), TypeError, r"^v: dtype torch.float16 does not match q's"),
    "k-device": (lambda a: a.update(k=a["k"].to("meta")), ValueError, r"^k: on device meta, but q is on cpu"),
    "q-dtype-int": (lambda a: a.update(q=a["q"].long(), k=a["k"].long(), v=a["v"].long()), TypeError, r"^q: dtype"),
    "v-device": (lambda a: a.update(v=a["v"].to("meta")), ValueError, r"^v: on device meta"),
    "cu_k-device": (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"].to("meta")), ValueError, r"^cu_seqlens_k: on device meta"),
    "cu_q-dtype": (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), TypeError, r"^cu_seqlens_q: expected dtype torch.int32"),
    "cu_k-2d": (lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"][None]), ValueError, r"^cu_seqlens_k: expected a 1-D"),
    "cu_k-length": (lambda a: a.update(cu_seqlens_k=i32(0, 6)), ValueError, r"^cu_seqlens_k: has 2 elements but cu_seqlens_q has 3"),
    "cu_q-start": (lambda a: a.update(cu_seqlens_q=i32(1, 3, 8)), ValueError, r"^cu_seqlens_q: must start at 0"),
    "cu_k-decreasing": (lambda a: a.update(cu_seqlens_k=i32(0, 7, 6)), ValueError, r"^cu_seqlens_k: must be non-decreasing"),
    "cu_k-decreasing-after-empty": (lambda a: a.update(cu_seqlens_k=i32(0, 0, -1)), ValueError,
                                    r"^cu_seqlens_k: must be non-decreasing, but cu_seqlens_k\[2\] = -1 < cu_seqlens_k\[1\] = 0"),
    "cu_q-end": (lambda a: a.update(cu_seqlens_q=i32(0, 3, 9)), ValueError, r"^cu_seqlens_q: last element 9 is past the end .* \(8 rows\)"),
    "cu_k-end": (lambda a: a.update(cu_seqlens_k=i32(0, 4, 7)), ValueError, r"^cu_seqlens_k: last element 7 is past"),
    "max_q-small": (lambda a: a.update(max_seqlen_q=4), ValueError, r"^max_seqlen_q: 4 is smaller than the longest segment \(5\)"),
    "max_k-small": (lambda a: a.update(max_seqlen_k=3), ValueError, r"^max_seqlen_k: 3 is smaller"),
    "max_k-type": (lambda a: a.update(max_seqlen_k=4.0), TypeError, r"^max_seqlen_k: expected an int"),
    "max_k-bool": (lambda a: a.update(max_seqlen_k=True), TypeError, r"^max_seqlen_k: expected an int, got bool"),
    "max_q-1d-tensor": (lambda a: a.update(max_seqlen_q=torch.tensor([5])), TypeError,
                        r"^max_seqlen_q: expected an int or a 0-dim integer tensor, got a tensor of shape \(1,\)"),
    "max_q-float-tensor": (lambda a: a.update(max_seqlen_q=torch.tensor(5.0)), TypeError, r"^max_seqlen_q: .*float32"),
    "max_q-small-tensor": (lambda a: a.update(max_seqlen_q=torch.tensor(4)), ValueError,
                           r"^max_seqlen_q: 4 is smaller"),
    "max_q-negative": (lambda a: a.update(max_seqlen_q=-1), ValueError, r"^max_seqlen_q: must be >= 0"),
    "scale-inf": (lambda a: a.update(softmax_scale=float("inf")), ValueError,
                  r"^softmax_scale: expected a finite float within float32's range"),
    "scale-nan": (lambda a: a.update(softmax_scale=float("nan")), ValueError, r"^softmax_scale: expected a finite"),
    "scale-past-float32": (lambda a: a.update(softmax_scale=-1e39), ValueError, r"^softmax_scale: expected a finite"),
    "head-dim-zero": (lambda a: [a.update({n: a[n][..., :0]}) for n in "qkv"], ValueError,
                      r"^q: head dim 0 not supported; expected 1..256"),
    "head-dim-big": (lambda a: [a.update({n: torch.randn(a[n].shape[0], 2, 264)}) for n in "qkv"], ValueError,
                     r"^q: head dim 264 not supported; expected 1..256"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_names_argument(args, case):
    mutate, exc, pattern = CASES[case]
    mutate(args)
    with pytest.raises(exc, match=pattern):
        call(args)


def test_bad_keyword_arguments(args):
    with pytest.raises(TypeError, match=r"^softmax_scale:"):
        call(args, softmax_scale="0.1")
    with pytest.raises(TypeError, match=r"^causal:"):
        call(args, causal=1)


def test_unknown_backend_lists_known_ones(args):
    with pytest.raises(ValueError, match=r"^backend: unknown backend 'nope'; known backends: (?=.*\breference\b)(?=.*\btorch\b)"):
        call(args, backend="nope")


def test_unavailable_backend_lists_reasons(args):
    # torch_varlen needs CUDA tensors (and fp16/bf16): every reason is listed in one error.
    with pytest.raises(ValueError, match=r"^backend: backend 'torch_varlen' cannot run these inputs \(q \(8, 2, 64\), "
                                         r"k/v \(6, 2, 64\), 2 segments, torch.float32, cpu\): .*dtype torch.float32.*"
                                         r"needs cuda tensors"):
        call(args, backend="torch_varlen")


def test_reference_rejects_nothing_valid_and_fp64_allowed(args):
    for n in "qkv":
        args[n] = args[n].double()
    assert call(args, backend="reference").dtype == torch.float64


def test_value_checks_switch(args):
    args["cu_seqlens_q"] = i32(0, 3, 9)  # wrong end: caught only by the value checks
    assert value_checks_enabled()
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        call(args)
    set_value_checks(False)
    try:
        # Without value checks nothing reads cu_seqlens on the host; the reference backend does, and
        # would run past the end, so we only check that validation itself no longer raises.
        from elit_kernels.attention import validate_inputs
        validate_inputs(args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"],
                        args["max_seqlen_q"], args["max_seqlen_k"], None, False)
    finally:
        set_value_checks(True)


def test_value_checks_skipped_under_compile(args, monkeypatch):
    import elit_kernels.attention as att

    args["cu_seqlens_q"] = i32(0, 3, 9)  # a bad value: past the end of q

    def validate():
        return att.validate_inputs(args["q"], args["k"], args["v"], args["cu_seqlens_q"], args["cu_seqlens_k"],
                                   args["max_seqlen_q"], args["max_seqlen_k"], None, False)

    with pytest.raises(ValueError, match="cu_seqlens_q"):  # eager: the value check reads it and refuses
        validate()
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or real_tolist(t))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    inp = validate()  # tracing: no host read of cu_seqlens, so no error from values
    assert inp.cu_seqlens_q is args["cu_seqlens_q"] and reads == []


# --- written against the mutation run (benchmarks/results/mutation.md) ---

@pytest.mark.parametrize("window,side,err", [((-2, 0), "left", ValueError), ((0, -2), "right", ValueError),
                                             ((True, 0), "left", TypeError), ((0, 1.5), "right", TypeError),
                                             ((torch.tensor(1.0), 0), "left", TypeError)])
def test_window_errors_name_the_side(args, window, side, err):
    with pytest.raises(err, match=rf"^window_size: {side} must be"):
        call(args, window_size=window)


def test_window_edges(args):
    """-1 is the smallest legal side; 0-dim integer tensors are accepted; causal makes the right side the causal
    bound whatever it was given as."""
    from elit_kernels.attention import validate_inputs
    a = [args[n] for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")]
    inp = validate_inputs(*a, None, False, window_size=(torch.tensor(2), torch.tensor(-1)))
    assert (inp.window_left, inp.window_right) == (2, -1)
    inp = validate_inputs(*a, None, True, window_size=(3, 5))
    assert (inp.window_left, inp.window_right, inp.causal) == (3, -1, True)
    assert validate_inputs(*a, None, False).return_lse is False and validate_inputs(*a, None, False).softcap == 0.0
    # softmax_scale and causal default as in varlen_attention (None: D**-0.5; not causal), and take keywords
    dflt, kw = validate_inputs(*a), validate_inputs(*a, softmax_scale=0.3, causal=True)
    assert (dflt.softmax_scale, dflt.causal) == (a[0].shape[-1] ** -0.5, False) and (kw.softmax_scale, kw.causal) == (0.3, True)
    inp = validate_inputs(*a, None, False, return_lse=True, softcap=2)
    assert inp.return_lse is True and inp.softcap == 2.0 and type(inp.softcap) is float
    for flag in (1, "False", torch.tensor([1, 0])):  # a flag is a bool, as causal is ("False" is truthy)
        with pytest.raises(TypeError, match=r"^return_lse: expected a bool, got "):
            validate_inputs(*a, None, False, return_lse=flag)
    with pytest.raises(TypeError, match=r"^causal: expected a bool, got torch.Tensor$"):  # a type name that
        validate_inputs(*a, None, torch.tensor(True))  # is not a builtin's is given with its module
    # NumPy's bool (what array.any() returns) is a bool: taken, as a Python bool
    inp = validate_inputs(*a, None, np.True_, return_lse=np.False_)
    assert inp.causal is True and inp.return_lse is False


@pytest.mark.parametrize("softcap,err", [(True, TypeError), ("1", TypeError), (-0.5, ValueError), (1e-300, ValueError),
                                         (1e39, ValueError),
                                         (float("inf"), ValueError), (float("nan"), ValueError)])
def test_softcap_errors(args, softcap, err):
    with pytest.raises(err, match="^softcap: expected"):
        call(args, softcap=softcap)


def test_legal_edges_of_the_contract():
    """Zero segments (cu = [0]), empty segments, head dims 1 and 256: all legal and right."""
    from elit_kernels.reference.attention import varlen_attention_reference
    q = torch.randn(0, 2, 8)
    out = varlen_attention(q, q, q, torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), 0, 0,
                           backend="torch")
    assert out.shape == (0, 2, 8)
    for d in (1, 256):
        q, k, v, cq, ck, mq, mk = random_varlen_inputs([0, 3, 2], [2, 0, 4], 2, d, seed=d)
        out = varlen_attention(q, k, v, cq, ck, mq, mk, backend="torch")
        ref = varlen_attention_reference(q, k, v, cq, ck, softmax_scale=d ** -0.5)
        torch.testing.assert_close(out, ref)


def test_set_value_checks_stores_a_bool():
    was = value_checks_enabled()
    try:
        set_value_checks(np.False_)
        assert value_checks_enabled() is False
        set_value_checks(True)
        assert value_checks_enabled() is True
        for bad in ("no", 0, 1, 2, None, torch.tensor([1, 0])):  # "no" is truthy: refused, not taken as True
            with pytest.raises(TypeError, match=r"^enabled: expected a bool"):
                set_value_checks(bad)
        assert value_checks_enabled() is True
    finally:
        set_value_checks(was)


def test_return_lse_and_window_reach_the_backend(args):
    """varlen_attention passes return_lse, window_size and softcap through (each changes the result)."""
    out, lse = call(args, backend="torch", return_lse=True)
    assert lse.shape == (2, args["q"].shape[0])
    plain = call(args, backend="torch")
    assert not torch.equal(call(args, backend="torch", window_size=(0, 0)), plain)
    assert not torch.equal(call(args, backend="torch", softcap=0.5), plain)


def test_validated_inputs_equal_the_dataclass_built_field_by_field():
    # validate_inputs builds AttnInputs through one __dict__ update (the hot path): it must be the same object as
    # the dataclass's own constructor gives, every field set, still frozen
    import dataclasses

    from elit_kernels.attention import AttnInputs, SegmentRuns, validate_inputs

    q, k = torch.randn(5, 4, 8), torch.randn(7, 2, 8)
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32)
    seg = SegmentRuns.from_lengths([2, 3], [3, 4])
    got = validate_inputs(q, k, k, cu_q, cu_k, 3, 4, 0.5, True, return_lse=True, window_size=(2, 1), softcap=3,
                          segments=seg)
    want = AttnInputs(q, k, k, cu_q, cu_k, 3, 4, 0.5, True, True, 2, -1, 3.0, seg)
    assert got == want and type(got) is AttnInputs
    assert {f.name for f in dataclasses.fields(AttnInputs)} == set(vars(got))
    assert [type(getattr(got, f)) for f in ("softmax_scale", "softcap", "return_lse")] == [float, float, bool]
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.causal = False
    assert dataclasses.replace(got, causal=False).causal is False


def test_type_checks_of_cu_seqlens_run_with_the_value_checks_off(args):
    # the switch turns off what reads cu_seqlens' values; its type, dtype and rank are always checked
    set_value_checks(False)
    try:
        args["cu_seqlens_q"] = args["cu_seqlens_q"].long()
        with pytest.raises(TypeError, match=r"^cu_seqlens_q: expected dtype torch.int32"):
            call(args)
    finally:
        set_value_checks(True)


def test_value_checks_off_never_compare_segments_with_cu_seqlens(args, monkeypatch):
    # with the switch off, neither varlen_attention nor a plan reads cu_seqlens to compare it with segments
    from elit_kernels.attention import AttentionPlan, SegmentRuns, inputs as I, plan as P

    compared = []
    monkeypatch.setattr(I, "_verify_segments_once", lambda *a: compared.append(a))
    monkeypatch.setattr(P, "_verify_segments_once", lambda *a: compared.append(a))
    seg = SegmentRuns.from_lengths([3, 5], [4, 2])
    a = args
    call(a, segments=seg)
    AttentionPlan(a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"], a["max_seqlen_k"], segments=seg)
    assert len(compared) == 2  # on: both compare
    set_value_checks(False)
    try:
        want = call(a, backend="torch")
        torch.testing.assert_close(call(a, segments=seg, backend="torch"), want)
        plan = AttentionPlan(a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"], a["max_seqlen_k"], segments=seg)
        torch.testing.assert_close(plan(a["q"], a["k"], a["v"], backend="torch"), want)
    finally:
        set_value_checks(True)
    assert len(compared) == 2


def test_window_sides_given_as_tensors_or_numpy_ints(args):
    import numpy as np

    want = call(args, backend="torch", window_size=(2, 1))
    for left in (np.int64(2), torch.tensor(2), torch.tensor([2])):
        torch.testing.assert_close(call(args, backend="torch", window_size=(left, 1)), want)
    for left in (torch.tensor([1, 2]), torch.tensor(2.0)):
        with pytest.raises(TypeError, match=r"^window_size: left must be an int >= -1 \(-1: unbounded\), got Tensor"):
            call(args, window_size=(left, 1))
    # causal bounds the right side itself: a causal call's right side is stored as -1 whatever was given
    from elit_kernels.attention import validate_inputs

    a = args
    for window in ((-1, -1), (3, 0), (3, 5)):
        inp = validate_inputs(a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], a["max_seqlen_q"],
                              a["max_seqlen_k"], None, True, window_size=window)
        assert (inp.window_left, inp.window_right) == (window[0], -1)


def test_describe_backends_names_a_bad_argument(args):
    from elit_kernels import describe_backends
    from elit_kernels.attention import validate_inputs

    with pytest.raises(TypeError, match=r"^inp: expected an AttnInputs"):
        describe_backends("x")
    inp = validate_inputs(*(args[n] for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                              "max_seqlen_k")), None, False)
    assert all("reasons" in row for row in describe_backends(inp))


def test_the_edges_of_the_float32_ranges_are_legal(args):
    # softmax_scale up to float32's max, softcap from its smallest normal to its max, ints as floats
    import torch as _t

    f32 = _t.finfo(_t.float32)
    want = call(args, backend="reference", softmax_scale=1.0)
    torch.testing.assert_close(call(args, backend="reference", softmax_scale=1), want)  # an int scale
    from elit_kernels.attention import AttentionPlan

    for scale in (float(f32.max), -float(f32.max)):
        call(args, backend="reference", softmax_scale=scale)
        AttentionPlan(args["cu_seqlens_q"], args["cu_seqlens_k"], 5, 4, softmax_scale=scale)  # checked when made
    for cap in (float(f32.tiny), float(f32.max), 3):
        assert call(args, backend="reference", softcap=cap).isfinite().all()



@pytest.mark.parametrize("lens_q, lens_k, runs", [
    ([4] * 3, [4] * 3, ((3, 4, 4),)),
    ([2, 2, 5], [4, 4, 4], ((2, 2, 4), (1, 5, 4))),
    ([1, 2, 3, 3], [1, 2, 3, 0], ((1, 1, 1), (1, 2, 2), (1, 3, 3), (1, 3, 0))),
    ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], tuple((1, n, n) for n in range(1, 6))),  # ragged, lengths still carried
    ([0], [3], ((1, 0, 3),)),
    (list(range(1, MAX_RUNS + 1)), [3] * MAX_RUNS, tuple((1, n, 3) for n in range(1, MAX_RUNS + 1))),
    (list(range(1, MAX_RUNS + 2)), [3] * (MAX_RUNS + 1), None),  # more: the kernels read cu_seqlens as they are
])
@pytest.mark.parametrize("extra", [0, 3])
def test_a_call_without_segments_carries_those_its_value_checks_read(lens_q, lens_k, runs, extra):
    """The eager value checks read cu_seqlens on the host anyway: what they read becomes the call's segments (up to
    MAX_RUNS runs, what the torch backend's dense path takes), so a flash-attn style call with uniform segments is
    dispatched and run as dense SDPA and no backend reads the lengths again; the output is the reference's and the
    same as with the segments passed by hand. Not with the value checks off (nothing was read) or
    derive_segments=False."""
    from elit_kernels.attention import SegmentRuns, validate_inputs

    q, k, v, cq, ck, mq, mk = random_varlen_inputs(lens_q, lens_k, 2, 8, seed=11, extra_q=extra, extra_k=extra)
    inp = validate_inputs(q, k, v, cq, ck, mq + 5, mk, None, False)
    want = None if runs is None else SegmentRuns(runs, sum(lens_q), sum(lens_k))
    assert inp.segments == want and (want is None or want == SegmentRuns.from_lengths(lens_q, lens_k))
    assert validate_inputs(q, k, v, cq, ck, mq, mk, None, False, derive_segments=False).segments is None
    set_value_checks(False)
    try:
        assert validate_inputs(q, k, v, cq, ck, mq, mk, None, False).segments is None
    finally:
        set_value_checks(True)
    out = varlen_attention(q, k, v, cq, ck, mq, mk)
    torch.testing.assert_close(out, varlen_attention(q, k, v, cq, ck, mq, mk, backend="reference"))
    assert torch.equal(out, varlen_attention(q, k, v, cq, ck, mq, mk, segments=SegmentRuns.from_lengths(lens_q, lens_k)))
    if extra:
        assert torch.equal(out[sum(lens_q):], torch.zeros_like(out[sum(lens_q):]))  # rows past the segments


def test_a_plan_over_a_static_buffer_rewritten_in_inference_mode_reads_its_new_lengths():
    """A plan keeps what its first call resolved; an inference tensor has no version counter, so a cu_seqlens
    buffer rewritten in place under inference_mode is not seen as changed. Segments derived from its old values
    would then run the old lengths: a plan made without segments derives none, and the backends read the tensors."""
    from elit_kernels.attention import AttentionPlan

    for backend in ("torch", None):  # torch: the backend that runs host-side segments as views (and keeps a runner)
        with torch.inference_mode():
            q, k, v, cq, ck, _, _ = random_varlen_inputs([4, 4, 4], [4, 4, 4], 2, 8, seed=5)
            plan = AttentionPlan(cq, ck, 12, 12)
            torch.testing.assert_close(plan(q, k, v, backend=backend),
                                       varlen_attention(q, k, v, cq, ck, 12, 12, backend="reference"))
            cq.copy_(torch.tensor([0, 2, 8, 12], dtype=torch.int32))
            ck.copy_(torch.tensor([0, 6, 7, 12], dtype=torch.int32))
            torch.testing.assert_close(plan(q, k, v, backend=backend),
                                       varlen_attention(q, k, v, cq, ck, 12, 12, backend="reference"))


def test_a_window_past_an_unchecked_max_seqlen_stays_a_window():
    """A window side at or past max_seqlen is stored as unbounded (-1). That holds only when max_seqlen bounds every
    segment: with the value checks off nobody checked it, and a caller who passed a max_seqlen_k below a segment got
    no window at all from the torch backend (which follows the data); found by a fuzz. Then the rows bound it."""
    from elit_kernels.attention import validate_inputs

    q, k, v, cq, ck, mq, mk = random_varlen_inputs([6], [10], 1, 8, seed=1)
    want = varlen_attention(q, k, v, cq, ck, mq, mk, window_size=(5, -1), backend="reference")
    assert validate_inputs(q, k, v, cq, ck, mq, mk, None, False, window_size=(10, -1)).window_left == -1  # checked
    set_value_checks(False)
    try:
        inp = validate_inputs(q, k, v, cq, ck, mq, 4, None, False, window_size=(5, -1))
        assert (inp.window_left, inp.window_right) == (5, -1)
        torch.testing.assert_close(varlen_attention(q, k, v, cq, ck, mq, 4, window_size=(5, -1), backend="torch"),
                                   want)
        assert validate_inputs(q, k, v, cq, ck, mq, 4, None, False, window_size=(10, 6)).window_left == -1  # rows
    finally:
        set_value_checks(True)
