"""flash-attn 2's attention functions, same signatures, our backends underneath: switch with an import.

    from elit_kernels import flash_attn_varlen_func  # instead of: from flash_attn import flash_attn_varlen_func

Supported as in flash-attn: GQA / MQA (k/v with fewer heads), any head dim 1..256, sliding windows (``window_size``)
and ``softcap``, ``return_attn_probs`` (returns ``(out, softmax_lse, S_dmask)``, S_dmask empty), the packed ``qkv``
/ ``kv`` layouts (varlen and dense), flags given as ints, a softcap <= 0 as off, negative window sides as unbounded,
``max_seqlen_*`` as ints, NumPy integers or 0-dim integer tensors, and buffers longer than the packed data. Not
implemented: dropout, ALiBi, paged KV and flash-attn 3's extras (attention sinks ``s_aux``, ``seqused_*``, FP8
descales, ...). Each function names the ones its flash-attn counterpart takes (all of them
``flash_attn_varlen_func``; the varlen packed functions ``dropout_p``, ``alibi_slopes`` and ``s_aux``, the dense
packed ones ``dropout_p`` and ``alibi_slopes``; ``flash_attn_func`` all but the paged and varlen ones), so callers
that keep only the keywords a signature names still pass them, and asking for one raises ``NotImplementedError``
naming the argument rather than being ignored.

``deterministic=True`` is honoured as flash-attn honours it: when a backward follows, the call runs only on a backend
whose backward is deterministic on its device (``reference``, ``cpp``, ``triton``, ``triton_window``, ``cuda``;
``torch`` on the CPU), never on the library kernels default dispatch otherwise prefers on a GPU (PyTorch's SDPA
kernels behind ``torch`` / ``sdpa_*``, ``torch_varlen``, ``flash_attn``: they accumulate with atomics).
"""
from __future__ import annotations

import torch

from .attention import varlen_attention
from ._types import check_bool, is_int, is_real


# flash-attn (2.x and the FA3 / kernels-community variants that transformers and vLLM call) options that
# change the result and that we do not implement. They are parameters of every entry point, so a caller
# that filters its keyword arguments by our signature (transformers does) passes them and gets an error
# instead of a silently different attention.
_NOT_NONE = {
    "alibi_slopes": "ALiBi biases are not supported",
    "block_table": "paged KV caches are not supported; pass the keys/values of each sequence contiguously",
    "s_aux": "attention sinks (per-head auxiliary logits) are not supported",
    "seqused_q": "per-segment used lengths are not supported; shorten cu_seqlens_q instead",
    "seqused_k": "per-segment used lengths are not supported; shorten cu_seqlens_k instead",
    "qv": "the extra qv operand (FA3 MLA) is not supported",
    "q_descale": "FP8 descaling is not supported",
    "k_descale": "FP8 descaling is not supported",
    "v_descale": "FP8 descaling is not supported",
    "leftpad_k": "left-padded KV is not supported; pass packed segments instead",
    "rotary_cos": "fused rotary embedding is not supported; rotate q/k before the call",
    "rotary_sin": "fused rotary embedding is not supported; rotate q/k before the call",
}


def _refuse_unsupported(dropout_p=0.0, alibi_slopes=None, block_table=None, *, deterministic=False, attention_chunk=0,
                        **not_none) -> None:
    """Raise ``NotImplementedError`` naming the first flash-attn option we do not implement that was set:
    ``dropout_p`` other than 0, ``attention_chunk`` other than 0, or any of ``_NOT_NONE`` not None; a
    ``TypeError`` naming ``deterministic`` unless it is a bool (or an int / NumPy bool, which flash-attn's
    op schema takes as one); ``_run`` hands its value to ``varlen_attention``."""
    _bool_like("deterministic", deterministic)
    if not is_real(dropout_p):
        raise TypeError(f"dropout_p: expected a float, got {type(dropout_p).__name__}")
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p: only 0.0 is supported (no attention dropout), got {dropout_p}")
    if attention_chunk is not None and not (is_int(attention_chunk) and attention_chunk == 0):  # NumPy's 0 too
        raise NotImplementedError(f"attention_chunk: only 0 (no chunked attention) is supported, got {attention_chunk}")
    for name, value in (("alibi_slopes", alibi_slopes), ("block_table", block_table), *not_none.items()):
        if value is not None:
            raise NotImplementedError(f"{name}: {_NOT_NONE[name]}; only None is accepted")


def _bool_like(name: str, value):
    """flash-attn's flags as it takes them: a bool or an int (tested for truth; a NumPy integer is the int it
    equals); NumPy's bool as a bool; anything else (a string, a tensor: no single truth value) a TypeError naming
    ``name`` and what it takes."""
    if type(value) in (bool, int):
        return value
    if is_int(value):
        return int(value)
    return check_bool(name, value, expected="a bool or an int (as flash-attn takes its flags)")


