"""The attention tests' one table of segment shapes, and the backends they run on (imported by conftest.py).

``CASES`` names every (lens_q, lens_k) shape an attention test runs, with what it is about (Read / Write /
core segments, empty segments, single keys, rows past ``cu_seqlens[-1]``, GQA, causal, sliding window and
soft-capping). A test takes the cases of a tag with ``cases(tag)`` (pytest params with the case names as
ids), or one case by name (``CASES[name]``). The tags say who runs a case, because the cost differs by
orders of magnitude between runners:

- ``contract``: every registered backend through ``varlen_attention``, once per case with the case's own
  mask and options (tests/test_contract.py). Small: the Triton kernels run them in the interpreter on CPU.
- ``pytorch``: the pure-PyTorch backends against fp64 truths at three head dims and three dtypes, both masks
  (tests/test_attention.py). Lengths up to 97.
- ``ops``: the compiled C++ op called directly, four dtypes, both masks (tests/test_cext.py).
- ``interpreter``: Triton's own value and gradient tests at two head dims and three dtypes, both masks
  (tests/test_triton_attention.py): each is seconds in the interpreter, so few and tiny.
- ``cuda``: the CUDA kernels on a GPU (tests/test_cext.py), the ``ops`` cases plus longer ones.
- ``gpu``: ELIT-sized shapes for the Triton kernels on a GPU (tests/test_triton_attention.py).
- ``window``: the lengths every sliding-window / softcap option runs on (tests/test_window_softcap.py).
- ``window-kernel`` / ``window-kernel-gpu``: Read/Write shapes of at most 128 keys for the window kernels, at
  interpreter size / at ELIT size on a GPU (tests/test_triton_window.py).

``backend_params`` builds a test's backend list from the registry (``registered_backends()``), each backend
that cannot run here skipped with its own reason.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch


@dataclasses.dataclass(frozen=True)
class Case:
    """One packed-segment shape: ``lens_q[i]`` query rows attend to ``lens_k[i]`` keys.

    ``causal``, ``kv_heads`` (None: as many as q), ``window``, ``softcap`` and ``scale`` are the options a test that
    runs each case once uses (tests that sweep the mask run both); ``extra_q`` / ``extra_k`` rows past
    ``cu_seqlens[-1]`` (NaN inputs: exact-zero outputs and gradients there)."""

    lens_q: tuple
    lens_k: tuple
    tags: frozenset
    about: str
    causal: bool = False
    kv_heads: int | None = None
    window: tuple = (-1, -1)
    softcap: float = 0.0
    extra_q: int = 0
    extra_k: int = 0
    #: softmax_scale (None: head_dim ** -0.5)
    scale: float | None = None

    @property
    def lens(self) -> tuple[list, list]:
        return list(self.lens_q), list(self.lens_k)


def _case(lens_q, lens_k, tags, about, **options) -> Case:
    assert len(lens_q) == len(lens_k), (lens_q, lens_k)
    return Case(tuple(lens_q), tuple(lens_k), frozenset(tags.split()), about, **options)


CASES: dict[str, Case] = {
    # Read: a group's few latents attend to its spatial tokens
    "read": _case([4, 4, 1, 1], [16] * 4, "contract", "Read at two budgets (4 and 1 latents per group)"),
    "read-j1": _case([1, 1, 1], [16] * 3, "ops cuda", "Read at budget 1: one query per segment"),
    "read-ragged": _case([1, 4, 16], [16] * 3, "interpreter", "Read at budgets 1, 4, 16 over 16 tokens"),
    "read-ragged-3": _case([1, 4, 16] * 3, [16] * 9, "pytorch", "three samples of ragged Read"),
    "read-16x64": _case([16] * 8, [64] * 8, "cuda", "Read of 16 latents over 64 tokens"),
    "read-512px": _case([1, 7, 16, 33, 64] * 200, [64] * 1000, "gpu", "Read at 512px: 1..64 latents, B*G segments"),
    # Write: a group's spatial tokens attend to its (few, maybe no) latents
    "write": _case([16, 16, 5], [3, 1, 2], "ops cuda", "Write with a single-key segment"),
    "write-single-key": _case([16] * 3, [4, 1, 1], "contract", "Write at budgets 4, 1, 1: single keys"),
    "write-ragged": _case([16] * 6, [1, 4, 16, 0, 2, 9], "pytorch", "Write over 0..16 latents, one group empty"),
    "write-64x16": _case([64] * 8, [16] * 8, "cuda", "Write of 64 tokens over 16 latents"),
    "write-256px": _case([16] * 1500, [0, 1, 4, 9, 16] * 300, "gpu", "Write at 256px: 0..16 latents"),
    # core: every latent of a sample attends to every other
    "core-uniform": _case([24, 24], [24, 24], "contract", "core at one budget: equal segments"),
    "core-odd": _case([63, 1, 17], [63, 1, 17], "ops cuda", "core over odd lengths, one single-token sample"),
    "core-long": _case([300, 97, 1], [300, 97, 1], "cuda", "core over long segments"),
    "core-4096": _case([4096, 1024, 97, 1, 0], [4096, 1024, 97, 1, 0], "gpu", "core up to 4096 latents, "
                       "ragged over samples, one sample empty"),
    # empty segments, single keys, Lq != Lk both ways, lengths that straddle the 16-row tiles
    "empty-and-odd": _case([0, 1, 5, 17], [3, 0, 17, 5], "contract interpreter",
                           "empty query and key segments, a single query, Lq > Lk and Lq < Lk around 16"),
    "empty-and-odd-97": _case([0, 1, 63, 97, 5], [3, 0, 97, 63, 1], "pytorch gpu",
                              "empty segments, single rows, 63/97 both ways"),
    "empty-keys": _case([3, 2, 4], [0, 5, 0], "ops cuda", "segments without keys: zeros, zero gradients"),
    "empty-queries": _case([0, 4, 0], [6, 0, 3], "ops cuda", "segments without queries"),
    "single": _case([1], [1], "ops cuda", "one query, one key"),
    "lq>lk": _case([40, 17], [5, 1], "pytorch", "more queries than keys (causal: rows without a key)"),
    "lq>lk-small": _case([17, 5], [5, 1], "interpreter", "more queries than keys, interpreter-sized"),
    "lq<lk": _case([1, 3, 2], [63, 16, 97], "pytorch", "few queries over long key segments"),
    "lq<lk-small": _case([1, 3], [17, 33], "interpreter", "few queries over key segments past two tiles"),
    "lq!=lk": _case([7, 20], [13, 5], "ops cuda", "Lq < Lk and Lq > Lk"),
    "lq!=lk-long": _case([129, 200], [257, 33], "cuda", "long segments, Lq != Lk both ways"),
    # options
    "causal": _case([5, 9, 3], [9, 9, 3], "contract", "bottom-right causal, Lq <= Lk", causal=True),
    # FlashAttention-style kernels scale masked -inf scores and take the max of unscaled ones: a negative or zero
    # softmax_scale (legal: any finite float) gave NaN through SDPA's is_causal on the CPU (found by a fuzz)
    "causal-negative-scale": _case([5, 9, 3], [9, 9, 3], "contract", "causal with softmax_scale -0.7", causal=True,
                                   scale=-0.7),
    "zero-scale": _case([4, 6, 1], [4, 9, 3], "contract", "causal with softmax_scale 0: the mean of the visible "
                        "values", causal=True, scale=0.0),
    # 1e-50 is legal and nonzero, but 0 in float32, where fused kernels apply the scale: NaN through SDPA's
    # is_causal on the CPU, as 0 had (found by a fuzz); a subnormal scale is 0 under flush-to-zero (is_zero_scale)
    "causal-f32-zero-scale": _case([5, 9, 3], [9, 9, 3], "contract", "causal with softmax_scale 1e-50 (0 in float32)",
                                   causal=True, scale=1e-50),
    "read-negative-scale": _case([4, 1, 5], [16, 23, 37], "contract", "Read-like, softmax_scale -0.7", scale=-0.7),
    "read-zero-scale": _case([4, 1, 5], [16, 23, 37], "contract", "Read-like, softmax_scale 0 (keys off the tiles)",
                             scale=0.0),
    "gqa": _case([7, 3], [5, 11], "contract", "MQA: one kv head for two query heads", kv_heads=1),
    "rows-past-end": _case([3, 0, 6], [5, 2, 4], "contract", "buffers longer than the packed data: 3 q rows and "
                           "2 k/v rows past cu_seqlens[-1] (exact zeros, never read)", causal=True, extra_q=3,
                           extra_k=2),
    "window-tiles": _case([37, 1, 0, 9, 20, 3], [41, 3, 2, 0, 20, 1], "window", "sliding windows over several "
                          "16-row tiles, a single key, empty segments on either side, Lq > Lk (rows without keys)"),
    "window-softcap": _case([9, 1, 0, 12], [11, 3, 2, 12], "contract", "sliding window (3, 2) and softcap 4 "
                            "(rows the window leaves without a key)", window=(3, 2), softcap=4.0),
    # a window alone, and causal with a left window: what a backend with windows but no softcap runs (torch_varlen)
    "window": _case([9, 1, 0, 12], [11, 3, 2, 12], "contract", "sliding window (3, 2), no softcap", window=(3, 2)),
    "causal-window": _case([9, 5, 12], [11, 5, 12], "contract", "causal with a left window of 4", causal=True,
                           window=(4, -1)),
    "window-long-queries": _case([8, 2], [2, 2], "contract", "a window open on the right over segments of more "
                                 "queries than max_seqlen_k + 1 (FlashAttention-2 varlen closes it there)",
                                 window=(1, -1)),
    # one query per segment with GQA: FlashAttention-2 varlen folds heads into rows at max_seqlen_q == 1 and
    # mis-assigns rows around an empty query segment or rows past the packed data
    "gqa-decode": _case([1, 0, 1], [5, 3, 9], "contract", "decode-like GQA: single queries, an empty query segment, "
                        "a row past the packed data", kv_heads=1, extra_q=1),
    # the window kernels (triton_window: every key segment in one tile of at most 128 keys): Read J x P and
    # Write P x J with P from 16 to 64 (odd ones off the power-of-two key tile), empty key and query segments,
    # a single key, more than one 64-row query block (tests/test_triton_window.py)
    "win-read": _case([1, 4, 5, 4, 1], [16, 64, 37, 64, 23], "window-kernel", "Read, J in {1, 4, 5}, P 16..64"),
    "win-write": _case([16, 64, 37, 23, 64], [1, 4, 5, 4, 1], "window-kernel", "Write, P 16..64 over J 1..5"),
    "win-empty-and-single": _case([4, 0, 5, 3, 1], [0, 16, 1, 9, 64], "window-kernel",
                                  "empty key and query segments, a single key"),
    "win-long-queries": _case([70, 3], [5, 33], "window-kernel", "70 queries: more than one 64-row block"),
    "win-read-512px": _case([1, 4, 16, 33, 64] * 200, [64] * 1000, "window-kernel-gpu",
                            "Read at 512 px: 1..64 latent queries x 64 keys, 1000 windows"),
    "win-write-512px": _case([64] * 1000, [0, 1, 4, 37, 64] * 200, "window-kernel-gpu",
                             "Write at 512 px: 64 queries x 0..64 latents"),
    "win-read-128-keys": _case([4, 64, 1] * 100, [128, 97, 128] * 100, "window-kernel-gpu",
                               "the largest key tile (128 keys)"),
}


def cases(tag: str) -> list:
    """The cases tagged ``tag`` as pytest params (id: the case name, value: the ``Case``)."""
    out = [pytest.param(c, id=name) for name, c in CASES.items() if tag in c.tags]
    assert out, f"no case tagged {tag!r}"
    return out


def backend_params(*, keep=None, default: bool = False) -> list:
    """Every registered backend (``elit_kernels.attention.registered_backends()``, highest priority first) as
    a pytest param named after it, skipped with its own ``unavailable_reason`` where it cannot run here.

    ``keep(backend) -> bool`` selects a subset (a test that needs one should say why); ``default=True``
    appends ``None`` (default dispatch, id ``default``). Test-registered backends (names starting with ``_``)
    are left out."""
    from elit_kernels.attention import registered_backends, registry

    out = []
    for b in registered_backends():
        if b.name.startswith("_") or (keep is not None and not keep(b)):
            continue
        why = registry.unavailable_reason(b)
        marks = pytest.mark.skip(reason=f"backend {b.name!r} cannot run here: {why}") if why else ()
        out.append(pytest.param(b.name, id=b.name, marks=marks))
    if default:
        out.append(pytest.param(None, id="default"))
    return out


def backend_device(name: str | None) -> str:
    """Where a backend's inputs live here: with a GPU, CUDA for default dispatch and for every backend that
    runs there (Triton runs CPU tensors only under TRITON_INTERPRET=1); else (and for ``cpp``) the CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    if name is None:
        return "cuda"
    from elit_kernels.attention import get_backend

    devices = get_backend(name).devices
    return "cuda" if devices is None or "cuda" in devices else "cpu"


