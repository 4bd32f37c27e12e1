"""Console-script entry points of elit-kernels (``elit-bench``, ``elit-demo``, ``elit-convert``, ``elit-sample``).

A top-level module that imports nothing heavy itself, so that a Ctrl-C in a command's first seconds (importing
``elit_kernels`` imports torch: 3-5 s on a CPU) ends it like a Ctrl-C later on does: one line on stderr and
exit status 130, not a traceback from inside torch's import. Each CLI's own ``main`` handles a Ctrl-C while it
runs (``elit_kernels._cli.run_interruptible``) with what its run left on disk; this covers the time before.
"""
from __future__ import annotations

import importlib
import sys

SIGINT_STATUS = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C (elit_kernels._cli's too)

#: console script -> module whose ``main(argv=None) -> int`` it runs
TARGETS = {
    "elit-bench": "elit_kernels.bench.cli",
    "elit-demo": "elit_kernels.demo",
    "elit-convert": "elit_kernels.official.cli",
    "elit-sample": "elit_kernels.sample.cli",
}


def launch(prog: str) -> int:
    """Import ``TARGETS[prog]`` and return its ``main()``. A KeyboardInterrupt that ``main`` does not handle
    itself (one while importing, or while ``main`` parses its flags, before any work starts) ends with
    ``prog: interrupted while starting; nothing was written`` and status 130."""
    try:
        return importlib.import_module(TARGETS[prog]).main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted while starting; nothing was written", file=sys.stderr)
        return SIGINT_STATUS


def bench() -> int:
    return launch("elit-bench")


def demo() -> int:
    return launch("elit-demo")


def convert() -> int:
    return launch("elit-convert")


def sample() -> int:
    return launch("elit-sample")