def _fa_window(window_size):
    """flash-attn's ``window_size`` as ``varlen_attention`` takes it: any negative side is unbounded there
    (``flash_api.cpp`` tests ``>= 0``), so ``(-5, 0)`` is causal; sides below -1 become -1. Anything that is not
    a pair of ints goes through as it is, for ``varlen_attention`` to read or name."""
    if isinstance(window_size, torch.Tensor) and window_size.shape == (2,) and not window_size.is_floating_point() \
            and window_size.dtype != torch.bool:
        window_size = window_size.tolist()  # as varlen_attention reads it (a host read)
    if isinstance(window_size, (tuple, list)) and len(window_size) == 2:
        sides = [s.item() if isinstance(s, torch.Tensor) and s.dim() == 0 and not s.is_floating_point()
                 and s.dtype != torch.bool else s for s in window_size]
        if all(is_int(s) for s in sides):
            return tuple(-1 if s < -1 else s for s in sides)
    return window_size


def _run(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_size, softcap, return_attn_probs,
         backend, deterministic):
    # flash-attn's readings: flags are tested for truth (an int is one), a softcap <= 0 is off, a negative window
    # side is unbounded
    if is_real(softcap) and softcap < 0:
        softcap = 0.0
    kw = dict(softmax_scale=softmax_scale, causal=bool(_bool_like("causal", causal)),
              window_size=_fa_window(window_size), softcap=softcap, backend=backend,
              deterministic=bool(_bool_like("deterministic", deterministic)))
    return_attn_probs = _bool_like("return_attn_probs", return_attn_probs)
    if not return_attn_probs:
        return varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True, **kw)
    # flash-attn's third value holds the attention probabilities of its dropout tests: without dropout an empty
    # tensor of q's dtype (flash_api.cpp), which callers may read (.numel()), so the same here
    return out, lse, q.new_empty((0,))


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, s_aux=None,
                           seqused_q=None, seqused_k=None, qv=None, q_descale=None, k_descale=None, v_descale=None,
                           leftpad_k=None, rotary_cos=None, rotary_sin=None, attention_chunk=0, num_splits=1,
                           pack_gqa=None, sm_margin=0, backend=None):
    """Drop-in for ``flash_attn.flash_attn_varlen_func`` (flash-attn 2 positional order).

    Arguments:
        q: ``[total_q, H, D]``; k, v: ``[total_k, H_kv, D]`` with ``H % H_kv == 0`` (query head h reads kv
            head ``h // (H // H_kv)``); fp16 / bf16 / fp32 / fp64, D in 1..256.
        cu_seqlens_q, cu_seqlens_k: int32 ``[S+1]``; rows past their last element are allowed (q rows get
            zeros and zero gradients, k/v rows are never read).
        max_seqlen_q, max_seqlen_k: int, NumPy integer or 0-dim integer tensor (a CUDA tensor costs a host
            sync), at least the longest segment.
        dropout_p: only 0.0.
        softmax_scale: default ``D**-0.5``. causal: bottom-right aligned.
        window_size: ``(left, right)``, -1 (any negative) = unbounded side; query i sees key j iff
            ``i + Lk - Lq - left <= j <= i + Lk - Lq + right`` (with ``causal`` right is 0), as flash-attn documents.
        softcap: > 0 caps the logits as ``softcap * tanh(scale q.k / softcap)`` (flash-attn); <= 0 = off.
        alibi_slopes, block_table: only None.
        deterministic: a bool (or an int, as flash-attn): with True and a backward to follow, only backends whose
            backward is deterministic run the call (``varlen_attention``'s ``deterministic``).
        return_attn_probs: also return ``softmax_lse``.
        s_aux, seqused_q, seqused_k, qv, q_descale, k_descale, v_descale, leftpad_k, rotary_cos, rotary_sin:
            keyword only, options of flash-attn 3 / kernels-community builds (attention sinks, used lengths,
            FP8 scales, ...): accepted so that callers which pass only what a signature names (transformers)
            hand them over, then refused with ``NotImplementedError`` unless None.
        attention_chunk: keyword only; only 0 (or None). num_splits, pack_gqa, sm_margin: keyword only, scheduling
            hints of flash-attn 3 with no effect on the result; accepted and ignored.
        backend: keyword only, ours: a backend name as in ``varlen_attention``.

    Returns:
        ``out [total_q, H, D]``, or with ``return_attn_probs`` ``(out, softmax_lse, S_dmask)`` (``S_dmask``: an empty
        tensor of q's dtype, as flash-attn returns without dropout):
        ``softmax_lse [H, total_q]`` float32 (float64 for float64 inputs), natural log, +inf for rows that
        see no key, not differentiable.

    Raises:
        NotImplementedError naming the option for ``dropout_p`` other than 0, ``alibi_slopes``,
        ``block_table``, ``s_aux``, ``seqused_q/k``, ``qv``, ``*_descale``, ``leftpad_k``, ``rotary_*`` not
        None and ``attention_chunk`` other than 0; TypeError naming ``causal``, ``deterministic`` or
        ``return_attn_probs`` when it is not a bool (an int or NumPy's bool is taken as one); otherwise what
        ``varlen_attention`` raises.
    """
    _refuse_unsupported(dropout_p, alibi_slopes, block_table, deterministic=deterministic,
                        attention_chunk=attention_chunk, s_aux=s_aux,
                        seqused_q=seqused_q, seqused_k=seqused_k, qv=qv, q_descale=q_descale, k_descale=k_descale,
                        v_descale=v_descale, leftpad_k=leftpad_k, rotary_cos=rotary_cos, rotary_sin=rotary_sin)
    return _run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size,
                softcap, return_attn_probs, backend, deterministic)


