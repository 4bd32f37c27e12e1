"""Argument checks of every compiled op (``torch.ops.elit.*`` from elit_kernels._C), CPU and CUDA entry points.

The checks are host code (csrc/checks.h), run before anything is allocated or launched.
``_C.checks.<op>(..., cuda=True)`` runs the CUDA entry point's checks on CPU tensors, so every refusal of
the CUDA kernels is tested here without a GPU; ``cuda=False`` runs the CPU entry point's, and the CPU ops
are called for real. Each bad argument must raise a RuntimeError ``"<op>: <argument>: ..."``.

A compiled op that fails by crashing loses the user's whole process (a build linked with a second, static
C++ runtime crashed in the first check that formatted a number). The tests that call compiled ops on
purpose with bad arguments in bulk therefore run them in a child process, where a crash is a failure with
its exit code instead of the end of the test run; the GPU ones run on the GPU machine only.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest
import torch

from elit_kernels import _cext
from elit_kernels.testing import random_varlen_inputs

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device here: the CUDA ops are called on the GPU machine "
                                "(their argument checks are tested on CPU tensors above)")


@pytest.fixture(autouse=True)
def _require_extension():
    if not _cext.available():
        pytest.fail(f"elit_kernels._C is not usable: {_cext.load_error}. CI must build it with "
                    "`pip install --no-build-isolation -e .`", pytrace=False)


def _checks():
    import elit_kernels._C as C
    return C.checks


# ------------------------------------------------------------------------------------------------
# Valid arguments of each op (fresh random values, small; fp16 and head dim 64 so that the CUDA checks
# accept them too)
# ------------------------------------------------------------------------------------------------

def _attn_fwd(head_dim=64, dtype=torch.float16):
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 2], [4, 1], 4, head_dim, dtype=dtype, kv_heads=2, seed=5)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=mk,
                softmax_scale=0.125, causal=False, window_left=-1, window_right=-1, softcap=0.0)


def _attn_bwd(head_dim=64, dtype=torch.float16):
    a = _attn_fwd(head_dim, dtype)
    out, lse = torch.ops.elit.varlen_attn_fwd(**a)
    return dict(dout=torch.randn_like(out), q=a["q"], k=a["k"], v=a["v"], out=out, lse=lse,
                **{n: a[n] for n in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale",
                                     "causal", "window_left", "window_right", "softcap")})


def _modulate_inputs(T=13, B=4, C=24):
    g = torch.Generator().manual_seed(T)
    x, y = torch.randn(T, C, generator=g), torch.randn(T, C, generator=g)
    shift, scale, gate = (torch.randn(B, C, generator=g) for _ in range(3))
    index = torch.randint(0, B - 1, (T,), generator=g)  # sample B - 1 owns no token
    return x, y, shift, scale, gate, index


def _lnm_fwd():
    x, _, shift, scale, _, index = _modulate_inputs()
    return dict(x=x, shift=shift, scale=scale, index=index, eps=1e-6)


def _lnm_bwd():
    a = _lnm_fwd()
    out, mean, rstd = torch.ops.elit.layernorm_modulate_fwd(**a)
    return dict(grad_out=torch.randn_like(out), x=a["x"], scale=a["scale"], index=a["index"], mean=mean, rstd=rstd)


def _gated_fwd():
    x, y, _, _, gate, index = _modulate_inputs()
    return dict(x=x, y=y, gate=gate, index=index)


def _gated_bwd():
    x, y, _, _, gate, index = _modulate_inputs()
    return dict(grad_out=torch.randn_like(x), y=y, gate=gate, index=index)


VALID = {"varlen_attn_fwd": _attn_fwd, "varlen_attn_bwd": _attn_bwd, "layernorm_modulate_fwd": _lnm_fwd,
         "layernorm_modulate_bwd": _lnm_bwd, "gated_residual_fwd": _gated_fwd, "gated_residual_bwd": _gated_bwd}


def _huge(shape, dtype=torch.float16):
    """A tensor of any size without the memory: one element, expanded (the checks read sizes only)."""
    return torch.zeros((1,) * len(shape), dtype=dtype).expand(*shape)


# ------------------------------------------------------------------------------------------------
# One bad argument per case: a table of argument errors of the C++ checks (the attention tests' table of
# segment shapes is tests/cases.py)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    op: str
    name: str
    arg: str                      # the argument the message must name first
    mutate: Callable[[dict], dict]  # valid args -> the bad ones (a dict of replacements)
    where: str = "both"           # both: every entry point refuses it; cuda: only the CUDA kernels; cpu: only
                                  # the CPU entry point (it reads cu_seqlens / index values; the CUDA one never does)
    msg: str = ""                 # a regex the rest of the message must contain (the valid values)
    big: bool = False             # sizes past a kernel limit: only the checks run, never a kernel
    meta: bool = False            # a tensor on another device: the CPU op cannot be called with it

    @property
    def id(self):
        return f"{self.op}-{self.name}"


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _dims(d):
    return lambda a: {n: torch.randn(a[n].shape[:-1] + (d,)).to(a[n].dtype) for n in ("q", "k", "v")}


ATTN_SHARED = [
    ("q_int", "q", lambda a: dict(q=a["q"].int()), r"dtype Int not supported; expected float16, bfloat16"),
    ("q_2d", "q", lambda a: dict(q=a["q"][0]), r"expected a 3-D tensor"),
    ("k_dtype", "k", lambda a: dict(k=a["k"].double()), r"does not match q's dtype"),
    ("v_heads", "v", lambda a: dict(v=a["v"][:, :1]), r"has 1 heads, k has 2"),
    ("k_head_dim", "k", lambda a: dict(k=a["k"][..., :32]), r"head dim 32 does not match q's head dim 64"),
    ("v_tokens", "v", lambda a: dict(v=a["v"][:-1]), r"has 4 tokens, k has 5"),
    ("kv_heads_divide", "k", lambda a: dict(k=torch.randn(5, 3, 64).half(), v=torch.randn(5, 3, 64).half()),
     r"num_heads % num_kv_heads must be 0"),
    ("cu_q_int64", "cu_seqlens_q", lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"].long()), r"expected dtype int32"),
    ("cu_q_2d", "cu_seqlens_q", lambda a: dict(cu_seqlens_q=a["cu_seqlens_q"][None]), r"expected a 1-D tensor"),
    ("cu_k_length", "cu_seqlens_k", lambda a: dict(cu_seqlens_k=torch.tensor([0, 5], dtype=torch.int32)),
     r"has 2 elements but cu_seqlens_q has 3"),
    ("max_q_negative", "max_seqlen_q", lambda a: dict(max_seqlen_q=-1), r"must be >= 0"),
    ("window_left", "window_size", lambda a: dict(window_left=-2), r"left must be >= -1"),
    ("softcap_negative", "softcap", lambda a: dict(softcap=-1.0), r"must be >= 0"),
]
ATTN_META = [
    ("cu_q_device", "cu_seqlens_q", lambda a: dict(cu_seqlens_q=_meta(a["cu_seqlens_q"])), r"on device meta, but q"),
    ("k_device", "k", lambda a: dict(k=_meta(a["k"])), r"on device meta, but q is on cpu"),
]
ATTN_VALUES = [
    ("cu_q_start", "cu_seqlens_q", lambda a: dict(cu_seqlens_q=torch.tensor([1, 3, 5], dtype=torch.int32)),
     r"must start at 0"),
    ("cu_k_decreasing", "cu_seqlens_k", lambda a: dict(cu_seqlens_k=torch.tensor([0, 4, 3], dtype=torch.int32)),
     r"must be non-decreasing"),
    ("cu_q_past_end", "cu_seqlens_q", lambda a: dict(cu_seqlens_q=torch.tensor([0, 3, 9], dtype=torch.int32)),
     r"past the end of the 5 packed rows"),
    ("max_k_small", "max_seqlen_k", lambda a: dict(max_seqlen_k=1), r"smaller than the longest segment \(4\)"),
]
HEAD_DIMS = r"is not supported by the CUDA kernels \(64, 72 or 128"
ATTN_CUDA = [
    ("head_dim_56", "q", _dims(56), r"head dim 56 " + HEAD_DIMS),
    ("head_dim_80", "q", _dims(80), r"head dim 80 " + HEAD_DIMS),
    ("head_dim_256", "q", _dims(256), r"head dim 256 " + HEAD_DIMS),
    ("fp32", "q", lambda a: {n: a[n].float() for n in ("q", "k", "v")}, r"dtype Float is not supported by the CUDA "
     r"kernels \(float16 or bfloat16\)"),
    ("fp64", "q", lambda a: {n: a[n].double() for n in ("q", "k", "v")}, r"dtype Double is not supported"),
    ("window", "window_size", lambda a: dict(window_left=3), r"support only \(-1, -1\), got \(3, -1\)"),
    ("softcap", "softcap", lambda a: dict(softcap=30.0), r"support only 0.0, got 30"),
]
ATTN_CUDA_BIG = [
    ("heads", "q", lambda a: dict(q=_huge((5, 65536, 64))), r"65536 heads is more than the CUDA kernels take "
     r"\(at most 65535\)"),
    ("q_rows", "q", lambda a: dict(q=_huge((2**31, 4, 64))), r"2147483648 rows is more than the CUDA kernels take"),
    ("k_rows", "k", lambda a: dict(k=_huge((2**31, 2, 64)), v=_huge((2**31, 2, 64))), r"2147483648 rows is more"),
]

CASES: list[Case] = []
for op in ("varlen_attn_fwd", "varlen_attn_bwd"):
    CASES += [Case(op, n, arg, m, "both", msg) for n, arg, m, msg in ATTN_SHARED]
    CASES += [Case(op, n, arg, m, "both", msg, meta=True) for n, arg, m, msg in ATTN_META]
    CASES += [Case(op, n, arg, m, "cpu", msg) for n, arg, m, msg in ATTN_VALUES]
    CASES += [Case(op, n, arg, m, "cuda", msg) for n, arg, m, msg in ATTN_CUDA if op == "varlen_attn_fwd"]
    CASES += [Case(op, n, arg, m, "cuda", msg, big=True) for n, arg, m, msg in ATTN_CUDA_BIG
              if op == "varlen_attn_fwd"]


def _bwd_dims(d):
    def mutate(a):
        b = _attn_bwd(d)
        return {n: b[n] for n in ("dout", "q", "k", "v", "out", "lse")}
    return mutate


def _bwd_huge_delta(a):
    rows, heads = 2**31 - 1, 9
    return dict(q=_huge((rows, heads, 64)), dout=_huge((rows, heads, 64)), out=_huge((rows, heads, 64)),
                lse=_huge((heads, rows), torch.float32), k=_huge((5, 3, 64)), v=_huge((5, 3, 64)))


CASES += [
    Case("varlen_attn_bwd", "dout_shape", "dout", lambda a: dict(dout=a["dout"][:-1]), msg=r"expected shape \[5, 4, 64\]"),
    Case("varlen_attn_bwd", "dout_dtype", "dout", lambda a: dict(dout=a["dout"].float()), msg=r"does not match q's"),
    Case("varlen_attn_bwd", "out_dtype", "out", lambda a: dict(out=a["out"].bfloat16()), msg=r"does not match q's"),
    Case("varlen_attn_bwd", "lse_shape", "lse", lambda a: dict(lse=a["lse"].t()), msg=r"expected shape \[4, 5\]"),
    Case("varlen_attn_bwd", "lse_dtype", "lse", lambda a: dict(lse=a["lse"].double()), msg=r"expected dtype Float"),
    Case("varlen_attn_bwd", "lse_device", "lse", lambda a: dict(lse=_meta(a["lse"])), msg=r"on device meta", meta=True),
    Case("varlen_attn_bwd", "dout_device", "dout", lambda a: dict(dout=_meta(a["dout"])), msg=r"on device meta",
         meta=True),
    Case("varlen_attn_bwd", "head_dim_80", "q", _bwd_dims(80), "cuda", r"head dim 80 " + HEAD_DIMS),
    Case("varlen_attn_bwd", "head_dim_56", "q", _bwd_dims(56), "cuda", r"head dim 56 " + HEAD_DIMS),
    Case("varlen_attn_bwd", "fp32", "q", lambda a: {n: a[n].float() for n in ("dout", "q", "k", "v", "out")}, "cuda",
         r"dtype Float is not supported by the CUDA kernels"),
    Case("varlen_attn_bwd", "window", "window_size", lambda a: dict(window_right=0), "cuda", r"got \(-1, 0\)"),
    Case("varlen_attn_bwd", "delta_grid", "q", _bwd_huge_delta, "cuda",
         r"2147483647 rows x 9 heads is more than the CUDA backward takes", big=True),
]


def _index_values(bound):
    return dict(arg="index", msg=rf"entry \d+ = -?\d+ is out of range \[0, {bound}\)")


T_FWD_MAX, T_GRAD_MAX = 4 * (2**31 - 1), 65535 * 512
CASES += [
    Case("layernorm_modulate_fwd", "x_1d", "x", lambda a: dict(x=a["x"][0]), msg=r"expected a 2-D tensor"),
    Case("layernorm_modulate_fwd", "x_int", "x", lambda a: dict(x=a["x"].int()), msg=r"dtype Int not supported"),
    Case("layernorm_modulate_fwd", "shift_channels", "shift", lambda a: dict(shift=a["shift"][:, :3]),
         msg=r"has 3 channels, x has 24"),
    Case("layernorm_modulate_fwd", "scale_dtype", "scale", lambda a: dict(scale=a["scale"].double()),
         msg=r"does not match x's dtype"),
    Case("layernorm_modulate_fwd", "scale_samples", "scale", lambda a: dict(scale=a["scale"][:3]),
         msg=r"has 3 samples, shift has 4"),
    Case("layernorm_modulate_fwd", "index_int32", "index", lambda a: dict(index=a["index"].int()),
         msg=r"expected dtype int64"),
    Case("layernorm_modulate_fwd", "index_length", "index", lambda a: dict(index=a["index"][:-1]),
         msg=r"has 12 entries, x has 13 tokens"),
    Case("layernorm_modulate_fwd", "index_device", "index", lambda a: dict(index=_meta(a["index"])),
         msg=r"on device meta", meta=True),
    Case("layernorm_modulate_fwd", "shift_device", "shift", lambda a: dict(shift=_meta(a["shift"])),
         msg=r"on device meta", meta=True),
    Case("layernorm_modulate_fwd", "eps", "eps", lambda a: dict(eps=-1.0), msg=r"must be >= 0"),
    Case("layernorm_modulate_fwd", "index_values", where="cpu", mutate=lambda a: dict(index=a["index"] + 2),
         **_index_values(4)),
    Case("layernorm_modulate_fwd", "tokens", "x", lambda a: dict(x=_huge((T_FWD_MAX + 1, 24), torch.float32),
                                                                 index=_huge((T_FWD_MAX + 1,), torch.long)),
         "cuda", rf"{T_FWD_MAX + 1} tokens is more than the CUDA kernels take \(at most {T_FWD_MAX}\)", big=True),

    Case("layernorm_modulate_bwd", "grad_out_shape", "grad_out", lambda a: dict(grad_out=a["grad_out"][:-1]),
         msg=r"expected shape \[13, 24\]"),
    Case("layernorm_modulate_bwd", "mean_shape", "mean", lambda a: dict(mean=a["mean"][:-1]),
         msg=r"expected shape \[13\]"),
    Case("layernorm_modulate_bwd", "rstd_dtype", "rstd", lambda a: dict(rstd=a["rstd"].double()),
         msg=r"expected dtype Float"),
    Case("layernorm_modulate_bwd", "scale_channels", "scale", lambda a: dict(scale=a["scale"][:, 1:]),
         msg=r"has 23 channels, x has 24"),
    Case("layernorm_modulate_bwd", "index_int32", "index", lambda a: dict(index=a["index"].int()),
         msg=r"expected dtype int64"),
    Case("layernorm_modulate_bwd", "mean_device", "mean", lambda a: dict(mean=_meta(a["mean"])), msg=r"on device meta",
         meta=True),
    Case("layernorm_modulate_bwd", "index_values", where="cpu", mutate=lambda a: dict(index=a["index"] + 2),
         **_index_values(4)),
    Case("layernorm_modulate_bwd", "tokens", "x", lambda a: {
        "grad_out": _huge((T_GRAD_MAX + 1, 24), torch.float32), "x": _huge((T_GRAD_MAX + 1, 24), torch.float32),
        "index": _huge((T_GRAD_MAX + 1,), torch.long), "mean": _huge((T_GRAD_MAX + 1,), torch.float32),
        "rstd": _huge((T_GRAD_MAX + 1,), torch.float32)},
        "cuda", rf"{T_GRAD_MAX + 1} tokens is more than the CUDA backward's parameter-gradient kernel takes "
        rf"\(at most {T_GRAD_MAX}\)", big=True),

    Case("gated_residual_fwd", "x_int", "x", lambda a: dict(x=a["x"].int()), msg=r"dtype Int not supported"),
    Case("gated_residual_fwd", "y_shape", "y", lambda a: dict(y=a["y"][:-1]), msg=r"expected shape \[13, 24\]"),
    Case("gated_residual_fwd", "gate_channels", "gate", lambda a: dict(gate=a["gate"][:, :-1]),
         msg=r"has 23 channels"),
    Case("gated_residual_fwd", "gate_dtype", "gate", lambda a: dict(gate=a["gate"].half()),
         msg=r"does not match x's dtype"),
    Case("gated_residual_fwd", "index_int32", "index", lambda a: dict(index=a["index"].int()),
         msg=r"expected dtype int64"),
    Case("gated_residual_fwd", "y_device", "y", lambda a: dict(y=_meta(a["y"])), msg=r"on device meta", meta=True),
    Case("gated_residual_fwd", "index_values", where="cpu", mutate=lambda a: dict(index=a["index"] + 2),
         **_index_values(4)),

    Case("gated_residual_bwd", "grad_out_1d", "grad_out", lambda a: dict(grad_out=a["grad_out"][0]),
         msg=r"expected a 2-D tensor"),
    Case("gated_residual_bwd", "y_shape", "y", lambda a: dict(y=a["y"][:, :-1]),
         msg=r"expected shape \[13, 24\] \(grad_out's\)"),
    Case("gated_residual_bwd", "index_length", "index", lambda a: dict(index=a["index"][:-1]),
         msg=r"has 12 entries, grad_out has 13 tokens"),
    Case("gated_residual_bwd", "gate_channels", "gate", lambda a: dict(gate=a["gate"][:, 1:]),
         msg=r"has 23 channels, grad_out has 24"),
    Case("gated_residual_bwd", "gate_device", "gate", lambda a: dict(gate=_meta(a["gate"])), msg=r"on device meta",
         meta=True),
    Case("gated_residual_bwd", "index_values", where="cpu", mutate=lambda a: dict(index=a["index"] - 1),
         **_index_values(4)),
    Case("gated_residual_bwd", "tokens", "grad_out", lambda a: {
        "grad_out": _huge((T_GRAD_MAX + 1, 24), torch.float32), "y": _huge((T_GRAD_MAX + 1, 24), torch.float32),
        "index": _huge((T_GRAD_MAX + 1,), torch.long)},
        "cuda", rf"{T_GRAD_MAX + 1} tokens is more than the CUDA backward's parameter-gradient kernel", big=True),
]
CASE_IDS = [c.id for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS), "case ids must be unique"


def _message(fn, args) -> str:
    with pytest.raises(RuntimeError) as e:
        fn(**args)
    return str(e.value)


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------

def _compiled_ops():
    """The ops whose schemas _C defines (elit:: also holds the torch backend's Python custom ops)."""
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("elit::")]
    return sorted(n.split("::")[1] for n in names if "registration.cpp" in torch._C._dispatch_dump(n))


