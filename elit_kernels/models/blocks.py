"""Building blocks of the reference ELIT-DiT: every token tensor is packed ``[tokens, C]``.

Spatial tokens of B samples are ``[B*N, C]`` (sample-major, group-major inside a sample); latents of a
ragged batch are ``[T, C]``. adaLN conditioning is per sample and reaches each token through a
token->sample index, so the same block code serves uniform and ragged batches. Every attention is
``varlen_attention`` with the cu_seqlens of the ElitLayout.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import varlen_attention
from .ops import ElementwiseImpl


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned gain (QK-norm inside attention)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention with QK RMSNorm over packed ragged segments."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: {heads} must divide hidden size {dim}")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ctx, cu_q, cu_k, max_q: int, max_k: int, backend=None):
        h, d = self.heads, self.head_dim
        q = self.q_norm(self.q(x).view(-1, h, d))
        k, v = self.kv(ctx).view(-1, 2, h, d).unbind(1)
        k = self.k_norm(k)
        o = varlen_attention(q, k, v.contiguous(), cu_q, cu_k, max_q, max_k, backend=backend)
        return self.proj(o.reshape(-1, h * d))


class DiTBlock(nn.Module):
    """adaLN-Zero DiT block (self-attention + MLP) on packed tokens; ``index`` maps token -> sample."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x, c, index, attn_args, ew: ElementwiseImpl, backend=None):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        h = ew.layernorm_modulate(x, sh1, sc1, index, 1e-6)
        x = ew.gated_residual(x, self.attn(h, h, *attn_args, backend=backend), g1, index)
        h = ew.layernorm_modulate(x, sh2, sc2, index, 1e-6)
        return ew.gated_residual(x, self.mlp(h), g2, index)


class ReadBlock(nn.Module):
    """Latents <- spatial tokens of their group: adaLN-Zero cross-attention + MLP (ratio 1)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 1.0):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # shift/scale for latents (q side) and spatial (kv side), gate; then shift/scale/gate for MLP.
        self.ada = nn.Linear(dim, 8 * dim)

    def forward(self, lat, spatial, c, lat_index, sp_index, read_args, ew: ElementwiseImpl, backend=None):
        shq, scq, shk, sck, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(8, dim=-1)
        hq = ew.layernorm_modulate(lat, shq, scq, lat_index, 1e-6)
        hk = ew.layernorm_modulate(spatial, shk, sck, sp_index, 1e-6)
        lat = ew.gated_residual(lat, self.attn(hq, hk, *read_args, backend=backend), g1, lat_index)
        h = ew.layernorm_modulate(lat, sh2, sc2, lat_index, 1e-6)
        return ew.gated_residual(lat, self.mlp(h), g2, lat_index)


class WriteBlock(nn.Module):
    """Spatial tokens <- their group's latents: residual cross-attention + MLP (ratio 1), no adaLN.

    The output projection and the MLP's last layer start at zero (as the official code), so a fresh
    Write block is the identity."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 1.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=1e-6)
        self.norm_kv = nn.LayerNorm(dim, eps=1e-6)
        self.norm_mlp = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        for lin in (self.attn.proj, self.mlp.fc2):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, spatial, lat, write_args, backend=None):
        spatial = spatial + self.attn(self.norm_q(spatial), self.norm_kv(lat), *write_args, backend=backend)
        return spatial + self.mlp(self.norm_mlp(spatial))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.ada = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, c, index, ew: ElementwiseImpl):
        sh, sc = self.ada(F.silu(c)).chunk(2, dim=-1)
        return self.linear(ew.layernorm_modulate(x, sh, sc, index, 1e-6))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features (of 1000·t, as DiT's integer steps) -> MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``[h*w, dim]`` in row-major order (DiT's)."""
    if dim % 4:
        raise ValueError(f"hidden: {dim} must be divisible by 4 for 2-D sin-cos embeddings")
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def emb(pos):
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([emb(ys), emb(xs)], dim=1).float()
