"""Where the time of one ELIT forward goes: per stage (stem, head blocks, Read, core blocks, Write, tail blocks,
final layer, the glue between them) and per kind of op (attention, matmul, norm/elementwise: norms,
modulation, activations, residuals; gather/copy; other), from one profiled eager forward.

``forward_breakdown(model, x, t, y, budgets)`` runs the forward once under ``torch.profiler`` with a
``record_function`` range around each stage (forward hooks on the stage modules, removed afterwards: the model is
not changed and its unprofiled calls pay nothing), then attributes every op's *self* time to the innermost
stage range around it and to the kind of the outermost op under that range (so ``aten::linear``'s inner
``addmm`` counts as matmul, ``varlen_attention``'s ops as attention). On a GPU the time is the device time of
the kernels each op launched (``self_device_time_total``); on a CPU it is host time (``self_cpu_time_total``).
The wall time of the profiled call and the host time of its ops are reported too: device time far below the
wall time means the forward is host-bound (kernel launches and Python), which CUDA graphs remove.

The profiler adds host time per op, so the breakdown's totals are not a latency measurement: ``elit-bench``'s
timed rows are. It answers "which stage and which kind of op", as the GPU targets' reports must.
"""
from __future__ import annotations

import time

import torch

#: kind of op, by the name of the outermost op under a stage range (first match wins)
KINDS = (
    ("attention", ("attention", "attn", "flash", "cudnn_", "efficient_", "elit::varlen")),
    ("matmul", ("linear", "addmm", "::mm", "bmm", "matmul", "conv", "baddbmm")),
    ("norm/elementwise", ("layer_norm", "rms_norm", "elit::layernorm", "elit::gated", "modulate", "gelu", "silu",
                       "mul", "add", "sub", "div", "rsqrt", "pow", "mean", "exp", "tanh", "sin", "cos")),
    ("gather/copy", ("index", "gather", "scatter", "copy", "cat", "aten::to", "clone", "contiguous", "pad", "fill",
                     "zero", "empty", "stack", "repeat", "expand")),
)
_PREFIX = "elit.stage:"


