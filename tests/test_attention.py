"""varlen_attention: the pure-PyTorch backends vs fp64 truths, values and gradients."""
import re
import zlib

import pytest
import torch
from cases import backend_device, backend_params, cases, skip_unless_runs

import elit_kernels
from elit_kernels import flash_attn_varlen_func, varlen_attention
from elit_kernels.testing import check_backend_against_reference, cu_seqlens, random_varlen_inputs

#: every output NaN-filled before a kernel writes it (conftest.py): a row left unwritten fails
pytestmark = pytest.mark.usefixtures("poisoned_outputs")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: The backends that run every dtype and head dim on any device: the pure-PyTorch ones. The sweeps below (3
#: dtypes x 3 head dims x both masks x the "pytorch" cases) are theirs; the kernels have their own files and the
#: contract test (tests/test_contract.py).
PYTORCH_BACKENDS = backend_params(keep=lambda b: b.devices is None)


def _call(backend):
    def f(q, k, v, cq, ck, mq, mk, scale, causal):
        return varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=scale, causal=causal, backend=backend)
    return f


def dense_masked_fp64(q, k, v, cu_q, cu_k, scale, causal):
    """An independent truth: one dense [total_q, total_k] score matrix with a segment (+causal) mask."""
    q, k, v = (t.detach().double() for t in (q, k, v))
    tq, tk = q.shape[0], k.shape[0]
    cq, ck = cu_q.long(), cu_k.long()
    sq = torch.searchsorted(cq[1:], torch.arange(tq), right=True)
    sk = torch.searchsorted(ck[1:], torch.arange(tk), right=True)
    allowed = sq[:, None] == sk[None, :]
    if causal:
        iq = torch.arange(tq) - cq[sq]
        jk = torch.arange(tk) - ck[sk]
        lq = (cq[1:] - cq[:-1])[sq]
        lk = (ck[1:] - ck[:-1])[sq]
        allowed &= jk[None, :] <= (iq + lk - lq)[:, None]
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # rows with no key -> zeros
    return torch.einsum("hqk,khd->qhd", p, v)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", cases("pytorch"))
def test_reference_matches_dense_fp64(case, causal):
    lq, lk = case.lens
    q, k, v, cq, ck, mq, mk = random_varlen_inputs(lq, lk, 3, 72, dtype=torch.float64, seed=sum(lq) + 7 * sum(lk))
    out = varlen_attention(q, k, v, cq, ck, mq, mk, causal=causal, backend="reference")
    truth = dense_masked_fp64(q, k, v, cq, ck, 72 ** -0.5, causal)
    torch.testing.assert_close(out, truth, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", PYTORCH_BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", cases("pytorch"))
def test_backend_vs_fp64(backend, dtype, head_dim, causal, case):
    lq, lk = case.lens
    check_backend_against_reference(_call(backend), lq, lk, 2, head_dim, DTYPES[dtype], causal=causal,
                                    seed=head_dim + zlib.crc32(repr(case.lens).encode()) % 97)


@pytest.mark.parametrize("backend", PYTORCH_BACKENDS)
def test_empty_key_segment_gives_exact_zeros_and_zero_grads(backend):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 4], [0, 5], 2, 64, requires_grad=True, seed=3)
    out = varlen_attention(q, k, v, cq, ck, mq, mk, backend=backend)
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))
    assert out[3:].abs().sum() > 0
    out.square().sum().backward()
    assert torch.equal(q.grad[:3], torch.zeros_like(q.grad[:3]))
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("backend", PYTORCH_BACKENDS)
def test_causal_rows_without_keys_are_zero(backend):
    # Lq > Lk with a bottom-right causal mask: the first Lq - Lk queries see no key.
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([6], [2], 2, 64, seed=4)
    out = varlen_attention(q, k, v, cq, ck, mq, mk, causal=True, backend=backend)
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))
    assert (out[4:].abs().sum(dim=(1, 2)) > 0).all()


