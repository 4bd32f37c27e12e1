"""Pure-PyTorch backends: ``reference`` (the truth) and ``torch`` (dense SDPA on views, the fair baseline)."""
from __future__ import annotations

import contextlib

import torch

from ..._transforms import FUNC_GRAD
from ..inputs import FEW_RUNS, is_zero_scale
from ..registry import Backend, register_backend
from . import torch_ops  # noqa: F401  (registers elit::varlen_attn_{fwd,bwd}_torch)


class ReferenceBackend(Backend):
    name = "reference"
    priority = 0
    known_answer = False  # it is the known answer
    description = "pure PyTorch, one segment at a time, fp32 (fp64 for fp64 input) accumulation: the truth"
    #: autograd through per-segment matmul / softmax / cat: no atomics (on CUDA, cuBLAS is deterministic given
    #: CUBLAS_WORKSPACE_CONFIG, as PyTorch's reproducibility notes say)
    deterministic_devices = None
    supports_transforms = True  # plain PyTorch ops: forward-mode AD and torch.func differentiate them

    def forward(self, inp):
        return _reference(inp)


def _reference(inp):
    from ...reference.attention import varlen_attention_reference

    return varlen_attention_reference(
        inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, softmax_scale=inp.softmax_scale,
        causal=inp.causal, return_lse=inp.return_lse, window_size=(inp.window_left, inp.window_right),
        softcap=inp.softcap)


class TorchBackend(Backend):
    name = "torch"
    priority = 10
    known_answer = False  # plain PyTorch ops
    #: on CUDA the SDPA kernels PyTorch picks (FlashAttention, efficient, cuDNN) and the grouped path's
    #: index_add_ accumulate with atomics; on the CPU neither does
    deterministic_devices = ("cpu",)
    #: under forward-mode AD or torch.func.grad (``inp.transform``) it runs SDPA over runs of equal segments (its
    #: math kernel but under one torch.func.grad: the fused kernels have no forward or second derivative), else the
    #: reference
    supports_transforms = True
    description = ("PyTorch: one dense SDPA (cuDNN / FlashAttention / efficient, as PyTorch picks) per run of equal "
                   "segments on strided views of the packed tensors, else matmul/softmax over segments grouped by "
                   "their real lengths. With host-side segments (varlen_attention(segments=), as the ELIT model "
                   "passes) it reads nothing from the device and traces under torch.compile; without them it "
                   "reads cu_seqlens on the host (a device sync on CUDA; none more than the value checks' read "
                   "when they derived the segments, up to 64 runs, except where the grouped path runs). fp32 "
                   "follows PyTorch's float32 matmul precision (TF32 when allowed)")

    def not_supported_reasons(self, inp):
        r = super().not_supported_reasons(inp)
        host_free = (inp.segments is not None and not inp.return_lse and inp.softcap == 0.0
                     and not is_zero_scale(inp.softmax_scale))  # a zero scale goes to the grouped op (positive_scale)
        if (inp.q.is_cuda and not host_free and not torch.compiler.is_compiling()
                and torch.cuda.is_current_stream_capturing()):
            r.append("reads segment lengths on the host, which CUDA-graph capture forbids (pass segments= to "
                     "varlen_attention, or use another backend)")
        return r

    def forward(self, inp):
        if inp.transform is not None:
            return self._differentiable(inp)
        if self._over_runs(inp):
            out = torch_ops.sdpa_over_runs(inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.softmax_scale,
                                           inp.causal, inp.window_left, inp.window_right, segments=inp.segments)
            if out is not None:
                return out
        return self._grouped(inp)

    def plan_runner(self, inp):
        return None if inp.transform is not None else torch_ops.dense_runner(inp)

    @staticmethod
    def _over_runs(inp) -> bool:
        """Whether ``sdpa_over_runs`` may take the call: no LSE or softcap, not known to be many runs, and the
        lengths on the host (``segments``) or readable there (eager, not meta)."""
        return (not inp.return_lse and inp.softcap == 0.0 and not inp.many_runs
                and (inp.segments is not None or not (torch.compiler.is_compiling() or inp.q.device.type == "meta")))

    @staticmethod
    def _differentiable(inp):
        """A call under an autograd transform (``inp.transform``) in PyTorch's own differentiable ops, never the
        grouped custom op: SDPA over runs of equal segments where they apply (pinned to SDPA's math kernel under
        every transform but one level of torch.func.grad: PyTorch's fused kernels have neither a forward nor a second
        derivative), else the reference."""
        if TorchBackend._over_runs(inp):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with contextlib.nullcontext() if inp.transform == FUNC_GRAD else sdpa_kernel(SDPBackend.MATH):
                out = torch_ops.sdpa_over_runs(inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k,
                                               inp.softmax_scale, inp.causal, inp.window_left, inp.window_right,
                                               segments=inp.segments)
            if out is not None:
                return out
        return _reference(inp)

    @staticmethod
    def _grouped(inp):
        """The grouped op (``elit::varlen_attn_fwd_torch``): every case, LSE included."""
        out, lse = torch.ops.elit.varlen_attn_fwd_torch(
            inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.max_seqlen_q, inp.max_seqlen_k,
            inp.softmax_scale, inp.causal, inp.window_left, inp.window_right, inp.softcap)
        return (out, lse) if inp.return_lse else out


