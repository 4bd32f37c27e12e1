"""First-use known-answer checks: dispatch never trusts a kernel that has not run correctly here.

Before the default dispatch (``backend=None``) first hands a compiled backend (``Backend.known_answer``:
``cuda``, ``triton``, ``cpp``) inputs of a new kind -- a (backend, device, dtype, head dim it runs at,
causal, GQA, gradients) combination -- it runs a small random case of that kind on the backend and on the
``reference`` backend and compares them with the project's tolerance rule (``testing.assert_close_to_reference``:
``max|out − ref| ≤ 2·max|ref_lowprec − ref| + atol``; with gradients, dq/dk/dv too). The verdict is cached
for the process. A backend that fails (wrong numbers, NaN, or an exception) gets one ``RuntimeWarning`` naming
it and the error, and the dispatcher moves on to the next backend for those inputs.

- Modes (``set_known_answer_checks`` or ``$ELIT_KNOWN_ANSWER``): ``"auto"`` (default) checks inputs on CUDA
  devices, where kernels are new and a wrong one is expensive; ``"on"`` checks every device (CPU included:
  tests use it); ``"off"`` never checks.
- An explicitly requested backend (``backend="cuda"``) is never checked: you asked for it.
- Under ``torch.compile`` tracing and CUDA-graph capture no case can run. A verdict already cached is used
  (a failed backend stays skipped); a combination never checked is trusted as it is. To have it checked,
  make one eager call first (the usual warm-up before capture does this) or call ``verify_backend``.
"""
from __future__ import annotations

import warnings

import torch

from .._env import env_choice
from .._types import check_bool
from ..testing import assert_close_to_reference, cu_seqlens, default_atol
from .inputs import _capturing, validate_inputs
from .registry import get_backend, reasons, run_backend

MODES = ("auto", "on", "off")
_mode = env_choice("ELIT_KNOWN_ANSWER", MODES, "auto")
_VERDICTS: dict[tuple, str | None] = {}
#: bumped when the mode changes or verdicts are cleared: dispatch's cached decisions depend on both
generation = 0
# Segments of the known-answer case: a single query, Lq < Lk, Lq = Lk, lengths off the 16-row tiles.
_LENS_Q, _LENS_K = [1, 7, 20], [5, 7, 33]


def set_known_answer_checks(mode: str) -> None:
    """``"auto"`` (CUDA inputs), ``"on"`` (every device) or ``"off"``; see the module docstring."""
    global _mode, generation
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    _mode = mode
    generation += 1


def known_answer_checks() -> str:
    return _mode if _mode in MODES else "auto"


def clear_verdicts() -> None:
    """Forget every cached verdict (the next dispatch of each kind checks again)."""
    global generation
    _VERDICTS.clear()
    generation += 1


def verdicts() -> dict:
    """The cached verdicts: key (backend, device, dtype, head dim, causal, gqa, grad) -> None (passed) or the error."""
    return dict(_VERDICTS)


def _key(b, device, dtype, head_dim: int, causal: bool, gqa: bool, grad: bool, masked: bool = False) -> tuple:
    return (b.name, str(device), str(dtype).replace("torch.", ""), b.run_head_dim(head_dim), causal, gqa, grad,
            masked)


# A kind with a sliding window or softcap is checked on this window and cap together.
_MASKED_CASE = dict(window_size=(3, 2), softcap=5.0)


def check_dispatch(b, inp) -> str | None:
    """The dispatcher's question: may default dispatch use backend ``b`` for ``inp``? None = yes (passed, or
    not checked: mode, capture, or ``b.known_answer`` False); otherwise why not."""
    mode = known_answer_checks()
    if not getattr(b, "known_answer", False) or mode == "off" or (mode == "auto" and inp.q.device.type != "cuda"):
        return None
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (inp.q, inp.k, inp.v))
    masked = inp.has_window or inp.softcap != 0.0
    key = _key(b, inp.q.device, inp.q.dtype, inp.head_dim, inp.causal, inp.num_kv_heads != inp.num_heads, grad, masked)
    if key in _VERDICTS or _capturing():
        return _VERDICTS.get(key)
    verdict = _run_case(b, inp.q.device, inp.q.dtype, inp.head_dim, inp.causal, inp.num_kv_heads != inp.num_heads, grad,
                        masked)
    _VERDICTS[key] = verdict
    if verdict is not None:
        warnings.warn(f"elit_kernels: backend {b.name!r} failed its known-answer check on {key[1]} {key[2]}, head dim "
                      f"{inp.head_dim}{', causal' if inp.causal else ''}{', GQA' if key[5] else ''}"
                      f"{', with gradients' if grad else ''}: {verdict}. Dispatching these inputs to the next backend.",
                      RuntimeWarning, stacklevel=4)
    return verdict


