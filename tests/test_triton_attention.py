"""The ``triton`` backend of varlen_attention: values, gradients, LSE, determinism, custom-op
registration, torch.compile, and the ELIT model, against the pure-PyTorch reference.

Without CUDA the kernels run through ``TRITON_INTERPRET=1`` (set here and in conftest.py before
triton is imported) on tiny shapes; the ``gpu``-named tests need CUDA and cover real ELIT sizes.
"""
import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from cases import CASES, LaunchSpy, cases  # noqa: E402

from elit_kernels import varlen_attention  # noqa: E402
from elit_kernels.attention import AttnInputs, get_backend  # noqa: E402
from elit_kernels.reference.attention import varlen_attention_reference  # noqa: E402
from elit_kernels.testing import check_backend_against_reference, cu_seqlens, random_varlen_inputs  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton, or the full install: pip install -r requirements.txt)")
from elit_kernels._triton import _common, attention_bwd, attention_fwd  # noqa: E402
from elit_kernels._triton import ops  # noqa: E402,F401  (registers torch.ops.elit.*)

HAS_CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if HAS_CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (real ELIT sizes, bf16 tensor-core numerics)")
needs_runtime = pytest.mark.skipif(not (HAS_CUDA or INTERP), reason="needs CUDA or TRITON_INTERPRET=1")
#: every kernel output NaN-filled before launch, heuristic tiles (conftest's poisoned_outputs);
#: test_gpu_autotuned_tiles covers the autotuned path
pytestmark = [needs_runtime, pytest.mark.usefixtures("poisoned_outputs")]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def triton_attn(q, k, v, cq, ck, mq, mk, scale, causal):
    return varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=scale, causal=causal, backend="triton")


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("head_dim", [64, 72])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", cases("interpreter"))
def test_values_and_grads_match_reference(case, causal, head_dim, dtype):
    # bf16 on the interpreter runs with dot operands upcast to fp32 (triton#11584); real bf16
    # tensor-core numerics are covered by test_gpu_* below.
    lq, lk = case.lens
    check_backend_against_reference(triton_attn, lq, lk, 2, head_dim, DTYPES[dtype], causal=causal,
                                    seed=head_dim + 3 * causal, device=DEV)


@pytest.mark.parametrize("head_dim", [40, 96])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_two_head_blocks_match_reference(head_dim, causal):
    # 40 = 32 + 16 (masked past 40) and 96 = 64 + 32 (unmasked tail): the (main, tail) column blocks of
    # every kernel, forward and backward, beside D=72 (64 + 16) above.
    assert _common.head_blocks(head_dim) == {40: (32, 16), 96: (64, 32)}[head_dim]
    check_backend_against_reference(triton_attn, [1, 17], [5, 17], 2, head_dim, torch.float16, causal=causal,
                                    seed=head_dim + causal, device=DEV)


def test_head_blocks():
    # Power-of-two blocks >= 16 (tl.dot's K), two only when narrower than the next power of two.
    want = {8: (16, 0), 16: (16, 0), 24: (32, 0), 40: (32, 16), 64: (64, 0), 72: (64, 16), 80: (64, 16),
            96: (64, 32), 112: (128, 0), 128: (128, 0), 136: (128, 16), 200: (256, 0), 256: (256, 0)}
    for d, blocks in want.items():
        assert _common.head_blocks(d) == blocks, d
        assert _common.padded_head_dim(d) == sum(blocks)
    assert _common.padded_head_dim(72) == 80  # the XL/2 head: 80 columns of tensor-core work, not 128


def test_tile_tables_heuristic_is_a_candidate():
    # Whatever the buckets and head dim, the heuristic tile is one the autotuner could also pick (so the sm_90
    # report, which compiles every candidate, covers it), and no tile runs past the head dim it is marked for.
    from elit_kernels._triton import _tiles
    buckets = [2 ** i for i in range(4, 14)]
    for kernel in _tiles.KERNELS:
        for padded in (16, 64, 80, 128, 256):
            for qb in buckets:
                for kb in buckets:
                    h = _tiles.heuristic(kernel, qb, kb, padded)
                    cands = _tiles.candidates(kernel, qb, kb, padded)
                    assert h in _tiles.TILES[kernel] and h[4] >= padded, (kernel, qb, kb, padded, h)
                    assert h in cands and all(t[4] >= padded for t in cands), (kernel, qb, kb, padded)
    # Long core segments get 128 owned rows, 1-16 token Read segments 16.
    assert _tiles.heuristic("fwd", 4096, 4096, 80)[:2] == (128, 64)
    assert _tiles.heuristic("dkdv", 4096, 4096, 80)[:2] == (16, 128)
    assert _tiles.heuristic("fwd", 16, 64, 80)[:2] == (16, 32)


