"""Test helpers shared by the test suite and the benchmarks: random ragged inputs and the tolerance rule."""
from __future__ import annotations

from typing import Sequence

import torch

from ._types import check_bool, is_int
from .reference.attention import varlen_attention_reference


def cu_seqlens(lengths: Sequence[int], device="cpu") -> torch.Tensor:
    """Segment lengths -> int32 cumulative offsets ``[S+1]`` starting at 0."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    if len(lengths):
        out[1:] = torch.cumsum(torch.tensor(list(lengths), dtype=torch.int64), 0).to(torch.int32)
    return out.to(device)


def random_varlen_inputs(lens_q: Sequence[int], lens_k: Sequence[int], heads: int, head_dim: int, *,
                         dtype=torch.float32, device="cpu", seed: int = 0, requires_grad: bool = False,
                         kv_heads: int | None = None, extra_q: int = 0, extra_k: int = 0,
                         extra_fill: float | None = float("nan")):
    """Fresh random (q, k, v, cu_q, cu_k, max_q, max_k) for the given segment lengths (seeded).

    ``kv_heads`` (default ``heads``) gives k/v fewer heads (GQA). ``extra_q`` / ``extra_k`` append rows
    past ``cu_seqlens_*[-1]`` (a static buffer longer than the packed data), filled with ``extra_fill``
    (NaN by default, so a kernel that reads them fails; None: random values).
    """
    for name, lens in (("lens_q", lens_q), ("lens_k", lens_k)):
        if isinstance(lens, (str, bytes)) or not hasattr(lens, "__len__") or \
                not all(is_int(n) and n >= 0 for n in lens):
            raise ValueError(f"{name}: expected a sequence of segment lengths (ints >= 0), got {lens!r}")
    if len(lens_q) != len(lens_k):
        raise ValueError(f"lens_k: expected {len(lens_q)} segments like lens_q, got {len(lens_k)}")
    kv_heads = heads if kv_heads is None else kv_heads
    g = torch.Generator().manual_seed(int(seed))  # a NumPy integer seed too
    tq, tk = sum(lens_q) + extra_q, sum(lens_k) + extra_k
    q = torch.randn(tq, heads, head_dim, generator=g)
    k = torch.randn(tk, kv_heads, head_dim, generator=g)
    v = torch.randn(tk, kv_heads, head_dim, generator=g)
    if extra_fill is not None:
        q[sum(lens_q):] = extra_fill
        k[sum(lens_k):] = extra_fill
        v[sum(lens_k):] = extra_fill
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return (q, k, v, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device),
            max(lens_q, default=0), max(lens_k, default=0))


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, ref_lowprec: torch.Tensor, *,
                              atol: float = 1e-5, factor: float = 2.0, rms_rtol: float | None = None,
                              rms_atol: float | None = None, name: str = "out") -> None:
    """The tolerance rule (docs/design.md §4): flash-attn's max rule and an RMS rule next to it.

    ``ref`` is the reference in fp32/fp64, ``ref_lowprec`` the reference run in the kernel's own dtype (same
    shape as ``ref``); ``out`` must have ``ref``'s shape and be finite (NaN/Inf always fails), and meet both

    - ``max|out - ref| <= factor * max|ref_lowprec - ref| + atol`` (flash-attn's tests' rule: no element far
      off), and
    - ``rms(out - ref) <= factor * rms(ref_lowprec - ref) + rms_rtol * max|ref| + rms_atol`` (no error on every
      element: a bias or scale a little under the max rule's bound passes it, not this; ``rms_atol`` is a floor
      for a reference that is exactly zero). ``rms_rtol`` / ``rms_atol`` default to ``default_rms_rtol`` /
      ``default_rms_atol`` of ``out.dtype``.

    Raises AssertionError naming ``name`` with the worst element, the relative RMS error and the bound it broke;
    ValueError when ``ref_lowprec``'s shape is not ``ref``'s (a broadcast would change the bound).
    """
    if ref_lowprec.shape != ref.shape:
        raise ValueError(f"ref_lowprec: shape {tuple(ref_lowprec.shape)} != reference shape {tuple(ref.shape)} "
                         f"(it is the reference run in the kernel's dtype on the same inputs)")
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        bad = (~torch.isfinite(out)).sum().item()
        raise AssertionError(f"{name}: {bad} non-finite elements")
    if out.numel() == 0:
        return
    d = out.double() - ref.double()
    err = d.abs().max().item()
    base = max_abs_err(ref_lowprec, ref)
    bound = factor * base + atol
    r = ref.double()
    rel_rms = (d.square().mean() / r.square().mean().clamp_min(1e-30)).sqrt().item()
    if not err <= bound:
        # One bad element points to masking / indexing, drift everywhere to precision.
        where = tuple(int(i) for i in torch.unravel_index(d.abs().argmax(), d.shape))
        raise AssertionError(f"{name}: max abs err {err:.3g} at {where} > {factor}*{base:.3g} + {atol:g} = "
                             f"{bound:.3g}; relative RMS err {rel_rms:.3g}, {(d.abs() > bound).sum().item()} elements over")
    rtol = default_rms_rtol(out.dtype) if rms_rtol is None else rms_rtol
    rms = d.square().mean().sqrt().item()
    rms_base = (ref_lowprec.double() - r).square().mean().sqrt().item()
    floor = default_rms_atol(out.dtype) if rms_atol is None else rms_atol
    rms_bound = factor * rms_base + rtol * r.abs().max().item() + floor
    if not rms <= rms_bound:
        raise AssertionError(f"{name}: RMS err {rms:.3g} > {factor}*{rms_base:.3g} + {rtol:g}*max|ref| + "
                             f"{floor:g} = {rms_bound:.3g} "
                             f"(mean err {d.mean().item():.3g}, relative RMS err {rel_rms:.3g}): an error on every "
                             f"element, such as a bias or a scale, under the max abs bound {bound:.3g}")


#: the dtypes the tolerance rule has tolerances for (``default_atol``)
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_dtype(dtype) -> None:
    """TypeError naming ``dtype`` unless it is one of ``DTYPES``."""
    if dtype not in DTYPES:
        raise TypeError(f"dtype: expected one of {', '.join(str(d) for d in DTYPES)}, got {dtype!r}")


def default_atol(dtype: torch.dtype) -> float:
    """``atol`` of the max rule for inputs of ``dtype`` (unit-scale random inputs): what a kernel that rounds
    its intermediate products to ``dtype`` (flash-style P and dS) may add over the reference, which accumulates
    in fp32 and rounds only its outputs."""
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def default_rms_rtol(dtype: torch.dtype) -> float:
    """``rms_rtol`` of the RMS rule for inputs of ``dtype``: 1.5 units of roundoff of the 16-bit types (2**-8
    bfloat16, 2**-11 float16), 1e-6 for float32, 1e-12 for float64, times ``max|ref|``. Calibrated on CPU against
    an fp64 emulation of a flash-style kernel's roundings (P, dS and O rounded to the dtype, delta from the
    rounded O): its RMS error reached 0.55 of this bound at worst (a lone single-query segment, head dim 8),
    typically 0.2-0.5; a bias of 0.02 on unit-scale bfloat16 outputs breaks it."""
    table = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1.5 * 2 ** -11, torch.bfloat16: 1.5 * 2 ** -8}
    if dtype in table:
        return table[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    return 0.75 * torch.finfo(dtype).eps  # other float types (float8): 1.5 units of their roundoff


def default_rms_atol(dtype: torch.dtype) -> float:
    """``rms_atol`` of the RMS rule for inputs of ``dtype``: the floor for a reference that is exactly zero (a lone
    key's dq, where P (dP - delta) cancels and a correct kernel leaves the noise of its fp32 sums, ~1e-7 times the
    cancelling terms, ~1e-6 at unit scale): the max rule's ``atol`` for float32 / float64 (already at that noise),
    1e-4 for the other types, a hundred times that noise and well under any bias the RMS rule is there to catch."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    return default_atol(dtype) if dtype in (torch.float64, torch.float32) else 1e-4


