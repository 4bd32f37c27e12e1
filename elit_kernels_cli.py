"""Console-script entry points of elit-kernels (``elit-bench``, ``elit-demo``, ``elit-convert``, ``elit-sample``).

A top-level module that imports nothing heavy itself, so that a Ctrl-C in a command's first seconds (importing
``elit_kernels`` imports torch: 3-5 s on a CPU) ends it like a Ctrl-C later on does: one line on stderr and
exit status 130, not a traceback from inside torch's import. Each CLI's own ``main`` handles a Ctrl-C while it
runs (``elit_kernels._cli.run_interruptible``) with what its run left on disk; this covers the time before.

While the CLI's modules import, a Ctrl-C does not raise: it ends the process there and then (``guard_start``; for
``python -m elit_kernels.<tool>`` the package starts the guard itself, ``guard_module_run``).
A KeyboardInterrupt raised inside a library's import is not safe to catch: torch's C initialisation imports numpy
and clears any error that import raises (torch 2.x, ``from torch._C import *``), so an interrupt landing in
numpy's import was swallowed, numpy stayed half-initialised, and the command ran on to fail every case with a
RecursionError or hang (seen on a 2-core CPU machine: ~40 % of Ctrl-Cs 0.4-0.5 s after start).
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading

SIGINT_STATUS = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C (elit_kernels._cli's too)

#: console script -> module whose ``main(argv=None) -> int`` it runs
TARGETS = {
    "elit-bench": "elit_kernels.bench.cli",
    "elit-demo": "elit_kernels.demo",
    "elit-convert": "elit_kernels.official.cli",
    "elit-sample": "elit_kernels.sample.cli",
}

#: ``python -m`` module -> the console script it is (each ends the start-up guard with ``run_started``)
MODULE_RUNS = {
    "elit_kernels.bench": "elit-bench",
    "elit_kernels.demo": "elit-demo",
    "elit_kernels.official.cli": "elit-convert",
    "elit_kernels.sample": "elit-sample",
}


def _interrupted(prog: str) -> int:
    """Say ``prog: interrupted while starting; nothing was written`` on stderr (nowhere when stderr is closed or
    gone: never on stdout, where it would join a pipeline's data) and return 130."""
    err = sys.stderr
    if err is not None:
        try:
            print(f"{prog}: interrupted while starting; nothing was written", file=err, flush=True)
        except (OSError, ValueError):  # a closed or broken stream
            pass
    return SIGINT_STATUS


class _EndStart:
    """The SIGINT handler while ``prog``'s modules import: the one line, then exit status 130 at once
    (``os._exit``: nothing was written yet, and no half-imported library is left to run on). ``previous``: the
    handler ``end_start`` puts back."""

    def __init__(self, prog: str, previous):
        self.prog, self.previous = prog, previous

    def __call__(self, signum, frame):
        try:
            if sys.stdout is not None:
                try:
                    sys.stdout.flush()
                except (OSError, ValueError):  # closed or broken: the line on stderr still comes
                    pass
            _interrupted(self.prog)
        finally:
            os._exit(SIGINT_STATUS)


def guard_start(prog: str) -> None:
    """From now until ``end_start``, a Ctrl-C ends ``prog`` with its one line and status 130 instead of raising
    inside whatever is importing. Only Python's default handler is replaced, and only on the main thread (the only
    one that can set a handler); an ignored SIGINT (``nohup``, a background job) stays ignored."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _EndStart(prog, previous))


def end_start() -> None:
    """Undo ``guard_start`` (a no-op when it installed nothing): a Ctrl-C raises KeyboardInterrupt again."""
    handler = signal.getsignal(signal.SIGINT)
    if isinstance(handler, _EndStart):
        signal.signal(signal.SIGINT, handler.previous)


def run_started(prog: str, main) -> int:
    """``main()`` once ``prog``'s modules are imported, with Ctrl-C raising again (``end_start``). A KeyboardInterrupt
    that ``main`` does not handle itself (while it parses its flags, before any work starts) ends with
    ``prog: interrupted while starting; nothing was written`` and status 130; otherwise ``main``'s status."""
    try:
        end_start()
        return main()
    except KeyboardInterrupt:
        return _interrupted(prog)


def launch(prog: str) -> int:
    """The console script ``prog``: import ``TARGETS[prog]`` under ``guard_start`` and return ``run_started`` of its
    ``main``. A Ctrl-C at any point before ``main`` handles one itself ends with the one line and status 130."""
    guard_start(prog)
    try:
        try:
            main = importlib.import_module(TARGETS[prog]).main
        except ValueError as e:
            if not str(e).startswith("$"):
                raise
            # an environment switch read at import (elit_kernels._env: "$ELIT_TUNE: expected ..."): one usage line,
            # as a bad flag gets, not an import traceback (even --help had one)
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        finally:
            end_start()
        return run_started(prog, main)
    except KeyboardInterrupt:  # raised by the module itself, or a Ctrl-C between the guard and main's own handler
        return _interrupted(prog)


def module_run_prog(orig_argv: list[str] | None = None) -> str | None:
    """The console script this process is, when it was started as ``python -m`` of a CLI's module
    (``python -m elit_kernels.bench``, ``... -um elit_kernels.sample``, ``... -m elit_kernels.official.cli``,
    ``... -m elit_kernels.demo.__main__``); None otherwise. Read from ``sys.orig_argv`` (the interpreter's own
    arguments, Python >= 3.10) as the interpreter parses them: short options may be grouped (``-um``, ``-Bm``),
    ``-c``, ``-m``, ``-W`` and ``-X`` take a value (the rest of their group or the next argument), and
    ``--check-hash-based-pycs`` takes the next argument."""
    argv = list(sys.orig_argv if orig_argv is None else orig_argv)
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-" or not arg.startswith("-"):
            return None  # stdin or a script: not a module run
        if arg.startswith("--"):
            i += 2 if arg == "--check-hash-based-pycs" else 1
            continue
        for j in range(1, len(arg)):
            if arg[j] in "cmWX":
                value = arg[j + 1:] or (argv[i + 1] if i + 1 < len(argv) else "")
                if arg[j] == "c":
                    return None  # -c code
                if arg[j] == "m":
                    return MODULE_RUNS.get(value.removesuffix(".__main__"))
                i += 1 if arg[j + 1:] else 2
                break
        else:
            i += 1
    return None


def guard_module_run() -> None:
    """``guard_start`` for ``python -m`` of a CLI's module: called first by ``elit_kernels/__init__.py`` (the
    package, and torch with it, imports before the module's ``__main__`` runs), while ``sys.argv[0]`` is still
    ``"-m"`` (Python sets it so while it locates the module); the ``__main__`` ends it with ``run_started``."""
    if sys.argv[:1] == ["-m"]:
        prog = module_run_prog()
        if prog is not None:
            guard_start(prog)


def bench() -> int:
    return launch("elit-bench")


def demo() -> int:
    return launch("elit-demo")


def convert() -> int:
    return launch("elit-convert")


def sample() -> int:
    return launch("elit-sample")
