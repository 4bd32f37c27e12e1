"""The official code's way of running an ELIT model, as a baseline: dense SDPA on reshaped tensors.

It reuses an ``ElitDiT``'s weights (no copy) but runs the way github.com/snap-research/elit does
(docs/released_checkpoints.md §3.2): spatial tokens in row-major order,
window partition to ``(B·G, P, C)`` by reshape/permute copies, every attention a dense
``F.scaled_dot_product_attention`` over ``[batch, H, L, D]``, the Write output scattered back to row-major,
and **one budget for the whole batch** (a list of equal budgets is accepted, so ``flow.guided_velocity``
can drive it for CFG and two-pass CCFG; one-pass CCFG needs a ragged batch and is not possible here).

Both presets run as their code does:
- released (``budget_core_only``): Read computes all P latents of every group at every budget, the kept J
  per group are gathered for the core and scattered back, and Write attends to all P;
- paper: Read, core and Write see the kept J latents only.

For equal budgets its output equals ``ElitDiT``'s up to float rounding (tests/test_bench.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._types import is_int
from ..layout import group_major_permutation, inverse_permutation
from ..models import ElitDiT
from .flops import active_counters


def _modulate(x, shift, scale, eps=1e-6):
    """adaLN on ``[B, L, C]`` with per-sample ``[B, C]`` shift/scale: broadcast, no token->sample gather."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None]) + shift[:, None]