def test_autotuners_cache_their_choice_on_disk(monkeypatch):
    # Every tuned kernel's autotuner times its table's tiles (pruned per call) and, where the installed Triton can,
    # keeps the winner on disk, so a new process does not time every candidate again. Under the interpreter
    # Triton turns the disk cache off itself, so the arguments _tiles passes are what is checked here.
    import inspect

    import triton

    from elit_kernels._triton import _tiles
    seen = {}
    monkeypatch.setattr(triton, "autotune", lambda **kw: seen.update(kw) or (lambda fn: fn))
    for kernel in _tiles.KERNELS:
        seen.clear()
        assert _tiles.autotuned(kernel, ["max_q_bucket"])("kernel") == "kernel"
        assert [_tiles.as_tile(c) for c in seen["configs"]] == list(_tiles.TILES[kernel]), kernel
        assert seen["key"] == ["max_q_bucket"]
        cfgs = seen["configs"]
        pruned = seen["prune_configs_by"]["early_config_prune"](
            cfgs, {"max_q_bucket": 4096, "max_k_bucket": 4096, "BLOCK_D": 64, "BLOCK_DT": 16})
        assert {_tiles.as_tile(c) for c in pruned} == set(_tiles.candidates(kernel, 4096, 4096, 80)), kernel
    monkeypatch.undo()
    assert _tiles.AUTOTUNE_CACHES == ("cache_results" in inspect.signature(triton.autotune).parameters)
    if _tiles.AUTOTUNE_CACHES:
        assert seen.get("cache_results") is True
    else:
        print(f"triton {triton.__version__} has no autotune(cache_results=...): choices are timed once per process")
        assert "cache_results" not in seen
    # the three launchers' autotuners are built this way, each over its own table
    for kernel, tuned in (("fwd", attention_fwd._varlen_attn_fwd_kernel_tuned),
                          ("dq", attention_bwd._varlen_attn_bwd_dq_kernel_tuned),
                          ("dkdv", attention_bwd._varlen_attn_bwd_dkdv_kernel_tuned)):
        assert [_tiles.as_tile(c) for c in tuned.configs] == list(_tiles.TILES[kernel]), kernel
        assert list(tuned.keys) == ["max_q_bucket", "max_k_bucket", "HEAD_DIM", "CAUSAL", "DOT_PREC"], kernel


def test_row_align_needs_every_stride():
    # ALIGN promises Triton 16-byte aligned row offsets: 8 elements for 16-bit types, 4 for fp32, and 1
    # (no promise) as soon as one row or head stride of one tensor breaks it.
    base = torch.empty(10, 3, 2, 72, dtype=torch.bfloat16)
    q, k = base[:, 0], base[:, 1]
    assert _common.row_align(q, k) == 8
    assert _common.row_align(torch.empty(5, 2, 72)) == 4
    odd = torch.empty(10, 2, 76, dtype=torch.bfloat16)[..., :72]  # head stride 76: rows on 8-byte boundaries
    assert _common.row_align(q, odd) == 1
    assert _common.kernel_meta(72, torch.bfloat16, False, q, odd)["ALIGN"] == 1


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_unaligned_strides_match_contiguous(dtype):
    # Head stride 74, row stride 2*74: ALIGN falls back to 1 (no alignment promise). Values and gradients
    # equal the same inputs made contiguous bit for bit (which the reference tests cover).
    g = torch.Generator().manual_seed(31)
    lq, lk = [5, 17], [9, 3]
    dt = DTYPES[dtype]
    q = torch.randn(sum(lq), 2, 74, generator=g).to(DEV, dt)[..., :72].requires_grad_()
    kv = torch.randn(sum(lk), 2, 2, 74, generator=g).to(DEV, dt)[..., :72].requires_grad_()
    k, v = kv.unbind(1)
    assert _common.row_align(q, k, v) == 1
    cq, ck = cu_seqlens(lq, DEV), cu_seqlens(lk, DEV)
    dout = torch.randn(sum(lq), 2, 72, generator=g).to(DEV, dt)
    out = triton_attn(q, k, v, cq, ck, 17, 9, 0.125, True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    assert _common.row_align(qc, kc, vc) == 16 // qc.element_size()
    out_c = triton_attn(qc, kc, vc, cq, ck, 17, 9, 0.125, True)
    grads_c = torch.autograd.grad(out_c, (qc, kc, vc), dout)
    assert torch.equal(out, out_c)
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_c):
        assert torch.equal(a, b), name


