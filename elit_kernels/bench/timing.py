"""Timing and memory of one benchmark case, and the interleaved runner (docs/design.md §5).

CUDA: ``triton.testing.do_bench`` (median of many launches, L2 flush) once per case per repeat.
CPU: ``time.perf_counter`` around a call (looped when one call is shorter than ``min_cpu_ms``), after
warm-up. Either way every repeat visits every case in order (budget 1, 2, 4, …, then again), so a
burst of load from another process hits all cases alike instead of one case; we quote medians.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


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

    @property
    def key(self) -> tuple:
        return (self.preset, self.scenario, self.case, self.model, self.backend, self.budget)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(case: Case, device: torch.device, calls: int, min_cpu_ms: float) -> None:
    """Run ``calls`` times (first-call costs: allocator, kernel compilation); size the CPU inner loop."""
    for _ in range(max(1, calls)):
        t0 = time.perf_counter()
        case.fn()
        sync(device)
        dt = (time.perf_counter() - t0) * 1e3
    if device.type != "cuda":
        case.inner = max(1, math.ceil(min_cpu_ms / max(dt, 1e-3)))


def time_once(case: Case, device: torch.device, cuda_rep_ms: float) -> tuple[float, float | None]:
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


def measure_memory(case: Case, device: torch.device) -> float | None:
    """Peak CUDA memory allocated during one call (MiB, weights and inputs included); None on CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    case.fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def run_interleaved(cases: list[Case], device: torch.device, repeats: int, *, progress: bool = True,
                    cuda_rep_ms: float = 60.0, deadline: float | None = None) -> int:
    """Fill ``case.times_ms`` with up to ``repeats`` samples each, visiting all cases once per repeat.

    ``deadline`` (a ``time.monotonic()`` value): stop after the first full repeat that ends past it, so
    every case keeps the same number of samples. Returns the number of repeats done."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=repeats * len(cases), desc="timing", unit="case", leave=False)
    done = 0
    with torch.no_grad():
        for _ in range(repeats):
            for case in cases:
                wall, cpu = time_once(case, device, cuda_rep_ms)
                case.times_ms.append(wall)
                if cpu is not None:
                    case.cpu_times_ms.append(cpu)
                if bar is not None:
                    bar.update(1)
            done += 1
            if deadline is not None and time.monotonic() > deadline:
                break
    if bar is not None:
        bar.close()
    return done


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
