"""Routes from the libraries where users swap attention implementations to ``elit_kernels``.

- ``elit_kernels.integrations.transformers.register(name="elit")``: an attention implementation for
  transformers models (``attn_implementation="elit"``).
- ``elit_kernels.integrations.diffusers.register()`` / ``use_elit(model)``: diffusers' attention dispatcher
  backend and attention processors.

The submodules import their library lazily and raise ``ImportError`` naming the library and the supported
version when it is missing or too different.
"""