@pytest.mark.parametrize("backend", PYTORCH_BACKENDS)
def test_no_queries_at_all(backend):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([0, 0], [3, 2], 2, 64, requires_grad=True, seed=5)
    out = varlen_attention(q, k, v, cq, ck, mq, mk, backend=backend)
    assert out.shape == (0, 2, 64)
    out.sum().backward()  # the output stays in the graph: every input gets an exact-zero gradient
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t)), name


def test_softmax_scale_is_used():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([5, 7], [6, 3], 2, 64, seed=6)
    a = varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=0.3)
    b = varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=0.3, backend="reference")
    c = varlen_attention(q, k, v, cq, ck, mq, mk)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_default_backend_and_env_override(monkeypatch):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([5], [6], 2, 64, seed=7)
    calls = []

    class Spy(elit_kernels.Backend):
        name, priority = "spy_test", -100

        def forward(self, inp):
            calls.append(inp)
            return torch.zeros_like(inp.q)

    from elit_kernels.attention import registry

    elit_kernels.register_backend(Spy())
    try:
        monkeypatch.setenv("ELIT_BACKEND", "spy_test")
        varlen_attention(q, k, v, cq, ck, mq, mk)
        assert len(calls) == 1 and calls[0].softmax_scale == pytest.approx(64 ** -0.5)
        monkeypatch.delenv("ELIT_BACKEND")
        varlen_attention(q, k, v, cq, ck, mq, mk)
        assert len(calls) == 1  # a priority -100 backend is never the default
    finally:  # a backend that answers zeros must not outlive the test (tuning would time it as a candidate)
        registry._REGISTRY.pop("spy_test", None)


def test_flash_attn_drop_in_signature_positional():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([5, 0, 9], [4, 2, 11], 4, 64, seed=8)
    # flash-attn's positional order: ..., dropout_p, softmax_scale, causal
    a = flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, 0.0, 0.2, True)
    b = varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=0.2, causal=True, backend="reference")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs, arg", [
    ({"dropout_p": 0.1}, "dropout_p"),
    ({"alibi_slopes": torch.ones(2)}, "alibi_slopes"),
    ({"block_table": torch.zeros(1, 1, dtype=torch.int32)}, "block_table"),
    ({"s_aux": torch.zeros(2)}, "s_aux"),
    ({"seqused_q": torch.tensor([1], dtype=torch.int32)}, "seqused_q"),
    ({"seqused_k": torch.tensor([1], dtype=torch.int32)}, "seqused_k"),
    ({"qv": torch.zeros(2, 2, 64)}, "qv"),
    ({"q_descale": torch.ones(1, 2)}, "q_descale"),
    ({"k_descale": torch.ones(1, 2)}, "k_descale"),
    ({"v_descale": torch.ones(1, 2)}, "v_descale"),
    ({"leftpad_k": torch.zeros(1, dtype=torch.int32)}, "leftpad_k"),
    ({"rotary_cos": torch.ones(2, 32)}, "rotary_cos"),
    ({"rotary_sin": torch.zeros(2, 32)}, "rotary_sin"),
    ({"attention_chunk": 4}, "attention_chunk"),
])
def test_flash_attn_unsupported_options_raise(kwargs, arg):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([2], [2], 2, 64)
    with pytest.raises(NotImplementedError, match=f"^{arg}: "):
        flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, **kwargs)


def test_flash_attn_unsupported_options_are_named_parameters():
    """A caller that passes only the keywords a signature names (transformers' flash-attention path filters
    by ``inspect.signature``) must hand these over to be refused, not drop them."""
    import inspect

    params = inspect.signature(flash_attn_varlen_func).parameters
    for name in ("dropout_p", "window_size", "softcap", "alibi_slopes", "block_table", "s_aux", "seqused_q",
                 "seqused_k", "qv", "q_descale", "k_descale", "v_descale", "attention_chunk"):
        assert name in params, name
    # scheduling hints with no effect on the result are accepted
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3], [4], 2, 16, seed=3)
    out = flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, num_splits=4, pack_gqa=True, sm_margin=0,
                                 deterministic=True)
    torch.testing.assert_close(out, varlen_attention(q, k, v, cq, ck, mq, mk, backend="reference"))


