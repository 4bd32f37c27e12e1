"""Makes optional packages look uninstalled, in this interpreter and every Python child it starts.

With this folder on ``PYTHONPATH`` and ``ELIT_HIDE_MODULES=triton,transformers,diffusers``, Python imports this
file at start-up and sets ``sys.modules[name] = None`` for each name: ``import triton`` then raises
``ModuleNotFoundError`` and ``importlib.util.find_spec("triton")`` returns None, as on a machine where the package
was never installed (the CPU-only install: torch's CPU build, no triton, no ``[integrations]`` extra). A name
like ``elit_kernels._C`` hides the compiled extension the same way. ``tests/test_optional_packages.py`` runs part
of the suite like this; by hand::

    ELIT_HIDE_MODULES=triton,transformers,diffusers PYTHONPATH=tests/hide_optional python -m pytest -q -rs tests
"""
import importlib.util
import os
import sys

HIDDEN = [n.strip() for n in os.environ.get("ELIT_HIDE_MODULES", "").split(",") if n.strip()]
for _name in HIDDEN:
    sys.modules[_name] = None

# Python imports only the first sitecustomize on sys.path: run the one this file shadows, if any.
_here = os.path.dirname(os.path.abspath(__file__))
for _entry in sys.path:
    if os.path.abspath(_entry or ".") == _here:
        continue
    _path = os.path.join(_entry or ".", "sitecustomize.py")
    if os.path.isfile(_path):
        _spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", _path)
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
        break
