"""The `torch` backend's two paths (elit_kernels/attention/backends/torch_ops.py) against the reference, each forced.

Written against the mutation run (benchmarks/results/mutation.md): fp64 accumulation, chunked plans, the run
detection, and every case in which the dense-SDPA-per-run path must decline or must handle a segment kind.
"""
import dataclasses
import re
import types

import pytest
import torch

from elit_kernels.attention.backends import torch_ops as TA
from elit_kernels import varlen_attention
from elit_kernels.attention import SegmentRuns
from elit_kernels.attention.backends.pytorch import SdpaKernelBackend, TorchBackend
from elit_kernels.attention.dispatch import FEW_RUNS
from elit_kernels.attention.inputs import AttnInputs
from elit_kernels.attention.registry import get_backend
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


@pytest.mark.parametrize("which", ["q", "k"])
def test_run_path_names_the_bad_cu_seqlens(which):
    q, k, v, cq, ck, _, _ = random_varlen_inputs([3, 4], [5, 2], 2, 8)
    bad = torch.tensor([1, 3, 7], dtype=torch.int32)
    args = (q, k, v, bad, ck) if which == "q" else (q, k, v, cq, bad)
    name = f"cu_seqlens_{which}"
    with pytest.raises(ValueError, match=re.escape(f"{name}: must start at 0, got {name}[0] = 1")):
        TA.sdpa_over_runs(*args, 0.3, False)


@pytest.mark.parametrize("lens_q,lens_k", [([4, 4], [3, 3]), ([3, 3], [4, 4])])
def test_run_path_declines_host_segments_longer_than_the_tensors(lens_q, lens_k):
    """Host segments claiming more query (or key) rows than q (or k) holds: the run path declines (the
    grouped op then names the bad cu_seqlens) instead of viewing past the rows."""
    q, k, v, cq, ck, _, _ = random_varlen_inputs([3, 3], [3, 3], 2, 8)
    with torch.no_grad():
        assert TA.sdpa_over_runs(q, k, v, cq, ck, 0.3, False, segments=SegmentRuns.from_lengths(lens_q, lens_k)) is None


