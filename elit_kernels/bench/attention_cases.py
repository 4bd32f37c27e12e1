"""Op-level benchmark pieces: ELIT's Read / Write / core attention shapes and every way to run them.

Used by ``benchmarks/bench_ops.py`` (the script) and ``benchmarks/test_bench_ops.py`` (pytest-benchmark).
FLOPs are the useful (ragged) ones, 4·Σ_i(Lq_i·Lk_i)·H·D forward and 2.5× that for backward, for every
method, so a method that computes padding shows it as lower TFLOP/s.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..attention import validate_inputs
from ..attention import SegmentRuns, describe_backends
from ..testing import cu_seqlens


@dataclass
class OpShape:
    name: str  # e.g. "read J=16"
    kind: str  # read / write / core
    lens_q: list[int]
    lens_k: list[int]
    heads: int
    head_dim: int

    @property
    def fwd_flops(self) -> int:
        return 4 * sum(a * b for a, b in zip(self.lens_q, self.lens_k)) * self.heads * self.head_dim

    @property
    def uniform(self) -> bool:
        return len(set(self.lens_q)) <= 1 and len(set(self.lens_k)) <= 1


def elit_shapes(cfg, batch: int, budgets: list) -> list[OpShape]:
    """Read, Write and core shapes of one ELIT forward for each entry of ``budgets``.

    An entry is an int (every sample at it) or a list of per-sample budgets (a ragged batch).
    """
    g, p, h, d = cfg.groups, cfg.tokens_per_group, cfg.heads, cfg.hidden // cfg.heads
    out = []
    for bud in budgets:
        per = [bud] * batch if isinstance(bud, int) else list(bud)
        tag = f"J={bud}" if isinstance(bud, int) else "J=" + "/".join(map(str, per))
        lat = [j for j in per for _ in range(g)]
        out.append(OpShape(f"read {tag}", "read", lat, [p] * len(lat), h, d))
        out.append(OpShape(f"write {tag}", "write", [p] * len(lat), lat, h, d))
        out.append(OpShape(f"core {tag}", "core", [g * j for j in per], [g * j for j in per], h, d))
    return out


def make_inputs(shape: OpShape, device, dtype, *, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(shape.lens_q), sum(shape.lens_k)
    q, k, v = (torch.randn(n, shape.heads, shape.head_dim, generator=g).to(device, dtype).requires_grad_(requires_grad)
               for n in (tq, tk, tk))
    cu_q, cu_k = cu_seqlens(shape.lens_q, device), cu_seqlens(shape.lens_k, device)
    return q, k, v, cu_q, cu_k, max(shape.lens_q), max(shape.lens_k)


@dataclass
class Method:
    name: str
    exact: bool  # False: a timing comparator that pads ragged segments without a mask (wrong numbers)
    build: Callable  # (q, k, v, cu_q, cu_k, mq, mk[, segments=]) -> fn() returning the output [total_q, H, D]
    #: build takes ``segments=`` (the shape's SegmentRuns: host-side lengths, as the ELIT model passes them)
    segments: bool = False


def _backend_method(name, with_segments: bool = True, checked: bool = False):
    """``varlen_attention`` on backend ``name`` (None: default dispatch), handed the host-side segments as the
    model does (``with_segments``), or only the tensors, as a flash-attn drop-in caller does. ``checked``
    (without segments): the value checks on for the call, as they are by default, whatever the bench set: one
    host read of both ``cu_seqlens`` (a device sync on a GPU) and the segments it finds carried into dispatch
    (``inputs._checked_segments``): what a ``flash_attn_varlen_func`` caller gets out of the box
    (``elit:default(drop-in)``)."""
    from ..attention import set_value_checks, value_checks_enabled, varlen_attention

    def build(q, k, v, cu_q, cu_k, mq, mk, segments=None):
        seg = segments if with_segments else None
        if not checked:
            return lambda: varlen_attention(q, k, v, cu_q, cu_k, mq, mk, backend=name, segments=seg)

        def call():
            was = value_checks_enabled()
            set_value_checks(True)
            try:
                return varlen_attention(q, k, v, cu_q, cu_k, mq, mk, backend=name)
            finally:
                set_value_checks(was)
        return call
    label = f"elit:{name or 'default'}" + ("" if with_segments else "(drop-in)" if checked else "(no segments)")
    return Method(label, True, build, segments=True)


def _pad(x, lens, lmax):
    """Packed -> [S, H, Lmax, D] (setup, untimed: these comparators get their padded batch for free)."""
    s = len(lens)
    out = x.new_zeros(s, lmax, *x.shape[1:])
    off = 0
    for i, n in enumerate(lens):
        out[i, :n] = x[off:off + n]
        off += n
    return out.transpose(1, 2).detach().requires_grad_(x.requires_grad)


def _sdpa_method(label, sdpa_backend):
    from torch.nn.attention import sdpa_kernel

    def build(q, k, v, cu_q, cu_k, mq, mk):
        lq = (cu_q[1:] - cu_q[:-1]).tolist()
        lk = (cu_k[1:] - cu_k[:-1]).tolist()
        qp, kp, vp = _pad(q, lq, mq), _pad(k, lk, mk), _pad(v, lk, mk)

        def fn():
            with sdpa_kernel([sdpa_backend]):
                return F.scaled_dot_product_attention(qp, kp, vp)
        fn.grad_tensors = (qp, kp, vp)
        return fn
    return Method(label, False, build)


def _flex_method(compiled: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def build(q, k, v, cu_q, cu_k, mq, mk):
        dev = q.device
        nq, nk = q.shape[0], k.shape[0]
        seg = torch.arange(cu_q.shape[0] - 1, device=dev)
        doc_q = seg.repeat_interleave((cu_q[1:] - cu_q[:-1]).long(), output_size=nq)
        doc_k = seg.repeat_interleave((cu_k[1:] - cu_k[:-1]).long(), output_size=nk)

        def doc_mask(b, h, qi, ki):
            return doc_q[qi] == doc_k[ki]
        bm = create_block_mask(doc_mask, None, None, nq, nk, device=dev)
        qq, kk, vv = (t.detach().transpose(0, 1)[None].requires_grad_(t.requires_grad) for t in (q, k, v))

        def fn():
            return flex(qq, kk, vv, block_mask=bm)
        fn.grad_tensors = (qq, kk, vv)
        return fn
    return Method("flex_attention" + ("" if compiled else "(eager)"), True, build)


def available_methods(device: torch.device, dtype: torch.dtype, head_dim: int, heads: int, *,
                      include_reference: bool = False) -> list[Method]:
    """Every backend that supports these inputs, plus SDPA flash / cuDNN (CUDA) and FlexAttention. A backend
    limited in segment length (``triton_window``: at most 128 keys) is probed on short segments and listed; on
    the shapes it cannot run (the core) its row says why."""
    q = torch.zeros(4, heads, head_dim, device=device, dtype=dtype)
    cu = torch.tensor([0, 2, 4], dtype=torch.int32, device=device)
    probe = validate_inputs(q, q, q, cu, cu, 2, 2, None, False, segments=SegmentRuns.uniform_runs(2, 2, 2))
    methods = [_backend_method(None), _backend_method(None, with_segments=False),
               _backend_method(None, with_segments=False, checked=True)]
    for r in describe_backends(probe):
        if r["reasons"] or (r["name"] == "reference" and not include_reference):
            continue
        if r["name"] in ("triton", "triton_window") and device.type != "cuda":
            continue  # the interpreter is a correctness tool, not a benchmark
        methods.append(_backend_method(r["name"]))
    from torch.nn.attention import SDPBackend

    if device.type == "cuda":
        methods.append(_sdpa_method("sdpa_flash(padded)", SDPBackend.FLASH_ATTENTION))
        methods.append(_sdpa_method("sdpa_cudnn(padded)", SDPBackend.CUDNN_ATTENTION))
        methods.append(_sdpa_method("sdpa_efficient(padded)", SDPBackend.EFFICIENT_ATTENTION))
    else:
        methods.append(_sdpa_method("sdpa_cpu(padded)", SDPBackend.FLASH_ATTENTION))
    try:
        methods.append(_flex_method(compiled=device.type == "cuda"))
    except ImportError:
        pass
    return methods


def make_fn(method: Method, shape: OpShape, device, dtype, *, backward: bool, seed=0):
    """A zero-argument callable timing ``method`` on ``shape`` (fwd, or fwd+bwd), and the tensors
    whose .grad do_bench should reset."""
    inp = make_inputs(shape, device, dtype, requires_grad=backward, seed=seed)
    f = (method.build(*inp, segments=SegmentRuns.from_lengths(shape.lens_q, shape.lens_k)) if method.segments
         else method.build(*inp))
    if not backward:
        def fwd():
            with torch.no_grad():
                return f()
        return fwd, None
    leaves = getattr(f, "grad_tensors", inp[:3])
    out = f()
    dout = torch.randn_like(out)

    def fwd_bwd():
        o = f()
        o.backward(dout)
    return fwd_bwd, list(leaves)


def quiet_warnings():
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


def min_bytes(shape: OpShape, elem_size: int) -> int:
    """The fewest bytes a forward moves through memory: q, k and v read once, out written once."""
    return (2 * sum(shape.lens_q) + 2 * sum(shape.lens_k)) * shape.heads * shape.head_dim * elem_size


def dispatch_overhead_us(device, dtype, heads: int, head_dim: int, reps: int = 300) -> dict:
    """Host microseconds per call that ``varlen_attention`` and an ``AttentionPlan`` (the model's path) add to
    the backend they pick, on a Read-like call (8 windows of 4 latents x 16 tokens) with host-side segments.

    The added work is timed alone: for the measurement both paths run with the backend's work replaced by a no-op
    (``run_backend``, and the callable a plan keeps from ``Backend.plan_runner``), so what is timed is their
    argument checks, dispatch and the building of the validated inputs, free of the kernel's own time and noise
    (on a CPU the kernel is far longer than the overhead). ``direct`` is the backend's own work, for scale: its
    ``plan_runner`` where it has one (for the ``torch`` backends the views and the one SDPA call a caller would
    write by hand), else ``run_backend`` on validated inputs. Each is the median of five interleaved rounds of
    ``reps`` calls. Returns ``{"added_us", "plan_added_us", "direct_us": us per call, "backend": name}``."""
    import statistics
    import time

    from .. import attention as A
    from ..attention import AttentionPlan, plan as P, run_backend, select_backend, validate_inputs, varlen_attention
    from ..attention.registry import kept_runner

    lens_q, lens_k = [4] * 8, [16] * 8
    seg = SegmentRuns.from_lengths(lens_q, lens_k)
    q, k, v, cq, ck, mq, mk = make_inputs(OpShape("overhead", "read", lens_q, lens_k, heads, head_dim), device, dtype)
    inp = validate_inputs(q, k, v, cq, ck, mq, mk, None, False, segments=seg)
    b = select_backend(inp)
    runner = kept_runner(b, inp)  # what the plan below keeps (its calls then run only this)
    direct = runner if runner is not None else (lambda q, k, v: run_backend(b, inp))
    plan = AttentionPlan(cq, ck, mq, mk, segments=seg)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    fns = {"added_us": lambda: varlen_attention(q, k, v, cq, ck, mq, mk, segments=seg),
           "plan_added_us": lambda: plan(q, k, v), "direct_us": lambda: direct(q, k, v)}
    times: dict = {name: [] for name in fns}

    def nop(backend, inp):
        return None

    def nop_runner(inp):  # the plan keeps this instead of the backend's runner: its calls then do no kernel work
        return None if runner is None else (lambda q, k, v: None)

    b.plan_runner = nop_runner  # on this instance only, until the finally below
    try:
        with torch.no_grad():
            for name, fn in fns.items():  # warm: the first calls check and dispatch (and the plan caches its choice)
                for _ in range(20):
                    fn()
            for _ in range(5):
                for name, fn in fns.items():
                    if name != "direct_us":
                        A.run_backend, P.run_backend = nop, nop
                    try:
                        sync()
                        t0 = time.perf_counter()
                        for _ in range(reps):
                            fn()
                        sync()
                    finally:
                        A.run_backend, P.run_backend = run_backend, run_backend
                    times[name].append((time.perf_counter() - t0) / reps * 1e6)
    finally:
        del b.plan_runner
    out: dict = {name: statistics.median(ts) for name, ts in times.items()}
    out["backend"] = b.name
    return out