def test_cu_seqlens_helper():
    assert cu_seqlens([3, 0, 2]).tolist() == [0, 3, 3, 5]
    assert cu_seqlens([]).tolist() == [0]


def test_default_dispatch_compiles_without_graph_breaks():
    # backend=None walks every registered backend's is_available / not_supported_reasons: all of it
    # must be traceable (no pybind calls, no host syncs) for torch.compile(fullgraph=True).
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 5], [4, 2], 2, 64, seed=9)

    def f(q, k, v):
        return varlen_attention(q, k, v, cq, ck, mq, mk) * 2

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(out, f(q, k, v))


@pytest.mark.parametrize("lens_q,lens_k,causal,h_kv", [
    ([4] * 6, [16] * 6, False, 2),                 # Read at one budget: one run
    ([4, 4, 1, 1, 2, 2], [16] * 6, False, 2),      # Read of a mixed batch: three runs
    ([16] * 3 + [4] * 3, [4] * 3 + [1] * 3, False, 2),  # Write: a single-key run (inference: out = v)
    ([8, 8, 0, 3], [8, 8, 5, 0], False, 1),        # an empty query run and an empty key run; GQA
    ([5, 5, 3], [9, 9, 3], True, 2),                # causal, bottom-right, Lq <= Lk
], ids=["read", "read_mixed", "write_single_key", "empty_gqa", "causal"])
def test_torch_sdpa_over_runs_matches_reference(lens_q, lens_k, causal, h_kv):
    from elit_kernels.attention.backends.torch_ops import sdpa_over_runs

    q, k, v, cq, ck, mq, mk = random_varlen_inputs(lens_q, lens_k, 2, 16, seed=11)
    k, v = k[:, :h_kv].contiguous(), v[:, :h_kv].contiguous()
    q = torch.cat([q, torch.full((3, 2, 16), float("nan"))])  # rows past the packed data
    with torch.no_grad():
        out = sdpa_over_runs(q, k, v, cq, ck, 16 ** -0.5, causal)
    assert out is not None, "the run path must take this case"
    ref = varlen_attention(q, k, v, cq, ck, mq, mk, causal=causal, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[-3:], torch.zeros(3, 2, 16))
    if 1 in lens_k:  # single key: exactly v
        i = lens_k.index(1)
        a, b = sum(lens_q[:i]), sum(lens_q[:i + 1])
        assert torch.equal(out[a:b], v[sum(lens_k[:i])].expand(b - a, -1, -1))


def test_torch_sdpa_over_runs_declines_what_it_cannot_express():
    from elit_kernels.attention.backends.torch_ops import MAX_RUNS, sdpa_over_runs

    q, k, v, cq, ck, *_ = random_varlen_inputs([3, 2], [2, 5], 2, 16, seed=12)
    assert sdpa_over_runs(q, k, v, cq, ck, 0.25, True) is None  # causal Lq > Lk: rows with no key
    lens = list(range(1, MAX_RUNS + 3))
    q, k, v, cq, ck, *_ = random_varlen_inputs(lens, lens, 2, 16, seed=13)
    assert sdpa_over_runs(q, k, v, cq, ck, 0.25, False) is None  # too many distinct lengths
    q, k, v, cq, ck, *_ = random_varlen_inputs([4], [1], 2, 16, seed=14, requires_grad=True)
    assert sdpa_over_runs(q, k, v, cq, ck, 0.25, False) is None  # single-key gradients: the exact path


