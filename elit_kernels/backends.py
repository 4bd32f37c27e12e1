"""Backend registry for ``varlen_attention``.

A backend declares what it can run as class data (dtypes, devices, native head dims, GQA, LSE),
which the base class turns into ``not_supported_reasons``; the dispatcher picks the highest-priority
backend with no reasons. The choice is plain Python over tensor metadata, so it traces cleanly under
``torch.compile`` (no cached calls, no device syncs).

Adding a backend::

    class MyBackend(Backend):
        name, priority = "mine", 50
        devices, dtypes, head_dims, supports_gqa = ("cuda",), (torch.bfloat16,), (64, 128), False
        def forward(self, inp): return my_kernel(inp.q, inp.k, inp.v, ...)
    register_backend(MyBackend())
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
import torch


@dataclass(frozen=True)
class AttnInputs:
    """Validated arguments of one ``varlen_attention`` call (softmax_scale already resolved).

    ``k``/``v`` may have fewer heads than ``q`` (grouped-query attention: ``H % H_kv == 0``); ``q`` and
    ``k``/``v`` may hold rows past ``cu_seqlens_*[-1]`` (never read; those output rows are zeros).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    softmax_scale: float
    causal: bool
    return_lse: bool = False
    #: sliding window (flash-attn semantics), -1 = unbounded side; with ``causal`` the right side is -1
    #: here (causal already bounds it at 0).
    window_left: int = -1
    window_right: int = -1
    #: logit soft-capping ``softcap * tanh(s / softcap)``; 0 = off.
    softcap: float = 0.0

    @property
    def has_window(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def num_heads(self) -> int:
        return self.q.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1


_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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

    def is_available(self) -> bool:
        return True

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
        return r

    def forward(self, inp: AttnInputs):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<backend {self.name} priority={self.priority}>"


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) a backend under ``backend.name``."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend: expected an elit_kernels.backends.Backend, got {type(backend).__name__}")
    _REGISTRY[backend.name] = backend
    return backend


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
    ``unavailable_reason`` when it states one, else a generic sentence."""
    if b.is_available():
        return None
    return getattr(b, "unavailable_reason", None) or "not available in this environment"


def _reasons(b: Backend, inp: AttnInputs) -> list[str]:
    why = unavailable_reason(b)
    return ([why] if why else []) + b.not_supported_reasons(inp)


def describe_inputs(inp: AttnInputs) -> str:
    """Shapes, dtype and device of ``inp`` in one line (dispatch errors start with it)."""
    return (f"q {tuple(inp.q.shape)}, k/v {tuple(inp.k.shape)}, {inp.num_segments} segments, {inp.q.dtype}, "
            f"{inp.q.device}" + (", causal" if inp.causal else "") + (", return_lse" if inp.return_lse else "")
            + (f", window_size=({inp.window_left}, {inp.window_right})" if inp.has_window else "")
            + (f", softcap={inp.softcap}" if inp.softcap else ""))


def select_backend(inp: AttnInputs, backend: str | None = None) -> Backend:
    """Pick the backend for ``inp``.

    ``backend=None`` picks ``$ELIT_BACKEND`` when set, otherwise the highest-priority backend that
    supports the inputs and passes its first-use known-answer check (``known_answer.py``: a compiled
    kernel that gives wrong numbers on a small case of this kind is warned about and skipped). An
    explicit backend that cannot run raises one ``ValueError`` listing every reason.
    """
    explicit = backend if backend is not None else (os.environ.get("ELIT_BACKEND") or None)
    if explicit is not None:
        b = get_backend(explicit)
        reasons = _reasons(b, inp)
        if reasons:
            src = "backend" if backend is not None else "ELIT_BACKEND"
            raise ValueError(f"{src}: backend {b.name!r} cannot run these inputs ({describe_inputs(inp)}): "
                             + "; ".join(reasons))
        return b
    from .known_answer import check_dispatch

    tried = []
    for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
        reasons = _reasons(b, inp)
        if not reasons:
            failed = check_dispatch(b, inp)
            if failed is None:
                return b
            reasons = [f"failed its known-answer check: {failed}"]
        tried.append(f"{b.name}: {'; '.join(reasons)}")
    raise ValueError(f"no backend supports these inputs ({describe_inputs(inp)}):\n  " + "\n  ".join(tried))


def describe_backends(inp: AttnInputs | None = None) -> list[dict]:
    """One dict per backend: name, priority, available, why not (``unavailable_reason``: what is missing and what
    would fix it; None when available), description, and (given inputs) every reason it can't run them."""
    rows = []
    for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
        why = unavailable_reason(b)
        row = {"name": b.name, "priority": b.priority, "available": why is None, "unavailable_reason": why,
               "description": b.description}
        if inp is not None:
            row["reasons"] = _reasons(b, inp)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Built-in pure-PyTorch backends and optional comparators.
