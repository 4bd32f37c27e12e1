"""The ``torch`` backend: one dense SDPA per run of equal segments, else ``elit::varlen_attn_{fwd,bwd}_torch``.

**Runs of equal segments (the ELIT path).** ELIT's raggedness is structured: a Read/Write call has G
segments of the same shape per sample, the core one per sample, and a batch has few distinct budgets. In
eager mode ``sdpa_over_runs`` reads ``cu_seqlens`` on the host once, finds the maximal stretches of
consecutive segments with equal (Lq, Lk), and runs one ``F.scaled_dot_product_attention`` per stretch on a
*view* of the packed tensors (``q[a:b].view(n, Lq, H, D)``): no gather, no padding, autograd through SDPA.
It applies when there are at most ``MAX_RUNS`` stretches, no LSE is asked for, and every stretch can be
expressed exactly (causal stretches need Lq <= Lk, so every row sees a key; single-key stretches take
``out = v`` exactly and, when gradients are needed, go to the exact path below). Measured on CPU (AMD
EPYC, 1 thread, S/2 256px batch 4 fp32, paper preset, 2026-11-29): at J = 2 the ELIT forward on this
path took 797 ms CPU time vs 788 ms for the dense official-style forward of the same weights (5
alternating calls); on the grouped path alone the attention had cost 280-340 ms per forward at J = 16
against 120 ms for the dense forward's fused SDPA (a profile before this path existed). One interleaved
elit-bench run (commit e020f83, CPU time): ragged/dense 0.88-1.04 over budgets 1..16, both presets
(benchmarks/results/RESULTS.md).

**Everything else** (many distinct lengths, LSE, torch.compile, segments a view cannot express):

segments are grouped by their real lengths (power-of-two buckets of (Lq, Lk)), and each group runs as
one batched matmul / softmax padded to the longest segment *of that group*, in chunks of bounded size.
The lengths come from one host read of ``cu_seqlens`` per call, so the cost and memory follow the
data, never ``max_seqlen`` (which the op ignores: a segment longer than it still gets the right
answer). Padding to ``max_seqlen`` instead (the previous design) cost ~800x more time for 128
segments of 4 tokens passed with max_seqlen 512. The price of the host read: one device sync per call
on CUDA, and no CUDA-graph capture (the backend declares that reason).

Math (per query row i of a segment, fp32 accumulation, fp64 for fp64 inputs):
``s_ij = scale * q_i . k_j`` over the visible keys, ``lse_i = logsumexp_j s_ij`` (+inf when no key is
visible), ``p_ij = exp(s_ij - lse_i)``, ``out_i = sum_j p_ij v_j``. Backward: ``dp_ij = dO_i . v_j``,
``ds_ij = p_ij (dp_ij - sum_j' p_ij' dp_ij')``, ``dq_i = scale sum_j ds_ij k_j``,
``dk_j = scale sum_i ds_ij q_i``, ``dv_j = sum_i p_ij dO_i`` (dk/dv also summed over the query heads
that share a kv head). The row correction is ``sum_j p dp`` rather than ``dO . out``, so a row with a
single visible key (p = 1 exactly) gets ds = 0 exactly: dq = dk = 0 and dv = dO, as in the reference.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..._autograd import register_varlen_autograd
from ..._outputs import new_output
from ...reference.attention import check_cu_rows, visible_mask
from ..inputs import MAX_RUNS, _few_run_segments, is_zero_scale

# Elements of one [n, H, rows, Lk] score tile; chunks of segments (and of query rows, for one huge
# segment) stay under it, so memory is bounded by the chunk, not by the batch.
_CHUNK_ELEMS = 1 << 22


@dataclass
class _Chunk:
    """Segments (query rows ``r0:r1`` of each) against their keys, as gather indices on the device. Slots
    past a segment's end point at the segment's first row (so nothing outside the segment is read) and
    are masked out of ``allowed``."""

    qi: torch.Tensor  # [n, m] packed query row of each slot, long
    q_ok: torch.Tensor  # [n, m] the slot holds a real query row
    ki: torch.Tensor  # [n, lk] packed key row of each slot, long
    k_ok: torch.Tensor  # [n, lk]
    allowed: torch.Tensor  # [n, m, lk] query slot sees key slot
    has_key: torch.Tensor  # [n, m] the slot's row sees at least one key


def _plan(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int, heads: int, causal: bool,
          window_left: int = -1, window_right: int = -1):
    """One host read of both cu_seqlens -> ``(idle, chunks)``: ``idle``, the query rows (long, on cu_q's
    device) that no chunk covers, which see no key (segments without keys, rows past ``cu_q[-1]``); ``chunks``,
    a generator of the chunks to run, segments grouped by the power-of-two buckets of their real (Lq, Lk).
    Every other query row is in exactly one chunk. Vectorised over segments: the Python work grows with the
    number of groups."""
    c = torch.stack([cu_q, cu_k]).cpu().long()  # both int32 [S+1] on one device: one copy
    lens = c[:, 1:] - c[:, :-1]
    for i, (name, total) in enumerate((("cu_seqlens_q", total_q), ("cu_seqlens_k", total_k))):
        if c[i, 0] != 0 or (lens[i] < 0).any() or c[i, -1] > total:
            raise ValueError(f"{name}: must start at 0, be non-decreasing and end at most at the row count {total}")
    seg_of_row = torch.repeat_interleave(torch.arange(lens.shape[1]), lens[0])  # [cu_q[-1]]
    idle = torch.cat([(lens[1][seg_of_row] == 0).nonzero().flatten(), torch.arange(int(c[0, -1]), total_q)])
    return idle.to(cu_q.device, non_blocking=True), _chunks(c, lens, heads, causal, window_left, window_right,
                                                            cu_q.device)


def _chunks(c: torch.Tensor, lens: torch.Tensor, heads: int, causal: bool, window_left: int, window_right: int,
            dev: torch.device):
    """The chunks of ``_plan``, from the host copies ``c`` (cu_seqlens, ``[2, S+1]``) and ``lens`` (``[2, S]``)."""
    lq, lk = lens
    # no query: nothing to compute; no key: zeros / +inf, as initialised
    live = ((lq > 0) & (lk > 0)).nonzero().flatten()
    if live.numel() == 0:
        return
    bucket = torch.ceil(torch.log2(lens[:, live].double())).long()  # exact for powers of two
    key = bucket[0] * 64 + bucket[1]
    order = torch.argsort(key, stable=True)
    live, key = live[order], key[order]
    _, counts = torch.unique_consecutive(key, return_counts=True)
    for segs in torch.split(live, counts.tolist()):
        sq, sk, nq, nk = c[0, segs], c[1, segs], lq[segs], lk[segs]
        mq, mk = int(nq.max()), int(nk.max())
        per_seg = heads * mq * mk
        n_per = max(1, _CHUNK_ELEMS // per_seg)
        rows = mq if per_seg <= _CHUNK_ELEMS else max(1, _CHUNK_ELEMS // (heads * mk))
        j = torch.arange(mk)
        for a in range(0, len(segs), n_per):
            sl = slice(a, a + n_per)
            k_ok = j[None, :] < nk[sl, None]
            ki = sk[sl, None] + torch.where(k_ok, j[None, :], 0)
            for r0 in range(0, mq, rows):
                r = torch.arange(r0, min(mq, r0 + rows))
                q_ok = r[None, :] < nq[sl, None]
                allowed = q_ok[:, :, None] & k_ok[:, None, :]
                diag = r[None, :, None] + (nk - nq)[sl, None, None]  # i + Lk - Lq (bottom-right, flash-attn)
                if causal:
                    allowed &= j[None, None, :] <= diag
                if window_left >= 0:
                    allowed &= j[None, None, :] >= diag - window_left
                if window_right >= 0:
                    allowed &= j[None, None, :] <= diag + window_right
                qi = sq[sl, None] + torch.where(q_ok, r[None, :], 0)
                yield _Chunk(*(t.to(dev, non_blocking=True) for t in (qi, q_ok, ki, k_ok, allowed, allowed.any(-1))))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gather(x: torch.Tensor, idx: torch.Tensor, h_kv: int, acc, ok: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``idx [n, m]`` of ``x [total, H, D]`` -> ``[n, h_kv, H // h_kv, m, D]`` in ``acc``; with ``ok``,
    the slots that hold no row are zeros (values and output gradients, which multiply probabilities)."""
    g = x[idx].to(acc)  # [n, m, H, D], a fresh tensor (advanced indexing copies)
    if ok is not None:
        g.masked_fill_(~ok[:, :, None, None], 0.0)
    n, m, h, d = g.shape
    return g.view(n, m, h_kv, h // h_kv, d).permute(0, 2, 3, 1, 4)


def _scores(c: _Chunk, q, k, scale, acc, softcap: float = 0.0):
    """``(scale * q, k, s, t)`` of a chunk: the gathered, scaled queries ``[n, Hkv, G, m, D]``, keys
    ``[n, Hkv, 1, lk, D]`` (shared by the group, not expanded), scores ``[n, Hkv, G, m, lk]`` with -inf
    where a query does not see a key, and with ``softcap > 0`` ``t = tanh(scale q.k / softcap)`` (scores
    ``softcap * t``; None without softcap). The scale goes on q, the smaller operand when Lk > D."""
    h_kv = k.shape[1]
    qb = _gather(q, c.qi, h_kv, acc).mul_(scale)
    kb = _gather(k, c.ki, h_kv, acc)
    s = torch.matmul(qb, kb.transpose(-1, -2))
    t = None
    if softcap > 0.0:
        t = torch.tanh_(s.div_(softcap))
        s = t * softcap
    return qb, kb, s.masked_fill_(~c.allowed[:, None, None], float("-inf")), t


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """``[n, Hkv, G, m, ...]`` -> ``[n, m, H, ...]``."""
    n, hkv, g, m = t.shape[:4]
    return t.permute(0, 3, 1, 2, *range(4, t.dim())).reshape(n, m, hkv * g, *t.shape[4:])


def varlen_attn_fwd_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale: float, causal: bool,
                          window_left: int = -1, window_right: int = -1, softcap: float = 0.0):
    """q ``[total_q, H, D]``, k/v ``[total_k, H_kv, D]`` -> ``(out [total_q, H, D], lse [H, total_q])``; lse
    fp32 (fp64 for fp64), +inf on rows that see no key; rows past ``cu_seqlens_q[-1]`` are zeros.
    ``window_left/right`` (-1: unbounded) and ``softcap`` (0: off) as in ``varlen_attention``."""
    acc = _acc(q.dtype)
    # Written in full: the rows no chunk covers here, every other row by its chunk (NaN first when the poison
    # switch is on, so a row the plan misses shows).
    out = new_output(q.shape, acc, q.device)
    lse = new_output((q.shape[0], q.shape[1]), acc, q.device)  # [total_q, H] here
    idle, chunks = _plan(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], q.shape[1], causal, window_left,
                         window_right)
    out[idle] = 0.0
    lse[idle] = float("inf")
    for c in chunks:
        _, _, s, _ = _scores(c, q, k, softmax_scale, acc, softcap)
        blind = ~c.has_key[:, None, None, :, None]
        m = s.amax(dim=-1, keepdim=True).masked_fill_(blind, 0.0)  # -inf on rows with no key: 0 keeps NaN out
        p = torch.exp_(s.sub_(m))  # exact zeros on masked keys and rows with no key; 1 at a row's max
        denom = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p, _gather(v, c.ki, k.shape[1], acc, c.k_ok)).div_(denom.masked_fill(blind, 1.0))
        m = m.add_(torch.log(denom)).masked_fill_(blind, float("inf"))  # lse; +inf on rows with no key
        rows = c.qi[c.q_ok]
        out[rows] = _heads_first(o)[c.q_ok]
        lse[rows] = _heads_first(m[..., 0])[c.q_ok]
    return out.to(q.dtype), lse.t().contiguous()


