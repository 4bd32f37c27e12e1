"""First-use known-answer checks: dispatch never trusts a kernel that has not run correctly here.

Before the default dispatch (``backend=None``) first hands a backend with ``Backend.known_answer`` (every one except
``reference``, ``torch`` and ``flash_attn``: ``cuda``, ``triton``, ``triton_window``, ``cpp``, ``torch_varlen``,
``sdpa_*``) inputs of a new kind -- a (backend, device, dtype, head dim it runs at, causal, GQA, gradients, masked: a
window or softcap) combination -- it runs a small random case of that kind on the backend and on the ``reference``
backend and compares them with the project's tolerance rule (``testing.assert_close_to_reference``: ``max|out − ref|
≤ 2·max|ref_lowprec − ref| + atol`` and ``rms(out − ref) ≤ 2·rms(ref_lowprec − ref) + rms_rtol·max|ref|`` against an
fp64 truth; with gradients, dq/dk/dv too). The verdict is cached for the process. A backend that fails (wrong
numbers, NaN, or an exception) gets one ``RuntimeWarning`` naming it and the error, and the dispatcher moves on to
the next backend for those inputs.

- Modes (``set_known_answer_checks`` or ``$ELIT_KNOWN_ANSWER``): ``"auto"`` (default) checks inputs on CUDA
  devices, where kernels are new and a wrong one is expensive; ``"on"`` checks every device (CPU included:
  tests use it); ``"off"`` never checks.
- An explicitly requested backend (``backend="cuda"``) is never checked: you asked for it.
- Under ``torch.compile`` tracing and CUDA-graph capture no case can run. A verdict already cached is used
  (a failed backend stays skipped); a combination never checked is trusted as it is. To have it checked,
  make one eager call first (the usual warm-up before capture does this) or call ``verify_backend``.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from .._amp import inputs_dtype
from .._env import env_choice
from .._precision import fp32_matmul_precision
from .._types import check_bool, is_int
from ..testing import (assert_close_to_reference, check_dtype, cu_seqlens, default_atol, default_rms_atol,
                       default_rms_rtol)
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
    """The cached verdicts: key (backend, device, dtype, head dim it runs at, causal, gqa, grad, masked) -> None
    (passed) or the error."""
    return dict(_VERDICTS)


def _device_key(device) -> str:
    """``device`` as a tensor on it names it: with its index (``torch.device("cuda")`` is the current CUDA
    device, and a CUDA tensor's device is ``cuda:0``, so a verdict stored under ``"cuda"`` would never be
    found)."""
    dev = torch.device(device)
    if dev.type == "cpu":  # a CPU tensor's device is "cpu", whatever index was asked for
        return "cpu"
    if dev.index is None:
        module = getattr(torch, dev.type, None)
        current = getattr(module, "current_device", None)
        dev = torch.device(dev.type, current() if callable(current) else 0)
    return str(dev)


def _dtype_key(device, dtype) -> str:
    """The dtype as the verdict knows it: float32 on CUDA carries PyTorch's float32 matmul setting
    (``float32/tf32`` or ``float32/ieee``), which the Triton kernels and cuBLAS follow: a verdict found under one
    setting says nothing of the other."""
    if dtype == torch.float32 and (device if isinstance(device, torch.device) else torch.device(device)).type == "cuda":
        return "float32/" + fp32_matmul_precision()
    return _DTYPE_NAMES.get(dtype) or str(dtype).replace("torch.", "")


#: the names ``_dtype_key`` gives the float dtypes, without building the string on every dispatch decision
_DTYPE_NAMES = {d: str(d).replace("torch.", "") for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _key(b, device, dtype, head_dim: int, causal: bool, gqa: bool, grad: bool, masked: bool = False) -> tuple:
    return (b.name, _device_key(device), _dtype_key(device, dtype), b.run_head_dim(head_dim), causal, gqa,
            grad, masked)


def _tolerances(device, dtype) -> tuple[float, float, float]:
    """``(atol, rms_rtol, rms_atol)`` of the rule for the case: the dtype's (``testing.default_atol`` /
    ``default_rms_rtol`` / ``default_rms_atol``), and for float32 on CUDA under TF32 (``fp32_matmul_precision() == "tf32"``) float16's,
    which has TF32's 10-bit mantissa: a kernel may then multiply in TF32 where the fp32 reference's small
    matmuls need not (cuBLAS picks its kernels by size)."""
    if dtype == torch.float32 and torch.device(device).type == "cuda" and fp32_matmul_precision() == "tf32":
        dtype = torch.float16
    return default_atol(dtype), default_rms_rtol(dtype), default_rms_atol(dtype)


# A kind with a sliding window or softcap is checked on this window and cap together, each where the backend
# declares it (``_masked_case``): a backend with windows but no softcap (torch_varlen) is checked on the window.
_MASKED_CASE = dict(window_size=(3, 2), softcap=5.0)


def _masked_case(b) -> dict:
    return {"window_size": _MASKED_CASE["window_size"] if b.supports_window else (-1, -1),
            "softcap": _MASKED_CASE["softcap"] if b.supports_softcap else 0.0}


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
                   gqa: bool = False, grad: bool = True, masked: bool = False) -> str | None:
    """Run the known-answer case for backend ``name`` now (eagerly) and cache the verdict: None when it
    passed, else the error. Use before ``torch.compile`` / CUDA-graph capture, where no check can run.
    ``device`` without an index (``"cuda"``) is the current device, the one a tensor created there is on.
    ``masked=True`` checks the kind with a sliding window or a softcap (``window_size`` / ``softcap`` given),
    which dispatch checks apart from the plain kind.

    Raises (and caches no verdict: the backend is not at fault) ValueError naming ``device`` when it is a CUDA
    device and CUDA is not available; ValueError / TypeError naming ``backend`` for an unknown name, ``dtype``
    for anything but float64, float32, float16 or bfloat16, ``head_dim`` for anything but an int (NumPy's
    included) in [1, 256], ``causal`` / ``gqa`` / ``grad`` / ``masked`` for anything but a bool."""
    b = get_backend(name)
    check_dtype(dtype)
    if not is_int(head_dim) or not 1 <= head_dim <= 256:
        raise ValueError(f"head_dim: expected an int in [1, 256], got {head_dim!r}")
    head_dim = int(head_dim)
    causal, gqa, grad, masked = (check_bool(flag, value) for flag, value in
                                 (("causal", causal), ("gqa", gqa), ("grad", grad), ("masked", masked)))
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {str(dev)!r} is not available here (torch.cuda.is_available() is False); "
                         "pass device='cpu' to check a CPU backend")
    verdict = _run_case(b, dev, dtype, head_dim, causal, gqa, grad, masked)
    _VERDICTS[_key(b, dev, dtype, head_dim, causal, gqa, grad, masked)] = verdict
    return verdict


@contextlib.contextmanager
def _nondeterministic_allowed():
    """``torch.use_deterministic_algorithms`` off for the reference's runs, restored after (warn-only included):
    on CUDA its cuBLAS matmuls raise under the switch without ``CUBLAS_WORKSPACE_CONFIG``, and that error would be
    taken for the kernel's, which then stayed skipped for the process."""
    on, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if on:
        torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        if on:
            torch.use_deterministic_algorithms(True, warn_only=warn_only)


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
                                    return_lse=return_lse, **(_masked_case(b) if masked else {}))

    def run(backend, dt):
        qkv, inp = inputs(dt, grad)
        # a dispatch that meets a new kind under the caller's autocast: the reference's gradients (autograd of its
        # matmuls) would run in the autocast dtype and loosen the tolerance this check derives from them
        with (torch.enable_grad() if grad else torch.no_grad()), inputs_dtype(qkv[0]):
            out = run_backend(backend, inp)
            grads = torch.autograd.grad(out, qkv, dout.to(device=device, dtype=dt)) if grad else ()
        return [out.detach(), *grads]

    def lse(backend, inp):
        with torch.no_grad():
            return run_backend(backend, inp)[1]

    wide = torch.float64  # the truth: fp64 always (an fp32 one would share fp32 / TF32 roundings with the kernel)
    atol, rtol, floor = _tolerances(device, dtype)
    try:
        got = run(b, dtype)
        with _nondeterministic_allowed():  # the reference is the judge, not the kernel under torch's switch
            truth = run(ref, wide)
            low = run(ref, dtype)
        for name, a, t, lo in zip(("out", "dq", "dk", "dv"), got, truth, low):
            assert_close_to_reference(a, t, lo, atol=atol, rms_rtol=rtol, rms_atol=floor, name=name)
        low_inp = inputs(dtype, False, return_lse=True)[1]
        if not reasons(b, low_inp):  # the log-sum-exp, where b returns one
            a = lse(b, low_inp)
            with _nondeterministic_allowed():
                t, lo = lse(ref, inputs(wide, False, return_lse=True)[1]), lse(ref, low_inp)
            seen = torch.isfinite(t)  # +inf on rows that see no key, in every backend
            if not torch.equal(seen, torch.isfinite(a)):
                raise AssertionError("lse: not +inf exactly on the rows that see no key")
            assert_close_to_reference(a[seen], t[seen], lo[seen].double(), atol=atol, rms_rtol=rtol, rms_atol=floor,
                                      name="lse")
    except AssertionError as e:
        return f"{str(e).splitlines()[0][:300]}"
    except Exception as e:  # noqa: BLE001 - a kernel that raises is a kernel that failed
        return f"raised {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return None
