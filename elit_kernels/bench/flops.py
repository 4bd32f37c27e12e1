"""FLOPs of one model call: torch's FlopCounterMode for everything but attention, attention analytically.

FlopCounterMode only sees aten ops it has formulas for. It does not see our custom varlen attention
ops (Triton / C++ kernels), and on CPU it does not even count SDPA (the CPU flash kernel has no
formula), so counting attention through it would be wrong one way on one backend and another way on
the next. Instead, while counting, every attention call goes to a stub backend that returns zeros
(FLOP counts depend on shapes only) and adds the analytic 4·Σ_i(Lq_i·Lk_i)·H·D from the cu_seqlens
the model hands it, i.e. from the ElitLayout. The official-style baseline asks the same counter.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .._types import is_int
from ..attention import registry as _backends
from ..attention.registry import Backend, register_backend
from ..layout import normalize_budgets

STUB_BACKEND = "_bench_flop_stub"


@dataclass
class AttentionFlops:
    """Running total of analytic attention FLOPs (forward), 4·Σ(Lq·Lk)·H·D per call."""

    total: int = 0
    calls: int = 0

    def add_segments(self, lens_q, lens_k, heads: int, head_dim: int) -> int:
        f = 4 * sum(int(a) * int(b) for a, b in zip(lens_q, lens_k)) * heads * head_dim
        self.total += f
        self.calls += 1
        return f

    def add_dense(self, batch: int, lq: int, lk: int, heads: int, head_dim: int) -> int:
        return self.add_segments([lq] * batch, [lk] * batch, heads, head_dim)


_ACTIVE: list[AttentionFlops] = []


def active_counters() -> list[AttentionFlops]:
    """The counters of the ``count_flops`` calls in progress, outermost first ([] when not counting): an attention
    call adds to each, as nested ``FlopCounterMode`` blocks each count a matmul."""
    return list(_ACTIVE)


class _FlopStubBackend(Backend):
    name = STUB_BACKEND
    priority = -1000  # never picked by default; only named explicitly while counting
    description = "benchmark FLOP counter: returns zeros, adds 4·Σ(Lq·Lk)·H·D (not a real backend)"

    def forward(self, inp):
        counters = active_counters()
        if counters:
            cq, ck = inp.cu_seqlens_q.tolist(), inp.cu_seqlens_k.tolist()
            lq = [b - a for a, b in zip(cq[:-1], cq[1:])]
            lk = [b - a for a, b in zip(ck[:-1], ck[1:])]
            for counter in counters:  # nested counts: each counts its calls' attention, as FlopCounterMode its matmuls
                counter.add_segments(lq, lk, inp.q.shape[1], inp.q.shape[2])
        return torch.zeros_like(inp.q)


def _check_models(models) -> list[torch.nn.Module]:
    """``models`` as a list of modules: one module, or a list / tuple of them (TypeError naming ``models``)."""
    if isinstance(models, torch.nn.Module):
        return [models]
    if not isinstance(models, (list, tuple)):
        raise TypeError(f"models: expected a torch.nn.Module or a list / tuple of them (the modules whose backend "
                        f"attribute is pointed at the stub), got {type(models).__name__}")
    bad = [type(m).__name__ for m in models if not isinstance(m, torch.nn.Module)]
    if bad:
        raise TypeError(f"models: expected torch.nn.Module items, got {bad[0]}")
    # A module whose attention does not read its own ``backend`` (a wrapper) left the attention on its real backend,
    # which the FLOP counter does not see: the count came out without it, silently. (An empty list is legal: the
    # dense baseline counts its attention itself; count_flops warns when no attention was counted at all.)
    lacking = [type(m).__name__ for m in models if not hasattr(m, "backend")]
    if lacking:
        raise ValueError(f"models: {lacking[0]} has no backend attribute; pass the ElitDiT / PlainDiT modules "
                         "themselves (their attention reads model.backend), not a module that holds them")
    return list(models)


@contextlib.contextmanager
def _stub_backend(models):
    """Point every model's attention at the stub for the duration; undo everything afterwards.

    The stub is registered only inside this block and removed again (by the outermost block, when counts nest),
    so the public registry (``known_backends()``) never shows it outside a FLOP count, whatever fails.
    """
    models = _check_models(models)
    ours = STUB_BACKEND not in _backends._REGISTRY
    saved = []
    try:
        if ours:
            register_backend(_FlopStubBackend())
        for m in models:
            saved.append((m, getattr(m, "backend", None)))
            m.backend = STUB_BACKEND
        yield
    finally:
        for m, b in reversed(saved):
            m.backend = b
        if ours:
            _backends._REGISTRY.pop(STUB_BACKEND, None)  # private on purpose: the stub must not linger


def count_flops(fn, models) -> dict:
    """Run ``fn()`` once and return {"total", "attention", "other", "attention_calls"} FLOPs (forward).

    ``models``: the module, or a list / tuple of the modules, whose ``backend`` attribute must be pointed at the
    stub while counting (TypeError / ValueError naming ``models`` otherwise, before anything is registered: a module
    without a ``backend`` attribute, such as a wrapper, would leave the attention uncounted); [] for a model that
    counts its own attention (the dense baseline). A UserWarning when no attention call was counted. ``fn``: a
    callable (TypeError naming ``fn``). Nested counts each count the attention of their calls.
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a callable that runs the forward once, got {type(fn).__name__}")
    models = _check_models(models)
    counter = AttentionFlops()
    _ACTIVE.append(counter)
    try:
        with _stub_backend(models), torch.no_grad(), FlopCounterMode(display=False) as fc:
            fn()
    finally:
        _ACTIVE.pop()
    other = int(fc.get_total_flops())
    if counter.calls == 0:
        warnings.warn("count_flops: no attention call was counted (attention FLOPs 0): pass as models the ElitDiT / "
                      "PlainDiT modules fn runs, whose attention then runs on the counting stub; a model left on its "
                      "own backend runs attention this count does not see", UserWarning, stacklevel=2)
    return {"total": other + counter.total, "attention": counter.total, "other": other,
            "attention_calls": counter.calls}


