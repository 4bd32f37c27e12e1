"""Token layouts: group-major spatial order and the ragged latent layout built from budgets.

Group-major order keeps every window's spatial tokens contiguous, so a Read/Write segment is a
slice, never a gather. Latents are packed sample-major, then group-major, keeping the first J_b
latents of each group of sample b.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ._devices import device_problem
from ._types import check_bool, is_int, is_int_array
from .attention.inputs import SegmentRuns


def _check_grid(h: int, w: int, window: int) -> None:
    for name, n in (("h", h), ("w", w), ("window", window)):
        if not is_int(n) or n < 1:
            raise ValueError(f"{name}: expected a positive int, got {n!r}")
    if h % window or w % window:
        raise ValueError(f"window: {window} must divide the token grid {h}x{w}")


def group_major_permutation(h: int, w: int, window: int, device=None) -> torch.Tensor:
    """``perm`` [h*w] such that ``tokens_row_major[:, perm]`` is group-major.

    Groups are ``window x window`` squares, numbered row-major over the grid of windows; inside a
    group tokens are row-major. Invert with ``inverse_permutation(perm)``.

    >>> group_major_permutation(2, 4, 2).tolist()
    [0, 1, 4, 5, 2, 3, 6, 7]
    """
    _check_grid(h, w, window)
    idx = torch.arange(h * w, device=device).reshape(h // window, window, w // window, window)
    return idx.permute(0, 2, 1, 3).reshape(-1)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The exact inverse of a permutation: ``x[perm][inverse_permutation(perm)] == x``. ``perm``: a 1-D integer
    tensor holding each of ``0 .. n-1`` once; TypeError / ValueError naming ``perm`` otherwise (on a CPU every
    value is checked; on another device the dtype and shape, as reading the values would be a host sync: an index
    repeated there leaves rows of the result unwritten)."""
    if not isinstance(perm, torch.Tensor) or perm.dim() != 1 or perm.dtype.is_floating_point \
            or perm.dtype.is_complex or perm.dtype == torch.bool:
        raise TypeError("perm: expected a 1-D integer tensor, got "
                        + (f"{perm.dtype} of shape {tuple(perm.shape)}" if isinstance(perm, torch.Tensor)
                           else type(perm).__name__))
    if perm.device.type == "cpu" and not torch.equal(torch.sort(perm.long()).values, torch.arange(perm.numel())):
        raise ValueError(f"perm: expected each of 0..{perm.numel() - 1} once (a permutation)")
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


