"""Helpers shared by the command-line tools (``elit-bench``, ``elit-demo``, ``elit-sample``, ``elit-convert``):
which attention backends can run here and why the others cannot, and whether an output path can be written, in
words a usage error can quote (checked before any work, so a long run never ends in a write error)."""
from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from collections.abc import Callable

import torch

from . import _env
from . import attention as _attention
from ._devices import device_problem
from ._files import atomic_write
from .attention import registry as _registry
from .attention import get_backend, known_backends


def probe_inputs(heads: int, head_dim: int, device, dtype, max_seqlen: int = 2):
    """Validated attention inputs of this head count / head dim / device / dtype (two segments of
    ``max_seqlen`` tokens, in uninitialised memory: never run), to ask each backend whether it could run the
    model's attention. Pass the model's longest segment (``model_probe``): a backend limited in segment length
    (``triton_window``: at most 128 keys) must be refused up front, not fail at the first attention it cannot
    hold. The rows are real (``validate_inputs`` takes a bound past the row count as the row count)."""
    n = max(int(max_seqlen), 2)
    q = torch.empty(2 * n, heads, head_dim, device=device, dtype=dtype)
    cu = torch.tensor([0, n, 2 * n], dtype=torch.int32, device=device)
    return _attention.validate_inputs(q, q, q, cu, cu, n, n, None, False)


def model_probe(cfg, device, dtype):
    """``probe_inputs`` for an ELIT/DiT config: its heads and head dim, and its longest attention segment, the
    N = ``cfg.tokens`` spatial tokens of one sample (the head/tail blocks attend over them; the core's
    G * J latents and a Read/Write window's P tokens are at most N)."""
    return probe_inputs(cfg.heads, cfg.head_dim, device, dtype, max_seqlen=cfg.tokens)


def backend_problems(name: str, probe) -> list[str]:
    """Why backend ``name`` cannot run ``probe`` here ([] when it can). ``name`` must be registered."""
    be = get_backend(name)
    why = _registry.unavailable_reason(be)  # the compiled backends say why (elit_kernels._cext)
    if why is not None:
        generic = why == _registry.NOT_AVAILABLE and be.description  # the backend's own words say more
        return [f"not available here ({be.description if generic else why})"]
    return _registry.reasons(be, probe)


def usable_backends(probe) -> list[str]:
    """Registered backends that can run ``probe`` here, highest priority first."""
    return [n for n in known_backends() if not backend_problems(n, probe)]


def backend_error(flag: str, name: str, probe, what: str) -> str | None:
    """The usage-error message for ``flag NAME`` (None when the backend can run ``probe``)."""
    if name not in known_backends():
        return f"{flag}: unknown backend {name!r}; choose from {', '.join(known_backends())}"
    problems = backend_problems(name, probe)
    if not problems:
        return None
    return (f"{flag}: backend {name!r} cannot run {what}: " + "; ".join(problems)
            + f". Usable here: {', '.join(usable_backends(probe)) or 'none'}")


ENV_BACKEND = "ELIT_BACKEND"  # the environment's backend for every call made with backend=None (attention.dispatch)


def env_backend() -> str | None:
    """``$ELIT_BACKEND`` as default dispatch reads it (``attention.dispatch.env_backend``)."""
    from .attention.dispatch import env_backend as read

    return read()


def local_rank_error() -> str | None:
    """Why ``LOCAL_RANK`` (torchrun's index of the process on its node) is not an int >= 0, as "LOCAL_RANK: ..."
    (None when it is one, or unset or empty: one process, 0). Read by every CLI before it uses the value."""
    raw = os.environ.get("LOCAL_RANK", "").strip()
    if not raw or (raw.isascii() and raw.isdigit()):
        return None
    return (f"LOCAL_RANK: expected an int >= 0 (the process's index on its node, which torchrun sets), got {raw!r}; "
            "unset it to run one process")


def local_rank() -> int:
    """``LOCAL_RANK`` as an int (0 when unset or empty); check ``local_rank_error()`` first."""
    return int(os.environ.get("LOCAL_RANK", "").strip() or 0)


