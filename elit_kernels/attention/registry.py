"""Backend registry for ``varlen_attention``: the ``Backend`` base class, the registry, ``run_backend``.

A backend declares what it can run as class data (dtypes, devices, native head dims, GQA, LSE, the GPU it
needs), which the base class turns into ``not_supported_reasons``; ``dispatch.select_backend`` picks among
the backends with no reasons. The backends themselves live in ``elit_kernels.attention.backends``, one
module per family.

Adding a backend::

    class MyBackend(Backend):
        name, priority = "mine", 50
        devices, dtypes, head_dims, supports_gqa = ("cuda",), (torch.bfloat16,), (64, 128), False
        def forward(self, inp): return my_kernel(inp.q, inp.k, inp.v, ...)
    register_backend(MyBackend())
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .._amp import autocast_device, autocast_off
from .._types import is_int, is_real
from .inputs import AttnInputs


_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def deterministic_refusal(b: "Backend", inp: AttnInputs) -> str | None:
    """The reason ``b`` cannot run ``inp`` because the call asks for a deterministic backward that ``b`` does not
    give on ``inp``'s device (None when it can): one of ``b.not_supported_reasons``, which ``select_backend``
    also looks for by itself (PyTorch's warn-only mode turns it into a warning for a backend asked for by name)."""
    det = b.deterministic_devices
    if not inp.deterministic or det is None or inp.q.device.type in det or not inp.requires_grad:
        return None
    source = ("torch.use_deterministic_algorithms(True)" if torch.are_deterministic_algorithms_enabled()
              else "deterministic=True")
    return (f"its backward is not deterministic on {inp.q.device.type} ({source} asks for one"
            + (f"; it is on {' and '.join(det)})" if det else ")"))


class Backend:
    """Base class: subclasses set ``name`` and ``priority``, declare what they run as class data, and
    implement ``forward``.

    The base turns the declaration into uniform ``not_supported_reasons``; a subclass adds only its
    special cases (and calls the parent). ``forward(inp)`` returns ``out [total_q, H, D]``, or
    ``(out, lse [H, total_q])`` when ``inp.return_lse`` is True.
    """

    name: str = "?"
    priority: int = 0
    #: one-line human description shown by ``describe_backends``.
    description: str = ""
    #: dtypes of q/k/v it runs.
    dtypes: tuple = _ALL_DTYPES
    #: device types (``"cpu"``, ``"cuda"``) it runs on; None: any.
    devices: tuple | None = None
    #: head dims it runs natively: exactly these, or (None) every multiple of ``head_dim_multiple`` up to
    #: ``max_head_dim``. Any other D up to the largest native dim is zero-padded by ``varlen_attention``.
    head_dims: tuple | None = None
    head_dim_multiple: int = 1
    max_head_dim: int = 256
    #: k/v with fewer heads than q (GQA / MQA).
    supports_gqa: bool = True
    #: returns the log-sum-exp of each query row (``return_attn_probs=True``).
    supports_lse: bool = True
    #: sliding-window attention (``window_size``) and logit soft-capping (``softcap``).
    supports_window: bool = True
    supports_softcap: bool = True
    #: default dispatch first checks it on a small case against the reference (``known_answer.py``); off for
    #: the pure-PyTorch backends.
    known_answer: bool = True
    #: lowest CUDA compute capability ``(major, minor)`` its CUDA kernels run on (None: any); CPU inputs are
    #: not affected.
    min_compute_capability: tuple | None = None
    #: picked by default dispatch when it can run (False: only when asked for by name, e.g. a reference
    #: implementation or a comparator that is slower everywhere it was measured).
    default_eligible: bool = True
    #: device types (``"cpu"``, ``"cuda"``) on which its backward is deterministic: bitwise the same gradients
    #: for the same inputs, run after run (no atomics, no order-dependent reductions); None: every device.
    #: A call that asks for it (``deterministic=True``) and needs a backward runs only where this holds.
    #: Empty (the default, for a backend that does not say): nowhere.
    deterministic_devices: tuple | None = ()
    #: differentiable under forward-mode AD (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``) and
    #: ``torch.func.grad`` / ``vjp`` / ``jacrev``: its forward is PyTorch's own differentiable ops. A custom op with a
    #: ``register_autograd`` formula is not (PyTorch gives it a zero tangent, silently, or fails under
    #: ``torch.func.grad``; ``elit_kernels._transforms``), so such a call runs only where this is True.
    supports_transforms: bool = False

    def is_available(self) -> bool:
        return True

    def plan_runner(self, inp):
        """Optional fast path for ``AttentionPlan``: a callable ``(q, k, v) -> out`` equal to ``run_backend(self,
        inp2)`` for every ``inp2`` that differs from ``inp`` only in q/k/v tensors of the same shapes, dtypes,
        devices and grad mode (what a plan's cache key holds), or None (the plan calls ``run_backend``). A plan
        made once per layout calls it on every later forward, so it should do the kernel's work and nothing else."""
        return None

    def run_head_dim(self, d: int) -> int | None:
        """The head dim a D-dim problem runs at here (D, or the next native dim after zero padding); None
        when D is larger than every native dim."""
        if self.head_dims is not None:
            fits = [n for n in self.head_dims if n >= d]  # a list, not min(default=): torch 2.13's dynamo needs it
            return min(fits) if fits else None
        m = self.head_dim_multiple
        padded = -(-d // m) * m
        return padded if padded <= self.max_head_dim else None

    def _native_dims_text(self) -> str:
        if self.head_dims is not None:
            return ", ".join(map(str, self.head_dims))
        if self.head_dim_multiple == 1:
            return f"1..{self.max_head_dim}"
        return f"multiples of {self.head_dim_multiple} up to {self.max_head_dim}"

    def not_supported_reasons(self, inp: AttnInputs) -> list[str]:
        r = []
        if inp.q.dtype not in self.dtypes:
            r.append(f"dtype {inp.q.dtype} not in {[str(d) for d in self.dtypes]}")
        if self.devices is not None and inp.q.device.type not in self.devices:
            r.append(f"needs {' or '.join(self.devices)} tensors, got device {inp.q.device}")
        if self.run_head_dim(inp.head_dim) is None:
            r.append(f"head dim {inp.head_dim} too large (runs {self._native_dims_text()})")
        if not self.supports_gqa and inp.num_kv_heads != inp.num_heads:
            r.append(f"no grouped-query attention (q has {inp.num_heads} heads, k/v {inp.num_kv_heads})")
        if not self.supports_lse and inp.return_lse:
            r.append("cannot return the softmax log-sum-exp (return_attn_probs=True)")
        if not self.supports_window and inp.has_window:
            r.append(f"no sliding-window attention (window_size=({inp.window_left}, {inp.window_right}))")
        if not self.supports_softcap and inp.softcap != 0.0:
            r.append(f"no logit soft-capping (softcap={inp.softcap})")
        det = deterministic_refusal(self, inp)
        if det is not None:
            r.append(det)
        if inp.transform is not None and not self.supports_transforms:
            r.append(f"cannot be differentiated under {inp.transform}: its op has a reverse-mode backward formula "
                     "only (PyTorch would give a zero tangent or fail); the 'torch' and 'reference' backends run "
                     "PyTorch's own ops there")
        cc = self.min_compute_capability
        if cc is not None and inp.q.device.type == "cuda":
            have = _compute_capability(inp.q.device)
            if have < tuple(cc):
                r.append(f"needs a GPU of compute capability {cc[0]}.{cc[1]} or newer, this one is {have[0]}.{have[1]}")
        return r

    def forward(self, inp: AttnInputs):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<backend {self.name} priority={self.priority}>"


_CC: dict = {}


def _compute_capability(device: torch.device) -> tuple:
    """``(major, minor)`` of a CUDA device, read once per device (a driver call, not a sync)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CC:
        _CC[idx] = tuple(torch.cuda.get_device_capability(idx))
    return _CC[idx]


_REGISTRY: dict[str, Backend] = {}
#: bumped by every registration: dispatch's cached decisions are only valid for the generation they were made in
generation = 0


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) a backend under ``backend.name``.

    Its declaration (the class data above) is checked here, so a badly declared backend is refused when it is
    registered instead of breaking default dispatch for every call later: TypeError / ValueError naming
    ``backend``, the field and what it takes."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend: expected an elit_kernels.Backend, got {type(backend).__name__}")
    global generation
    _check_declaration(backend)
    _REGISTRY[backend.name] = backend
    generation += 1
    return backend


def _is_device_type(name: str) -> bool:
    """Whether ``name`` is a device type as ``torch.device(...).type`` gives it ("cpu", "cuda"; not "cuda:0")."""
    try:
        return torch.device(name).type == name
    except (RuntimeError, ValueError, TypeError):
        return False


def _check_declaration(b: Backend) -> None:
    """``register_backend``'s checks of one backend's declared fields."""
    def bad(field, want, exc=TypeError):
        v = getattr(b, field)
        raise exc(f"backend: {field} must be {want}, got {type(v).__name__} ({v!r})")

    if not isinstance(b.name, str):
        bad("name", "a str")
    if not b.name or "+" in b.name or b.name != b.name.strip():
        bad("name", "a non-empty str without '+' or surrounding spaces", ValueError)
    if not is_real(b.priority):
        bad("priority", "a number")
    if not math.isfinite(b.priority):
        bad("priority", "a finite number (it orders the backends)", ValueError)
    if not isinstance(b.description, str):
        bad("description", "a str")
    if not isinstance(b.dtypes, (tuple, list, frozenset, set)) or not b.dtypes or \
            not all(isinstance(d, torch.dtype) for d in b.dtypes):
        bad("dtypes", "a non-empty tuple of torch dtypes, e.g. (torch.float16, torch.bfloat16)")
    def device_types(field, none_means, example, non_empty):
        v = getattr(b, field)
        if v is None:
            return
        if not isinstance(v, (tuple, list, frozenset, set)) or (non_empty and not v) or \
                not all(isinstance(d, str) for d in v):
            bad(field, f"None ({none_means}) or a {'non-empty ' if non_empty else ''}tuple of device types, e.g. "
                       f"{example}")
        if not all(_is_device_type(d) for d in v):
            bad(field, f"device types as torch.device(...).type names them, e.g. {example} (not 'cuda:0' or 'CPU')",
                ValueError)

    device_types("devices", "any", "('cuda',)", non_empty=True)
    device_types("deterministic_devices", "every device", "('cpu',) or ()", non_empty=False)
    if b.head_dims is not None and (not isinstance(b.head_dims, (tuple, list, frozenset, set)) or not b.head_dims or
                                    not all(is_int(d) and d >= 1 for d in b.head_dims)):
        bad("head_dims", "None (every multiple of head_dim_multiple) or a non-empty tuple of ints >= 1")
    for field in ("head_dim_multiple", "max_head_dim"):
        if not is_int(getattr(b, field)) or getattr(b, field) < 1:
            bad(field, "an int >= 1", ValueError)
    for field in ("supports_gqa", "supports_lse", "supports_window", "supports_softcap", "known_answer",
                  "default_eligible", "supports_transforms"):
        if not isinstance(getattr(b, field), bool):
            bad(field, "a bool")
    cc = b.min_compute_capability
    if cc is not None and (not isinstance(cc, (tuple, list)) or len(cc) != 2 or not all(is_int(c) for c in cc)):
        bad("min_compute_capability", "None or (major, minor), e.g. (8, 0)")
    for method in ("forward", "is_available", "not_supported_reasons"):
        if not callable(getattr(b, method, None)):
            bad(method, "a method")


def known_backends() -> list[str]:
    """Names of all registered backends, highest priority first."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)]


def get_backend(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a str or None, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend: unknown backend {name!r}; known backends: {', '.join(known_backends())}") from None


def unavailable_reason(b: Backend) -> str | None:
    """Why ``b`` cannot run in this environment at all (None when it can): the backend's own
    ``unavailable_reason`` when it states one, else a generic sentence. An ``is_available`` that raises makes
    the backend unavailable, the exception its reason: one faulty backend never breaks the others' dispatch."""
    try:
        if b.is_available():
            return None
    except Exception as e:  # noqa: BLE001 - any fault of a backend's own check
        return f"its is_available() raised {type(e).__name__}: {e}"
    return getattr(b, "unavailable_reason", None) or NOT_AVAILABLE


NOT_AVAILABLE = "not available in this environment"  # unavailable_reason of a backend that states none


def reasons(b: Backend, inp: AttnInputs) -> list[str]:
    """Every reason ``b`` cannot run ``inp`` ([] when it can). A ``not_supported_reasons`` that raises is a
    reason too (the backend is skipped, not the call)."""
    why = unavailable_reason(b)
    try:
        more = list(b.not_supported_reasons(inp))
    except Exception as e:  # noqa: BLE001 - any fault of a backend's own check
        more = [f"its not_supported_reasons() raised {type(e).__name__}: {e}"]
    return ([why] if why else []) + more


def registered_backends() -> list[Backend]:
    """Every registered backend, highest priority first."""
    return sorted(_REGISTRY.values(), key=lambda b: -b.priority)


def run_backend(b: Backend, inp: AttnInputs):
    """Run validated ``inp`` on backend ``b``: zero-pads the head dim to one ``b`` runs natively (the
    scale stays that of the real D, already in ``inp``) and slices the output back, as flash-attn's
    wrapper does; autocast is off inside (``_amp``: attention runs in its inputs' dtype). Returns ``out``, or ``(out, lse)`` when
    ``inp.return_lse``."""
    d = inp.head_dim
    d_run = b.run_head_dim(d)
    if d_run != d:
        pad = (0, d_run - d)
        inp = dataclasses.replace(inp, q=F.pad(inp.q, pad), k=F.pad(inp.k, pad), v=F.pad(inp.v, pad))
    amp = autocast_device(inp.q)
    if amp is None:
        res = b.forward(inp)
    else:
        with autocast_off(amp):
            res = b.forward(inp)
    if inp.return_lse and not (isinstance(res, tuple) and len(res) == 2):
        raise RuntimeError(f"backend {b.name!r}: asked for (out, lse), its forward returned {type(res).__name__}")
    out, lse = res if inp.return_lse else (res, None)
    q = inp.q
    if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        got = (f"{type(out).__name__}" if not isinstance(out, torch.Tensor) else
               f"{tuple(out.shape)} {out.dtype} on {out.device}")
        raise RuntimeError(f"backend {b.name!r}: its forward returned {got}, the contract is q's shape, dtype and "
                           f"device ({tuple(q.shape)} {q.dtype} on {q.device})")
    if d_run != d:
        out = out[..., :d]
    if inp.return_lse:
        want, wdt = (q.shape[1], q.shape[0]), torch.float64 if q.dtype == torch.float64 else torch.float32
        if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != want or lse.dtype != wdt or lse.device != q.device:
            got = (f"{type(lse).__name__}" if not isinstance(lse, torch.Tensor) else
                   f"{tuple(lse.shape)} {lse.dtype} on {lse.device}")
            raise RuntimeError(f"backend {b.name!r}: its forward returned an lse of {got}, the contract is "
                               f"{str(wdt)[6:]} (float64 for float64 inputs) [H, total_q] = {want} on {q.device}")
        return out, lse.detach()
    return out


def kept_runner(b: Backend, inp: AttnInputs):
    """What an ``AttentionPlan`` keeps for later calls like ``inp`` on ``b``: ``b.plan_runner(inp)`` where ``b`` runs
    the head dim natively, else None (``run_backend`` zero-pads D there; a runner runs the call as given)."""
    return b.plan_runner(inp) if b.run_head_dim(inp.head_dim) == inp.head_dim else None


def describe_inputs(inp: AttnInputs) -> str:
    """Shapes, dtype and device of ``inp`` in one line (dispatch errors start with it)."""
    return (f"q {tuple(inp.q.shape)}, k/v {tuple(inp.k.shape)}, {inp.num_segments} segments, {inp.q.dtype}, "
            f"{inp.q.device}" + (", causal" if inp.causal else "") + (", return_lse" if inp.return_lse else "")
            + (f", window_size=({inp.window_left}, {inp.window_right})" if inp.has_window else "")
            + (f", softcap={inp.softcap}" if inp.softcap else "") + (", deterministic" if inp.deterministic else "")
            + (f", under {inp.transform}" if inp.transform else ""))


def describe_backends(inp: AttnInputs | None = None) -> list[dict]:
    """One dict per backend: name, priority, available, why not (``unavailable_reason``), whether default
    dispatch may pick it, the device types its backward is deterministic on (None: every one), and (given
    inputs) the reasons it can't run them."""
    if inp is not None and not isinstance(inp, AttnInputs):
        raise TypeError(f"inp: expected an AttnInputs (from elit_kernels.attention.validate_inputs) or None, got "
                        f"{type(inp).__name__}")
    rows = []
    for b in registered_backends():
        why = unavailable_reason(b)  # one is_available() call per backend (False, with the reason, if it raises)
        row = {"name": b.name, "priority": b.priority, "available": why is None, "description": b.description,
               "unavailable_reason": why, "default_eligible": b.default_eligible,
               "deterministic_devices": None if b.deterministic_devices is None else tuple(b.deterministic_devices)}
        if inp is not None:
            row["reasons"] = reasons(b, inp)
        rows.append(row)
    return rows
