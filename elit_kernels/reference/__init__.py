"""Pure-PyTorch references of every op: the truth every kernel is tested against."""
from .attention import attention_segment, varlen_attention_reference
from .modulate import gated_residual, layernorm_modulate

__all__ = ["attention_segment", "gated_residual", "layernorm_modulate", "varlen_attention_reference"]
