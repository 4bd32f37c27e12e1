"""Which backend runs a ``varlen_attention`` call.

``backend=`` (or ``$ELIT_BACKEND``) names one: it runs, or one ``ValueError`` lists every reason it cannot.
Otherwise (default dispatch) the candidates are the registered backends that may be picked by default
(``Backend.default_eligible``), are available and can run the inputs; they are ranked for the call's
**shape class** (``shape_class``: device, GPU, dtype, head dim, uniform / few runs / ragged, query and key
length buckets, segment-count bucket, forward or forward + backward), from the first source that has it:

1. **tuned here**: rankings measured on this machine by ``tune_inputs`` / ``tuning()`` / ``$ELIT_TUNE=1`` (each new
   shape class is timed once, eagerly, on the first call), kept in memory and on disk
   (``cache_path()``: keyed by GPU name and torch / triton versions);
2. **the committed table** (``dispatch_table.json`` beside this file): rankings measured on the GPUs we
   ran (device, versions and date inside), the nearest measured shape of the same class for this GPU; for a
   class (dtype, kind, pass) the table has no entry of this GPU for, those of the GPUs of its architecture
   (compute capability: an H100 reads an H200's rankings, ``"table-arch"``) before the static order;
3. **the static order**: what the measurements on an H200 showed in general (``static_order``); CPU inputs
   follow the backends' priorities.

The first ranked candidate that passes its first-use known-answer check (``known_answer.py``) runs. The
decision is cached per call kind (exact lengths included; the newest ``_MAX_DECISIONS``), so a repeated call
costs a dictionary lookup. Under ``torch.compile`` tracing and CUDA-graph capture nothing is timed or checked:
the cached, tuned or static choice is used.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings

import torch

from .._env import env_flag
from .._files import atomic_write
from .._triton._scale import score_args_reason
from .._types import is_int
from .inputs import FEW_RUNS, AttnInputs, _capturing, _flag, is_zero_scale
from . import known_answer as _ka
from . import registry as _registry
from .known_answer import check_dispatch
from .registry import Backend, describe_inputs, get_backend, reasons, registered_backends, run_backend

#: the truth, never fast: ranked last without being timed
NEVER_TIMED = ("reference",)
#: built and checked, but not yet timed on a GPU: the static order ranks them after every measured path (tuning
#: on the device times them like the rest)
UNMEASURED = ["triton_window"]
_TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch_table.json")

_DECISIONS: dict = {}  # full decision key -> Backend
#: decisions kept at most: the key holds exact lengths (a flash-attn drop-in caller packing new batches passes a
#: new max_seqlen / segment count nearly every step), so an unbounded cache grew with every distinct call; the
#: oldest is dropped (deciding again costs tens of microseconds; the ELIT model's plans keep their own)
_MAX_DECISIONS = 1024
_TUNED: dict = {}  # shape class -> ranking (names), measured here
_TABLE: dict | None = None
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0")  # triton reads it once, at its import, too
_tuning = env_flag("ELIT_TUNE", False)
#: bumped whenever cached decisions may no longer hold (cleared, a new tuned ranking, tuning switched on or off):
#: an ``AttentionPlan`` drops what it cached when this changes
generation = 0


def _bucket(n) -> int:
    """The power of two at or above ``n`` (0 stays 0); -1 for a symbolic length under ``torch.compile(dynamic=
    True)``, whose value must not be read (that would specialise the graph on it)."""
    if not isinstance(n, int):
        return -1
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


_GPU_NAMES: dict = {}


def gpu_name(device: torch.device) -> str:
    """The device's name (``torch.cuda.get_device_name``; ``"cpu"`` for CPU tensors), read once per device."""
    if device.type != "cuda":
        return "cpu"
    key = str(device)
    if torch.compiler.is_compiling():  # no cache writes (or driver calls) while tracing: a guard on the cache
        return _GPU_NAMES.get(key, "cpu" if device.type == "cpu" else "unknown")
    if key not in _GPU_NAMES:
        _GPU_NAMES[key] = _gpu_name(device)
    return _GPU_NAMES[key]