class OfficialStyleElit(nn.Module):
    """Wraps ``elit`` (an ElitDiT); ``forward(x, t, y, budgets)`` with one budget for the batch.

    ``budgets``: None (J_max), an int, or a sequence of equal ints, each in [1, J_max] (the official code
    asserts a budget of at least one latent per group).
    """

    def __init__(self, elit: ElitDiT):
        super().__init__()
        self.elit = elit
        self.cfg = elit.cfg
        self.backend = None  # attention here is always dense SDPA; the attribute is for uniform handling
        cfg = self.cfg
        perm = group_major_permutation(cfg.grid, cfg.grid, cfg.window)
        pos_rm = elit.stem.pos_embed[inverse_permutation(perm).to(elit.stem.pos_embed.device)]
        self.register_buffer("pos_embed_rm", pos_rm, persistent=False)  # [N, C] row-major

    @property
    def null_class(self) -> int:
        return self.elit.null_class

    def _budget(self, budgets, batch: int) -> int:
        jm = self.cfg.latents_per_group
        if budgets is None:
            return jm
        if is_int(budgets):
            js = [int(budgets)]
        else:
            js = [int(b) for b in budgets]
            if len(js) != batch:
                raise ValueError(f"budgets: expected {batch} budgets (one per sample), got {len(js)}")
        if len(set(js)) != 1:
            raise ValueError(f"budgets: the official-style path needs one budget for the whole batch, got {sorted(set(js))}")
        j = js[0]
        if not 1 <= j <= jm:
            raise ValueError(f"budgets: each budget must be in [1, {jm}] for the dense path, got {j}")
        return j

    # --- dense building blocks ---------------------------------------------------------------
    def _attention(self, attn, x, ctx):
        """x ``[Bq, Lq, C]``, ctx ``[Bq, Lk, C]`` -> ``[Bq, Lq, C]`` through one dense SDPA call."""
        bq, lq, _ = x.shape
        q, k, v = attn.project(x, ctx)  # [Bq, L, H, D], normed as the module is configured
        counters = active_counters()
        if counters:  # FLOP counting: attention is counted analytically (see flops.py)
            for counter in counters:
                counter.add_dense(bq, lq, ctx.shape[1], attn.heads, attn.head_dim)
            o = torch.zeros_like(q)
        else:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return attn.proj(o.reshape(bq, lq, -1))

    def _dit_block(self, blk, x, c):
        sh1, sc1, g1, sh2, sc2, g2 = blk.ada(F.silu(c)).chunk(6, dim=-1)
        h = _modulate(x, sh1, sc1)
        x = x + g1[:, None] * self._attention(blk.attn, h, h)
        return x + g2[:, None] * blk.mlp(_modulate(x, sh2, sc2))

    def _partition(self, s):
        """Row-major ``[B, N, C]`` -> ``[B·G, P, C]`` windows (a copy, as the official code)."""
        cfg = self.cfg
        b, c, w, gs = s.shape[0], s.shape[-1], cfg.window, cfg.grid // cfg.window
        s = s.reshape(b, gs, w, gs, w, c).permute(0, 1, 3, 2, 4, 5)
        return s.reshape(b * gs * gs, w * w, c)

    def _unpartition(self, s, b):
        cfg = self.cfg
        c, w, gs = s.shape[-1], cfg.window, cfg.grid // cfg.window
        s = s.reshape(b, gs, gs, w, w, c).permute(0, 1, 3, 2, 4, 5)
        return s.reshape(b, cfg.grid * cfg.grid, c)

    def _read(self, lat, sp, c, b):
        """lat ``[B·G, J, C]`` <- sp ``[B·G, P, C]`` (the Read block's weights, dense)."""
        rd, g = self.elit.read, self.cfg.groups
        chunks = rd.ada(F.silu(c)).chunk(8 if rd.modulate_queries else 6, dim=-1)
        lat = lat.reshape(b, -1, lat.shape[-1])  # [B, G·J, C]: per-sample modulation broadcasts
        if rd.modulate_queries:
            hq, chunks = _modulate(lat, chunks[0], chunks[1]), chunks[2:]
        else:
            hq = lat
        shk, sck, g1, sh2, sc2, g2 = chunks
        hk = _modulate(sp.reshape(b, -1, sp.shape[-1]), shk, sck).reshape(sp.shape)
        att = self._attention(rd.attn, hq.reshape(b * g, -1, hq.shape[-1]), hk)
        lat = lat + g1[:, None] * att.reshape(lat.shape)
        lat = lat + g2[:, None] * rd.mlp(_modulate(lat, sh2, sc2))
        return lat.reshape(b * g, -1, lat.shape[-1])

    def forward(self, x, t, y, budgets=None):
        m, cfg = self.elit, self.cfg
        b = x.shape[0]
        j = self._budget(budgets, b)
        g, p, pg = cfg.groups, cfg.patch, cfg.tokens_per_group
        s = m.stem.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed_rm.to(x.dtype)  # [B, N, C]
        c = m.stem.t_embed(t) + m.stem.y_embed(y)
        for blk in m.head:
            s = self._dit_block(blk, s, c)
        sp = self._partition(s)  # [B·G, P, C]
        if cfg.learned_interface_pos:
            sp = sp + m.read_pos_embed.to(sp.dtype)
        # Read: all P latents of every group (released) or the kept J (paper).
        jr = cfg.latents_per_group if cfg.budget_core_only else j
        lat = m.latent_embed[:jr][None]  # [1, J_r, C]
        if cfg.latent_group_pos:
            lat = lat + m.group_pos[:, None]  # [G, J_r, C]
        lat = lat.to(s.dtype).expand(g, -1, -1).unsqueeze(0).expand(b, -1, -1, -1).reshape(b * g, jr, -1)
        lat = self._read(lat, sp, c, b)
        if cfg.learned_interface_pos:
            lpos = m.latent_pos_embed[m.slot_raster_index].view(g, pg, -1)[:, :jr].to(lat.dtype)  # [G, J_r, C]
            lat = (lat.view(b, g, jr, -1) + lpos).view(b * g, jr, -1)
        # Core: all kept latents of a sample; gathered from and scattered back into the full grid (released).
        if jr != j:
            full = lat.view(b, g, jr, -1)
            core = full[:, :, :j].reshape(b, g * j, -1)
        else:
            core = lat.reshape(b, g * j, -1)
        for blk in m.core:
            core = self._dit_block(blk, core, c)
        if jr != j:
            full = full.clone()
            full[:, :, :j] = core.view(b, g, j, -1)
            lat = full.reshape(b * g, jr, -1)
        else:
            lat = core.reshape(b * g, j, -1)
        # Write: spatial tokens of each window attend to their group's latents, then scatter back.
        wr = m.write
        if cfg.learned_interface_pos:
            sp = sp + m.write_pos_embed.to(sp.dtype)
        sp = sp + self._attention(wr.attn, wr.norm_q(sp), wr.norm_kv(lat))
        sp = sp + wr.mlp(wr.norm_mlp(sp))
        s = self._unpartition(sp, b)
        for blk in m.tail:
            s = self._dit_block(blk, s, c)
        sh, sc = m.stem.final.ada(F.silu(c)).chunk(2, dim=-1)
        out = m.stem.final.linear(_modulate(s, sh, sc))  # [B, N, p·p·C_in]
        gr, ci = cfg.grid, cfg.in_channels
        out = out.reshape(b, gr, gr, p, p, ci).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, ci, cfg.input_size, cfg.input_size)