def _check_packed(name: str, t, n: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4 or t.shape[1] != n:
        raise ValueError(f"{name}: expected shape {layout}, got {tuple(t.shape)}")


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, s_aux=None, backend=None):
    """Drop-in for ``flash_attn.flash_attn_varlen_qkvpacked_func``: self-attention on ``qkv [total, 3, H, D]``.

    q, k and v are the strided views ``qkv[:, 0]``, ``qkv[:, 1]``, ``qkv[:, 2]``: the Triton backend reads
    them in place; the C++ CPU kernels take row strides too; the CUDA kernels copy only views they cannot
    load with aligned 16-byte vectors. ``cu_seqlens`` / ``max_seqlen`` serve both q and k. Returns and
    raises as ``flash_attn_varlen_func`` (a ``ValueError`` naming ``qkv`` for a wrong layout).
    """
    _refuse_unsupported(dropout_p, alibi_slopes, deterministic=deterministic, s_aux=s_aux)
    _check_packed("qkv", qkv, 3, "[total, 3, num_heads, head_dim]")
    q, k, v = qkv.unbind(1)
    return _run(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale, causal, window_size, softcap,
                return_attn_probs, backend, deterministic)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, s_aux=None,
                                    backend=None):
    """Drop-in for ``flash_attn.flash_attn_varlen_kvpacked_func``: ``q [total_q, H, D]`` attends to
    ``kv [total_k, 2, H_kv, D]`` (keys ``kv[:, 0]``, values ``kv[:, 1]``, strided views; ``H % H_kv == 0``).
    Returns and raises as ``flash_attn_varlen_func`` (a ``ValueError`` naming ``kv`` for a wrong layout).
    """
    _refuse_unsupported(dropout_p, alibi_slopes, deterministic=deterministic, s_aux=s_aux)
    _check_packed("kv", kv, 2, "[total_k, 2, num_kv_heads, head_dim]")
    k, v = kv.unbind(1)
    return _run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size,
                softcap, return_attn_probs, backend, deterministic)