def test_every_compiled_op_has_checks_and_cases():
    ops = _compiled_ops()
    assert ops, "no op of elit_kernels._C is registered"
    assert sorted(n for n in dir(_checks()) if not n.startswith("_")) == ops
    assert sorted(VALID) == ops
    for op in ops:
        wheres = {c.where for c in CASES if c.op == op}
        assert {"both", "cpu"} <= wheres, f"{op}: cases of the shared checks and of the CPU value checks"


def test_cuda_checks_take_exactly_the_declared_head_dims():
    """The CUDA entry points' checks accept the head dims the cuda backend declares (CudaBackend.head_dims,
    the ones dispatch pads up to) and refuse every other one, in the forward and the backward."""
    from elit_kernels.attention.backends.compiled import CudaBackend

    declared = CudaBackend.head_dims
    taken = []
    for d in range(1, 257):
        a = _attn_bwd(d) if d in (1, 64, 80) else None  # a real backward's lse/out for a few dims
        q = torch.empty(5, 4, d, dtype=torch.float16)
        kv = torch.empty(5, 2, d, dtype=torch.float16)
        fwd = dict(_attn_fwd(), q=q, k=kv, v=kv)
        try:
            _checks().varlen_attn_fwd(**fwd, cuda=True)
            taken.append(d)
        except RuntimeError as e:
            assert re.match(rf"varlen_attn_fwd: q: head dim {d} is not supported by the CUDA kernels", str(e)), e
        if a is not None:
            if d in declared:
                _checks().varlen_attn_bwd(**a, cuda=True)
            else:
                with pytest.raises(RuntimeError, match=rf"^varlen_attn_bwd: q: head dim {d} is not supported"):
                    _checks().varlen_attn_bwd(**a, cuda=True)
    assert tuple(taken) == declared


