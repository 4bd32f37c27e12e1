"""The ``triton`` and ``triton_window`` backends: the Triton kernels of ``elit_kernels._triton`` behind the backend
contract (``triton``: every segment length; ``triton_window``: key segments of at most 128 keys, ELIT's Read and
Write).

fp32 inputs follow PyTorch's float32 matmul precision setting in the kernels' dot products (see
``elit_kernels._triton``)."""
from __future__ import annotations

import importlib.util
import os

import torch

from ..._triton._scale import score_args_reason
from ..inputs import AttnInputs
from ..registry import Backend, register_backend
from ..._env import env_flag, triton_interpreted

_HAS_TRITON = importlib.util.find_spec("triton") is not None


_interpreting = triton_interpreted
# Checked at import, as every switch is (_env): the Triton kernels' module, which uses it, is imported at their first
# call, where a bad value was an error mid-call (or, in a known-answer check, dropped triton from dispatch silently).
env_flag("ELIT_TRITON_AUTOTUNE", True)


class TritonBackend(Backend):
    """The Triton kernels (``elit::varlen_attn_fwd_triton`` / ``_bwd_triton``).

    Precision: float16 / bfloat16 multiply on the tensor cores in their own precision and accumulate in
    float32. float32 follows PyTorch's float32 matmul setting, read at every call, as cuBLAS and SDPA do:
    TF32 tensor cores (10-bit mantissa) when ``torch.set_float32_matmul_precision("high")`` or ``"medium"``
    (or ``torch.backends.cuda.matmul.allow_tf32`` / ``fp32_precision = "tf32"``) allow it, exact IEEE float32
    otherwise (PyTorch's default, ``"highest"``). Softmax statistics and accumulators are float32 throughout.
    Under ``TRITON_INTERPRET=1`` float32 is always exact. ``_common.dot_precision`` makes the choice.
    """

    name = "triton"
    priority = 30
    description = ("Triton online-softmax kernels over packed segments, GQA by indexing, deterministic backward; "
                   "CUDA, or CPU under TRITON_INTERPRET=1; fp16/bf16/fp32 (fp32 as TF32 or IEEE, following "
                   "torch's float32 matmul precision), head dim multiple of 8 <= 256 (others zero-padded)")
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    # Rows of 8 elements keep 16-byte aligned loads for 16-bit types; flash-attn pads the same way.
    head_dim_multiple = 8
    #: dq and dK/dV are separate kernels, each program owning its rows: no atomics (the window kernels too)
    deterministic_devices = None

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
            raw = os.environ.get("TRITON_INTERPRET")
            return ("no CUDA device (torch.cuda.is_available() is False); TRITON_INTERPRET=1 (set before the first "
                    "Triton call) runs the kernels on the CPU (slow: for debugging)"
                    + (f"; TRITON_INTERPRET is {raw!r}, which triton reads as off" if raw is not None else ""))
        return None

    def is_available(self) -> bool:
        return self.unavailable_reason is None

    def not_supported_reasons(self, inp: AttnInputs) -> list[str]:
        r = super().not_supported_reasons(inp)
        if _HAS_TRITON and inp.q.device.type == "cpu" and not _interpreting():  # no hint that cannot help
            r.append("CPU tensors run only under TRITON_INTERPRET=1")
        why = score_args_reason(inp.softmax_scale, inp.softcap)
        if why is not None:
            r.append(why)
        return r

    def forward(self, inp: AttnInputs):
        from ..._triton import ops  # noqa: F401  (registers the custom ops)

        out, lse = torch.ops.elit.varlen_attn_fwd_triton(
            inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.max_seqlen_q, inp.max_seqlen_k,
            inp.softmax_scale, inp.causal, inp.window_left, inp.window_right, inp.softcap)
        return (out, lse) if inp.return_lse else out


class TritonWindowBackend(TritonBackend):
    """The window kernels (``elit::window_attn_fwd_triton`` / ``_bwd_triton``, ``elit_kernels._triton.attention_window``
    and ``attention_window_bwd``) for ELIT's Read and Write: every key segment in one tile of at most ``MAX_KEYS`` = 128 keys (one softmax pass,
    no online rescaling), one program per segment and block of heads. No causal mask, sliding window or softcap
    (Read and Write use none); GQA by indexing; head dims multiples of 8 up to 128 (the tiles compiled spill-free
    for sm_90). Precision as ``triton``.

    Dispatch: a candidate that on-device tuning (``tuning()`` / ``$ELIT_TUNE=1``) times like every other; until a
    measurement ranks it, the static order puts it after the library and PyTorch paths (and after ``triton``).
    """

    name = "triton_window"
    priority = 28
    description = ("Triton window kernels for key segments of at most 128 keys (ELIT Read/Write): the whole key "
                   "segment in one tile, one program per segment and block of heads, GQA, deterministic backward; "
                   "no causal/window/softcap; CUDA, or CPU under TRITON_INTERPRET=1; fp16/bf16/fp32, head dim a "
                   "multiple of 8 <= 128 (others zero-padded)")
    max_head_dim = 128
    supports_window = False
    supports_softcap = False
    MAX_KEYS = 128

    @staticmethod
    def tile_lengths(inp: AttnInputs) -> tuple:
        """``(max_q, max_k)`` the kernels size their tiles from: the host-side segments' longest when the caller
        passed them (exact), else ``max_seqlen_q`` / ``max_seqlen_k`` (an upper bound)."""
        seg = inp.segments
        return (seg.max_q, seg.max_k) if seg is not None else (inp.max_seqlen_q, inp.max_seqlen_k)

    def not_supported_reasons(self, inp: AttnInputs) -> list[str]:
        r = super().not_supported_reasons(inp)
        if inp.causal:
            r.append("no causal mask (the window kernels serve ELIT's Read/Write, which attend to the whole segment)")
        _, mk = self.tile_lengths(inp)
        if not isinstance(mk, int):
            r.append("max_seqlen_k is symbolic here (torch.compile with dynamic shapes): the key tile is sized from "
                     "it; pass segments= or a static max_seqlen_k")
        elif mk > self.MAX_KEYS:
            src = "the longest key segment" if inp.segments is not None else "max_seqlen_k"
            r.append(f"{src} is {mk}: key segments of at most {self.MAX_KEYS} keys (one tile) only")
        return r

    def forward(self, inp: AttnInputs):
        from ..._triton import ops  # noqa: F401  (registers the custom ops)

        mq, mk = self.tile_lengths(inp)
        out, lse = torch.ops.elit.window_attn_fwd_triton(inp.q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, mq,
                                                         mk, inp.softmax_scale)
        return (out, lse) if inp.return_lse else out


register_backend(TritonBackend())
register_backend(TritonWindowBackend())