def elit_attention_flops(cfg, budgets, *, batch: int | None = None) -> int:
    """Analytic attention FLOPs of one ElitDiT forward for per-sample ``budgets`` (a check on the counter).

    ``budgets`` as ``ElitDiT.forward`` takes them (``layout.normalize_budgets``): one int per sample in
    [0, J_max] (a sequence, a 1-D integer tensor or array), or one int / None (J_max) for all ``batch`` samples;
    ``batch`` defaults to the number of budgets given (it is required with an int or None). ValueError /
    TypeError naming ``budgets`` or ``batch`` otherwise.

    Head/tail: N² per sample per block; Read and Write: G·J_b·P each (G·J_max·P under the released
    ``budget_core_only`` semantics, where they see every latent); core: (G·J_b)² per block.
    """
    if batch is None:
        if budgets is None or is_int(budgets):
            raise ValueError(f"batch: expected an int >= 0 (the number of samples) with budgets={budgets!r}, got None")
        try:
            batch = len(budgets)
        except TypeError:
            batch = 0  # not a sequence: normalize_budgets names what it is
    cfg = getattr(cfg, "cfg", cfg)  # a model: its config (as latents_for_budget takes it)
    if not hasattr(cfg, "latents_per_group"):
        raise TypeError(f"cfg: expected an ElitConfig or an ElitDiT, got {type(cfg).__name__}")
    budgets = normalize_budgets(budgets, batch, cfg.latents_per_group)
    h, d = cfg.heads, cfg.hidden // cfg.heads
    n, g, p = cfg.grid * cfg.grid, cfg.groups, cfg.tokens_per_group
    per = 0
    for j in budgets:
        j_iface = cfg.latents_per_group if cfg.budget_core_only else j
        per += (cfg.n_head + cfg.n_tail) * n * n + 2 * g * j_iface * p + cfg.core_blocks * (g * j) ** 2
    return 4 * per * h * d


def plain_attention_flops(cfg, batch: int) -> int:
    """Analytic attention FLOPs of one PlainDiT forward of ``batch`` samples (an int >= 0; ValueError naming
    ``batch`` otherwise)."""
    if not is_int(batch) or batch < 0:
        raise ValueError(f"batch: expected an int >= 0 (the number of samples), got {batch!r}")
    n = cfg.grid * cfg.grid
    return 4 * int(batch) * cfg.depth * n * n * cfg.heads * (cfg.hidden // cfg.heads)