def test_grouped_functions_default_to_no_window_and_no_softcap():
    q, k, v, cq, ck, _, _ = random_varlen_inputs([3, 5], [4, 6], 2, 8, dtype=torch.float64)
    out, lse = TA.varlen_attn_fwd_torch(q, k, v, cq, ck, 0.3, False)
    ref, ref_lse = varlen_attention_reference(q, k, v, cq, ck, softmax_scale=0.3, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    g = torch.randn_like(out)
    got = TA.varlen_attn_bwd_torch(g, q, k, v, lse, cq, ck, 0.3, False)
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    want = torch.autograd.grad(varlen_attention_reference(qq, kk, vv, cq, ck, softmax_scale=0.3), (qq, kk, vv), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_grouped_path_without_segments_gives_zeros_and_infinite_lse():
    """cu_seqlens [0] (no segment at all): every query row is outside the packed data."""
    q, k, v, _, _, _, _ = random_varlen_inputs([3], [4], 2, 8, dtype=torch.float64)
    empty = torch.zeros(1, dtype=torch.int32)
    out, lse = TA.varlen_attn_fwd_torch(q, k, v, empty, empty, 0.3, False)
    assert torch.equal(out, torch.zeros_like(q))
    assert torch.equal(lse, torch.full((2, 3), float("inf"), dtype=torch.float64))


def _tiles(monkeypatch):
    """Records ``(n, heads, rows, keys, real key counts, real query counts)`` of every score tile computed."""
    seen, scores = [], TA._scores

    def spy(c, q, k, *a, **kw):
        n, m, lk = c.allowed.shape
        seen.append((n, q.shape[1], m, lk, c.k_ok.sum(1), c.q_ok.sum(1)))
        return scores(c, q, k, *a, **kw)

    monkeypatch.setattr(TA, "_scores", spy)
    return seen


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_path_tiles_stay_under_the_chunk_budget(monkeypatch, causal):
    """Forward and backward: every score tile (segments x heads x rows x keys) stays under _CHUNK_ELEMS,
    splitting segments and then rows, with 4 heads of dim 2 (the budget counts heads, not the head dim)."""
    monkeypatch.setattr(TA, "_CHUNK_ELEMS", 48)
    seen = _tiles(monkeypatch)
    # keys 7 (4 * 7 = 28 > 24: one row per tile), keys 3 (one 4x4x3 segment per tile, 48 = budget), keys 2 / rows 1
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([5, 1, 4, 4, 1, 1], [7, 7, 3, 3, 2, 2], 4, 2, kv_heads=2,
                                                   dtype=torch.float64, requires_grad=True)
    out, lse = varlen_attention(q, k, v, cq, ck, mq, mk, backend="torch", causal=causal, return_lse=True)
    ref, ref_lse = varlen_attention_reference(q, k, v, cq, ck, softmax_scale=2 ** -0.5, causal=causal,
                                              return_lse=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert seen
    for n, h, m, lk, _, _ in seen:
        assert n * h * m * lk <= 48, (n, h, m, lk)


def test_grouped_path_pads_each_segment_to_less_than_twice_its_lengths(monkeypatch):
    """Segments are grouped by the power-of-two buckets of (Lq, Lk): a 1-query segment never shares a tile
    with 5-query ones of the same key count (the cost follows the data)."""
    seen = _tiles(monkeypatch)
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([1, 5, 2, 16, 3], [4, 4, 9, 4, 4], 2, 8, dtype=torch.float64)
    out, lse = varlen_attention(q, k, v, cq, ck, mq, mk, backend="torch", return_lse=True)
    torch.testing.assert_close(out, _ref(q, k, v, cq, ck), rtol=0, atol=1e-12)
    assert seen
    for _, _, m, lk, real_k, real_q in seen:
        assert m < 2 * int(real_q.min()) and lk < 2 * int(real_k.min()), (m, lk, real_q, real_k)


def test_torch_backend_serves_runs_of_equal_segments_without_the_grouped_op(monkeypatch):
    """Eager calls without LSE or softcap go to one SDPA per run, with the caller's softmax_scale, whether or
    not the segments are given on the host."""
    def grouped(inp):
        raise AssertionError("the grouped op ran")

    monkeypatch.setattr(TorchBackend, "_grouped", staticmethod(grouped))
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 3, 2], [5, 5, 4], 2, 8)
    ref = _ref(q, k, v, cq, ck, scale=0.3)
    for seg in (None, SegmentRuns.from_lengths([3, 3, 2], [5, 5, 4])):
        out = varlen_attention(q, k, v, cq, ck, mq, mk, backend="torch", softmax_scale=0.3, segments=seg)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_torch_backend_on_meta_tensors_reads_nothing_back():
    """Meta tensors (shape propagation): with or without host segments the call returns q's shape, reading no
    cu_seqlens value (a meta tensor has none)."""
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 3], [4, 4], 2, 8)
    meta = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in (q, k, v, cq, ck)]
    for seg in (None, SegmentRuns.from_lengths([3, 3], [4, 4])):
        out = varlen_attention(*meta, mq, mk, backend="torch", segments=seg)
        assert (out.shape, out.dtype, out.device.type) == (q.shape, q.dtype, "meta")


def test_pinned_sdpa_backend_keeps_its_kernel_and_head_dims():
    b = SdpaKernelBackend("sdpa_test", "FLASH_ATTENTION", (torch.float16,), 128, "test-kernel")
    assert (b.name, b.kernel, b.dtypes, b.max_head_dim) == ("sdpa_test", "FLASH_ATTENTION", (torch.float16,), 128)
    assert [b.run_head_dim(d) for d in (60, 64, 72, 121, 129)] == [64, 64, 72, 128, None]  # multiples of 8
    assert "test-kernel kernel" in b.description and "head dim up to 128" in b.description


def test_pinned_sdpa_backends_are_available_only_with_cuda():
    for name in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient"):
        assert get_backend(name).is_available() == torch.cuda.is_available(), name


def _inputs(lens_q=(3, 3), lens_k=(4, 4), dtype=torch.float16, softmax_scale=8 ** -0.5, **kw):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs(list(lens_q), list(lens_k), 2, 8, dtype=dtype)
    return AttnInputs(q, k, v, cq, ck, mq, mk, softmax_scale, False, **kw)


def test_pinned_sdpa_backend_reasons():
    b = get_backend("sdpa_efficient")
    host = SegmentRuns.from_lengths([3, 3], [4, 4])
    assert "needs the segment lengths on the host (varlen_attention(segments=))" in b.not_supported_reasons(_inputs())
    lens_k = list(range(1, FEW_RUNS + 2))
    for n_runs in (FEW_RUNS, FEW_RUNS + 1):
        inp = _inputs([1] * n_runs, lens_k[:n_runs], segments=SegmentRuns.from_lengths([1] * n_runs, lens_k[:n_runs]))
        runs = [r for r in b.not_supported_reasons(inp) if "runs of equal segments" in r]
        assert runs == ([] if n_runs <= FEW_RUNS else [f"{n_runs} runs of equal segments (runs at most {FEW_RUNS})"])
    assert not [r for r in b.not_supported_reasons(_inputs(segments=host)) if "soft-capping" in r]
    assert "no logit soft-capping (softcap=0.5)" in b.not_supported_reasons(_inputs(segments=host, softcap=0.5))
    assert "cannot return the softmax log-sum-exp" in b.not_supported_reasons(_inputs(segments=host, return_lse=True))
    assert "cannot return the softmax log-sum-exp" not in b.not_supported_reasons(_inputs(segments=host))


