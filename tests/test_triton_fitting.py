"""A Triton tile the GPU cannot hold falls back to a smaller one instead of failing the call.

The tile tables were compiled spill-free for sm_90 in 16-bit types. Float32 doubles a tile's shared memory: the
static sm_90 report (``tools/triton_sm90_report.py --dtypes fp32``, Triton 3.6 and 3.8) found window dQ tiles
needing 246 KB (D=72, 64 queries x 128 keys) and 262 KB (D=128, 64 x 64) of an H100's 227 KB, and GPUs with less
shared memory per block (A100: 163 KB, consumer Ampere / Ada: 99 KB) cannot hold more of them, bf16 included.
Triton raises ``OutOfResources`` when it loads such a kernel, before anything runs; every launcher now tries the
next smaller tile (``_common.launch_fitting``). On a CPU the kernels run interpreted: a proxy raises Triton's own
``OutOfResources`` for tiles past a limit, as a small GPU would, and the answers are compared with the reference.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from elit_kernels import varlen_attention  # noqa: E402
from elit_kernels.testing import cu_seqlens  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
from triton.runtime.errors import OutOfResources  # noqa: E402

from elit_kernels._triton import _common as C, _tiles  # noqa: E402
from elit_kernels._triton import attention_bwd as B, attention_fwd as F  # noqa: E402
from elit_kernels._triton import attention_window as W, attention_window_bwd as WB  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERP, reason="runs the kernels under TRITON_INTERPRET=1 (CPU); a GPU "
                                                          "has its own shared-memory limit to test against")
KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


class FakeJit:
    """A kernel that records each launch's tile and raises ``OutOfResources`` for tiles over ``limit`` elements
    (BLOCK_M x BLOCK_N), as Triton does when a compiled kernel needs more shared memory than the GPU has."""

    def __init__(self, limit):
        self.limit, self.launched, self.refused = limit, [], []

    def __getitem__(self, grid):
        def run(*args, **kw):
            tile = {k: kw[k] for k in KEYS if k in kw}
            if kw["BLOCK_M"] * kw["BLOCK_N"] > self.limit:
                self.refused.append(tile)
                raise OutOfResources(kw["BLOCK_M"] * kw["BLOCK_N"] * 4, self.limit * 4, "shared memory")
            self.launched.append((grid, args, kw))
        return run


def _tiles_list(*dims):
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=4, num_stages=2) for m, n in dims]


def test_launch_fitting_takes_the_first_tile_that_fits_and_remembers_it(monkeypatch):
    monkeypatch.setattr(C, "_FITTING", {})
    jit = FakeJit(limit=32 * 32)
    x = torch.randn(3)
    meta = dict(HEAD_DIM=72, BLOCK_M=0, FLAG=True)  # a tile's keys override meta's
    tiles = _tiles_list((64, 64), (64, 32), (32, 32), (16, 16))
    got = C.launch_fitting("fwd", jit, (5, 2), (x, 7), meta, tiles, torch.device("cpu"))
    assert got == tiles[2]
    assert jit.refused == tiles[:2]
    (grid, args, kw), = jit.launched
    assert grid == (5, 2) and args[0] is x and args[1] == 7
    assert kw == dict(HEAD_DIM=72, FLAG=True, **tiles[2])
    # The next call with the same kernel, dtypes and constexprs goes straight to the tile that launched
    C.launch_fitting("fwd", jit, (5, 2), (torch.randn(9), 1), meta, tiles, torch.device("cpu"))
    assert len(jit.refused) == 2 and jit.launched[-1][2]["BLOCK_M"] == 32
    # ... but another dtype is another kernel: it tries from the first tile again
    C.launch_fitting("fwd", jit, (5, 2), (x.double(), 7), meta, tiles, torch.device("cpu"))
    assert len(jit.refused) == 4
    # A first tile that fits is launched and nothing is remembered for it
    fits = FakeJit(limit=10 ** 6)
    monkeypatch.setattr(C, "_FITTING", {})
    assert C.launch_fitting("dq", fits, (1,), (x,), meta, tiles, torch.device("cpu")) == tiles[0]
    assert C._FITTING == {} and fits.refused == []


def test_launch_fitting_names_the_kernel_when_no_tile_fits_and_lets_other_errors_through(monkeypatch):
    monkeypatch.setattr(C, "_FITTING", {})
    tiles = _tiles_list((64, 64), (32, 32))
    with pytest.raises(RuntimeError, match=r"^window_dq: no tile of this kernel fits cpu \(cpu\) at head dim 128 in "
                       r"torch.float32: 64x64 w4 s2: shared memory 16384 > 64; 32x32 w4 s2: shared memory 4096 > 64\. "
                       r"Run these inputs in bfloat16 / float16, or on another backend \(backend='torch'\)$"):
        C.launch_fitting("window_dq", FakeJit(limit=16), (1,), (torch.randn(2),), dict(HEAD_DIM=128), tiles,
                         torch.device("cpu"))

    class Broken:
        def __getitem__(self, grid):
            def run(*args, **kw):
                raise ValueError("a compile error is not a resource limit")
            return run
    with pytest.raises(ValueError, match="not a resource limit"):
        C.launch_fitting("fwd", Broken(), (1,), (), {}, tiles, torch.device("cpu"))


@pytest.mark.parametrize("kernel", _tiles.KERNELS)
@pytest.mark.parametrize("padded", [64, 80, 128, 256])
def test_fallbacks_shrink_to_the_smallest_tile_of_the_table(kernel, padded):
    chosen = _tiles.heuristic(kernel, 4096, 4096, padded)
    out = _tiles.fallbacks(kernel, chosen, padded)
    assert out[0] == dict(zip(KEYS, chosen[:4]))
    sizes = [(t["BLOCK_M"] * t["BLOCK_N"] * t["num_stages"], t["BLOCK_M"] * t["BLOCK_N"]) for t in out]
    assert sizes == sorted(sizes, reverse=True) and all(n < sizes[0] for n in sizes[1:])  # each one smaller
    assert len({tuple(t.values()) for t in out}) == len(out)
    table = {t[:4] for t in _tiles.TILES[kernel] if t[4] >= padded}
    assert all(tuple(t[k] for k in KEYS) in table for t in out)
    smallest = min(table, key=lambda t: (t[0] * t[1] * t[3], t[0] * t[1]))
    assert tuple(out[-1][k] for k in KEYS) == smallest


def test_window_fallbacks_halve_the_query_tile_or_the_key_block_then_drop_a_stage():
    blocks = dict(BLOCK_M=64, BLOCK_N=128, HEADS=4, num_warps=8, num_stages=2)
    assert [(t["BLOCK_M"], t["BLOCK_N"], t["num_stages"]) for t in W.fallbacks("dq", blocks)] == [
        (64, 128, 2), (32, 128, 2), (16, 128, 2), (16, 128, 1)]
    dkdv = dict(BLOCK_M=16, BLOCK_N=64, KEY_TILE=128, HEADS=2, num_warps=8, num_stages=2)
    assert [(t["BLOCK_M"], t["BLOCK_N"], t["num_stages"]) for t in W.fallbacks("dkdv", dkdv)] == [
        (16, 64, 2), (16, 32, 2), (16, 16, 2), (16, 16, 1)]
    assert all(set(t) == set(KEYS) and t["num_warps"] == 8 for t in W.fallbacks("dkdv", dkdv))


class Tight:
    """A real kernel on a pretend GPU that holds tiles of at most ``limit`` rows in ``dim``: bigger ones raise
    Triton's ``OutOfResources``; the others run (interpreted)."""

    def __init__(self, jit, dim, limit):
        self.jit, self.dim, self.limit, self.tried = jit, dim, limit, []

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.tried.append(kw[self.dim])
            if kw[self.dim] > self.limit:
                raise OutOfResources(kw[self.dim] * 1024, self.limit * 1024, "shared memory")
            return self.jit[grid](*args, **kw)
        return run


