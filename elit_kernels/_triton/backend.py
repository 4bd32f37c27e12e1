"""Registers the ``triton`` backend of ``varlen_attention`` (priority 30: preferred over the
PyTorch backends whenever it can run)."""
from __future__ import annotations

import importlib.util
import os

import torch

from ..backends import AttnInputs, Backend, register_backend

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    name = "triton"
    priority = 30
    description = ("Triton online-softmax kernels over packed segments, deterministic backward; "
                   "CUDA, or CPU under TRITON_INTERPRET=1; fp16/bf16/fp32, head dim % 8 == 0, <= 256")

    def is_available(self) -> bool:
        return _HAS_TRITON and (torch.cuda.is_available() or _interpreting())

    def not_supported_reasons(self, inp: AttnInputs) -> list[str]:
        r = []
        if inp.q.dtype not in _DTYPES:
            r.append(f"dtype {inp.q.dtype} not in {[str(d) for d in _DTYPES]}")
        d = inp.head_dim
        if d % 8 != 0 or d > 256:
            r.append(f"head dim {d} is not a multiple of 8 in [8, 256]")
        if inp.q.device.type != "cuda" and not _interpreting():
            r.append(f"needs CUDA tensors (or TRITON_INTERPRET=1), got device {inp.q.device}")
        return r

    def forward(self, inp: AttnInputs) -> torch.Tensor:
        from . import ops  # noqa: F401  (registers the custom ops)

        out, _ = torch.ops.elit.varlen_attn_fwd_triton(
            inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.max_seqlen_q, inp.max_seqlen_k,
            inp.softmax_scale, inp.causal)
        return out


register_backend(TritonBackend())
