"""Registers the ``triton`` backend of ``varlen_attention`` (priority 30: preferred over the
PyTorch backends whenever it can run)."""
from __future__ import annotations

import importlib.util
import os

import torch

from ..backends import AttnInputs, Backend, register_backend

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    name = "triton"
    priority = 30
    description = ("Triton online-softmax kernels over packed segments, GQA by indexing, deterministic backward; "
                   "CUDA, or CPU under TRITON_INTERPRET=1; fp16/bf16/fp32, head dim multiple of 8 <= 256 "
                   "(others zero-padded)")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    # Rows of 8 elements keep 16-byte aligned loads for 16-bit types; flash-attn pads the same way.
    head_dim_multiple = 8

    @property
    def devices(self):
        return ("cuda", "cpu") if _interpreting() else ("cuda",)

    @property
    def unavailable_reason(self) -> str | None:
        """Why the Triton kernels cannot run here (None when they can)."""
        if not _HAS_TRITON:
            return ("triton is not installed (pip install triton; its kernels run on CUDA GPUs, or on the CPU "
                    "under TRITON_INTERPRET=1, for debugging)")
        if not torch.cuda.is_available() and not _interpreting():
            return ("no CUDA device (torch.cuda.is_available() is False); TRITON_INTERPRET=1, set before triton is "
                    "imported, runs the kernels on the CPU (slow: for debugging)")
        return None

    def is_available(self) -> bool:
        return self.unavailable_reason is None

    def not_supported_reasons(self, inp: AttnInputs) -> list[str]:
        r = super().not_supported_reasons(inp)
        # Without triton the interpreter cannot help: unavailable_reason says to install it first.
        if _HAS_TRITON and inp.q.device.type == "cpu" and not _interpreting():
            r.append("CPU tensors run only under TRITON_INTERPRET=1")
        return r

    def forward(self, inp: AttnInputs):
        from . import ops  # noqa: F401  (registers the custom ops)

        out, lse = torch.ops.elit.varlen_attn_fwd_triton(
            inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.max_seqlen_q, inp.max_seqlen_k,
            inp.softmax_scale, inp.causal, inp.window_left, inp.window_right, inp.softcap)
        return (out, lse) if inp.return_lse else out


register_backend(TritonBackend())