def test_cuda_head_dims_declared_once_per_language():
    # The Python declaration (dispatch, padding) and the C++ list the kernels are instantiated for.
    from elit_kernels.attention import validate_inputs
    from elit_kernels.attention.backends.compiled import CudaBackend

    text = (REPO / "csrc" / "kernel_limits.h").read_text()
    dims = tuple(int(x) for x in re.search(r"kHeadDims\[\] = \{([^}]*)\}", text).group(1).split(","))
    assert CudaBackend.head_dims == dims
    cuda = CudaBackend()
    assert [cuda.run_head_dim(d) for d in (1, 64, 65, 72, 73, 128)] == [64, 64, 72, 72, 128, 128]
    assert cuda.run_head_dim(129) is None
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([2], [3], 2, 129, dtype=torch.float16)
    inp = validate_inputs(q, k, v, cq, ck, mq, mk, None, False)
    assert any("head dim 129 too large (runs 64, 72, 128)" in r for r in cuda.not_supported_reasons(inp))


@pytest.mark.parametrize("op", sorted(VALID))
def test_valid_arguments_pass_every_check(op):
    """The control of every case below: its valid arguments pass both entry points' checks and the CPU op."""
    args = VALID[op]()
    getattr(_checks(), op)(**args, cuda=True)
    getattr(_checks(), op)(**args, cuda=False)
    out = getattr(torch.ops.elit, op)(**args)
    for t in out if isinstance(out, (tuple, list)) else [out]:
        assert torch.isfinite(t.float()).all(), op


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bad_argument_is_refused_naming_it(case):
    args = VALID[case.op]()
    args.update(case.mutate(args))
    check = getattr(_checks(), case.op)
    pattern = rf"^{case.op}: {case.arg}: .*{case.msg}"
    refused = {"both": (True, True), "cuda": (True, False), "cpu": (False, True)}[case.where]
    for cuda, refuses in zip((True, False), refused):
        if refuses:
            msg = _message(lambda **a: check(**a, cuda=cuda), args)
            assert re.search(pattern, msg), f"cuda={cuda}: {msg!r} does not match {pattern!r}"
        elif not case.big:
            check(**args, cuda=cuda)  # the other entry point takes it (a CUDA-kernel limit, or a value check)
    if case.meta or case.big:
        return
    op = getattr(torch.ops.elit, case.op)
    if case.where == "cuda":
        op(**args)  # the CPU kernels take what only the CUDA kernels refuse
    else:
        msg = _message(op, args)
        assert re.search(pattern, msg), f"CPU op: {msg!r} does not match {pattern!r}"


