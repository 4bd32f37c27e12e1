"""How user-facing arguments read numbers and flags: NumPy's scalars count as the Python int or bool they stand for.

``np.int64(4)`` (what indexing an integer array gives) is an int and ``np.True_`` (what ``array.any()`` gives) is
a bool wherever the package takes one, and both are converted to the Python value before use (a NumPy scalar in
a JSON file or a cache key would differ from the int it equals). A bool is never an int: ``True`` given as a
budget or a count is a mistake, not 1. A real-number argument (a scale, a softcap) takes NumPy's floats and ints
(``is_real``) and converts them with ``float``. Strings and tensors are never taken as numbers.
"""
from __future__ import annotations

import numbers


def is_numpy_bool(v) -> bool:
    """Whether ``v`` is NumPy's bool scalar (``np.True_`` / ``np.False_``), without importing NumPy."""
    t = type(v)
    return t.__module__ == "numpy" and t.__name__ in ("bool", "bool_")


def is_bool(v) -> bool:
    """A Python bool or NumPy's bool scalar."""
    return isinstance(v, bool) or is_numpy_bool(v)


def is_int(v) -> bool:
    """An integer that is not a bool: a Python int or a NumPy (or other ``numbers.Integral``) integer scalar.
    NumPy's bool is not ``numbers.Integral``, so it is refused as an int too."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
    """A real number that is not a bool: a Python int or float, or a NumPy (or other ``numbers.Real``) scalar such
    as ``np.float32(0.125)`` or ``np.int64(2)``. NumPy's bool is not ``numbers.Real``; a tensor is not either."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_int_array(v) -> bool:
    """A NumPy integer array (``dtype.kind`` ``i`` or ``u``), without importing NumPy."""
    return type(v).__module__ == "numpy" and getattr(getattr(v, "dtype", None), "kind", None) in ("i", "u") \
        and hasattr(v, "ndim") and hasattr(v, "tolist")


def check_bool(name: str, v, expected: str = "a bool") -> bool:
    """A user's flag ``name`` as a Python bool: a bool, or NumPy's bool taken as one. Anything else is a TypeError
    naming ``name`` and what was given (``"no"`` or 1 would otherwise be read as true, a multi-element tensor
    has no truth value): ``causal: expected a bool, got str ('no')``, ``... got torch.Tensor``."""
    if isinstance(v, bool):
        return v
    if is_numpy_bool(v):
        return bool(v)
    t = type(v)
    what = f"{t.__name__} ({v!r})" if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    raise TypeError(f"{name}: expected {expected}, got {what}")


def first_few(items, limit: int = 8) -> str:
    """``items`` (strings, or anything ``str`` takes) joined by ", ", the first ``limit`` of them, with ", ..."
    after when there are more: how an error or a warning names a long list of samples or files."""
    items = list(items)
    return ", ".join(map(str, items[:limit])) + (", ..." if len(items) > limit else "")


def first_sentence(err: BaseException, text: str | None = None, limit: int | None = None) -> str:
    """``"TypeName: <first sentence>"`` of an exception (of ``text`` when given: a message with a preamble cut off),
    the sentence at most ``limit`` characters: how an error quotes another library's long reason."""
    line = next((s.strip() for s in (str(err) if text is None else text).splitlines() if s.strip()), "")
    sentence = line.split(". ")[0].rstrip(".")
    return type(err).__name__ + (": " + sentence[:limit] if line else "")
