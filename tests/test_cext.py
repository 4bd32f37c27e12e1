"""elit_kernels._C: C++ CPU ops vs the references (values + gradients), opcheck, argument errors, and
the CUDA kernels vs the references when a GPU is present.

CI builds the extension (`pip install --no-build-isolation -e .`) and sets ELIT_REQUIRE_EXTENSION=1, so a
missing or stale _C FAILS there rather than skipping; elsewhere (an install without a compiler) these tests
skip, naming the build command.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zlib

import pytest
import torch
from cases import cases

import elit_kernels
from elit_kernels import _cext
from elit_kernels.elementwise import ELEMENTWISE_IMPLS, get_elementwise
from elit_kernels.reference.modulate import gated_residual, layernorm_modulate
from elit_kernels.testing import assert_close_to_reference, check_backend_against_reference, default_atol
from elit_kernels.testing import random_varlen_inputs

#: every output NaN-filled before a kernel writes it (conftest.py): a row left unwritten fails
pytestmark = pytest.mark.usefixtures("poisoned_outputs")
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device here: the CUDA kernels are tested on the GPU machine")


@pytest.fixture(autouse=True)
def _require_extension():
    # An install without a compiler has no _C: these tests skip there, saying why. CI (.ci/run) sets
    # ELIT_REQUIRE_EXTENSION=1, so that a build that silently failed fails the run instead of skipping it.
    if not _cext.available():
        msg = f"elit_kernels._C is not usable: {_cext.load_error}"
        if os.environ.get("ELIT_REQUIRE_EXTENSION", "0") not in ("", "0"):
            pytest.fail(msg + " (ELIT_REQUIRE_EXTENSION is set: the build must have made it)", pytrace=False)
        pytest.skip(msg)


def test_build_info_and_registration():
    info = _cext.build_info()
    assert info["torch_version"] == torch.__version__
    for k in ("varlen_attn_fwd_cpu", "varlen_attn_bwd_cpu", "layernorm_modulate_cpu", "gated_residual_cpu"):
        assert k in info["kernels"]
    assert not any("pack" in k for k in info["kernels"])  # the pack/unpack ops left: the model indexes instead
    if info["with_cuda"]:
        assert info["cuda_archs"], info
        assert info["cuda_version"]
    assert "cpp" in elit_kernels.known_backends() and "cuda" in elit_kernels.known_backends()
    assert ELEMENTWISE_IMPLS["fused"].layernorm_modulate is _cext.layernorm_modulate
    assert get_elementwise("fused").takes_runs  # wrapped: the model hands it TokenRuns, it gets the index


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------

def _attn(q, k, v, cq, ck, mq, mk, scale, causal):
    """The compiled forward op's output (differentiable through its registered backward)."""
    return torch.ops.elit.varlen_attn_fwd(q, k, v, cq, ck, mq, mk, float(scale), bool(causal))[0]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", cases("ops"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp64", "fp32", "bf16", "fp16"])
def test_attention_cpu_matches_reference(case, dtype, causal):
    lq, lk = case.lens
    check_backend_against_reference(_attn, lq, lk, heads=2, head_dim=16, dtype=dtype, causal=causal,
                                    seed=zlib.crc32(f"{case.lens}-{causal}".encode()) % 1000)


@pytest.mark.parametrize("head_dim", [64, 72, 128])
def test_attention_cpu_head_dims(head_dim):
    check_backend_against_reference(_attn, [5, 9], [12, 1], heads=3, head_dim=head_dim, dtype=torch.float32,
                                    causal=True, seed=head_dim)


def test_attention_cpu_through_dispatcher_and_scale():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([4, 3], [2, 6], 2, 8, seed=3)
    out = elit_kernels.varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=0.3, backend="cpp")
    ref = elit_kernels.varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=0.3, backend="reference")
    torch.testing.assert_close(out, ref)