def test_custom_softmax_scale():
    check_backend_against_reference(triton_attn, [5, 17], [9, 2], 2, 64, torch.float32, scale=0.37, seed=5, device=DEV)


def test_no_visible_key_gives_exact_zeros_and_zero_grads():
    # Segment 0: 3 queries, no keys. Segment 1 causal with Lq=6 > Lk=2: rows 0..3 see nothing.
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 6], [0, 2], 2, 72, seed=9, device=DEV, requires_grad=True)
    out, lse = torch.ops.elit.varlen_attn_fwd_triton(q, k, v, cq, ck, mq, mk, 0.1, True)
    blind = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool, device=DEV)
    assert torch.equal(out[blind], torch.zeros_like(out[blind]))
    assert torch.isfinite(out).all()
    assert torch.isinf(lse[:, blind]).all() and (lse[:, blind] > 0).all()
    assert torch.isfinite(lse[:, ~blind]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(dq[blind], torch.zeros_like(dq[blind]))
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_keys_without_queries_get_zero_grads():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([0, 4], [5, 3], 2, 64, seed=10, device=DEV, requires_grad=True)
    out = triton_attn(q, k, v, cq, ck, mq, mk, 0.125, False)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(dk[:5], torch.zeros_like(dk[:5])) and torch.equal(dv[:5], torch.zeros_like(dv[:5]))
    assert (dk[5:] != 0).any() and (dv[5:] != 0).any()


def test_no_queries_at_all():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([0, 0], [3, 2], 2, 64, seed=11, device=DEV, requires_grad=True)
    out = triton_attn(q, k, v, cq, ck, mq, mk, 0.125, False)
    assert out.shape == (0, 2, 64)
    (gk,) = torch.autograd.grad(out.sum(), (k,))
    assert torch.equal(gk, torch.zeros_like(gk))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lse_matches_logsumexp(causal):
    lq, lk = [1, 17, 4], [5, 3, 0]
    q, k, v, cq, ck, mq, mk = random_varlen_inputs(lq, lk, 2, 64, seed=12, device=DEV)
    _, lse = torch.ops.elit.varlen_attn_fwd_triton(q, k, v, cq, ck, mq, mk, 0.2, causal)
    qs, ks = 0, 0
    for a, b in zip(lq, lk):
        s = torch.einsum("qhd,khd->hqk", q[qs:qs + a].double(), k[ks:ks + b].double()) * 0.2
        if causal:
            i = torch.arange(a, device=DEV)[:, None]
            j = torch.arange(b, device=DEV)[None, :]
            s = s.masked_fill(~(j <= i + b - a), float("-inf"))
        want = torch.logsumexp(s, -1) if b else torch.full((2, a), float("-inf"), dtype=torch.float64, device=DEV)
        want = torch.where(torch.isinf(want), torch.full_like(want, float("inf")), want)  # ours: +inf when blind
        torch.testing.assert_close(lse[:, qs:qs + a].double(), want, rtol=0, atol=1e-5)
        qs, ks = qs + a, ks + b


def test_strided_inputs_from_fused_projection():
    # The model splits q/k/v out of one projection: rows are strided, not contiguous.
    g = torch.Generator().manual_seed(13)
    lq, lk = [5, 17], [9, 3]
    qkv = torch.randn(sum(lq), 3, 2, 64, generator=g).to(DEV)
    kv = torch.randn(sum(lk), 2, 2, 64, generator=g).to(DEV)
    q, (k, v) = qkv[:, 0], kv.unbind(1)
    assert not q.is_contiguous() and not k.is_contiguous()
    cq, ck = cu_seqlens(lq, DEV), cu_seqlens(lk, DEV)
    out = triton_attn(q, k, v, cq, ck, 17, 9, 0.125, True)
    ref = varlen_attention_reference(q, k, v, cq, ck, softmax_scale=0.125, causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_is_deterministic(causal):
    # No atomics anywhere: dK/dV are owned by one program per key block and dQ by one per query
    # block, so a rerun must reproduce every bit. Under the CPU interpreter programs run one after another,
    # so this cannot fail there; the real check is test_gpu_backward_deterministic_long_core on a GPU.
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([1, 17, 5], [17, 5, 33], 2, 72, dtype=torch.float16, seed=14,
                                                   device=DEV, requires_grad=True)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(15)).to(DEV, torch.float16)

    def grads():
        out = triton_attn(q, k, v, cq, ck, mq, mk, 72 ** -0.5, causal)
        return torch.autograd.grad(out, (q, k, v), dout)

    first, second = grads(), grads()
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical backward runs"


def test_opcheck_forward_and_backward():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([0, 1, 5], [3, 0, 6], 2, 72, seed=16, device=DEV,
                                                   requires_grad=True)
    torch.library.opcheck(torch.ops.elit.varlen_attn_fwd_triton.default, (q, k, v, cq, ck, mq, mk, 0.125, True))
    out, lse = torch.ops.elit.varlen_attn_fwd_triton(q, k, v, cq, ck, mq, mk, 0.125, True)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.elit.varlen_attn_bwd_triton.default,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), cq, ck, mq, mk,
                           0.125, True))


