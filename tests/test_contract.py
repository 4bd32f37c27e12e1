"""The contract, generated from the registry: every registered backend that can run here (library comparators
included) against the reference on the shared case table's ``contract`` cases (tests/cases.py), values and
gradients, with and without host-side segments, with the output poison switch on (a row a backend leaves
unwritten is NaN and fails). A backend that cannot run a case skips with its own reasons, so a new backend
is covered by registering it. Behaviour specific to one backend lives in that backend's test file."""
from __future__ import annotations

import zlib

import pytest
import torch
from cases import backend_device, backend_params, cases, skip_unless_runs

from elit_kernels import _outputs
from elit_kernels.attention import (SegmentRuns, get_backend, registry, validate_inputs, varlen_attention)
from elit_kernels.testing import check_backend_against_reference, random_varlen_inputs


pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # conftest.py: every backend's outputs NaN-filled first


def _dtype(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


@pytest.mark.parametrize("with_segments", [False, True], ids=["tensors", "segments"])
@pytest.mark.parametrize("case", cases("contract"))
@pytest.mark.parametrize("backend", backend_params())
def test_every_backend_matches_the_reference(backend, case, with_segments):
    assert _outputs.poison_outputs_enabled()
    dev = backend_device(backend)
    lens_q, lens_k = case.lens
    seg = SegmentRuns.from_lengths(lens_q, lens_k) if with_segments else None
    q, k, v, cq, ck, mq, mk = random_varlen_inputs(lens_q, lens_k, 2, 16, dtype=_dtype(dev), device=dev, seed=0,
                                                   kv_heads=case.kv_heads, extra_q=case.extra_q,
                                                   extra_k=case.extra_k)
    inp = validate_inputs(q, k, v, cq, ck, mq, mk, case.scale, case.causal, window_size=case.window,
                          softcap=case.softcap, segments=seg)
    why = registry.reasons(get_backend(backend), inp)
    if why:
        pytest.skip(f"backend {backend!r} cannot run this case here: {'; '.join(why)}")

    def fn(q, k, v, cq, ck, mq, mk, scale, c):
        return varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=scale, causal=c, backend=backend,
                                window_size=case.window, softcap=case.softcap, segments=seg)

    check_backend_against_reference(fn, lens_q, lens_k, 2, 16, _dtype(dev), causal=case.causal, device=dev,
                                    seed=zlib.crc32(f"{backend}-{lens_q}".encode()) % 1000, kv_heads=case.kv_heads,
                                    extra_q=case.extra_q, extra_k=case.extra_k, window_size=case.window,
                                    softcap=case.softcap, scale=case.scale)


@pytest.mark.parametrize("backend", backend_params())
def test_loose_bounds_and_windows_past_every_segment_are_exact_on_every_backend(backend):
    # "no limit" spelled as a huge max_seqlen or window side (2**31 - 1, sys.maxsize, 2**63) is the exact answer:
    # bounds past the rows are the row count and sides past every segment are unbounded, so no kernel adds them
    # to a position (int32/int64 overflow gave zeros or garbage before)
    dev = backend_device(backend)
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 4], [5, 2], 2, 16, dtype=_dtype(dev), device=dev, seed=5,
                                                   requires_grad=True)
    skip_unless_runs(backend, q, k, v, cq, ck, mq, mk, return_lse=True)
    windows = not registry.reasons(get_backend(backend), validate_inputs(q, k, v, cq, ck, mq, mk, None, False,
                                                                         return_lse=True, window_size=(0, 0)))
    want, want_lse = varlen_attention(q, k, v, cq, ck, mq, mk, return_lse=True, backend="reference")
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for big in (2**31 - 1, 2**31 - 8, 2**63 - 1, 2**63):
        for max_q, max_k, window in ((big, big, (-1, -1)), (mq, mk, (big, big)), (big, big, (-1, big)))[:3 if windows else 1]:
            out, lse = varlen_attention(q, k, v, cq, ck, max_q, max_k, return_lse=True, window_size=window,
                                        backend=backend)
            torch.testing.assert_close(out, want)
            torch.testing.assert_close(lse, want_lse)
            for a, b in zip(torch.autograd.grad(out, (q, k, v), g), want_grads):
                torch.testing.assert_close(a, b)
    inp = validate_inputs(q, k, v, cq, ck, 2**63, 2**31 - 1, None, False, window_size=(2**64, 7))
    assert (inp.max_seqlen_q, inp.max_seqlen_k, inp.window_left, inp.window_right) == (7, 7, -1, -1)
    inp = validate_inputs(q, k, v, cq, ck, mq, mk, None, False, window_size=(mk - 1, mq - 1))  # still a window
    assert (inp.max_seqlen_q, inp.max_seqlen_k, inp.window_left, inp.window_right) == (4, 5, 4, 3)
    inp = validate_inputs(q, k, v, cq, ck, mq, mk, None, False, window_size=(mk, mq))  # reaches past: unbounded
    assert (inp.window_left, inp.window_right) == (-1, -1)


