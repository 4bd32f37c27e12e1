"""The `torch` backend's two paths (elit_kernels/attention/backends/torch_ops.py) against the reference, each forced.

Written against the mutation run (benchmarks/results/mutation.md): fp64 accumulation, chunked plans, the run
detection, and every case in which the dense-SDPA-per-run path must decline or must handle a segment kind.
"""
import pytest
import torch

from elit_kernels.attention.backends import torch_ops as TA
from elit_kernels import varlen_attention
from elit_kernels.reference.attention import varlen_attention_reference
from elit_kernels.testing import random_varlen_inputs


def _ref(q, k, v, cq, ck, scale=None, causal=False, lse=False):
    return varlen_attention_reference(q, k, v, cq, ck, softmax_scale=scale or q.shape[-1] ** -0.5, causal=causal,
                                      return_lse=lse)


def test_grouped_path_accumulates_fp64_for_fp64():
    """return_lse forces the grouped path; fp64 inputs must be exact to fp64 rounding, out, lse and grads."""
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 5, 1], [4, 2, 6], 2, 8, dtype=torch.float64, requires_grad=True)
    out, lse = varlen_attention(q, k, v, cq, ck, mq, mk, backend="torch", return_lse=True)
    ref, ref_lse = _ref(q, k, v, cq, ck, lse=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_path_in_small_chunks(monkeypatch, causal):
    """A tiny chunk budget splits segments over several chunks (and rows of one segment over several), as
    large inputs do: the values and gradients must not change."""
    monkeypatch.setattr(TA, "_CHUNK_ELEMS", 24)
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([7, 2, 9, 0, 4], [5, 3, 9, 2, 6], 2, 8, dtype=torch.float64,
                                                   requires_grad=True, kv_heads=1)
    out, _ = varlen_attention(q, k, v, cq, ck, mq, mk, backend="torch", causal=causal, return_lse=True)
    ref = _ref(q, k, v, cq, ck, causal=causal)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _runs(lens_q, lens_k, *, h=2, hkv=None, scale=None, causal=False, grad=False, extra_q=0):
    q, k, v, cq, ck, _, _ = random_varlen_inputs(lens_q, lens_k, h, 8, kv_heads=hkv, requires_grad=grad,
                                                 extra_q=extra_q, extra_fill=None)
    s = scale or 8 ** -0.5
    return TA.sdpa_over_runs(q, k, v, cq, ck, s, causal), _ref(q, k, v, cq, ck, scale=s, causal=causal)


@pytest.mark.parametrize("lens_q,lens_k,kw", [
    ([3, 3, 0, 0, 3], [4, 4, 4, 4, 4], {}),            # empty query segments inside and between runs
    ([2, 2, 2], [3, 3, 0], {}),                        # queries with no key: zeros
    ([1, 1, 1, 1], [5, 5, 5, 5], {"h": 4, "hkv": 2}),  # GQA over SDPA
    ([2, 2, 3], [1, 1, 1], {"h": 4, "hkv": 1}),        # single keys without gradients: v broadcast, GQA
    ([4, 4], [6, 6], {"scale": 0.3}),                  # softmax_scale reaches SDPA
    ([3, 3], [5, 5], {"causal": True}),                # bottom-right causal mask
    ([1, 1], [1, 1], {"causal": True}),                # causal single query on a single key
    ([2, 3], [4, 4], {"extra_q": 3}),                  # rows past the packed data: zeros
    ([2] * 64, list(range(1, 65)), {}),                # exactly MAX_RUNS runs
])
def test_sdpa_over_runs_matches_the_reference(lens_q, lens_k, kw):
    with torch.no_grad():
        out, ref = _runs(lens_q, lens_k, **kw)
    assert out is not None, "the run path declined a case it handles"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lens_q,lens_k,kw", [
    ([2] * 65, list(range(1, 66)), {}),          # more runs than MAX_RUNS: the grouped path batches better
    ([3, 3], [2, 2], {"causal": True}),          # causal with Lq > Lk: rows with no key
    ([2, 2], [1, 1], {"causal": True}),          # causal, several queries on one key
    ([2, 2], [1, 1], {"grad": True}),            # single key with gradients: the exact path
])
def test_sdpa_over_runs_declines(lens_q, lens_k, kw):
    kw = dict(kw)  # the parametrize dict is shared by every run of this case: popping from it would leak
    grad = kw.pop("grad", False)
    if grad:
        with torch.enable_grad():  # whatever grad mode an earlier test left behind
            out, _ = _runs(lens_q, lens_k, grad=True, **kw)
    else:
        with torch.no_grad():
            out, _ = _runs(lens_q, lens_k, **kw)
    assert out is None


def test_sdpa_over_runs_gradients_need_an_input_that_wants_them():
    """Single keys decline only when a gradient is wanted: inputs without requires_grad, or grad mode off."""
    q, k, v, cq, ck, _, _ = random_varlen_inputs([2, 2], [1, 1], 2, 8)
    with torch.enable_grad():
        assert TA.sdpa_over_runs(q, k, v, cq, ck, 0.5, False) is not None  # grad mode on, nothing requires grad
    for i in range(3):
        t = [x.clone() for x in (q, k, v)]
        t[i].requires_grad_(True)
        with torch.enable_grad():
            assert TA.sdpa_over_runs(*t, cq, ck, 0.5, False) is None, i
        with torch.no_grad():
            assert TA.sdpa_over_runs(*t, cq, ck, 0.5, False) is not None, i


