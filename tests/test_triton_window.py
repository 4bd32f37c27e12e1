"""The ``triton_window`` backend (``elit_kernels._triton.attention_window`` and ``attention_window_bwd``): ELIT's
Read/Write attention with every key segment in one tile of at most 128 keys. Values, gradients and LSE against the
reference on fresh random inputs, the contract's edge cases, what it refuses and why, and where dispatch ranks it.

Without CUDA the kernels run through ``TRITON_INTERPRET=1`` (set here and in conftest.py before triton is
imported) on small shapes; bf16 dots are upcast there (triton#11584), so bf16 tensor-core numerics are a GPU test.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from cases import CASES, LaunchSpy  # noqa: E402

from elit_kernels import varlen_attention  # noqa: E402
from elit_kernels.attention import SegmentRuns, get_backend, validate_inputs  # noqa: E402
from elit_kernels.testing import check_backend_against_reference, random_varlen_inputs  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
from elit_kernels._triton import _tiles, attention_window as W, attention_window_bwd as WB  # noqa: E402
from elit_kernels._triton import ops  # noqa: E402,F401  (registers torch.ops.elit.*)

HAS_CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (HAS_CUDA or INTERP), reason="needs CUDA or TRITON_INTERPRET=1")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (lens_q, lens_k) at interpreter size, from the shared case table (tests/cases.py, tag "window-kernel").
SEGMENTS = {name.removeprefix("win-"): c.lens for name, c in CASES.items() if "window-kernel" in c.tags}
# The poisoned outputs and heuristic tiles of conftest's fixture.
pytestmark = [pytestmark, pytest.mark.usefixtures("poisoned_outputs")]


def window_attn(q, k, v, cq, ck, mq, mk, scale, causal):
    return varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=scale, causal=causal, backend="triton_window")


def window_attn_lse(q, k, v, cq, ck, mq, mk, scale, causal):
    return varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=scale, causal=causal, backend="triton_window",
                            return_lse=True)


WINDOW_CASES = [("read", 72, "bf16"), ("read", 64, "fp16"), ("read", 72, "fp32"), ("write", 72, "fp16"),
         ("write", 64, "bf16"), ("write", 72, "fp32"), ("empty-and-single", 72, "fp16"),
         ("long-queries", 64, "fp32")]


@pytest.mark.parametrize("seg,head_dim,dtype", WINDOW_CASES, ids=[f"{s}-d{d}-{dt}" for s, d, dt in WINDOW_CASES])
def test_values_and_grads_match_reference(seg, head_dim, dtype):
    # Rows past cu_seqlens[-1] (NaN-filled: a kernel that reads them fails) must come out exact zeros in out,
    # dq, dk and dv; every output is NaN-poisoned before the kernels run (an unwritten row fails).
    lq, lk = SEGMENTS[seg]
    check_backend_against_reference(window_attn, lq, lk, 2, head_dim, DTYPES[dtype], seed=head_dim + len(seg),
                                     device=DEV, extra_q=3, extra_k=2)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gqa_and_lse(dtype):
    # 4 query heads over 2 kv heads: dk/dv sum over the 2 query heads that share each kv head.
    check_backend_against_reference(window_attn_lse, [4, 0, 5, 64], [64, 7, 0, 16], 4, 72, DTYPES[dtype],
                                    kv_heads=2, seed=7, device=DEV, check_lse=True, extra_q=2)


def test_custom_scale_and_ragged_head_blocks():
    # A scale that is not D**-0.5, and heads of 8 kv heads in programs of several heads each.
    lq, lk = [4, 1, 5], [64, 16, 33]
    assert W.heads_per_program(len(lq), 8, 4) == 1  # few segments: one head per program keeps programs many
    check_backend_against_reference(window_attn, lq, lk, 8, 64, torch.float32, scale=0.37, seed=9, device=DEV)


def test_several_heads_per_program(monkeypatch):
    # Force 4 kv heads per program (as 4096 windows x 16 heads get on a GPU): the flat (head, query block) loop.
    monkeypatch.setattr(W, "MIN_PROGRAMS", 1)
    assert W.heads_per_program(3, 4, 4) == 4 and W.heads_per_program(3, 6, 4) == 2
    check_backend_against_reference(window_attn, [4, 70, 1], [64, 5, 16], 8, 72, torch.float16, kv_heads=4,
                                    seed=10, device=DEV, extra_q=1, extra_k=3)


def test_dkdv_in_key_blocks(monkeypatch):
    # Above padded head dim 80 dK/dV walks a 128-key tile in 64-key blocks (sm_90 registers); here every head dim
    # walks 16-key blocks, so segments of 1..64 keys take 1..4 blocks, with rows past cu_seqlens_k[-1] after them.
    monkeypatch.setattr(_tiles, "WINDOW_DKDV_KEY_BLOCK", (0, 16))
    assert W.tile("dkdv", 4, 64, 72, 8, 2)["BLOCK_N"] == 16 and W.tile("dkdv", 4, 64, 72, 8, 2)["KEY_TILE"] == 64
    check_backend_against_reference(window_attn, [4, 1, 5, 3], [64, 1, 37, 16], 2, 72, torch.float16, seed=21,
                                    device=DEV, extra_q=2, extra_k=20)


def test_no_key_rows_are_exact_zeros_with_lse_inf():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 2], [0, 5], 2, 72, seed=11, device=DEV, requires_grad=True)
    out, lse = torch.ops.elit.window_attn_fwd_triton(q, k, v, cq, ck, mq, mk, 0.1)
    assert torch.equal(out[:3], torch.zeros_like(out[:3])) and (out[3:] != 0).all()
    assert torch.isposinf(lse[:, :3]).all() and torch.isfinite(lse[:, 3:]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(dq[:3], torch.zeros_like(dq[:3])) and (dq[3:] != 0).any()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_single_key_segments_have_exactly_zero_dq_and_dk(dtype):
    # softmax over one key is the constant 1: dq and dk are exact zeros (as the reference's autograd gives), not
    # the rounding left of dO.v - rowsum(dO * O); dv is dO summed over the segment's queries.
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([5, 3], [1, 6], 2, 72, dtype=DTYPES[dtype], seed=19, device=DEV,
                                                   requires_grad=True)
    out = window_attn(q, k, v, cq, ck, mq, mk, 0.3, False)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert torch.equal(dq[:5], torch.zeros_like(dq[:5])) and torch.equal(dk[:1], torch.zeros_like(dk[:1]))
    assert (dq[5:] != 0).any() and (dk[1:] != 0).any()
    torch.testing.assert_close(dv[0].float(), dout[:5].float().sum(0), rtol=2e-3, atol=2e-3)


def test_keys_without_queries_get_zero_grads():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([0, 4], [5, 3], 2, 64, seed=12, device=DEV, requires_grad=True)
    out = window_attn(q, k, v, cq, ck, mq, mk, 0.125, False)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(dk[:5], torch.zeros_like(dk[:5])) and torch.equal(dv[:5], torch.zeros_like(dv[:5]))
    assert (dk[5:] != 0).any() and (dv[5:] != 0).any()
    # no query rows at all: an empty output, and zero key gradients (written, not left as the NaN poison)
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([0, 0], [3, 2], 2, 64, seed=22, device=DEV, requires_grad=True)
    out = window_attn(q, k, v, cq, ck, mq, mk, 0.125, False)
    assert out.shape == (0, 2, 64)
    dk, dv = torch.autograd.grad(out.sum(), (k, v))
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


def test_understated_max_seqlen_k_gives_nan_not_a_truncated_softmax():
    # A max_seqlen_k below a real segment (possible only with the value checks off) sizes the key tile too small:
    # that segment's outputs and gradients are NaN, every key row included; the other segments are unaffected.
    q, k, v, cq, ck, _, _ = random_varlen_inputs([2, 3], [40, 5], 2, 64, seed=13, device=DEV, requires_grad=True)
    out, lse = torch.ops.elit.window_attn_fwd_triton(q, k, v, cq, ck, 3, 16, 0.125)
    assert out[:2].isnan().all() and lse[:, :2].isnan().all()
    assert torch.isfinite(out[2:]).all() and torch.isfinite(lse[:, 2:]).all()
    dq, dk, dv = torch.ops.elit.window_attn_bwd_triton(torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                                       out, lse, cq, ck, 3, 16, 0.125)
    assert dq[:2].isnan().all() and dk[:40].isnan().all() and dv[:40].isnan().all()
    assert torch.isfinite(dq[2:]).all() and torch.isfinite(dk[40:]).all() and torch.isfinite(dv[40:]).all()
    assert W.tile("dkdv", 3, 128, 128, 2, 2)["BLOCK_N"] == 64  # D=128: a 128-key tile in two 64-key blocks


def test_backward_is_deterministic():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([4, 17, 1], [64, 5, 33], 2, 72, dtype=torch.float16, seed=14,
                                                   device=DEV, requires_grad=True)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(15)).to(DEV, torch.float16)
    first, second = (torch.autograd.grad(window_attn(q, k, v, cq, ck, mq, mk, 0.12, False), (q, k, v), dout)
                     for _ in range(2))
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), name


def test_opcheck():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([0, 1, 5], [3, 0, 6], 2, 72, seed=16, device=DEV,
                                                   requires_grad=True)
    torch.library.opcheck(torch.ops.elit.window_attn_fwd_triton.default, (q, k, v, cq, ck, mq, mk, 0.125))
    out, lse = torch.ops.elit.window_attn_fwd_triton(q, k, v, cq, ck, mq, mk, 0.125)
    torch.library.opcheck(torch.ops.elit.window_attn_bwd_triton.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), cq,
                           ck, mq, mk, 0.125))


@pytest.mark.parametrize("setting,want", [("highest", "ieee"), ("high", "tf32")])
def test_fp32_dots_follow_torch_matmul_precision(monkeypatch, setting, want):
    # As the triton backend: fp32 dots run TF32 exactly when PyTorch lets its own fp32 matmuls (the interpreter
    # multiplies fp32 exactly either way, so the values still match the reference); 16-bit dots pass "tf32".
    seen = []
    for mod, name in ((W, "_window_attn_fwd_kernel"), (WB, "_window_attn_bwd_dq_kernel"),
                      (WB, "_window_attn_bwd_dkdv_kernel")):
        monkeypatch.setattr(mod, name, LaunchSpy(getattr(mod, name), name, seen))
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(setting)
        check_backend_against_reference(window_attn, [4, 1], [64, 9], 2, 64, torch.float32, seed=26, device=DEV)
        assert sorted(seen) == [("_window_attn_bwd_dkdv_kernel", want), ("_window_attn_bwd_dq_kernel", want),
                                ("_window_attn_fwd_kernel", want)]
        seen.clear()
        check_backend_against_reference(window_attn, [4], [9], 2, 64, torch.bfloat16, seed=27, device=DEV)
        assert {p for _, p in seen} == {"tf32"} and len(seen) == 3
    finally:
        if hasattr(torch.backends, "fp32_precision"):
            torch.backends.fp32_precision = "none"
            torch.backends.cuda.matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision(saved)


def test_compile_fullgraph_read_then_write():
    # Read (latents attend to their window's tokens) then Write (tokens attend to the updated latents) through
    # torch.compile(fullgraph=True): the custom ops' fakes and autograd, values and gradients as eager.
    lat_lens, sp_lens = [4, 1, 0, 3], [16, 16, 16, 16]
    g = torch.Generator().manual_seed(28)
    lat = torch.randn(sum(lat_lens), 2, 64, generator=g).to(DEV).requires_grad_()
    sp = torch.randn(sum(sp_lens), 2, 64, generator=g).to(DEV).requires_grad_()
    from elit_kernels.testing import cu_seqlens

    cu_lat, cu_sp = cu_seqlens(lat_lens, DEV), cu_seqlens(sp_lens, DEV)

    def read_write(lat, sp):
        lat = lat + varlen_attention(lat, sp, sp, cu_lat, cu_sp, 4, 16, backend="triton_window")
        return sp + varlen_attention(sp, lat, lat, cu_sp, cu_lat, 16, 4, backend="triton_window")

    def run(fn):
        out = fn(lat, sp)
        return (out, *torch.autograd.grad(out.square().sum(), (lat, sp)))

    torch._dynamo.reset()
    compiled, eager = run(torch.compile(read_write, fullgraph=True, backend="aot_eager")), run(read_write)
    for name, a, b in zip(("out", "d lat", "d sp"), compiled, eager):
        assert torch.equal(a, b), name


def _inp(lens_q, lens_k, *, dtype=torch.float32, causal=False, segments=False, max_k=None, **kw):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs(lens_q, lens_k, 2, 64, dtype=dtype, seed=17, device=DEV)
    seg = SegmentRuns.from_lengths(lens_q, lens_k) if segments else None
    # segments=False: lengths known only on the device (no host copy of them: max_seqlen_k bounds the tile)
    return validate_inputs(q, k, v, cq, ck, mq, mk if max_k is None else max_k, None, causal, segments=seg,
                           derive_segments=segments, **kw)


def test_reasons_name_the_limit_and_the_features():
    b = get_backend("triton_window")
    assert b.not_supported_reasons(_inp([4, 4], [128, 64])) == []
    why = b.not_supported_reasons(_inp([4, 4], [129, 64]))
    assert why == ["max_seqlen_k is 129: key segments of at most 128 keys (one tile) only"], why
    # With host-side segments the real longest segment decides, whatever bound max_seqlen_k gives.
    assert b.not_supported_reasons(_inp([4, 4], [64, 64], segments=True, max_k=512)) == []
    why = b.not_supported_reasons(_inp([4], [200], segments=True))
    assert why == ["the longest key segment is 200: key segments of at most 128 keys (one tile) only"], why
    assert any("no causal mask" in r for r in b.not_supported_reasons(_inp([4], [8], causal=True)))
    assert any("sliding-window" in r for r in b.not_supported_reasons(_inp([4], [8], window_size=(2, 2))))
    assert any("soft-capping" in r for r in b.not_supported_reasons(_inp([4], [8], softcap=5.0)))
    assert any("head dim 136" in r for r in b.not_supported_reasons(
        validate_inputs(*random_varlen_inputs([2], [3], 2, 136, seed=1), None, False)))
    # a direct call's value checks read the lengths: the real longest segment is named
    with pytest.raises(ValueError, match=r"backend 'triton_window' cannot run these inputs .*the longest key segment "
                                         r"is 129: key segments of at most 128 keys"):
        varlen_attention(*random_varlen_inputs([4], [129], 2, 64, seed=2, device=DEV), backend="triton_window")
    with pytest.raises(ValueError, match=r"max_seqlen_k: the window kernel holds a segment's keys in one tile of at "
                                         r"most 128 rows, got max_seqlen_k=200"):
        torch.ops.elit.window_attn_fwd_triton(*random_varlen_inputs([4], [100], 2, 64, seed=3, device=DEV)[:6], 200,
                                              0.1)


def test_segments_size_the_tile_not_the_bound():
    # The model passes segments: a slack max_seqlen_k (512) still runs, on a tile of the real 64 keys.
    lq, lk = [4, 1], [64, 16]
    q, k, v, cq, ck, mq, _ = random_varlen_inputs(lq, lk, 2, 64, seed=18, device=DEV)
    out = varlen_attention(q, k, v, cq, ck, 512, 512, backend="triton_window",
                           segments=SegmentRuns.from_lengths(lq, lk))
    ref = varlen_attention(q, k, v, cq, ck, mq, 64, backend="reference")
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)
    assert W.tile("fwd", 4, 64, 72, 4096, 16)["BLOCK_N"] == 64


def test_tiles_cover_the_read_and_write_shapes():
    # Every key tile 16..128 at every padded head dim up to 128 gets a table entry; the query tile is the query
    # bucket clamped into the entry's range: 16..64 rows, a power of two (dq at D=72 with 128 keys takes 64 rows
    # even for 4 queries: 16 and 32 spilled).
    for kernel in ("fwd", "dq", "dkdv"):
        for bn in (16, 32, 64, 128):
            for padded in (16, 48, 64, 80, 96, 128):
                for qb in (16, 32, 64, 1024):
                    bm, warps, stages = _tiles.window_tile(kernel, qb, bn, padded)
                    assert bm in (16, 32, 64) and warps in (4, 8) and stages >= 1, (kernel, bn, padded, qb)
                    assert bm <= qb or (kernel, bn, padded) == ("dq", 128, 80), (kernel, bn, padded, qb)
    with pytest.raises(ValueError, match="window_tile: no fwd tile for 256 keys"):
        _tiles.window_tile("fwd", 16, 256, 80)
    assert W.window_block_n(0) == 16 and W.window_block_n(37) == 64 and W.window_block_n(128) == 128
    # 4096 Read windows x 16 heads: 4 heads per forward program (16384 programs, not 65536).
    assert W.heads_per_program(4096, 16, _tiles.WINDOW_HEADS["fwd"]) == 4


# ---------------------------------------------------------------------------------------------
# GPU: ELIT-sized Read/Write in bf16 / fp16 on the tensor cores (gpu_check.sh runs the test_gpu_ ones).
# ---------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (real ELIT sizes, bf16 tensor-core numerics)")
# ELIT-sized shapes from the shared case table (tag "window-kernel-gpu").
GPU_SEGMENTS = {name.removeprefix("win-"): c.lens for name, c in CASES.items() if "window-kernel-gpu" in c.tags}
GPU_CASES = [("read-512px", "bf16", 72), ("read-512px", "fp16", 64), ("write-512px", "bf16", 72),
             ("read-128-keys", "bf16", 72), ("read-128-keys", "bf16", 128)]


@needs_gpu
@pytest.mark.parametrize("seg,dtype,head_dim", GPU_CASES, ids=[f"{s}-{dt}-d{d}" for s, dt, d in GPU_CASES])
def test_gpu_values_and_grads(seg, dtype, head_dim):
    lq, lk = GPU_SEGMENTS[seg]
    check_backend_against_reference(window_attn, lq, lk, 4, head_dim, DTYPES[dtype], seed=20, device="cuda",
                                    extra_q=5, extra_k=3)


@needs_gpu
def test_gpu_op_bench_times_it_next_to_the_libraries():
    # bench_ops (gpu_check.sh's op bench) lists it among the methods; on a core shape (> 128 keys) it cannot run,
    # and the row's error says why.
    from elit_kernels.bench.attention_cases import OpShape, available_methods, make_fn

    methods = {m.name: m for m in available_methods(torch.device("cuda"), torch.bfloat16, 72, 16)}
    assert "elit:triton_window" in methods and "elit:torch_varlen" in methods
    read = OpShape("read J=4", "read", [4] * 64, [64] * 64, 16, 72)
    fn, _ = make_fn(methods["elit:triton_window"], read, "cuda", torch.bfloat16, backward=True)
    fn()
    core = OpShape("core", "core", [1024] * 2, [1024] * 2, 16, 72)
    with pytest.raises(ValueError, match="key segments of at most 128 keys"):
        make_fn(methods["elit:triton_window"], core, "cuda", torch.bfloat16, backward=False)[0]()
