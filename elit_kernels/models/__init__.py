"""Reference ELIT model: ELIT-DiT with a ragged latent interface, and the plain DiT beside it.

Two presets of one model: ``elit_config`` (the paper) and ``elit_sit_config`` (the released ELIT-SiT code
and checkpoints; load those with ``elit_kernels.official.load_checkpoint``).
"""
from .capture import GraphedForward, capture
from .checkpoint import load_model, save_model
from .config import ElitConfig, config_dict, config_from_dict, elit_config, elit_sit_config
from .elit_dit import ElitDiT, PlainDiT
from ..elementwise import ELEMENTWISE_IMPLS, ElementwiseImpl, get_elementwise, register_elementwise

__all__ = ["ELEMENTWISE_IMPLS", "ElementwiseImpl", "ElitConfig", "ElitDiT", "GraphedForward", "PlainDiT", "capture",
           "config_dict",
           "config_from_dict", "elit_config", "elit_sit_config", "get_elementwise", "load_model",
           "register_elementwise", "save_model"]