def test_torch_backend_refuses_cuda_graph_capture_unless_host_free(monkeypatch):
    """Under CUDA-graph capture the torch backend runs only when nothing is read on the host: segments given,
    no LSE, no softcap (simulated on the CPU: a CUDA-looking q and a capturing stream)."""
    capture = "reads segment lengths on the host, which CUDA-graph capture forbids"
    host = SegmentRuns.from_lengths([3, 3], [4, 4])

    def refused(**kw):
        inp = _inputs(**kw)
        q = types.SimpleNamespace(is_cuda=True, dtype=inp.q.dtype, device=torch.device("cuda"), shape=inp.q.shape)
        return any(r.startswith(capture) for r in TorchBackend().not_supported_reasons(dataclasses.replace(inp, q=q)))

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not refused()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert refused()
    assert not refused(segments=host)
    assert refused(segments=host, return_lse=True)
    assert refused(segments=host, softcap=0.5)
    assert refused(segments=host, softmax_scale=0.0)  # a zero scale runs the grouped op, which reads them
    assert not refused(segments=host, softmax_scale=-0.5)  # a negative one runs on the dense path as -q


def test_grouped_backward_with_large_causal_logits():
    """Logits in the hundreds (fp32), causal, a 3-row segment padded to the 4 rows of its group: the gradients
    stay finite and match the reference (a padded row must see no key, or exp overflows there)."""
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 4], [3, 4], 2, 8, seed=1)
    q, k = (q * 20).requires_grad_(True), (k * 20).requires_grad_(True)
    v.requires_grad_(True)
    out, _ = varlen_attention(q, k, v, cq, ck, mq, mk, backend="torch", causal=True, return_lse=True)
    ref = _ref(q, k, v, cq, ck, causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_runs", [FEW_RUNS + 1, TA.MAX_RUNS, TA.MAX_RUNS + 1])
def test_a_direct_ragged_call_is_not_read_twice_on_the_host(monkeypatch, n_runs):
    """A call without segments= whose value checks read cu_seqlens (one host copy, a device sync on a GPU) runs
    the torch backend's dense path on what they read: sdpa_over_runs reads nothing more (check_cu_rows is the
    host read's first step there). Past MAX_RUNS runs the checks' read says the dense path cannot run
    (AttnInputs.many_runs) and the backend goes straight to the grouped op: it was three host reads a call (the
    checks', the dense path's, the grouped op's). With the value checks off the dense path must read them itself
    (the spy can fail)."""
    from elit_kernels import set_value_checks

    lens_q, lens_k = [2] * n_runs, list(range(2, n_runs + 2))
    q, k, v, cq, ck, mq, mk = random_varlen_inputs(lens_q, lens_k, 2, 8, seed=3, extra_q=2)
    want = _ref(q, k, v, cq, ck)
    reads = []
    real = TA.check_cu_rows
    monkeypatch.setattr(TA, "check_cu_rows", lambda *a: reads.append(a[0]) or real(*a))
    torch.testing.assert_close(varlen_attention(q, k, v, cq, ck, mq, mk, backend="torch"), want)
    assert reads == []
    set_value_checks(False)
    try:
        torch.testing.assert_close(varlen_attention(q, k, v, cq, ck, mq, mk, backend="torch"), want)
    finally:
        set_value_checks(True)
    assert reads == ["cu_seqlens_q", "cu_seqlens_k"]


def test_many_runs_is_what_the_value_checks_read():
    """AttnInputs.many_runs: True only when the checks read cu_seqlens and found more than MAX_RUNS runs; not for
    fewer, not with derive_segments=False (AttentionPlan) and not with the checks off (nothing was read)."""
    from elit_kernels import set_value_checks
    from elit_kernels.attention import validate_inputs

    n = TA.MAX_RUNS + 1
    many = random_varlen_inputs([2] * n, list(range(2, n + 2)), 2, 8, seed=5)
    assert validate_inputs(*many).many_runs
    assert not validate_inputs(*many, derive_segments=False).many_runs
    assert not validate_inputs(*random_varlen_inputs([2] * 3, [3] * 3, 2, 8, seed=5)).many_runs
    set_value_checks(False)
    try:
        assert not validate_inputs(*many).many_runs
    finally:
        set_value_checks(True)
