"""Sliding-window attention (``window_size``) and logit soft-capping (``softcap``) on every CPU backend.

Each backend's output, LSE and gradients are compared with a dense fp64 computation written here from
flash-attn's definitions alone (not from ``elit_kernels.reference``): for segment lengths Lq, Lk, query i
sees key j iff ``i + Lk - Lq - left <= j <= i + Lk - Lq + right`` (-1: that side unbounded; causal sets
right to 0), and the logits are ``softcap * tanh(scale * q.k / softcap)`` before masking. Rows that see no
key give zeros, LSE = +inf and zero gradients.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cases import CASES, backend_device, backend_params, skip_unless_runs  # noqa: E402

from elit_kernels import flash_attn_varlen_func, varlen_attention  # noqa: E402
from elit_kernels.attention import validate_inputs  # noqa: E402
from elit_kernels.attention import get_backend  # noqa: E402
from elit_kernels.testing import random_varlen_inputs  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = backend_params()
#: every output NaN-filled before a kernel writes it (conftest.py): a row left unwritten fails
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def dense_truth(q, k, v, lens_q, lens_k, scale, causal, window, softcap):
    """fp64 out ``[total_q, H, D]`` and lse ``[H, total_q]`` by padding each segment to a dense block and
    masking with flash-attn's window rule; differentiable in q, k, v (autograd gives the true gradients)."""
    left, right = window
    h, h_kv = q.shape[1], k.shape[1]
    outs, lses = [], []
    qa = ka = 0
    for lq, lk in zip(lens_q, lens_k):
        qs = q[qa:qa + lq].double().transpose(0, 1)  # [H, lq, D]
        ks = k[ka:ka + lk].double().repeat_interleave(h // h_kv, dim=1).transpose(0, 1)
        vs = v[ka:ka + lk].double().repeat_interleave(h // h_kv, dim=1).transpose(0, 1)
        qa, ka = qa + lq, ka + lk
        logits = scale * qs @ ks.transpose(1, 2)
        if softcap > 0:
            logits = softcap * torch.tanh(logits / softcap)
        i = torch.arange(lq).view(-1, 1)
        j = torch.arange(lk).view(1, -1)
        lo = i + lk - lq - (left if left >= 0 else 10 ** 9)
        hi = i + lk - lq + (0 if causal else (right if right >= 0 else 10 ** 9))
        seen = (j >= lo) & (j <= hi)
        any_key = seen.any(1)  # [lq]
        logits = logits.masked_fill(~seen, float("-inf"))
        safe = logits.masked_fill(~any_key.view(1, -1, 1), 0.0)  # rows without keys: finite, zeroed below
        o = torch.softmax(safe, -1) @ vs
        o = torch.where(any_key.view(1, -1, 1), o, torch.zeros((), dtype=o.dtype))
        lse = torch.where(any_key.view(1, -1), torch.logsumexp(safe, -1), torch.tensor(float("inf"), dtype=o.dtype))
        outs.append(o.transpose(0, 1))
        lses.append(lse.detach())
    return torch.cat(outs), torch.cat(lses, 1)


#: long enough to span several 16-row tiles, with a 1-key segment, empty segments on either side and Lq > Lk
#: (so bottom-right alignment leaves early rows without keys): the shared case table's "window-tiles"
LENS = CASES["window-tiles"].lens
#: (causal, window_size, softcap) run on LENS
OPTIONS = [
    pytest.param(False, (5, 3), 0.0, id="window5_3"),
    pytest.param(True, (6, -1), 0.0, id="causal_window6"),
    pytest.param(False, (-1, 0), 0.0, id="window_right0_is_causal"),
    pytest.param(False, (0, 0), 0.0, id="window0_0_diagonal_only"),
    pytest.param(False, (2, -1), 0.0, id="window_left_only"),
    pytest.param(False, (-1, -1), 2.0, id="softcap2"),
    pytest.param(True, (4, -1), 1.5, id="causal_window4_softcap"),
    pytest.param(False, (3, 7), 30.0, id="window3_7_softcap30"),
]
# The interpreter runs every Triton program in Python: it gets the cases that cover different code paths.
TRITON_CASES = {(False, (5, 3), 0.0), (True, (6, -1), 0.0), (False, (0, 0), 0.0), (True, (4, -1), 1.5)}


@pytest.mark.parametrize("causal, window, softcap", OPTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_window_softcap_matches_dense_truth(backend, causal, window, softcap):
    if backend == "triton" and INTERP and (causal, window, softcap) not in TRITON_CASES:
        pytest.skip("triton under the interpreter: a subset of the cases (each costs seconds of interpretation)")
    lens_q, lens_k = LENS
    dev = backend_device(backend)
    q, k, v, cq, ck, mq, mk = random_varlen_inputs(lens_q, lens_k, 4, 16, kv_heads=2, seed=11)
    q, k, v = (t.detach().to(dev).requires_grad_(True) for t in (q, k, v))
    cq, ck = cq.to(dev), ck.to(dev)
    skip_unless_runs(backend, q, k, v, cq, ck, mq, mk, causal=causal, window_size=window, softcap=softcap,
                     return_lse=True)
    scale = 0.31
    out, lse = varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=scale, causal=causal, window_size=window,
                                softcap=softcap, backend=backend, return_lse=True)
    ref_out, ref_lse = dense_truth(q, k, v, lens_q, lens_k, scale, causal, window, softcap)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-6, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "LSE is +inf exactly on rows that see no key"
    assert (lse[torch.isinf(lse)] > 0).all()
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[fin], ref_lse[fin], atol=2e-6, rtol=1e-5)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dev)
    out2 = varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=scale, causal=causal, window_size=window,
                            softcap=softcap, backend=backend)
    got = torch.autograd.grad(out2, (q, k, v), g)
    want = torch.autograd.grad(ref_out, (q, k, v), g.double())
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=5e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    if window != (-1, -1):  # the window must actually matter for these inputs
        plain = varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=scale, causal=causal, softcap=softcap,
                                 backend="reference")
        assert (plain - out).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_that_leaves_rows_without_keys(backend):
    """Window (0, 0), Lq > Lk: rows i < Lq - Lk see no key (their diagonal is before the first key): zeros,
    LSE +inf, zero gradients; the other rows see exactly one key: out = v exactly."""
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([6], [2], 2, 8, seed=4, requires_grad=True,
                                                   device=backend_device(backend))
    skip_unless_runs(backend, q, k, v, cq, ck, mq, mk, window_size=(0, 0), return_lse=True)
    out, lse = varlen_attention(q, k, v, cq, ck, mq, mk, window_size=(0, 0), backend=backend, return_lse=True)
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))
    assert torch.isinf(lse[:, :4]).all() and (lse[:, :4] > 0).all() and torch.isfinite(lse[:, 4:]).all()
    torch.testing.assert_close(out[4:], v, atol=1e-6, rtol=0)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))
    torch.testing.assert_close(dv, torch.ones_like(dv), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_varlen_func_passes_window_and_softcap(backend):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([7, 5], [7, 9], 2, 16, seed=9, device=backend_device(backend))
    skip_unless_runs(backend, q, k, v, cq, ck, mq, mk, causal=True, window_size=(3, 3), softcap=4.0)
    got = flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, 0.0, None, True, (3, 3), 4.0, backend=backend)
    want, _ = dense_truth(q, k, v, [7, 5], [7, 9], 16 ** -0.5, True, (3, 3), 4.0)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("window, err, match", [
    ((3,), TypeError, r"^window_size: expected a pair"),
    (5, TypeError, r"^window_size: expected a pair"),
    ((2.5, 0), TypeError, r"^window_size: left must be an int >= -1"),
    ((-2, 0), ValueError, r"^window_size: left must be >= -1"),
    ((0, -3), ValueError, r"^window_size: right must be >= -1"),
])
def test_window_size_errors_name_the_argument(window, err, match):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3], [3], 2, 8)
    with pytest.raises(err, match=match):
        varlen_attention(q, k, v, cq, ck, mq, mk, window_size=window)


