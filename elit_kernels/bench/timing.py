"""Timing and memory of one benchmark case, and the interleaved runner (docs/design.md §5).

CUDA: ``triton.testing.do_bench`` (median of many launches, L2 flush) once per case per repeat.
CPU: ``time.perf_counter`` around a call (looped when one call is shorter than ``min_cpu_ms``), after
warm-up. Either way every repeat visits every case once, so a burst of load from another process hits
all cases alike instead of one case; we quote medians. The order of the cases is shuffled in each repeat
(seeded: the same orders in every run): on the CPU the call that follows a different case pays for its
predecessor (allocator and cache state), and a fixed order charges that to the same cases every repeat.
Measured on the 2-core AMD EPYC (2026-11-29, S/2 256px batch 4, 9-10 repeats): of two forwards that differ
by one copy per attention call (equal in a microbenchmark), the one timed first in every repeat read 1.12x
the other; alternating which went first, 0.98-0.99x.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .._precision import fp32_matmul_precision

CUDA_REP_MS = 60.0  # do_bench repetition time per CUDA timing sample


def time_call(fn: Callable[[], Any], device: torch.device, grad_to_none=None, min_ms: float = 20.0) -> float:
    """Milliseconds of one ``fn()`` call, one timing sample of an op benchmark: on CUDA ``do_bench``'s median
    (warm-up 10 ms, 40 ms of repetitions; ``grad_to_none``: tensors whose ``.grad`` it resets); on CPU the mean
    of calls looped until ``min_ms`` have passed (so the timer's resolution does not matter)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=40, grad_to_none=grad_to_none, return_mode="median"))
    n, total = 0, 0.0
    while total < min_ms or n == 0:
        t0 = time.perf_counter()
        fn()
        total += (time.perf_counter() - t0) * 1e3
        n += 1
    return total / n


#: sizes ``measure_peaks`` uses: (matmul side n, copy MB) on CUDA and elsewhere, and the least it shrinks them to
PEAK_SIZES = {"cuda": (8192, 1024), "other": (512, 64)}
PEAK_FLOOR = (256, 8)
PEAK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def measure_peaks(device: torch.device, dtype: torch.dtype = torch.bfloat16, sizes: tuple[int, int] | None = None,
                  seed: int = 0) -> dict:
    """This device's ceilings, measured now with ``time_call`` (the clock the op benches use), so a roofline
    fraction is a ratio of two numbers from one run on one machine, whatever the GPU.

    - ``tflops``: one ``[n, n] @ [n, n]`` matmul in ``dtype`` on random normal data (2·n³ FLOPs per call);
      fp32 on CUDA follows PyTorch's float32 matmul setting, recorded as ``fp32_matmul_precision`` (``"tf32"`` or
      ``"ieee"``; None for other dtypes and off CUDA).
    - ``gbps``: one ``copy_`` of ``mb`` megabytes (10^6 bytes) of ``dtype``, counting bytes read plus bytes
      written, as the benches count a kernel's bytes.

    ``device``: a ``torch.device`` or a device string. ``sizes``: ``(n, mb)``; default ``PEAK_SIZES`` (8192 and
    1024 MB on CUDA: each about a millisecond on an H100/H200, far past the L2 cache; 512 and 64 MB elsewhere).
    A measurement that runs out of device memory (a small card, or one the bench has mostly filled) is repeated
    at n / 2 (matmul) or mb / 4 (copy) until it fits, down to ``PEAK_FLOOR`` (256, 8 MB; then the
    ``torch.OutOfMemoryError`` propagates). The sizes used are returned (``matmul_n``, ``copy_mb``); below the
    defaults the rates read low (a small matmul), or high (a copy that fits in the cache), and ``method`` says so.
    Returns ``{"tflops", "gbps", "matmul_n", "copy_mb", "dtype", "fp32_matmul_precision", "method"}``.

    Raises ValueError naming ``sizes`` unless it is two positive ints, ``dtype`` unless it is one of
    ``PEAK_DTYPES``, ``device`` for what is not a device, ``seed`` unless it is an int in [0, 2**63)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected a torch.device or a device string such as 'cuda', got {device!r}") from None
    default = PEAK_SIZES["cuda" if device.type == "cuda" else "other"]
    if sizes is None:
        sizes = default
    if not (isinstance(sizes, (tuple, list)) and len(sizes) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes)):
        raise ValueError(f"sizes: expected (matmul side, copy MB), two positive ints, got {sizes!r}")
    if dtype not in PEAK_DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(str(d) for d in PEAK_DTYPES)}, got {dtype!r}")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        raise ValueError(f"seed: expected an int in [0, 2**63), got {seed!r}")
    n, mb = sizes
    g = torch.Generator(device=device).manual_seed(seed)
    elem = torch.empty((), dtype=dtype).element_size()

    def elements(mb):  # of the copy
        return max(1, mb * 10**6 // elem)

    def matmul(n):
        a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
        return time_call(lambda: torch.mm(a, b), device)

    def copy(mb):
        src = torch.randn(elements(mb), device=device, dtype=dtype, generator=g)
        dst = torch.empty_like(src)
        return time_call(lambda: dst.copy_(src), device)

    n, mm_ms = _shrinking(matmul, n, PEAK_FLOOR[0], 2, device)
    mb, cp_ms = _shrinking(copy, mb, PEAK_FLOOR[1], 4, device)
    moved = 2 * elements(mb) * elem
    name = str(dtype).replace("torch.", "")
    small = [f"{what} shrunk from {want} after running out of memory"
             for what, got, want in (("n", n, sizes[0]), ("MB", mb, sizes[1])) if got < want]
    return {"tflops": 2 * n**3 / mm_ms / 1e9, "gbps": moved / cp_ms / 1e6, "matmul_n": n, "copy_mb": mb, "dtype": name,
            "fp32_matmul_precision": fp32_matmul_precision() if (dtype == torch.float32 and device.type == "cuda")
            else None,
            "method": f"torch.mm of two random [{n}, {n}] {name} (2n^3 FLOPs) and Tensor.copy_ of {mb} MB (read + "
                      "written), each timed by bench.timing.time_call" + (f" ({'; '.join(small)})" if small else "")}


def _shrinking(measure, size: int, floor: int, factor: int, device: torch.device) -> tuple[int, float]:
    """``(size, measure(size))`` at the first size that fits in memory: ``size``, then ``size // factor``, ... down
    to ``floor`` (never above the size asked); the last ``torch.OutOfMemoryError`` propagates."""
    while True:
        try:
            return size, measure(size)
        except torch.OutOfMemoryError:
            if size <= floor:
                raise
        # past the except clause, so the traceback no longer holds the failed buffers when the cache is emptied
        size = max(floor, size // factor)
        if device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass
class Case:
    """One thing to time. ``fn()`` runs it; ``models`` are the modules its attention backend lives on."""

    scenario: str
    case: str
    model: str  # "elit", "official" or "plain"
    backend: str
    budget: int | None  # J̃ of the row (the largest in a mixed batch; None for the plain DiT)
    budgets: list[int]  # every per-sample budget the case runs, over all its calls
    batch: int
    latents: float  # latents per sample, averaged over the batch (conditional + weak for guidance)
    fn: Callable[[], Any]
    models: list = field(default_factory=list)
    ref: tuple | None = None  # key of the full-budget case that ratios are taken against
    weak_budget: int | None = None
    note: str = ""
    times_ms: list[float] = field(default_factory=list)
    cpu_times_ms: list[float] = field(default_factory=list)  # CPU runs: process CPU time per call
    flops: dict | None = None
    peak_mem_mb: float | None = None
    inner: int = 1  # calls per CPU timing sample
    preset: str = "paper"  # the model config's preset: "paper" or "released" (models.config.PRESETS)
    call_ms: float | None = None  # one call after warm-up (wall); set by warm_up
    count_fn: Callable[[], Any] | None = None  # an eager call of the same work, for the FLOP count (graphed cases)
    warm_s: float | None = None  # the whole warm-up phase of this case (warm-up calls, FLOP count, memory)
    inputs: tuple | None = None  # (x, t, y) of an eager ElitDiT case: what --breakdown profiles
    steps: int | None = None  # model steps of one call (a "sampling" case: a whole sampling run)

    @property
    def key(self) -> tuple:
        return (self.preset, self.scenario, self.case, self.model, self.backend, self.budget)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_up(device: torch.device, dtype: torch.dtype) -> float:
    """Pay the process's one-time start-up costs before any case is warmed up; returns the seconds spent.

    ``FlopCounterMode``'s first entry builds its table of op formulas (0.9 s on this project's CPU, then
    0.2 ms an entry), and a CUDA device's first matmul creates the context and the cuBLAS handle. Charged to
    the first case's warm-up, they made the run-time estimate count them once per case (``remaining_seconds``
    counts the cases not yet warmed up at the first one's warm-up): 40 s estimated for a 4 s tiny-config run on
    this CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    t0 = time.monotonic()
    x = torch.ones(8, 8, device=device, dtype=dtype)
    with FlopCounterMode(display=False):
        x @ x
    sync(device)
    return time.monotonic() - t0