def env_backend_error(probe, what: str) -> str | None:
    """The usage-error message for ``$ELIT_BACKEND`` (None when it is unset, or names a backend that can run
    ``probe``): what ``backend_error`` says of a flag, naming the variable, so that a typo stops a command at start-up
    with exit status 2 instead of failing its first attention call after output was created. ``probe`` None checks
    the name only (before a model is built)."""
    name = env_backend()
    if name is None:
        return None
    if probe is None:
        why = None if name in known_backends() else backend_error(ENV_BACKEND, name, None, what)
    else:
        why = backend_error(ENV_BACKEND, name, probe, what)
    return None if why is None else why + f" (or unset {ENV_BACKEND} for default dispatch)"


def fp16_cpu_warning(flag: str) -> str:
    """The warning for float16 on a CPU (``flag``: the option as the user gave it, e.g. ``--dtype fp16``)."""
    return (f"{flag} on a CPU: most CPUs have no fp16 matmul and PyTorch emulates it, many times slower than fp32 (a "
            "[1024, 384] x [384, 1536] matmul took 30x its fp32 time on the CPU the defaults were measured on)")


def input_file_error(path: str) -> str | None:
    """Why ``path`` cannot be read as an input file, in words a usage error can quote: it does not exist, is a
    folder, or is not a regular file (a FIFO or a device would block or never end); None when it is a file."""
    if os.path.isfile(path):
        return None
    if os.path.isdir(path):
        return f"{path} is a folder (expected a file)"
    if os.path.exists(path):
        return f"{path} is not a regular file (expected a file)"
    return f"no such file: {path}"


class OutputWriteError(OSError):
    """An output file could not be written (a full disk, a folder that went away): ``str()`` is one line naming
    the file; the file itself was left as it was (``write_output`` writes whole or not at all)."""

    def __init__(self, path: str, err: OSError):
        super().__init__(err.errno, f"cannot write {path} ({err.strerror or err}): not written (a file already "
                                    "there is left as it was)")
        self.path = path

    def __str__(self) -> str:
        return self.strerror


def write_output(path: str, write) -> str:
    """``_files.atomic_write(path, write)``: the file whole or not at all (``write(tmp)`` writes a temporary name in
    the same folder; give matplotlib's ``savefig`` an explicit ``format``, as the name ends in ``.tmp``). An OSError
    becomes ``OutputWriteError`` naming ``path`` (not the temporary name). Returns ``path``."""
    try:
        atomic_write(path, write)
    except OSError as e:
        if isinstance(e, OutputWriteError):
            raise
        raise OutputWriteError(path, e) from None
    return path


MAX_SEED = 2**32 - 1  # the seeds elit-demo and elit-bench accept: [0, MAX_SEED] (numpy's range); they derive
# further seeds from it (elit-demo 10_007 * seed + 2 + 7919 * rank, elit-bench seed + 10 * case), which must stay
# inside the signed 64-bit range torch.Generator.manual_seed takes


def seed_error(flag: str, seed: int) -> str | None:
    """The usage-error message for a ``flag`` seed outside ``[0, MAX_SEED]`` (None when it is inside)."""
    if 0 <= seed <= MAX_SEED:
        return None
    return f"{flag}: expected a seed in [0, {MAX_SEED}] (2**32 - 1), got {seed}"


def _probe_dir(folder: str) -> None:
    """Create and remove a probe file in ``folder`` (OSError when that fails)."""
    fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
    os.close(fd)
    os.unlink(probe)


def user_path(text: str) -> str:
    """argparse ``type`` of every path flag: a leading ``~`` or ``~user`` is that home folder, as the shell would
    have made it had the flag and its value been two words (``--out ~/x``); ``--out=~/x`` reaches us unexpanded,
    and a folder literally named ``~`` is never what was meant."""
    return os.path.expanduser(text)


def arch_hint(msg: str) -> str | None:
    """The ``--arch`` flags for the loader's advice ``pass arch={'num_heads': H, ...}`` in ``msg`` (None: none)."""
    advice = re.search(r"pass arch=\{([^}]*)\}", msg)
    if not advice:
        return None
    pairs = re.findall(r"'(\w+)':\s*([^,]+)", advice.group(1))
    return " ".join(f"--arch {k}={v.strip()}" for k, v in pairs) or None


_CREATED: list[str] = []  # folders output_dir_error created in this process, parents first


