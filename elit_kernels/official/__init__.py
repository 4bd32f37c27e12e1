"""The released ELIT-SiT checkpoints (github.com/snap-research/elit): loader, budget conversion, converter.

``load_checkpoint(path)`` rebuilds the released architecture as ``ElitDiT(elit_sit_config(...))`` and loads
the EMA weights; ``latents_for_budget(b, cfg)`` turns the official float budget into latents per group;
``elit-convert`` (``elit_kernels.official.cli``) writes our own file format. Facts: docs/released_checkpoints.md.
"""
from .budget import latents_for_budget
from .loader import (CheckpointError, UnsafeCheckpointError, check_keys, convert_state_dict, load_checkpoint,
                     official_config, official_shapes, read_official)

__all__ = ["CheckpointError", "UnsafeCheckpointError", "check_keys", "convert_state_dict", "latents_for_budget",
           "load_checkpoint", "official_config", "official_shapes", "read_official"]
