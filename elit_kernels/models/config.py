"""ELIT model configs: one ``ElitConfig``, two presets.

- ``elit_config(name, res)``: the **paper** variant (arXiv 2603.12245): 4-20-4 / 3-6-3 head/core/tail splits,
  QK RMSNorm everywhere, adaLN-Zero Read with normalised latent queries, a Write with LayerNorms, shared
  latent embeddings plus the fixed sin-cos position of their window, DiT's ``1000·t`` timestep input, and
  budgets that apply to Read, core and Write alike.
- ``elit_sit_config(name, res)``: the **released** ELIT-SiT code and checkpoints (github.com/snap-research/elit,
  ``models/sit_elit.py``), as stated in ``docs/released_checkpoints.md`` §3: ``encoder_depth`` head blocks and the
  registry's tail count, no QK-norm in the DiT blocks, raw latent queries in Read, learned position tables,
  a Write with no norm, modulation or gates, full-width RMSNorm (eps outside the root) in Read/Write attention,
  t fed in [0, 1], the sin-cos table with its column half first, and the official budget semantics (Read and
  Write always see all P latents of a group; only the core is budgeted).

Both are the same ``ElitDiT`` code path; the fields below the ``# switches`` line select between them.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace

from .._types import is_int, is_numpy_bool, is_real

INTERFACE_QK_NORMS = ("per_head", "full_width")
_BOOL_FIELDS = ("block_qk_norm", "read_modulates_queries", "write_prenorm", "interface_mlp_bias", "latent_group_pos",
                "learned_interface_pos", "pos_embed_column_first", "budget_core_only")
MAX_HEAD_DIM = 256  # the largest head dim varlen_attention accepts (elit_kernels.attention)


@dataclass(frozen=True)
class ElitConfig:
    hidden: int = 384
    depth: int = 12
    heads: int = 6
    patch: int = 2
    in_channels: int = 4
    input_size: int = 32  # latent image side (256px with an 8x VAE)
    window: int = 4  # window (group) side in tokens: 16x16 tokens -> 4x4 = 16 groups of 16 tokens
    j_max: int | None = None  # latents per group; None = tokens per group (K_max = N)
    num_classes: int = 1000
    head_blocks: int | None = None  # None = the paper's split for the depth
    tail_blocks: int | None = None
    mlp_ratio: float = 4.0
    interface_mlp_ratio: float = 1.0
    # switches: the defaults are the paper preset; elit_sit_config() sets the released one.
    block_qk_norm: bool = True  # per-head RMSNorm on q and k in the DiT blocks (released: none)
    interface_qk_norm: str = "per_head"  # Read/Write q/k norm: per-head RMSNorm (eps 1e-6 inside the root) or
    #   "full_width": one RMSNorm over all C channels before the head split, x / (rms(x) + 1e-5) (released)
    read_modulates_queries: bool = True  # LayerNorm + adaLN on Read's latent queries (released: raw latents)
    write_prenorm: bool = True  # LayerNorm on Write's queries, keys/values and MLP input (released: none)
    interface_mlp_bias: bool = True  # biases in the Read/Write MLPs (released: none)
    latent_group_pos: bool = True  # ours: fixed sin-cos of the group's window added to the latent queries
    learned_interface_pos: bool = False  # released: learned in-group tables on Read's keys and Write's queries,
    #   and a latent position table added after Read at the slot's raster index
    latent_pos_rows: int = 4096  # rows of that latent table (the released code always allocates 4096)
    timestep_scale: float = 1000.0  # t in [0, 1] enters the sinusoid as timestep_scale * t (released: 1)
    pos_embed_column_first: bool = False  # sin-cos table: first half encodes the column (released/DiT: True)
    budget_core_only: bool = False  # official budget semantics: Read/Write see all P latents, core the first J

    def __post_init__(self):
        self._numpy_to_python()
        for name in ("hidden", "depth", "heads", "patch", "in_channels", "input_size", "window", "num_classes",
                     "latent_pos_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.input_size % self.patch:
            raise ValueError(f"patch: {self.patch} must divide input_size {self.input_size}")
        if self.grid % self.window:
            raise ValueError(f"window: {self.window} must divide the token grid side {self.grid}")
        if self.hidden % self.heads:
            raise ValueError(f"heads: {self.heads} must divide hidden {self.hidden}")
        if self.hidden // self.heads > MAX_HEAD_DIM:
            raise ValueError(f"hidden/heads: head dim {self.hidden}/{self.heads} = {self.hidden // self.heads} exceeds "
                             f"{MAX_HEAD_DIM}, the largest the attention backends take; use more heads")
        if self.j_max is not None and (isinstance(self.j_max, bool) or not isinstance(self.j_max, int) or self.j_max < 1):
            raise ValueError(f"j_max: expected None or a positive int, got {self.j_max!r}")
        for name in ("head_blocks", "tail_blocks"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{name}: expected None or an int >= 0, got {v!r}")
        for name in ("mlp_ratio", "interface_mlp_ratio", "timestep_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
        for name in ("mlp_ratio", "interface_mlp_ratio"):  # the MLPs are int(hidden * ratio) wide (blocks.py)
            if int(self.hidden * getattr(self, name)) < 1:
                raise ValueError(f"{name}: {getattr(self, name)!r} gives MLPs of int({self.hidden} * ratio) = 0 "
                                 f"features; expected at least {1 / self.hidden:.3g} at hidden {self.hidden}")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):  # a string such as "no" would be truthy
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.core_blocks < 0:
            raise ValueError(f"head_blocks/tail_blocks: {self.n_head}+{self.n_tail} exceed depth {self.depth}")
        if self.interface_qk_norm not in INTERFACE_QK_NORMS:
            raise ValueError(f"interface_qk_norm: expected one of {INTERFACE_QK_NORMS}, got {self.interface_qk_norm!r}")
        if self.hidden % 4:  # the patch tokens' position table is always a 2-D sin-cos one (blocks.sincos_2d)
            raise ValueError(f"hidden: {self.hidden} must be divisible by 4 for the 2-D sin-cos position embeddings")
        if self.learned_interface_pos:
            if self.latents_per_group != self.tokens_per_group:
                raise ValueError(f"j_max: learned_interface_pos indexes latents by their slot's token, so j_max must "
                                 f"equal the tokens per group ({self.tokens_per_group}), got {self.j_max}")
            if self.latent_pos_rows < self.grid * self.grid:
                raise ValueError(f"latent_pos_rows: {self.latent_pos_rows} < {self.grid * self.grid} tokens")

    def _numpy_to_python(self):
        """NumPy scalars in any field become the Python int, float, bool or str they equal (``_types``: a config built
        from array values must save, compare and hash as the one built from Python values); a bool is never an
        int. Anything else is left for the checks to refuse."""
        for f in fields(self):
            v = getattr(self, f.name)
            if type(v).__module__ != "numpy":
                continue
            if is_numpy_bool(v):
                v = bool(v)
            elif is_int(v):
                v = int(v)
            elif is_real(v):
                v = float(v)
            elif isinstance(v, str):
                v = str(v)
            else:
                continue
            object.__setattr__(self, f.name, v)  # frozen dataclass: set once, before anything reads it

    @property
    def grid(self) -> int:
        return self.input_size // self.patch

    @property
    def tokens(self) -> int:
        """N, spatial tokens per sample."""
        return self.grid * self.grid

    @property
    def groups(self) -> int:
        return (self.grid // self.window) ** 2

    @property
    def tokens_per_group(self) -> int:
        return self.window ** 2

    @property
    def latents_per_group(self) -> int:
        """J_max: the largest budget."""
        return self.j_max if self.j_max is not None else self.tokens_per_group

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_head(self) -> int:
        return self.head_blocks if self.head_blocks is not None else _default_split(self.depth)

    @property
    def n_tail(self) -> int:
        return self.tail_blocks if self.tail_blocks is not None else _default_split(self.depth)

    @property
    def core_blocks(self) -> int:
        return self.depth - self.n_head - self.n_tail


def _default_split(depth: int) -> int:
    # A quarter of the depth, at most 4: the paper's 4-20-4 for 28 blocks and 3-6-3 for 12, ours elsewhere.
    return min(4, depth // 4)


def config_dict(cfg: ElitConfig) -> dict:
    """The config as a plain dict (JSON- and ``weights_only``-safe); ``ElitConfig(**d)`` rebuilds it."""
    return asdict(cfg)


def config_from_dict(d: dict, *, complete: bool = False) -> ElitConfig:
    """``ElitConfig(**d)`` that names unknown keys instead of a bare ``TypeError``. ``complete``: every field must
    be present (a saved config holds them all: a missing one would silently take the paper preset's default, which
    the released checkpoints do not share). Raises ValueError naming the keys."""
    if not isinstance(d, dict):
        raise ValueError(f"config: expected a dict of ElitConfig fields, got {type(d).__name__}")
    known = {f.name for f in fields(ElitConfig)}
    bad = sorted(set(d) - known)
    if bad:
        raise ValueError(f"config: unknown ElitConfig field(s) {bad}; known: {sorted(known)}")
    missing = sorted(known - set(d)) if complete else []
    if missing:
        raise ValueError(f"config: missing ElitConfig field(s) {missing}; a saved config holds every field")
    return ElitConfig(**d)


def _with_overrides(base: ElitConfig, overrides: dict, derived: dict) -> ElitConfig:
    """``replace(base, **overrides)`` for the presets: an unknown field is a ValueError naming the known ones (not
    dataclasses' bare TypeError), and an override of a field the preset derives from its own arguments
    (``derived``: field -> (value, what it comes from, what to pass instead)) must equal the derived value, else a ValueError naming
    both: the other fields are derived from those arguments too, so a differing override would silently build a
    config the arguments do not describe (``elit_config("tiny", 64, input_size=16)`` kept 64px's windows)."""
    known = {f.name for f in fields(ElitConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"overrides: unknown ElitConfig field(s) {bad}; known: {sorted(known)}")
    for name, (value, source, hint) in derived.items():
        if name in overrides and overrides[name] != value:
            raise ValueError(f"{name}: {overrides[name]!r} conflicts with {source}, which gives {name} = {value}; "
                             f"{hint}")
    return replace(base, **overrides)


_SIZES = {"S/2": (384, 12, 6), "B/2": (768, 12, 12), "L/2": (1024, 24, 16), "XL/2": (1152, 28, 16),
          "tiny": (64, 3, 2)}


def elit_config(name: str, resolution: int = 256, **overrides) -> ElitConfig:
    """The paper preset: a named config (S/2, B/2, L/2, XL/2, or ``tiny`` for tests) at 256 or 512 px.

    Windows follow the paper's 16 groups: 4x4 tokens at 256px, 8x8 at 512px (``tiny``: 4 groups).

    >>> c = elit_config("XL/2", 512); (c.hidden, c.heads, c.groups, c.latents_per_group, c.n_head, c.core_blocks)
    (1152, 16, 16, 64, 4, 20)
    """
    if name not in _SIZES:
        raise ValueError(f"name: unknown config {name!r}; known: {', '.join(_SIZES)}")
    resolution = _check_resolution(resolution)
    hidden, depth, heads = _SIZES[name]
    input_size = resolution // 8
    patch = overrides.get("patch", ElitConfig.patch)
    if "patch" not in overrides and input_size % patch:
        raise ValueError(f"resolution: {resolution}px gives a {input_size}x{input_size} latent, not divisible by "
                         f"{name}'s patch {patch}; expected a multiple of {8 * patch} px")
    window = max(1, (input_size // 2) // 4)  # 16 groups on a 4x4 grid of windows
    base = ElitConfig(hidden=hidden, depth=depth, heads=heads, input_size=input_size, window=window)
    if name == "tiny":  # ours, for tests and demos: 2x2 windows (4 groups) so budgets stay meaningful
        base = replace(base, head_blocks=1, tail_blocks=1, num_classes=10, window=max(1, (input_size // 2) // 2))
    return _with_overrides(base, overrides, {
        "input_size": (input_size, f"resolution {resolution}", "pass resolution = 8 x the input_size "
                                                               "wanted instead (the windows follow the resolution)")})


def _check_resolution(resolution) -> int:
    """``resolution`` as a Python int (a NumPy integer taken as the int it equals), or ValueError naming it."""
    if not is_int(resolution) or resolution < 8 or resolution % 8:
        raise ValueError(f"resolution: expected a positive multiple of 8 (pixels, 8x VAE), got {resolution!r}")
    return int(resolution)


# The official registry (models/sit_elit.py; docs/released_checkpoints.md §3.3): size -> (depth, hidden, heads,
# tail blocks = dit_decoder_depth). Patch 2, 4 and 8 variants share the sizes.
SIT_REGISTRY = {"XL": (28, 1152, 16, 4), "L": (24, 1024, 16, 4), "B": (12, 768, 12, 2), "S": (12, 384, 6, 2)}
SIT_PATCHES = (2, 4, 8)
_SIT_NAME = re.compile(r"^(?:ELIT-SiT-)?(XL|L|B|S)/(\d+)$")

# The switches of the released code (docs/released_checkpoints.md §3.2); elit_sit_config applies them.
RELEASED_SWITCHES = dict(
    block_qk_norm=False, interface_qk_norm="full_width", read_modulates_queries=False, write_prenorm=False,
    interface_mlp_bias=False, latent_group_pos=False, learned_interface_pos=True, latent_pos_rows=4096,
    timestep_scale=1.0, pos_embed_column_first=True, budget_core_only=True)


def parse_sit_name(name: str) -> tuple[str, int]:
    """``"ELIT-SiT-XL/2"`` or ``"XL/2"`` -> ``("XL", 2)``; ValueError naming ``name`` otherwise."""
    m = _SIT_NAME.match(name) if isinstance(name, str) else None
    if not m or int(m.group(2)) not in SIT_PATCHES:
        raise ValueError(f"name: unknown ELIT-SiT registry name {name!r}; known: "
                         + ", ".join(f"ELIT-SiT-{s}/{p}" for s in SIT_REGISTRY for p in SIT_PATCHES))
    return m.group(1), int(m.group(2))


def elit_sit_config(name: str = "XL/2", resolution: int = 256, *, encoder_depth: int = 8,
                    group_size: int | None = None, num_classes: int = 1000, **overrides) -> ElitConfig:
    """The released preset: ELIT-SiT ``name`` (``"XL/2"`` or ``"ELIT-SiT-XL/2"``; S/B/L/XL, patch 2/4/8).

    ``encoder_depth`` is the number of head blocks (train.py's default 8, which the released configs keep:
    8 head / 16 core / 4 tail for XL); the tail count comes from the registry. ``group_size`` is the window
    side (``elit_group_size``); None picks the released configs' value, 4 at 256px and 8 at 512px (16 groups
    of P = 16 or 64), and 4 (train.py's default) at other resolutions. J_max = P.

    >>> c = elit_sit_config("XL/2", 512); (c.n_head, c.core_blocks, c.n_tail, c.groups, c.latents_per_group)
    (8, 16, 4, 16, 64)
    """
    size, patch = parse_sit_name(name)
    resolution = _check_resolution(resolution)
    depth, hidden, heads, tail = SIT_REGISTRY[size]
    derived = group_size is None
    if derived:
        group_size = 8 if resolution == 512 else 4
    input_size = resolution // 8
    if input_size % patch:
        raise ValueError(f"resolution: {resolution}px gives a {input_size}x{input_size} latent, not divisible by patch {patch}")
    grid = input_size // patch
    if derived and grid % group_size:
        raise ValueError(f"resolution: {resolution}px gives {name} a {grid}x{grid} token grid, which the default "
                         f"group size {group_size} does not divide; pass group_size= a divisor of {grid}, or a "
                         f"resolution that is a multiple of {8 * patch * group_size} px")
    if not is_int(group_size) or group_size < 1 or grid % group_size:
        raise ValueError(f"group_size: {group_size!r} must be a positive int dividing the {grid}x{grid} token grid "
                         f"of {name} at {resolution}px")
    if not is_int(encoder_depth) or not 0 <= encoder_depth <= depth - tail:
        raise ValueError(f"encoder_depth: expected an int in [0, {depth - tail}] (head blocks of {name}), got {encoder_depth!r}")
    group_size, encoder_depth = int(group_size), int(encoder_depth)
    base = ElitConfig(hidden=hidden, depth=depth, heads=heads, patch=patch, input_size=input_size,
                      window=group_size, num_classes=num_classes, head_blocks=encoder_depth, tail_blocks=tail,
                      **RELEASED_SWITCHES)
    return _with_overrides(base, overrides, {
        "input_size": (input_size, f"resolution {resolution}", "pass resolution = 8 x the input_size wanted instead"),
        "patch": (patch, f"name {name!r}", "the patch is the registry name's (e.g. 'S/4')"),
        "window": (group_size, f"group_size {group_size if not derived else 'None (the default)'}",
                   "pass group_size= instead"),
        "head_blocks": (encoder_depth, f"encoder_depth {encoder_depth}", "pass encoder_depth= instead")})


PRESETS = ("paper", "released")


def preset_config(preset: str, name: str, resolution: int = 256) -> ElitConfig:
    """``elit_config(name, resolution)`` for ``"paper"``; for ``"released"``, ``elit_sit_config`` when ``name``
    is an official size (S/B/L/XL, encoder_depth 8 as train.py), else the paper sizes of ``name`` (e.g.
    ``tiny``) with the released switches. Used where one size is run under both presets (``elit-bench``)."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {PRESETS}, got {preset!r}")
    if preset == "paper":
        return elit_config(name, resolution)
    try:
        parse_sit_name(name)
    except ValueError:
        return elit_config(name, resolution, **RELEASED_SWITCHES)
    return elit_sit_config(name, resolution)
