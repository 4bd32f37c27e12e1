"""The backend registry's names at their 0.1 import path (``elit_kernels.backends``); they live in
``elit_kernels.attention`` (``registry``, ``dispatch``, ``inputs``). New code imports from there."""
from .attention import (AttnInputs, Backend, describe_backends, describe_inputs, get_backend, known_backends,
                        register_backend, select_backend)

__all__ = ["AttnInputs", "Backend", "describe_backends", "describe_inputs", "get_backend", "known_backends",
           "register_backend", "select_backend"]
