"""Every built-in backend, one module per family; importing this package registers them all.

- ``pytorch``: ``reference`` (the truth) and ``torch`` (dense SDPA on views; its ops in ``torch_ops``);
- ``library``: ``torch_varlen`` (FlashAttention-2 in PyTorch) and ``flash_attn`` (comparator);
- ``triton``: the Triton kernels (``elit_kernels._triton``): ``triton`` and ``triton_window`` (key segments <= 128);
- ``compiled``: ``cuda`` and ``cpp`` over the compiled extension (``elit_kernels._C``).

A module that is present but broken raises on import rather than silently vanishing from the registry.
"""
from . import compiled, library, pytorch, triton  # noqa: F401