# ---------------------------------------------------------------------------------------------

class ReferenceBackend(Backend):
    name = "reference"
    priority = 0
    known_answer = False  # it is the known answer
    description = "pure PyTorch, one segment at a time, fp32 (fp64 for fp64 input) accumulation: the truth"

    def forward(self, inp):
        from .reference.attention import varlen_attention_reference

        return varlen_attention_reference(
            inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, softmax_scale=inp.softmax_scale,
            causal=inp.causal, return_lse=inp.return_lse, window_size=(inp.window_left, inp.window_right),
            softcap=inp.softcap)


class TorchBackend(Backend):
    name = "torch"
    priority = 10
    known_answer = False  # plain PyTorch ops
    description = ("PyTorch: one dense SDPA per run of equal segments on views of the packed tensors (eager), "
                   "else matmul/softmax over segments grouped by their real lengths; one host read of cu_seqlens "
                   "per call, cost independent of max_seqlen: the fair baseline")

    def not_supported_reasons(self, inp):
        r = super().not_supported_reasons(inp)
        if inp.q.is_cuda and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing():
            r.append("reads segment lengths on the host, which CUDA-graph capture forbids")
        return r

    def forward(self, inp):
        if not inp.return_lse and not torch.compiler.is_compiling() and inp.softcap == 0.0:
            from .torch_attention import sdpa_over_runs

            out = sdpa_over_runs(inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.softmax_scale,
                                 inp.causal, inp.window_left, inp.window_right)
            if out is not None:
                return out
        out, lse = torch.ops.elit.varlen_attn_fwd_torch(
            inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.max_seqlen_q, inp.max_seqlen_k,
            inp.softmax_scale, inp.causal, inp.window_left, inp.window_right, inp.softcap)
        return (out, lse) if inp.return_lse else out


class _CudaComparator(Backend):
    """A CUDA-only fp16/bf16 kernel from another package, benchmarked against ours; never the default.

    Rows of q past ``cu_seqlens_q[-1]`` are left as that package leaves them."""

    priority = -10
    known_answer = False  # never picked by default
    module = ""  # importable module that provides it
    dtypes = (torch.float16, torch.bfloat16)
    devices = ("cuda",)
    head_dim_multiple = 8
    supports_gqa = False
    supports_lse = False
    supports_window = False
    supports_softcap = False

    @property
    def unavailable_reason(self) -> str | None:
        try:
            importlib.import_module(self.module)
        except ImportError as e:
            return f"{self.module} is not importable ({e})"
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        return None

    def is_available(self):
        return self.unavailable_reason is None


class TorchVarlenBackend(_CudaComparator):
    name, module = "torch_varlen", "torch.nn.attention.varlen"
    description = "torch.nn.attention.varlen.varlen_attn (FA2 in PyTorch); CUDA, fp16/bf16"

    def forward(self, inp):
        from torch.nn.attention.varlen import varlen_attn

        kw = {"window_size": (-1, 0)} if inp.causal else {}
        return varlen_attn(
            inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.max_seqlen_q, inp.max_seqlen_k,
            scale=inp.softmax_scale, **kw,
        )


class FlashAttnBackend(_CudaComparator):
    name, module = "flash_attn", "flash_attn"
    description = "flash_attn.flash_attn_varlen_func (optional package); CUDA, fp16/bf16"

    def forward(self, inp):
        import flash_attn

        return flash_attn.flash_attn_varlen_func(
            inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.max_seqlen_q, inp.max_seqlen_k,
            softmax_scale=inp.softmax_scale, causal=inp.causal,
        )


from . import torch_attention  # noqa: E402,F401  (registers elit::varlen_attn_{fwd,bwd}_torch)

for _b in (ReferenceBackend(), TorchBackend(), TorchVarlenBackend(), FlashAttnBackend()):
    register_backend(_b)