_GPU_ARCHS: dict = {}
_ARCH_PREFIX = "hip_" if torch.version.hip else "sm_"  # ROCm reports (9, 0) for an MI200: no sibling of an H100


def gpu_arch(device: torch.device) -> str:
    """The device's architecture as ``"sm_<major><minor>"`` (``torch.cuda.get_device_capability``: ``"sm_90"`` on
    an H100 or H200; ``"hip_<major><minor>"`` under ROCm, whose numbers are not NVIDIA's; ``"cpu"`` for CPU
    tensors), read once per device; ``"unknown"`` while tracing a device it has not read."""
    if device.type != "cuda":
        return "cpu"
    key = str(device)
    if torch.compiler.is_compiling():  # no cache writes (or driver calls) while tracing
        return _GPU_ARCHS.get(key, "unknown")
    if key not in _GPU_ARCHS:
        major, minor = _registry._compute_capability(device)  # the registry's cache: one driver call per device
        _GPU_ARCHS[key] = f"{_ARCH_PREFIX}{major}{minor}"
    return _GPU_ARCHS[key]


def shape_class(inp: AttnInputs) -> dict:
    """The call's shape class as a dict: ``gpu``, ``arch`` (``gpu_arch``: which table entries of another GPU
    stand in for this one's), ``dtype``, ``head_dim``, ``kind`` (``"uniform"``: every
    segment the same shape, known on the host; ``"runs"``: at most ``FEW_RUNS`` runs of equal segments; both only
    for a call the dense path runs as plain SDPA, ``_dense_runs``; ``"ragged"``: more runs, lengths known only on
    the device, or LSE / softcap / window / causal non-square segments), ``lq`` / ``lk`` (power-of-two buckets of
    the longest segment: the real one when segments are known, else ``max_seqlen_*``), ``segments`` (bucket
    of the segment count) and ``grad`` (a backward will follow)."""
    seg = inp.segments
    if seg is not None:
        kind = ("uniform" if seg.uniform else "runs") if _dense_runs(inp) else "ragged"
        lq, lk, n = seg.max_q, seg.max_k, seg.num_segments
    elif torch.compiler.is_compiling():  # max_seqlen and the segment count may be symbolic: never read them
        kind, lq, lk, n = "ragged", None, None, None
    else:
        kind, lq, lk, n = "ragged", inp.max_seqlen_q, inp.max_seqlen_k, inp.num_segments
    d = inp.head_dim
    return {"gpu": gpu_name(inp.q.device), "arch": gpu_arch(inp.q.device),
            "dtype": str(inp.q.dtype).replace("torch.", ""),
            "head_dim": d if isinstance(d, int) else -1,
            "kind": kind, "lq": _bucket(lq), "lk": _bucket(lk), "segments": _bucket(n),
            "grad": bool(inp.requires_grad)}


def _dense_runs(inp: AttnInputs) -> bool:
    """Whether the call is one the dense path runs as plain SDPA on views: host-side segments in at most
    ``FEW_RUNS`` runs, no LSE, no soft-capping, no sliding window, and causal only where every segment is square
    (``is_causal``). Other calls with few runs (an LSE asked of a uniform flash-attn style call, a Gemma-2
    softcap) are ranked as ragged: the measured uniform and runs classes never had those flags, and the dense
    path would not run them as measured (the ``torch`` backend's grouped op, or SDPA with a mask)."""
    seg = inp.segments
    return (seg is not None and len(seg.runs) <= FEW_RUNS and not inp.return_lse and inp.softcap == 0.0
            and not inp.has_window and not (inp.causal and any(lq != lk for _, lq, lk in seg.runs)))


def _class_key(c: dict) -> tuple:
    return (c["gpu"], c["dtype"], c["head_dim"], c["kind"], c["lq"], c["lk"], c["segments"], c["grad"])