def test_meta_tensors_run_without_reading_cu_seqlens():
    # no values to check or read: every check that needs none still runs, and the result has the right shape
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 4], [5, 2], 2, 16, seed=6)
    out, lse = varlen_attention(*(t.to("meta") for t in (q, k, v, cq, ck)), mq, mk, return_lse=True)
    assert out.device.type == "meta" and out.shape == q.shape and lse.shape == (2, q.shape[0])
    with pytest.raises(ValueError, match="^k: head dim 8 does not match"):
        varlen_attention(*(t.to("meta") for t in (q, k[..., :8], v, cq, ck)), mq, mk)


def test_the_library_comparators_are_in_the_contract():
    # torch_varlen and flash_attn are checked against the reference like our own kernels (they skip, with
    # their reasons, where they cannot run)
    names = [p.id for p in backend_params()]
    assert {"torch_varlen", "flash_attn", "reference", "torch", "triton", "cpp", "cuda"} <= set(names), names


def test_segments_that_disagree_with_the_tensors_are_refused():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([4, 4], [6, 6], 2, 16, seed=1)
    for seg, match in ((SegmentRuns.from_lengths([4], [6]), "segments: describes 1 segments, cu_seqlens_q has 2"),
                       (SegmentRuns.from_lengths([4, 5], [6, 6]), "segments: 9 query rows, q holds 8"),
                       (SegmentRuns.from_lengths([4, 4], [6, 7]), "segments: 13 key rows, k/v hold 12"),
                       ("4,4", "segments: expected an elit_kernels.attention.SegmentRuns or None, got str")):
        with pytest.raises((ValueError, TypeError), match=match):
            varlen_attention(q, k, v, cq, ck, mq, mk, segments=seg)
    with pytest.raises(ValueError, match=r"max_seqlen_q: 3 is smaller than the longest segment \(4\) in segments"):
        varlen_attention(q, k, v, cq, ck, 3, mk, segments=SegmentRuns.from_lengths([4, 4], [6, 6]))


def test_segments_with_other_lengths_than_cu_seqlens_are_refused_once_checked():
    # same totals and count, different per-segment lengths: each backend would read its own source of lengths
    from elit_kernels.attention import inputs as I

    q, k, v, cq, ck, mq, mk = random_varlen_inputs([4, 2], [6, 6], 2, 16, seed=2)
    wrong = SegmentRuns.from_lengths([3, 3], [6, 6])
    with pytest.raises(ValueError, match=r"segments: segment 0 has \(Lq, Lk\) = \(3, 6\) in segments but \(4, 6\)"):
        varlen_attention(q, k, v, cq, ck, mq, mk, segments=wrong)
    right = SegmentRuns.from_lengths([4, 2], [6, 6])
    out = varlen_attention(q, k, v, cq, ck, mq, mk, segments=right)
    torch.testing.assert_close(out, varlen_attention(q, k, v, cq, ck, mq, mk, backend="reference"))
    rec = I._VERIFIED[(id(cq), id(ck), right)]  # checked once; later calls with the same tensors look it up
    assert rec[0]() is cq and rec[2] == (cq._version, ck._version)
    cq.add_(0)  # an in-place write bumps the version: checked again, and the record follows
    varlen_attention(q, k, v, cq, ck, mq, mk, segments=right)
    assert I._VERIFIED[(id(cq), id(ck), right)][2] == (cq._version, ck._version)


