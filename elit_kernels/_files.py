"""Writing output files: whole or not at all, with the permissions the user's umask gives.

Every file the package writes for a user (model files, samples, ``.npz`` archives, configs) goes through
``atomic_write``: the content is written under a hidden temporary name in the target folder and renamed onto
the target, so a reader (or a resumed run, or a process killed halfway) never sees a partial file. Some
writers create their file with mode 0600 whatever the umask (safetensors' ``save_file`` does); the finished
file gets the mode ``open(path, "w")`` would have given it (a new file ``0o666 & ~umask``, a replaced one its
own), and a symlink is written through.

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
    """``write(tmp_path)`` then rename onto ``path``, with the mode ``open(path, "w")`` would leave: an existing
    file's own mode, else ``0o666 & ~umask``. A symlink is written through (its target is replaced, the link
    stays), as ``open`` would. The temporary name is hidden (``.NAME.<pid>.<random>.tmp``, in the target's
    folder, so the rename never crosses a file system) and removed when ``write`` raises (``KeyboardInterrupt``
    included); the target is then left as it was."""
    if os.path.islink(path):
        path = os.path.realpath(path)
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        mode = 0o666 & ~current_umask()
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