def static_order(inp: AttnInputs) -> list[str]:
    """Backend names, fastest first, from what the H200 measurements showed in general (bf16, ELIT-SiT-XL/2
    shapes, benchmarks/results/gpu): segments known on the host in few runs of equal shape run fastest as
    dense SDPA on views with PyTorch's own kernel choice (``torch``; a pinned cuDNN kernel wins some
    backward passes, which the table records); ragged fp16/bf16 segments known only on the device on
    FlashAttention-2 varlen (``torch_varlen``), then ``triton``; fp32 on SDPA (TF32 as PyTorch's setting
    allows; the fp32 Triton kernels ran 18x slower). Backends no GPU run has timed yet (``UNMEASURED``) come
    after all of those, so they never make a call slower before a measurement ranks them. On CPU: the
    backends' priorities."""
    names = [b.name for b in registered_backends()]
    if inp.q.device.type != "cuda":
        return names
    few = _dense_runs(inp)
    half = inp.q.dtype in (torch.float16, torch.bfloat16)
    if few and half:
        first = ["torch", "sdpa_cudnn", "sdpa_flash", "torch_varlen", "sdpa_efficient", "triton"]
    elif few:
        first = ["torch", "sdpa_efficient", "triton"]
    elif half:
        first = ["torch_varlen", "triton", "torch"]
    else:
        first = ["torch", "triton"]
    order = first + [n for n in names if n not in first and n not in UNMEASURED and n not in NEVER_TIMED]
    # Not measured on a GPU yet: after every path that was (tuning ranks them by their times where they run).
    return order + [n for n in UNMEASURED if n in names] + [n for n in names if n in NEVER_TIMED]


def _valid_entry(e) -> bool:
    """A table or cache entry dispatch can use: the class fields with their types and a list of names."""
    return (isinstance(e, dict) and all(isinstance(e.get(f), str) for f in ("gpu", "dtype", "kind"))
            and all(isinstance(e.get(f), int) and not isinstance(e.get(f), bool)
                    for f in ("head_dim", "lq", "lk", "segments"))
            and isinstance(e.get("grad", False), bool) and (e.get("arch") is None or isinstance(e["arch"], str))
            and isinstance(e.get("ranking"), list)
            and all(isinstance(n, str) for n in e["ranking"]))


def _load_table(path: str | None = None) -> dict:
    """The committed table, read once; a file that cannot be read, or entries of the wrong shape, are warned
    about (naming the file) and left out: dispatch then uses the static order for those classes."""
    global _TABLE
    if _TABLE is not None and path is None:
        return _TABLE
    path = path or _TABLE_PATH
    table = {"entries": []}
    try:
        with open(path) as f:
            raw = json.load(f)
        if not isinstance(raw, dict) or not isinstance(raw.get("entries"), list):
            raise ValueError("expected an object with a list 'entries'")
        good = [e for e in raw["entries"] if _valid_entry(e)]
        if len(good) != len(raw["entries"]):
            warnings.warn(f"elit_kernels: the dispatch table {path}: {len(raw['entries']) - len(good)} of "
                          f"{len(raw['entries'])} entries are malformed and left out", RuntimeWarning, stacklevel=2)
        table = {**raw, "entries": good}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested past the parser's depth
        warnings.warn(f"elit_kernels: the dispatch table {path} could not be read ({type(e).__name__}: {e}); using "
                      "the static order",
                      RuntimeWarning, stacklevel=2)
    if path == _TABLE_PATH:
        _TABLE = table
    return table


def table_match(c: dict, table: dict | None = None) -> tuple[list[str] | None, str | None]:
    """``(ranking, how)`` from the committed table for shape class ``c``: ``how`` is ``"gpu"`` when entries of
    this GPU (by name) of the same dtype, kind and pass exist, ``"arch"`` when only entries of other GPUs of the
    same architecture do (``c["arch"]``, an entry's ``arch`` field: an H100 reads an H200's measurements, same
    SMs and kernels, less memory bandwidth; a measurement of a sibling beats the static order, and tuning on the
    device beats both), ``(None, None)`` when neither does. Among them, the entry whose (head dim, lq, lk,
    segments) is nearest on a log scale.

    Several entries at that distance (the table measures Read and Write at J = P, or the spatial blocks and a
    uniform core, which are one class: the same lengths and segment count; or the same class on two sibling
    GPUs) are measurements of one class, and rank together (``_merged_ranking``), not the first one found."""
    entries = (table if table is not None else _load_table()).get("entries", [])
    cls = (c["dtype"], c["kind"], c["grad"])
    same = [e for e in entries if (e.get("dtype"), e.get("kind"), bool(e.get("grad"))) == cls]
    how = "gpu"
    pool = [e for e in same if e.get("gpu") == c["gpu"]]
    arch = c.get("arch")
    if not pool and isinstance(arch, str) and arch.startswith("sm_"):
        pool, how = [e for e in same if e.get("arch") == arch], "arch"
    if not pool:
        return None, None

    def dist(e):
        return sum(abs(math.log2(max(e.get(f, 1), 1)) - math.log2(max(c[f], 1)))
                   for f in ("head_dim", "lq", "lk", "segments"))

    best = min(map(dist, pool))
    nearest = [e for e in pool if dist(e) == best]
    return (list(nearest[0]["ranking"]) if len(nearest) == 1 else _merged_ranking(nearest)), how