@pytest.mark.parametrize("window", [(0, 0), (0, -1), (-1, 0), (1, 2)])
def test_windows_with_a_zero_side(window):
    """window_left/right = 0 is a real bound (the diagonal), not 'no window'."""
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([4, 4, 5], [4, 4, 6], 2, 8, dtype=torch.float64)
    ref = varlen_attention_reference(q, k, v, cq, ck, softmax_scale=8 ** -0.5, window_size=window)
    with torch.no_grad():
        runs = varlen_attention(q, k, v, cq, ck, mq, mk, backend="torch", window_size=window)
    grouped, _ = varlen_attention(q, k, v, cq, ck, mq, mk, backend="torch", window_size=window, return_lse=True)
    torch.testing.assert_close(runs, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(grouped, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("bad", ["start", "decreasing", "past_the_rows"])
def test_grouped_path_checks_each_cu_seqlens(which, bad):
    """The op reads cu_seqlens itself (it is reachable without varlen_attention's checks): each violation
    alone raises, naming the tensor."""
    q, k, v, cq, ck, _, _ = random_varlen_inputs([3, 4], [5, 2], 2, 8)
    cu = {"start": [1, 3, 7], "decreasing": [0, 5, 4], "past_the_rows": [0, 3, 9]}[bad]
    if which == "k":
        cu = {"start": [1, 5, 7], "decreasing": [0, 5, 4], "past_the_rows": [0, 5, 8]}[bad]
    cu = torch.tensor(cu, dtype=torch.int32)
    args = (q, k, v, cu, ck) if which == "q" else (q, k, v, cq, cu)
    with pytest.raises(ValueError, match=f"^cu_seqlens_{which}: must start at 0"):
        TA.varlen_attn_fwd_torch(*args, 8 ** -0.5, False)


def _grouped_matches_reference(lens_q, lens_k, *, causal=False, softcap=0.0, dtype=torch.float64, tol=1e-12):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs(lens_q, lens_k, 2, 8, dtype=dtype, requires_grad=True, seed=21)
    out, lse = varlen_attention(q, k, v, cq, ck, mq, mk, backend="torch", causal=causal, softcap=softcap,
                                return_lse=True)  # return_lse: the grouped path, never the run path
    ref, ref_lse = varlen_attention_reference(q, k, v, cq, ck, softmax_scale=8 ** -0.5, causal=causal,
                                              softcap=softcap, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=tol)
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=tol, msg=lambda m: f"d{name}: {m}")


def test_grouped_path_several_segments_per_chunk(monkeypatch):
    """Four equal segments, two per chunk: each chunk must take only its own segments (a chunk that took
    earlier ones again would add their dk/dv twice)."""
    monkeypatch.setattr(TA, "_CHUNK_ELEMS", 2 * 2 * 3 * 4)  # heads 2, Lq 3, Lk 4: two segments per chunk
    _grouped_matches_reference([3, 3, 3, 3], [4, 4, 4, 4])


def test_grouped_path_short_segment_before_one_of_another_group():
    """A 3-row segment sharing a group with a 4-row one, followed in memory by a 1-row segment of another
    group (run earlier): the short segment's padded 4th row must not be written over that row."""
    _grouped_matches_reference([3, 1, 4], [5, 5, 5])
    _grouped_matches_reference([3, 1, 4], [5, 5, 5], causal=True)


def test_grouped_path_softcap_below_one():
    """Any softcap > 0 caps, including caps under 1."""
    _grouped_matches_reference([3, 5], [4, 6], softcap=0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_grouped_path_returns_the_input_dtype_and_lse_in_fp32_or_fp64(dtype):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 5], [4, 6], 2, 8, dtype=dtype, requires_grad=True)
    out, lse = varlen_attention(q, k, v, cq, ck, mq, mk, backend="torch", return_lse=True)
    assert out.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert (dq.dtype, dk.dtype, dv.dtype) == (dtype, dtype, dtype)


def test_run_path_declines_windowed_runs_with_keyless_rows_only():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([4, 4], [2, 2], 2, 8, dtype=torch.float64)
    with torch.no_grad():
        # window (0, 0) bottom-right: rows 0 and 1 see no key (their diagonal is left of key 0)
        assert TA.sdpa_over_runs(q, k, v, cq, ck, 0.3, False, 0, 0) is None
        out = varlen_attention(q, k, v, cq, ck, mq, mk, backend="torch", window_size=(0, 0))
        torch.testing.assert_close(out, varlen_attention_reference(q, k, v, cq, ck, softmax_scale=8 ** -0.5,
                                                                   window_size=(0, 0)), rtol=0, atol=1e-12)
        assert torch.equal(out[:2], torch.zeros_like(out[:2]))
        q, k, v, cq, ck, mq, mk = random_varlen_inputs([4, 4], [4, 4], 2, 8, dtype=torch.float64)
        assert TA.sdpa_over_runs(q, k, v, cq, ck, 0.3, False, 1, 1) is not None  # every row sees a key: taken


def test_run_path_is_taken_under_autograd():
    q, k, v, cq, ck, _, _ = random_varlen_inputs([3, 3], [5, 5], 2, 8, requires_grad=True)
    with torch.enable_grad():
        out = TA.sdpa_over_runs(q, k, v, cq, ck, 0.3, False)
    assert out is not None and out.requires_grad


def test_backward_op_returns_the_input_dtypes():
    """The op itself, not through autograd (which would cast): its fake promises q/k/v's dtypes."""
    q, k, v, cq, ck, _, _ = random_varlen_inputs([3, 5], [4, 6], 2, 8, dtype=torch.bfloat16)
    out, lse = TA.varlen_attn_fwd_torch(q, k, v, cq, ck, 8 ** -0.5, False)
    grads = TA.varlen_attn_bwd_torch(torch.randn_like(out), q, k, v, lse, cq, ck, 8 ** -0.5, False)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
