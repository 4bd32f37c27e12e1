"""Inconsistent ``cu_seqlens`` with the value checks off (as a compiled graph runs): no backend reads or writes
past the tensors it was given.

The compiled kernels (``triton``, ``cuda``; ``cpp`` behind its own host check) clamp every ``cu_seqlens``
element into ``[0, rows]``: a monotone ``cu_seqlens`` that runs past the rows gives exactly the attention over
the clamped segments, anything else gives a result computed from the tensors alone. The backends that read
``cu_seqlens`` on the host (``reference``, ``torch``, ``cpp``) raise an error naming it instead.

Out-of-bounds reads are caught by placing q/k/v (and the output gradient) inside buffers whose rows before
and after are NaN, and comparing against the same call with finite rows there: a kernel that reads outside
its tensors changes the result.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import elit_kernels  # noqa: E402
from elit_kernels import varlen_attention  # noqa: E402
from elit_kernels.attention import get_backend  # noqa: E402
from elit_kernels.reference.attention import varlen_attention_reference  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
GUARD = 24  # rows of NaN (or finite filler) before and after each tensor
H = 2


@pytest.fixture(autouse=True)
def value_checks_off():
    was = elit_kernels.value_checks_enabled()
    elit_kernels.set_value_checks(False)
    yield
    elit_kernels.set_value_checks(was)


def _case(seed: int, monotone: bool):
    """(total_q, total_k, cu_q, cu_k, max_q, max_k, causal): 1-3 segments whose cu_seqlens run past the rows
    (monotone from 0) or are arbitrary (negative, decreasing, not starting at 0)."""
    g = torch.Generator().manual_seed(seed)

    def ri(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    tq, tk, s = ri(1, 12), ri(1, 10), ri(1, 3)
    cus = []
    for total in (tq, tk):
        c = [ri(-4, total + 16) for _ in range(s + 1)]
        if monotone:
            c = [0] + sorted(max(x, 0) for x in c[1:])
            c[-1] = max(c[-1], total + ri(1, 9))  # past the end: what the value checks would refuse
        cus.append(c)
    return tq, tk, cus[0], cus[1], ri(1, 20), ri(1, 20), bool(ri(0, 1))


MONOTONE = [(seed, True) for seed in range(6)]
ARBITRARY = [(seed, False) for seed in range(100, 106)]


def _guarded(x: torch.Tensor, fill: float) -> torch.Tensor:
    """``x`` as a view into a buffer with ``GUARD`` rows of ``fill`` on either side."""
    buf = torch.full((x.shape[0] + 2 * GUARD, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    buf[GUARD:GUARD + x.shape[0]] = x
    return buf[GUARD:GUARD + x.shape[0]]


def _inputs(tq, tk, head_dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, H, head_dim, generator=g).to(device=device, dtype=dtype) for n in (tq, tk, tk, tq)]


def _clamped(c: list, total: int) -> torch.Tensor:
    return torch.tensor([min(max(x, 0), total) for x in c], dtype=torch.int32)


def _run(backend, q, k, v, dout, cu_q, cu_k, max_q, max_k, causal, fill, grads=True):
    q, k, v, dout = (_guarded(t, fill) for t in (q, k, v, dout))
    q, k, v = (t.detach().requires_grad_(grads) for t in (q, k, v))
    dev = q.device
    out = varlen_attention(q, k, v, torch.tensor(cu_q, dtype=torch.int32, device=dev),
                           torch.tensor(cu_k, dtype=torch.int32, device=dev), max_q, max_k, causal=causal,
                           backend=backend)
    if not grads:
        return [out.detach()]
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


KERNELS = {  # the cuda kernels run fp16/bf16 at head dims 64/72/128
    "triton": dict(head_dim=16, dtype=torch.float32, device="cuda" if HAS_CUDA else "cpu"),
    "cuda": dict(head_dim=64, dtype=torch.float16, device="cuda"),
}


def _kernel_or_skip(name):
    b = get_backend(name)
    if not b.is_available():
        from elit_kernels.attention.registry import unavailable_reason

        pytest.skip(f"backend {name!r} is not available here: {unavailable_reason(b)}")
    return KERNELS[name]


@pytest.mark.parametrize("seed,monotone", MONOTONE + ARBITRARY)
@pytest.mark.parametrize("backend", list(KERNELS))
@pytest.mark.usefixtures("poisoned_outputs")
def test_kernels_never_read_outside_the_tensors(backend, seed, monotone):
    spec = _kernel_or_skip(backend)
    tq, tk, cu_q, cu_k, max_q, max_k, causal = _case(seed, monotone)
    q, k, v, dout = _inputs(tq, tk, spec["head_dim"], spec["dtype"], spec["device"], seed)
    nan_guard = _run(backend, q, k, v, dout, cu_q, cu_k, max_q, max_k, causal, float("nan"))
    finite_guard = _run(backend, q, k, v, dout, cu_q, cu_k, max_q, max_k, causal, 7.0)
    for name, a, b in zip(("out", "dq", "dk", "dv"), nan_guard, finite_guard):
        # A row no program writes (possible only with arbitrary cu_seqlens) is poison in both runs; a read
        # past the tensor turns a finite value into NaN only in the NaN-guarded one.
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN where the rows around the tensors are NaN"
    if not monotone:
        return
    # Monotone from 0 but past the rows: exactly the attention over the clamped segments.
    cq, ck = _clamped(cu_q, tq), _clamped(cu_k, tk)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    ref = varlen_attention_reference(q, k, v, cq.to(q.device), ck.to(q.device), softmax_scale=spec["head_dim"] ** -0.5,
                                     causal=causal)
    ref.backward(dout.double())
    tol = 1e-4 if spec["dtype"] == torch.float32 else 2e-2
    for name, got, want in zip(("out", "dq", "dk", "dv"), nan_guard, (ref, q.grad, k.grad, v.grad)):
        assert torch.isfinite(got).all(), f"{name}: non-finite values for cu_q={cu_q} cu_k={cu_k}"
        err = (got.double() - want.detach()).abs().max().item()
        assert err <= tol, f"{name}: max abs err {err:.3g} against the clamped segments (cu_q={cu_q}, cu_k={cu_k})"


@pytest.mark.parametrize("seed,monotone", MONOTONE + ARBITRARY)
@pytest.mark.parametrize("backend", ["reference", "torch", "cpp"])
def test_host_reading_backends_name_the_bad_cu_seqlens(backend, seed, monotone):
    b = get_backend(backend)
    if not b.is_available():
        pytest.skip(f"backend {backend!r} is not available here: {b.description}")
    tq, tk, cu_q, cu_k, max_q, max_k, causal = _case(seed, monotone)
    q, k, v, dout = _inputs(tq, tk, 16, torch.float32, "cpu", seed)
    for grads in (False, True):  # the torch backend's SDPA path (no grad) and its op path
        with pytest.raises((ValueError, RuntimeError), match=r"cu_seqlens_[qk]"):
            _run(backend, q, k, v, dout, cu_q, cu_k, max_q, max_k, causal, float("nan"), grads=grads)