def test_backend_registration_and_reasons():
    b = get_backend("triton")
    assert b.priority == 30 and b.is_available()
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([2], [3], 2, 64, dtype=torch.float64, seed=17)
    reasons = b.not_supported_reasons(AttnInputs(q, k, v, cq, ck, mq, mk, 0.1, False))
    assert any("dtype" in r for r in reasons)
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([2], [3], 2, 264, seed=17)
    reasons = b.not_supported_reasons(AttnInputs(q, k, v, cq, ck, mq, mk, 0.1, False))
    assert any("head dim" in r for r in reasons)
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([2], [3], 2, 64, dtype=torch.float16, seed=17, device=DEV)
    assert b.not_supported_reasons(AttnInputs(q, k, v, cq, ck, mq, mk, 0.1, False)) == []
    # fp64 falls through to a backend that supports it instead of erroring.
    q64, k64, v64 = (t.double() for t in (q, k, v))
    assert varlen_attention(q64, k64, v64, cq, ck, mq, mk).dtype == torch.float64


@needs_runtime
def test_bf16_values_and_grads_where_the_interpreter_mis_multiplies():
    # Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton#11584); the kernels upcast the dot
    # operands there. Without the upcast this bf16 case is wrong by orders of magnitude, so it checks the
    # behaviour (not the flag). On a GPU it is one more bf16 tensor-core check.
    check_backend_against_reference(triton_attn, [5, 17, 1], [9, 17, 4], 2, 32, torch.bfloat16, seed=41, device=DEV)


def _read_core_write_inputs(budgets, groups, tokens_per_group, heads, head_dim, dtype, device, seed):
    """Packed latents/spatial tokens and the Read/core/Write cu_seqlens of an ELIT layout."""
    g = torch.Generator().manual_seed(seed)
    lat_lens = [j for j in budgets for _ in range(groups)]
    sp_lens = [tokens_per_group] * (len(budgets) * groups)
    core_lens = [j * groups for j in budgets]
    lat = torch.randn(sum(lat_lens), heads, head_dim, generator=g).to(device, dtype).requires_grad_()
    sp = torch.randn(sum(sp_lens), heads, head_dim, generator=g).to(device, dtype).requires_grad_()
    cu = {n: cu_seqlens(ls, device) for n, ls in (("lat", lat_lens), ("sp", sp_lens), ("core", core_lens))}
    maxes = (max(budgets), tokens_per_group, max(core_lens))
    return lat, sp, cu, maxes