def warm_up(case: Case, device: torch.device, calls: int, min_cpu_ms: float) -> None:
    """Run ``calls`` times (first-call costs: allocator, kernel compilation); size the CPU inner loop."""
    for _ in range(max(1, calls)):  # at least one: it sizes the CPU loop (elit-bench refuses --warmup 0)
        t0 = time.perf_counter()
        case.fn()
        sync(device)
        dt = (time.perf_counter() - t0) * 1e3
    case.call_ms = dt
    if device.type != "cuda":
        case.inner = max(1, math.ceil(min_cpu_ms / max(dt, 1e-3)))


def time_once(case: Case, device: torch.device, cuda_rep_ms: float = CUDA_REP_MS) -> tuple[float, float | None]:
    """One timing sample in ms per call: (wall, process CPU time or None on CUDA).

    On a shared CPU the wall clock also measures how long the scheduler kept us waiting; with one
    intra-op thread the process CPU time is the compute alone. Both are kept; the table shows both.
    """
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(case.fn, warmup=max(5, int(cuda_rep_ms // 4)), rep=int(cuda_rep_ms),
                                             return_mode="median")), None
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(case.inner):
        case.fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall * 1e3 / case.inner, cpu * 1e3 / case.inner


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (Kineto prints start/stop lines and a GPU probe error from C++ on a CPU run)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure_memory(case: Case, device: torch.device) -> float | None:
    """Peak memory one call allocates beyond what is already held when it starts (MiB).

    Weights, inputs and anything else alive before the call are excluded, so the number is the forward's
    working memory (activations, attention temporaries, outputs) on either device. CUDA:
    ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the call (caching-allocator bytes
    handed to tensors). CPU: ``torch.profiler`` with ``profile_memory=True``; the allocation (+) and free (−)
    events of the call, in time order, summed, and the running sum's maximum taken. Returns None if the
    profiler records no memory events (a torch build without them).
    """
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        case.fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        case.fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    if not events:
        return None
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def repeat_order(n: int, repeat: int, seed: int = 0) -> list[int]:
    """The order in which repeat ``repeat`` visits ``n`` cases: a permutation, seeded by (seed, repeat).

    >>> sorted(repeat_order(5, 3)) == list(range(5)), repeat_order(5, 3) == repeat_order(5, 3)
    (True, True)
    """
    order = list(range(n))
    random.Random(seed * 1_000_003 + repeat).shuffle(order)
    return order


def run_interleaved(cases: list[Case], device: torch.device, repeats: int, *, progress: Callable[[], None] | None = None,
                    cuda_rep_ms: float = CUDA_REP_MS, deadline: float | None = None, seed: int = 0) -> int:
    """Fill ``case.times_ms`` with up to ``repeats`` samples each, visiting all cases once per repeat in
    the order ``repeat_order(len(cases), repeat, seed)`` (see the module docstring for why it changes).

    ``deadline`` (a ``time.monotonic()`` value): stop after the first full repeat that ends past it, so
    every case keeps the same number of samples. ``progress()`` is called after every sample. Returns
    the number of repeats done."""
    done = 0
    with torch.no_grad():
        for r in range(repeats):
            for i in repeat_order(len(cases), r, seed):
                case = cases[i]
                wall, cpu = time_once(case, device, cuda_rep_ms)
                case.times_ms.append(wall)
                if cpu is not None:
                    case.cpu_times_ms.append(cpu)
                if progress is not None:
                    progress()
            done += 1
            if deadline is not None and time.monotonic() > deadline:
                break
    return done


# ---------------------------------------------------------------------------------------------
# Run-time estimate and the progress bar (one bar over warm-up and timing)
# ---------------------------------------------------------------------------------------------

def sample_seconds(case: Case, device: torch.device, cuda_rep_ms: float = CUDA_REP_MS) -> float:
    """Seconds one timing sample of ``case`` takes, from its measured call time (``warm_up``).

    CPU: ``inner`` calls. CUDA: ``do_bench``'s pattern (5 calls to size the loops, then warm-up and
    repetitions filling at least ``cuda_rep_ms / 4`` and ``cuda_rep_ms``, one call each at least)."""
    c = case.call_ms or 0.0
    if device.type == "cuda":
        return (5 * c + max(max(5.0, cuda_rep_ms // 4), c) + max(cuda_rep_ms, c)) / 1e3
    return case.inner * c / 1e3


def remaining_seconds(to_warm: list[Case], to_time: list[Case], repeats: int, probe: Case,
                      device: torch.device, by_backend: dict | None = None) -> float:
    """Estimated seconds of work left: the warm-up of ``to_warm`` and the samples ``to_time`` still lack.

    A case already warmed up counts at its own measured speed; the others at the speed of ``by_backend``'s
    warmed-up case of their own backend (``{backend: case}``: a ``+compile`` or ``+graph`` backend's warm-up
    holds a compile or capture, which every budget signature pays again), else at ``probe``'s (a warmed-up case;
    the benchmark picks the full-budget one, the costliest single forward of the uniform sweep)."""
    like = by_backend or {}
    left = 0.0
    for c in to_warm:
        left += like.get(c.backend, probe).warm_s
    for c in to_time:
        n = max(0, repeats - len(c.times_ms))
        left += n * sample_seconds(c if c.call_ms is not None else like.get(c.backend, probe), device)
    return left


def format_seconds(s: float) -> str:
    """``42 s``, ``3.5 min``, ``1.2 h``."""
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class RunProgress:
    """One progress bar over a whole run, warm-up and timing, in seconds of work.

    ``update(done_s, left_s)`` sets the bar to ``done_s`` of ``done_s + left_s``, so the bar's remaining
    time is the estimate, refined as every case's own speed becomes known."""

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=1.0, desc="elit-bench", leave=False,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

    def update(self, done_s: float, left_s: float, desc: str | None = None) -> None:
        if self.bar is None:
            return
        self.bar.total = max(done_s + left_s, 1e-6)
        self.bar.n = done_s
        if desc:
            self.bar.set_description_str(desc, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summarize(times: list[float]) -> dict:
    """median, quartiles (IQR), min and max of the per-repeat samples."""
    if not times:
        return {"latency_ms": None, "q1_ms": None, "q3_ms": None, "min_ms": None, "max_ms": None}
    s = sorted(times)
    if len(s) >= 2:
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
    else:
        q1 = q3 = s[0]
    return {"latency_ms": statistics.median(s), "q1_ms": q1, "q3_ms": q3, "min_ms": s[0], "max_ms": s[-1]}