def _inputs(lens_q, lens_k, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), 2, d, generator=g)
    k, v = (torch.randn(sum(lens_k), 2, d, generator=g) for _ in range(2))
    return q, k, v, cu_seqlens(lens_q), cu_seqlens(lens_k)


def _reference(q, k, v, cq, ck, mq, mk, scale, dout):
    qkv = [t.double().requires_grad_() for t in (q, k, v)]
    out, lse = varlen_attention(*qkv, cq, ck, mq, mk, softmax_scale=scale, backend="reference", return_lse=True)
    grads = torch.autograd.grad(out, qkv, dout.double())
    return out, lse, grads


class TooBig:
    """An autotuned kernel whose one candidate left after pruning the GPU cannot hold (Triton runs a lone
    candidate untimed, so its OutOfResources reaches the launcher)."""

    def __init__(self):
        self.calls = 0

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.calls += 1
            raise OutOfResources(300000, 232448, "shared memory")
        return run


@needs_interpreter
# the window kernels take their tile from _tiles.WINDOW_TILES: they are never autotuned
@pytest.mark.parametrize("family,autotune", [("triton", False), ("triton", True), ("triton_window", False)],
                         ids=["triton-heuristic", "triton-autotuned", "triton_window"])
def test_every_launcher_falls_back_to_a_tile_that_fits_and_answers_right(family, autotune, monkeypatch):
    """The launchers' GPU path (interpreter switched off for the launch choice, the kernels still interpreted) on
    a pretend GPU that holds only 16-row tiles: every kernel of the family first tries its usual larger tile (or
    its autotuned launch), gets Triton's OutOfResources, and runs a 16-row tile whose out, lse, dq, dk, dv match
    the float64 reference."""
    monkeypatch.setattr(C, "_FITTING", {})
    monkeypatch.setattr(C, "interpreting", lambda: False)
    monkeypatch.setattr(C, "_autotune", autotune)
    too_big = TooBig()
    for mod, attr in ((F, "_varlen_attn_fwd_kernel_tuned"), (B, "_varlen_attn_bwd_dq_kernel_tuned"),
                      (B, "_varlen_attn_bwd_dkdv_kernel_tuned")):
        monkeypatch.setattr(mod, attr, too_big)
    lens_q, lens_k = ([40, 3, 0, 21], [64, 5, 2, 40]) if family == "triton_window" else ([40, 3, 21], [64, 5, 40])
    q, k, v, cq, ck = _inputs(lens_q, lens_k, 72, seed=len(family))
    mq, mk, scale = max(lens_q), max(lens_k), 72 ** -0.5
    dout = torch.randn_like(q)
    if family == "triton_window":
        mod_f, mod_b = W, WB
        spies = {"fwd": ("_window_attn_fwd_kernel", "BLOCK_M"), "dq": ("_window_attn_bwd_dq_kernel", "BLOCK_M"),
                 "dkdv": ("_window_attn_bwd_dkdv_kernel", "BLOCK_N")}
    else:
        mod_f, mod_b = F, B
        spies = {"fwd": ("_varlen_attn_fwd_kernel", "BLOCK_M"), "dq": ("_varlen_attn_bwd_dq_kernel", "BLOCK_M"),
                 "dkdv": ("_varlen_attn_bwd_dkdv_kernel", "BLOCK_N")}
    tight = {}
    for name, (attr, dim) in spies.items():
        mod = mod_f if name == "fwd" else mod_b
        tight[name] = Tight(getattr(mod, attr), dim, limit=16)
        monkeypatch.setattr(mod, attr, tight[name])
    if family == "triton_window":
        out, lse = W.window_attn_fwd_triton(q, k, v, cq, ck, mq, mk, scale)
        dq, dk, dv = WB.window_attn_bwd_triton(dout, q, k, v, out, lse, cq, ck, mq, mk, scale)
    else:
        out, lse = F.varlen_attn_fwd_triton(q, k, v, cq, ck, mq, mk, scale, False)
        dq, dk, dv = B.varlen_attn_bwd_triton(dout, q, k, v, out, lse, cq, ck, mq, mk, scale, False)
    for name, t in tight.items():
        assert t.tried[0] > 16 and t.tried[-1] == 16, (name, t.tried)  # a bigger tile first, then one that fits
    assert too_big.calls == (3 if autotune else 0)
    ref_out, ref_lse, ref_grads = _reference(q, k, v, cq, ck, mq, mk, scale, dout)
    torch.testing.assert_close(out, ref_out.float(), rtol=1e-4, atol=1e-5)
    seen = torch.isfinite(ref_lse)
    assert torch.equal(seen, torch.isfinite(lse))
    torch.testing.assert_close(lse[seen], ref_lse[seen].float(), rtol=1e-4, atol=1e-5)
    for got, want in zip((dq, dk, dv), ref_grads):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)
    # The next call remembers each kernel's tile: no larger tile is tried again
    before = {n: len(t.tried) for n, t in tight.items()}
    if family == "triton_window":
        W.window_attn_fwd_triton(q, k, v, cq, ck, mq, mk, scale)
    else:
        F.varlen_attn_fwd_triton(q, k, v, cq, ck, mq, mk, scale, False)
    assert tight["fwd"].tried[before["fwd"]:] == [16]