def varlen_attn_bwd_torch(dout, q, k, v, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale: float, causal: bool,
                          window_left: int = -1, window_right: int = -1, softcap: float = 0.0):
    """Gradients ``(dq, dk, dv)`` of ``varlen_attn_fwd_torch`` (shapes and dtypes of q, k, v); exact zeros on
    rows outside every segment. With softcap the score gradient goes through the cap:
    ``d(scale q.k) = ds * (1 - tanh^2)``."""
    acc = _acc(q.dtype)
    dq = new_output(q.shape, acc, q.device)  # written in full, as out in the forward
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)  # accumulated into (index_add_): zero is their start
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    h_kv = k.shape[1]
    lse_t = lse.t()  # [total_q, H]
    idle, chunks = _plan(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], q.shape[1], causal, window_left,
                         window_right)
    dq[idle] = 0.0
    for c in chunks:
        qb, kb, s, t = _scores(c, q, k, softmax_scale, acc, softcap)
        m = lse_t[c.qi].to(acc)  # [n, m, H]
        n, rows, h = m.shape
        m = m.view(n, rows, h_kv, h // h_kv).permute(0, 2, 3, 1)[..., None]
        p = torch.exp_(s.sub_(m))
        vb = _gather(v, c.ki, h_kv, acc, c.k_ok)
        dob = _gather(dout, c.qi, h_kv, acc, c.q_ok)
        dp = torch.matmul(dob, vb.transpose(-1, -2))
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        if t is not None:
            ds = ds * (1.0 - t * t)
        dq_b = torch.matmul(ds, kb).mul_(softmax_scale)  # [n, Hkv, G, m, D]
        dk_b = torch.matmul(ds.transpose(-1, -2), qb).sum(2)  # [n, Hkv, lk, D]; qb carries the scale
        dv_b = torch.matmul(p.transpose(-1, -2), dob).sum(2)
        dq[c.qi[c.q_ok]] = _heads_first(dq_b)[c.q_ok]
        krows = c.ki[c.k_ok]
        # index_add_: a segment split into query-row chunks adds each chunk's part to the same keys.
        dk.index_add_(0, krows, dk_b.permute(0, 2, 1, 3)[c.k_ok])
        dv.index_add_(0, krows, dv_b.permute(0, 2, 1, 3)[c.k_ok])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# The op reads cu_seqlens on the host: inductor's CUDA graphs must leave it out.
_OP_KW = {"tags": (torch.Tag.cudagraph_unsafe,)} if (
    hasattr(torch.Tag, "cudagraph_unsafe") and "tags" in inspect.signature(torch.library.custom_op).parameters) else {}


@torch.library.custom_op("elit::varlen_attn_fwd_torch", mutates_args=(), **_OP_KW)
def varlen_attn_fwd_torch_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                             cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                             causal: bool, window_left: int = -1, window_right: int = -1,
                             softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out [total_q, H, D], lse [H, total_q])``; the max lengths are not needed (any length runs)."""
    return varlen_attn_fwd_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_left,
                                 window_right, softcap)


@varlen_attn_fwd_torch_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left=-1,
      window_right=-1, softcap=0.0):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_acc(q.dtype))


@torch.library.custom_op("elit::varlen_attn_bwd_torch", mutates_args=(), **_OP_KW)
def varlen_attn_bwd_torch_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                             cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                             causal: bool, window_left: int = -1, window_right: int = -1,
                             softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dq, dk, dv)``; deterministic."""
    return varlen_attn_bwd_torch(dout, q, k, v, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_left,
                                 window_right, softcap)


