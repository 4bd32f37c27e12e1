"""Our own model file: the config and the state_dict of an ``ElitDiT``, as safetensors or a torch file.

- ``*.safetensors``: the tensors, plus metadata ``format`` (``"elit-kernels/1"``), ``config`` (the
  ``ElitConfig`` as JSON) and ``meta`` (JSON). Read with safetensors; nothing is unpickled.
- any other name: ``torch.save({"format", "config", "state_dict", "meta"})``, read back with
  ``torch.load(weights_only=True)``.

``elit-convert`` writes these from a released ELIT-SiT checkpoint; ``load_model`` and
``elit_kernels.official.load_checkpoint`` read them (and ``elit-demo`` checkpoints, format ``"elit-demo/1"``).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import pickle
import re

import torch

from .._devices import device_problem
from .._files import atomic_write
from .._types import check_bool, first_sentence
from .config import config_dict, config_from_dict
from .elit_dit import ElitDiT

FORMAT = "elit-kernels/1"
READABLE_FORMATS = (FORMAT, "elit-demo/1")
# Everything a released ELIT-SiT file pickles besides tensors and builtins (docs/released_checkpoints.md §7): its
# ``args``. Nothing else is unpickled by our readers.
SAFE_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


class UnsafeCheckpointError(CheckpointError):
    """The file pickles a global outside the allowlist; it was refused, not executed."""


# The oldest torch whose ``torch.load(weights_only=True)`` has no known way for a crafted file to run code or
# corrupt memory: before 2.6 it could run code (CVE-2025-32434), before 2.10 it trusted the storage sizes a
# file states (CVE-2026-24747). ``safe_torch_load`` refuses to read torch files on anything older.
MIN_SAFE_TORCH = (2, 10)


def _torch_release(version) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _require_safe_torch(path: str) -> None:
    if _torch_release(torch.__version__) < MIN_SAFE_TORCH:
        raise RuntimeError(
            f"{path}: refusing to read a torch checkpoint with torch {torch.__version__}: its "
            "torch.load(weights_only=True) is not safe against crafted files (before 2.6 a file could run code, "
            "CVE-2025-32434; before 2.10 it trusted the storage sizes a file states, CVE-2026-24747). Upgrade to "
            f"torch >= {'.'.join(map(str, MIN_SAFE_TORCH))}, or read a .safetensors file (no unpickling).")


def file_sha256(path: str) -> str:
    """The SHA-256 of the file's bytes, as 64 lowercase hex digits (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: str, expected) -> None:
    """Raise CheckpointError naming the file when its SHA-256 is not ``expected`` (64 hex digits, any case);
    ValueError naming ``sha256`` when ``expected`` is not 64 hex digits. Costs one read of the whole file."""
    if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", expected):
        raise ValueError(f"sha256: expected 64 hex digits (the file's published SHA-256), got {expected!r}")
    got = file_sha256(path)
    if got != expected.lower():
        raise CheckpointError(f"{path}: SHA-256 {got} does not match the expected {expected.lower()}: a damaged or "
                              "incomplete download, or another file saved under this name")


def check_finite(path: str, state_dict: dict) -> None:
    """Raise CheckpointError naming the file and the first tensor (in ``state_dict`` order) that holds NaN or
    inf, with the count and the first index. A damaged download that still parses (torch files are zips
    whose CRCs ``torch.load`` does not check) shows up this way; a diverged training run too.

    One pass over every floating-point tensor: a sum per tensor (NaN and inf propagate through it), and an
    element-wise check only for a tensor whose sum is not finite. Measured at about 0.1 s per GB of weights
    on one CPU core; on a memory-mapped file it also reads every tensor from disk once."""
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        if bool(torch.isfinite(t.sum())):
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):  # else only the sum overflowed: every element is finite
            first = tuple(torch.nonzero(bad)[0].tolist())
            raise CheckpointError(f"{path}: tensor {key!r} holds {int(bad.sum())} non-finite values (NaN or inf) of "
                                  f"{t.numel()}, the first at index {first}: a damaged download or a diverged "
                                  "training run? Pass check_finite=False to load it anyway")


