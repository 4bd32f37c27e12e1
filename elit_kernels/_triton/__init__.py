"""Triton kernels for elit-kernels (named ``_triton`` so it never shadows the ``triton`` package).

Importing this package does not import Triton; ``elit_kernels.attention.backends.triton`` registers the
backend, and ``elit_kernels._triton.ops`` (imported on first use) the ``elit::`` custom ops.
"""
