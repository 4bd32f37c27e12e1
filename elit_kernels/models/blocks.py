"""Building blocks of the reference ELIT-DiT: every token tensor is packed ``[tokens, C]``.

Spatial tokens of B samples are ``[B*N, C]`` (sample-major, group-major inside a sample; the memory of a
``[B, N, C]`` batch); latents of a ragged batch are ``[T, C]``. adaLN conditioning is per sample and reaches
the tokens through the layout's ``TokenRuns`` (runs of equal-length samples, viewed ``[samples, L, C]`` so the
``[B, C]`` parameters broadcast), so the same block code serves uniform and ragged batches. Every attention
is ``varlen_attention`` over the ElitLayout's cu_seqlens, through the layout's ``AttentionPlan`` of that call.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention import AttentionPlan
from ..elementwise import ElementwiseImpl


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned gain ``[dim]`` (the QK-norm inside attention).

    ``eps_outside_root=False`` (the paper preset): ``x * rsqrt(mean(x²) + eps)``. ``True`` (the released
    ELIT-SiT Read/Write attention, docs/released_checkpoints.md §3.2 step 5): ``x / (sqrt(mean(x²)) + eps)``.
    """

    def __init__(self, dim: int, eps: float = 1e-6, eps_outside_root: bool = False):
        super().__init__()
        self.eps, self.eps_outside_root = eps, eps_outside_root
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 for half types, fp64 stays fp64
        ms = xf.pow(2).mean(-1, keepdim=True)
        xf = xf / (ms.sqrt() + self.eps) if self.eps_outside_root else xf * torch.rsqrt(ms + self.eps)
        return xf.to(x.dtype) * self.weight.to(x.dtype)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


QK_NORMS = (None, "per_head", "full_width")


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention over packed ragged segments.

    ``qk_norm``: None; ``"per_head"`` RMSNorm over each head's D channels (eps 1e-6 inside the root); or
    ``"full_width"`` RMSNorm over all C channels before the head split (eps 1e-5 outside the root, the
    released Read/Write). Queries come from ``q`` ``[C -> C]``, keys and values from ``kv`` ``[C -> 2C]``
    (rows: k then v, each head-major).
    """

    def __init__(self, dim: int, heads: int, qk_norm: str | None = "per_head"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: {heads} must divide hidden size {dim}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm: expected one of {QK_NORMS}, got {qk_norm!r}")
        self.heads, self.head_dim, self.qk_norm = heads, dim // heads, qk_norm
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        if qk_norm == "per_head":
            self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        elif qk_norm == "full_width":
            self.q_norm = RMSNorm(dim, eps=1e-5, eps_outside_root=True)
            self.k_norm = RMSNorm(dim, eps=1e-5, eps_outside_root=True)
        self.proj = nn.Linear(dim, dim)

    def project(self, x, ctx):
        """x ``[..., C]``, ctx ``[..., C]`` -> q ``[..., H, D]``, k, v ``[..., H, D]`` (normed as configured)."""
        h, d = self.heads, self.head_dim
        q = self.q(x)
        k, v = self.kv(ctx).unflatten(-1, (2, h * d)).unbind(-2)
        if self.qk_norm == "full_width":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.unflatten(-1, (h, d)) for t in (q, k, v))
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x, ctx, plan: AttentionPlan, backend=None):
        """``plan``: the call's ``AttentionPlan`` (``elit_dit.attention_plans(layout)["read"]``, ...): its segments
        are host ints, so no backend reads ``cu_seqlens`` on the host and uniform calls run as one dense SDPA, and
        after a layout's first forward a call skips the argument checks and dispatch."""
        q, k, v = self.project(x, ctx)  # v: a strided view of the kv projection; every backend takes strides
        return self.proj(plan(q, k, v, backend=backend).flatten(-2))


