"""Writing output files: whole or not at all, with the permissions the user's umask gives.

Every file the package writes for a user (model files, samples, ``.npz`` archives, configs) goes through
``atomic_write``: the content is written under a hidden temporary name in the target folder and renamed onto
the target, so a reader (or a resumed run, or a process killed halfway) never sees a partial file. Some
writers create their file with mode 0600 whatever the umask (safetensors' ``save_file`` does); the finished
file gets ``0o666 & ~umask``, as ``open(path, "w")`` would have given it.

This module imports nothing from the package.
"""
from __future__ import annotations

import contextlib
import os
import uuid


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (``/proc/self/status``); elsewhere
    set and restored at once (``os.umask`` has no read-only form)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, write) -> None:
    """``write(tmp_path)`` then rename onto ``path`` with mode ``0o666 & ~umask``. The temporary name is hidden
    (``.NAME.<pid>.<random>.tmp``, in ``path``'s folder, so the rename never crosses a file system) and removed
    when ``write`` raises (``KeyboardInterrupt`` included); ``path`` is then left as it was."""
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