def test_attention_backward_deterministic_and_empty_rows_zero():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 4], [0, 5], 2, 8, seed=5, requires_grad=True)
    outs = []
    for _ in range(2):
        o = _attn(q, k, v, cq, ck, mq, mk, 8 ** -0.5, False)
        outs.append((o,) + torch.autograd.grad(o, (q, k, v), torch.ones_like(o)))
    for a, b in zip(outs[0], outs[1]):
        assert torch.equal(a, b)
    o, dq, dk, dv = outs[0]
    assert torch.equal(o[:3], torch.zeros_like(o[:3]))
    assert torch.equal(dq[:3], torch.zeros_like(dq[:3]))
    _, lse = torch.ops.elit.varlen_attn_fwd(q, k, v, cq, ck, mq, mk, 0.5, False)
    assert torch.isinf(lse[:, :3]).all() and torch.isfinite(lse[:, 3:]).all()


def test_attention_compiles_fullgraph():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 4], [2, 5], 2, 8, seed=7)
    f = torch.compile(lambda q, k, v: _attn(q, k, v, cq, ck, mq, mk, 0.35, True), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(q, k, v), _attn(q, k, v, cq, ck, mq, mk, 0.35, True))


# ------------------------------------------------------------------------------------------------
# Elementwise
# ------------------------------------------------------------------------------------------------