class SdpaKernelBackend(TorchBackend):
    """``torch``'s dense path with one SDPA kernel pinned (``torch.nn.attention.sdpa_kernel``), so that dispatch
    can pick the kernel that is fastest for a shape class instead of PyTorch's fixed preference: on an H200
    (ELIT-SiT-XL/2 shapes, bf16, head dim 72) PyTorch's own pick was fastest or within 7 % for every forward,
    but the backward of Read and of the core ran 1.15x and 1.03x faster pinned to cuDNN
    (benchmarks/results/gpu).

    Runs only when the segment lengths are known on the host (``segments=``) and form at most
    ``inputs.FEW_RUNS`` runs; a run that one dense SDPA cannot express exactly (causal with Lq > Lk,
    single-key segments under autograd) goes to the grouped op, as in ``torch``."""

    priority = 8
    known_answer = True  # a pinned kernel may not support the shape: checked once per kind
    deterministic_devices = ()  # CUDA only, where PyTorch's fused SDPA kernels accumulate with atomics
    supports_transforms = False  # the pinned fused kernels have no forward derivative; 'torch' runs those calls
    devices = ("cuda",)

    def __init__(self, name: str, kernel: str, dtypes: tuple, max_head_dim: int, what: str):
        self.name, self.kernel, self.dtypes, self.max_head_dim = name, kernel, dtypes, max_head_dim
        self.head_dim_multiple = 8
        self.description = (f"PyTorch SDPA pinned to its {what} kernel, one call per run of equal segments on views; "
                            f"CUDA, needs host-side segments (segments=), head dim up to {max_head_dim}")

    @property
    def unavailable_reason(self) -> str | None:
        return None if torch.cuda.is_available() else "no CUDA device (torch.cuda.is_available() is False)"

    def is_available(self) -> bool:
        return self.unavailable_reason is None

    def not_supported_reasons(self, inp):
        r = super().not_supported_reasons(inp)
        if inp.segments is None:
            r.append("needs the segment lengths on the host (varlen_attention(segments=))")
        elif len(inp.segments.runs) > FEW_RUNS:
            r.append(f"{len(inp.segments.runs)} runs of equal segments (runs at most {FEW_RUNS})")
        if inp.return_lse:
            r.append("cannot return the softmax log-sum-exp")
        if inp.softcap != 0.0:
            r.append(f"no logit soft-capping (softcap={inp.softcap})")
        return r

    def forward(self, inp):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if not inp.return_lse and inp.softcap == 0.0:
            with sdpa_kernel(getattr(SDPBackend, self.kernel)):
                out = torch_ops.sdpa_over_runs(inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k,
                                               inp.softmax_scale, inp.causal, inp.window_left, inp.window_right,
                                               segments=inp.segments)
            if out is not None:
                return out
        return self._grouped(inp)  # not TorchBackend.forward: it would try the same runs again (a second host read)

    def plan_runner(self, inp):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        run, kernel = torch_ops.dense_runner(inp), getattr(SDPBackend, self.kernel)
        if run is None:
            return None

        def pinned(q, k, v):
            with sdpa_kernel(kernel):
                return run(q, k, v)

        return pinned


_HALF = (torch.float16, torch.bfloat16)
register_backend(ReferenceBackend())
register_backend(TorchBackend())
register_backend(SdpaKernelBackend("sdpa_flash", "FLASH_ATTENTION", _HALF, 256, "FlashAttention-2"))
register_backend(SdpaKernelBackend("sdpa_cudnn", "CUDNN_ATTENTION", _HALF, 128, "cuDNN"))
register_backend(SdpaKernelBackend("sdpa_efficient", "EFFICIENT_ATTENTION", _HALF + (torch.float32,), 256,
                                   "memory-efficient (xformers-style)"))