def test_a_new_cu_seqlens_tensor_is_checked_again_whatever_its_address():
    # the once-per-layout record holds weak references: a tensor allocated where a checked one was freed is new
    q = k = v = torch.randn(8, 2, 16)
    seg = SegmentRuns.from_lengths([3, 5], [3, 5])
    for _ in range(8):
        good = torch.tensor([0, 3, 8], dtype=torch.int32)
        varlen_attention(q, k, v, good, good, 5, 5, segments=seg)
        del good
        bad = torch.tensor([0, 4, 8], dtype=torch.int32)
        with pytest.raises(ValueError, match=r"segments: segment 0 has \(Lq, Lk\) = \(3, 3\) in segments but \(4, 4\)"):
            varlen_attention(q, k, v, bad, bad, 5, 5, segments=seg)


def test_segment_runs_refuse_what_is_not_a_description():
    import numpy as np

    assert SegmentRuns.from_lengths([np.int64(2), 3], [1, 1]).runs == ((1, 2, 1), (1, 3, 1))
    for make, err, match in (
            (lambda: SegmentRuns.uniform_runs(2, -3, 4), ValueError, "len_q: segment lengths must be >= 0, got -3"),
            (lambda: SegmentRuns.uniform_runs(2, 4.0, 4), TypeError, r"len_q: expected ints >= 0, got float"),
            (lambda: SegmentRuns.uniform_runs("2", 3, 4), TypeError, "n_segments: expected ints >= 0, got str"),
            (lambda: SegmentRuns.from_lengths([2.7], [1]), TypeError, "lengths_q: expected ints >= 0, got float"),
            (lambda: SegmentRuns.from_lengths([True], [1]), TypeError, "lengths_q: expected ints >= 0, got bool"),
            (lambda: SegmentRuns(((1, 3, 3), (1, 5, 5)), 6, 8), ValueError, r"total_q/total_k \(6, 8\) do not match"),
            (lambda: SegmentRuns([(1, 2, 2)], 2, 2), TypeError, "segments: runs must be a tuple"),
            (lambda: SegmentRuns(((0, 9, 9),), 0, 0), ValueError, r"run \(0, 9, 9\) needs n_segments >= 1"),
            (lambda: SegmentRuns(((1, 3, 5),), 3.0, 5), TypeError, "segments: total_q and total_k must be ints"),
            (lambda: SegmentRuns(((1, 3, 5),), 3, True), TypeError, "segments: total_q and total_k must be ints"),
            (lambda: SegmentRuns.from_lengths(5, [5]), TypeError, "lengths_q: expected a sequence of ints"),
            (lambda: SegmentRuns.from_lengths([5], None), TypeError, "lengths_k: expected a sequence of ints"),
            (lambda: SegmentRuns.from_lengths("55", [5, 5]), TypeError, "lengths_q: expected a sequence of ints")):
        with pytest.raises(err, match=match):
            make()


