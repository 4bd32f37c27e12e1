"""pytest-benchmark suites: run with ``pytest benchmarks/ --benchmark-only``.

They are not part of the test run (``python -m pytest -q tests``). Collected without pytest-benchmark
installed, or run without ``--benchmark-only``, every benchmark here is skipped with a reason instead of
failing or burning minutes inside a test run.
"""
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    try:
        only = config.getoption("--benchmark-only")
    except ValueError:  # pytest-benchmark not installed
        only = None
    if only is None:
        marker = pytest.mark.skip(reason="pytest-benchmark is not installed")
    elif not only:
        marker = pytest.mark.skip(reason="benchmarks run with: pytest benchmarks/ --benchmark-only")
    else:
        return
    for item in items:
        if str(item.fspath).startswith(HERE + os.sep):
            item.add_marker(marker)


@pytest.fixture(scope="session")
def bench_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """1 intra-op thread on CPU: on a shared 2-core machine 2 OpenMP threads wait on each other."""
    was = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)
