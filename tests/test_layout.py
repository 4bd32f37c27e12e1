"""Group-major order and the ragged latent layout."""
import numpy as np
import pytest
import torch

from elit_kernels.layout import (build_layout, from_group_major, group_major_permutation, inverse_permutation,
                                 normalize_budgets, pack_latents, to_group_major, unpack_latents)


@pytest.mark.parametrize("h,w,win", [(4, 4, 2), (8, 12, 4), (6, 6, 3), (5, 5, 1), (16, 16, 4)])
def test_group_major_roundtrip(h, w, win):
    x = torch.randn(2, 3, h, w)
    tokens = to_group_major(x, win)
    perm = group_major_permutation(h, w, win)
    row_major = x.flatten(2).transpose(1, 2)
    assert torch.equal(tokens, row_major[:, perm])
    assert torch.equal(row_major, tokens[:, inverse_permutation(perm)])
    assert torch.equal(from_group_major(tokens, h, w, win), x)
    # every window's tokens are contiguous: group g holds exactly the tokens of window g
    ys, xs = perm // w, perm % w
    g = (ys // win) * (w // win) + xs // win
    assert torch.equal(g, torch.arange(h * w // win ** 2).repeat_interleave(win * win))


def test_group_major_bad_window():
    with pytest.raises(ValueError, match="window"):
        group_major_permutation(6, 6, 4)
    with pytest.raises(ValueError, match="x:"):
        to_group_major(torch.randn(3, 4, 4), 2)


def test_layout_cu_seqlens_and_indices():
    lay = build_layout([3, 1, 0], batch=3, groups=2, tokens_per_group=5, j_max=4)
    assert lay.cu_latents.tolist() == [0, 3, 6, 7, 8, 8, 8]
    assert lay.cu_spatial.tolist() == [0, 5, 10, 15, 20, 25, 30]
    assert lay.cu_core.tolist() == [0, 6, 8, 8]
    assert lay.cu_image.tolist() == [0, 10, 20, 30]
    assert lay.max_latents == 3 and lay.max_core == 6 and lay.total_latents == 8
    assert lay.latent_sample.tolist() == [0] * 6 + [1] * 2
    assert lay.latent_group.tolist() == [0, 0, 0, 1, 1, 1, 0, 1]
    assert lay.latent_index.tolist() == [0, 1, 2, 0, 1, 2, 0, 0]
    assert lay.read_args[2:4] == (3, 5) and lay.write_args[2:4] == (5, 3)
    assert all(t.dtype == torch.int32 for t in (lay.cu_latents, lay.cu_spatial, lay.cu_core, lay.cu_image))
    assert lay.spatial_sample().tolist() == [0] * 10 + [1] * 10 + [2] * 10


@pytest.mark.parametrize("budgets", [[4, 4], [1, 3], [0, 2], [2, 0]])
def test_pack_unpack_roundtrip(budgets):
    lay = build_layout(budgets, batch=2, groups=3, tokens_per_group=4, j_max=4)
    lat = torch.randn(2, 3, 4, 5)
    packed = pack_latents(lat, lay)
    assert packed.shape == (lay.total_latents, 5)
    un = unpack_latents(packed, lay)
    for b, j in enumerate(budgets):
        assert torch.equal(un[b, :, :j], lat[b, :, :j])
        assert torch.equal(un[b, :, j:], torch.zeros_like(un[b, :, j:]))
    assert torch.equal(pack_latents(un, lay), packed)


def test_pack_unpack_gradients():
    lay = build_layout([2, 1], batch=2, groups=2, tokens_per_group=4, j_max=3)
    lat = torch.randn(2, 2, 3, 4, requires_grad=True)
    pack_latents(lat, lay).sum().backward()
    expect = torch.zeros(2, 2, 3, 4)
    expect[0, :, :2] = 1
    expect[1, :, :1] = 1
    assert torch.equal(lat.grad, expect)


def test_budgets_normalisation_and_errors():
    assert normalize_budgets(None, 3, 8) == [8, 8, 8]
    assert normalize_budgets(2, 2, 8) == [2, 2]
    assert normalize_budgets(torch.tensor([1, 8]), 2, 8) == [1, 8]
    with pytest.raises(ValueError, match=r"budgets: each budget must be in \[0, 8\]"):
        normalize_budgets([1, 9], 2, 8)
    with pytest.raises(ValueError, match="budgets: expected 3 budgets"):
        normalize_budgets([1, 2], 3, 8)
    with pytest.raises(TypeError, match="budgets"):
        normalize_budgets([1.5, 2], 2, 8)
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor([1, 2], dtype=torch.complex64), torch.tensor([True, False]),
                torch.tensor([[1, 2]])):
        with pytest.raises(TypeError, match=rf"^budgets: expected a 1-D integer tensor, got {bad.dtype}"):
            normalize_budgets(bad, 2, 8)
    # NumPy integers are ints (what indexing an array gives), converted to Python's; NumPy's bool is not
    for numpy_form in (np.int64(3), np.array([3, 3]), np.array([3, 3], dtype=np.uint8), [np.int32(3), 3]):
        got = normalize_budgets(numpy_form, 2, 8)
        assert got == [3, 3] and all(type(j) is int for j in got)
    for bad in (np.True_, [np.True_, 1], np.array([1.0, 2.0]), np.array([[1, 2]]), b"\x01\x02", bytearray(b"\x01\x02"),
                "12", memoryview(b"\x01\x02")):  # bytes iterate as ints: they were taken as budgets [1, 2]
        with pytest.raises(TypeError, match="^budgets: expected"):
            normalize_budgets(bad, 2, 8)
    lay = build_layout(np.array([2, 1]), np.int64(2), np.int64(2), np.int64(4), np.int64(3))
    ref = build_layout([2, 1], 2, 2, 4, 3)
    assert lay.budgets == ref.budgets and torch.equal(lay.cu_latents, ref.cu_latents)
    assert type(lay.j_max) is int and type(lay.groups) is int
    with pytest.raises(ValueError, match="packed"):
        unpack_latents(torch.randn(3, 2), build_layout([1], 1, 2, 4, 2))
    with pytest.raises(ValueError, match="latents"):
        pack_latents(torch.randn(1, 2, 3, 4), build_layout([1], 1, 2, 4, 2))


# --- written against the mutation run (benchmarks/results/mutation.md): each test kills a kind of survivor ---

@pytest.mark.parametrize("h,w,window,bad", [(0, 4, 2, "h"), (4, 0, 2, "w"), (4, 4, 0, "window"), (True, 4, 1, "h"),
                                            (4, 4.0, 2, "w"), (4, 4, True, "window"), (-2, 4, 2, "h")])
def test_grid_errors_name_the_argument(h, w, window, bad):
    with pytest.raises(ValueError, match=rf"^{bad}: expected a positive int"):
        group_major_permutation(h, w, window)


@pytest.mark.parametrize("h,w", [(8, 6), (6, 8), (4, 6), (6, 4)])
def test_window_must_divide_both_sides(h, w):
    with pytest.raises(ValueError, match=r"^window: 4 must divide the token grid"):
        group_major_permutation(h, w, 4)
    assert group_major_permutation(4, 4, 1).tolist() == list(range(16))  # 1 divides anything: smallest legal window


@pytest.mark.parametrize("shape", [(2, 16), (2, 15, 3), (2, 16, 3, 1)])
def test_from_group_major_checks_rank_and_length_separately(shape):
    with pytest.raises(ValueError, match=r"^tokens: expected \[B, 16, C\]"):
        from_group_major(torch.randn(*shape), 4, 4, 2)


@pytest.mark.parametrize("kw,bad", [({"groups": 0}, "groups"), ({"tokens_per_group": 0}, "tokens_per_group"),
                                    ({"j_max": 0}, "j_max"), ({"groups": True}, "groups"),
                                    ({"tokens_per_group": 2.0}, "tokens_per_group"), ({"j_max": -1}, "j_max")])
def test_build_layout_errors_name_the_argument(kw, bad):
    args = {"groups": 2, "tokens_per_group": 4, "j_max": 2, **kw}
    with pytest.raises(ValueError, match=rf"^{bad}: expected a positive int"):
        build_layout([0, 0], batch=2, **args)


def test_build_layout_smallest_sizes_and_field_types():
    """groups = tokens_per_group = j_max = 1 is legal; every cu_seqlens is int32, every index long; the
    budgets are kept as given."""
    lay = build_layout([1, 0, 1], batch=3, groups=1, tokens_per_group=1, j_max=1)
    for cu in (lay.cu_latents, lay.cu_spatial, lay.cu_core, lay.cu_image):
        assert cu.dtype == torch.int32
    for ix in (lay.latent_sample, lay.latent_group, lay.latent_index, lay.pack_index):
        assert ix.dtype == torch.long
    assert lay.budgets == [1, 0, 1] and lay.cu_latents.tolist() == [0, 1, 1, 2]
    assert lay.latent_sample.tolist() == [0, 2] and lay.pack_index.tolist() == [0, 2]


def test_empty_batch_layout():
    lay = build_layout([], batch=0, groups=2, tokens_per_group=4, j_max=3)
    assert lay.max_latents == 0 and lay.max_core == 0 and lay.total_latents == 0
    assert lay.spatial_runs.runs == () and lay.latent_runs.runs == () and lay.spatial_runs.batch == 0


def test_budget_core_only_interface_layout():
    """Released semantics: Read/Write see all j_max latents whenever some budget is below j_max; with every
    sample at j_max there is nothing to separate and the layout is its own interface."""
    lay = build_layout([1, 3], batch=2, groups=2, tokens_per_group=4, j_max=3, budget_core_only=True)
    assert lay.budget_core_only is True and lay.interface is not None
    assert lay.read_args[0].tolist() == [0, 3, 6, 9, 12] and lay.write_args[1].tolist() == [0, 3, 6, 9, 12]
    assert lay.read_args[2] == 3 and lay.cu_core.tolist() == [0, 2, 8]
    full = build_layout([3, 3], batch=2, groups=2, tokens_per_group=4, j_max=3, budget_core_only=True)
    assert full.interface is None and full.interface_layout is full
    paper = build_layout([1, 3], batch=2, groups=2, tokens_per_group=4, j_max=3)
    assert paper.budget_core_only is False and paper.interface is None
    assert paper.read_args[0].tolist() == [0, 1, 2, 5, 8] and paper.read_args[2] == 3


@pytest.mark.parametrize("counts,runs", [([2, 2], ((0, 4, 0, 2),)), ([3], ((0, 3, 0, 1),)),
                                         ([1, 2, 2, 2], ((0, 1, 0, 1), (1, 7, 1, 4))),
                                         ([0, 0], ()), ([2, 0, 0, 2], ((0, 2, 0, 1), (2, 4, 3, 4)))])
def test_token_runs_merge_equal_neighbours(counts, runs):
    from elit_kernels.layout import TokenRuns
    r = TokenRuns.from_counts(counts, device="cpu")
    assert r.runs == runs and r.total == sum(counts) and r.batch == len(counts) and str(r.device) == "cpu"
    assert r.index.tolist() == [s for s, c in enumerate(counts) for _ in range(c)]
    assert TokenRuns.from_counts(counts).index.device.type == "cpu"  # the default device


def test_layout_runs_describe_the_batch():
    lay = build_layout([2, 2, 1], batch=3, groups=2, tokens_per_group=4, j_max=2)
    assert lay.latent_runs.runs == ((0, 8, 0, 2), (8, 10, 2, 3)) and lay.latent_runs.batch == 3
    assert lay.spatial_runs.runs == ((0, 24, 0, 3),) and lay.spatial_runs.total == 24 and lay.spatial_runs.batch == 3
    assert str(lay.spatial_runs.device) == "cpu" and str(lay.latent_runs.device) == "cpu"
    assert lay.spatial_sample().tolist() == [s for s in range(3) for _ in range(8)]


@pytest.mark.parametrize("core_only", [False, True])
@pytest.mark.parametrize("budgets", [[2, 2, 1, 1, 3], [3, 3, 3], [0, 2, 0], [1]])
def test_layout_segments_are_the_host_copy_of_its_cu_seqlens(budgets, core_only):
    """Each attention's SegmentRuns (handed to varlen_attention so no backend reads cu_seqlens back) describes
    exactly the segments of the cu_seqlens it comes with, equal neighbours merged into one run; read_args /
    write_args / core_args / image_args carry them together."""
    from elit_kernels import SegmentRuns

    def runs(cu_q, cu_k):
        return SegmentRuns.from_lengths(cu_q.diff().tolist(), cu_k.diff().tolist())

    lay = build_layout(budgets, batch=len(budgets), groups=3, tokens_per_group=4, j_max=3, budget_core_only=core_only)
    for one in (lay, lay.interface_layout):
        assert one.read_segments == runs(one.cu_latents, one.cu_spatial)
        assert one.write_segments == runs(one.cu_spatial, one.cu_latents)
        assert one.core_segments == runs(one.cu_core, one.cu_core)
        assert one.image_segments == runs(one.cu_image, one.cu_image)
    for args in (lay.read_args, lay.write_args, lay.core_args, lay.image_args):
        assert args[-1] == runs(args[0], args[1])
    if budgets == [2, 2, 1, 1, 3]:  # pinned: 3 groups per sample, equal samples merged
        assert lay.read_segments.runs == ((6, 2, 4), (6, 1, 4), (3, 3, 4))
        assert lay.core_segments.runs == ((2, 6, 6), (2, 3, 3), (1, 9, 9))


def test_modulate_over_zero_tokens():
    """Every sample at budget 0: no latent token, no run; the run path returns [0, C] like the gather path."""
    from elit_kernels.layout import TokenRuns
    from elit_kernels.reference.modulate import gated_residual, layernorm_modulate
    runs = TokenRuns.from_counts([0, 0])
    x, p = torch.randn(0, 6), torch.randn(2, 6)
    assert layernorm_modulate(x, p, p, runs).shape == (0, 6)
    assert gated_residual(x, x, p, runs).shape == (0, 6)


def test_build_layout_reads_its_flag_and_batch_as_the_other_arguments():
    """``budget_core_only="no"`` switched the released semantics on (read by truth) and 0 was stored as 0; a batch
    of 2.0, True, None or a tensor failed deep inside (list * float, torch.full, "n_segments"). Each is now named
    (a hostile-user round found them)."""
    import numpy as np

    for bad, shown in (("no", r"str \('no'\)"), (0, r"int \(0\)"), (None, r"NoneType \(None\)")):
        with pytest.raises(TypeError, match=rf"^budget_core_only: expected a bool, got {shown}$"):
            build_layout([1, 2], 2, 2, 4, 2, budget_core_only=bad)
    lay = build_layout([1, 2], 2, 2, 4, 2, budget_core_only=np.True_)  # NumPy's bool is a bool
    assert lay.budget_core_only is True and lay.interface is not None
    for bad in (2.0, True, None, torch.tensor(2), -1, "2"):
        with pytest.raises(ValueError, match=r"^batch: expected an int >= 0 \(the number of samples\), got "):
            build_layout(None, bad, 2, 4, 2)
        with pytest.raises(ValueError, match=r"^batch: expected an int >= 0"):
            normalize_budgets(None, bad, 2)
    want = build_layout([2, 1, 0], 3, 2, 4, 2)
    got = build_layout([2, 1, 0], np.int64(3), 2, 4, 2)  # NumPy ints are ints
    assert got.batch == 3 and type(got.batch) is int
    assert torch.equal(got.cu_latents, want.cu_latents) and torch.equal(got.latent_index, want.latent_index)


@pytest.mark.parametrize("counts, whole", [([3, 3], True), ([5], True), ([3, 2], False), ([0, 3], False),
                                           ([3, 0], False), ([0, 0], False), ([], False)])
def test_the_elementwise_ops_view_a_whole_run_and_slice_the_others_to_the_same_values(counts, whole):
    """``TokenRuns.whole`` (one run of every row and sample: the ops view x as [B, T/B, C] without slicing, the
    host-time fast path every spatial call takes) and the sliced path give what the [T] gather path gives, in
    every implementation and dtype; a sample with no token ([0, 3]) is not a whole run (the view would put its
    parameters on the other sample's rows)."""
    from elit_kernels.elementwise import ELEMENTWISE_IMPLS
    from elit_kernels.layout import TokenRuns
    from elit_kernels.reference.modulate import gated_residual, layernorm_modulate

    runs = TokenRuns.from_counts(counts)
    assert runs.whole is whole
    g = torch.Generator().manual_seed(len(counts) + 10 * sum(counts))
    t, b, c = sum(counts), len(counts), 8
    for dt in (torch.float32, torch.float64, torch.bfloat16):
        x, y = (torch.randn(t, c, generator=g).to(dt) for _ in range(2))
        sh, sc, gate = (torch.randn(b, c, generator=g) for _ in range(3))  # fp32 parameters: cast by the ops
        want_m = layernorm_modulate(x.double(), sh.double(), sc.double(), runs.index)
        want_r = gated_residual(x.double(), y.double(), gate.double(), runs.index)
        tol = 1e-5 if dt != torch.bfloat16 else 0.1
        for name in ("reference", "native"):
            impl = ELEMENTWISE_IMPLS[name]
            m, r = impl.layernorm_modulate(x, sh, sc, runs, 1e-6), impl.gated_residual(x, y, gate, runs)
            assert m.shape == r.shape == (t, c) and m.dtype == r.dtype == dt, (name, dt)
            if t:
                assert (m.double() - want_m).abs().max().item() <= tol, (name, dt)
                assert (r.double() - want_r).abs().max().item() <= tol, (name, dt)
            if dt == torch.float32:  # "native" is the reference's ops in fp32: bit for bit, on both paths
                assert torch.equal(m, ELEMENTWISE_IMPLS["reference"].layernorm_modulate(x, sh, sc, runs, 1e-6))
                assert torch.equal(r, ELEMENTWISE_IMPLS["reference"].gated_residual(x, y, gate, runs))


@pytest.mark.parametrize("impl", ["reference", "native"])
def test_the_elementwise_ops_name_a_token_tensor_whose_rows_the_runs_do_not_describe(impl):
    # six rows over runs of four tokens: the sliced path dropped the last two rows, the whole-run view would have
    # spread the two samples' parameters over rows of the wrong sample
    from elit_kernels.elementwise import ELEMENTWISE_IMPLS
    from elit_kernels.layout import TokenRuns

    ew, p = ELEMENTWISE_IMPLS[impl], torch.randn(2, 8)
    for runs in (TokenRuns.from_counts([2, 2]), TokenRuns.from_counts([3, 1])):
        x, ok = torch.randn(6, 8), torch.randn(4, 8)
        with pytest.raises(ValueError, match=r"^x: has 6 rows, the token runs describe 4 \(one row per token\)$"):
            ew.layernorm_modulate(x, p, p, runs, 1e-6)
        with pytest.raises(ValueError, match="^x: has 6 rows"):
            ew.gated_residual(x, x, p, runs)
        with pytest.raises(ValueError, match=r"^y: has 6 rows, the token runs describe 4 \(one row per token\)$"):
            ew.gated_residual(ok, x, p, runs)


def test_a_whole_run_refuses_parameters_of_another_batch_size():
    # the sliced path read the first B rows of a longer parameter tensor; the whole-run view must not broadcast
    # one of another size silently either
    from elit_kernels.elementwise import native_layernorm_modulate
    from elit_kernels.layout import TokenRuns

    runs, x = TokenRuns.from_counts([2, 2]), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"^shift/scale: expected \[2, C\]"):
        native_layernorm_modulate(x, torch.randn(3, 8), torch.randn(3, 8), runs)


@pytest.mark.parametrize("impl", ["reference", "native", "fused"])
def test_the_elementwise_ops_refuse_parameters_of_fewer_samples(impl):
    """A fuzz: a [1, C] shift/scale/gate on a 2-sample whole run broadcast sample 0's parameters over sample 1, and
    a [2, C] one on runs of 3 samples ran on the first two: silently. The parameters must have one row per sample,
    in every implementation (the fused one, which takes an index, ran extra rows: a stale [B + 1, C] buffer)."""
    from elit_kernels.elementwise import ELEMENTWISE_IMPLS, get_elementwise
    from elit_kernels.layout import TokenRuns

    if impl not in ELEMENTWISE_IMPLS:
        pytest.skip(f"elementwise implementation {impl!r} is not registered here (the compiled extension is not built)")
    ew = get_elementwise(impl)
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"^x: "):
        ew.layernorm_modulate(x[:7], torch.randn(2, 4), torch.randn(2, 4), TokenRuns.from_counts([4, 4]), 1e-6)
    with pytest.raises(ValueError, match=r"^y: "):
        ew.gated_residual(x, x[:7], torch.randn(2, 4), TokenRuns.from_counts([4, 4]))
    for counts, rows in (([4, 4], 1), ([4, 4], 3), ([4, 2, 2], 2), ([4, 2, 2], 4)):
        runs, p = TokenRuns.from_counts(counts), torch.randn(rows, 4)
        with pytest.raises(ValueError, match=rf"^shift/scale: expected \[{len(counts)}, C\] \(one row per sample"):
            ew.layernorm_modulate(x, p, p, runs, 1e-6)
        with pytest.raises(ValueError, match=rf"^gate: expected \[{len(counts)}, C\]"):
            ew.gated_residual(x, x, p, runs)


