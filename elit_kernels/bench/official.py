"""An official-style ELIT forward, as a baseline: dense SDPA on reshaped tensors, one budget per batch.

It reuses an ``ElitDiT``'s weights (no copy) but runs the way the official code does (ELIT_SPEC,
"What the official code does"): spatial tokens in row-major order, window partition to
``(B·G, P, C)`` by reshape/permute copies, the kept latents sliced out of a dense ``[B, G, J_max, C]``
grid, every attention a dense ``F.scaled_dot_product_attention`` over ``[batch, H, L, D]``, and the
Write output scattered back to row-major. It therefore needs one budget for the whole batch (a list
of equal budgets is accepted, so ``flow.guided_velocity`` can drive it for CFG and two-pass CCFG).

For equal budgets its output equals ``ElitDiT``'s up to float rounding (tests/test_bench.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layout import group_major_permutation, inverse_permutation
from ..models import ElitDiT
from .flops import active_counter


def _modulate(x, shift, scale, eps=1e-6):
    """adaLN on ``[B, L, C]`` with per-sample ``[B, C]`` shift/scale: broadcast, no token->sample gather."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None]) + shift[:, None]


class OfficialStyleElit(nn.Module):
    """Wraps ``elit`` (an ElitDiT); ``forward(x, t, y, budgets)`` with one budget for the batch.

    ``budgets``: None (J_max), an int, or a sequence of equal ints, each in [1, J_max].
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
        if isinstance(budgets, int) and not isinstance(budgets, bool):
            js = [budgets]
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
        lk = ctx.shape[1]
        h, d = attn.heads, attn.head_dim
        q = attn.q_norm(attn.q(x).view(bq, lq, h, d))
        k, v = attn.kv(ctx).view(bq, lk, 2, h, d).unbind(2)
        k = attn.k_norm(k)
        counter = active_counter()
        if counter is not None:  # FLOP counting: attention is counted analytically (see flops.py)
            counter.add_dense(bq, lq, lk, h, d)
            o = torch.zeros_like(q)
        else:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return attn.proj(o.reshape(bq, lq, h * d))

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

    def forward(self, x, t, y, budgets=None):
        m, cfg = self.elit, self.cfg
        b = x.shape[0]
        j = self._budget(budgets, b)
        g, p = cfg.groups, cfg.patch
        s = m.stem.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed_rm.to(x.dtype)  # [B, N, C]
        c = m.stem.t_embed(t) + m.stem.y_embed(y)
        for blk in m.head:
            s = self._dit_block(blk, s, c)
        # Read: latents of each (sample, group) attend to that group's spatial tokens.
        grid = (m.latent_embed[None] + m.group_pos[:, None]).to(s.dtype)  # [G, J_max, C]
        lat = grid[:, :j].unsqueeze(0).expand(b, -1, -1, -1).reshape(b, g * j, -1)  # kept latents
        sp = self._partition(s)  # [B·G, P, C]
        rd = m.read
        shq, scq, shk, sck, g1, sh2, sc2, g2 = rd.ada(F.silu(c)).chunk(8, dim=-1)
        hq = _modulate(lat, shq, scq).reshape(b * g, j, -1)
        hk = _modulate(sp.reshape(b, -1, sp.shape[-1]), shk, sck).reshape(b * g, -1, sp.shape[-1])
        lat = lat + g1[:, None] * self._attention(rd.attn, hq, hk).reshape(b, g * j, -1)
        lat = lat + g2[:, None] * rd.mlp(_modulate(lat, sh2, sc2))
        for blk in m.core:  # all G·J latents of a sample
            lat = self._dit_block(blk, lat, c)
        # Write: spatial tokens of each window attend to their group's latents, then scatter back.
        wr = m.write
        lat_w = wr.norm_kv(lat).reshape(b * g, j, -1)
        sp = sp + self._attention(wr.attn, wr.norm_q(sp), lat_w)
        sp = sp + wr.mlp(wr.norm_mlp(sp))
        s = self._unpartition(sp, b)
        for blk in m.tail:
            s = self._dit_block(blk, s, c)
        sh, sc = m.stem.final.ada(F.silu(c)).chunk(2, dim=-1)
        out = m.stem.final.linear(_modulate(s, sh, sc))  # [B, N, p·p·C_in]
        gr, ci = cfg.grid, cfg.in_channels
        out = out.reshape(b, gr, gr, p, p, ci).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, ci, cfg.input_size, cfg.input_size)