@pytest.mark.parametrize("backend", backend_params())
def test_causal_offsets_around_the_tile_size(backend):
    # Bottom-right causal masks shift with Lk - Lq. Kernels working in 16-row/16-column tiles get the first
    # visible row of a key block from that offset; an off-by-one there shows only when a block starts on
    # certain offsets (nb·16 − (Lk − Lq) ≡ 15 mod 16). Sweep Lk − Lq = 0..17 around 16 for Lq = 20, plus
    # Lq > Lk (rows with no key), forward and backward, against the fp64 reference.
    lens_q = [20] * 18 + [21, 33, 40]
    lens_k = [20 + off for off in range(18)] + [5, 17, 31]
    dev = backend_device(backend)
    skip_unless_runs(backend, *random_varlen_inputs(lens_q, lens_k, 1, 16, device=dev), causal=True)
    fn = lambda *a: varlen_attention(*a[:7], softmax_scale=a[7], causal=a[8], backend=backend)  # noqa: E731
    check_backend_against_reference(fn, lens_q, lens_k, 1, 16, torch.float32, causal=True, seed=31, device=dev)


def test_reference_rounds_once_from_fp32_for_low_precision_inputs():
    """The truth for bf16 inputs: fp32 accumulation of the bf16 values, one rounding at the end; lse fp32."""
    from elit_kernels.reference.attention import varlen_attention_reference

    q, k, v, cq, ck, _, _ = random_varlen_inputs([3, 6], [5, 4], 2, 16, dtype=torch.bfloat16, seed=31, extra_q=2,
                                                 extra_fill=None)
    out, lse = varlen_attention_reference(q, k, v, cq, ck, softmax_scale=0.25, return_lse=True)
    want, want_lse = varlen_attention_reference(q.float(), k.float(), v.float(), cq, ck, softmax_scale=0.25,
                                                return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert torch.equal(out, want.to(torch.bfloat16))
    assert torch.equal(lse, want_lse)


def test_reference_with_no_segment_rows_but_buffer_rows():
    """cu_seqlens_q all zeros over a q buffer with rows: every row is past the packed data, so zeros (never
    a value leaked from k or v), zero gradients for q, k and v, lse +inf."""
    from elit_kernels.reference.attention import varlen_attention_reference

    q, k, v, cq, ck, _, _ = random_varlen_inputs([0, 0], [3, 2], 2, 8, dtype=torch.float64, requires_grad=True,
                                                 seed=32, extra_q=3, extra_fill=None)
    out, lse = varlen_attention_reference(q, k, v, cq, ck, softmax_scale=0.3, return_lse=True)
    assert torch.equal(out, torch.zeros(3, 2, 8, dtype=torch.float64))
    assert torch.equal(lse, torch.full((2, 3), float("inf"), dtype=torch.float64))
    assert out.dtype == lse.dtype == torch.float64  # fp64 inputs: fp64 lse even with no segment to set it
    for name, g in zip("qkv", torch.autograd.grad(out.sum(), (q, k, v))):
        assert torch.equal(g, torch.zeros_like(g)), name


@pytest.mark.parametrize("which", ["q", "k"])
@pytest.mark.parametrize("cu, fault", [
    ([0, -1, 4], "must be non-decreasing, but {n}[1] = -1 < {n}[0] = 0"),   # the first step, not only later ones
    ([0, 2, 4, 3], "must be non-decreasing, but {n}[3] = 3 < {n}[2] = 4"),
    ([0, 2, 6], "last element 6 is past the end of the packed tokens (5 rows)"),  # only the last one is past
    ([1, 3, 5], "must start at 0, got {n}[0] = 1"),
])
def test_reference_names_the_bad_cu_seqlens_it_reads_on_the_host(which, cu, fault):
    """The reference reads cu_seqlens on the host whatever set_value_checks says; a bad one is refused with
    the argument's name and the offending entries, never sliced into a shorter computation."""
    from elit_kernels.reference.attention import varlen_attention_reference

    q, k, v, cq, ck, _, _ = random_varlen_inputs([2, 3], [2, 3], 2, 8, seed=33)
    bad = torch.tensor(cu, dtype=torch.int32)
    cq, ck = (bad, ck) if which == "q" else (cq, bad)
    name = f"cu_seqlens_{which}"
    with pytest.raises(ValueError, match=re.escape(f"{name}: " + fault.format(n=name))):
        varlen_attention_reference(q, k, v, cq, ck, softmax_scale=0.3)


# Second derivatives (create_graph=True: gradient penalties, R1). Each backend either gives the reference's
# values or refuses with an error naming the op; none may return numbers built from a backward treated as a
# constant. softcap 5 takes the torch backend off its SDPA path onto its own op; triton runs under the
# interpreter without CUDA.


def _grad_of_grad(backend, softcap, dtype):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([2, 3], [3, 4], 2, 16, dtype=dtype, requires_grad=True, seed=21,
                                                   device=backend_device(backend))
    skip_unless_runs(backend, q, k, v, cq, ck, mq, mk, softcap=softcap)
    out = varlen_attention(q, k, v, cq, ck, mq, mk, backend=backend, softcap=softcap)
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    return torch.autograd.grad(gq.square().sum(), (q, k, v))


def test_reference_double_backward_is_exact():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([2, 3], [3, 1], 1, 4, dtype=torch.float64, requires_grad=True,
                                                   seed=22)
    assert torch.autograd.gradgradcheck(
        lambda q, k, v: varlen_attention(q, k, v, cq, ck, mq, mk, backend="reference", causal=True, softcap=3.0),
        (q, k, v))


@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["softcap0", "softcap5"])
@pytest.mark.parametrize("backend", backend_params())
def test_double_backward_matches_reference_or_is_refused_by_name(backend, softcap):
    want = _grad_of_grad("reference", softcap, torch.float64)
    try:
        got = _grad_of_grad(backend, softcap, torch.float32)
    except RuntimeError as e:
        # ours names the forward op; PyTorch's own SDPA names its backward kernel
        assert re.search(r"elit::\w+_attn_fwd\w*: double backward .* not supported; .*backend='reference'|"
                         r"derivative for aten::_scaled_dot_product\w* is not implemented", str(e)), str(e)
        return
    for name, g, w in zip("qkv", got, want):
        err = (g.double().cpu() - w).abs().max().item()
        assert err <= 1e-3 * (1 + w.abs().max().item()), f"d2/d{name}: max abs err {err:.3g} against the reference"