def _unreadable(path: str, kind: str, err: Exception) -> CheckpointError:
    """The error for a file the readers cannot parse: names the file, its size and first bytes, and why."""
    text = str(err)
    if "WeightsUnpickler error:" in text:  # torch's safe unpickler: the reason follows its long preamble
        text = text.split("WeightsUnpickler error:", 1)[1]
    why = first_sentence(err, text)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
        seen = f"the file has {size} bytes, starting {head!r}"
    except OSError:
        seen = "the file could not be opened to show its size"
    return CheckpointError(f"{path}: cannot be read as a {kind} ({why}; {seen}). A damaged, truncated or interrupted "
                           f"download, or another file saved under this name? Nothing in it was executed.")


def _is_damage(err: OSError) -> bool:
    """Whether an OSError raised while parsing an open file says the file is damaged rather than that the file
    system failed: EINVAL naming no file, what a seek outside the file gives (torch's zip reader, on a file cut to
    a few per cent of its size, seeks to where the central directory should be, before the file's start). A
    missing file, a folder, a permission refused (each names the file: ``filename`` is set) and read errors of the
    disk (EIO, ...) are the file system's: they pass through."""
    return err.filename is None and err.errno == errno.EINVAL


@contextlib.contextmanager
def _reading(path: str, kind: str):
    """Turn a parser's failure inside the block into ``_unreadable``, an OSError of a damaged file (``_is_damage``)
    included; other OS errors (a missing file, a permission refused, a read error of the disk), memory errors and
    our own CheckpointErrors pass through unchanged."""
    try:
        yield
    except OSError as e:
        if _is_damage(e):
            raise _unreadable(path, kind, e) from None
        raise
    except (MemoryError, CheckpointError):
        raise
    except Exception as e:  # the zip/legacy torch readers, torch's weights-only unpickler, safetensors
        raise _unreadable(path, kind, e) from None


def safe_torch_load(path: str):
    """``torch.load(path, map_location="cpu", weights_only=True)`` with ``SAFE_GLOBALS`` allowlisted and
    memory-mapped when the file allows it (so a multi-GB checkpoint is read only where it is used).
    Tensors saved from a GPU load onto the CPU.

    Raises UnsafeCheckpointError, naming the file and the refused global, when the file pickles anything
    else; the file's code is never run. Raises CheckpointError naming the file, its size and first bytes
    when it is not a readable torch file (damaged, truncated, an HTML page saved in its place, or a pickle
    feature torch's weights-only unpickler does not take; a file cut short included, on which torch's reader raises
    ``OSError(EINVAL)``). Other OSErrors (a missing file, a permission refused) pass through.
    Raises RuntimeError (and reads nothing) on torch older than ``MIN_SAFE_TORCH``, whose weights-only
    loader is not safe against crafted files."""
    _require_safe_torch(path)

    def load(mmap: bool):
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    with _reading(path, "torch checkpoint"):
        try:
            try:
                return load(mmap=True)
            except RuntimeError as e:  # legacy (non-zip) torch files cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                return load(mmap=False)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL (\S+)", str(e))
            if not found:  # not a refused global: damage, or a pickle feature the safe unpickler lacks
                raise
            allowed = ", ".join(f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS)
            raise UnsafeCheckpointError(
                f"{path}: refused: the file pickles {found.group(1)}, which is not in the allowlist of what ELIT "
                f"checkpoints need ({allowed}); it was not executed. Load it only if you trust it, and convert it "
                "to tensors yourself.") from None


_check_finite = check_finite  # load_model's keyword of the same name shadows it there


def _is_safetensors(path: str) -> bool:
    return str(path).endswith(".safetensors")


def _check_path(path) -> str:
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path (str or os.PathLike), got {type(path).__name__}")
    return os.fspath(path)