def _read_core_write(lat, sp, cu_lat, cu_sp, cu_core, max_lat: int, max_sp: int, max_core: int, backend="triton"):
    lat = lat + varlen_attention(lat, sp, sp, cu_lat, cu_sp, max_lat, max_sp, backend=backend)  # Read
    lat = lat + varlen_attention(lat, lat, lat, cu_core, cu_core, max_core, max_core, backend=backend)  # core
    return sp + varlen_attention(sp, lat, lat, cu_sp, cu_lat, max_sp, max_lat, backend=backend)  # Write


def _compile_and_eager(budgets, groups, tpg, heads, head_dim, dtype, device, backend):
    """``(compiled, eager, truth)``: ``(out, d lat, d sp)`` of Read -> core -> Write (loss ``sum(out^2)``) compiled
    with ``backend``, run eagerly, and run by the fp64 reference on the same (rounded) inputs."""
    lat, sp, cu, (ml, ms, mc) = _read_core_write_inputs(budgets, groups, tpg, heads, head_dim, dtype, device, 18)
    args = (cu["lat"], cu["sp"], cu["core"], ml, ms, mc)

    def run(fn, lat, sp, **kw):
        out = fn(lat, sp, *args, **kw)
        return (out, *torch.autograd.grad(out.double().square().sum(), (lat, sp)))

    torch._dynamo.reset()
    compiled = run(torch.compile(_read_core_write, fullgraph=True, backend=backend), lat, sp)
    eager = run(_read_core_write, lat, sp)
    truth = run(_read_core_write, *(t.detach().double().requires_grad_() for t in (lat, sp)), backend="reference")
    return compiled, eager, truth


@contextlib.contextmanager
def _inductor_emulating_casts(enabled: bool):
    if enabled and not hasattr(torch._inductor.config, "emulate_precision_casts"):
        pytest.skip(f"torch {torch.__version__}: inductor has no emulate_precision_casts")
    with torch._inductor.config.patch(emulate_precision_casts=enabled) if enabled else contextlib.nullcontext():
        yield


def _compile_check(budgets, groups, tpg, heads, head_dim, dtype, device, backend, emulate_casts=False):
    """Compiled Read -> core -> Write equals eager bit for bit. The kernels are the same custom ops on the same
    inputs, so only the glue (residual adds, the loss, autograd's sums of a tensor's gradients) can differ:
    aot_eager runs it as eager does; inductor fuses it and keeps 16-bit intermediates in fp32 unless
    ``emulate_casts`` (inductor's ``emulate_precision_casts``) rounds them as eager does. An output element a
    kernel leaves unwritten (NaN-poisoned here, or garbage in a buffer inductor reuses) breaks equality; the
    fakes' layouts are checked by opcheck (test_opcheck_strided_inputs_like_the_model)."""
    with _inductor_emulating_casts(emulate_casts):
        compiled, eager, _ = _compile_and_eager(budgets, groups, tpg, heads, head_dim, dtype, device, backend)
    for name, a, b in zip(("out", "d lat", "d sp"), compiled, eager):
        assert torch.equal(a, b), f"{name}: compiled and eager differ in {(a != b).sum().item()} of {a.numel()}"


def _compile_close_to_truth(budgets, groups, tpg, heads, head_dim, dtype, device):
    """Inductor as configured by default: its fused glue rounds a 16-bit gradient sum once where eager rounds
    after every add, and the attention backward amplifies those last-bit differences where it cancels
    (``dO . v - rowsum(dO * O)``, a peaked softmax), so compiled and eager bf16 gradients differ by more than any
    elementwise tolerance between them would allow (about 1 % of the latent gradient off by up to 2.0, relative
    difference inf on exact zeros) while being equally close to the truth. So the compiled run must be as close
    to the fp64 reference as the eager run: in relative norm (drift) and in its worst element (a wrong row)."""
    compiled, eager, truth = _compile_and_eager(budgets, groups, tpg, heads, head_dim, dtype, device, "inductor")
    for name, c, e, t in zip(("out", "d lat", "d sp"), compiled, eager, truth):
        assert torch.isfinite(c).all(), name
        c, e = c.double(), e.double()
        rel_c, rel_e = ((c - t).norm() / t.norm()).item(), ((e - t).norm() / t.norm()).item()
        worst_c, worst_e = (c - t).abs().max().item(), (e - t).abs().max().item()
        assert rel_c <= 1.25 * rel_e + 1e-6, f"{name}: relative error {rel_c:.3e} compiled, {rel_e:.3e} eager"
        assert worst_c <= 1.5 * worst_e + 1e-6, f"{name}: worst error {worst_c:.3e} compiled, {worst_e:.3e} eager"