@varlen_attn_bwd_torch_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left=-1, window_right=-1, softcap=0.0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


register_varlen_autograd(varlen_attn_fwd_torch_op, varlen_attn_bwd_torch_op)


# --- runs of equal segments: one SDPA per run on views --------------------------------------------------
def dense_runner(inp):
    """For a call of one run of equal segments (``inp.segments`` has one run: every segment Lq x Lk, Lq >= 1,
    Lk >= 2, no rows past them), a callable ``(q, k, v) -> out`` that runs it as ``sdpa_over_runs`` does, one SDPA on
    ``[S, H, L, D]`` views, with every decision taken here once; None for any other call (LSE, softcap, a window,
    causal with Lq != Lk: ``sdpa_over_runs`` decides per call). ``AttentionPlan`` keeps it per input signature
    (``Backend.plan_runner``): the model's image, Read, Write and uniform core calls then cost one SDPA's host time."""
    seg = inp.segments
    if (seg is None or len(seg.runs) != 1 or inp.return_lse or inp.softcap != 0.0 or inp.has_window
            or is_zero_scale(inp.softmax_scale)):
        return None
    n, lq, lk, _, total_q, _, total_k = seg.offsets[0]
    q, k = inp.q, inp.k
    if lq == 0 or lk < 2 or (inp.causal and lq != lk) or total_q != q.shape[0] or total_k != k.shape[0]:
        return None
    h, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    scale, causal, gqa = inp.softmax_scale, inp.causal, hkv != h

    def run(q, k, v):
        q, s = positive_scale(q, scale)
        o = F.scaled_dot_product_attention(q.view(n, lq, h, d).transpose(1, 2), k.view(n, lk, hkv, d).transpose(1, 2),
                                           v.view(n, lk, hkv, d).transpose(1, 2), is_causal=causal, scale=s,
                                           enable_gqa=gqa)
        return o.transpose(1, 2).reshape(total_q, h, d)

    return run