def _run_child(code: str, timeout: float = 600) -> str:
    """Run ``code`` in a fresh interpreter on this checkout; a crash (SIGSEGV: exit code -11) fails the test."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=timeout)
    assert r.returncode == 0, (f"the child process exited with {r.returncode} (negative: killed by that signal; "
                               f"-11 is SIGSEGV)\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}")
    return r.stdout


def test_compiled_errors_raise_without_crashing_the_process():
    """Every message that formats numbers, from the CPU ops and the CUDA checks, raised in a fresh process.

    A _C linked with its own static copy of the C++ runtime (setup.py's _shared_libstdcxx) killed the process
    with SIGSEGV at the first such message, on the GPU machine: this test fails there with exit code -11.
    """
    out = _run_child("""
        import torch
        import elit_kernels._C as C
        from elit_kernels import _cext
        from elit_kernels.testing import random_varlen_inputs
        q, k, v, cq, ck, mq, mk = random_varlen_inputs([3, 2], [4, 1], 2, 80, dtype=torch.float16)
        def show(fn):
            try:
                fn()
                print("no error")
            except RuntimeError as e:
                print(str(e).splitlines()[0])
        show(lambda: torch.ops.elit.varlen_attn_fwd(q, k, v, cq, ck, -5, mk, 0.1, False))
        show(lambda: C.checks.varlen_attn_fwd(q, k, v, cq, ck, mq, mk, 0.1, False, cuda=True))
        x, index = torch.randn(3, 8), torch.tensor([0, 1, 7])
        show(lambda: torch.ops.elit.layernorm_modulate_fwd(x, torch.randn(2, 8), torch.randn(2, 8), index, 1e-6))
        """)
    assert out.splitlines() == [
        "varlen_attn_fwd: max_seqlen_q: must be >= 0, got -5",
        "varlen_attn_fwd: q: head dim 80 is not supported by the CUDA kernels (64, 72 or 128; "
        "elit_kernels.varlen_attention zero-pads smaller head dims)",
        "layernorm_modulate_fwd: index: entry 2 = 7 is out of range [0, 2) (a row of shift/scale)",
    ], out


def _dynamic_needed(path: str) -> list[str]:
    """DT_NEEDED entries of an ELF64 little-endian shared object (the libraries the loader must find)."""
    import struct
    data = Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not an ELF64 little-endian file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    dynamic = next(s for s in sections if s[1] == 6)  # SHT_DYNAMIC; its sh_link is the string table
    strtab = sections[dynamic[6]]
    needed = []
    for off in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            start = strtab[4] + val
            needed.append(data[start:data.index(b"\0", start)].decode())
    return needed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the ELF dynamic section of _C (Linux only)")
def test_extension_takes_the_cxx_runtime_from_the_shared_libstdcxx():
    """_C must not carry its own copy of the C++ runtime: it loads the shared libstdc++, as torch does.

    The GPU machine's compiler wrapper found only a static libstdc++; the _C it built had no libstdc++ among
    its needed libraries and crashed on its first formatted error message.
    """
    import elit_kernels._C as C
    needed = _dynamic_needed(C.__file__)
    assert any(n.startswith("libstdc++.so") for n in needed), needed


# ------------------------------------------------------------------------------------------------
# The build (setup.py) links the shared C++ runtime and probes the error path of what it built
# ------------------------------------------------------------------------------------------------

def _setup_helpers() -> dict:
    """setup.py's _shared_libstdcxx, _check_error_path and its probe (setup.py runs setup() when imported)."""
    import ast
    tree = ast.parse((REPO / "setup.py").read_text())
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
            or isinstance(n, ast.FunctionDef) and n.name in ("_shared_libstdcxx", "_check_error_path")
            or isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "_ERROR_PATH_PROBE" for t in n.targets)]
    ns: dict = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), ns)
    assert {"_shared_libstdcxx", "_check_error_path", "_ERROR_PATH_PROBE"} <= set(ns)
    return ns


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps (Linux only)")
def test_build_links_the_libstdcxx_this_process_runs_on():
    (path,) = _setup_helpers()["_shared_libstdcxx"]()
    assert "/libstdc++.so" in path and os.path.isfile(path)
    assert path in Path("/proc/self/maps").read_text()