def test_segment_runs_merge_equal_neighbours_and_derive_their_fields():
    assert SegmentRuns.from_lengths([2, 2, 2], [3, 3, 3]).runs == ((3, 2, 3),)
    assert SegmentRuns.from_lengths([2, 2, 1, 2], [3, 3, 3, 3]).runs == ((2, 2, 3), (1, 1, 3), (1, 2, 3))
    assert SegmentRuns.from_lengths([2, 2], [3, 2]).runs == ((1, 2, 3), (1, 2, 2))  # equal Lq, different Lk
    empty = SegmentRuns.from_lengths([], [])
    assert empty.runs == () and empty.uniform and empty.num_segments == 0 and (empty.max_q, empty.max_k) == (0, 0)
    assert SegmentRuns.uniform_runs(0, 3, 4) == empty  # no segments: no run (a run holds at least one)
    one = SegmentRuns.from_lengths([4, 4], [5, 5])
    assert one.uniform and one.runs == ((2, 4, 5),) and one.offsets == ((2, 4, 5, 0, 8, 0, 10),)
    r = SegmentRuns.from_lengths([4, 4, 0], [5, 5, 7])
    assert (r.total_q, r.total_k, r.num_segments, r.max_q, r.max_k, r.uniform) == (8, 17, 3, 4, 7, False)
    assert r.offsets == ((2, 4, 5, 0, 8, 0, 10), (1, 0, 7, 8, 8, 10, 17))
    assert SegmentRuns.uniform_runs(3, 2, 5) == SegmentRuns(((3, 2, 5),), 6, 15)
    assert hash(SegmentRuns.from_lengths([4, 4], [5, 5])) == hash(one)  # equal descriptions: one dictionary key
    with pytest.raises(ValueError, match="lengths_k: has 1 segments, lengths_q has 2"):
        SegmentRuns.from_lengths([1, 2], [3])
    with pytest.raises(ValueError, match="lengths_q: segment lengths must be >= 0"):
        SegmentRuns.from_lengths([1, -2], [3, 3])
    with pytest.raises(ValueError, match="lengths_k: segment lengths must be >= 0"):
        SegmentRuns.from_lengths([1, 2], [3, -3])
    with pytest.raises(ValueError, match="len_k: segment lengths must be >= 0"):
        SegmentRuns.uniform_runs(1, 1, -1)


@pytest.mark.parametrize("run, err", [((1, 2.0, 3), TypeError), ((1, 2, True), TypeError), ((1, 2), TypeError),
                                      ([1, 2, 3], TypeError), ((1, -1, 3), ValueError), ((1, 3, -1), ValueError)])
def test_segment_runs_refuse_a_run_that_is_not_three_ints(run, err):
    # a run is (n_segments >= 1, Lq >= 0, Lk >= 0) of ints; each part is checked on its own (totals that agree
    # with the bad run, so that only the run's own check can refuse it)
    totals = (run[0] * run[1], run[0] * run[2]) if err is ValueError else (2, 3)
    match = r"^segments: run .* needs n_segments >= 1 and lengths >= 0" if err is ValueError else \
        r"^segments: each run must be a tuple"
    with pytest.raises(err, match=match):
        SegmentRuns((run,), *totals)


def test_segments_are_compared_with_cu_seqlens_once_with_one_host_read(monkeypatch):
    # the first call with a (cu_seqlens pair, segments) reads both tensors in one copy (one device sync on a GPU);
    # later calls with the same tensors read nothing; the record stays bounded
    from elit_kernels.attention import inputs as I

    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(tuple(t.shape)) or real(t))
    seg = SegmentRuns.from_lengths([3, 5], [2, 6])
    cq, ck = torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 2, 8], dtype=torch.int32)
    for _ in range(3):
        I._verify_segments_once(seg, cq, ck)
    assert reads == [(2, 3)]
    monkeypatch.setattr(I, "_VERIFIED_MAX", 2)
    I._VERIFIED.clear()
    pairs = [(torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 2, 8], dtype=torch.int32)) for _ in range(4)]
    for a, b in pairs:
        I._verify_segments_once(seg, a, b)
    assert len(I._VERIFIED) == 2 and (id(pairs[-1][0]), id(pairs[-1][1]), seg) in I._VERIFIED


@pytest.mark.parametrize("cq, ck", [([1, 4, 9], [0, 2, 8]), ([0, 3, 8], [1, 3, 9])], ids=["cu_q", "cu_k"])
def test_segments_refuse_cu_seqlens_that_do_not_start_at_zero(cq, ck):
    # the lengths agree with the segments, the offsets do not: either tensor starting elsewhere is refused
    from elit_kernels.attention import inputs as I

    cq, ck = torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32)
    seg = SegmentRuns.from_lengths((cq[1:] - cq[:-1]).tolist(), (ck[1:] - ck[:-1]).tolist())
    with pytest.raises(ValueError, match="segments: cu_seqlens_q and cu_seqlens_k must start at 0"):
        I._verify_segments_once(seg, cq, ck)