def skip_unless_runs(name: str | None, q, k, v, cu_q, cu_k, max_q, max_k, *, causal=False, return_lse=False,
                     window_size=(-1, -1), softcap=0.0, segments=None) -> None:
    """Skip the test, printing backend ``name``'s own reasons, when it cannot run these inputs (its dtype,
    device, head dim, GQA, LSE, window or softcap declaration, or its environment). None: default dispatch,
    which runs everything."""
    if name is None:
        return
    from elit_kernels.attention import get_backend, registry, validate_inputs

    inp = validate_inputs(q, k, v, cu_q, cu_k, max_q, max_k, None, causal, return_lse=return_lse,
                          window_size=window_size, softcap=softcap, segments=segments)
    why = registry.reasons(get_backend(name), inp)
    if why:
        pytest.skip(f"backend {name!r} cannot run these inputs here: {'; '.join(why)}")


class LaunchSpy:
    """Stands in for a ``@triton.jit`` kernel in a test: records ``(name, DOT_PREC)`` of each launch in ``seen``,
    then launches the real kernel (the fp32-precision tests of both Triton families use it)."""

    def __init__(self, kernel, name, seen):
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append((self.name, kwargs["DOT_PREC"]))
            return self.kernel[grid](*args, **kwargs)
        return launch


def counting_reference(name: str, priority: int = -500):
    """A CPU backend named ``name`` at ``priority`` that answers with the reference and counts its calls in
    ``.calls``: no known-answer check, and no declaration about determinism (as a library kernel that accumulates
    with atomics). Not registered: the test registers it and removes it."""
    from elit_kernels.attention import registry

    class CountingReference(registry.Backend):
        known_answer, devices = False, ("cpu",)

        def __init__(self):
            self.name, self.priority, self.calls = name, priority, 0

        def forward(self, inp):
            self.calls += 1
            return registry.get_backend("reference").forward(inp)

    return CountingReference()


def load_script(rel: str, name: str):
    """The script at ``rel`` (from the repository root: a tool or a benchmark, which are not packages) as a fresh
    module named ``name``, so a test can call its functions."""
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).resolve().parents[1] / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
