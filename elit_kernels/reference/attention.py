"""Reference varlen attention: one segment at a time, plain matmul + softmax. The truth.

Slow on purpose (a Python loop over segments, a host sync to read ``cu_seqlens``); every other
backend is checked against it.
"""
from __future__ import annotations

import torch


def causal_mask(lq: int, lk: int, device) -> torch.Tensor:
    """Bottom-right aligned causal mask ``[lq, lk]`` (flash-attn convention): query i sees key j
    when ``j <= i + lk - lq``."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


def attention_segment(q, k, v, softmax_scale: float, causal: bool, acc_dtype=torch.float32):
    """Attention for one segment. q ``[Lq, H, D]``, k/v ``[Lk, H, D]`` -> ``[Lq, H, D]`` in ``acc_dtype``.

    Query rows that see no key (empty segment, or causal with Lq > Lk) get exact zeros.
    """
    lq, lk = q.shape[0], k.shape[0]
    qf, kf, vf = (t.to(acc_dtype).transpose(0, 1) for t in (q, k, v))  # [H, L, D]
    s = torch.matmul(qf, kf.transpose(-1, -2)) * softmax_scale  # [H, Lq, Lk]
    if causal:
        allowed = causal_mask(lq, lk, q.device)
    else:
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    row_has_key = allowed.any(dim=-1)  # [Lq]
    # Rows with no key: unmask everything so softmax stays finite, then zero the output; the
    # zero output has zero gradient, so no NaN reaches q/k/v in backward either.
    allowed = allowed | ~row_has_key[:, None]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, vf)  # [H, Lq, D]
    o = torch.where(row_has_key[None, :, None], o, torch.zeros((), dtype=o.dtype, device=o.device))
    return o.transpose(0, 1)


def varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, *, softmax_scale: float, causal: bool = False):
    """Reference ``varlen_attention``: q ``[total_q, H, D]``, k/v ``[total_k, H, D]`` -> ``[total_q, H, D]``.

    Accumulates in fp32 (fp64 when the inputs are fp64) and returns q's dtype.

    >>> q = torch.randn(5, 2, 8); k = v = torch.randn(7, 2, 8)
    >>> cu_q = torch.tensor([0, 2, 5], dtype=torch.int32); cu_k = torch.tensor([0, 3, 7], dtype=torch.int32)
    >>> varlen_attention_reference(q, k, v, cu_q, cu_k, softmax_scale=8 ** -0.5).shape
    torch.Size([5, 2, 8])
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    outs = []
    for i in range(len(cq) - 1):
        qs, qe, ks, ke = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if qe == qs:
            continue
        outs.append(attention_segment(q[qs:qe], k[ks:ke], v[ks:ke], softmax_scale, causal, acc))
    if not outs:
        # No queries at all; keep the graph connected so backward gives zero grads.
        return (q * 0).to(q.dtype) + (k.sum() * 0 + v.sum() * 0).to(q.dtype)
    return torch.cat(outs, dim=0).to(q.dtype)