def verify_backend(name: str, device="cuda", dtype=torch.bfloat16, head_dim: int = 64, *, causal: bool = False,
                   gqa: bool = False, grad: bool = True) -> str | None:
    """Run the known-answer case for backend ``name`` now (eagerly) and cache the verdict: None when it
    passed, else the error. Use before ``torch.compile`` / CUDA-graph capture, where no check can run.

    Raises (and caches no verdict: the backend is not at fault) ValueError naming ``device`` when it is a CUDA
    device and CUDA is not available; ValueError / TypeError naming ``backend`` for an unknown name, ``dtype``
    for anything but a floating-point ``torch.dtype``, ``head_dim`` for anything but an int in [1, 256],
    ``causal`` / ``gqa`` / ``grad`` for anything but a bool."""
    b = get_backend(name)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or not 1 <= head_dim <= 256:
        raise ValueError(f"head_dim: expected an int in [1, 256], got {head_dim!r}")
    causal, gqa, grad = (check_bool(flag, value) for flag, value in
                         (("causal", causal), ("gqa", gqa), ("grad", grad)))
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {str(dev)!r} is not available here (torch.cuda.is_available() is False); "
                         "pass device='cpu' to check a CPU backend")
    verdict = _run_case(b, dev, dtype, head_dim, causal, gqa, grad)
    _VERDICTS[_key(b, dev, dtype, head_dim, causal, gqa, grad)] = verdict
    return verdict


def _run_case(b, device, dtype, head_dim: int, causal: bool, gqa: bool, grad: bool, masked: bool = False) -> str | None:
    heads, kv_heads = (4, 2) if gqa else (2, 2)
    g = torch.Generator().manual_seed(20261129)
    tq, tk = sum(_LENS_Q), sum(_LENS_K)
    base = [torch.randn(n, h, head_dim, generator=g) for n, h in ((tq, heads), (tk, kv_heads), (tk, kv_heads))]
    dout = torch.randn(tq, heads, head_dim, generator=g)
    cu_q, cu_k = cu_seqlens(_LENS_Q, device), cu_seqlens(_LENS_K, device)
    ref = get_backend("reference")

    def inputs(dt, requires_grad, return_lse=False):
        qkv = [t.to(device=device, dtype=dt).requires_grad_(requires_grad) for t in base]
        return qkv, validate_inputs(*qkv, cu_q, cu_k, max(_LENS_Q), max(_LENS_K), None, causal,
                                    return_lse=return_lse, **(_MASKED_CASE if masked else {}))

    def run(backend, dt):
        qkv, inp = inputs(dt, grad)
        with torch.enable_grad() if grad else torch.no_grad():
            out = run_backend(backend, inp)
            grads = torch.autograd.grad(out, qkv, dout.to(device=device, dtype=dt)) if grad else ()
        return [out.detach(), *grads]

    def lse(backend, inp):
        with torch.no_grad():
            return run_backend(backend, inp)[1]

    wide = torch.float64 if dtype == torch.float64 else torch.float32
    try:
        got = run(b, dtype)
        truth = run(ref, wide)
        low = run(ref, dtype)
        for name, a, t, lo in zip(("out", "dq", "dk", "dv"), got, truth, low):
            assert_close_to_reference(a, t, lo, atol=default_atol(dtype), name=name)
        low_inp = inputs(dtype, False, return_lse=True)[1]
        if not reasons(b, low_inp):  # the log-sum-exp, where b returns one
            a, t, lo = lse(b, low_inp), lse(ref, inputs(wide, False, return_lse=True)[1]), lse(ref, low_inp)
            seen = torch.isfinite(t)  # +inf on rows that see no key, in every backend
            if not torch.equal(seen, torch.isfinite(a)):
                raise AssertionError("lse: not +inf exactly on the rows that see no key")
            assert_close_to_reference(a[seen], t[seen], lo[seen], atol=default_atol(dtype), name="lse")
    except AssertionError as e:
        return f"{str(e).splitlines()[0][:300]}"
    except Exception as e:  # noqa: BLE001 - a kernel that raises is a kernel that failed
        return f"raised {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return None
