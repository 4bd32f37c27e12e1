"""Backends over the compiled extension ``elit_kernels._C``: ``cuda`` (CUDA kernels) and ``cpp`` (CPU loops).

Both stay registered when ``_C`` is not usable, so ``describe_backends()`` lists them with the loader's reason.
The ``cuda`` kernels compute scores through shared memory without tensor-core softmax; on the first H200
measurement they were the slowest backend at every ELIT shape (7-8 % of cuDNN at core shapes), so default
dispatch never picks them: ask for ``backend="cuda"`` by name (a reference implementation of the CUDA path).
"""
from __future__ import annotations

import torch

from ... import _cext
from ..inputs import AttnInputs
from ..registry import Backend, register_backend


def _attn_forward(inp: AttnInputs):
    out, lse = torch.ops.elit.varlen_attn_fwd(inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k,
                                              inp.max_seqlen_q, inp.max_seqlen_k, inp.softmax_scale, inp.causal,
                                              inp.window_left, inp.window_right, inp.softcap)
    return (out, lse) if inp.return_lse else out


class _CompiledBackend(Backend):
    """A backend whose kernels live in ``_C``: registered even when ``_C`` is not usable, so that
    ``describe_backends()`` lists it as unavailable and says why (in ``description``)."""

    summary = ""
    #: every (segment, head) task writes its own gradient rows: no atomics (csrc/attention_cpu.cpp,
    #: csrc/cuda/attention_bwd.cu)
    deterministic_devices = None

    @property
    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run here (None when it can)."""
        return _cext.unavailable_reason

    @property
    def description(self) -> str:
        why = self.unavailable_reason
        return self.summary + (f" [unavailable: {why}]" if why else "")

    def is_available(self) -> bool:
        return self.unavailable_reason is None


class CudaBackend(_CompiledBackend):
    name = "cuda"
    priority = 25
    default_eligible = False  # measured slowest at every ELIT shape on an H200 (module docstring)
    summary = ("compiled CUDA kernels (elit_kernels._C): tensor-core varlen attention, GQA by indexing, a "
               "one-warp path for tiny Read/Write segments; fp16/bf16, head dim 64/72/128 (smaller ones "
               "zero-padded)")
    dtypes = (torch.float16, torch.bfloat16)
    devices = ("cuda",)
    #: must match kHeadDims in csrc/kernel_limits.h (tests/test_compiled_checks.py checks both sides)
    head_dims = (64, 72, 128)
    #: the CUDA kernels have neither (csrc/checks.h refuses them)
    supports_window = False
    supports_softcap = False

    @property
    def unavailable_reason(self) -> str | None:
        if _cext.unavailable_reason is not None:
            return _cext.unavailable_reason
        if not _cext.has_kernel("varlen_attn_fwd_cuda"):
            return "elit_kernels._C was built without the CUDA kernels (torch without CUDA, no nvcc, or ELIT_SKIP_CUDA_BUILD=1)"
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        return None

    def forward(self, inp: AttnInputs):
        return _attn_forward(inp)


class CppBackend(_CompiledBackend):
    name = "cpp"
    priority = 5
    summary = "compiled C++ CPU loops (elit_kernels._C), one (segment, head) per task; all float dtypes"
    devices = ("cpu",)

    @property
    def unavailable_reason(self) -> str | None:
        if _cext.unavailable_reason is None and not _cext.has_kernel("varlen_attn_fwd_cpu"):
            return f"elit_kernels._C has no CPU attention kernel (build info: {_cext.build_info()})"
        return _cext.unavailable_reason

    def forward(self, inp: AttnInputs):
        return _attn_forward(inp)


register_backend(CudaBackend())
register_backend(CppBackend())