def _ragged_modulate_inputs(dtype, device="cpu", T=13, B=4, C=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, C, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)
    shift, scale, gate = (torch.randn(B, C, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    y = torch.randn(T, C, generator=g).to(device=device, dtype=dtype)
    # Unsorted; sample 1 owns a single token, sample 3 none.
    if T <= 13:
        index = torch.tensor([0, 2, 2, 0, 0, 2, 0, 2, 2, 0, 0, 0, 2][:T], dtype=torch.long, device=device)
        if T > 5:
            index[5] = 1
    else:  # sorted, as the model's token->sample index; the last sample owns no token
        index = torch.randint(0, B - 1, (T,), generator=g).sort().values.to(device)
    return x, y, shift, scale, gate, index


def _check_values_and_grads(fn, ref_fn, tensors, others, dtype, seed=0, truth_fn=None):
    """fn vs ref_fn: values and gradients, with the flash-attn tolerance rule (fp64 truth: ``truth_fn`` on fp64
    inputs, default ``ref_fn``, which must then compute in fp64 for fp64 inputs)."""
    def run(f, ts):
        ts = [t.detach().clone().requires_grad_(True) for t in ts]
        out = f(*ts, *others)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
        return [out] + list(torch.autograd.grad(out, ts, g))

    got = run(fn, tensors)
    truth = run(truth_fn or ref_fn, [t.double() for t in tensors])
    low = run(ref_fn, tensors)
    for i, (a, b, c) in enumerate(zip(got, truth, low)):
        assert a.dtype == c.dtype
        assert_close_to_reference(a, b.to(a.device), c, atol=default_atol(dtype), name=f"output {i}")


def _ln_mod_ref64(x, shift, scale, index, eps):
    # The reference computes in fp32; a fp64 truth for fp64 tests needs fp64 arithmetic.
    h = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)
    return h * (1 + scale[index]) + shift[index]


def _gated_ref64(x, y, gate, index):
    return x + gate[index] * y


DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp64", "fp32", "bf16", "fp16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_layernorm_modulate_cpu(dtype):
    x, y, shift, scale, gate, index = _ragged_modulate_inputs(dtype, seed=1)
    ref = _ln_mod_ref64 if dtype == torch.float64 else layernorm_modulate
    _check_values_and_grads(_cext.layernorm_modulate, ref, [x, shift, scale], [index, 1e-6], dtype, seed=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gated_residual_cpu(dtype):
    x, y, shift, scale, gate, index = _ragged_modulate_inputs(dtype, seed=3)
    ref = (lambda x, y, gate, index: x + gate[index] * y) if dtype == torch.float64 else gated_residual
    _check_values_and_grads(_cext.gated_residual, ref, [x, y, gate], [index], dtype, seed=4)


def test_elementwise_gradcheck_fp64():
    x, y, shift, scale, gate, index = _ragged_modulate_inputs(torch.float64, T=7, C=5, seed=5)
    ts = [t.requires_grad_() for t in (x, shift, scale)]
    torch.autograd.gradcheck(lambda a, b, c: _cext.layernorm_modulate(a, b, c, index, 1e-5), ts)
    ts = [t.detach().requires_grad_() for t in (x, y, gate)]
    torch.autograd.gradcheck(lambda a, b, c: _cext.gated_residual(a, b, c, index), ts)


def test_empty_tokens():
    x, y, shift, scale, gate, index = _ragged_modulate_inputs(torch.float32, T=0)
    assert _cext.layernorm_modulate(x, shift, scale, index).shape == (0, 24)
    gx, gs, gc = torch.ops.elit.layernorm_modulate_bwd(x, x, scale, index, x.new_empty(0), x.new_empty(0))
    assert torch.equal(gs, torch.zeros_like(gs))


# ------------------------------------------------------------------------------------------------
# opcheck
# ------------------------------------------------------------------------------------------------

def _permute(t: torch.Tensor) -> torch.Tensor:
    """Same values, reversed memory layout (no dim has unit stride where a contiguous tensor has it)."""
    if t.dim() < 2:
        return t
    order = list(range(t.dim()))[::-1]
    return t.detach().permute(order).contiguous().permute(order).requires_grad_(t.requires_grad)


def _opcheck_samples(device="cpu", dtype=torch.float32, head_dim=8, permute=False):
    p = _permute if permute else (lambda t: t)
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 0, 2], [4, 2, 0], 2, head_dim, seed=11, device=device, dtype=dtype,
                                                   requires_grad=True)
    q, k, v = p(q), p(k), p(v)
    out, lse = torch.ops.elit.varlen_attn_fwd(q, k, v, cq, ck, mq, mk, 0.4, True)
    dout = p(torch.randn_like(out))
    x, y, shift, scale, gate, index = (p(t) for t in _ragged_modulate_inputs(dtype, device=device, seed=12))
    _, mean, rstd = torch.ops.elit.layernorm_modulate_fwd(x, shift, scale, index, 1e-6)
    rg = lambda *ts: [p(t.detach().clone()).requires_grad_(True) for t in ts]  # noqa: E731
    return {
        "varlen_attn_fwd": (q, k, v, cq, ck, mq, mk, 0.4, True),
        "varlen_attn_bwd": (dout, q.detach(), k.detach(), v.detach(), p(out.detach()), lse, cq, ck, mq, mk, 0.4, True),
        "layernorm_modulate_fwd": (*rg(x, shift, scale), index, 1e-6),
        "layernorm_modulate_bwd": (p(torch.randn_like(x)), x, scale, index, mean, rstd),
        "gated_residual_fwd": (*rg(x, y, gate), index),
        "gated_residual_bwd": (p(torch.randn_like(x)), y, gate, index),
    }


OPS = ["varlen_attn_fwd", "varlen_attn_bwd", "layernorm_modulate_fwd",
       "layernorm_modulate_bwd", "gated_residual_fwd", "gated_residual_bwd"]


@pytest.mark.parametrize("permute", [False, True], ids=["contiguous", "permuted"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck_cpu(op, permute):
    # Permuted inputs: the fake impls must report the strides the real kernels return (contiguous).
    args = _opcheck_samples(permute=permute)[op]
    torch.library.opcheck(getattr(torch.ops.elit, op).default, args)


# ------------------------------------------------------------------------------------------------
# Bad inputs: TORCH_CHECK messages name the argument
# ------------------------------------------------------------------------------------------------

def _attn_args(**over):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 2], [4, 1], 2, 8, seed=1)
    a = dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=mk,
             softmax_scale=0.3, causal=False)
    a.update(over)
    return list(a.values())


