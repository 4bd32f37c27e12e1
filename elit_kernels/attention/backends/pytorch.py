"""Pure-PyTorch backends: ``reference`` (the truth) and ``torch`` (dense SDPA on views, the fair baseline)."""
from __future__ import annotations

import torch

from ..registry import Backend, register_backend
from . import torch_ops  # noqa: F401  (registers elit::varlen_attn_{fwd,bwd}_torch)


class ReferenceBackend(Backend):
    name = "reference"
    priority = 0
    known_answer = False  # it is the known answer
    description = "pure PyTorch, one segment at a time, fp32 (fp64 for fp64 input) accumulation: the truth"

    def forward(self, inp):
        from ...reference.attention import varlen_attention_reference

        return varlen_attention_reference(
            inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, softmax_scale=inp.softmax_scale,
            causal=inp.causal, return_lse=inp.return_lse, window_size=(inp.window_left, inp.window_right),
            softcap=inp.softcap)


class TorchBackend(Backend):
    name = "torch"
    priority = 10
    known_answer = False  # plain PyTorch ops
    description = ("PyTorch: one dense SDPA (cuDNN / FlashAttention / efficient, as PyTorch picks) per run of equal "
                   "segments on strided views of the packed tensors, else matmul/softmax over segments grouped by "
                   "their real lengths. With host-side segments (varlen_attention(segments=), as the ELIT model "
                   "passes) it reads nothing from the device and traces under torch.compile; without them it "
                   "reads cu_seqlens on the host once per call (a device sync on CUDA). fp32 follows PyTorch's "
                   "float32 matmul precision (TF32 when allowed)")

    def not_supported_reasons(self, inp):
        r = super().not_supported_reasons(inp)
        host_free = inp.segments is not None and not inp.return_lse and inp.softcap == 0.0
        if (inp.q.is_cuda and not host_free and not torch.compiler.is_compiling()
                and torch.cuda.is_current_stream_capturing()):
            r.append("reads segment lengths on the host, which CUDA-graph capture forbids (pass segments= to "
                     "varlen_attention, or use another backend)")
        return r

    def forward(self, inp):
        if (not inp.return_lse and inp.softcap == 0.0
                and (inp.segments is not None or not torch.compiler.is_compiling())):
            out = torch_ops.sdpa_over_runs(inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.softmax_scale,
                                           inp.causal, inp.window_left, inp.window_right, segments=inp.segments)
            if out is not None:
                return out
        out, lse = torch.ops.elit.varlen_attn_fwd_torch(
            inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.max_seqlen_q, inp.max_seqlen_k,
            inp.softmax_scale, inp.causal, inp.window_left, inp.window_right, inp.softcap)
        return (out, lse) if inp.return_lse else out


register_backend(ReferenceBackend())
register_backend(TorchBackend())