def table_ranking(c: dict, table: dict | None = None) -> list[str] | None:
    """The committed table's ranking for shape class ``c`` (``table_match``), None when it has none."""
    return table_match(c, table)[0]


def _merged_ranking(entries: list[dict]) -> list[str]:
    """One ranking from several measurements of a class: by the sum over entries of each backend's time over
    that entry's fastest (a backend an entry did not time counts as that entry's slowest), where every entry
    has times; else by mean position. Ties keep the first entry's order."""
    names = list(dict.fromkeys(n for e in entries for n in e["ranking"]))
    first = {n: i for i, n in enumerate(names)}
    timed = [e.get("ms") for e in entries]
    if all(isinstance(ms, dict) and ms and all(type(v) in (int, float) and 0 < v < 1e30 for v in ms.values())
           for ms in timed):  # finite times of a sane size (a hand-edited 10**400 overflowed float division)
        def score(n):
            return sum(ms.get(n, max(ms.values())) / min(ms.values()) for ms in timed)
    else:
        def score(n):
            return sum(e["ranking"].index(n) if n in e["ranking"] else len(e["ranking"]) for e in entries)
    return sorted(names, key=lambda n: (score(n), first[n]))


def ranking(inp: AttnInputs) -> tuple[list[str], str]:
    """``(names fastest first, source)`` for ``inp``; source is ``"tuned"``, ``"table"`` (this GPU's entries),
    ``"table-arch"`` (another GPU's of the same architecture) or ``"static"``."""
    c = shape_class(inp)
    tracing = torch.compiler.is_compiling()  # no file reads while tracing: what an eager call loaded, or nothing
    tuned = _TUNED.get(_class_key(c))
    if tuned is None and inp.q.device.type == "cuda":
        tuned = ((_DISK or {}) if tracing else _disk_cache()).get(repr(_class_key(c)))
    if tuned is not None:
        order, src = list(tuned), "tuned"
    else:
        table = (_TABLE or {"entries": []}) if tracing else None
        order, how = table_match(c, table) if inp.q.device.type == "cuda" else (None, None)
        src = {"gpu": "table", "arch": "table-arch"}.get(how, "static")
        if order is None:
            order = static_order(inp)
    rest = [n for n in static_order(inp) if n not in order]
    return order + rest, src


def candidates(inp: AttnInputs) -> tuple[list[Backend], list[str]]:
    """``(backends default dispatch may use for inp, unranked; lines 'name: reasons' for the others)``."""
    ok, tried = [], []
    for b in registered_backends():
        why = reasons(b, inp)
        if not why and not b.default_eligible:
            why = ["not picked by default dispatch (ask for it by name)"]
        if why:
            tried.append(f"{b.name}: {'; '.join(why)}")
        else:
            ok.append(b)
    return ok, tried


