"""PyTorch's float32 matmul setting, read one way by the Triton launchers and the known-answer checks."""
from __future__ import annotations

import torch


def fp32_matmul_precision() -> str:
    """PyTorch's float32 matmul setting for CUDA as ``tl.dot``'s ``input_precision``: ``"tf32"`` when it lets
    float32 matmuls use TF32 tensor cores (``torch.set_float32_matmul_precision("high")`` or ``"medium"``,
    ``torch.backends.cuda.matmul.allow_tf32 = True``, ``torch.backends.cuda.matmul.fp32_precision = "tf32"``,
    or ``torch.backends.fp32_precision = "tf32"``), else ``"ieee"`` (PyTorch's default, ``"highest"``).

    Read at every launch, so the kernels follow the setting as cuBLAS and SDPA do. The torch >= 2.9 attribute
    ``torch.backends.cuda.matmul.fp32_precision`` resolves every way of setting it and never raises; reading
    ``allow_tf32`` / ``get_float32_matmul_precision()`` raises once both the legacy and the new setters have
    been used, so they are only the fallback for older torch."""
    new_api = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if new_api is not None:
        return "tf32" if new_api == "tf32" else "ieee"
    return "tf32" if torch.get_float32_matmul_precision() in ("high", "medium") else "ieee"
