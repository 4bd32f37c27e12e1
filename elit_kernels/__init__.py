"""elit-kernels: fused varlen attention kernels and a reference model for ELIT diffusion transformers."""
import importlib
import importlib.util

from .attention import set_value_checks, value_checks_enabled, varlen_attention
from .backends import Backend, describe_backends, known_backends, register_backend
from .dropin import (flash_attn_func, flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                     flash_attn_varlen_qkvpacked_func)

__version__ = "0.1.0"

# Kernel backends register themselves when their module is importable. A module that is present
# but broken raises here rather than silently vanishing from the registry.
for _mod in ("elit_kernels._triton.backend", "elit_kernels._cext"):
    try:
        _spec = importlib.util.find_spec(_mod)
    except ModuleNotFoundError:  # parent package missing
        _spec = None
    if _spec is not None:
        importlib.import_module(_mod)

__all__ = [
    "Backend",
    "describe_backends",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "known_backends",
    "register_backend",
    "set_value_checks",
    "value_checks_enabled",
    "varlen_attention",
]