def test_compile_fullgraph_read_core_write():
    # aot_eager traces through dynamo + AOTAutograd (fake tensors, the registered autograd) without
    # spending a minute compiling C++ for the CPU; the GPU test below uses inductor.
    _compile_check([3, 1, 0], 2, 5, 2, 64, torch.float32, DEV, "aot_eager")


# The budgets of the GPU test below at interpreter size. In bf16 a plain compiled-vs-eager tolerance fails here
# too (0.8 % of the latent gradient off by up to 2.0, relative difference inf), by rounding alone: with
# emulate_precision_casts inductor matches eager bit for bit.
INDUCTOR_CPU_CASE = ([16, 9, 1, 4], 4, 16, 2, 64, torch.bfloat16)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU runs test_gpu_compile_inductor_read_core_write instead")
@pytest.mark.parametrize("check", ["emulated-casts-bitwise", "default-vs-fp64"])
def test_compile_inductor_read_core_write_cpu(check):
    # Inductor on the CPU (C++ glue) around the interpreted kernels: the same op registrations, fakes and
    # autograd as on a GPU.
    if check == "emulated-casts-bitwise":
        _compile_check(*INDUCTOR_CPU_CASE, "cpu", "inductor", emulate_casts=True)
    else:
        _compile_close_to_truth(*INDUCTOR_CPU_CASE, "cpu")


def test_opcheck_strided_inputs_like_the_model():
    # The model hands the ops views: q out of a wider projection, k and v unbound from one kv projection, and
    # autograd a dout that need not be contiguous. opcheck compares the fakes' shapes and strides with the real
    # outputs' (torch.compile plans its buffers from the fakes) and checks that no input is mutated or aliased.
    g = torch.Generator().manual_seed(25)
    lq, lk = [0, 5, 17], [3, 9, 0]
    q = torch.randn(sum(lq), 3, 2, 64, generator=g).to(DEV)[:, 0]
    k, v = torch.randn(sum(lk), 2, 2, 64, generator=g).to(DEV).unbind(1)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    cq, ck = cu_seqlens(lq, DEV), cu_seqlens(lk, DEV)
    fwd_args = (q, k, v, cq, ck, 17, 9, 0.125, True)
    torch.library.opcheck(torch.ops.elit.varlen_attn_fwd_triton.default, fwd_args)
    out, lse = torch.ops.elit.varlen_attn_fwd_triton(*fwd_args)
    dout = torch.randn(sum(lq), 2, 80, generator=g).to(DEV)[..., :64]
    assert not dout.is_contiguous()
    torch.library.opcheck(torch.ops.elit.varlen_attn_bwd_triton.default,
                          (dout, q, k, v, out, lse, cq, ck, 17, 9, 0.125, True))


@contextlib.contextmanager
def _float32_matmul_setting():
    """Restore PyTorch's float32 matmul setting afterwards, through the legacy API, with the torch >= 2.9 settings
    reset to "none": once both APIs were used, reading the legacy one raises (and torch.compile's guards read it)."""
    saved = torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        if hasattr(torch.backends, "fp32_precision"):
            torch.backends.fp32_precision = "none"
            torch.backends.cuda.matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision(saved)
        assert torch.get_float32_matmul_precision() == saved
        assert torch.backends.cuda.matmul.allow_tf32 == (saved != "highest")


def _set_fp32_matmul(how: str, value):
    if how == "precision":
        torch.set_float32_matmul_precision(value)
    elif how == "allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = value
    elif how == "cuda.matmul.fp32_precision":
        torch.backends.cuda.matmul.fp32_precision = value
    else:  # the generic setting, which applies where the CUDA matmul one is "none" (inherit)
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.backends.fp32_precision = value