def test_segments_with_meta_cu_seqlens_are_not_read():
    # fake/meta tensors (shape propagation, torch.compile's fake mode) hold no values: nothing to compare
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 5], [2, 6], 2, 16, seed=3)
    seg = SegmentRuns.from_lengths([3, 5], [2, 6])
    inp = validate_inputs(*(t.to("meta") for t in (q, k, v, cq, ck)), mq, mk, None, False, segments=seg)
    assert inp.segments is seg and inp.cu_seqlens_q.device.type == "meta"


def test_a_backend_that_breaks_the_output_contract_is_named():
    class _Bad(registry.Backend):
        name, priority, known_answer, devices = "_bad_shape", -999, False, ("cpu",)

        def forward(self, inp):
            return inp.q[:3].double()

    registry.register_backend(_Bad())
    try:
        q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 2], [4, 4], 2, 16, seed=3)
        with pytest.raises(RuntimeError, match=r"backend '_bad_shape': its forward returned \(3, 2, 16\) "
                                               r"torch.float64 on cpu, the contract is q's shape, dtype and device"):
            varlen_attention(q, k, v, cq, ck, mq, mk, backend="_bad_shape")
        with pytest.raises(RuntimeError, match=r"backend '_bad_shape': asked for \(out, lse\)"):
            varlen_attention(q, k, v, cq, ck, mq, mk, backend="_bad_shape", return_lse=True)
    finally:
        registry._REGISTRY.pop("_bad_shape", None)


@pytest.mark.parametrize("answer, return_lse, match", [
    (lambda inp: inp.q.double(), False,  # the dtype alone is wrong
     r"its forward returned \(5, 2, 16\) torch.float64 on cpu, the contract is q's shape, dtype and device "
     r"\(\(5, 2, 16\) torch.float32 on cpu\)"),
    (lambda inp: inp.q.to("meta"), False, r"its forward returned \(5, 2, 16\) torch.float32 on meta"),  # the device
    (lambda inp: (inp.q, None), True, r"its forward returned an lse of NoneType, the contract is float32 \(float64 for "
                                      r"float64 inputs\) \[H, total_q\] = \(2, 5\) on cpu"),
    (lambda inp: (inp.q, inp.q[..., 0]), True, r"its forward returned an lse of \(5, 2\) torch.float32 on cpu"),  # [total_q, H]: transposed
    (lambda inp: (inp.q, inp.q[..., 0].T.double()), True, r"its forward returned an lse of \(2, 5\) torch.float64 on cpu"),
    (lambda inp: (inp.q, inp.q[..., 0].T.to("meta")), True, r"its forward returned an lse of \(2, 5\) torch.float32 on meta"),
    (lambda inp: inp.q[:4], False, r"its forward returned \(4, 2, 16\) torch.float32"),  # the shape alone is wrong
    (lambda inp: [inp.q], False, r"its forward returned list, the contract"),  # not a tensor
    (lambda inp: (inp.q, inp.q[..., 0].T, None), True, r"asked for \(out, lse\), its forward returned tuple"),
    (lambda inp: [inp.q, inp.q[..., 0].T], True, r"asked for \(out, lse\), its forward returned list"),
])
def test_each_way_of_breaking_the_output_contract_is_caught(answer, return_lse, match):
    class _Bad(registry.Backend):
        name, priority, known_answer, devices = "_bad_answer", -999, False, ("cpu",)

        def forward(self, inp):
            return answer(inp)

    registry.register_backend(_Bad())
    try:
        q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 2], [4, 4], 2, 16, seed=3)
        with pytest.raises(RuntimeError, match="backend '_bad_answer': " + match):
            varlen_attention(q, k, v, cq, ck, mq, mk, backend="_bad_answer", return_lse=return_lse)
    finally:
        registry._REGISTRY.pop("_bad_answer", None)