def test_build_probe_accepts_the_built_extension_and_refuses_broken_ones(tmp_path):
    """The probe setup.py runs on a freshly built _C: a clean error passes; a crash (what the GPU machine's
    build did) or a mangled message (what the same static-runtime link did on a CPU machine: "got " without
    the number) fails the build."""
    import elit_kernels._C as C
    check = _setup_helpers()["_check_error_path"]
    check(C.__file__)
    stub = "class checks:\n    @staticmethod\n    def varlen_attn_fwd(*args, **kwargs):\n        {}\n"
    crash = tmp_path / "crash.py"
    crash.write_text(stub.format("import ctypes; ctypes.string_at(0)"))
    with pytest.raises(RuntimeError, match=r"(?s)exited with -11: .*SIGSEGV"):
        check(str(crash))
    mangled = tmp_path / "mangled.py"
    mangled.write_text(stub.format("raise RuntimeError('varlen_attn_fwd: max_seqlen_q: must be >= 0, got ')"))
    with pytest.raises(RuntimeError, match=r"unexpected message: varlen_attn_fwd: max_seqlen_q: must be >= 0, got\)"):
        check(str(mangled))


# ------------------------------------------------------------------------------------------------
# The CUDA ops themselves (GPU machine): each bad argument refused before launching, in one child process
# ------------------------------------------------------------------------------------------------