@pytest.mark.parametrize("argname,over", [
    ("q", lambda a: dict(q=a[0].int())),
    ("q", lambda a: dict(q=a[0][0])),
    ("k", lambda a: dict(k=a[1].double())),
    ("v", lambda a: dict(v=a[2][:, :1])),
    ("k", lambda a: dict(k=a[1][..., :4])),
    ("v", lambda a: dict(v=a[2][:-1])),
    ("cu_seqlens_q", lambda a: dict(cu_seqlens_q=a[3].long())),
    ("cu_seqlens_k", lambda a: dict(cu_seqlens_k=torch.tensor([0, 4], dtype=torch.int32))),
    ("cu_seqlens_q", lambda a: dict(cu_seqlens_q=torch.tensor([1, 3, 5], dtype=torch.int32))),
    ("cu_seqlens_k", lambda a: dict(cu_seqlens_k=torch.tensor([0, 3, 2], dtype=torch.int32))),
    ("cu_seqlens_q", lambda a: dict(cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32))),
    ("k", lambda a: dict(k=torch.randn(5, 3, 8), v=torch.randn(5, 3, 8))),
    ("max_seqlen_q", lambda a: dict(max_seqlen_q=2)),
    ("max_seqlen_k", lambda a: dict(max_seqlen_k=-1)),
], ids=lambda x: x if isinstance(x, str) else "")
def test_attention_bad_inputs(argname, over):
    base = _attn_args()
    keys = ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal"]
    args = dict(zip(keys, base))
    args.update(over(base))
    with pytest.raises(RuntimeError, match=argname):
        torch.ops.elit.varlen_attn_fwd(*args.values())


def test_attention_bwd_bad_lse():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 2], [4, 1], 2, 8, seed=1)
    out, lse = torch.ops.elit.varlen_attn_fwd(q, k, v, cq, ck, mq, mk, 0.3, False)
    with pytest.raises(RuntimeError, match="lse"):
        torch.ops.elit.varlen_attn_bwd(out, q, k, v, out, lse.t(), cq, ck, mq, mk, 0.3, False)
    with pytest.raises(RuntimeError, match="dout"):
        torch.ops.elit.varlen_attn_bwd(out[:-1], q, k, v, out, lse, cq, ck, mq, mk, 0.3, False)


def test_elementwise_bad_inputs():
    x, y, shift, scale, gate, index = _ragged_modulate_inputs(torch.float32)
    with pytest.raises(RuntimeError, match="shift"):
        torch.ops.elit.layernorm_modulate_fwd(x, shift[:, :3], scale, index, 1e-6)
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.elit.layernorm_modulate_fwd(x, shift, scale.double(), index, 1e-6)
    with pytest.raises(RuntimeError, match="index"):
        torch.ops.elit.layernorm_modulate_fwd(x, shift, scale, index.int(), 1e-6)
    with pytest.raises(RuntimeError, match="index"):
        torch.ops.elit.layernorm_modulate_fwd(x, shift, scale, index + 3, 1e-6)
    with pytest.raises(RuntimeError, match="x"):
        torch.ops.elit.layernorm_modulate_fwd(x[0], shift, scale, index, 1e-6)
    with pytest.raises(RuntimeError, match="eps"):
        torch.ops.elit.layernorm_modulate_fwd(x, shift, scale, index, -1.0)
    with pytest.raises(RuntimeError, match="y"):
        torch.ops.elit.gated_residual_fwd(x, y[:-1], gate, index)
    with pytest.raises(RuntimeError, match="gate"):
        torch.ops.elit.gated_residual_fwd(x, y, gate[:, :-1], index)
    with pytest.raises(RuntimeError, match="index"):
        torch.ops.elit.gated_residual_bwd(x, y, gate, index[:-1])


# ------------------------------------------------------------------------------------------------
# CUDA (GPU machine only)
# ------------------------------------------------------------------------------------------------