# Not the reference: it reads cu_seqlens on the host, a graph break by design (fullgraph=True refuses it).
@pytest.mark.parametrize("backend", backend_params(keep=lambda b: b.name != "reference", default=True))
def test_max_seqlen_stays_symbolic_under_dynamic_compile(backend):
    # Varlen training changes max_seqlen every step: under torch.compile(dynamic=True) it must not
    # specialise the graph (a recompile per length, then FailOnRecompileLimitHit with fullgraph=True).
    skip_unless_runs(backend, *random_varlen_inputs([3, 2], [4, 3], 2, 16, device=backend_device(backend)),
                     causal=True)
    import torch._dynamo

    torch._dynamo.reset()
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    def f(q, k, v, cq, ck, mq, mk):
        return varlen_attention(q, k, v, cq, ck, mq, mk, causal=True, backend=backend)

    cf = torch.compile(f, dynamic=True, fullgraph=True, backend=counting)
    for n in range(3, 23):  # 20 lengths
        q, k, v, cq, ck, mq, mk = random_varlen_inputs([n, 2], [n + 1, 3], 2, 16, seed=n,
                                                       device=backend_device(backend))
        torch.testing.assert_close(cf(q, k, v, cq, ck, mq, mk), f(q, k, v, cq, ck, mq, mk))
    assert len(compiles) == 1, f"{len(compiles)} compiles for 20 max_seqlen values"