def _check_load_path(path) -> str:
    """``_check_path`` for a file to read: a folder is refused naming it (safetensors' reader says only "No such
    device" for one)."""
    path = _check_path(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"path: {path} is a folder; expected a checkpoint file")
    return path


#: the dtypes an ElitDiT runs in (a float8 model loads, lossily cast, but no layer of it runs)
MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_load_args(device, dtype, backend) -> torch.device:
    """``load_model``'s keyword arguments, named when wrong (before any file is read)."""
    if dtype is not None and dtype not in MODEL_DTYPES:
        raise TypeError(f"dtype: expected None or a floating torch.dtype the model runs in "
                        f"({', '.join(map(str, MODEL_DTYPES))}), got {dtype!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected a torch.device or a device string such as 'cpu' or 'cuda:0', got "
                         f"{device!r} ({e})") from None
    if dev.type == "meta":  # a meta tensor holds no values: the weights read would be dropped (with a warning each)
        raise ValueError("device: 'meta' holds no weights, so a loaded model would have none; load on 'cpu' or a "
                         "GPU (for a weightless model of a config, build ElitDiT(cfg) under torch.device('meta'))")
    if why := device_problem(dev):
        raise ValueError(f"device: {why}")
    if backend is not None:
        from ..attention import known_backends

        if not isinstance(backend, str) or backend not in known_backends():
            raise ValueError(f"backend: unknown backend {backend!r}; known backends: {', '.join(known_backends())}")
    return dev


def save_model(path: str, model: ElitDiT, meta: dict | None = None) -> str:
    """Write ``model`` (config + state_dict) to ``path``: safetensors when it ends in ``.safetensors``, else
    a torch file. ``meta``: JSON-serialisable extras (e.g. where the weights came from). Returns ``path``.
    The file is written whole or not at all (a temporary name renamed onto ``path``), with the mode
    ``open(path, "w")`` would leave (``_files.atomic_write``: a new file ``0o666 & ~umask``, a replaced one its own)."""
    path = _check_path(path)
    if not isinstance(model, ElitDiT):
        raise TypeError(f"model: expected an ElitDiT, got {type(model).__name__}")
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta: expected a dict (JSON-serialisable) or None, got {type(meta).__name__}")
    meta = dict(meta or {})
    try:  # both formats: load_model reads a torch file's meta with the weights-only unpickler, which refuses others
        meta_json = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta: must be JSON-serialisable (str keys; str, finite numbers, bools, None, lists and "
                        f"dicts of them) ({e})") from None
    if os.path.isdir(path):
        raise IsADirectoryError(f"path: {path} is a directory; expected a file name")
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    if _is_safetensors(path):
        from safetensors.torch import save_file

        def write(tmp):
            save_file(sd, tmp, metadata={"format": FORMAT, "config": json.dumps(config_dict(model.cfg)),
                                         "meta": meta_json})
    else:
        def write(tmp):
            torch.save({"format": FORMAT, "config": config_dict(model.cfg), "state_dict": sd, "meta": meta}, tmp)
    atomic_write(path, write)  # whole or not at all (an interrupted save keeps the old file); mode from the umask
    return path


def read_model_file(path: str, device="cpu") -> tuple[dict, dict, dict] | None:
    """``(config dict, state_dict, meta)`` of one of our safetensors files (tensors on ``device``), or None
    when ``path`` is not a ``.safetensors`` name (so a caller can try a torch file). Raises CheckpointError
    (a ValueError) naming the file when it is damaged or lacks our metadata; IsADirectoryError for a folder."""
    if _is_safetensors(path):
        from safetensors import safe_open

        if os.path.isdir(path):
            raise IsADirectoryError(f"path: {path} is a folder; expected a checkpoint file")
        with _reading(path, "safetensors file"), safe_open(path, framework="pt", device=str(device)) as f:
            md = f.metadata() or {}
            if md.get("format") not in READABLE_FORMATS or "config" not in md:
                raise CheckpointError(f"{path}: a safetensors file without elit-kernels metadata (format "
                                      f"{md.get('format')!r}, config {'present' if 'config' in md else 'absent'}; "
                                      f"expected format {FORMAT!r} and a config, as written by elit-convert / "
                                      "save_model)")
            sd = {k: f.get_tensor(k) for k in f.keys()}  # one open: the header is parsed once
        return _metadata_dict(path, md, "config"), sd, _metadata_dict(path, md, "meta")
    return None


