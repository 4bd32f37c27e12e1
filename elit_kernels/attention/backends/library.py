"""Other libraries' varlen kernels: ``torch_varlen`` (``torch.nn.attention.varlen``, FlashAttention-2 inside
PyTorch) and ``flash_attn`` (the optional flash-attn package).

``torch_varlen`` is a dispatch candidate: on CUDA in fp16/bf16 it is among the fastest exact kernels for
ragged segments (see ``dispatch``); q rows past ``cu_seqlens_q[-1]`` are zeroed after the call (one masked
fill on the device, no host read), so it keeps the contract. ``flash_attn`` stays a comparator, picked only by
name.
"""
from __future__ import annotations

import ast
import importlib.util

import torch

from ..inputs import is_zero_scale
from ..registry import Backend, register_backend
from .torch_ops import positive_scale


class _CudaLibrary(Backend):
    """A CUDA-only fp16/bf16 kernel from another package."""

    module = ""  # importable module that provides it
    dtypes = (torch.float16, torch.bfloat16)
    devices = ("cuda",)
    head_dim_multiple = 8
    supports_gqa = False
    supports_lse = False
    supports_window = False
    supports_softcap = False

    def __init__(self):
        self._checked = None  # the module name _missing was computed for

    def _missing(self) -> str | None:
        """Why ``module`` cannot be imported (None when it can), looked up once per module name: an import
        inside dispatch would break torch.compile's trace, and a failed import is not retried on every call."""
        if self._checked != self.module:
            try:
                found = importlib.util.find_spec(self.module) is not None
            except ImportError:  # a parent package is missing
                found = False
            self._missing_text = None if found else (f"{self.module} is not importable (No module named "
                                                      f"{self.module!r}; install it to use this backend)")
            self._checked = self.module
        return self._missing_text

    @property
    def unavailable_reason(self) -> str | None:
        missing = self._missing()
        if missing is not None:
            return missing
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        return None

    def is_available(self):
        return self.unavailable_reason is None

    def not_supported_reasons(self, inp):
        r = super().not_supported_reasons(inp)
        if is_zero_scale(inp.softmax_scale):  # a negative scale runs as -q with |scale| (torch_ops.positive_scale)
            r.append(f"softmax_scale {inp.softmax_scale:g}: 0 or below float32's normal range, and FlashAttention-2 "
                     "scales its masked -inf scores (0 * -inf is NaN)")
        return r


def zero_rows_past_end(out: torch.Tensor, cu_seqlens_q: torch.Tensor) -> torch.Tensor:
    """``out [total_q, H, D]`` with rows at or past ``cu_seqlens_q[-1]`` set to zero, on the device (no host read)."""
    rows = torch.arange(out.shape[0], device=out.device)
    return out.masked_fill((rows >= cu_seqlens_q[-1])[:, None, None], 0.0)


def function_parameters(module: str, name: str) -> frozenset:
    """The parameter names of function ``name`` of ``module``, read from its source file (``ast``) without importing
    it: ``torch.nn.attention.varlen`` pulls in ~1 s of imports, and an import inside dispatch would break a
    ``torch.compile`` trace. Empty when the module or the function cannot be found or read."""
    try:
        spec = importlib.util.find_spec(module)
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (ImportError, AttributeError, TypeError, ValueError, OSError, SyntaxError):
        return frozenset()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            a = node.args
            return frozenset(x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs))
    return frozenset()


