"""elit-kernels: fused varlen attention kernels and a reference model for ELIT diffusion transformers."""
from .attention import flash_attn_varlen_func, set_value_checks, value_checks_enabled, varlen_attention
from .backends import Backend, describe_backends, known_backends, register_backend

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "describe_backends",
    "flash_attn_varlen_func",
    "known_backends",
    "register_backend",
    "set_value_checks",
    "value_checks_enabled",
    "varlen_attention",
]
