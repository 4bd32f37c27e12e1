"""The flash-attn drop-in's promises, on every backend that makes them (the registry's, less the library
comparators, which tests/test_contract.py checks against the reference): reference, torch, cpp, triton
(interpreted on CPU) and, on a GPU machine, cuda; each skipped with its own reasons where it cannot run.

Grouped-query attention and MQA, the log-sum-exp (``return_attn_probs``) and buffers longer than the packed
data; any head dim 1..256 (zero-padded where a kernel needs it, at the real head dim's scale); the packed
qkv / kv entry points and max_seqlen as tensors or NumPy ints; fake kernels that describe the real strides
(opcheck and torch.compile on permuted inputs); a cost that does not grow with max_seqlen slack; segments
longer than max_seqlen with the value checks off; exact outputs and gradients for single-key segments.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from cases import CASES, backend_device, backend_params, skip_unless_runs

from elit_kernels import (flash_attn_func, flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                          flash_attn_varlen_qkvpacked_func, set_value_checks, varlen_attention)
from elit_kernels.attention import get_backend, validate_inputs
from elit_kernels.reference.attention import varlen_attention_reference
from elit_kernels.testing import check_backend_against_reference, cu_seqlens, random_varlen_inputs

HAS_CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: every registered backend but the library comparators (torch_varlen, flash_attn): these promises are the
#: drop-in's, not theirs (their single-key gradients, for one, are not exact); the contract test covers them
BACKENDS = backend_params(keep=lambda b: not type(b).__module__.endswith(".library"))
#: Unwritten outputs of every backend are NaN (so a tail row a kernel skips fails); Triton's heuristic tiles
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def _dtype(backend: str, dtype: torch.dtype) -> torch.dtype:
    """``dtype``, or bfloat16 for a backend that does not run it (the CUDA kernels: fp16/bf16 only)."""
    return dtype if dtype in get_backend(backend).dtypes else torch.bfloat16


def _triton_runs_on(device: str) -> bool:
    return get_backend("triton").is_available() and (device == "cuda" or INTERP)


def _compiled_ops_run_on(device: str) -> bool:
    """The backends are registered whether or not elit_kernels._C loaded: ask the backend that runs there."""
    return get_backend("cuda" if device == "cuda" else "cpp").is_available()


def _fn(backend, return_lse=False):
    def f(q, k, v, cq, ck, mq, mk, scale, causal):
        return varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=scale, causal=causal, backend=backend,
                                return_lse=return_lse)
    return f


#: small enough for the Triton interpreter: empty and length-1 segments, Lq > Lk and Lq < Lk, lengths that
#: straddle the 16-row tiles (the shared case table, tests/cases.py)
SEGS = CASES["empty-and-odd"].lens


# ------------------------------------------------------------------------------------------------
# Grouped-query attention, the log-sum-exp, buffers longer than the packed data
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 1)], ids=["gqa-4-2", "mqa-3-1"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_lse_and_longer_buffers(backend, heads, kv_heads, causal):
    # NaN rows past cu_seqlens_*[-1]: q rows there must come out exact zeros with zero gradients, k/v
    # rows there must never be read (a NaN would spread).
    d, dev, dt = get_backend(backend).run_head_dim(24), backend_device(backend), _dtype(backend, torch.float32)
    skip_unless_runs(backend, *random_varlen_inputs(*SEGS, heads, d, dtype=dt, device=dev, kv_heads=kv_heads),
                     causal=causal, return_lse=True)
    check_backend_against_reference(_fn(backend, True), *SEGS, heads, d, dt, causal=causal, seed=heads + 7 * causal,
                                    device=dev, kv_heads=kv_heads, extra_q=3, extra_k=2, check_lse=True)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_low_precision(backend, dtype):
    dev = backend_device(backend)
    skip_unless_runs(backend, *random_varlen_inputs([1, 17, 4], [5, 3, 16], 4, 64, dtype=DTYPES[dtype], device=dev,
                                                    kv_heads=1), causal=True)
    check_backend_against_reference(_fn(backend), [1, 17, 4], [5, 3, 16], 4, 64, DTYPES[dtype], causal=True,
                                    seed=31, device=dev, kv_heads=1, extra_q=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_is_plus_inf_exactly_where_no_key_is_seen(backend):
    # Segment 0: no keys. Segment 1: causal, Lq 6 > Lk 2, so rows 0..3 see nothing. Then 2 rows past the end.
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 6], [0, 2], 2, 64, seed=9, device=backend_device(backend),
                                                   dtype=_dtype(backend, torch.float32), extra_q=2)
    skip_unless_runs(backend, q, k, v, cq, ck, mq, mk, causal=True, return_lse=True)
    out, lse = varlen_attention(q, k, v, cq, ck, mq, mk, causal=True, backend=backend, return_lse=True)
    blind = torch.tensor([1] * 7 + [0, 0] + [1, 1], dtype=torch.bool, device=q.device)
    assert lse.shape == (2, 11) and lse.dtype == torch.float32
    assert torch.isposinf(lse[:, blind]).all() and torch.isfinite(lse[:, ~blind]).all()
    assert torch.equal(out[blind], torch.zeros_like(out[blind]))


def _raw_ops(device):
    """(name, forward op) of every elit:: attention op that runs on ``device``."""
    ops = [("torch", torch.ops.elit.varlen_attn_fwd_torch)]
    if _compiled_ops_run_on(device):
        ops.append(("cpp/cuda", torch.ops.elit.varlen_attn_fwd))
    if _triton_runs_on(device):
        from elit_kernels._triton import ops as _  # noqa: F401
        ops.append(("triton", torch.ops.elit.varlen_attn_fwd_triton))
    return ops


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_every_op_stores_plus_inf_lse(device):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("cuda: no GPU here")
    dtype = torch.float16 if device == "cuda" else torch.float32
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([2, 3], [0, 1], 2, 64, seed=4, device=device, dtype=dtype,
                                                   extra_q=1)
    for name, op in _raw_ops(device):
        _, lse = op(q, k, v, cq, ck, mq, mk, 0.125, True)
        # rows 0-1: no key; 2-3: causal Lq 3 > Lk 1; 4: sees its key; 5: past the packed data
        want = torch.tensor([True] * 4 + [False, True], device=device)
        assert torch.equal(torch.isposinf(lse), want.expand(2, -1)), name


def test_flash_attn_return_attn_probs():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([5, 0, 9], [4, 2, 11], 4, 64, seed=8, kv_heads=2)
    out, lse, probs = flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, 0.0, 0.2, True, return_attn_probs=True)
    ref, ref_lse = varlen_attention_reference(q, k, v, cq, ck, softmax_scale=0.2, causal=True, return_lse=True)
    # flash-attn's third value without dropout: an empty tensor of q's dtype (callers may read .numel())
    assert probs.shape == (0,) and probs.dtype == q.dtype and probs.device == q.device
    assert lse.shape == (4, 14) and lse.dtype == torch.float32 and not lse.requires_grad
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


def test_flash_attn_readings_of_flags_softcap_window_and_dense_lse():
    """A parity audit against flash-attn 2.8's source: its flags are tested for truth (``causal=1``), a softcap
    <= 0 is off ("<=0.0 means deactivate"), any negative window side is unbounded (``flash_api.cpp`` tests >= 0:
    ``(-5, 0)`` is causal), and the dense LSE is a contiguous ``[B, H, S_q]`` (ours was a transposed view, which
    ``.view()`` refused). Each was a TypeError / ValueError or a stride difference here."""
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([5, 3], [6, 3], 2, 16, seed=9)

    def run(**kw):
        return flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, **kw)

    torch.testing.assert_close(run(causal=1), run(causal=True), rtol=0, atol=0)
    torch.testing.assert_close(run(causal=np.int64(0)), run(causal=False), rtol=0, atol=0)
    torch.testing.assert_close(run(softcap=-3.0), run(softcap=0.0), rtol=0, atol=0)
    torch.testing.assert_close(run(window_size=(-5, 0)), run(window_size=(-1, 0)), rtol=0, atol=0)
    torch.testing.assert_close(run(window_size=[2, -7]), run(window_size=(2, -1)), rtol=0, atol=0)
    for w in ((torch.tensor(-5), 0), torch.tensor([-5, 0]), (np.int64(-3), np.int32(0))):  # as varlen_attention reads
        torch.testing.assert_close(run(window_size=w), run(window_size=(-1, 0)), rtol=0, atol=0)
    want = varlen_attention_reference(q, k, v, cq, ck, softmax_scale=0.25, window_size=(-1, 0))
    torch.testing.assert_close(run(window_size=(-2, 0)), want)
    x = torch.randn(2, 5, 3, 16)
    out, lse, probs = flash_attn_func(x, x, x, causal=True, return_attn_probs=True)
    assert lse.shape == (2, 3, 5) and lse.is_contiguous() and probs.numel() == 0
    lse.view(2, -1)  # as a caller of flash-attn's may


def test_dense_packed_entry_points():
    """flash-attn's ``flash_attn_qkvpacked_func`` (``qkv [B, S, 3, H, D]``) and ``flash_attn_kvpacked_func`` (``kv
    [B, S_k, 2, H_kv, D]``): exported by flash-attn, missing here until a parity audit."""
    from elit_kernels import flash_attn_kvpacked_func, flash_attn_qkvpacked_func

    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 6, 3, 4, 16, generator=g, requires_grad=True)
    out = flash_attn_qkvpacked_func(qkv, 0.0, None, True)
    q, k, v = (t.detach().reshape(12, 4, 16) for t in qkv.unbind(2))
    cu = cu_seqlens([6, 6])
    torch.testing.assert_close(out.reshape(12, 4, 16), varlen_attention_reference(q, k, v, cu, cu, softmax_scale=0.25,
                                                                                  causal=True))
    (grad,) = torch.autograd.grad(out.sum(), qkv)
    assert grad.shape == qkv.shape and grad.isfinite().all()
    q = torch.randn(2, 3, 4, 16, generator=g)
    kv = torch.randn(2, 7, 2, 2, 16, generator=g)
    out, lse, _ = flash_attn_kvpacked_func(q, kv, window_size=(2, 1), return_attn_probs=True)
    k, v = (t.reshape(14, 2, 16) for t in kv.unbind(2))
    want, want_lse = varlen_attention_reference(q.reshape(6, 4, 16), k, v, cu_seqlens([3, 3]), cu_seqlens([7, 7]),
                                                softmax_scale=0.25, window_size=(2, 1), return_lse=True)
    torch.testing.assert_close(out.reshape(6, 4, 16), want)
    torch.testing.assert_close(lse, want_lse.view(4, 2, 3).transpose(0, 1))
    with pytest.raises(ValueError, match=r"^qkv: expected shape \[batch, seqlen, 3, num_heads, head_dim\]"):
        flash_attn_qkvpacked_func(torch.randn(12, 3, 4, 16))
    with pytest.raises(ValueError, match=r"^kv: expected shape \[batch, seqlen_k, 2, num_kv_heads, head_dim\]"):
        flash_attn_kvpacked_func(q, torch.randn(2, 7, 3, 2, 16))
    with pytest.raises(NotImplementedError, match="^alibi_slopes: "):
        flash_attn_kvpacked_func(q, kv, alibi_slopes=torch.ones(4))


# ------------------------------------------------------------------------------------------------
# Any head dim 1..256: zero-padded to one a backend runs, at the real head dim's scale
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head_dim", [1, 20, 136])
@pytest.mark.parametrize("backend", BACKENDS)
def test_any_head_dim(backend, head_dim):
    dev, dt = backend_device(backend), _dtype(backend, torch.float32)
    if get_backend(backend).run_head_dim(head_dim) is None:  # cuda above 128: declared, so refused by name
        q, k, v, cq, ck, mq, mk = random_varlen_inputs([2], [3], 2, head_dim, dtype=dt, device=dev)
        with pytest.raises(ValueError, match=f"head dim {head_dim} too large"):
            varlen_attention(q, k, v, cq, ck, mq, mk, backend=backend)
        return
    skip_unless_runs(backend, *random_varlen_inputs([1, 5], [4, 17], 2, head_dim, dtype=dt, device=dev), causal=True,
                     return_lse=True)
    check_backend_against_reference(_fn(backend, True), [1, 5, 17], [4, 17, 2], 2, head_dim, dt, causal=True,
                                    seed=head_dim, device=dev, check_lse=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_keeps_the_real_head_dims_scale(backend):
    # Triton runs D = 20 padded to 24 and the CUDA kernels would run it at 64: the default scale must
    # stay 20 ** -0.5 and the output come back [.., 20].
    dev = backend_device(backend)
    dt = torch.float32 if torch.float32 in get_backend(backend).dtypes else torch.float16
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 5], [4, 6], 2, 20, seed=12, device=dev, dtype=dt)
    skip_unless_runs(backend, q, k, v, cq, ck, mq, mk)
    ref = varlen_attention_reference(q, k, v, cq, ck, softmax_scale=20 ** -0.5)
    tol = dict(rtol=0, atol=2e-6) if dt == torch.float32 else dict(rtol=0, atol=2e-3)
    out = varlen_attention(q, k, v, cq, ck, mq, mk, backend=backend)
    assert out.shape == (8, 2, 20)
    torch.testing.assert_close(out, ref, **tol)
    assert get_backend(backend).run_head_dim(20) >= 20


def test_run_head_dim_pads_to_a_native_one():
    assert get_backend("triton").run_head_dim(20) == 24
    assert get_backend("reference").run_head_dim(20) == 20


# ------------------------------------------------------------------------------------------------
# The packed qkv / kv entry points; max_seqlen as a tensor or a NumPy int
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_qkvpacked_and_kvpacked(backend):
    dev, dt = backend_device(backend), _dtype(backend, torch.float32)
    g = torch.Generator().manual_seed(21)
    lens, lens_q = [5, 0, 17, 1], [3, 2, 17, 1]
    cu, cq = cu_seqlens(lens, dev), cu_seqlens(lens_q, dev)
    skip_unless_runs(backend, *random_varlen_inputs(lens_q, lens, 4, 64, dtype=dt, device=dev, kv_heads=2),
                     causal=True, return_lse=True)
    qkv = torch.randn(sum(lens) + 2, 3, 4, 64, generator=g).to(dev, dt).requires_grad_()
    q = torch.randn(sum(lens_q), 4, 64, generator=g).to(dev, dt).requires_grad_()
    kv = torch.randn(sum(lens), 2, 2, 64, generator=g).to(dev, dt).requires_grad_()
    tol = dict(rtol=0, atol=2e-5) if dt == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for packed, args, ref_args in (
            (flash_attn_varlen_qkvpacked_func, (qkv, cu, np.int64(17)), (*qkv.unbind(1), cu, cu)),
            (flash_attn_varlen_kvpacked_func, (q, kv, cq, cu, torch.tensor(17), 17), (q, *kv.unbind(1), cq, cu))):
        out, lse, _ = packed(*args, 0.0, None, True, return_attn_probs=True, backend=backend)
        ref, ref_lse = varlen_attention_reference(*ref_args, softmax_scale=0.125, causal=True, return_lse=True)
        torch.testing.assert_close(out, ref, **tol)
        torch.testing.assert_close(lse, ref_lse.float(), **tol)
        leaf = args[0] if packed is flash_attn_varlen_qkvpacked_func else args[1]
        g_out = torch.randn(out.shape, generator=g).to(dev, dt)
        (got,) = torch.autograd.grad(out, leaf, g_out)
        (want,) = torch.autograd.grad(ref, leaf, g_out)
        torch.testing.assert_close(got, want, **tol)


def test_packed_layout_errors_name_the_argument():
    cu = cu_seqlens([3])
    with pytest.raises(ValueError, match=r"^qkv: expected shape \[total, 3, num_heads, head_dim\]"):
        flash_attn_varlen_qkvpacked_func(torch.randn(3, 2, 2, 8), cu, 3)
    with pytest.raises(ValueError, match=r"^kv: expected shape \[total_k, 2, num_kv_heads, head_dim\]"):
        flash_attn_varlen_kvpacked_func(torch.randn(3, 2, 8), torch.randn(3, 2, 8), cu, cu, 3, 3)
    with pytest.raises(NotImplementedError, match="^s_aux: "):
        flash_attn_varlen_qkvpacked_func(torch.randn(3, 3, 2, 8), cu, 3, s_aux=torch.zeros(2))
    with pytest.raises(NotImplementedError, match="^alibi_slopes: "):
        flash_attn_varlen_kvpacked_func(torch.randn(3, 2, 8), torch.randn(3, 2, 2, 8), cu, cu, 3, 3,
                                        alibi_slopes=torch.ones(2))


def test_flash_attn_flags_that_are_tensors_are_named():
    # flash-attn tests these for truth; a multi-element tensor has none: named, not torch's "ambiguous" error
    q = torch.randn(3, 2, 8)
    cu = cu_seqlens([3])
    with pytest.raises(TypeError, match=r"^return_attn_probs: expected a bool or an int \(as flash-attn takes its flags\), got torch.Tensor"):
        flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, return_attn_probs=torch.tensor([1, 0]))
    out, lse, _ = flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, return_attn_probs=__import__("numpy").True_)
    assert lse.shape == (2, 3)  # NumPy's bool is a bool
    with pytest.raises(NotImplementedError, match=r"^attention_chunk: only 0 \(no chunked attention\)"):
        flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, attention_chunk=torch.tensor([4, 4]))
    out, lse, _ = flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, return_attn_probs=1, attention_chunk=None)
    torch.testing.assert_close(out, flash_attn_varlen_func(q, q, q, cu, cu, 3, 3))


@pytest.mark.parametrize("entry", ["varlen", "qkvpacked", "kvpacked", "dense"])
@pytest.mark.parametrize("bad", ["no", torch.tensor([True, False]), None])
def test_flash_attn_deterministic_must_be_a_bool(entry, bad):
    # deterministic='no' is truthy: taking it silently would hide a caller's mistake; flash-attn's op schema
    # refuses it at backward time. Named here, at the call, in every entry point.
    q = torch.randn(4, 2, 8)
    cu = cu_seqlens([3, 1])
    calls = {"varlen": lambda d: flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, deterministic=d),
             "qkvpacked": lambda d: flash_attn_varlen_qkvpacked_func(torch.stack([q, q, q], 1), cu, 3, deterministic=d),
             "kvpacked": lambda d: flash_attn_varlen_kvpacked_func(q, torch.stack([q, q], 1), cu, cu, 3, 3,
                                                                   deterministic=d),
             "dense": lambda d: flash_attn_func(q[None], q[None], q[None], deterministic=d)}
    with pytest.raises(TypeError, match=r"^deterministic: expected a bool or an int \(as flash-attn takes its flags\), "
                       r"got "):
        calls[entry](bad)
    want = calls[entry](False)
    for ok in (True, 1, __import__("numpy").True_):
        torch.testing.assert_close(calls[entry](ok), want, rtol=0, atol=0)


@pytest.mark.parametrize("max_q", [9, np.int64(9), np.int32(9), torch.tensor(9), torch.tensor(9, dtype=torch.int32)],
                         ids=["int", "np.int64", "np.int32", "tensor-int64", "tensor-int32"])
def test_max_seqlen_as_tensor_or_numpy(max_q):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([5, 9], [4, 6], 2, 16, seed=5)
    inp = validate_inputs(q, k, v, cq, ck, max_q, np.int16(6), None, False)
    assert type(inp.max_seqlen_q) is int and inp.max_seqlen_q == 9 and type(inp.max_seqlen_k) is int
    out = flash_attn_varlen_func(q, k, v, cq, ck, max_q, np.int16(6), backend="torch")
    torch.testing.assert_close(out, varlen_attention_reference(q, k, v, cq, ck, softmax_scale=0.25))


@pytest.mark.parametrize("kind", ["np.float32", "np.float64", "np.int64"])
def test_real_arguments_as_numpy_scalars(kind):
    """softmax_scale, softcap and dropout_p take NumPy's scalars (what arithmetic on an array gives) as the Python
    number they equal: same result as the Python float, bit for bit; a NumPy bool is still refused."""
    conv = {"np.float32": np.float32, "np.float64": np.float64, "np.int64": np.int64}[kind]
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([5, 9], [4, 6], 2, 16, seed=7)
    scale, cap = (0.25, 2.0) if kind != "np.int64" else (1, 2)
    want = flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, 0.0, float(scale), softcap=float(cap), backend="torch")
    got = flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, conv(0), conv(scale), softcap=conv(cap), backend="torch")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    inp = validate_inputs(q, k, v, cq, ck, mq, mk, conv(scale), False, softcap=conv(cap))
    assert type(inp.softmax_scale) is float and type(inp.softcap) is float
    for name, kw in (("softmax_scale", {"softmax_scale": np.True_}), ("softcap", {"softcap": np.True_}),
                     ("dropout_p", {"dropout_p": np.False_})):
        with pytest.raises(TypeError, match=f"^{name}: expected"):
            flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, **kw, backend="torch")
    with pytest.raises(NotImplementedError, match="^dropout_p: only 0.0"):
        flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, conv(1), backend="torch")


# ------------------------------------------------------------------------------------------------
# Fake kernels describe the real strides: opcheck on permuted inputs, torch.compile on permuted views
# ------------------------------------------------------------------------------------------------

def permuted(t: torch.Tensor, last_dim_too: bool = False) -> torch.Tensor:
    """Same values, another memory layout: rows strided (token stride < head stride), optionally not
    even unit-stride along the last dim."""
    order = list(range(t.dim()))[::-1] if last_dim_too else [1, 0] + list(range(2, t.dim()))
    inv = [order.index(i) for i in range(t.dim())]
    out = t.detach().permute(order).contiguous().permute(inv)
    assert torch.equal(out, t.detach()) and not out.is_contiguous()
    return out.requires_grad_(t.requires_grad)


def _attn_op_samples(fwd, bwd, device, dtype, last_dim_too):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 0, 2], [4, 2, 0], 4, 64, seed=11, device=device,
                                                   dtype=dtype, kv_heads=2, extra_q=1, extra_k=1, extra_fill=None)
    q, k, v = (permuted(t, last_dim_too).requires_grad_() for t in (q, k, v))
    out, lse = fwd(q, k, v, cq, ck, mq, mk, 0.4, True)
    dout = permuted(torch.randn_like(out), last_dim_too)
    return ((fwd, (q, k, v, cq, ck, mq, mk, 0.4, True)),
            (bwd, (dout, q.detach(), k.detach(), v.detach(), permuted(out.detach(), last_dim_too), lse, cq, ck, mq, mk,
                   0.4, True)))


def _attn_ops(device):
    ops = [(torch.ops.elit.varlen_attn_fwd_torch.default, torch.ops.elit.varlen_attn_bwd_torch.default)]
    if _compiled_ops_run_on(device):
        ops.append((torch.ops.elit.varlen_attn_fwd.default, torch.ops.elit.varlen_attn_bwd.default))
    if _triton_runs_on(device):
        from elit_kernels._triton import ops as _  # noqa: F401
        ops.append((torch.ops.elit.varlen_attn_fwd_triton.default, torch.ops.elit.varlen_attn_bwd_triton.default))
    return ops


@pytest.mark.parametrize("last_dim_too", [False, True], ids=["rows-permuted", "fully-permuted"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_opcheck_attention_ops_on_permuted_inputs(device, last_dim_too):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("cuda: no GPU here")
    dtype = torch.float16 if device == "cuda" else torch.float32
    for fwd, bwd in _attn_ops(device):
        for op, args in _attn_op_samples(fwd, bwd, device, dtype, last_dim_too):
            torch.library.opcheck(op, args)


# not "reference": it reads cu_seqlens on the host, a graph break by design (fullgraph refuses it)
@pytest.mark.parametrize("backend", backend_params(
    keep=lambda b: b.name != "reference" and not type(b).__module__.endswith(".library")))
def test_compile_fullgraph_on_permuted_views(backend):
    # A transposed q (randn(2, 6, 16).transpose(0, 1), cu = [0, 2, 6]: rows strided), then a permuted k, whose
    # gradient the backward's fake must describe with the real strides.
    dev, dt = backend_device(backend), _dtype(backend, torch.float32)
    d = get_backend(backend).run_head_dim(16)  # natively (the CUDA kernels: 64)
    skip_unless_runs(backend, *random_varlen_inputs([2, 4], [2, 4], 2, d, dtype=dt, device=dev))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, d, generator=g).to(dev, dt).transpose(0, 1).requires_grad_()
    k = torch.randn(2, 6, d, generator=g).to(dev, dt).transpose(0, 1).requires_grad_()
    v = torch.randn(6, 2, d, generator=g).to(dev, dt).requires_grad_()
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=dev)

    def f(q, k, v):
        return varlen_attention(q, k, v, cu, cu, 4, 4, backend=backend) * 2

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    want = f(q, k, v)
    want_grads = torch.autograd.grad(want.float().square().sum(), (q, k, v))
    torch.testing.assert_close(out, want)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_compile_inductor_on_permuted_views_cpp(monkeypatch):
    # aot_eager does not compare a fake's strides with the real ones; inductor asserts them (without its
    # on-disk cache, which would replay code generated from an older fake).
    if not get_backend("cpp").is_available():
        pytest.skip(f"backend 'cpp' cannot run here: {get_backend('cpp').unavailable_reason}")
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config, "force_disable_caches", True)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, 16, generator=g).transpose(0, 1).requires_grad_()
    k = torch.randn(2, 6, 16, generator=g).transpose(0, 1).requires_grad_()
    v = torch.randn(6, 2, 16, generator=g).requires_grad_()
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)

    def f(q, k, v):
        return varlen_attention(q, k, v, cu, cu, 4, 4, backend="cpp") * 2

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="inductor")(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = f(q, k, v)
    torch.testing.assert_close(out, want)
    for a, b in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v))):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------
# The cost does not grow with max_seqlen slack
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_max_seqlen_costs_nothing(backend):
    # 32 segments of 4 tokens passed with max_seqlen 2**20: padding to it would need 32 * 2**40 scores
    # (an allocation error) and a grid sized by it 2 million programs (hours in the interpreter).
    d = get_backend(backend).run_head_dim(16)  # natively (the CUDA kernels: 64)
    q, k, v, cq, ck, _, _ = random_varlen_inputs([4] * 32, [4] * 32, 1, d, seed=6, device=backend_device(backend),
                                                 dtype=_dtype(backend, torch.float32), requires_grad=True)
    skip_unless_runs(backend, q, k, v, cq, ck, 4, 4)
    # a backend with a declared key limit (triton_window: one tile of <= 128 keys) refuses the slack by name
    skip_unless_runs(backend, q, k, v, cq, ck, 1 << 20, 1 << 20)
    exact = varlen_attention(q, k, v, cq, ck, 4, 4, backend=backend)
    slack = varlen_attention(q, k, v, cq, ck, 1 << 20, 1 << 20, backend=backend)
    assert torch.equal(exact, slack)
    dout = torch.randn_like(exact)
    for a, b in zip(torch.autograd.grad(exact, (q, k, v), dout), torch.autograd.grad(slack, (q, k, v), dout)):
        assert torch.equal(a, b)


def test_kernel_grids_do_not_grow_with_slack():
    pytest.importorskip("triton", reason="triton is not installed (pip install triton, or the full install: pip install -r requirements.txt): no Triton grids to check")
    from elit_kernels._triton import _common
    exact = _common.num_programs(128, 512, 4, 16)
    assert exact == 129
    assert _common.num_programs(128, 512, 512, 16) <= 1.5 * exact
    assert _common.num_programs(128, 512, 1 << 30, 16) <= 1.5 * exact


# ------------------------------------------------------------------------------------------------
# A segment longer than max_seqlen with the value checks off (as under torch.compile): never garbage
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_longer_than_max_seqlen_is_never_garbage(backend):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 40], [5, 45], 2, 64, seed=13, device=backend_device(backend),
                                                   dtype=_dtype(backend, torch.float32))
    skip_unless_runs(backend, q, k, v, cq, ck, mq, mk)
    ref = varlen_attention_reference(q, k, v, cq, ck, softmax_scale=0.125)

    def f(q, k, v):
        return varlen_attention(q, k, v, cq, ck, 4, 5, backend=backend)

    run = f if backend == "reference" else torch.compile(f, fullgraph=True, backend="aot_eager")
    set_value_checks(False)  # what torch.compile does to the checks that read cu_seqlens
    try:
        torch._dynamo.reset()
        if backend in ("cpp",):
            # The C++ CPU op reads the lengths anyway and refuses with the argument's name.
            with pytest.raises(RuntimeError, match=r"max_seqlen_q: 4 is smaller than the longest segment \(40\)"):
                run(q, k, v)
            return
        out = run(q, k, v)  # the kernels cover any length; the torch backend never uses max_seqlen
    finally:
        set_value_checks(True)
    tol = dict(rtol=0, atol=2e-6) if q.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    if backend == "triton_window":
        # One key tile sized by max_seqlen_k: the segment it cannot hold comes out NaN (visibly wrong), never a
        # softmax over its first keys; the segment that fits is exact.
        assert torch.isnan(out[3:43]).all()
        out, ref = out[:3], ref[:3]
    torch.testing.assert_close(out, ref, **tol)


# ------------------------------------------------------------------------------------------------
# Exactness: a single visible key has weight exactly 1
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_single_key_is_exact(backend, dtype):
    # Segments 0 and 2 have one query and one key; segment 1 is causal with Lq = Lk = 5, whose first row
    # sees only key 0. Those rows: out = v, dq = 0, dv = dO exactly; their keys get dk = 0 exactly.
    dt = DTYPES[dtype] if DTYPES[dtype] in get_backend(backend).dtypes else torch.float16
    dev = backend_device(backend)
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([1, 5, 1], [1, 5, 1], 2, 64, seed=17, device=dev, dtype=dt,
                                                   requires_grad=True)
    skip_unless_runs(backend, q, k, v, cq, ck, mq, mk, causal=True)
    out = varlen_attention(q, k, v, cq, ck, mq, mk, causal=True, backend=backend)
    ref = varlen_attention_reference(q, k, v, cq, ck, softmax_scale=0.125, causal=True)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(18)).to(dev, dt)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), dout)
    single_q, single_k = [0, 1, 6], [0, 6]
    assert torch.equal(out[single_q], v[single_q].detach())
    assert torch.equal(out[single_q], ref[single_q])
    assert torch.equal(dq[single_q], torch.zeros_like(dq[single_q])) and torch.equal(dq[single_q], rq[single_q])
    assert torch.equal(dk[single_k], torch.zeros_like(dk[single_k])) and torch.equal(dk[single_k], rk[single_k])
    assert torch.equal(dv[single_k], dout[single_k]) and torch.equal(dv[single_k], rv[single_k])


def test_numpy_scalars_are_read_as_the_numbers_they_equal():
    """``attention_chunk=np.int64(0)`` was refused ("only 0 ... is supported, got 0") and a NumPy float16
    ``softcap`` / ``softmax_scale`` warned of an overflow (compared with float32's bounds in float16); a
    hostile-user round found both. They now act as the Python numbers they equal, silently."""
    import warnings

    import numpy as np

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 5, 2, 8, generator=g) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(flash_attn_func(q, k, v, attention_chunk=np.int64(0)), flash_attn_func(q, k, v),
                                   rtol=0, atol=0)
        torch.testing.assert_close(flash_attn_func(q, k, v, softcap=np.float16(2.0)),
                                   flash_attn_func(q, k, v, softcap=2.0), rtol=0, atol=0)
        torch.testing.assert_close(flash_attn_func(q, k, v, softmax_scale=np.float16(0.5)),
                                   flash_attn_func(q, k, v, softmax_scale=0.5), rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match=r"^attention_chunk: only 0 \(no chunked attention\) is supported, "
                       r"got 4$"):
        flash_attn_func(q, k, v, attention_chunk=np.int64(4))