def _decision_key(inp: AttnInputs) -> tuple:
    """Everything a decision depends on, for an eager call (never under capture or tracing): every field a
    backend's ``not_supported_reasons`` reads (the ``softmax_scale`` classes that some refuse: ``_scale_class``),
    the known-answer verdict's dtype (CUDA fp32 under TF32 or IEEE matmuls: one verdict says nothing of the
    other) and whether the segments run as dense runs (which class the ranking is read for); tests/test_dispatch.py
    checks the key against every backend's refusals. ``_tuning`` too: a call made before a ``tuning()`` block
    must not answer the same call inside it from the cache, or its class would never be timed."""
    dt, dev = inp.q.dtype, inp.q.device
    return (dev, _ka._dtype_key(dev, dt) if dt == torch.float32 else dt, inp.head_dim,
            inp.num_kv_heads != inp.num_heads, inp.causal, inp.return_lse, inp.window_left, inp.window_right,
            inp.softcap, _scale_class(inp), inp.requires_grad, inp.deterministic,
            _segments_key(inp.segments), _dense_runs(inp), inp.max_seqlen_q, inp.max_seqlen_k,
            inp.num_segments, inp.transform, _INTERPRET, _registry.generation, _ka.generation, _ka._mode, _tuning)


def _scale_class(inp: AttnInputs) -> int:
    """What backends refuse of ``softmax_scale``: 0 when it may be 0 in float32 (``is_zero_scale``: FlashAttention-2
    turns it into NaN), 2 when it (or its ratio to ``softcap``) overflows the Triton kernels' float32 arguments, else
    1."""
    if is_zero_scale(inp.softmax_scale):
        return 0
    return 1 if score_args_reason(inp.softmax_scale, inp.softcap) is None else 2


def _segments_key(seg) -> tuple | None:
    """What a decision reads of host-side segments: whether there are any, their run count up to ``FEW_RUNS`` + 1
    (the dense backends take at most ``FEW_RUNS``), and the power-of-two buckets of the longest segments and of
    the count (the ranking's buckets; ``triton_window``'s limit, 128 keys, is a bucket edge). Not the exact runs:
    a batch of a few packed sequences with new lengths each step is one decision, not one per step."""
    if seg is None:
        return None
    return (min(len(seg.runs), FEW_RUNS + 1), _bucket(seg.max_q), _bucket(seg.max_k), _bucket(seg.num_segments))


def env_backend() -> str | None:
    """``$ELIT_BACKEND`` as dispatch reads it: surrounding spaces dropped (as the other ELIT_* switches), blank the
    same as unset (None); a name keeps its case."""
    return os.environ.get("ELIT_BACKEND", "").strip() or None


_WARNED_NONDETERMINISTIC: set = set()  # backends asked for by name under the warn-only switch, warned once


def select_backend(inp: AttnInputs, backend: str | None = None) -> Backend:
    """The backend that runs ``inp`` (see the module docstring).

    Raises ValueError naming ``backend`` (or ``ELIT_BACKEND``) when the requested backend cannot run the
    inputs, listing every reason; ValueError listing every backend's reasons when none can."""
    # the environment's value without surrounding spaces (as the other ELIT_* switches); names keep their case
    explicit = backend if backend is not None else env_backend()
    if explicit is not None:
        try:
            b = get_backend(explicit)
        except ValueError as e:
            if backend is None:  # it came from the environment: say so
                raise ValueError(f"ELIT_BACKEND={explicit!r}: " + str(e).removeprefix("backend: ")) from None
            raise
        why = reasons(b, inp)
        if why and torch.is_deterministic_algorithms_warn_only_enabled() and torch.are_deterministic_algorithms_enabled():
            # PyTorch's warn-only mode: an op without a deterministic path warns and runs. Default dispatch still
            # prefers a deterministic backend; one asked for by name runs, with a warning once per backend.
            det = _registry.deterministic_refusal(b, inp)
            if det in why:
                if b.name not in _WARNED_NONDETERMINISTIC:
                    _WARNED_NONDETERMINISTIC.add(b.name)
                    warnings.warn(f"elit_kernels: backend {b.name!r} runs under torch.use_deterministic_algorithms("
                                  f"True, warn_only=True), but {det}", UserWarning, stacklevel=3)
                why = [r for r in why if r != det]
        if why:
            src = "backend" if backend is not None else "ELIT_BACKEND"
            raise ValueError(f"{src}: backend {b.name!r} cannot run these inputs ({describe_inputs(inp)}): "
                             + "; ".join(why))
        return b
    eager = not _capturing()
    key = _decision_key(inp) if eager else None
    if key is not None:
        hit = _DECISIONS.get(key)
        if hit is not None and _registry._REGISTRY.get(hit.name) is hit:
            return hit
    ok, tried = candidates(inp)
    # A deterministic call with a backward, or one under an autograd transform, has a subset of its class's
    # candidates: timing them would rank the class without the others (the class ranking serves every call of the
    # class), so it takes the ranking as it is.
    if ok and eager and _tuning and len(ok) > 1 and not (inp.deterministic and inp.requires_grad) \
            and inp.transform is None:
        c = shape_class(inp)
        if _class_key(c) not in _TUNED:
            tune_inputs(inp)
    by_name = {b.name: b for b in ok}
    order, _ = ranking(inp)
    for name in order:
        b = by_name.get(name)
        if b is None:
            continue
        failed = check_dispatch(b, inp)
        if failed is None:
            if key is not None:
                if len(_DECISIONS) >= _MAX_DECISIONS:
                    del _DECISIONS[next(iter(_DECISIONS))]
                _DECISIONS[key] = b
            return b
        tried.append(f"{b.name}: failed its known-answer check: {failed}")
    raise ValueError(f"no backend supports these inputs ({describe_inputs(inp)}):\n  " + "\n  ".join(tried))