@needs_cuda
def test_cuda_ops_refuse_bad_arguments_before_launching():
    if not _cext.has_kernel("varlen_attn_fwd_cuda"):
        pytest.fail(f"a GPU is present but _C has no CUDA kernels (build info: {_cext.build_info()})", pytrace=False)
    cases = [c for c in CASES if c.where in ("both", "cuda") and not c.big and not c.meta]
    out = _run_child("""
        import sys, torch
        sys.path.insert(0, "tests")
        import test_compiled_checks as t
        for c in t.CASES:
            if c.where == "cpu" or c.big or c.meta:
                continue
            args = t.VALID[c.op]()
            args.update(c.mutate(args))
            args = {n: a.cuda() if isinstance(a, torch.Tensor) else a for n, a in args.items()}
            try:
                getattr(torch.ops.elit, c.op)(**args)
                print(c.id, "|no error")
            except RuntimeError as e:
                print(c.id, "|" + str(e).splitlines()[0])
        torch.cuda.synchronize()
        # Tensors on two devices: the CUDA entry point names the one on the wrong device.
        a = {n: x.cuda() if isinstance(x, torch.Tensor) else x for n, x in t._attn_fwd().items()}
        for name in ("cu_seqlens_q", "k"):
            b = dict(a, **{name: a[name].cpu()})
            try:
                torch.ops.elit.varlen_attn_fwd(**b)
                print("device-" + name, "|no error")
            except RuntimeError as e:
                print("device-" + name, "|" + str(e).splitlines()[0])
        print("after the errors, a valid call:", torch.ops.elit.varlen_attn_fwd(**a)[0].isfinite().all().item())
        """)
    got = dict(line.split(" |", 1) for line in out.splitlines() if " |" in line)
    for c in cases:
        assert re.search(rf"^{c.op}: {c.arg}: .*{c.msg}", got[c.id]), (c.id, got[c.id])
    assert re.search(r"^varlen_attn_fwd: cu_seqlens_q: on device cpu, but q is on cuda", got["device-cu_seqlens_q"])
    assert re.search(r"^varlen_attn_fwd: k: on device cpu, but q is on cuda", got["device-k"])
    assert "after the errors, a valid call: True" in out