class TorchVarlenBackend(_CudaLibrary):
    """``varlen_attn`` of this torch: what it takes changed across releases, so it is read from its signature
    (``function_parameters``): ``window_size`` (bottom-right causal as ``(-1, 0)`` and flash-attn's sliding
    window; before it, ``is_causal``) and ``enable_gqa`` (fewer k/v heads). Without them the backend declares no
    window and no GQA, and dispatch sends those calls elsewhere."""

    name, module = "torch_varlen", "torch.nn.attention.varlen"
    priority = 20

    def __init__(self):
        super().__init__()
        self.params = function_parameters(self.module, "varlen_attn") if self._missing() is None else frozenset()
        self.supports_gqa = "enable_gqa" in self.params
        self.supports_window = "window_size" in self.params
        self.description = ("torch.nn.attention.varlen.varlen_attn (FlashAttention-2 in PyTorch); CUDA, fp16/bf16, "
                            "head dim a multiple of 8" + (", GQA" if self.supports_gqa else "")
                            + (", sliding window" if self.supports_window else "") + "; CUDA-graph safe")

    def not_supported_reasons(self, inp):
        r = super().not_supported_reasons(inp)
        if (self.supports_window and inp.has_window and not inp.causal and inp.window_left >= 0
                and (inp.window_right < 0 or inp.window_right >= inp.max_seqlen_k)
                and inp.max_seqlen_q > inp.max_seqlen_k + 1):
            # FlashAttention-2 varlen sets an open right side to max_seqlen_k when the left one is bounded: open
            # only while every segment has at most max_seqlen_k + 1 queries
            r.append(f"a window open on the right with segments of up to {inp.max_seqlen_q} queries over "
                     f"{inp.max_seqlen_k} keys (FlashAttention-2 varlen bounds the open side by max_seqlen_k)")
        return r

    def call_kwargs(self, inp) -> dict:
        """The mask and GQA arguments of ``varlen_attn`` for ``inp`` (its window right side is -1 under
        ``causal``, which bounds it at 0). With GQA, ``max_q`` is at least 2: FlashAttention-2 varlen takes a
        different path for ``max_seqlen_q == 1`` without a window (query heads folded into rows, one row per
        segment), which mis-assigns rows when a query segment is empty or rows follow the packed data
        (github.com/Dao-AILab/flash-attention #1537, #1619); a bound of 2 is still exact (it is an upper bound)."""
        kw = {}
        if inp.causal or inp.has_window:
            if self.supports_window:
                kw["window_size"] = (inp.window_left, 0 if inp.causal else inp.window_right)
            else:  # an older torch: causal only (a window is declared unsupported)
                kw["is_causal"] = True
        if inp.num_kv_heads != inp.num_heads:
            kw["enable_gqa"] = True
            kw["max_q"] = max(inp.max_seqlen_q, 2)
        return kw

    def forward(self, inp):
        from torch.nn.attention.varlen import varlen_attn

        kw = self.call_kwargs(inp)
        max_q = kw.pop("max_q", inp.max_seqlen_q)
        q, scale = positive_scale(inp.q, inp.softmax_scale)
        out = varlen_attn(q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, max_q, inp.max_seqlen_k, scale=scale,
                          **kw)
        seg = inp.segments
        if seg is not None and seg.total_q == inp.q.shape[0]:
            return out  # every row is in a segment
        return zero_rows_past_end(out, inp.cu_seqlens_q)


class FlashAttnBackend(_CudaLibrary):
    name, module = "flash_attn", "flash_attn"
    priority = -10
    default_eligible = False  # a comparator: picked by name only
    known_answer = False
    description = "flash_attn.flash_attn_varlen_func (optional package, comparator); CUDA, fp16/bf16"
    #: flash-attn's own deterministic backward, asked for when the call asks for one
    deterministic_devices = ("cuda",)

    def forward(self, inp):
        import flash_attn

        q, scale = positive_scale(inp.q, inp.softmax_scale)
        return flash_attn.flash_attn_varlen_func(
            q, inp.k, inp.v, inp.cu_seqlens_q, inp.cu_seqlens_k, inp.max_seqlen_q, inp.max_seqlen_k,
            softmax_scale=scale, causal=inp.causal, deterministic=inp.deterministic,
        )


for _b in (TorchVarlenBackend(), FlashAttnBackend()):
    _b._missing()  # looked up now, outside any trace
    register_backend(_b)
