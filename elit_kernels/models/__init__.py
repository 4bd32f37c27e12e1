"""Reference ELIT model: ELIT-DiT with a ragged latent interface, and the plain DiT beside it."""
from .elit_dit import ElitConfig, ElitDiT, PlainDiT, config_dict, elit_config
from .ops import ELEMENTWISE_IMPLS, ElementwiseImpl, get_elementwise, register_elementwise

__all__ = ["ELEMENTWISE_IMPLS", "ElementwiseImpl", "ElitConfig", "ElitDiT", "PlainDiT", "config_dict", "elit_config",
           "get_elementwise", "register_elementwise"]