def op_kind(name: str) -> str:
    """The kind of an op from its profiler name (``aten::linear`` -> ``"matmul"``); ``"other"`` if none match."""
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def stage_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """``[(stage, module), ...]`` of an ``ElitDiT`` (head/core/tail blocks under one stage each) or a
    ``PlainDiT`` (its blocks); the stem's embeddings as ``"embed"``, its final layer as ``"final"``."""
    out = []
    stem = getattr(model, "stem", None)
    if stem is not None:
        for name in ("patch_embed", "t_embed", "y_embed"):
            if hasattr(stem, name):
                out.append(("embed", getattr(stem, name)))
        if hasattr(stem, "final"):
            out.append(("final", stem.final))
    for name in ("head", "core", "tail", "blocks"):
        for blk in getattr(model, name, None) or []:
            out.append((name, blk))
    for name in ("read", "write"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            out.append((name, getattr(model, name)))
    return out


def _add_ranges(model) -> list:
    """Forward pre/post hooks that open/close a ``record_function`` range per stage module call."""
    from torch.autograd.profiler import record_function

    handles = []
    for stage, mod in stage_modules(model):
        stack: list = []

        def pre(_m, _args, stage=stage, stack=stack):
            r = record_function(_PREFIX + stage)
            r.__enter__()
            stack.append(r)

        def post(_m, _args, _out, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return handles


def attribute(events, device: bool) -> dict:
    """``{(stage, kind): microseconds}`` from the profiler's ``FunctionEvent`` list: each op's self time goes to
    the innermost stage range above it (``"glue"`` outside every range) and the kind of the outermost op below
    that range. Only host-side op events count: on a GPU the profiler also lists every kernel as an event of its
    own (``device_type`` CUDA) whose time its launching op already holds (``self_device_time_total``), and async
    events have no place in the op tree; counting them would put each kernel's time in twice (once more under
    ``"glue"``, having no host parent)."""
    from torch.autograd import DeviceType

    acc: dict = {}
    for e in events:
        if e.name.startswith(_PREFIX) or getattr(e, "is_async", False) \
                or getattr(e, "device_type", DeviceType.CPU) != DeviceType.CPU:
            continue
        us = e.self_device_time_total if device else e.self_cpu_time_total
        if not us:
            continue
        top, node, stage = e, e.cpu_parent, "glue"
        while node is not None:
            if node.name.startswith(_PREFIX):
                stage = node.name[len(_PREFIX):]
                break
            top, node = node, node.cpu_parent
        key = (stage, op_kind(top.name))
        acc[key] = acc.get(key, 0.0) + us
    return acc


def forward_breakdown(model, x, t, y, budgets=None) -> dict:
    """Profile one eager forward ``model(x, t, y, budgets)`` (after one unprofiled warm-up call) and return
    ``{"rows": [{"stage", "kind", "ms", "share"}, ...] (largest first), "stages": {stage: ms}, "kinds":
    {kind: ms}, "total_ms", "wall_ms", "host_ms", "clock": "device" | "host"}``. ``share`` is the fraction of
    ``total_ms``. Runs under ``torch.no_grad``; the model's hooks are removed afterwards, also on error."""
    from torch.profiler import ProfilerActivity, profile

    dev = x.device
    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    kw = {} if budgets is None else {"budgets": budgets}
    handles = _add_ranges(model)
    try:
        with torch.no_grad():
            model(x, t, y, **kw)  # warm-up: layouts, dispatch decisions, first-use checks
            sync()
            with profile(activities=acts) as prof:
                t0 = time.perf_counter()
                model(x, t, y, **kw)
                sync()
                wall = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    events = prof.events()
    acc = attribute(events, device=cuda)
    host = attribute(events, device=False)
    total = sum(acc.values()) / 1e3
    rows = [{"stage": s, "kind": k, "ms": us / 1e3, "share": (us / 1e3 / total) if total else 0.0}
            for (s, k), us in sorted(acc.items(), key=lambda kv: -kv[1])]
    stages: dict = {}
    kinds: dict = {}
    for r in rows:
        stages[r["stage"]] = stages.get(r["stage"], 0.0) + r["ms"]
        kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["ms"]
    return {"rows": rows, "stages": stages, "kinds": kinds, "total_ms": total, "wall_ms": wall * 1e3,
            "host_ms": sum(host.values()) / 1e3, "clock": "device" if cuda else "host"}


def _width(kind: str) -> int:
    """A column's width: 15, or the kind's name and two spaces (``norm/elementwise`` ran into its neighbour)."""
    return max(15, len(kind) + 2)


def format_breakdown(b: dict, title: str) -> str:
    """A plain-text table: one line per stage with its kinds' milliseconds, then the totals."""
    kinds = [k for k, _ in KINDS] + ["other"]
    busy = (f"; the device is busy {b['total_ms'] / b['wall_ms']:.0%} of the wall time (low: host-bound)"
            if b["clock"] == "device" and b["wall_ms"] else "")
    lines = [f"{title}: {b['clock']} time {b['total_ms']:.2f} ms, wall {b['wall_ms']:.2f} ms (profiled), "
             f"host time of the ops {b['host_ms']:.2f} ms{busy}",
             f"  {'stage':<8}" + "".join(f"{k:>{_width(k)}}" for k in kinds) + f"{'total':>10}{'share':>8}"]
    for s, ms in sorted(b["stages"].items(), key=lambda kv: -kv[1]):
        cells = {r["kind"]: r["ms"] for r in b["rows"] if r["stage"] == s}
        lines.append(f"  {s:<8}" + "".join(f"{cells.get(k, 0.0):>{_width(k)}.3f}" for k in kinds)
                     + f"{ms:>10.3f}{ms / b['total_ms'] if b['total_ms'] else 0:>8.1%}")
    lines.append(f"  {'all':<8}" + "".join(f"{b['kinds'].get(k, 0.0):>{_width(k)}.3f}" for k in kinds)
                 + f"{b['total_ms']:>10.3f}{1:>8.0%}")
    return "\n".join(lines)