def test_layout_helpers_name_bad_arguments():
    """A fuzz of the layout helpers: each bad argument below was silently wrong (negative or fractional token
    counts made runs past the rows; a repeated index left inverse_permutation's result holding unwritten memory;
    j_max 2.5 gave float budgets) or raised an error naming something else (a driver error for device, ``budgets``
    for j_max, ``tokens`` for h)."""
    from elit_kernels.attention import SegmentRuns
    from elit_kernels.layout import TokenRuns

    for counts, err, msg in (([3, -1, 3], ValueError, "got -1"), ([2.9, 2.9], TypeError, "got float"),
                             ("33", TypeError, "got str"), ([True, 2], TypeError, "got bool")):
        with pytest.raises(err, match=rf"^counts: expected .*{msg}"):
            TokenRuns.from_counts(counts)
    for same in (np.array([2, 2, 3]), torch.tensor([2, 2, 3]), (c for c in [2, 2, 3])):
        assert TokenRuns.from_counts(same).runs == TokenRuns.from_counts([2, 2, 3]).runs
    with pytest.raises(TypeError, match=r"^counts: expected ints >= 0, got float"):
        TokenRuns.from_counts(torch.tensor([2.0, 3.0]))
    inv = inverse_permutation(torch.tensor([2, 0, 1], dtype=torch.int32))
    assert inv.dtype == torch.int32 and inv.tolist() == [1, 2, 0]
    for j_max in (2.5, -3, None, True):
        with pytest.raises(ValueError, match=r"^j_max: expected an int >= 0"):
            normalize_budgets(None, 2, j_max)
    assert normalize_budgets(None, 2, np.int64(4)) == [4, 4] and type(normalize_budgets(None, 2, np.int64(4))[0]) is int
    with pytest.raises(ValueError, match=r"^budgets: a meta tensor holds no values"):
        normalize_budgets(torch.tensor([1, 2], device="meta"), 2, 4)
    with pytest.raises(ValueError, match=r"^perm: expected each of 0\.\.2 once"):
        inverse_permutation(torch.tensor([0, 0, 1]))
    with pytest.raises(TypeError, match=r"^perm: expected a 1-D integer tensor"):
        inverse_permutation(torch.tensor([0.0, 1.0]))
    for device in (None, "gpu"):
        with pytest.raises(ValueError, match=r"^device: expected a torch.device or a device string"):
            build_layout([1, 1], 2, 2, 4, 2, device=device)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device: cuda requested, but torch.cuda.is_available\(\) is False"):
            build_layout([1, 1], 2, 2, 4, 2, device="cuda")
    with pytest.raises(ValueError, match=r"^h: expected a positive int"):
        from_group_major(torch.randn(1, 16, 3), "a", 8, 2)
    with pytest.raises(TypeError, match=r"^x: expected a torch.Tensor"):
        to_group_major([[1]], 2)
    with pytest.raises(TypeError, match=r"^lengths_q: expected a sequence of ints >= 0 .* of shape \(1, 2\)"):
        SegmentRuns.from_lengths(np.array([[2, 3]]), [2, 3])
    # runs are maximal however they are given: one object per call shape (dispatch's uniform class, equality)
    r = SegmentRuns(((1, 2, 2), (1, 2, 2)), 4, 4)
    assert r.runs == ((2, 2, 2),) and r.uniform and r == SegmentRuns.from_lengths([2, 2], [2, 2])