FP32_SETTINGS = [("precision", "highest", "ieee"), ("precision", "high", "tf32"), ("precision", "medium", "tf32"),
                 ("allow_tf32", True, "tf32"), ("allow_tf32", False, "ieee"),
                 ("cuda.matmul.fp32_precision", "tf32", "tf32"), ("cuda.matmul.fp32_precision", "ieee", "ieee"),
                 ("fp32_precision", "tf32", "tf32")]


@pytest.mark.parametrize("how,value,want", FP32_SETTINGS, ids=[f"{h}={v}" for h, v, _ in FP32_SETTINGS])
def test_dot_precision_follows_torch_float32_matmul_setting(how, value, want):
    # fp32 dots run as TF32 exactly when PyTorch lets its own fp32 matmuls use TF32 (cuBLAS, SDPA); 16-bit
    # dots do not depend on it. PyTorch's default is IEEE fp32.
    if how.endswith("fp32_precision") and not hasattr(torch.backends, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no {how} setting (added in torch 2.9)")
    with _float32_matmul_setting():
        assert _common.dot_precision(torch.float32) == "ieee"
        _set_fp32_matmul(how, value)
        assert _common.fp32_matmul_precision() == want
        assert _common.dot_precision(torch.float32) == want
        assert _common.dot_flags(torch.float32)["DOT_PREC"] == want
        for dt in (torch.float16, torch.bfloat16):
            assert _common.dot_precision(dt) == "tf32"


@pytest.mark.parametrize("setting,want", [("highest", "ieee"), ("high", "tf32")])
def test_launchers_pass_the_fp32_dot_precision(monkeypatch, setting, want):
    # What the launchers hand every kernel as DOT_PREC, read at the call (the interpreter multiplies fp32
    # exactly either way, so the values still match the reference).
    seen = []
    for mod, name in ((attention_fwd, "_varlen_attn_fwd_kernel"), (attention_bwd, "_varlen_attn_bwd_dkdv_kernel"),
                      (attention_bwd, "_varlen_attn_bwd_dq_kernel")):
        monkeypatch.setattr(mod, name, LaunchSpy(getattr(mod, name), name, seen))
    with _float32_matmul_setting():
        torch.set_float32_matmul_precision(setting)
        check_backend_against_reference(triton_attn, [5, 17], [9, 3], 2, 64, torch.float32, seed=26, device=DEV)
        assert sorted(seen) == [("_varlen_attn_bwd_dkdv_kernel", want), ("_varlen_attn_bwd_dq_kernel", want),
                                ("_varlen_attn_fwd_kernel", want)]
        seen.clear()
        check_backend_against_reference(triton_attn, [5], [9], 2, 64, torch.bfloat16, seed=27, device=DEV)
        assert {p for _, p in seen} == {"tf32"} and len(seen) == 3


def test_elit_model_triton_matches_reference():
    models = pytest.importorskip("elit_kernels.models")
    cfg = models.elit_config("tiny", 64)
    torch.manual_seed(19)
    m_tri = models.ElitDiT(cfg, backend="triton").to(DEV)
    # The model zero-initialises its output layers; random weights make every attention matter.
    with torch.no_grad():
        for p in m_tri.parameters():
            p.normal_(0.0, 0.2)
    m_ref = models.ElitDiT(cfg, backend="reference").to(DEV)
    m_ref.load_state_dict(m_tri.state_dict())
    x = torch.randn(2, cfg.in_channels, 8, 8, device=DEV)
    t, y = torch.rand(2, device=DEV), torch.tensor([1, 2], device=DEV)
    outs, grads = [], []
    for m in (m_tri, m_ref):
        o = m(x, t, y, budgets=[4, 1])
        o.square().sum().backward()
        outs.append(o)
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-3, atol=1e-3, msg=lambda s: f"{n}: {s}")


# ---------------------------------------------------------------------------------------------
# GPU: real ELIT sizes, tensor-core bf16/fp16, autotuned tiles.
# ---------------------------------------------------------------------------------------------