def test_the_poison_switch_reaches_every_backend_that_allocates_outputs(monkeypatch):
    """One switch (``elit_kernels._outputs``, ``ELIT_POISON_OUTPUTS``): Triton's launchers allocate through it,
    the compiled ops follow it, and the torch backend's grouped op writes every row itself, so a row its plan
    missed would come out NaN (here: a plan that forgets to zero the rows past cu_seqlens_q[-1])."""
    from elit_kernels import _cext
    from elit_kernels.attention.backends import torch_ops

    assert _outputs.poison_outputs_enabled()  # this file's fixture
    assert torch.isnan(_outputs.new_output((3, 2), torch.float32, "cpu")).all()
    if _cext.available():
        assert _cext._C.poison_outputs_enabled()
        _outputs.set_poison_outputs(False)
        assert not _cext._C.poison_outputs_enabled() and not _outputs.poison_outputs_enabled()
        _outputs.set_poison_outputs(True)
        assert _cext._C.poison_outputs_enabled()
    try:
        from elit_kernels._triton import _common
    except ImportError:
        pass
    else:
        assert _common.alloc is _outputs.new_output
    with pytest.raises(TypeError, match="enabled: expected a bool, got int"):
        _outputs.set_poison_outputs(1)

    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 0, 2], [4, 2, 5], 2, 8, seed=4, extra_q=2, extra_fill=None)
    out, _ = torch_ops.varlen_attn_fwd_torch(q, k, v, cq, ck, 0.3, False)
    assert not out.isnan().any() and torch.equal(out[5:], torch.zeros_like(out[5:]))
    plan = torch_ops._plan

    def forgetful(*a):
        idle, chunks = plan(*a)
        return idle[:-1], chunks  # the last row past the packed data is never written

    monkeypatch.setattr(torch_ops, "_plan", forgetful)
    out, lse = torch_ops.varlen_attn_fwd_torch(q, k, v, cq, ck, 0.3, False)
    assert out[-1].isnan().all() and lse[:, -1].isnan().all() and not out[:-1].isnan().any()
    dq, _, _ = torch_ops.varlen_attn_bwd_torch(torch.randn_like(q), q, k, v, lse, cq, ck, 0.3, False)
    assert dq[-1].isnan().all() and not dq[:-1].isnan().any()


def _dispatch(q, k, v, cq, ck, mq, mk, s, c):
    return varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=s, causal=c)


@pytest.mark.parametrize("wrong,says", [
    (lambda *a: _dispatch(*a)[:-1], r"out: expected a tensor of q's shape, dtype and device \(\(8, 2, 8\) torch.float32"),
    (lambda *a: _dispatch(*a).double(), r"out: expected a tensor of q's shape.*got \(8, 2, 8\) torch.float64"),
    (lambda *a: None, r"out: expected a tensor of q's shape.*got NoneType"),
    (lambda *a: _dispatch(*a).detach(), r"out: does not require grad"),
    (lambda *a: _dispatch(*a) * 1.001, r"out: max abs err"),
])
def test_the_reference_check_fails_a_wrong_callable_by_name(wrong, says):
    """check_backend_against_reference (README: check a backend against the reference) fails a wrong callable with an
    AssertionError naming what is wrong, never a traceback from inside autograd, and never a silent pass (a float64
    output for float32 inputs passed before)."""
    with pytest.raises(AssertionError, match=says):
        check_backend_against_reference(wrong, [3, 5], [4, 2], 2, 8, torch.float32)
    with pytest.raises(AssertionError, match=r"^out: with check_lse the callable must return \(out, lse\), got Tensor"):
        check_backend_against_reference(_dispatch, [3, 5], [4, 2], 2, 8, torch.float32, check_lse=True)
    out = check_backend_against_reference(_dispatch, [3, 5], [4, 2], 2, 8, torch.float32, grads=False)  # crashed
    assert out.shape == (8, 2, 8)
    for kw, msg in ((dict(lens_q=[-1, 2]), r"^lens_q: expected a sequence of segment lengths \(ints >= 0\)"),
                    (dict(lens_k=[1.5, 2]), r"^lens_k: expected a sequence"), (dict(head_dim=0), r"^head_dim: expected"),
                    (dict(heads=0), r"^heads: expected an int >= 1")):
        a = dict(lens_q=[3, 5], lens_k=[4, 2], heads=2, head_dim=8, dtype=torch.float32)
        a.update(kw)
        with pytest.raises(ValueError, match=msg):
            check_backend_against_reference(_dispatch, **a)
