"""Benchmarks of the ELIT model: latency and FLOPs vs latent budget (``elit-bench``).

``cli.main`` is the entry point; ``official.OfficialStyleElit`` is the dense official-style baseline;
``flops.count_flops`` counts a call's FLOPs with attention counted analytically.
"""
from .flops import count_flops, elit_attention_flops, plain_attention_flops
from .dense_baseline import OfficialStyleElit

__all__ = ["OfficialStyleElit", "count_flops", "elit_attention_flops", "plain_attention_flops"]