def test_reference_softcap_gradient_holds_at_any_legal_softcap():
    """A fuzz: the reference's gradient through ``softcap * tanh(s / softcap)`` scaled the incoming gradient by
    ``softcap`` before dividing it back, so a legal softcap near float32's max (3e38) gave inf, then NaN, in dq and
    dk: the truth was wrong where the kernels were right. Its gradient is ``1 - tanh^2`` taken as such now."""
    from elit_kernels.reference.attention import _SoftCap

    torch.manual_seed(0)
    s = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 7, dtype=torch.float64)
    for cap in (0.5, 5.0, 1e3):
        got, = torch.autograd.grad((_SoftCap.apply(s, cap) * w).sum(), s)
        want, = torch.autograd.grad((torch.tanh(s / cap) * cap * w).sum(), s)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        # the reference differentiates twice, and forward-mode AD and torch.func run through it (a first version
        # saved tanh without its history: its second derivative was silently wrong, its jvp missing)
        assert torch.autograd.gradgradcheck(lambda x: _SoftCap.apply(x, cap), (s,))
        assert torch.autograd.gradcheck(lambda x: _SoftCap.apply(x, cap), (s,), check_forward_ad=True)
        got = torch.func.grad(lambda x: (_SoftCap.apply(x, cap) * w).sum())(s.detach())
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    q, k, v = (torch.randn(4, 1, 16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 4], dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, cu, 4, 4, softcap=3e38, backend="reference")
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(g.isfinite().all() for g in grads)


def test_attention_runs_in_its_inputs_dtype_under_autocast():
    """A fuzz: under CPU autocast, fp32 inputs made the torch backend's SDPA return bf16 (run_backend's contract
    check then raised an error naming no argument), an AttentionPlan's kept runner returned bf16 silently from its
    second call, and the reference ran its matmuls in bf16 (1.6e-2 off). Attention runs in its inputs' dtype
    whatever autocast says, eager, through a plan and compiled."""
    from elit_kernels.attention import AttentionPlan, SegmentRuns

    q, k, v, cq, ck, mq, mk = random_varlen_inputs([4, 4, 3], [4, 4, 6], 2, 16, seed=12)
    seg = SegmentRuns.from_lengths([4, 4, 3], [4, 4, 6])
    want = varlen_attention(q.double(), k.double(), v.double(), cq, ck, mq, mk, backend="reference")
    plan = AttentionPlan(cq, ck, mq, mk, segments=seg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [varlen_attention(q, k, v, cq, ck, mq, mk, backend=b) for b in (None, "torch", "reference", "cpp")]
        outs += [varlen_attention(q, k, v, cq, ck, mq, mk, segments=seg)] + [plan(q, k, v) for _ in range(3)]
        compiled = torch.compile(lambda q, k, v: varlen_attention(q, k, v, cq, ck, mq, mk, segments=seg),
                                 fullgraph=True, backend="aot_eager")
        outs.append(compiled(q, k, v))
    for i, out in enumerate(outs):
        assert out.dtype == torch.float32, i
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5, msg=f"call {i}")
    # a backward called under autocast too: the registered backward ops switch it off as the forward does (a
    # review; the torch backend's grouped op, which softcap takes, raised a dtype error in its backward). Not the
    # reference: its backward is autograd of plain ops, which follow the autocast a backward is called under, as
    # any PyTorch code's (docs/design.md)
    for softcap in (0.0, 5.0):
        qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
        want = torch.autograd.grad(varlen_attention(qd, kd, vd, cq, ck, mq, mk, backend="reference",
                                                    softcap=softcap).pow(2).sum(), (qd, kd, vd))
        for b in ("torch", "cpp", None):
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = varlen_attention(qg, kg, vg, cq, ck, mq, mk, backend=b, softcap=softcap).pow(2).sum()
                got = torch.autograd.grad(loss, (qg, kg, vg))
            for g, w in zip(got, want):
                assert g.dtype == torch.float32
                torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=f"{b}, softcap {softcap}")
