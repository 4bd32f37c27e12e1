"""Backend registry for ``varlen_attention``.

A backend declares what it can run (``not_supported_reasons``); the dispatcher picks the
highest-priority backend with no reasons. The choice is plain Python over tensor metadata, so it
traces cleanly under ``torch.compile`` (no cached calls, no device syncs).

Adding a backend::

    class MyBackend(Backend):
        name, priority = "mine", 50
        def not_supported_reasons(self, inp): return [] if inp.q.is_cuda else ["needs CUDA"]
        def forward(self, inp): return my_kernel(inp.q, inp.k, inp.v, ...)
    register_backend(MyBackend())
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class AttnInputs:
    """Validated arguments of one ``varlen_attention`` call (softmax_scale already resolved)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    softmax_scale: float
    causal: bool

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1


class Backend:
    """Base class: subclasses set ``name`` and ``priority`` and implement ``forward``."""

    name: str = "?"
    priority: int = 0
    #: one-line human description shown by ``describe_backends``.
    description: str = ""

    def is_available(self) -> bool:
        return True

    def not_supported_reasons(self, inp: AttnInputs) -> list[str]:
        return []

    def forward(self, inp: AttnInputs) -> torch.Tensor:  # pragma: no cover - abstract
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


def _reasons(b: Backend, inp: AttnInputs) -> list[str]:
    if not b.is_available():
        return ["not available in this environment"]
    return b.not_supported_reasons(inp)


def select_backend(inp: AttnInputs, backend: str | None = None) -> Backend:
    """Pick the backend for ``inp``.

    ``backend=None`` picks ``$ELIT_BACKEND`` when set, otherwise the highest-priority backend that
    supports the inputs. An explicit backend that cannot run raises one ``ValueError`` listing
    every reason.
    """
    explicit = backend if backend is not None else (os.environ.get("ELIT_BACKEND") or None)
    if explicit is not None:
        b = get_backend(explicit)
        reasons = _reasons(b, inp)
        if reasons:
            src = "backend" if backend is not None else "ELIT_BACKEND"
            raise ValueError(f"{src}: backend {b.name!r} cannot run these inputs: " + "; ".join(reasons))
        return b
    tried = []
    for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
        reasons = _reasons(b, inp)
        if not reasons:
            return b
        tried.append(f"{b.name}: {'; '.join(reasons)}")
    raise ValueError("no backend supports these inputs:\n  " + "\n  ".join(tried))


def describe_backends(inp: AttnInputs | None = None) -> list[dict]:
    """One dict per backend: name, priority, available, and (given inputs) the reasons it can't run."""
    rows = []
    for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
        row = {"name": b.name, "priority": b.priority, "available": b.is_available(), "description": b.description}
        if inp is not None:
            row["reasons"] = _reasons(b, inp)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Built-in pure-PyTorch backends and optional comparators.
# ---------------------------------------------------------------------------------------------

def _common_reasons(inp: AttnInputs, dtypes: tuple, cuda_only: bool = False, max_d: int = 256) -> list[str]:
    r = []
    if inp.q.dtype not in dtypes:
        r.append(f"dtype {inp.q.dtype} not in {[str(d) for d in dtypes]}")
    if cuda_only and inp.q.device.type != "cuda":
        r.append(f"needs CUDA tensors, got device {inp.q.device}")
    if inp.head_dim > max_d:
        r.append(f"head dim {inp.head_dim} > {max_d}")
    return r


class ReferenceBackend(Backend):
    name = "reference"
    priority = 0
    description = "pure PyTorch, one segment at a time, fp32 (fp64 for fp64 input) accumulation: the truth"

    def not_supported_reasons(self, inp):
        return _common_reasons(inp, (torch.float16, torch.bfloat16, torch.float32, torch.float64))

    def forward(self, inp):
        from .reference.attention import varlen_attention_reference

        return varlen_attention_reference(
            inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, softmax_scale=inp.softmax_scale, causal=inp.causal
        )


class TorchBackend(Backend):
    name = "torch"
    priority = 10
    description = "PyTorch SDPA over a padded batch with a key/causal mask (no host sync): the fair baseline"

    def not_supported_reasons(self, inp):
        return _common_reasons(inp, (torch.float16, torch.bfloat16, torch.float32, torch.float64))

    def forward(self, inp):
        from .torch_attention import varlen_attention_padded_sdpa

        return varlen_attention_padded_sdpa(
            inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.max_seqlen_q, inp.max_seqlen_k,
            softmax_scale=inp.softmax_scale, causal=inp.causal,
        )


class _CudaComparator(Backend):
    """A CUDA-only fp16/bf16 kernel from another package, benchmarked against ours; never the default."""

    priority = -10
    module = ""  # importable module that provides it

    def is_available(self):
        try:
            importlib.import_module(self.module)
        except ImportError:
            return False
        return torch.cuda.is_available()

    def not_supported_reasons(self, inp):
        return _common_reasons(inp, (torch.float16, torch.bfloat16), cuda_only=True)


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


for _b in (ReferenceBackend(), TorchBackend(), TorchVarlenBackend(), FlashAttnBackend()):
    register_backend(_b)