@pytest.mark.parametrize("softcap, err", [(-1.0, ValueError), (float("nan"), ValueError), ("5", TypeError),
                                          (True, TypeError)])
def test_softcap_errors_name_the_argument(softcap, err):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3], [3], 2, 8)
    with pytest.raises(err, match=r"^softcap: "):
        varlen_attention(q, k, v, cq, ck, mq, mk, softcap=softcap)


def test_cuda_backend_declares_no_window_and_no_softcap():
    """Dispatch skips ``cuda`` for these inputs (its kernels have neither), with the reason named."""
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3], [3], 2, 64)
    cuda = get_backend("cuda")
    win = validate_inputs(q, k, v, cq, ck, mq, mk, None, False, window_size=(2, 0))
    cap = validate_inputs(q, k, v, cq, ck, mq, mk, None, False, softcap=5.0)
    plain = validate_inputs(q, k, v, cq, ck, mq, mk, None, False)
    assert any("sliding-window" in r for r in cuda.not_supported_reasons(win))
    assert any("soft-capping" in r for r in cuda.not_supported_reasons(cap))
    assert not any("sliding-window" in r or "soft-capping" in r for r in cuda.not_supported_reasons(plain))
    with pytest.raises(ValueError, match="sliding-window"):
        varlen_attention(q, k, v, cq, ck, mq, mk, window_size=(2, 0), backend="cuda")


