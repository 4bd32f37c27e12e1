"""CUDA-graph capture of an ELIT forward, once per budget signature.

A sampling run calls the model with one budget signature (batch size, per-sample budgets, dtype) at every step,
so one captured graph serves all its steps: a replay launches the whole forward at once instead of hundreds of
kernels from Python. ``GraphedForward`` keeps one graph per signature (at most ``max_graphs``, least recently
used dropped; the signature includes the settings a graph bakes in, such as autocast and the attention backend:
``GraphedForward._context``), all in one memory pool, and builds each signature's layout once (index tensors on
the device at fixed addresses).

    graphed = capture(model)              # nothing is captured yet
    v = graphed(x, t, y, budgets=[64] * 8 + [4] * 8)   # first call of a signature: warm up + capture, then replay
    v = graphed(x2, t2, y, budgets=[64] * 8 + [4] * 8) # later calls: copy inputs in, replay

Where capture is impossible (CPU tensors, no CUDA, a backend that must read the device, an error during
capture) it warns once, in one line, and runs the model eagerly: same results, no speed-up. The samplers take
it through ``euler_sample(..., graphed=True)``.

Requirements met by the model path (tests/test_gpu_model.py): no host synchronisation in the forward
(host-side segment lengths from the layout), attention backends that launch fixed work for fixed shapes, and
known-answer checks / dispatch tuning done in the eager warm-up before capture.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict

import torch

from .._types import is_int
from ..layout import normalize_budgets

#: bumped whenever any module registers (or reassigns) a parameter, buffer or submodule, once a GraphedForward
#: exists (torch's global registration hooks): a graph reads the tensors it was captured with, so a model
#: whose tensors were replaced must be captured again
_EPOCH = [0]
_HOOKS: list = []


def _watch_registrations() -> None:
    if _HOOKS:
        return
    from torch.nn.modules import module as nn_module

    def bump(*args):
        _EPOCH[0] += 1
    _HOOKS.extend([nn_module.register_module_parameter_registration_hook(bump),
                   nn_module.register_module_buffer_registration_hook(bump),
                   nn_module.register_module_module_registration_hook(bump)])


class GraphedForward:
    """``model(x, t, y, budgets)`` replayed from CUDA graphs captured per budget signature.

    Arguments:
        model: an ``ElitDiT`` (any module with the same forward, ``cfg.latents_per_group`` and ``layout``).
        max_graphs: signatures kept (least recently used dropped; its memory returns to the shared pool).
        warmup: eager calls on a side stream before each capture (cuDNN / Triton autotune / known-answer checks
            happen there).

    Inference only (no autograd through a replay): an ``x`` or ``t`` that requires grad (with grad mode on) is a
    ValueError naming it, not an output without a graph. Calling returns a new tensor (a copy of the graph's static
    output), x's shape and dtype.

    A graph reads the model's parameters and buffers at the addresses they had at capture. Writing new values into
    them in place (``load_state_dict``, an optimizer step) is seen by the next replay; replacing them (``.to()``,
    ``.half()``, ``.float()`` on the model or a submodule, assigning a new ``nn.Parameter`` or submodule) or
    switching ``train()`` / ``eval()`` drops every graph, and the next call of each signature captures again. The
    check costs one ``data_ptr()`` read per parameter and buffer per call.
    ``stats`` counts captures, replays, eager fallbacks and graphs dropped because the model changed
    (``invalidated``). Raises what ``model`` raises for bad inputs (checked eagerly on the first call of each
    signature).
    """

    def __init__(self, model, max_graphs: int = 8, warmup: int = 2):
        if isinstance(model, GraphedForward):
            raise TypeError("model: already a GraphedForward; capture the model it wraps once (graphed.model)")
        if not callable(model) or not hasattr(model, "cfg") or not callable(getattr(model, "layout", None)):
            raise TypeError(f"model: expected an ElitDiT (a module with cfg, layout and forward), got "
                            f"{type(model).__name__}")
        if not is_int(max_graphs) or max_graphs < 1:
            raise ValueError(f"max_graphs: expected a positive int, got {max_graphs!r}")
        if not is_int(warmup) or warmup < 1:
            raise ValueError(f"warmup: expected an int >= 1, got {warmup!r}")
        self.model, self.max_graphs, self.warmup = model, int(max_graphs), int(warmup)
        self._graphs: OrderedDict = OrderedDict()
        self._pool = None
        self._warned = False
        self.stats = {"captures": 0, "replays": 0, "eager": 0, "invalidated": 0}
        _watch_registrations()
        self._tensors: list | None = None  # the model's parameters and buffers, listed at epoch _tensors_epoch
        self._tensors_epoch = -1
        self._state = None  # _model_state() when the graphs were captured

    # the samplers read these off the model
    @property
    def cfg(self):
        return self.model.cfg

    @property
    def null_class(self) -> int:
        return self.model.null_class

    def parameters(self, recurse: bool = True):
        return self.model.parameters(recurse)

    def signature(self, x, t, y, budgets) -> tuple:
        """The key of one graph: shapes, dtypes and device of the inputs, the settings that change what the
        forward computes (``_context``) and, last, the per-sample budgets."""
        bud = normalize_budgets(budgets, x.shape[0], self.model.cfg.latents_per_group)
        return (tuple(x.shape), x.dtype, t.dtype, y.dtype, str(x.device), *self._context(), tuple(bud))

    def _context(self) -> tuple:
        """Settings outside the inputs that a graph bakes in at capture: CUDA autocast (on, and its dtype), PyTorch's
        float32 matmul precision (TF32 or IEEE kernels), the model's attention backend and elementwise op,
        ``$ELIT_BACKEND`` and deterministic algorithms. A graph captured under other settings would replay them
        silently (a forward captured under bf16 autocast stays bf16 outside it): each setting gets its own."""
        from .._precision import fp32_matmul_precision
        from ..attention.dispatch import env_backend

        amp = torch.is_autocast_enabled("cuda")
        return (amp, torch.get_autocast_dtype("cuda") if amp else None, fp32_matmul_precision(),
                getattr(self.model, "backend", None), getattr(self.model, "elementwise", None), env_backend(),
                torch.are_deterministic_algorithms_enabled())

    def _model_state(self) -> tuple:
        """What the graphs depend on besides their inputs: the registration epoch, the mode, and the address,
        dtype and shape of every parameter and buffer (listed again only when a registration happened)."""
        if self._tensors_epoch != _EPOCH[0]:
            self._tensors = [*self.model.parameters(), *self.model.buffers()]
            self._tensors_epoch = _EPOCH[0]
        return (_EPOCH[0], self.model.training, tuple(map(torch.Tensor.data_ptr, self._tensors)))

    def _fallback(self, why: str, x, t, y, budgets):
        if not self._warned:
            warnings.warn(f"elit_kernels: CUDA-graph capture is off for this model ({why}); running eagerly",
                          RuntimeWarning, stacklevel=3)
            self._warned = True
        self.stats["eager"] += 1
        with torch.no_grad():
            return self.model(x, t, y, budgets)

    def _why_not(self, x) -> str | None:
        """Why these inputs cannot be captured (None when they can)."""
        if not torch.cuda.is_available():
            return "no CUDA device"
        if not (isinstance(x, torch.Tensor) and x.is_cuda):
            return "inputs are not CUDA tensors"
        return None

    def __call__(self, x, t, y, budgets=None):
        if torch.is_grad_enabled():  # a replay (and the eager fallback, to give the same result) records no autograd
            for name, u in (("x", x), ("t", t)):
                if isinstance(u, torch.Tensor) and u.requires_grad:
                    raise ValueError(f"{name}: requires grad, but a graphed forward is inference only (no autograd "
                                     "through a replay); call the model itself for gradients, or pass "
                                     f"{name}.detach()")
        why = self._why_not(x)
        if why is not None:
            return self._fallback(why, x, t, y, budgets)
        # Every call, as the eager forward does: a replay copies t and y into the captured buffers, which would
        # broadcast a t of shape [1] over the batch or take a CPU y, silently (value checks: async, no sync)
        self.model.stem.check_inputs(x, t, y)
        key = self.signature(x, t, y, budgets)
        state = self._model_state()
        if state != self._state:  # the model's tensors were replaced (or its mode switched): its graphs are stale
            self.stats["invalidated"] += len(self._graphs)
            self._graphs.clear()
            self._state = state
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(x, t, y, key)
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager, said once
                torch.cuda.synchronize()
                return self._fallback(f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}",
                                      x, t, y, budgets)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, (xs, ts, ys), out = entry[:3]
        xs.copy_(x)
        ts.copy_(t)
        ys.copy_(y)
        graph.replay()
        self.stats["replays"] += 1
        return out.clone()

    def _capture(self, x, t, y, key):
        """``(graph, static inputs, static output, layout)`` of one signature. The graph's kernels read the
        layout's device tensors (cu_seqlens, index maps, its attention plans) at the addresses they had at
        capture, and the model's layout cache drops a layout after ``LAYOUT_CACHE_SIZE`` other signatures: the
        entry holds the layout, so its memory lives exactly as long as the graph that reads it."""
        model = self.model
        bud = list(key[-1])
        lay = model.layout(bud, x.shape[0], x.device)
        xs, ts, ys = x.clone(), t.clone(), y.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup):
                model(xs, ts, ys, layout=lay)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self._pool):
            out = model(xs, ts, ys, layout=lay)
        self.stats["captures"] += 1
        return graph, (xs, ts, ys), out, lay

    def clear(self) -> None:
        """Drop every captured graph (their memory returns to the pool)."""
        self._graphs.clear()

    @property
    def signatures(self) -> list:
        """The captured signatures, least recently used first."""
        return list(self._graphs)


def capture(model, max_graphs: int = 8, warmup: int = 2) -> GraphedForward:
    """``GraphedForward(model, max_graphs, warmup)``: see the module docstring."""
    return GraphedForward(model, max_graphs, warmup)