def _check_dense(name: str, t, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected shape {layout} (4-D), got {t.dim()}-D shape {tuple(t.shape)}")


def _uniform_cu(batch: int, seqlen: int, device) -> torch.Tensor:
    """int32 ``[batch + 1]``: ``0, seqlen, 2 * seqlen, ...`` (every sample one full segment)."""
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, s_aux=None, qv=None,
                    q_descale=None, k_descale=None, v_descale=None, attention_chunk=0, num_splits=1, pack_gqa=None,
                    sm_margin=0, backend=None):
    """Drop-in for ``flash_attn.flash_attn_func``: attention over a dense batch, run on the varlen path.

    Arguments:
        q: ``[B, S_q, H, D]``; k, v: ``[B, S_k, H_kv, D]`` with ``H % H_kv == 0`` (GQA / MQA: query head h
            reads kv head ``h // (H // H_kv)``, nothing is repeated); fp16 / bf16 / fp32 / fp64, D in 1..256.
            Every sample has all ``S_q`` queries and ``S_k`` keys (use ``flash_attn_varlen_func`` for padding).
        dropout_p: only 0.0. softmax_scale: default ``D**-0.5``.
        causal: bottom-right aligned (query i sees key j iff ``j <= i + S_k - S_q``), as flash-attn >= 2.1.
        window_size, softcap: as in ``flash_attn_varlen_func`` (flash-attn semantics).
        alibi_slopes: only None. deterministic: as in ``flash_attn_varlen_func``.
        return_attn_probs: also return ``softmax_lse``.
        s_aux, qv, q_descale, k_descale, v_descale, attention_chunk: keyword only (flash-attn 3 / kernels
            builds), refused unless None / 0; num_splits, pack_gqa, sm_margin: scheduling hints, ignored.
        backend: keyword only, ours: a backend name as in ``varlen_attention``.

    Returns:
        ``out [B, S_q, H, D]`` in q's dtype, or with ``return_attn_probs`` ``(out, softmax_lse, S_dmask)`` with
        ``softmax_lse [B, H, S_q]`` float32 (float64 for float64 inputs), contiguous, natural log, +inf for rows
        that see no key (flash-attn's dense format); ``S_dmask`` empty.

    Raises:
        TypeError / ValueError naming ``q``, ``k`` or ``v`` for a wrong rank or mismatched batch;
        NotImplementedError naming the option for what is refused; otherwise what ``varlen_attention`` raises.

    The batch becomes ``B`` segments of one packed call: ``q.reshape(B * S_q, H, D)`` (a view when the batch
    and sequence dims merge, as for contiguous inputs) and uniform ``cu_seqlens``; no padding, no copy of k/v
    heads::

        >>> q = torch.randn(2, 5, 4, 32); k = v = torch.randn(2, 7, 2, 32)
        >>> flash_attn_func(q, k, v, causal=True).shape
        torch.Size([2, 5, 4, 32])
    """
    _refuse_unsupported(dropout_p, alibi_slopes, deterministic=deterministic, attention_chunk=attention_chunk,
                        s_aux=s_aux, qv=qv,
                        q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    _check_dense("q", q, "[batch, seqlen_q, num_heads, head_dim]")
    _check_dense("k", k, "[batch, seqlen_k, num_kv_heads, head_dim]")
    _check_dense("v", v, "[batch, seqlen_k, num_kv_heads, head_dim]")
    b, sq, h, d = q.shape
    sk = k.shape[1]
    for name, t in (("k", k), ("v", v)):
        if t.shape[0] != b:
            raise ValueError(f"{name}: batch size {t.shape[0]} does not match q's {b}")
    if v.shape[1] != sk:
        raise ValueError(f"v: has {v.shape[1]} keys per sample, k has {sk}; they must match")
    cu_q = _uniform_cu(b, sq, q.device)
    cu_k = cu_q if sk == sq else _uniform_cu(b, sk, q.device)
    res = _run(q.reshape(b * sq, h, d), k.reshape(b * sk, k.shape[2], k.shape[3]),
               v.reshape(b * sk, v.shape[2], v.shape[3]), cu_q, cu_k, sq, sk, softmax_scale, causal, window_size,
               softcap, return_attn_probs, backend, deterministic)
    if not return_attn_probs:
        return res.view(b, sq, h, d)
    out, lse, probs = res
    # [B, H, S_q] contiguous, as flash-attn allocates it (callers .view() it)
    return out.view(b, sq, h, d), lse.view(h, b, sq).transpose(0, 1).contiguous(), probs


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                              alibi_slopes=None, deterministic=False, return_attn_probs=False, *, backend=None):
    """Drop-in for ``flash_attn.flash_attn_qkvpacked_func``: self-attention on a dense batch ``qkv [B, S, 3, H, D]``
    (q, k, v the strided views ``qkv[:, :, i]``). Arguments, returns and errors as ``flash_attn_func`` (a
    ``ValueError`` naming ``qkv`` for a wrong layout)."""
    _refuse_unsupported(dropout_p, alibi_slopes, deterministic=deterministic)
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv: expected a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv: expected shape [batch, seqlen, 3, num_heads, head_dim], got {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, backend=backend)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             backend=None):
    """Drop-in for ``flash_attn.flash_attn_kvpacked_func``: ``q [B, S_q, H, D]`` attends to ``kv [B, S_k, 2, H_kv,
    D]`` (keys ``kv[:, :, 0]``, values ``kv[:, :, 1]``, strided views; ``H % H_kv == 0``). Arguments, returns and
    errors as ``flash_attn_func`` (a ``ValueError`` naming ``kv`` for a wrong layout)."""
    _refuse_unsupported(dropout_p, alibi_slopes, deterministic=deterministic)
    if not isinstance(kv, torch.Tensor):
        raise TypeError(f"kv: expected a torch.Tensor, got {type(kv).__name__}")
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv: expected shape [batch, seqlen_k, 2, num_kv_heads, head_dim], got {tuple(kv.shape)}")
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, backend=backend)