def clear_decisions() -> None:
    """Forget cached decisions and rankings tuned in this process (the disk cache stays)."""
    global generation
    _DECISIONS.clear()
    _TUNED.clear()
    generation += 1


# --- tuning on the device ----------------------------------------------------------------------------------

def cache_path() -> str:
    """Where tuned rankings are kept: ``$ELIT_CACHE_DIR`` (default ``~/.cache/elit_kernels``) /
    ``dispatch-<gpu>-torch<version>-triton<version>.json``."""
    root = os.environ.get("ELIT_CACHE_DIR", "").strip()  # blank: the default; "~" expanded, as the CLIs' paths
    root = os.path.expanduser(root) if root else os.path.join(os.path.expanduser("~"), ".cache", "elit_kernels")
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{gpu}-torch{torch.__version__}-triton{tv}")
    return os.path.join(root, f"dispatch-{safe}.json")


_DISK: dict | None = None
_OWN: set = set()  # class keys of _DISK this process tuned (the rest it read from the file)


def _read_cache(path: str) -> dict:
    """The tuning cache file's usable entries (class key -> backend names); {} for a missing or unreadable file (a
    RuntimeWarning naming it for one that exists: a hand edit with a syntax error was dropped silently), and a
    damaged one is read entry by entry: only lists of backend names are kept."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not JSON, nested past the parser's depth
        warnings.warn(f"elit_kernels: the tuning cache {path} could not be read ({type(e).__name__}: {e}); its "
                      "rankings are not used, and the next tuning() result replaces the file", RuntimeWarning,
                      stacklevel=2)
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, list)
            and all(isinstance(n, str) for n in v)} if isinstance(raw, dict) else {}


def _disk_cache() -> dict:
    global _DISK
    if _DISK is None:
        _DISK = _read_cache(cache_path())
    return _DISK


@contextlib.contextmanager
def _cache_lock(path: str):
    """An exclusive lock on ``path + ".lock"`` (POSIX ``flock``) while the cache is read, merged and replaced, so
    processes tuning at once (``ELIT_TUNE=1`` under torchrun) do not drop each other's entries; no lock where
    ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _save_disk_cache() -> None:
    """Write this process's rankings into the cache file, merged into what the file holds now: another process
    may have tuned classes since this one read it. Its entries are kept; for a class both hold, the file's
    wins unless this process tuned that class itself (``_OWN``)."""
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _cache_lock(path):
            on_disk = _read_cache(path)
            mine = {k: v for k, v in _disk_cache().items() if k in _OWN or k not in on_disk}
            merged = {**on_disk, **mine}
            _disk_cache().update(merged)

            def write(tmp):
                with open(tmp, "w") as f:
                    json.dump(merged, f, indent=1, sort_keys=True)
            atomic_write(path, write)  # another process reading the cache never sees half a file
    except OSError as e:
        warnings.warn(f"elit_kernels: could not write the tuning cache {path} ({e}); tuned rankings last for this "
                      "process only", RuntimeWarning, stacklevel=3)


