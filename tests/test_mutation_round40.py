"""Tests owed by the first mutation round on elit_kernels/dropin.py (``python tools/mutation.py dropin``): the
defaults of every flash-attn entry point (non-causal, no softcap, no lse, ``deterministic=False``), the
arguments the packed and dense entries hand on (``softmax_scale``, ``backend``), the options each of them refuses,
the dense entry's argument names in its errors, and a mistyped ``deterministic`` reported before any refusal.

Each output is checked against an expectation computed here (a float64 softmax over the dense batch) or by the
reference backend on the unpacked tensors, on fresh random inputs; backends are told apart by registered spies
that count their calls.
"""
from __future__ import annotations

import pytest
import torch

from elit_kernels import (flash_attn_func, flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                          flash_attn_varlen_qkvpacked_func)
from elit_kernels.attention import dispatch as D
from elit_kernels.attention import registry as R
from elit_kernels.reference.attention import varlen_attention_reference
from elit_kernels.testing import cu_seqlens

from cases import counting_reference

LENS_Q, LENS_K = [4, 2, 6], [5, 3, 6]
H, HKV, DIM = 4, 2, 16


def _randn(g, *shape, grad=False):
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def _dense_truth(q, k, v, scale, causal=False):
    """Attention over a dense batch in float64, written out: query head h reads kv head h // (H // H_kv);
    causal is bottom-right aligned (query i sees key j iff j <= i + S_k - S_q)."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    kk = k.detach().double().repeat_interleave(h // hkv, dim=2)
    vv = v.detach().double().repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.detach().double(), kk) * scale
    if causal:
        i = torch.arange(sq)[:, None]
        j = torch.arange(sk)[None, :]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vv)


@pytest.fixture
def spies():
    """``first``: ahead of every backend in default dispatch; ``last``: behind all of them (runs only by name)."""
    first, last = counting_reference("_round40_first", 10_000), counting_reference("_round40_last", -10_000)
    for b in (first, last):
        R.register_backend(b)
    D.clear_decisions()
    yield first, last
    for b in (first, last):
        R._REGISTRY.pop(b.name, None)
    D.clear_decisions()


def _entries(g, grad=False):
    """Each entry point as a call ``f(**kw)`` on fresh random inputs, with its expected output (reference
    backend / dense truth at the default scale, non-causal)."""
    cq, ck = cu_seqlens(LENS_Q), cu_seqlens(LENS_K)
    q = _randn(g, sum(LENS_Q), H, DIM, grad=grad)
    k, v = _randn(g, sum(LENS_K), HKV, DIM, grad=grad), _randn(g, sum(LENS_K), HKV, DIM, grad=grad)
    qkv = _randn(g, sum(LENS_K), 3, H, DIM, grad=grad)
    kv = _randn(g, sum(LENS_K), 2, HKV, DIM, grad=grad)
    dq, dk, dv = _randn(g, 2, 5, H, DIM, grad=grad), _randn(g, 2, 7, HKV, DIM, grad=grad), _randn(g, 2, 7, HKV, DIM,
                                                                                                   grad=grad)
    scale = DIM ** -0.5

    def ref(*a, s=scale):
        return varlen_attention_reference(*(t.detach() for t in a[:3]), *a[3:], softmax_scale=s).double()

    return {
        "varlen": (lambda **kw: flash_attn_varlen_func(q, k, v, cq, ck, 6, 6, **kw),
                   lambda s=scale: ref(q, k, v, cq, ck, s=s)),
        "qkvpacked": (lambda **kw: flash_attn_varlen_qkvpacked_func(qkv, ck, 6, **kw),
                      lambda s=scale: ref(*qkv.unbind(1), ck, ck, s=s)),
        "kvpacked": (lambda **kw: flash_attn_varlen_kvpacked_func(q, kv, cq, ck, 6, 6, **kw),
                     lambda s=scale: ref(q, *kv.unbind(1), cq, ck, s=s)),
        "dense": (lambda **kw: flash_attn_func(dq, dk, dv, **kw), lambda s=scale: _dense_truth(dq, dk, dv, s)),
    }


ENTRIES = ["varlen", "qkvpacked", "kvpacked", "dense"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_entry_defaults_are_non_causal_uncapped_and_return_one_tensor(entry):
    # flash-attn's defaults: causal=False, softcap=0.0, return_attn_probs=False (a tensor, not a tuple)
    call, want = _entries(torch.Generator().manual_seed(4001))[entry]
    out = call()
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out.double(), want(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entry", ENTRIES)
def test_entry_hands_on_softmax_scale(entry):
    call, want = _entries(torch.Generator().manual_seed(4002))[entry]
    torch.testing.assert_close(call(softmax_scale=0.37).double(), want(0.37), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entry", ENTRIES)
def test_entry_default_is_not_deterministic(spies, entry):
    # deterministic=False by default (flash-attn's): with a backward to follow, default dispatch may still pick a
    # backend whose backward is not declared deterministic (here the spy, first in line)
    first, _ = spies
    call, want = _entries(torch.Generator().manual_seed(4003), grad=True)[entry]
    out = call()
    assert first.calls == 1 and out.requires_grad
    torch.testing.assert_close(out.double(), want(), rtol=1e-5, atol=1e-5)
    call(deterministic=True)  # asked for: the spy is passed over
    assert first.calls == 1


@pytest.mark.parametrize("entry", ENTRIES)
def test_entry_hands_on_the_backend(spies, entry):
    first, last = spies
    call, want = _entries(torch.Generator().manual_seed(4004))[entry]
    out = call(backend="_round40_last")  # named: runs although it is last in default dispatch
    assert (first.calls, last.calls) == (0, 1)
    torch.testing.assert_close(out.double(), want(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="_round40_none"):
        call(backend="_round40_none")  # a name nothing is registered under is not replaced by default dispatch


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_mistyped_deterministic_is_reported_before_the_refusals(entry):
    # the flag is checked at the entry, first: a caller with two mistakes learns of the type error
    call, _ = _entries(torch.Generator().manual_seed(4005))[entry]
    with pytest.raises(TypeError, match="^deterministic: "):
        call(dropout_p=0.5, deterministic="no")
    with pytest.raises(NotImplementedError, match="^dropout_p: "):
        call(dropout_p=0.5, deterministic=1)


@pytest.mark.parametrize("entry, kwargs, arg", [
    ("qkvpacked", {"alibi_slopes": torch.rand(H)}, "alibi_slopes"),
    ("kvpacked", {"s_aux": torch.randn(H)}, "s_aux"),
    ("dense", {"qv": torch.randn(2, 5, H, DIM)}, "qv"),
    ("dense", {"q_descale": torch.rand(2, HKV) + 0.5}, "q_descale"),
    ("dense", {"k_descale": torch.rand(2, HKV) + 0.5}, "k_descale"),
    ("dense", {"v_descale": torch.rand(2, HKV) + 0.5}, "v_descale"),
])
def test_each_entry_refuses_its_flash_attn_options(entry, kwargs, arg):
    call, want = _entries(torch.Generator().manual_seed(4006))[entry]
    with pytest.raises(NotImplementedError, match=f"^{arg}: "):
        call(**kwargs)
    none = {name: None for name in kwargs}  # None is accepted: the same output as without the option
    torch.testing.assert_close(call(**none).double(), want(), rtol=1e-5, atol=1e-5)


def test_dense_errors_name_k_and_v():
    g = torch.Generator().manual_seed(4007)
    q, k, v = _randn(g, 2, 5, H, DIM), _randn(g, 2, 7, HKV, DIM), _randn(g, 2, 7, HKV, DIM)
    layout = r"\[batch, seqlen_k, num_kv_heads, head_dim\]"
    with pytest.raises(ValueError, match=rf"^k: expected shape {layout} \(4-D\), got 3-D shape \(14, 2, 16\)$"):
        flash_attn_func(q, k.reshape(14, HKV, DIM), v)
    with pytest.raises(ValueError, match=rf"^v: expected shape {layout} \(4-D\), got 3-D shape \(14, 2, 16\)$"):
        flash_attn_func(q, k, v.reshape(14, HKV, DIM))
    with pytest.raises(TypeError, match="^k: expected a torch.Tensor, got list"):
        flash_attn_func(q, k.tolist(), v)
    with pytest.raises(TypeError, match="^v: expected a torch.Tensor, got list"):
        flash_attn_func(q, k, v.tolist())
    with pytest.raises(ValueError, match="^v: batch size 1 does not match q's 2$"):
        flash_attn_func(q, k, v[:1])
    with pytest.raises(ValueError, match="^k: batch size 1 does not match q's 2$"):
        flash_attn_func(q, k[:1], v)
    torch.testing.assert_close(flash_attn_func(q, k, v).double(), _dense_truth(q, k, v, DIM ** -0.5), rtol=1e-5,
                               atol=1e-5)