# An explicit list rather than a full product: every (dtype, head dim, causal, tile) is a fresh
# compile of three kernels, and the GPU machine is lent for minutes.
GPU_CASES = [
    (seg, dt, d, causal)
    for seg in ("read-512px", "write-256px")  # names in the shared case table (tests/cases.py), tag "gpu"
    for (dt, d, causal) in (("bf16", 64, False), ("bf16", 72, False), ("bf16", 128, False), ("fp16", 72, False))
] + [
    ("core-4096", "bf16", 72, False), ("core-4096", "bf16", 72, True), ("core-4096", "bf16", 128, False),
    ("core-4096", "fp16", 64, False), ("empty-and-odd-97", "bf16", 72, True), ("empty-and-odd-97", "bf16", 64, False),
    ("empty-and-odd-97", "fp16", 128, True), ("empty-and-odd-97", "bf16", 128, True),
]
assert all("gpu" in CASES[seg].tags for seg, *_ in GPU_CASES)


@needs_gpu
@pytest.mark.parametrize("seg,dtype,head_dim,causal", GPU_CASES,
                         ids=[f"{s}-{dt}-d{d}-{'causal' if c else 'full'}" for s, dt, d, c in GPU_CASES])
def test_gpu_values_and_grads(seg, dtype, head_dim, causal):
    lq, lk = CASES[seg].lens
    check_backend_against_reference(triton_attn, lq, lk, 4, head_dim, DTYPES[dtype], causal=causal, seed=20,
                                    device="cuda")


@needs_gpu
@pytest.mark.parametrize("seg", ["read-512px", "core-4096"])
def test_gpu_autotuned_tiles(seg):
    _common.set_autotune(True)
    lq, lk = CASES[seg].lens
    check_backend_against_reference(triton_attn, lq, lk, 4, 72, torch.bfloat16, seed=24, device="cuda")


@needs_gpu
@pytest.mark.parametrize("head_dim", [8, 40, 256])
def test_gpu_unusual_head_dims_fp32(head_dim):
    check_backend_against_reference(triton_attn, [1, 63, 97], [97, 0, 130], 2, head_dim, torch.float32,
                                    causal=True, seed=21, device="cuda")


@needs_gpu
def test_gpu_backward_deterministic_long_core():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([4096, 777], [4096, 777], 16, 72, dtype=torch.bfloat16,
                                                   seed=22, device="cuda", requires_grad=True)
    dout = torch.randn_like(q)
    runs = [torch.autograd.grad(triton_attn(q, k, v, cq, ck, mq, mk, 72 ** -0.5, False), (q, k, v), dout)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("check", ["emulated-casts-bitwise", "default-vs-fp64"])
def test_gpu_compile_inductor_read_core_write(check):
    case = ([16, 9, 1, 4], 16, 16, 6, 64, torch.bfloat16)
    if check == "emulated-casts-bitwise":
        _compile_check(*case, "cuda", "inductor", emulate_casts=True)
    else:
        _compile_close_to_truth(*case, "cuda")


@needs_gpu
def test_gpu_fp32_runs_tf32_when_torch_allows_it():
    # Under "high" the fp32 dots run on TF32 tensor cores: the output changes (10-bit mantissa products) but stays
    # as close to the fp64 truth as TF32 allows; under "highest" it is exact fp32.
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([1, 63, 97], [97, 5, 130], 4, 64, seed=28, device="cuda")
    ref = varlen_attention_reference(q.double(), k.double(), v.double(), cq, ck, softmax_scale=0.125)
    outs = {}
    with _float32_matmul_setting():
        for setting in ("highest", "high"):
            torch.set_float32_matmul_precision(setting)
            outs[setting] = torch.ops.elit.varlen_attn_fwd_triton(q, k, v, cq, ck, mq, mk, 0.125, False)[0]
    err = {s: ((o.double() - ref).norm() / ref.norm()).item() for s, o in outs.items()}
    assert err["highest"] < 1e-5, err
    assert 1e-5 < err["high"] < 5e-3, err


@needs_gpu
def test_gpu_opcheck():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([0, 1, 63, 97], [5, 0, 97, 64], 4, 72, dtype=torch.bfloat16,
                                                   seed=23, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.elit.varlen_attn_fwd_triton.default, (q, k, v, cq, ck, mq, mk, 0.1, False))