def _time_ms(fn, repeats: int, device=None) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after two warm-ups: CUDA events for work on a CUDA
    ``device`` (the inputs'), the host clock otherwise (CPU work between two CUDA events measures nothing: the
    events are recorded on the GPU's stream, which the CPU work never touches)."""
    fn()
    fn()
    times = []
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(repeats):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def time_backends(inp: AttnInputs, repeats: int = 10) -> dict:
    """Milliseconds per call of every default-eligible backend that can run ``inp`` and passes its
    known-answer check, forward (and backward when ``inp`` needs gradients): ``{name: ms}``. A backend that
    raises is left out with a warning. ``repeats``: an int >= 1 (ValueError naming it; 0 had every backend
    "fail" with an IndexError)."""
    if not is_int(repeats) or repeats < 1:
        raise ValueError(f"repeats: expected an int >= 1, got {repeats!r}")
    repeats = int(repeats)
    ok, _ = candidates(inp)
    out = {}
    grad = inp.requires_grad
    for b in ok:
        if b.name in NEVER_TIMED:
            continue
        if check_dispatch(b, inp) is not None:
            continue
        if grad:
            dout = torch.randn_like(inp.q)

            def fn(b=b):
                o = run_backend(b, inp)
                o = o[0] if inp.return_lse else o  # (out, lse): the gradient flows from out
                torch.autograd.grad(o, [t for t in (inp.q, inp.k, inp.v) if t.requires_grad], dout)
        else:
            def fn(b=b):
                with torch.no_grad():
                    run_backend(b, inp)
        try:
            out[b.name] = _time_ms(fn, repeats, inp.q.device)
        except Exception as e:  # noqa: BLE001 - a backend that fails here is not ranked
            warnings.warn(f"elit_kernels: tuning skipped backend {b.name!r} ({type(e).__name__}: {e})",
                          RuntimeWarning, stacklevel=2)
    return out


def tune_inputs(inp: AttnInputs, repeats: int = 10, save: bool = True) -> dict:
    """Time the candidates for ``inp``'s shape class now and rank them for every later call of that class
    (in memory, and on disk at ``cache_path()`` when ``save`` and the inputs are on a GPU). Returns
    ``{"class": shape class, "ms": {name: ms}, "ranking": [names]}``. Eager only: raises RuntimeError under
    ``torch.compile`` tracing or CUDA-graph capture."""
    global generation
    if _capturing():
        raise RuntimeError("tune_inputs: cannot time backends under torch.compile tracing or CUDA-graph capture; "
                           "tune eagerly before compiling or capturing")
    if not isinstance(inp, AttnInputs):
        raise TypeError(f"inp: expected an AttnInputs (elit_kernels.attention.validate_inputs(...)), got "
                        f"{type(inp).__name__}")
    if not is_int(repeats) or repeats < 1:
        raise ValueError(f"repeats: expected an int >= 1, got {repeats!r}")
    repeats, save = int(repeats), _flag("save", save)
    c = shape_class(inp)
    ms = time_backends(inp, repeats)
    order = sorted(ms, key=ms.get)
    _TUNED[_class_key(c)] = order
    for k in [k for k in _DECISIONS if k[0] == inp.q.device]:
        del _DECISIONS[k]  # decisions made before this ranking existed
    generation += 1
    if save and inp.q.device.type == "cuda" and order:
        _disk_cache()[repr(_class_key(c))] = order
        _OWN.add(repr(_class_key(c)))
        _save_disk_cache()
    return {"class": c, "ms": ms, "ranking": order}


@contextlib.contextmanager
def tuning(enabled: bool = True):
    """Within the block, the first eager call of each new shape class times the candidate backends and
    keeps the fastest (``ELIT_TUNE=1`` does the same for the whole process). Typical use: one forward of the
    model at the batch and budgets you will serve, before compiling or capturing it::

        with elit_kernels.tuning():
            model(x, t, y, budgets)
    """
    global _tuning, generation
    enabled = _flag("enabled", enabled)  # NumPy's bool is a bool
    was = _tuning
    _tuning = enabled
    generation += 1  # plans made before the block re-dispatch, so the block's first calls are timed
    try:
        yield
    finally:
        _tuning = was
        generation += 1
