"""The contract, generated from the registry: every registered backend that can run here (library comparators
included) against the reference on one table of cases, values and gradients, with and without host-side
segments. A backend that cannot run a case skips with its own reasons (`describe_backends`), so a new backend
is covered by registering it. Behaviour specific to one backend lives in that backend's test file."""
from __future__ import annotations

import zlib

import pytest
import torch

from elit_kernels.attention import (SegmentRuns, get_backend, known_backends, registry, validate_inputs,
                                    varlen_attention)
from elit_kernels.testing import check_backend_against_reference, random_varlen_inputs

DEV = "cuda" if torch.cuda.is_available() else "cpu"
#: (lens_q, lens_k, causal, kv_heads): empty segments, single keys, Lq > Lk, Lq < Lk, odd lengths, GQA
CASES = {
    "read": ([4, 4, 1, 1], [16, 16, 16, 16], False, None),
    "write-single-key": ([16, 16, 16], [4, 1, 1], False, None),
    "core-uniform": ([24, 24], [24, 24], False, None),
    "empty-and-odd": ([0, 1, 5, 17], [3, 0, 17, 5], False, None),
    "causal": ([5, 9, 3], [9, 9, 3], True, None),
    "gqa": ([7, 3], [5, 11], False, 1),
}
DTYPE = torch.float32 if DEV == "cpu" else torch.bfloat16


def _backends():
    return [b for b in known_backends() if not b.startswith("_")]


def _reasons(name, lens_q, lens_k, causal, kv_heads, with_segments):
    b = get_backend(name)
    q, k, v, cq, ck, mq, mk = random_varlen_inputs(lens_q, lens_k, 2, 16, dtype=DTYPE, device=DEV, seed=0,
                                                   kv_heads=kv_heads)
    seg = SegmentRuns.from_lengths(lens_q, lens_k) if with_segments else None
    return registry.reasons(b, validate_inputs(q, k, v, cq, ck, mq, mk, None, causal, segments=seg))


@pytest.mark.parametrize("with_segments", [False, True], ids=["tensors", "segments"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", _backends())
def test_every_backend_matches_the_reference(backend, case, with_segments):
    lens_q, lens_k, causal, kv_heads = CASES[case]
    why = _reasons(backend, lens_q, lens_k, causal, kv_heads, with_segments)
    if why:
        pytest.skip(f"backend {backend!r} cannot run {case} here: {'; '.join(why)}")
    seg = SegmentRuns.from_lengths(lens_q, lens_k) if with_segments else None

    def fn(q, k, v, cq, ck, mq, mk, scale, c):
        return varlen_attention(q, k, v, cq, ck, mq, mk, softmax_scale=scale, causal=c, backend=backend,
                                segments=seg)

    check_backend_against_reference(fn, lens_q, lens_k, 2, 16, DTYPE, causal=causal, device=DEV,
                                    seed=zlib.crc32(f"{backend}-{case}".encode()) % 1000, kv_heads=kv_heads)


def test_segments_that_disagree_with_the_tensors_are_refused():
    q, k, v, cq, ck, mq, mk = random_varlen_inputs([4, 4], [6, 6], 2, 16, seed=1)
    for seg, match in ((SegmentRuns.from_lengths([4], [6]), "segments: describes 1 segments, cu_seqlens_q has 2"),
                       (SegmentRuns.from_lengths([4, 5], [6, 6]), "segments: 9 query rows, q holds 8"),
                       (SegmentRuns.from_lengths([4, 4], [6, 7]), "segments: 13 key rows, k/v hold 12"),
                       ("4,4", "segments: expected an elit_kernels.attention.SegmentRuns or None, got str")):
        with pytest.raises((ValueError, TypeError), match=match):
            varlen_attention(q, k, v, cq, ck, mq, mk, segments=seg)
    with pytest.raises(ValueError, match=r"max_seqlen_q: 3 is smaller than the longest segment \(4\) in segments"):
        varlen_attention(q, k, v, cq, ck, 3, mk, segments=SegmentRuns.from_lengths([4, 4], [6, 6]))


def test_segments_with_other_lengths_than_cu_seqlens_are_refused_once_checked():
    # same totals and count, different per-segment lengths: each backend would read its own source of lengths
    from elit_kernels.attention import inputs as I

    q, k, v, cq, ck, mq, mk = random_varlen_inputs([4, 2], [6, 6], 2, 16, seed=2)
    wrong = SegmentRuns.from_lengths([3, 3], [6, 6])
    with pytest.raises(ValueError, match=r"segments: segment 0 has \(Lq, Lk\) = \(3, 6\) in segments but \(4, 6\)"):
        varlen_attention(q, k, v, cq, ck, mq, mk, segments=wrong)
    right = SegmentRuns.from_lengths([4, 2], [6, 6])
    out = varlen_attention(q, k, v, cq, ck, mq, mk, segments=right)
    torch.testing.assert_close(out, varlen_attention(q, k, v, cq, ck, mq, mk, backend="reference"))
    key = next(k_ for k_ in I._VERIFIED if k_[-1] == right)
    assert key[0] == cq.data_ptr()  # checked once; later calls with the same tensors look it up
    cq.add_(0)  # an in-place write bumps the version: checked again
    varlen_attention(q, k, v, cq, ck, mq, mk, segments=right)
    assert sum(k_[-1] == right and k_[0] == cq.data_ptr() for k_ in I._VERIFIED) == 2
