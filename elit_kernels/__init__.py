"""elit-kernels: fused varlen attention kernels and a reference model for ELIT diffusion transformers."""
import sys as _sys

if _sys.argv[:1] == ["-m"]:  # `python -m elit_kernels.<tool>`: a Ctrl-C while torch imports ends it cleanly
    import elit_kernels_cli as _launcher

    _launcher.guard_module_run()
from .attention import (Backend, SegmentRuns, describe_backends, known_backends, register_backend, set_value_checks,
                        tuning, value_checks_enabled, varlen_attention)
from .dropin import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_func,
                     flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func)

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "SegmentRuns",
    "describe_backends",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "known_backends",
    "register_backend",
    "set_value_checks",
    "tuning",
    "value_checks_enabled",
    "varlen_attention",
]