class DiTBlock(nn.Module):
    """adaLN-Zero DiT block (self-attention + MLP) on packed tokens; ``index`` (a ``TokenRuns``) maps rows to samples.

    Modulation chunks in DiT's order: shift/scale/gate for attention, then for the MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: str | None = "per_head"):
        super().__init__()
        self.attn = Attention(dim, heads, qk_norm)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x, c, index, plan: AttentionPlan, ew: ElementwiseImpl, backend=None):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        h = ew.layernorm_modulate(x, sh1, sc1, index, 1e-6)
        x = ew.gated_residual(x, self.attn(h, h, plan, backend=backend), g1, index)
        h = ew.layernorm_modulate(x, sh2, sc2, index, 1e-6)
        return ew.gated_residual(x, self.mlp(h), g2, index)


class ReadBlock(nn.Module):
    """Latents <- spatial tokens of their group: adaLN-Zero cross-attention + MLP (ratio 1).

    Modulation chunks: ``[shift_q, scale_q]`` for the latent queries when ``modulate_queries`` (the paper
    preset; the released Read feeds the raw latents), then shift/scale for the spatial keys/values, the
    attention gate, shift/scale/gate for the MLP. (The released file's 7th chunk is unused by its forward
    pass and is dropped by the loader.)
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 1.0, *, modulate_queries: bool = True,
                 qk_norm: str | None = "per_head", mlp_bias: bool = True):
        super().__init__()
        self.modulate_queries = modulate_queries
        self.attn = Attention(dim, heads, qk_norm)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=mlp_bias)
        self.ada = nn.Linear(dim, (8 if modulate_queries else 6) * dim)

    def forward(self, lat, spatial, c, lat_index, sp_index, read_plan: AttentionPlan, ew: ElementwiseImpl,
                backend=None):
        chunks = self.ada(F.silu(c)).chunk(8 if self.modulate_queries else 6, dim=-1)
        if self.modulate_queries:
            hq = ew.layernorm_modulate(lat, chunks[0], chunks[1], lat_index, 1e-6)
            chunks = chunks[2:]
        else:
            hq = lat
        shk, sck, g1, sh2, sc2, g2 = chunks
        hk = ew.layernorm_modulate(spatial, shk, sck, sp_index, 1e-6)
        lat = ew.gated_residual(lat, self.attn(hq, hk, read_plan, backend=backend), g1, lat_index)
        h = ew.layernorm_modulate(lat, sh2, sc2, lat_index, 1e-6)
        return ew.gated_residual(lat, self.mlp(h), g2, lat_index)


class WriteBlock(nn.Module):
    """Spatial tokens <- their group's latents: residual cross-attention + MLP (ratio 1), no adaLN, no gates.

    ``prenorm``: LayerNorms on the queries, the keys/values and the MLP input (the paper preset); the
    released Write has none. The output projection and the MLP's last layer start at zero (as the official
    code), so a fresh Write block is the identity."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 1.0, *, prenorm: bool = True,
                 qk_norm: str | None = "per_head", mlp_bias: bool = True):
        super().__init__()
        norm = (lambda: nn.LayerNorm(dim, eps=1e-6)) if prenorm else nn.Identity
        self.norm_q, self.norm_kv, self.norm_mlp = norm(), norm(), norm()
        self.attn = Attention(dim, heads, qk_norm)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=mlp_bias)
        zero_output_layers(self)

    def forward(self, spatial, lat, write_plan: AttentionPlan, backend=None):
        spatial = spatial + self.attn(self.norm_q(spatial), self.norm_kv(lat), write_plan, backend=backend)
        return spatial + self.mlp(self.norm_mlp(spatial))


def zero_output_layers(write: WriteBlock) -> None:
    """Zero the Write's attention output projection and its MLP's last layer (a fresh Write is the identity)."""
    for lin in (write.attn.proj, write.mlp.fc2):
        nn.init.zeros_(lin.weight)
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.ada = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, c, index, ew: ElementwiseImpl):
        sh, sc = self.ada(F.silu(c)).chunk(2, dim=-1)
        return self.linear(ew.layernorm_modulate(x, sh, sc, index, 1e-6))


class TimestepEmbedder(nn.Module):
    """t ``[B]`` in [0, 1] -> 256 sinusoidal features of ``scale·t`` (cos half first, frequencies
    ``exp(-ln(10000)·i/128)``) -> Linear, SiLU, Linear -> ``[B, C]``.

    ``scale`` 1000 feeds DiT's integer-step range (the paper preset); the released ELIT-SiT feeds t as
    given (``scale=1``, docs/released_checkpoints.md §3.2 step 2)."""

    def __init__(self, dim: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        dt = torch.promote_types(self.mlp[0].weight.dtype, torch.float32)  # fp32, or fp64 for an fp64 model
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=dt) / half)
        args = (self.scale * t.to(dt))[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def sincos_2d(dim: int, h: int, w: int, column_first: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``[h*w, dim]`` fp32, tokens in row-major order.

    Each half of the channels is ``[sin(pos·ω_k), cos(pos·ω_k)]``, ``ω_k = 10000^(-k/(dim/4))``. The first
    half encodes the row index, or the column index when ``column_first`` (DiT's and the released
    ELIT-SiT table, docs/released_checkpoints.md §3.2 step 1; the paper preset keeps row first).

    >>> sincos_2d(8, 2, 3).shape
    torch.Size([6, 8])
    """
    if dim % 4:
        raise ValueError(f"hidden: {dim} must be divisible by 4 for 2-D sin-cos embeddings")
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def emb(pos):
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    first, second = (xs, ys) if column_first else (ys, xs)
    return torch.cat([emb(first), emb(second)], dim=1).float()