def _require_cuda_kernel(name):
    if not _cext.has_kernel(name):
        pytest.fail(f"a GPU is present but elit_kernels._C has no {name} kernel (build info: {_cext.build_info()})",
                    pytrace=False)


@needs_cuda
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", cases("cuda"))
@pytest.mark.parametrize("head_dim", [64, 72, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_attention_cuda_matches_reference(case, head_dim, dtype, causal):
    _require_cuda_kernel("varlen_attn_fwd_cuda")
    lq, lk = case.lens
    check_backend_against_reference(_attn, lq, lk, heads=3, head_dim=head_dim, dtype=dtype, causal=causal,
                                    device="cuda", seed=zlib.crc32(f"{case.lens}-{head_dim}".encode()) % 1000)


@needs_cuda
def test_attention_cuda_dispatch_and_opcheck():
    _require_cuda_kernel("varlen_attn_fwd_cuda")
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([5, 1], [7, 0], 2, 64, device="cuda", dtype=torch.float16)
    from elit_kernels.attention import select_backend
    from elit_kernels.attention import validate_inputs
    inp = validate_inputs(q, k, v, cq, ck, mq, mk, None, False)
    # measured slowest at every ELIT shape on an H200: by name only, never by default dispatch
    assert select_backend(inp).name != "cuda" and select_backend(inp, "cuda").name == "cuda"
    for permute in (False, True):
        samples = _opcheck_samples(device="cuda", dtype=torch.float16, head_dim=64, permute=permute)
        for op in ("varlen_attn_fwd", "varlen_attn_bwd"):
            torch.library.opcheck(getattr(torch.ops.elit, op).default, samples[op])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_elementwise_cuda(dtype):
    _require_cuda_kernel("layernorm_modulate_cuda")
    _require_cuda_kernel("gated_residual_cuda")
    for T, C in ((13, 24), (300, 1152), (1, 7)):
        x, y, shift, scale, gate, index = _ragged_modulate_inputs(dtype, device="cuda", T=T, C=C, seed=T)
        # fp64 truths: the reference computes in fp32, which for fp32 inputs would leave no rounding margin for
        # the kernel's own (differently ordered) fp32 sums (the first H200 run: 1.1e-5 over 1e-5 in a gradient)
        _check_values_and_grads(_cext.layernorm_modulate, layernorm_modulate, [x, shift, scale], [index, 1e-6], dtype,
                                truth_fn=_ln_mod_ref64)
        _check_values_and_grads(_cext.gated_residual, gated_residual, [x, y, gate], [index], dtype,
                                truth_fn=_gated_ref64)


@needs_cuda
def test_elementwise_cuda_opcheck():
    _require_cuda_kernel("layernorm_modulate_cuda")
    _require_cuda_kernel("varlen_attn_fwd_cuda")  # the samples run the attention forward
    for permute in (False, True):
        samples = _opcheck_samples(device="cuda", dtype=torch.float16, head_dim=64, permute=permute)
        for op in OPS[2:]:
            torch.library.opcheck(getattr(torch.ops.elit, op).default, samples[op])


# ------------------------------------------------------------------------------------------------
# Loader behaviour without the extension (a subprocess on a copy of the package: the real _C stays loaded here)
# ------------------------------------------------------------------------------------------------

_NO_EXT_CHECK = r"""
import sys, warnings
# The copy has no compiled _C; an editable install's finder would still hand out the repository's build.
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import torch
    import elit_kernels, elit_kernels._cext as c
assert elit_kernels.__file__.startswith(sys.argv[1]), elit_kernels.__file__
msgs = [str(x.message) for x in w if "elit_kernels._C" in str(x.message)]
assert len(msgs) == 1, msgs
assert sys.argv[2] in msgs[0] and "circular import" not in msgs[0], msgs[0]
assert "pip install --no-build-isolation -e ." in msgs[0], msgs[0]
assert not c.available() and c.build_info() is None
rows = {r["name"]: r for r in elit_kernels.describe_backends()}
for name in ("cuda", "cpp"):
    assert rows[name]["available"] is False, rows[name]
    assert sys.argv[2] in rows[name]["description"], rows[name]
q = torch.randn(3, 2, 8); cu = torch.tensor([0, 3], dtype=torch.int32)
elit_kernels.varlen_attention(q, q, q, cu, cu, 3, 3)  # the dispatcher passes over the unavailable backends
try:
    elit_kernels.varlen_attention(q, q, q, cu, cu, 3, 3, backend="cpp")
except ValueError as e:
    assert "cpp" in str(e), e
else:
    raise AssertionError("backend='cpp' ran without _C")
from elit_kernels.bench.cli import main
try:
    main(["--device", "cpu", "--config", "tiny", "--resolution", "64", "--backends", "cpp"])
except SystemExit as e:
    assert e.code == 2, e.code
print("ok")
"""


@pytest.mark.parametrize("kind,expect", [("never_built", "is not built"), ("broken", "failed to load")])
def test_missing_extension_listed_unavailable_with_reason(kind, expect, tmp_path):
    src = elit_kernels.__path__[0]
    shutil.copytree(src, tmp_path / "elit_kernels", ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    if kind == "broken":  # what a _C built for another torch does on import
        (tmp_path / "elit_kernels" / "_C.py").write_text("raise ImportError('undefined symbol: _ZN3c10 (simulated)')\n")
    r = subprocess.run([sys.executable, "-c", _NO_EXT_CHECK, str(tmp_path), expect], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
    assert "--backends: backend 'cpp'" in r.stderr and expect in r.stderr.split("--backends:")[1], r.stderr


# ------------------------------------------------------------------------------------------------
# End to end: the reference ELIT model on the compiled ops, and torch.compile over the fused ops
# ------------------------------------------------------------------------------------------------

def test_model_with_cpp_backend_and_fused_elementwise():
    from elit_kernels.models.elit_dit import ElitDiT, elit_config
    torch.manual_seed(0)
    ref = ElitDiT(elit_config("tiny", 64), backend="reference", elementwise="reference").double()
    # adaLN-Zero initialises every gate to zero; random weights make the fused ops matter.
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
    fused = ElitDiT(elit_config("tiny", 64), backend="cpp", elementwise="fused").double()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t, y = torch.rand(3, dtype=torch.float64), torch.tensor([1, 2, 3])
    outs = []
    for m in (ref, fused):
        o = m(x, t, y, budgets=[4, 0, 2])
        o.square().sum().backward()
        outs.append((o.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-6)
    for g1, g0 in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)


def test_fused_ops_compile_fullgraph():
    x, y, shift, scale, gate, index = _ragged_modulate_inputs(torch.float32, seed=21)

    def f(x, y, shift, scale, gate):
        return _cext.gated_residual(x, _cext.layernorm_modulate(y, shift, scale, index), gate, index)

    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(g(x, y, shift, scale, gate), f(x, y, shift, scale, gate))


def test_elementwise_double_backward_refused_by_name():
    # layernorm_modulate / gated_residual: a second derivative through the C++ backward ops would treat
    # them as constants (silently wrong); it is refused, naming the op.
    x, y, shift, scale, gate, index = _ragged_modulate_inputs(torch.float64, T=7, C=5, seed=6)
    calls = {"layernorm_modulate_fwd": (lambda a, b, c: _cext.layernorm_modulate(a, b, c, index, 1e-5),
                                        (x, shift, scale)),
             "gated_residual_fwd": (lambda a, b, c: _cext.gated_residual(a, b, c, index), (x, y, gate))}
    for name, (f, args) in calls.items():
        args = [t.detach().requires_grad_() for t in args]
        grads = torch.autograd.grad(f(*args).square().sum(), args, create_graph=True)
        with pytest.raises(RuntimeError, match=rf"elit::{name}: double backward .* not supported"):
            torch.autograd.grad(sum(g.square().sum() for g in grads), args)