def test_causal_sets_the_right_side_to_zero():
    """flash-attn: with causal=True the right side of the window is 0 whatever is passed."""
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([9], [12], 2, 8, seed=2)
    a = varlen_attention(q, k, v, cq, ck, mq, mk, causal=True, window_size=(3, 5), backend="reference")
    b = varlen_attention(q, k, v, cq, ck, mq, mk, causal=False, window_size=(3, 0), backend="reference")
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("op", ["torch", "cpp"])
def test_opcheck_with_window_and_softcap(op):
    from torch.library import opcheck

    if op == "cpp" and not get_backend("cpp").is_available():
        pytest.skip(f"cpp: {get_backend('cpp').unavailable_reason}")
    fwd = {"torch": torch.ops.elit.varlen_attn_fwd_torch, "cpp": torch.ops.elit.varlen_attn_fwd}[op]
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([5, 3], [6, 2], 4, 8, kv_heads=2, seed=6, requires_grad=True)
    opcheck(fwd, (q, k, v, cq, ck, mq, mk, 0.3, False, 2, 1, 3.0))


# --- flash_attn_func: the dense [B, S, H, D] entry point over the varlen path ---------------------------

def _dense_truth_bshd(q, k, v, scale, causal, window, softcap):
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    out, lse = dense_truth(q.reshape(b * sq, *q.shape[2:]), k.reshape(b * sk, *k.shape[2:]),
                           v.reshape(b * sk, *v.shape[2:]), [sq] * b, [sk] * b, scale, causal, window, softcap)
    return out.view(b, sq, *q.shape[2:]), lse.view(q.shape[2], b, sq).transpose(0, 1)


@pytest.mark.parametrize("causal, window, softcap", [(False, (-1, -1), 0.0), (True, (-1, -1), 0.0),
                                                     (True, (3, -1), 0.0), (False, (2, 1), 5.0)],
                         ids=["full", "causal", "causal_window3", "window2_1_softcap"])
# The dense entry point's own work (reshapes, uniform cu_seqlens) does not depend on the backend: the
# interpreted Triton kernels (seconds per case) are covered through the varlen tests above.
@pytest.mark.parametrize("backend", backend_params(keep=lambda b: not (b.name == "triton" and INTERP)))
def test_flash_attn_func_matches_dense_truth(backend, causal, window, softcap):
    """GQA (4 query heads over 2 kv heads), S_q != S_k, output, LSE ``[B, H, S_q]`` and gradients."""
    from elit_kernels import flash_attn_func

    skip_unless_runs(backend, *random_varlen_inputs([6] * 3, [9] * 3, 4, 16, kv_heads=2), causal=causal,
                     window_size=window, softcap=softcap, return_lse=True)
    g = torch.Generator().manual_seed(21)
    q = torch.randn(3, 6, 4, 16, generator=g).requires_grad_(True)
    k = torch.randn(3, 9, 2, 16, generator=g).requires_grad_(True)
    v = torch.randn(3, 9, 2, 16, generator=g).requires_grad_(True)
    out, lse, probs = flash_attn_func(q, k, v, 0.0, 0.27, causal, window, softcap, return_attn_probs=True,
                                     backend=backend)
    assert probs.numel() == 0 and out.shape == (3, 6, 4, 16) and lse.shape == (3, 4, 6)
    want, want_lse = _dense_truth_bshd(q, k, v, 0.27, causal, window, softcap)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-6, rtol=1e-5)
    dout = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v), dout)
    ref = torch.autograd.grad(want, (q, k, v), dout.double())
    for name, a, b in zip(("dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a.double(), b.double(), atol=5e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_flash_attn_func_reads_contiguous_inputs_without_copies():
    """The batch is reshaped, not copied: a contiguous q reaches the backend as a view of its storage."""
    from elit_kernels import flash_attn_func
    from elit_kernels.attention.registry import Backend, register_backend, _REGISTRY

    seen = {}

    class Spy(Backend):
        name, priority, known_answer = "_spy_dense", -100, False

        def forward(self, inp):
            seen.update(q=inp.q.data_ptr(), k=inp.k.data_ptr(), cu=inp.cu_seqlens_q.tolist())
            return get_backend("reference").forward(inp)

    register_backend(Spy())
    try:
        q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 5, 2, 8)
        flash_attn_func(q, k, k, backend="_spy_dense")
    finally:
        _REGISTRY.pop("_spy_dense")
    assert seen == {"q": q.data_ptr(), "k": k.data_ptr(), "cu": [0, 3, 6]}


def test_flash_attn_func_errors_name_the_argument():
    from elit_kernels import flash_attn_func

    q = torch.randn(2, 3, 4, 8)
    with pytest.raises(ValueError, match=r"^q: expected shape \[batch, seqlen_q, num_heads, head_dim\]"):
        flash_attn_func(q[0], q, q)
    with pytest.raises(ValueError, match=r"^k: batch size 1 does not match q's 2"):
        flash_attn_func(q, q[:1], q)
    with pytest.raises(NotImplementedError, match=r"^dropout_p: "):
        flash_attn_func(q, q, q, dropout_p=0.5)
    with pytest.raises(NotImplementedError, match=r"^s_aux: "):
        flash_attn_func(q, q, q, s_aux=torch.zeros(4))
    with pytest.raises(NotImplementedError, match=r"^alibi_slopes: "):
        flash_attn_func(q, q, q, alibi_slopes=torch.ones(4))
