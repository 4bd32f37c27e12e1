"""Pure-PyTorch references of every op: the truth every kernel is tested against."""
from .attention import attention_segment, causal_mask, varlen_attention_reference

__all__ = ["attention_segment", "causal_mask", "varlen_attention_reference"]
