"""Reference ELIT-DiT (and the plain DiT of the same size), ragged over per-sample budgets.

``patch embed -> head blocks (spatial) -> Read -> core blocks (latents) -> Write -> tail blocks
(spatial) -> final layer``. Spatial tokens live in group-major order from the patch embedding to the
un-patchify, so every Read/Write segment is a contiguous slice.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .._devices import device_problem
from ..attention import AttentionPlan, SegmentRuns, known_backends, value_checks_enabled
from ..layout import ElitLayout, TokenRuns, build_layout, normalize_budgets, from_group_major, group_major_permutation, to_group_major
from .blocks import DiTBlock, FinalLayer, ReadBlock, TimestepEmbedder, WriteBlock, sincos_2d, zero_output_layers
from .config import ElitConfig, elit_config  # noqa: F401  (elit_config: the doctest)
from ..elementwise import get_elementwise


class _Stem(nn.Module):
    """Patch embedding straight into group-major order, conditioning, and the final projection."""

    def __init__(self, cfg: ElitConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.hidden
        self.patch_embed = nn.Conv2d(cfg.in_channels, c, cfg.patch, cfg.patch)
        self.reset_buffers()
        self.t_embed = TimestepEmbedder(c, scale=cfg.timestep_scale)
        self.y_embed = nn.Embedding(cfg.num_classes + 1, c)  # the last id is the null class
        self.final = FinalLayer(c, cfg.patch * cfg.patch * cfg.in_channels)
        nn.init.normal_(self.y_embed.weight, std=0.02)

    def reset_buffers(self, device=None) -> None:
        """(Re)compute the fixed sin-cos table ``pos_embed`` ``[N, C]`` (group-major; not in the state_dict)."""
        cfg, c = self.cfg, self.cfg.hidden
        device = device if device is not None else self.patch_embed.weight.device
        pos = sincos_2d(c, cfg.grid, cfg.grid, cfg.pos_embed_column_first).T.reshape(1, c, cfg.grid, cfg.grid)
        self.register_buffer("pos_embed", to_group_major(pos, cfg.window)[0].to(device), persistent=False)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def check_inputs(self, x, t, y) -> None:
        """Shapes, dtypes and class ids, each error naming its argument (ValueError / TypeError)."""
        cfg = self.cfg
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (cfg.in_channels, cfg.input_size, cfg.input_size):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected [B, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}], got {got}")
        w = self.patch_embed.weight
        wdt = w.dtype
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor in the model's dtype ({wdt}), got {x.dtype}; "
                            f"pass x.to({wdt})")
        if x.dtype != wdt:
            raise TypeError(f"x: dtype {x.dtype} does not match the model's parameters ({wdt}); "
                            f"pass x.to({wdt}) or convert the model with model.to({x.dtype})")
        if x.device != w.device:
            raise ValueError(f"x: on device {x.device}, but the model's parameters are on {w.device}")
        b = x.shape[0]
        if not isinstance(t, torch.Tensor) or t.shape != (b,):
            raise ValueError(f"t: expected a tensor of shape [{b}] (one time in [0, 1] per sample), "
                             f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"t: expected a floating-point tensor (times in [0, 1]), got {t.dtype}")
        if not isinstance(y, torch.Tensor) or y.shape != (b,) or y.dtype not in (torch.int32, torch.int64):
            got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y: expected class ids of shape [{b}] as an int64 or int32 tensor (what nn.Embedding "
                             f"indexes with; convert others with y.long()), got {got}")
        for name, u in (("t", t), ("y", y)):
            if u.device != x.device:
                raise ValueError(f"{name}: on device {u.device}, but x is on {x.device}")
        if b and value_checks_enabled() and not _tracing():
            t_ok = "t: times must be in [0, 1] (finite)"
            y_ok = f"y: class ids must be in [0, {cfg.num_classes}] ({cfg.num_classes} = the null class)"
            if y.device.type == "cpu":  # reading CPU values costs no device sync
                lo, hi = int(y.min()), int(y.max())
                if lo < 0 or hi > cfg.num_classes:
                    raise ValueError(f"{y_ok}, got {lo if lo < 0 else hi}")
                if not bool(((t >= 0) & (t <= 1)).all()):
                    bad = t[~((t >= 0) & (t <= 1))][0].item()
                    raise ValueError(f"{t_ok}, got {bad}")
            elif y.device.type != "meta":  # on a GPU: checked on the device, no host sync
                torch._assert_async(((y >= 0) & (y <= cfg.num_classes)).all(), y_ok)
                torch._assert_async(((t >= 0) & (t <= 1)).all(), t_ok)

    def embed(self, x, t, y):
        """x ``[B, C_in, S, S]`` -> spatial tokens ``[B*N, C]`` (group-major) and conditioning ``c`` ``[B, C]``.

        Call ``check_inputs`` first."""
        cfg = self.cfg
        tokens = to_group_major(self.patch_embed(x), cfg.window) + self.pos_embed.to(x.dtype)
        c = self.t_embed(t) + self.y_embed(y)
        return tokens.reshape(-1, cfg.hidden), c

    def unpatchify(self, out, b):
        cfg, p = self.cfg, self.cfg.patch
        out = out.reshape(b, cfg.grid * cfg.grid, p * p * cfg.in_channels)
        img = from_group_major(out, cfg.grid, cfg.grid, cfg.window)  # [B, p*p*C, g, g]
        img = img.reshape(b, p, p, cfg.in_channels, cfg.grid, cfg.grid)
        return img.permute(0, 3, 4, 1, 5, 2).reshape(b, cfg.in_channels, cfg.input_size, cfg.input_size)


def _check_model_args(cfg, backend) -> None:
    """A model's constructor arguments, named when wrong (a backend name is checked against the registry now,
    not at the first forward)."""
    if not isinstance(cfg, ElitConfig):
        raise TypeError(f"cfg: expected an ElitConfig (elit_config(...) / elit_sit_config(...)), got "
                        f"{type(cfg).__name__}")
    if backend is not None and (not isinstance(backend, str) or backend not in known_backends()):
        raise ValueError(f"backend: unknown backend {backend!r}; known backends: {', '.join(known_backends())}")


def _tracing() -> bool:
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():  # adaLN-Zero: every modulation starts at zero (blocks are identities)
        if isinstance(m, (DiTBlock, ReadBlock, FinalLayer)):
            nn.init.zeros_(m.ada.weight)
            nn.init.zeros_(m.ada.bias)
        if isinstance(m, WriteBlock):
            zero_output_layers(m)
    if isinstance(module, (ElitDiT, PlainDiT)):
        nn.init.zeros_(module.stem.final.linear.weight)
        nn.init.zeros_(module.stem.final.linear.bias)


def _lru_get(cache: dict, key, size: int, make):
    """``cache[key]``, made with ``make()`` when missing; ``cache`` keeps at most ``size`` entries in order of use
    (most recent last), the least recently used dropped first."""
    value = cache.pop(key, None)
    if value is None:
        value = make()
        while len(cache) >= size:
            cache.pop(next(iter(cache)))
    cache[key] = value
    return value


def attention_plans(layout: ElitLayout) -> dict[str, AttentionPlan]:
    """The ``AttentionPlan`` of each attention of a forward over ``layout``: ``"image"`` (head/tail blocks),
    ``"read"``, ``"core"`` and ``"write"`` (from the layout's ``*_args``). Made on first use and kept with the
    layout (which ``ElitDiT.layout`` keeps per budget signature), so after a layout's first forward an attention
    call skips the argument checks and dispatch; under ``torch.compile`` tracing nothing is kept (a plan then is
    the plain ``varlen_attention`` call)."""
    plans = layout.__dict__.get("_attention_plans")
    if plans is None:
        plans = {name: AttentionPlan(*args[:4], segments=args[4]) for name, args in (
            ("image", layout.image_args), ("read", layout.read_args), ("core", layout.core_args),
            ("write", layout.write_args))}
        if not torch.compiler.is_compiling():
            layout.__dict__["_attention_plans"] = plans
    return plans


class ElitDiT(nn.Module):
    """ELIT-DiT: ``forward(x, t, y, budgets)`` with a (possibly different) latent budget per sample.

    x ``[B, C_in, S, S]`` latent images in the model's dtype, t ``[B]`` in [0, 1] (1 = noise), y ``[B]``
    class ids in [0, num_classes] (``null_class`` = num_classes for unconditional), budgets: None (J_max),
    an int, or one int per sample in [0, J_max] (latents per group; see ``elit_kernels.official.
    latents_for_budget`` for the released code's float budgets). Returns the velocity, x's shape and dtype.
    ``backend`` picks the ``varlen_attention`` backend; ``elementwise`` the adaLN op implementation.

    One code path serves both presets of ``ElitConfig`` (``elit_config``: the paper; ``elit_sit_config``:
    the released ELIT-SiT, loadable with ``elit_kernels.official.load_checkpoint``). Raises ValueError /
    TypeError naming ``x``, ``t``, ``y`` or ``budgets`` for bad inputs.

    >>> m = ElitDiT(elit_config("tiny", 64)); x = torch.randn(2, 4, 8, 8)
    >>> m(x, torch.rand(2), torch.tensor([1, 10]), budgets=[4, 1]).shape
    torch.Size([2, 4, 8, 8])
    """

    def __init__(self, cfg: ElitConfig, backend: str | None = None, elementwise: str = "native"):
        super().__init__()
        _check_model_args(cfg, backend)
        self.cfg, self.backend = cfg, backend
        self.elementwise = elementwise
        get_elementwise(elementwise)
        c, h = cfg.hidden, cfg.heads
        block_norm = "per_head" if cfg.block_qk_norm else None
        iface = dict(qk_norm=cfg.interface_qk_norm, mlp_bias=cfg.interface_mlp_bias)
        self.stem = _Stem(cfg)
        self.head = nn.ModuleList(DiTBlock(c, h, cfg.mlp_ratio, block_norm) for _ in range(cfg.n_head))
        self.read = ReadBlock(c, h, cfg.interface_mlp_ratio, modulate_queries=cfg.read_modulates_queries, **iface)
        self.core = nn.ModuleList(DiTBlock(c, h, cfg.mlp_ratio, block_norm) for _ in range(cfg.core_blocks))
        self.write = WriteBlock(c, h, cfg.interface_mlp_ratio, prenorm=cfg.write_prenorm, **iface)
        self.tail = nn.ModuleList(DiTBlock(c, h, cfg.mlp_ratio, block_norm) for _ in range(cfg.n_tail))
        # J learnable latent embeddings shared by all groups (they encode position inside the group).
        # Unit std, not DiT's 0.02: with ``latent_group_pos`` the sin-cos group position below has norm
        # ~sqrt(C/2), and 0.02-std embeddings vanish beside it, so a group's J latents would start almost
        # identical and the extra ones stay unused (measured in the demo: held-out loss flat across budgets).
        self.latent_embed = nn.Parameter(torch.randn(cfg.latents_per_group, c))
        if cfg.learned_interface_pos:  # the released code's tables (docs/released_checkpoints.md §3.2 steps 4, 7)
            p = cfg.tokens_per_group
            self.read_pos_embed = nn.Parameter(torch.randn(p, c) * 0.02)  # [P, C] added to Read's spatial side
            self.write_pos_embed = nn.Parameter(torch.randn(p, c) * 0.02)  # [P, C] added to Write's queries
            self.latent_pos_embed = nn.Parameter(torch.randn(cfg.latent_pos_rows, c) * 0.02)  # rows: raster index
        self.reset_buffers()
        _init_weights(self)

    def reset_buffers(self, device=None) -> None:
        """(Re)compute the fixed tables and index maps, which the state_dict does not hold (e.g. after
        building on the meta device and ``to_empty``)."""
        cfg = self.cfg
        device = device if device is not None else self.latent_embed.device
        self.stem.reset_buffers(device)
        if cfg.latent_group_pos:  # ours: the fixed sin-cos of the group's window, so the core knows where it lies
            gside = cfg.grid // cfg.window
            self.register_buffer("group_pos", sincos_2d(cfg.hidden, gside, gside).to(device), persistent=False)  # [G, C]
        if cfg.learned_interface_pos:  # slot (g, j) in group-major order -> raster index of its token
            perm = group_major_permutation(cfg.grid, cfg.grid, cfg.window)
            self.register_buffer("slot_raster_index", perm.to(device), persistent=False)

    @property
    def null_class(self) -> int:
        return self.stem.null_class

    #: layouts kept per budget signature (budgets, batch, device, inference mode), most recent last
    LAYOUT_CACHE_SIZE = 16

    def layout(self, budgets, batch: int, device) -> ElitLayout:
        """The ragged layout of one forward (budgets as in ``forward``), with this config's budget semantics.

        Eager calls keep the last ``LAYOUT_CACHE_SIZE`` layouts by budget signature (budgets, batch, device, and
        whether ``torch.inference_mode()`` is on): a sampling run (one signature for every step) builds its index
        tensors once and copies nothing to the device after that.
        Under ``torch.compile`` tracing the layout is built in the graph (its tensors become constants).

        ``device``: a ``torch.device`` or a device string; ValueError naming ``device`` when it is neither (None
        included) or names a device this machine cannot hold tensors on (checked when a layout is built)."""
        cfg = self.cfg
        if torch.compiler.is_compiling():
            return build_layout(budgets, batch, cfg.groups, cfg.tokens_per_group, cfg.latents_per_group,
                                device=device, budget_core_only=cfg.budget_core_only)
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: expected a torch.device or a device string such as 'cpu' or 'cuda:0', got "
                             f"{device!r} ({str(e).splitlines()[0]})") from None
        bud = normalize_budgets(budgets, batch, cfg.latents_per_group)
        # inference mode in the key: a layout made under torch.inference_mode() holds inference tensors, which a
        # forward that autograd records cannot use
        key = (tuple(bud), batch, str(dev), torch.is_inference_mode_enabled())

        def build():
            if why := device_problem(dev):
                raise ValueError(f"device: {why}")
            return build_layout(bud, batch, cfg.groups, cfg.tokens_per_group, cfg.latents_per_group, device=device,
                                budget_core_only=cfg.budget_core_only)

        return _lru_get(self.__dict__.setdefault("_layouts", {}), key, self.LAYOUT_CACHE_SIZE, build)

    def _add_in_group(self, tokens, table):
        """tokens ``[B*G*P, C]`` (group-major) + ``table[j]`` ``[P, C]`` for slot j of every group."""
        p = self.cfg.tokens_per_group
        return (tokens.view(-1, p, tokens.shape[-1]) + table.to(tokens.dtype)).view(tokens.shape)

    def forward(self, x, t, y, budgets=None, *, layout: ElitLayout | None = None):
        cfg = self.cfg
        self.stem.check_inputs(x, t, y)
        b = x.shape[0]
        if layout is not None and not isinstance(layout, ElitLayout):
            raise TypeError(f"layout: expected an ElitLayout (model.layout(budgets, batch, device)) or None, got "
                            f"{type(layout).__name__}")
        lay = layout if layout is not None else self.layout(budgets, b, x.device)
        if lay.batch != b:
            raise ValueError(f"layout: built for batch {lay.batch}, x has batch {b}")
        if layout is not None and budgets is not None and \
                normalize_budgets(budgets, b, cfg.latents_per_group) != list(lay.budgets):
            raise ValueError(f"budgets: {budgets!r} disagree with the layout's budgets {lay.budgets}; pass one of "
                             "them (the layout carries its budgets)")
        if layout is not None:  # a layout of ours (self.layout) is built on x's device with this config's sizes
            if lay.cu_core.device != x.device:
                raise ValueError(f"layout: built on device {lay.cu_core.device}, but x is on {x.device}; build it "
                                 f"with model.layout(budgets, {b}, x.device)")
            want = (cfg.groups, cfg.tokens_per_group, cfg.latents_per_group, cfg.budget_core_only)
            got = (lay.groups, lay.tokens_per_group, lay.j_max, lay.budget_core_only)
            if got != want:
                raise ValueError(f"layout: built for (groups, tokens_per_group, j_max, budget_core_only) = {got}, the "
                                 f"model needs {want}; build it with model.layout(budgets, batch, device)")
            if torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and not \
                    torch.compiler.is_compiling() and lay.cu_core.is_inference():
                raise ValueError("layout: built under torch.inference_mode(), so autograd cannot save its index "
                                 "tensors; build it outside inference mode for a forward with gradients (or run this "
                                 "forward under torch.no_grad() / torch.inference_mode())")
        ew, be = get_elementwise(self.elementwise), self.backend
        plans = attention_plans(lay)
        s, c = self.stem.embed(x, t, y)
        sp_runs = lay.spatial_runs
        for blk in self.head:
            s = blk(s, c, sp_runs, plans["image"], ew, be)
        if cfg.learned_interface_pos:  # the Write later starts from this s too
            s = self._add_in_group(s, self.read_pos_embed)
        # Read: the latents Read and Write see (all J_max per group under the official budget semantics).
        ia = lay.interface_layout
        lat = self.latent_embed[ia.latent_index]
        if cfg.latent_group_pos:
            lat = lat + self.group_pos[ia.latent_group]
        lat = self.read(lat.to(s.dtype), s, c, ia.latent_runs, sp_runs, plans["read"], ew, be)
        if cfg.learned_interface_pos:
            slot = ia.latent_group * cfg.tokens_per_group + ia.latent_index
            lat = lat + self.latent_pos_embed[self.slot_raster_index[slot]].to(lat.dtype)
        # Core: the first J_b latents of each group of sample b; dropped ones keep their Read values.
        core = lat[lay.pack_index] if lay.interface is not None else lat
        for blk in self.core:
            core = blk(core, c, lay.latent_runs, plans["core"], ew, be)
        lat = lat.index_copy(0, lay.pack_index, core) if lay.interface is not None else core
        sq = self._add_in_group(s, self.write_pos_embed) if cfg.learned_interface_pos else s
        s = self.write(sq, lat, plans["write"], be)
        for blk in self.tail:
            s = blk(s, c, sp_runs, plans["image"], ew, be)
        return self.stem.unpatchify(self.stem.final(s, c, sp_runs, ew), b)


class PlainDiT(nn.Module):
    """The plain DiT of the same config (all ``depth`` blocks on spatial tokens, no interface).

    ``forward(x, t, y, budgets=None)``: budgets is accepted for a uniform call signature and must be None."""

    def __init__(self, cfg: ElitConfig, backend: str | None = None, elementwise: str = "native"):
        super().__init__()
        _check_model_args(cfg, backend)
        self.cfg, self.backend, self.elementwise = cfg, backend, elementwise
        get_elementwise(elementwise)
        self.stem = _Stem(cfg)
        norm = "per_head" if cfg.block_qk_norm else None
        self.blocks = nn.ModuleList(DiTBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio, norm) for _ in range(cfg.depth))
        _init_weights(self)

    @property
    def null_class(self) -> int:
        return self.stem.null_class

    def _plan(self, b: int, n: int, device) -> AttentionPlan:
        """The self-attention plan of a batch of ``b`` (one segment of ``n`` tokens per sample), kept per (batch,
        device) in eager mode, as ``ElitDiT.layout`` keeps layouts (the last ``LAYOUT_CACHE_SIZE``, least recently used
        out first): later forwards build and check nothing."""
        def make():
            cu = torch.arange(0, (b + 1) * n, n, device=device, dtype=torch.int32)
            return AttentionPlan(cu, cu, n, n, segments=SegmentRuns.uniform_runs(b, n, n))

        if torch.compiler.is_compiling():
            return make()
        key = (b, str(torch.device(device)), torch.is_inference_mode_enabled())  # as ElitDiT.layout's key
        return _lru_get(self.__dict__.setdefault("_plans", {}), key, ElitDiT.LAYOUT_CACHE_SIZE, make)

    def forward(self, x, t, y, budgets=None):
        if budgets is not None:
            raise ValueError("budgets: a plain DiT has no latent interface; pass None")
        self.stem.check_inputs(x, t, y)
        b, cfg = x.shape[0], self.cfg
        ew = get_elementwise(self.elementwise)
        s, c = self.stem.embed(x, t, y)
        n = cfg.grid * cfg.grid
        runs = TokenRuns(((0, b * n, 0, b),) if b else (), b * n, b, x.device)
        plan = self._plan(b, n, x.device)
        for blk in self.blocks:
            s = blk(s, c, runs, plan, ew, self.backend)
        return self.stem.unpatchify(self.stem.final(s, c, runs, ew), b)