def check_backend_against_reference(fn, lens_q, lens_k, heads, head_dim, dtype, *, causal=False, seed=0,
                                    grads=True, device="cpu", scale=None, kv_heads=None, extra_q=0, extra_k=0,
                                    check_lse=False, window_size=(-1, -1), softcap=0.0):
    """Run ``fn`` (a varlen_attention-like callable) and check values and gradients against the reference.

    ``fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)`` gets fresh
    random inputs (``random_varlen_inputs``, seeded by ``seed``): q ``[sum(lens_q), heads, head_dim]``, k/v
    ``[sum(lens_k), kv_heads, head_dim]`` in ``dtype`` on ``device``, requiring grad when ``grads``; it returns
    ``out`` (``(out, lse)`` with ``check_lse``). ``lens_q`` / ``lens_k``: the segments' lengths, one int each
    per segment (0 allowed); ``scale`` defaults to ``head_dim ** -0.5``.

    ``ref`` is computed in fp64 from the same inputs, ``ref_lowprec`` by the reference in ``dtype``; each of
    out, dq, dk, dv must meet ``assert_close_to_reference`` with ``default_atol(dtype)``,
    ``default_rms_rtol(dtype)`` and ``default_rms_atol(dtype)``.
    ``kv_heads``, ``extra_q`` / ``extra_k`` as in ``random_varlen_inputs`` (the extra rows are NaN: an
    output row or a gradient there must come out an exact zero). With ``check_lse``, ``fn`` returns
    ``(out, lse)`` and lse is checked against the fp64 log-sum-exp (+inf exactly where a row sees no key).
    ``window_size`` / ``softcap`` go to the reference; ``fn`` (whose signature has no place for them) must
    apply the same ones itself.
    Run it with the output poison switch on (``ELIT_POISON_OUTPUTS=1``, ``elit_kernels._outputs``): a row a
    kernel leaves unwritten is then NaN, and any NaN fails here.

    Returns ``fn``'s output. Raises AssertionError naming the tensor (``out``, ``dq``, ``dk``, ``dv``, ``lse``)
    and what is wrong: its worst error against the bound, non-finite elements, a shape, dtype or device other than
    q's, an output no gradient flows through, rows past the packed data that are not exact zeros; ValueError /
    TypeError naming the argument (``fn``, ``lens_q``, ``lens_k``, ``heads``, ``head_dim``, ``kv_heads``, ``dtype``:
    float64/32/16 or bfloat16, ``extra_q`` / ``extra_k`` / ``seed``: ints >= 0, ``causal`` / ``grads`` /
    ``check_lse``: bools) for bad arguments.
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a callable with varlen_attention's positional arguments, got {type(fn).__name__}")
    for name, n, lo in (("heads", heads, 1), ("head_dim", head_dim, 1), ("extra_q", extra_q, 0),
                        ("extra_k", extra_k, 0), ("seed", seed, 0)):
        if not is_int(n) or n < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {n!r}")
    if kv_heads is not None and (not is_int(kv_heads) or kv_heads < 1 or heads % kv_heads):
        raise ValueError(f"kv_heads: expected None or an int >= 1 that divides heads={heads}, got {kv_heads!r}")
    check_dtype(dtype)
    causal, grads, check_lse = (check_bool(n, v) for n, v in (("causal", causal), ("grads", grads),
                                                              ("check_lse", check_lse)))
    q, k, v, cu_q, cu_k, mq, mk = random_varlen_inputs(lens_q, lens_k, heads, head_dim, dtype=dtype, device=device,
                                                       seed=seed, requires_grad=grads, kv_heads=kv_heads,
                                                       extra_q=extra_q, extra_k=extra_k)
    sc = head_dim ** -0.5 if scale is None else scale
    g = torch.Generator().manual_seed(int(seed) + 1)
    dout = torch.randn(q.shape, generator=g).to(device=device, dtype=dtype)
    lses = {}

    def run(f, tensors, key):
        qq, kk, vv = tensors
        o = f(qq, kk, vv, cu_q, cu_k, mq, mk, sc, causal)
        if check_lse:
            if not (isinstance(o, (tuple, list)) and len(o) == 2):
                raise AssertionError(f"out: with check_lse the callable must return (out, lse), got "
                                     f"{type(o).__name__}")
            o, lses[key] = o
        if not isinstance(o, torch.Tensor) or o.shape != qq.shape or o.dtype != qq.dtype or o.device != qq.device:
            got = f"{tuple(o.shape)} {o.dtype} on {o.device}" if isinstance(o, torch.Tensor) else type(o).__name__
            raise AssertionError(f"out: expected a tensor of q's shape, dtype and device ({tuple(qq.shape)} "
                                 f"{qq.dtype} on {qq.device}), got {got}")
        if not grads:
            return o, ()
        if not o.requires_grad:
            raise AssertionError("out: does not require grad, so no gradient reaches q, k, v (the callable "
                                 "detached it, or ran without autograd)")
        gq, gk, gv = torch.autograd.grad(o, (qq, kk, vv), dout.to(o.dtype), allow_unused=True)
        zero = torch.zeros_like
        return o, (gq if gq is not None else zero(qq), gk if gk is not None else zero(kk),
                   gv if gv is not None else zero(vv))

    def ref_fn(qq, kk, vv, cq, ck, _mq, _mk, s, c):
        return varlen_attention_reference(qq, kk, vv, cq, ck, softmax_scale=s, causal=c, return_lse=check_lse,
                                          window_size=window_size, softcap=softcap)

    def detach(t, dt):
        return t.detach().to(dt).requires_grad_(grads)

    out, gr = run(fn, (q, k, v), "out")
    ref, gref = run(ref_fn, tuple(detach(t, torch.float64) for t in (q, k, v)), "ref")
    low, glow = run(ref_fn, tuple(detach(t, dtype) for t in (q, k, v)), "low")
    atol, rtol, floor = default_atol(dtype), default_rms_rtol(dtype), default_rms_atol(dtype)
    assert_close_to_reference(out, ref, low, atol=atol, rms_rtol=rtol, rms_atol=floor, name="out")
    for name, a, b, c in zip(("dq", "dk", "dv"), gr, gref, glow):
        assert_close_to_reference(a, b, c, atol=atol, rms_rtol=rtol, rms_atol=floor, name=name)
    tq, tk = cu_q[-1].item(), cu_k[-1].item()
    for name, t in (("out", out), ("dq", gr[0] if grads else None), ("dk", gr[1] if grads else None),
                    ("dv", gr[2] if grads else None)):
        if t is None:
            continue
        rows = t[tq:] if name in ("out", "dq") else t[tk:]
        if not torch.equal(rows, torch.zeros_like(rows)):
            raise AssertionError(f"{name}: rows past cu_seqlens[-1] are not exact zeros")
    if check_lse:
        lse, lref = lses["out"], lses["ref"]
        if lse.shape != lref.shape or lse.dtype != (torch.float64 if dtype == torch.float64 else torch.float32):
            raise AssertionError(f"lse: shape {tuple(lse.shape)} dtype {lse.dtype}, expected {tuple(lref.shape)} "
                                 "float32 (float64 for float64 inputs)")
        blind = torch.isinf(lref)
        if not torch.equal(torch.isposinf(lse), blind):
            raise AssertionError("lse: +inf must mark exactly the rows that see no key")
        assert_close_to_reference(lse[~blind], lref[~blind], lses["low"][~blind].double(), atol=atol, rms_rtol=rtol,
                                  rms_atol=floor, name="lse")
    return out