def output_dir_error(path: str, files: tuple[str, ...] = ()) -> str | None:
    """Create the output folder ``path`` (and its parents) and write a probe file in it; why that failed, or why
    one of the ``files`` to be written there cannot be (a folder in its place) (for a usage error naming the flag),
    or None. The folders it creates are remembered: a run interrupted before it wrote anything removes them
    again (``remove_empty_created``)."""
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} exists and is not a folder"
    missing, p = [], os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        missing.append(p)
        p = os.path.dirname(p)
    try:
        os.makedirs(path, exist_ok=True)
        _CREATED.extend(reversed(missing))
        _probe_dir(path)
    except OSError as e:
        return f"cannot write into {path} ({e.strerror or e})"
    for name in files:
        if why := output_file_error(os.path.join(path, name)):
            return why
    return None


def output_file_error(path: str) -> str | None:
    """Whether a file can be written at ``path``: not a folder, its folder exists and takes a new file, and an
    existing file there is writable; why not (for a usage error naming the flag), or None. Writes nothing but
    a probe file, removed at once."""
    if not str(path).strip():  # realpath("") is the current folder: the empty name passed every check below
        return f"{str(path)!r} is an empty path (expected a file path)"
    if os.path.isdir(path):
        return f"{path} is a folder (expected a file path)"
    if path.endswith(("/", os.sep)):
        return f"{path} names a folder (a trailing {path[-1]!r}; expected a file path)"
    folder = os.path.dirname(os.path.realpath(path))  # where a symlink's target would be written
    if not os.path.isdir(folder):
        return f"the folder {folder} does not exist"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{path} exists and is not writable"
    try:
        _probe_dir(folder)
    except OSError as e:
        return f"cannot write into {folder} ({e.strerror or e})"
    return None


def finite_error(value: float, lo: float = 0.0, *, above: bool = True, what: str = "number") -> str | None:
    """Why a float flag's ``value`` is not a finite ``what`` above ``lo`` (``> lo``; ``>= lo`` when ``above`` is
    False), for a usage error naming the flag; None when it is. argparse's ``type=float`` takes "nan" and
    "inf", which would run a whole job to a NaN."""
    if math.isfinite(value) and (value > lo if above else value >= lo):
        return None
    return f"expected a finite {what} {'>' if above else '>='} {lo:g}, got {value}"


triton_interpreted = _env.triton_interpreted  # True when Triton kernels run under its CPU interpreter: correct, slow


def bench_device(name: str | None) -> torch.device:
    """A benchmark's ``--device``: None picks cuda when available, else cpu; otherwise cpu or cuda[:N] with that GPU
    here. ValueError saying why for anything else: not a device string, another type (meta would time nothing
    real), cuda without a GPU, an index past ``torch.cuda.device_count()``."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{name!r} is not a device (expected cpu or cuda[:N])") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"expected cpu or cuda[:N], got {name!r}")
    if why := device_problem(dev):  # cuda without a GPU, or an index past the GPUs here
        raise ValueError(why)
    return dev


SIGINT_STATUS = 130  # 128 + SIGINT: what a shell reports for a command Ctrl-C stopped


def created_here(folder: str) -> bool:
    """Whether ``output_dir_error`` created ``folder`` in this process."""
    return os.path.abspath(folder) in {os.path.abspath(f) for f in _CREATED}


def remove_empty_created() -> None:
    """Remove the folders ``output_dir_error`` created that are still empty (deepest first; one holding anything,
    or already gone, is left as it is): an interrupted run leaves no empty output folder behind."""
    while _CREATED:
        folder = _CREATED.pop()
        try:
            os.rmdir(folder)  # only an empty folder: never anything a run or the user put there
        except OSError:
            pass


def run_interruptible(prog: str, body: Callable[[], int], kept: str | Callable[[], str]) -> int:
    """``body()``; a Ctrl-C (KeyboardInterrupt) ends it with one line on stderr, ``prog: interrupted; <kept>``
    (what the run leaves on disk and how to go on; a callable is asked then, when that depends on how far the run
    got), and exit status 130, not a traceback from wherever the interpreter happened to be. Output folders the
    run created and left empty are removed first (``remove_empty_created``)."""
    try:
        return body()
    except KeyboardInterrupt:
        remove_empty_created()
        print(f"{prog}: interrupted; {kept() if callable(kept) else kept}", file=sys.stderr)
        return SIGINT_STATUS