def positive_scale(q: torch.Tensor, softmax_scale: float) -> tuple[torch.Tensor, float]:
    """``(q', scale')`` with ``scale' = |softmax_scale|`` and the same scores: ``-q`` for a negative scale (negation is
    exact, and autograd carries it). FlashAttention-style kernels (PyTorch's SDPA kernels, FlashAttention-2
    varlen) take the row max of the unscaled scores and scale masked ``-inf`` entries, which is right only for a
    positive scale: a negative one overflows or gives NaN (``+inf - +inf``), and 0 gives NaN (``0 * -inf``) on
    every masked entry, so callers send a zero scale to an exact path instead."""
    return (-q, -softmax_scale) if softmax_scale < 0 else (q, softmax_scale)


def sdpa_over_runs(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale: float, causal: bool, window_left: int = -1,
                   window_right: int = -1, *, segments=None):
    """``out [total_q, H, D]`` through one SDPA per run of equal segments, or None when this path does not
    apply (see the module docstring; with a sliding window also when a row of a run sees no key).

    ``segments`` (a ``SegmentRuns``): the runs as host ints, so nothing is read from the device and the path
    traces under ``torch.compile``. Without it the path reads ``cu_seqlens`` on the host (eager only: free on
    CPU, a device sync on CUDA) and raises ValueError naming a ``cu_seqlens`` that does not start at 0,
    decreases or runs past its rows (``check_cu_rows``), whatever the value-check setting."""
    windowed = window_left >= 0 or window_right >= 0
    if is_zero_scale(softmax_scale):  # 0 to float32 kernels (see positive_scale): the grouped op is exact there
        return None
    if segments is None:
        c = torch.stack([cu_seqlens_q, cu_seqlens_k]).tolist()
        check_cu_rows("cu_seqlens_q", c[0], q.shape[0])  # else a view past the rows fails with a nameless error
        check_cu_rows("cu_seqlens_k", c[1], k.shape[0])
        segments = _few_run_segments([b - a for a, b in zip(c[0][:-1], c[0][1:])],
                                     [b - a for a, b in zip(c[1][:-1], c[1][1:])], c[0][-1], c[1][-1])
        if segments is None:  # more than MAX_RUNS runs
            return None
    runs = segments.offsets  # (n, Lq, Lk, q_start, q_stop, k_start, k_stop) per run
    if len(runs) > MAX_RUNS or segments.total_q > q.shape[0] or segments.total_k > k.shape[0]:
        return None  # too many runs, or lengths past the tensors (the grouped op names the bad cu_seqlens)
    q, softmax_scale = positive_scale(q, softmax_scale)
    need_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    h, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    parts, attended = [], False
    for n, lq, lk, qa, qb, ka, kb in runs:
        if lq == 0:
            continue
        if lk == 0:  # queries that see no key: exact zeros
            parts.append(q.new_zeros(qb - qa, h, d))
            continue
        if causal and lq > lk:  # some rows see no key: SDPA would give NaN there
            return None
        if lk == 1:
            if windowed:  # the window may hide the key from some rows
                return None
            if need_grad:  # the exact single-key gradients live on the grouped path (causal lq > 1 left above)
                return None
            vr = v[ka:kb].view(n, 1, hkv, d).repeat_interleave(h // hkv, dim=2)
            parts.append(vr.expand(n, lq, h, d).reshape(qb - qa, h, d))
            continue
        qr = q[qa:qb].view(n, lq, h, d).transpose(1, 2)
        kr = k[ka:kb].view(n, lk, hkv, d).transpose(1, 2)
        vr = v[ka:kb].view(n, lk, hkv, d).transpose(1, 2)
        mask = None
        if windowed or (causal and lq != lk):  # bottom-right alignment (flash-attn), as the reference builds it
            mask = visible_mask(lq, lk, causal, window_left, window_right, q.device)
            if windowed and not bool(mask.any(-1).all()):  # a row with no key: SDPA would give NaN there
                return None
        kw = {"enable_gqa": True} if hkv != h else {}
        o = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, is_causal=causal and lq == lk and mask is None,
                                           scale=softmax_scale, **kw)
        parts.append(o.transpose(1, 2).reshape(qb - qa, h, d))
        attended = True
    if not attended and need_grad:  # nothing to attend: the op path keeps q, k, v in the graph (zero grads)
        return None
    if segments.total_q < q.shape[0]:  # rows past the packed data: zeros
        parts.append(q.new_zeros(q.shape[0] - segments.total_q, h, d))
    if not parts:
        return q.new_zeros(q.shape)
    return parts[0] if len(parts) == 1 else torch.cat(parts)
