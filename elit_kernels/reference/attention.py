"""Reference varlen attention: one segment at a time, plain matmul + softmax. The truth.

Slow on purpose (a Python loop over segments, a host sync to read ``cu_seqlens``); every other
backend is checked against it.
"""
from __future__ import annotations

import torch


def visible_mask(lq: int, lk: int, causal: bool, window_left: int = -1, window_right: int = -1,
                 device=None) -> torch.Tensor:
    """``[lq, lk]`` bool: query i sees key j (flash-attn's semantics, bottom-right aligned with
    ``diag = lk - lq``): ``j <= i + diag`` when causal, ``j >= i + diag - window_left`` when
    ``window_left >= 0``, ``j <= i + diag + window_right`` when ``window_right >= 0``."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=device)
    diag = lk - lq
    if causal:
        allowed &= j <= i + diag
    if window_left >= 0:
        allowed &= j >= i + diag - window_left
    if window_right >= 0:
        allowed &= j <= i + diag + window_right
    return allowed


class _SoftCap(torch.autograd.Function):
    """``softcap * tanh(s / softcap)`` with the gradient ``1 - tanh^2`` taken as such: autograd through the two
    products scaled the incoming gradient by ``softcap`` before dividing it back, which overflowed (inf, then NaN)
    for a legal softcap near float32's max (a fuzz: 3e38). The backward recomputes ``tanh`` from the saved input
    with differentiable ops, so double backward stays exact (the reference differentiates twice); ``jvp`` and
    ``setup_context`` keep forward-mode AD and ``torch.func`` working."""

    generate_vmap_rule = True

    @staticmethod
    def forward(s, softcap: float):
        return torch.tanh(s / softcap) * softcap

    @staticmethod
    def setup_context(ctx, inputs, output):
        s, ctx.softcap = inputs
        ctx.save_for_backward(s)
        ctx.save_for_forward(s)

    @staticmethod
    def _slope(ctx):
        s, = ctx.saved_tensors
        t = torch.tanh(s / ctx.softcap)
        return 1 - t * t

    @staticmethod
    def backward(ctx, grad):
        return grad * _SoftCap._slope(ctx), None

    @staticmethod
    def jvp(ctx, ds, _):
        return ds * _SoftCap._slope(ctx)


def attention_segment(q, k, v, softmax_scale: float, causal: bool, acc_dtype=torch.float32, return_lse=False,
                      window_size=(-1, -1), softcap: float = 0.0):
    """Attention for one segment. q ``[Lq, H, D]``, k/v ``[Lk, H_kv, D]`` (``H % H_kv == 0``: query head h
    reads kv head ``h // (H // H_kv)``) -> ``[Lq, H, D]`` in ``acc_dtype``; with ``return_lse`` also the
    log-sum-exp ``[H, Lq]`` (+inf where a row sees no key).

    ``window_size`` and ``causal`` select the visible keys (``visible_mask``); ``softcap > 0`` caps the
    scaled logits as ``softcap * tanh(s / softcap)`` before masking. Query rows that see no key (empty
    segment, causal with Lq > Lk, a window past the segment) get exact zeros.
    """
    lq, lk = q.shape[0], k.shape[0]
    qf, kf, vf = (t.to(acc_dtype).transpose(0, 1) for t in (q, k, v))  # [H, L, D]
    group = q.shape[1] // k.shape[1]
    if group != 1:  # GQA by expansion (the truth may copy), after the cast: dk/dv sum in acc_dtype
        kf, vf = kf.repeat_interleave(group, dim=0), vf.repeat_interleave(group, dim=0)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * softmax_scale  # [H, Lq, Lk]
    if softcap > 0.0:
        s = _SoftCap.apply(s, softcap)
    allowed = visible_mask(lq, lk, causal, window_size[0], window_size[1], q.device)
    row_has_key = allowed.any(dim=-1)  # [Lq]
    # Rows with no key: unmask everything so softmax stays finite, then zero the output; the
    # zero output has zero gradient, so no NaN reaches q/k/v in backward either.
    allowed = allowed | ~row_has_key[:, None]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, vf)  # [H, Lq, D]
    o = torch.where(row_has_key[None, :, None], o, torch.zeros((), dtype=o.dtype, device=o.device))
    if not return_lse:
        return o.transpose(0, 1)
    lse = torch.logsumexp(s.detach(), dim=-1)
    lse = torch.where(row_has_key[None, :], lse, torch.full((), float("inf"), dtype=lse.dtype, device=lse.device))
    return o.transpose(0, 1), lse


def check_cu_rows(name: str, c: list, total: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless the host list ``c`` (a ``cu_seqlens``) starts at 0, is
    non-decreasing and ends at most at ``total`` rows. The backends that read ``cu_seqlens`` on the host run
    it whatever ``set_value_checks`` says: slicing ``q[a:b]`` past the row count would silently compute on
    fewer rows than ``cu_seqlens`` claims."""
    if c[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {name}[0] = {c[0]}")
    for i in range(1, len(c)):
        if c[i] < c[i - 1]:
            raise ValueError(f"{name}: must be non-decreasing, but {name}[{i}] = {c[i]} < {name}[{i - 1}] = "
                             f"{c[i - 1]}")
    if c[-1] > total:
        raise ValueError(f"{name}: last element {c[-1]} is past the end of the packed tokens ({total} rows); "
                         "it must be <= the row count")


def varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, *, softmax_scale: float, causal: bool = False,
                               return_lse: bool = False, window_size=(-1, -1), softcap: float = 0.0):
    """Reference ``varlen_attention``: q ``[total_q, H, D]``, k/v ``[total_k, H_kv, D]`` -> ``[total_q, H, D]``.

    ``window_size`` (left, right) and ``softcap`` as in ``varlen_attention`` (flash-attn semantics).
    Accumulates in fp32 (fp64 when the inputs are fp64) and returns q's dtype. q rows past
    ``cu_seqlens_q[-1]`` get zeros (and zero gradients); k/v rows past ``cu_seqlens_k[-1]`` are not read.
    Raises ``ValueError`` naming the ``cu_seqlens`` that does not start at 0, decreases, or runs past its
    tensor's rows (``check_cu_rows``; always, even with the value checks off).
    With ``return_lse`` returns ``(out, lse)``, lse ``[H, total_q]`` fp32 (fp64 for fp64 inputs), natural
    log, +inf on rows that see no key, detached.

    >>> q = torch.randn(5, 2, 8); k = v = torch.randn(7, 2, 8)
    >>> cu_q = torch.tensor([0, 2, 5], dtype=torch.int32); cu_k = torch.tensor([0, 3, 7], dtype=torch.int32)
    >>> varlen_attention_reference(q, k, v, cu_q, cu_k, softmax_scale=8 ** -0.5).shape
    torch.Size([5, 2, 8])
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    check_cu_rows("cu_seqlens_q", cq, q.shape[0])
    check_cu_rows("cu_seqlens_k", ck, k.shape[0])
    outs, lses = [], []
    for i in range(len(cq) - 1):
        qs, qe, ks, ke = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if qe == qs:
            continue
        o = attention_segment(q[qs:qe], k[ks:ke], v[ks:ke], softmax_scale, causal, acc, return_lse, window_size,
                              softcap)
        if return_lse:
            o, lse = o
            lses.append(lse)
        outs.append(o.to(q.dtype))
    end = cq[-1]
    # Rows past the packed data: zeros by selection (never ``q * 0``, which turns a NaN row into NaN),
    # still connected to q so its gradient there is an exact zero.
    tail = torch.where(torch.zeros((), dtype=torch.bool, device=q.device), q[end:], 0.0)
    if not outs:
        # No queries at all; keep the graph connected to k/v so backward gives zero grads there.
        tail = tail + (k[:0].sum() + v[:0].sum()).to(q.dtype)
    out = torch.cat(outs + [tail], dim=0)
    if not return_lse:
        return out
    h = q.shape[1]
    lses.append(torch.full((h, q.shape[0] - end), float("inf"), dtype=acc, device=q.device))
    return out, torch.cat(lses, dim=1)
