"""The package's environment switches, read one way: ``ELIT_TUNE``, ``ELIT_VALIDATE``, ``ELIT_POISON_OUTPUTS``,
``ELIT_TRITON_AUTOTUNE`` (on/off) and ``ELIT_KNOWN_ANSWER`` (a mode). Imports nothing of the package."""
from __future__ import annotations

import os

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """The on/off switch ``$name``: unset or empty gives ``default``; ``1/true/yes/on`` and ``0/false/no/off`` (any
    case, surrounding spaces ignored) give True / False. ValueError naming the variable otherwise: a switch read
    the wrong way round (``ELIT_TUNE=off`` turning tuning on) is worse than an error."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError(f"${name}: expected {'/'.join(TRUE)} or {'/'.join(FALSE)} (any case), or unset for the default "
                     f"({'on' if default else 'off'}), got {raw!r}")


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """The mode ``$name``, one of ``choices`` (any case); unset or empty gives ``default``; ValueError naming the
    variable and the choices otherwise."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"${name}: expected one of {', '.join(choices)} (any case), or unset for {default!r}, got {raw!r}")
    return value


#: what triton itself reads as a true TRITON_INTERPRET (case-insensitive, nothing stripped; triton 3.x)
_TRITON_TRUE = ("1", "true", "on", "yes", "y")


def triton_interpreted() -> bool:
    """Whether Triton runs its kernels in its CPU interpreter: ``TRITON_INTERPRET`` read as triton reads it (``1``,
    ``true``, ``on``, ``yes`` or ``y`` in any case). Every part of the package asks this one function (``"true"`` made
    triton interpret while the triton backend called itself unavailable)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRITON_TRUE
