import os

import torch

# The Triton kernels run on CPU through Triton's interpreter, which must be switched on before
# triton is first imported (pytest imports every test module before running any test).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture
def poisoned_triton_outputs():
    """Triton's outputs NaN-filled before every launch (a row no program writes then fails the comparison), and
    its heuristic tiles (autotuning would compile every candidate tile per new key). Without triton: nothing."""
    try:
        from elit_kernels._triton import _common
    except ImportError:
        yield
        return
    before = _common.poison_outputs_enabled(), _common.autotune_enabled()
    _common.set_poison_outputs(True)
    _common.set_autotune(False)
    yield
    _common.set_poison_outputs(before[0])
    _common.set_autotune(before[1])