def to_group_major(x: torch.Tensor, window: int) -> torch.Tensor:
    """``[B, C, h, w]`` feature map -> ``[B, h*w, C]`` tokens in group-major order (a reshape, no index)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor [B, C, h, w], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected [B, C, h, w], got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    _check_grid(h, w, window)
    x = x.reshape(b, c, h // window, window, w // window, window)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, c)


def from_group_major(tokens: torch.Tensor, h: int, w: int, window: int) -> torch.Tensor:
    """Inverse of ``to_group_major``: ``[B, h*w, C]`` group-major tokens -> ``[B, C, h, w]``."""
    _check_grid(h, w, window)  # first: a bad h or w is named as such, not as a wrong token count
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens: expected a torch.Tensor [B, h*w, C], got {type(tokens).__name__}")
    if tokens.dim() != 3 or tokens.shape[1] != h * w:
        raise ValueError(f"tokens: expected [B, {h * w}, C], got shape {tuple(tokens.shape)}")
    b, _, c = tokens.shape
    x = tokens.reshape(b, h // window, w // window, window, window, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def normalize_budgets(budgets, batch: int, j_max: int) -> list[int]:
    """Budgets as a list of Python ints, one per sample, each in [0, j_max].

    Accepts None (every sample at j_max), an int (every sample at it), a sequence of ints, a 1-D integer
    tensor (a tensor costs one host copy here, once per forward) or a 1-D NumPy integer array (one per sample).
    NumPy integers are ints; a bool is not. ValueError naming ``batch`` or ``j_max`` unless it is an int >= 0.
    """
    if not is_int(j_max) or j_max < 0:
        raise ValueError(f"j_max: expected an int >= 0 (latents per group), got {j_max!r}")
    j_max = int(j_max)
    if isinstance(batch, torch.SymInt):  # x.shape[0] under torch.compile with a dynamic batch: left symbolic
        pass
    elif not is_int(batch) or batch < 0:
        raise ValueError(f"batch: expected an int >= 0 (the number of samples), got {batch!r}")
    else:
        batch = int(batch)
    if budgets is None:
        out = [j_max] * batch
    elif is_int(budgets):  # not a bool (is_int refuses bools): True falls through to the last TypeError
        out = [int(budgets)] * batch
    elif is_int_array(budgets):
        if budgets.ndim != 1:
            raise TypeError(f"budgets: expected a 1-D integer array, got shape {tuple(budgets.shape)}")
        out = [int(b) for b in budgets.tolist()]
    elif isinstance(budgets, torch.Tensor):
        if budgets.dim() != 1 or budgets.dtype.is_floating_point or budgets.dtype.is_complex or \
                budgets.dtype == torch.bool:
            raise TypeError(f"budgets: expected a 1-D integer tensor, got {budgets.dtype} of shape {tuple(budgets.shape)}")
        if budgets.device.type == "meta":
            raise ValueError("budgets: a meta tensor holds no values; pass the budgets as ints (a list or an int)")
        out = [int(b) for b in budgets.tolist()]
    elif isinstance(budgets, (str, bytes, bytearray, memoryview)):  # sequences of ints or chars, never budgets
        raise TypeError(f"budgets: expected None, an int, a sequence of ints or a 1-D integer tensor, got "
                        f"{type(budgets).__name__} ({budgets!r})")
    elif isinstance(budgets, Sequence):
        out = []
        for b in budgets:
            if not is_int(b):
                raise TypeError(f"budgets: expected ints, got {type(b).__name__} ({b!r})")
            out.append(int(b))
    else:
        raise TypeError(f"budgets: expected None, an int, a sequence of ints or a 1-D integer tensor, got {type(budgets).__name__}")
    if len(out) != batch:
        raise ValueError(f"budgets: expected {batch} budgets (one per sample), got {len(out)}")
    bad = [b for b in out if not 0 <= b <= j_max]
    if bad:
        raise ValueError(f"budgets: each budget must be in [0, {j_max}] (J_max), got {bad[0]}")
    return out


@dataclass(eq=False)
class TokenRuns:
    """Which sample each row of a packed ``[T, C]`` token tensor belongs to, as runs of consecutive samples
    with equal token counts (Python ints, built once per forward from the budgets: no host sync).

    ``runs``: ``((row_start, row_stop, sample_start, sample_stop), ...)``; a run holds ``sample_stop -
    sample_start`` samples of ``(row_stop - row_start) // (sample_stop - sample_start)`` tokens each, so
    ``x[row_start:row_stop].view(samples, tokens, C)`` is a view and a per-sample ``[B, C]`` adaLN parameter
    broadcasts over it: no ``[T, C]`` gather. Spatial tokens are one run; a uniform latent batch is one run;
    a mixed batch has one run per stretch of equal budgets. Samples with no token form no run.

    >>> r = TokenRuns.from_counts([4, 4, 2, 0, 2])
    >>> r.runs, r.total, r.index.tolist()
    (((0, 8, 0, 2), (8, 10, 2, 3), (10, 12, 4, 5)), 12, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 4, 4])
    """

    runs: tuple
    total: int
    batch: int
    device: torch.device | str = "cpu"
    _index: torch.Tensor | None = None

    @classmethod
    def from_counts(cls, counts: Sequence[int], device="cpu") -> "TokenRuns":
        """Runs from tokens per sample (a sequence of ints >= 0; NumPy integers are ints). TypeError / ValueError
        naming ``counts`` otherwise (a negative or fractional count made runs past the rows, silently)."""
        if (is_int_array(counts) or isinstance(counts, torch.Tensor)) and counts.ndim == 1:
            counts = counts.tolist()  # a tensor's floats are named below
        if isinstance(counts, (str, bytes, bytearray)) or not hasattr(counts, "__iter__"):
            raise TypeError(f"counts: expected a sequence of ints >= 0 (tokens per sample), got {type(counts).__name__}")
        counts = list(counts)  # a generator too
        for c in counts:
            if not is_int(c):
                raise TypeError(f"counts: expected ints >= 0, got {type(c).__name__} ({c!r})")
            if c < 0:
                raise ValueError(f"counts: expected ints >= 0 (tokens per sample), got {c}")
        runs, row, i = [], 0, 0
        counts = [int(c) for c in counts]
        while i < len(counts):
            j = i
            while j + 1 < len(counts) and counts[j + 1] == counts[i]:
                j += 1
            n = counts[i] * (j - i + 1)
            if n:
                runs.append((row, row + n, i, j + 1))
            row, i = row + n, j + 1
        return cls(tuple(runs), row, len(counts), device)

    @property
    def whole(self) -> bool:
        """One run holding every row and every sample (spatial tokens; a batch with one budget): the ops view the
        whole ``[T, C]`` tensor as ``[B, T/B, C]``, no slicing."""
        return len(self.runs) == 1 and self.runs[0] == (0, self.total, 0, self.batch)

    @property
    def index(self) -> torch.Tensor:
        """``[T]`` long: the sample of every row (built on first use, for implementations that gather)."""
        if self._index is None:
            idx = torch.empty(self.total, dtype=torch.long, device=self.device)
            for a, b, s0, s1 in self.runs:
                idx[a:b] = torch.arange(s0, s1, device=self.device).repeat_interleave((b - a) // (s1 - s0))
            self._index = idx
        return self._index


@dataclass
class ElitLayout:
    """Everything the attention calls of one ELIT forward need, computed once from the budgets.

    Shapes: B samples, G groups, P spatial tokens per group, J_b latents per group of sample b,
    T = G * sum(J_b) packed latents. Max lengths are Python ints so no kernel launch needs ``.item()``.
    """

    batch: int
    groups: int
    tokens_per_group: int
    j_max: int
    budgets: list[int]
    total_latents: int
    # Read: q = latents of (b, g), k/v = spatial tokens of (b, g). Write swaps them.
    cu_latents: torch.Tensor  # [B*G + 1] int32
    cu_spatial: torch.Tensor  # [B*G + 1] int32
    max_latents: int  # max J_b
    # Core: all latents of one sample.
    cu_core: torch.Tensor  # [B + 1] int32
    max_core: int  # G * max J_b
    # Spatial self-attention (head/tail blocks): one segment per sample.
    cu_image: torch.Tensor  # [B + 1] int32
    latent_sample: torch.Tensor  # [T] long: sample of each packed latent
    latent_group: torch.Tensor  # [T] long: group of each packed latent
    latent_index: torch.Tensor  # [T] long: index j inside its group (selects the shared embedding)
    pack_index: torch.Tensor  # [T] long: flat index into a [B, G, J_max] grid
    # Official budget semantics (``budget_core_only``): Read and Write see all J_max latents of every group
    # and only the core is budgeted. Then ``interface`` is the full layout (every budget J_max) whose packed
    # latents are exactly the [B, G, J_max] grid, so ``pack_index`` gathers the core's latents from them.
    # None when Read, core and Write see the same latents (the paper's semantics, or every budget J_max).
    interface: "ElitLayout | None" = None
    budget_core_only: bool = False  # the semantics this layout was built for
    # Rows by sample, for per-sample adaLN parameters that broadcast instead of gathering (TokenRuns).
    latent_runs: TokenRuns | None = None  # the packed core latents [T, C]
    spatial_runs: TokenRuns | None = None  # the spatial tokens [B*N, C]: one run
    # The segment lengths of each attention as host ints (SegmentRuns), handed to varlen_attention so that no
    # backend reads cu_seqlens back from the device and uniform calls run as one dense SDPA.
    read_segments: SegmentRuns | None = None  # (J_b, P) per (sample, group)
    write_segments: SegmentRuns | None = None  # (P, J_b) per (sample, group)
    core_segments: SegmentRuns | None = None  # (G*J_b, G*J_b) per sample
    image_segments: SegmentRuns | None = None  # (N, N) per sample

    @property
    def interface_layout(self) -> "ElitLayout":
        """The layout of the latents Read and Write see (``self`` unless budgets apply to the core only)."""
        return self.interface if self.interface is not None else self

    @property
    def read_args(self):
        """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, segments) for Read."""
        lay = self.interface_layout
        return lay.cu_latents, lay.cu_spatial, lay.max_latents, lay.tokens_per_group, lay.read_segments

    @property
    def write_args(self):
        """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, segments) for Write."""
        lay = self.interface_layout
        return lay.cu_spatial, lay.cu_latents, lay.tokens_per_group, lay.max_latents, lay.write_segments

    @property
    def core_args(self):
        """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, segments) for the core blocks."""
        return self.cu_core, self.cu_core, self.max_core, self.max_core, self.core_segments

    @property
    def image_args(self):
        """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, segments) for the spatial blocks."""
        n = self.groups * self.tokens_per_group
        return self.cu_image, self.cu_image, n, n, self.image_segments

    def spatial_sample(self, device=None) -> torch.Tensor:
        """[B*N] long: sample of each spatial token (tokens are stored sample-major)."""
        n = self.groups * self.tokens_per_group
        return torch.arange(self.batch, device=device or self.cu_image.device).repeat_interleave(n)


def _host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small CPU tensor on ``device`` without a host sync: to a GPU through pinned memory with a non-blocking
    copy (a plain copy from pageable memory waits for the stream), elsewhere a plain ``.to``."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.compiler.is_compiling() and torch.cuda.is_available():
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _cu(lengths: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    out[1:] = torch.cumsum(lengths, 0).to(torch.int32)
    return out


def _runs_per_sample(budgets: list[int], per_sample: int, shape) -> SegmentRuns:
    """``per_sample`` segments of ``shape(J_b) = (Lq, Lk)`` for each sample, merged into runs: O(batch) host work."""
    runs: list = []
    tq = tk = 0
    for b in budgets:
        lq, lk = shape(b)
        tq, tk = tq + per_sample * lq, tk + per_sample * lk
        if runs and runs[-1][1:] == (lq, lk):
            runs[-1] = (runs[-1][0] + per_sample, lq, lk)
        elif per_sample:
            runs.append((per_sample, lq, lk))
    return SegmentRuns(tuple(runs), tq, tk)


def build_layout(budgets, batch: int, groups: int, tokens_per_group: int, j_max: int, device="cpu", *,
                 budget_core_only: bool = False) -> ElitLayout:
    """The ragged layout for ``batch`` samples with per-sample ``budgets`` (see ``normalize_budgets``).

    ``budget_core_only``: the released ELIT-SiT semantics (docs/released_checkpoints.md §3.2 step 6): Read and
    Write use all ``j_max`` latents of every group (``read_args``/``write_args`` come from ``interface``),
    the core uses the first J_b of each group.

    >>> lay = build_layout([2, 1], batch=2, groups=2, tokens_per_group=4, j_max=2)
    >>> lay.cu_latents.tolist(), lay.cu_core.tolist(), lay.latent_index.tolist()
    ([0, 2, 4, 5, 6], [0, 4, 6], [0, 1, 0, 1, 0, 0])
    >>> lay = build_layout([2, 1], batch=2, groups=2, tokens_per_group=4, j_max=2, budget_core_only=True)
    >>> lay.read_args[0].tolist(), lay.cu_core.tolist(), lay.pack_index.tolist()
    ([0, 2, 4, 6, 8], [0, 4, 6], [0, 1, 2, 3, 4, 6])
    """
    for name, n in (("groups", groups), ("tokens_per_group", tokens_per_group), ("j_max", j_max)):
        if not is_int(n) or n < 1:
            raise ValueError(f"{name}: expected a positive int, got {n!r}")
    groups, tokens_per_group, j_max = int(groups), int(tokens_per_group), int(j_max)  # NumPy ints as Python's
    budget_core_only = check_bool("budget_core_only", budget_core_only)  # "no" is not read as true
    if not torch.compiler.is_compiling():  # a bad device is named as such, not as a driver error deep inside
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: expected a torch.device or a device string such as 'cpu' or 'cuda:0', got "
                             f"{device!r} ({str(e).splitlines()[0]})") from None
        if why := device_problem(dev):
            raise ValueError(f"device: {why}")
    bud = normalize_budgets(budgets, batch, j_max)  # after the sizes: a bad j_max is named as such; checks batch
    batch = len(bud)
    b_t = _host_to_device(torch.tensor(bud, dtype=torch.long), device)
    per_group = b_t.repeat_interleave(groups)  # [B*G]
    cu_lat = _cu(per_group)
    cu_sp = _cu(torch.full((batch * groups,), tokens_per_group, dtype=torch.long, device=device))
    cu_core = _cu(b_t * groups)
    cu_img = _cu(torch.full((batch,), groups * tokens_per_group, dtype=torch.long, device=device))
    total = groups * sum(bud)
    seg = torch.arange(batch * groups, device=device).repeat_interleave(per_group, output_size=total)  # (b, g) of each latent
    j = torch.arange(total, device=device) - cu_lat[seg].long()
    sample, group = seg // groups, seg % groups
    interface = None
    if budget_core_only and any(b != j_max for b in bud):
        interface = build_layout(None, batch, groups, tokens_per_group, j_max, device=device)
    latent_runs = TokenRuns.from_counts([groups * b for b in bud], device)
    latent_runs._index = sample
    spatial_runs = TokenRuns(((0, batch * groups * tokens_per_group, 0, batch),) if batch else (),
                             batch * groups * tokens_per_group, batch, device)
    return ElitLayout(
        read_segments=_runs_per_sample(bud, groups, lambda b: (b, tokens_per_group)),
        write_segments=_runs_per_sample(bud, groups, lambda b: (tokens_per_group, b)),
        core_segments=_runs_per_sample(bud, 1, lambda b: (groups * b, groups * b)),
        image_segments=SegmentRuns.uniform_runs(batch, groups * tokens_per_group, groups * tokens_per_group),
        batch=batch, groups=groups, tokens_per_group=tokens_per_group, j_max=j_max, budgets=bud,
        total_latents=total, cu_latents=cu_lat, cu_spatial=cu_sp, max_latents=max(bud or [0]),
        cu_core=cu_core, max_core=groups * max(bud or [0]), cu_image=cu_img,
        latent_sample=sample, latent_group=group, latent_index=j, pack_index=seg * j_max + j,
        interface=interface, budget_core_only=budget_core_only, latent_runs=latent_runs, spatial_runs=spatial_runs,
    )


def pack_latents(latents: torch.Tensor, layout: ElitLayout) -> torch.Tensor:
    """``[B, G, J_max, C]`` -> packed ``[T, C]``: the first J_b latents of each group of sample b."""
    expect = (layout.batch, layout.groups, layout.j_max)
    if latents.dim() != 4 or tuple(latents.shape[:3]) != expect:
        raise ValueError(f"latents: expected shape [{expect[0]}, {expect[1]}, {expect[2]}, C], got {tuple(latents.shape)}")
    return latents.reshape(-1, latents.shape[-1])[layout.pack_index]


def unpack_latents(packed: torch.Tensor, layout: ElitLayout, fill: float = 0.0) -> torch.Tensor:
    """Packed ``[T, C]`` -> ``[B, G, J_max, C]``; dropped latents are ``fill``."""
    if packed.dim() != 2 or packed.shape[0] != layout.total_latents:
        raise ValueError(f"packed: expected shape [{layout.total_latents}, C], got {tuple(packed.shape)}")
    c = packed.shape[1]
    out = packed.new_full((layout.batch * layout.groups * layout.j_max, c), fill)
    out = out.index_copy(0, layout.pack_index, packed)
    return out.reshape(layout.batch, layout.groups, layout.j_max, c)