def is_model_file(ckpt) -> bool:
    """Whether a torch file's contents (``safe_torch_load``) are one of our model files (by their ``format``)."""
    return isinstance(ckpt, dict) and isinstance(ckpt.get("format"), str) and ckpt["format"] in READABLE_FORMATS


def model_file_parts(path: str, ckpt: dict) -> tuple[dict, dict, dict]:
    """``(config, state_dict, meta)`` of one of our torch files' contents (``is_model_file``), checked by
    ``check_model_parts``; CheckpointError naming the file when ``config`` or ``state_dict`` is absent."""
    for entry in ("config", "state_dict"):
        if entry not in ckpt:
            raise CheckpointError(f"{path}: has no {entry!r} entry (format {ckpt['format']!r}; an elit-kernels model "
                                  f"file holds 'config', 'state_dict' and 'meta'; found {sorted(map(str, ckpt))})")
    return check_model_parts(path, ckpt["config"], ckpt["state_dict"], ckpt.get("meta"))


def check_model_parts(path: str, config, state_dict, meta) -> tuple[dict, dict, dict]:
    """The three parts of one of our files, checked before anything is built from them: ``config`` a dict,
    ``state_dict`` a dict of tensors under str keys, ``meta`` a dict (None: ``{}``). Raises CheckpointError naming
    the file, the part, and what was found. Both ``load_model`` and ``official.load_checkpoint`` read through it."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: its config is {type(config).__name__}, expected a dict of ElitConfig fields")
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: its state_dict is not a dict of tensors (got {type(state_dict).__name__})")
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{path}: its state_dict has a key that is not a string: {k!r} "
                                  f"({type(k).__name__}); the file is damaged or not an ELIT model")
        if not isinstance(v, torch.Tensor):
            held = sorted({type(t).__name__ for t in state_dict.values()})
            raise CheckpointError(f"{path}: its state_dict is not a dict of tensors (got dict holding {held}): "
                                  f"{k!r} is {type(v).__name__}")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its meta is {type(meta).__name__}, expected a dict (or None)")
    return config, state_dict, meta


def _metadata_dict(path: str, md: dict, field: str) -> dict:
    """The JSON object stored under ``field`` of a safetensors header's metadata (``{}`` when absent);
    CheckpointError naming the file and the field when it is not a JSON object."""
    text = md.get(field) or "{}"
    try:
        value = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: the {field!r} metadata of this safetensors file is not valid JSON ({e}; "
                              f"starts {text[:40]!r}): the file is damaged or was not written by elit-convert / "
                              "save_model") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: the {field!r} metadata of this safetensors file should be a JSON object, got "
                              f"{type(value).__name__} ({text[:40]!r})")
    return value


def file_dtype(state_dict: dict) -> torch.dtype | None:
    """The floating dtype of a state_dict: the one holding most elements when it mixes several (None: no
    floating-point tensor)."""
    count: dict = {}
    for t in state_dict.values():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    return max(count, key=count.get) if count else None


def model_from_parts(config: dict, state_dict: dict, *, backend=None, device="cpu", dtype=None,
                     source: str = "checkpoint") -> ElitDiT:
    """Build ``ElitDiT(config)`` and load ``state_dict`` strictly; errors list missing/unexpected keys.

    ``dtype``: the parameters' and buffers' dtype; None keeps the state_dict's (``file_dtype``). The model is
    allocated in that dtype directly (no full-size float32 copy of a bf16 file)."""
    try:
        cfg = config_from_dict(config, complete=True)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if dtype is None:
        dtype = file_dtype(state_dict)
    with torch.device("meta"):  # no throw-away random init of a 700M-parameter model
        model = ElitDiT(cfg, backend=backend)
    if dtype is not None:
        model = model.to(dtype)  # on the meta device: free
    model = model.to_empty(device=device)
    model.reset_buffers(device)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source}: state_dict does not match the config: missing keys {missing}, "
                              f"unexpected keys {unexpected}")
    bad = [(k, tuple(own[k].shape), tuple(v.shape)) for k, v in state_dict.items() if own[k].shape != v.shape]
    if bad:
        k, e, g = bad[0]
        raise CheckpointError(f"{source}: shape mismatch for {k}: expected {e}, got {g} ({len(bad)} mismatched in "
                              "all)")
    # a bool, integer or complex tensor where a float weight belongs would be cast in silently (complex losing
    # its imaginary part): a damaged or foreign file, never a released one
    bad = [(k, v.dtype) for k, v in state_dict.items() if own[k].is_floating_point() and not v.is_floating_point()]
    if bad:
        k, got = bad[0]
        raise CheckpointError(f"{source}: tensor {k!r} is {got}, expected a floating-point weight ({own[k].dtype} "
                              f"here) ({len(bad)} such tensors in all): the file is damaged or not an ELIT model")
    model.load_state_dict(state_dict, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def load_model(path: str, *, backend: str | None = None, device="cpu", dtype=None, return_meta: bool = False,
               check_finite: bool = True, sha256: str | None = None):
    """Read one of our files (``save_model`` / ``elit-convert`` / ``elit-demo --save``) -> ``ElitDiT`` in eval mode.

    ``dtype``: cast the weights to one of ``MODEL_DTYPES`` (float16, bfloat16, float32, float64; TypeError naming
    ``dtype`` otherwise); None keeps the file's (a bf16 file gives a bf16 model). ``device``: where the model is
    put; ValueError naming ``device`` when this machine cannot hold tensors there (``device_problem``), checked
    before the file is read. With ``return_meta``, returns ``(model, meta)``.

    Damage: ``sha256`` (64 hex digits, optional) is compared with the file's before anything is parsed (one
    read of the file); ``check_finite`` (default on) refuses a tensor holding NaN or inf (``check_finite``
    below: one pass over the weights, about 0.1 s per GB on one CPU core). Both raise CheckpointError naming
    the file (and the tensor). Raises ValueError naming the file when it is not one of ours, CheckpointError naming
    the file and the entry when one of its parts is missing or malformed (``check_model_parts``), IsADirectoryError
    for a folder; RuntimeError for a torch-format file on torch older than 2.10 (``safe_torch_load``).
    """
    path = _check_load_path(path)
    device = _check_load_args(device, dtype, backend)
    return_meta, check_finite = check_bool("return_meta", return_meta), check_bool("check_finite", check_finite)
    if sha256 is not None:
        verify_sha256(path, sha256)
    # read on the CPU (safetensors memory-maps it) and moved by model_from_parts: a device error is never blamed on
    # the file
    parts = read_model_file(path, device="cpu")
    if parts is None:
        ckpt = safe_torch_load(path)
        if not is_model_file(ckpt):
            raise ValueError(f"{path}: not an elit-kernels model file (expected a dict with format in "
                             f"{READABLE_FORMATS}); for a released ELIT-SiT checkpoint use "
                             "elit_kernels.official.load_checkpoint")
        config, sd, meta = model_file_parts(path, ckpt)
    else:
        config, sd, meta = check_model_parts(path, *parts)
    if check_finite:
        _check_finite(str(path), sd)
    model = model_from_parts(config, sd, backend=backend, device=device, dtype=dtype, source=str(path))
    return (model, meta) if return_meta else model
