"""Reference ELIT-DiT (and the plain DiT of the same size), ragged over per-sample budgets.

``patch embed -> head blocks (spatial) -> Read -> core blocks (latents) -> Write -> tail blocks
(spatial) -> final layer``. Spatial tokens live in group-major order from the patch embedding to the
un-patchify, so every Read/Write segment is a contiguous slice.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn

from ..layout import ElitLayout, build_layout, from_group_major, to_group_major
from .blocks import DiTBlock, FinalLayer, ReadBlock, TimestepEmbedder, WriteBlock, sincos_2d
from .ops import get_elementwise


@dataclass(frozen=True)
class ElitConfig:
    hidden: int = 384
    depth: int = 12
    heads: int = 6
    patch: int = 2
    in_channels: int = 4
    input_size: int = 32  # latent image side (256px with an 8x VAE)
    window: int = 4  # window side in tokens: 16x16 tokens -> 4x4 = 16 groups of 16 tokens
    j_max: int | None = None  # latents per group; None = tokens per group (K_max = N)
    num_classes: int = 1000
    head_blocks: int | None = None  # None = the paper's split for the depth
    tail_blocks: int | None = None
    mlp_ratio: float = 4.0
    interface_mlp_ratio: float = 1.0

    def __post_init__(self):
        for name in ("hidden", "depth", "heads", "patch", "in_channels", "input_size", "window", "num_classes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.input_size % self.patch:
            raise ValueError(f"patch: {self.patch} must divide input_size {self.input_size}")
        if self.grid % self.window:
            raise ValueError(f"window: {self.window} must divide the token grid side {self.grid}")
        if self.hidden % self.heads:
            raise ValueError(f"heads: {self.heads} must divide hidden {self.hidden}")
        if self.core_blocks < 0:
            raise ValueError(f"head_blocks/tail_blocks: {self.n_head}+{self.n_tail} exceed depth {self.depth}")

    @property
    def grid(self) -> int:
        return self.input_size // self.patch

    @property
    def groups(self) -> int:
        return (self.grid // self.window) ** 2

    @property
    def tokens_per_group(self) -> int:
        return self.window ** 2

    @property
    def latents_per_group(self) -> int:
        return self.j_max if self.j_max is not None else self.tokens_per_group

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
    # The paper: 4-20-4 for 28 blocks, 3-6-3 for 12; ours for other depths: a quarter, at most 4.
    return {28: 4, 12: 3}.get(depth, min(4, depth // 4))


_SIZES = {"S/2": (384, 12, 6), "B/2": (768, 12, 12), "L/2": (1024, 24, 16), "XL/2": (1152, 28, 16),
          "tiny": (64, 3, 2)}


def elit_config(name: str, resolution: int = 256, **overrides) -> ElitConfig:
    """A named config (S/2, B/2, L/2, XL/2, or ``tiny`` for tests) at 256 or 512 px.

    Windows follow the paper's 16 groups: 4x4 tokens at 256px, 8x8 at 512px (``tiny``: 4 groups).

    >>> c = elit_config("XL/2", 512); (c.hidden, c.heads, c.groups, c.latents_per_group, c.n_head, c.core_blocks)
    (1152, 16, 16, 64, 4, 20)
    """
    if name not in _SIZES:
        raise ValueError(f"name: unknown config {name!r}; known: {', '.join(_SIZES)}")
    if resolution % 8:
        raise ValueError(f"resolution: {resolution} must be a multiple of 8 (8x VAE)")
    hidden, depth, heads = _SIZES[name]
    input_size = resolution // 8
    window = max(1, (input_size // 2) // 4)  # 16 groups on a 4x4 grid of windows
    base = ElitConfig(hidden=hidden, depth=depth, heads=heads, input_size=input_size, window=window)
    if name == "tiny":  # ours, for tests and demos: 2x2 windows (4 groups) so budgets stay meaningful
        base = replace(base, head_blocks=1, tail_blocks=1, num_classes=10, window=max(1, (input_size // 2) // 2))
    return replace(base, **overrides)


class _Stem(nn.Module):
    """Patch embedding straight into group-major order, conditioning, and the final projection."""

    def __init__(self, cfg: ElitConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.hidden
        self.patch_embed = nn.Conv2d(cfg.in_channels, c, cfg.patch, cfg.patch)
        pos = sincos_2d(c, cfg.grid, cfg.grid).T.reshape(1, c, cfg.grid, cfg.grid)
        self.register_buffer("pos_embed", to_group_major(pos, cfg.window)[0], persistent=False)  # [N, C]
        self.t_embed = TimestepEmbedder(c)
        self.y_embed = nn.Embedding(cfg.num_classes + 1, c)  # the last id is the null class
        self.final = FinalLayer(c, cfg.patch * cfg.patch * cfg.in_channels)
        nn.init.normal_(self.y_embed.weight, std=0.02)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def embed(self, x, t, y):
        cfg = self.cfg
        if x.dim() != 4 or tuple(x.shape[1:]) != (cfg.in_channels, cfg.input_size, cfg.input_size):
            raise ValueError(f"x: expected [B, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}], got {tuple(x.shape)}")
        b = x.shape[0]
        if t.shape != (b,):
            raise ValueError(f"t: expected shape [{b}], got {tuple(t.shape)}")
        if y.shape != (b,) or y.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"y: expected integer class ids of shape [{b}], got {y.dtype} {tuple(y.shape)}")
        tokens = to_group_major(self.patch_embed(x), cfg.window) + self.pos_embed.to(x.dtype)
        c = self.t_embed(t) + self.y_embed(y)
        return tokens.reshape(-1, cfg.hidden), c

    def unpatchify(self, out, b):
        cfg, p = self.cfg, self.cfg.patch
        out = out.reshape(b, cfg.grid * cfg.grid, p * p * cfg.in_channels)
        img = from_group_major(out, cfg.grid, cfg.grid, cfg.window)  # [B, p*p*C, g, g]
        img = img.reshape(b, p, p, cfg.in_channels, cfg.grid, cfg.grid)
        return img.permute(0, 3, 4, 1, 5, 2).reshape(b, cfg.in_channels, cfg.input_size, cfg.input_size)


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    for m in module.modules():  # adaLN-Zero: every modulation starts at zero (blocks are identities)
        if isinstance(m, (DiTBlock, ReadBlock, FinalLayer)):
            nn.init.zeros_(m.ada.weight)
            nn.init.zeros_(m.ada.bias)
        if isinstance(m, WriteBlock):
            for lin in (m.attn.proj, m.mlp.fc2):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
    if isinstance(module, (ElitDiT, PlainDiT)):
        nn.init.zeros_(module.stem.final.linear.weight)
        nn.init.zeros_(module.stem.final.linear.bias)


class ElitDiT(nn.Module):
    """ELIT-DiT: ``forward(x, t, y, budgets)`` with a (possibly different) latent budget per sample.

    x ``[B, C_in, S, S]`` latent images, t ``[B]`` in [0, 1], y ``[B]`` class ids (``null_class`` for
    unconditional), budgets: None (J_max), an int, or one int per sample in [0, J_max].
    ``backend`` picks the ``varlen_attention`` backend; ``elementwise`` the adaLN op implementation.

    >>> m = ElitDiT(elit_config("tiny", 64)); x = torch.randn(2, 4, 8, 8)
    >>> m(x, torch.rand(2), torch.tensor([1, 2]), budgets=[4, 1]).shape
    torch.Size([2, 4, 8, 8])
    """

    def __init__(self, cfg: ElitConfig, backend: str | None = None, elementwise: str = "reference"):
        super().__init__()
        self.cfg, self.backend = cfg, backend
        self.elementwise = elementwise
        get_elementwise(elementwise)
        c, h = cfg.hidden, cfg.heads
        self.stem = _Stem(cfg)
        self.head = nn.ModuleList(DiTBlock(c, h, cfg.mlp_ratio) for _ in range(cfg.n_head))
        self.read = ReadBlock(c, h, cfg.interface_mlp_ratio)
        self.core = nn.ModuleList(DiTBlock(c, h, cfg.mlp_ratio) for _ in range(cfg.core_blocks))
        self.write = WriteBlock(c, h, cfg.interface_mlp_ratio)
        self.tail = nn.ModuleList(DiTBlock(c, h, cfg.mlp_ratio) for _ in range(cfg.n_tail))
        # J learnable latent embeddings shared by all groups (they encode position inside the group);
        # ours: plus the fixed sin-cos embedding of the group's window, so core attention knows where
        # each latent's group lies.
        # Unit std, not DiT's 0.02: the sin-cos group position below has norm ~sqrt(C/2), and 0.02-std
        # embeddings vanish beside it, so a group's J latents would start almost identical and the
        # extra ones stay unused (measured in the demo: held-out loss flat across budgets after 1000 steps).
        self.latent_embed = nn.Parameter(torch.randn(cfg.latents_per_group, c))
        gside = cfg.grid // cfg.window
        self.register_buffer("group_pos", sincos_2d(c, gside, gside), persistent=False)  # [G, C]
        _init_weights(self)

    @property
    def null_class(self) -> int:
        return self.stem.null_class

    def layout(self, budgets, batch: int, device) -> ElitLayout:
        cfg = self.cfg
        return build_layout(budgets, batch, cfg.groups, cfg.tokens_per_group, cfg.latents_per_group, device=device)

    def forward(self, x, t, y, budgets=None, *, layout: ElitLayout | None = None):
        b = x.shape[0]
        lay = layout if layout is not None else self.layout(budgets, b, x.device)
        if lay.batch != b:
            raise ValueError(f"layout: built for batch {lay.batch}, x has batch {b}")
        ew, be = get_elementwise(self.elementwise), self.backend
        s, c = self.stem.embed(x, t, y)
        sp_index = lay.spatial_sample(x.device)
        for blk in self.head:
            s = blk(s, c, sp_index, lay.image_args, ew, be)
        lat = (self.latent_embed[lay.latent_index] + self.group_pos[lay.latent_group]).to(s.dtype)
        lat = self.read(lat, s, c, lay.latent_sample, sp_index, lay.read_args, ew, be)
        for blk in self.core:
            lat = blk(lat, c, lay.latent_sample, lay.core_args, ew, be)
        s = self.write(s, lat, lay.write_args, be)
        for blk in self.tail:
            s = blk(s, c, sp_index, lay.image_args, ew, be)
        return self.stem.unpatchify(self.stem.final(s, c, sp_index, ew), b)


class PlainDiT(nn.Module):
    """The plain DiT of the same config (all ``depth`` blocks on spatial tokens, no interface).

    ``forward(x, t, y, budgets=None)``: budgets is accepted for a uniform call signature and must be None."""

    def __init__(self, cfg: ElitConfig, backend: str | None = None, elementwise: str = "reference"):
        super().__init__()
        self.cfg, self.backend, self.elementwise = cfg, backend, elementwise
        get_elementwise(elementwise)
        self.stem = _Stem(cfg)
        self.blocks = nn.ModuleList(DiTBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        _init_weights(self)

    @property
    def null_class(self) -> int:
        return self.stem.null_class

    def forward(self, x, t, y, budgets=None):
        if budgets is not None:
            raise ValueError("budgets: a plain DiT has no latent interface; pass None")
        b, cfg = x.shape[0], self.cfg
        ew = get_elementwise(self.elementwise)
        s, c = self.stem.embed(x, t, y)
        n = cfg.grid * cfg.grid
        idx = torch.arange(b, device=x.device).repeat_interleave(n)
        cu = torch.arange(0, (b + 1) * n, n, device=x.device, dtype=torch.int32)
        for blk in self.blocks:
            s = blk(s, c, idx, (cu, cu, n, n), ew, self.backend)
        return self.stem.unpatchify(self.stem.final(s, c, idx, ew), b)


def config_dict(cfg: ElitConfig) -> dict:
    return asdict(cfg)
