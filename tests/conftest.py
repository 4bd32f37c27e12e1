import os

import torch

# The Triton kernels run on CPU through Triton's interpreter, which must be switched on before
# triton is first imported (pytest imports every test module before running any test).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

# The attention tests' one table of segment shapes and their registry-built backend lists live in
# tests/cases.py (``from cases import cases, backend_params, ...`` in a test file); imported here so that a
# broken table fails at collection, before any test runs.
import cases  # noqa: E402,F401


@pytest.fixture
def poisoned_outputs():
    """Every backend's outputs NaN-filled before its kernels write them (``elit_kernels._outputs``: Triton's
    launchers, the torch backend's grouped op, the compiled ops), so a row no kernel writes fails the
    comparison; and Triton's heuristic tiles (autotuning would compile every candidate tile per new key)."""
    from elit_kernels import _outputs

    before = _outputs.poison_outputs_enabled()
    _outputs.set_poison_outputs(True)
    try:
        from elit_kernels._triton import _common
    except ImportError:  # without triton: nothing to tune
        _common = None
    tuned = _common.autotune_enabled() if _common else None
    if _common:
        _common.set_autotune(False)
    yield
    _outputs.set_poison_outputs(before)
    if _common:
        _common.set_autotune(tuned)


@pytest.fixture(autouse=True)
def _registry_restored():
    """Backends a test registers do not outlive it: a test's spy (one answers zeros) left registered would be a
    default-dispatch and tuning candidate for every later test. The registry is put back as it was, and dispatch's
    cached decisions dropped, when a test changed it."""
    from elit_kernels.attention import dispatch, registry

    before = dict(registry._REGISTRY)
    yield
    if registry._REGISTRY != before:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(before)
        registry.generation += 1
        dispatch.clear_decisions()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``): the tiny
    shapes gain nothing from threads, and the CI box shares its cores, so one thread is faster and steady."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