@pytest.mark.skipif(not HAS_CUDA, reason="cuda: the C++ side of the head-dim declaration needs a GPU to call "
                    "(its checks run on CPU tensors above)")
def test_cuda_op_refuses_head_dims_outside_its_declaration():
    # In a child process: the op once crashed the process (SIGSEGV) here instead of raising, which ended the
    # whole test run; now that is a failure with its exit code.
    code = """if True:
        import torch
        import elit_kernels
        from elit_kernels.testing import random_varlen_inputs
        for d in (56, 80, 256):
            q, k, v, cq, ck, mq, mk = random_varlen_inputs([2], [3], 2, d, dtype=torch.float16, device="cuda")
            for fn, args in ((torch.ops.elit.varlen_attn_fwd, (q, k, v)),
                             (torch.ops.elit.varlen_attn_bwd, (q, q, k, v, q, torch.zeros(2, 2, device="cuda")))):
                try:
                    fn(*args, cq, ck, mq, mk, 0.1, False)
                    print("no error")
                except RuntimeError as e:
                    print(str(e).splitlines()[0])
        """
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, f"exit code {r.returncode} (-11: SIGSEGV)\n{r.stdout}\n{r.stderr[-3000:]}"
    lines = r.stdout.splitlines()
    assert len(lines) == 6, r.stdout
    for line, (d, op) in zip(lines, [(d, op) for d in (56, 80, 256) for op in ("varlen_attn_fwd", "varlen_attn_bwd")]):
        assert re.fullmatch(rf"{op}: q: head dim {d} is not supported by the CUDA kernels \(64, 72 or 128; .*\)",
                            line), line
