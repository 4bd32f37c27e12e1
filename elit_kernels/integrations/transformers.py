"""``elit_kernels`` as a transformers attention implementation.

    from elit_kernels.integrations.transformers import register
    register()                                   # once per process
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="elit")   # or model.set_attn_implementation("elit")

Supported: transformers 5.x (tested with 5.24.0). Public APIs only: ``transformers.AttentionInterface.register``
and ``transformers.AttentionMaskInterface.register`` (both documented under "Attention interface"); no private
name is read or patched. Both are registered under the same name: transformers builds the mask with the
function registered for the model's ``attn_implementation``, and without one it passes no mask at all (a
left-padded batch would then attend to its padding).

What the attention function handles (all through ``elit_kernels.flash_attn_varlen_func`` / ``flash_attn_func``,
flash-attn semantics, bottom-right aligned causal mask):

- **padding** (left, right, or holes between valid tokens): the mask function hands over the 2-D boolean key mask
  ``[B, kv_length]``; valid keys and queries are gathered wherever they are, run as one packed call, and the
  output is scattered back. Causal or windowed self-attention: the queries are the last ``S_q`` keys, and rows
  of padded queries are zeros. Otherwise (cross-attention, whose mask is the encoder's; bidirectional
  self-attention) every query attends to the valid keys of its row, as in eager attention. Holes with a sliding
  window: the packed call counts the window over the gathered valid tokens, transformers over positions; the
  two agree for left/right padding and for holes no query's window reaches past, and any other hole raises
  ``ValueError`` naming ``attention_mask`` (checked exactly, per query; use ``sdpa`` / ``eager`` for such a batch);
- **packed sequences**: ``cu_seq_lens_q/k`` + ``max_length_q/k`` keyword arguments (``DataCollatorWithFlattening``;
  ``max_length_*`` may be 0-dim tensors), or ``position_ids`` that restart (a new sequence wherever the position
  does not grow by 1: the rule of transformers' sdpa/eager masks, ``find_packed_sequence_indices``, which split
  only without a cache and a 2-D mask; its flash-attention path starts a sequence only where the position is its
  minimum), also under ``torch.compile`` (read on the device). With a padding mask,
  ``position_ids`` are not read, as in every transformers path (``generate`` gives padding slots position 1,
  which read as a restart had cut the tokens after a hole off from those before it);
- **KV cache**: keys longer than queries; the queries are the last ones (bottom-right alignment);
- **GQA / MQA**: key/value heads are passed as they are (no ``repeat_kv``);
- **sliding window** (``sliding_window=w``, Mistral): ``window_size=(w - 1, w - 1)`` with causal, i.e. a query sees
  itself and the ``w - 1`` keys before it, as transformers' masks and its flash-attention path do (positions; see
  padding for holes);
- **softcap** (Gemma-2 style ``softcap=``);
- **autocast**: fp32 q/k/v (RoPE in fp32 beside a bf16 projection) run in the autocast dtype, as transformers'
  flash-attention path casts them.

Refused with an error naming the argument: ``s_aux`` (attention sinks), ``dropout > 0`` (``NotImplementedError``),
a padding hole that changes what a sliding window holds (``ValueError``, see padding),
an attention mask that is not the 2-D boolean mask of our mask function (``TypeError``), and mask overlays that
a 2-D mask cannot express (``or_mask_function`` / ``and_mask_function``, and any mask that lets some queries see
the key after them and not others, e.g. PaliGemma's bidirectional image tokens given as ``block_sequence_ids``:
``NotImplementedError`` from the mask function), and chunked attention (``attention_chunk_size``) once a query
lies past its first chunk. Not detected: an overlay that makes a causal model's whole sequence bidirectional (it
reads as a bidirectional mask); under ``torch.compile`` neither probe runs (each is a host read).
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import warnings

import torch

from .._amp import autocast_device
from .._types import is_int
from ..attention import get_backend
from ..attention.inputs import _flag
from ..dropin import flash_attn_func, flash_attn_varlen_func
from ..layout import _cu  # int32 [n + 1] offsets of a lengths tensor

SUPPORTED = "transformers 5.x (tested with 5.24.0)"


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"elit_kernels.integrations.transformers needs transformers ({SUPPORTED}): {e}") from e
    version = importlib.metadata.version("transformers")
    if int(version.split(".")[0]) < 5 or not hasattr(transformers, "AttentionMaskInterface"):
        raise ImportError(f"elit_kernels.integrations.transformers supports {SUPPORTED}; found transformers {version}, "
                          "which lacks AttentionInterface / AttentionMaskInterface registration")
    return transformers


def _as_cu(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != 1:
        raise TypeError(f"{name}: expected a 1-D integer tensor of cumulative lengths, got {type(t).__name__}")
    return t.to(torch.int32)


def _packing_starts(position_ids, batch: int, seqlen: int) -> torch.Tensor | None:
    """bool ``[batch, seqlen]``: the tokens that start a sequence of a packed row, or None when ``position_ids``
    is absent or not ``[1 | batch, seqlen]``. A new sequence starts at every row start and wherever the position
    does not grow by exactly 1 (transformers' ``find_packed_sequence_indices`` rule). On the device, no host
    read."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != seqlen \
            or position_ids.shape[0] not in (1, batch):
        return None
    pos = position_ids.expand(batch, -1)
    start = torch.ones_like(pos, dtype=torch.bool)
    start[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    return start


def _segment_lengths(start: torch.Tensor, valid: torch.Tensor, count: int) -> torch.Tensor:
    """Valid tokens in each of the first ``count`` packed sequences (``start``, ``valid``: bool ``[B, S]``); the
    sequences are numbered in flattened order, so ``count = B * S`` (static) leaves the unused ones empty."""
    seq = torch.cumsum(start.flatten().to(torch.int64), 0) - 1
    lengths = torch.zeros(count, dtype=torch.int64, device=start.device)
    return lengths.index_add_(0, seq.clamp_max(count - 1), valid.flatten().to(torch.int64))


def _packed_from_position_ids(position_ids: torch.Tensor, batch: int, seqlen: int):
    """``(cu_seqlens int32, max_seqlen)`` over the ``batch * seqlen`` flattened tokens when ``position_ids``
    restart inside a row (packed sequences), else None (``_packing_starts``).

    Eager: one host read, exactly the sequences. Under ``torch.compile`` (no host read): ``batch * seqlen``
    segments, those past the last sequence empty, and ``seqlen`` as the max length (an upper bound), whether
    or not the rows are packed; the checks never fall back to one dense causal call across sequences."""
    start = _packing_starts(position_ids, batch, seqlen)
    if start is None:
        return None
    if torch.compiler.is_compiling():
        ones = torch.ones_like(start)
        return _cu(_segment_lengths(start, ones, batch * seqlen)), seqlen
    count = int(start.sum())
    if count == batch:
        return None
    lengths = _segment_lengths(start, torch.ones_like(start), count)
    return _cu(lengths), int(lengths.max())


def _check_window_holes(key_ok: torch.Tensor, first_q: int, end_q: int, left: int, right: int,
                        sliding_window: int) -> None:
    """Raise ``ValueError`` naming ``attention_mask`` when a padding hole would change what a sliding window holds.

    The packed call applies the window to the gathered valid tokens (``left`` valid keys before a query and
    ``right`` after it), transformers applies it to positions (the valid keys among the ``left`` positions before
    and ``right`` after). The gathered window always holds the positional one; the two agree exactly when they
    hold as many keys, which this counts for every valid query (key positions ``first_q .. end_q - 1`` of
    ``key_ok``, bool ``[B, S_k]``), within its row (one sequence per row: with a padding mask, ``position_ids``
    are not read, as in transformers). Left or right padding never differs; a hole differs only when a query's
    window reaches past it. One host read."""
    b, sk = key_ok.shape
    valid = key_ok.to(torch.int64)
    upto = torch.cumsum(valid, 1)  # valid keys at positions <= p
    before = upto - valid  # valid keys at positions < p
    pos = torch.arange(sk, device=key_ok.device).expand(b, sk)
    wrong = torch.zeros_like(key_ok)
    if left >= 0:
        lo = torch.clamp_min(pos - left, 0)
        wrong |= (upto - before.gather(1, lo)) != torch.clamp_max(upto, left + 1)
    if right >= 0:
        hi = torch.clamp_max(pos + right, sk - 1)
        wrong |= (upto.gather(1, hi) - before) != torch.clamp_max(upto[:, -1:] - before, right + 1)
    queries = key_ok.clone()
    queries[:, :first_q] = False
    queries[:, end_q:] = False
    if bool((wrong & queries).any()):
        raise ValueError(f"attention_mask: padding between the valid tokens of a sequence (a hole) inside a query's "
                         f"sliding window (sliding_window={sliding_window}) is not supported: elit attention packs "
                         "the valid tokens and would count the window over them, not over positions as transformers "
                         "does. Supported with a sliding window: left and/or right padding (each sequence's valid "
                         "tokens contiguous), and holes no query's window reaches past; without a window, holes "
                         "anywhere. Use attn_implementation='sdpa' or 'eager' for this batch")


def elit_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           sliding_window: int | None = None, softcap: float | None = None,
                           is_causal: bool | None = None, s_aux: torch.Tensor | None = None, *,
                           elit_backend: str | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function (the ``AttentionInterface`` signature).

    Arguments:
        query: ``[B, H, S_q, D]``; key, value: ``[B, H_kv, S_k, D]`` (``H % H_kv == 0``), as transformers passes
            them (after RoPE and the cache update).
        attention_mask: None, or the 2-D boolean ``[B, L]`` key mask from ``elit_attention_mask`` (``L <= S_k``:
            keys past ``L`` are not valid).
        scaling: softmax scale (default ``D**-0.5``); dropout: only 0.0; sliding_window: total causal window
            ``w`` (``window_size=(w - 1, w - 1)``, over positions: a padding hole that would make the packed
            window hold other keys raises ``ValueError`` naming ``attention_mask``); softcap: logit cap;
            is_causal: default ``module.is_causal``; s_aux: only None.
        kwargs: ``cu_seq_lens_q/k``, ``max_length_q/k`` (packed batches), ``position_ids``, ``deterministic``
            (default: ``$FLASH_ATTENTION_DETERMINISTIC == "1"``, as transformers' flash-attention path reads it;
            ``enable_full_determinism`` sets it); others are ignored as transformers' own implementations ignore
            them (``output_attentions`` warns: no weights are returned).
        elit_backend: keyword only, bound by ``register(backend=...)``: the ``varlen_attention`` backend.

    Returns:
        ``(out [B, S_q, H, D], None)``.
    """
    if kwargs.get("output_attentions", False):
        warnings.warn("elit attention does not return attention weights (output_attentions=True): use "
                      "attn_implementation='eager' for them", stacklevel=2)
    b, h, sq, d = query.shape
    sk = key.shape[2]
    amp = autocast_device(query)
    if amp is not None:
        # As transformers' flash-attention path (get_target_dtype) and its sdpa path (autocast casts SDPA's
        # inputs): under autocast, fp32 q/k/v run in its dtype. RoPE made q/k fp32 while v came from the
        # projection in bf16, and the mixed dtypes were refused.
        target = torch.get_autocast_dtype(amp)
        query, key, value = (t.to(target) if t.dtype == torch.float32 else t for t in (query, key, value))
    causal = bool(module.is_causal if is_causal is None else is_causal)
    if sliding_window is not None and (not is_int(sliding_window) or sliding_window < 0):
        raise ValueError(f"sliding_window: expected None or an int >= 1 (0: no window), got {sliding_window!r}")
    window = (sliding_window - 1, sliding_window - 1) if sliding_window else (-1, -1)
    deterministic = kwargs.get("deterministic")
    if deterministic is None:
        deterministic = os.environ.get("FLASH_ATTENTION_DETERMINISTIC", "0") == "1"
    fa = dict(dropout_p=dropout, softmax_scale=scaling, causal=causal, window_size=window,
              softcap=0.0 if softcap is None else softcap, s_aux=s_aux, backend=elit_backend,
              deterministic=deterministic)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, S, H, D] views

    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.dtype != torch.bool:
            raise TypeError("attention_mask: expected None or a 2-D boolean key mask [batch, kv_length] (from the "
                            "mask function registered by elit_kernels.integrations.transformers.register), got "
                            + (f"shape {tuple(attention_mask.shape)} dtype {attention_mask.dtype}"
                               if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__))
        if attention_mask.shape[0] != b:  # a [1, L] mask on a larger batch left every other sample without keys
            raise ValueError(f"attention_mask: has {attention_mask.shape[0]} rows for a batch of {b} (one key mask "
                             "row per sample)")
        key_ok = attention_mask[:, :sk]
        written = key_ok.shape[1]  # the mask covers the keys written so far (elit_attention_mask)
        if written < sk:  # a static cache longer than the mask: the rest is not written yet
            key_ok = torch.nn.functional.pad(key_ok, (0, sk - written), value=False)
        q_ok = torch.ones(b, sq, dtype=torch.bool, device=query.device)
        if (causal or window != (-1, -1)) and sq <= written:
            # Self-attention (a cache only adds keys before them): the queries are the last sq keys written,
            # and the mask's alignment matters. Without causality or a window (cross-attention, where the mask
            # is the encoder's; bidirectional self-attention) every query attends to the valid keys of its row.
            q_ok = key_ok[:, written - sq:written]
        # With a padding mask, position_ids are not read: transformers' sdpa, eager and flash-attention paths all
        # ignore them then (a padding slot's position, 1 under generate(), read as a restart cut the tokens after
        # a hole off from those before it)
        if window != (-1, -1) and sq <= written:
            _check_window_holes(key_ok, written - sq, written, window[0], 0 if causal else window[1],
                                sliding_window)
        len_q, len_k = q_ok.sum(1), key_ok.sum(1)  # one segment per row
        idx_q, idx_k = q_ok.flatten().nonzero().flatten(), key_ok.flatten().nonzero().flatten()
        out = flash_attn_varlen_func(q.reshape(b * sq, h, d)[idx_q], k.reshape(b * sk, *k.shape[2:])[idx_k],
                                     v.reshape(b * sk, *v.shape[2:])[idx_k], _cu(len_q), _cu(len_k),
                                     int(len_q.max()), int(len_k.max()), **fa)
        return out.new_zeros(b * sq, h, d).index_copy(0, idx_q, out).view(b, sq, h, d), None

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if all(x is not None for x in (cu_q, cu_k, max_q, max_k)):
        out = flash_attn_varlen_func(q.reshape(b * sq, h, d), k.reshape(b * sk, *k.shape[2:]),
                                     v.reshape(b * sk, *v.shape[2:]), _as_cu("cu_seq_lens_q", cu_q),
                                     _as_cu("cu_seq_lens_k", cu_k), max_q, max_k, **fa)
        return out.view(b, sq, h, d), None

    packed = _packed_from_position_ids(kwargs.get("position_ids"), b, sq) if sq == sk else None
    if packed is not None:
        cu, longest = packed
        out = flash_attn_varlen_func(q.reshape(b * sq, h, d), k.reshape(b * sk, *k.shape[2:]),
                                     v.reshape(b * sk, *v.shape[2:]), cu, cu, longest, longest, **fa)
        return out.view(b, sq, h, d), None

    return flash_attn_func(q, k, v, **fa), None


def elit_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                        mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers mask function (the ``AttentionMaskInterface`` signature) paired with
    ``elit_attention_forward``: the 2-D boolean key mask ``[batch, <= kv_length]`` of the keys written so far
    (the last ``kv_length`` columns of ``attention_mask``; without one, all ``q_offset + q_length`` written keys
    of a static cache, whose later slots are empty), or None when every key is valid. Causality, sliding windows and packed
    sequences are applied by the attention function itself (from ``is_causal``, ``sliding_window`` and
    ``position_ids``), as for transformers' flash-attention path.

    Raises ``NotImplementedError`` naming ``mask_function`` when transformers combined the causal mask with
    custom ``or``/``and`` overlays, which a key mask cannot express.
    """
    if kwargs.get("use_vmap", False):
        raise NotImplementedError("mask_function: the model adds custom or/and mask overlays (e.g. bidirectional "
                                  "image tokens), which elit attention cannot express; use attn_implementation='sdpa'")
    if mask_function is not None and _partly_sees_the_next_key(mask_function, batch_size, q_length, kv_length,
                                                               q_offset, kv_offset, kwargs.get("device")):
        raise NotImplementedError("mask_function: some queries may see the key after them and others may not (a "
                                  "bidirectional block over a causal mask, e.g. image tokens given as "
                                  "block_sequence_ids), which elit attention cannot express (it runs a mask causal "
                                  "or not as a whole); use attn_implementation='sdpa'")
    chunk = getattr(kwargs.get("config"), "attention_chunk_size", None)
    if mask_function is not None and _hides_earlier_chunks(mask_function, chunk, batch_size, q_length, q_offset,
                                                           kv_offset, kwargs.get("device")):
        raise NotImplementedError(f"mask_function: the model attends in chunks of attention_chunk_size={chunk} "
                                  "tokens and a query here lies past its first chunk, which elit attention cannot "
                                  "express (nor transformers' flash-attention path); use attn_implementation='sdpa'")
    if attention_mask is None:
        if kv_length <= q_length:  # no cache: every key is valid
            return None
        # A cache: its keys are the earlier tokens and these q_length ones, up to q_offset + q_length; a static
        # cache has unwritten slots after them, which the key mask must exclude. q_offset (transformers'
        # cache_position[0], a tensor) is read on the host here, once per forward.
        written = int(q_offset) + q_length
        if written >= kv_length:
            return None
        return torch.ones(batch_size, written, dtype=torch.bool, device=kwargs.get("device"))
    if attention_mask.dim() != 2:
        raise TypeError(f"attention_mask: expected a 2-D [batch, kv_length] padding mask, got shape "
                        f"{tuple(attention_mask.shape)}")
    attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def _partly_sees_the_next_key(mask_function, batch_size: int, q_length: int, kv_length: int, q_offset, kv_offset,
                              device) -> bool:
    """Whether ``mask_function`` lets some queries see the key right after them and not others: True for a causal
    mask with a bidirectional overlay (transformers adds ``block_sequence_ids`` with ``or_masks`` without marking
    ``use_vmap``), False for a causal mask (no query sees it), a bidirectional one (every query does) and a decoding
    step (no such key). Evaluated on those ``B x (S_q - 1)`` pairs only (``_mask_at``); one host read."""
    if torch.compiler.is_compiling():  # a host read would break the graph: the eager calls check it
        return False
    q0 = q_offset if isinstance(q_offset, int) else int(q_offset)
    n = min(q_length, kv_offset + kv_length - q0) - 1  # queries q0 + i with a key q0 + i + 1
    if n < 1:
        return False
    i = torch.arange(n, device=device)[None]
    seen = _mask_at(mask_function, batch_size, q0 + i, q0 + i + 1, device)
    return bool(seen.any()) and not bool(seen.all())


def _hides_earlier_chunks(mask_function, chunk, batch_size: int, q_length: int, q_offset, kv_offset, device) -> bool:
    """Whether ``mask_function`` is chunked attention that matters here (``config.attention_chunk_size``, Llama 4's
    local layers): some query past the first chunk cannot see the key just before its chunk, which a causal mask
    shows it. False for the model's full-attention layers (their mask shows it) and without a chunk size. One host
    read; skipped while tracing."""
    if not (isinstance(chunk, int) and chunk > 0) or torch.compiler.is_compiling():
        return False
    q0 = q_offset if isinstance(q_offset, int) else int(q_offset)
    p = torch.arange(q0, q0 + q_length, device=device)
    before = (p // chunk) * chunk - 1  # the last key of the previous chunk
    keep = before >= kv_offset
    if not bool(keep.any()):
        return False
    return not bool(_mask_at(mask_function, batch_size, p[keep][None], before[keep][None], device).all())


def _mask_at(mask_function, batch_size: int, q_idx: torch.Tensor, kv_idx: torch.Tensor, device) -> torch.Tensor:
    """bool ``[B, n]``: ``mask_function`` at the query / key positions ``q_idx`` / ``kv_idx`` (``[1, n]`` each) of
    every sample, head 0, with index tensors as transformers' own non-vmap masks pass them (elementwise mask
    functions broadcast them)."""
    seen = mask_function(torch.arange(batch_size, device=device)[:, None],
                         torch.zeros((), dtype=torch.long, device=device), q_idx, kv_idx)
    return torch.as_tensor(seen, device=device).expand(batch_size, q_idx.shape[-1])


#: transformers' own attention implementations, for versions whose registries cannot say which entries are theirs
_BUILTIN_FALLBACK = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")


def _builtin_names(transformers) -> set[str]:
    """The ``attn_implementation`` names transformers defines itself (registry entries whose function comes from
    transformers, ``eager``, and the ``paged|...`` forms), so that ``register`` can refuse to replace one."""
    names = set(_BUILTIN_FALLBACK)
    for interface in (transformers.AttentionInterface, transformers.AttentionMaskInterface):
        for key, fn in getattr(interface, "_global_mapping", {}).items():
            if getattr(fn, "__module__", "").startswith("transformers"):
                names.add(key)
    return names


#: the names ``register`` accepts (besides transformers' own with ``replace_builtin``): an ASCII letter, then
#: letters, digits, ``_`` or ``-``
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
#: substrings transformers reads in an ``attn_implementation`` name (``is_flash_attention_requested``, the checks
#: of ``PreTrainedModel.get_correct_attn_implementation``): a name holding one is not treated as a plain entry
_READ_BY_TRANSFORMERS = ("flash", "flex_attention", "sdpa")


def _check_name(name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless transformers would look it up as it is. transformers 5.24 reads
    more than the registry key: it strips a ``paged|`` prefix, loads ``org/repo[:fn]`` names from the Hub
    (``is_kernel``), and routes names containing ``flash`` / ``flex_attention`` / ``sdpa`` through the checks of
    its own implementations (``modeling_utils``)."""
    allowed = ("an ASCII letter followed by letters, digits, '_' or '-' (e.g. 'elit', 'elit_cpp'), without "
               f"{', '.join(repr(x) for x in _READ_BY_TRANSFORMERS)}")
    if not _NAME.fullmatch(name):
        why = ("it is empty" if not name else
               "transformers strips the 'paged|' prefix and would run the name after it"
               if name.startswith("paged|") else
               "transformers loads names of the form 'org/repo[:function]' as Hub kernels" if "/" in name else
               "it is not a plain identifier (spaces, separators and other characters are not looked up as typed)")
        raise ValueError(f"name: {name!r} cannot be registered: {why}. Allowed: {allowed}")
    for part in _READ_BY_TRANSFORMERS:
        if part in name:
            raise ValueError(f"name: {name!r} contains {part!r}, which transformers reads as a request for its own "
                             f"{part} attention path (model checks, imports). Allowed: {allowed}")


def register(name: str = "elit", backend: str | None = None, *, replace_builtin: bool = False) -> str:
    """Register ``elit_attention_forward`` and ``elit_attention_mask`` with transformers under ``name``.

    Arguments:
        name: the ``attn_implementation`` to register (``from_config(cfg, attn_implementation=name)`` or
            ``model.set_attn_implementation(name)``). Registering again under a name of ours rebinds it.
        backend: the ``varlen_attention`` backend to run (None: dispatch per call).
        replace_builtin: allow ``name`` to be one of transformers' own implementations (``sdpa``,
            ``flash_attention_2``, ...). transformers' registry is process-wide, so that replaces the built-in
            for every model in the process, including ones that never asked for ours; off by default.

    Returns ``name``. Raises ``ImportError`` naming the supported transformers version when it is missing or
    lacks the registration interfaces; ``TypeError`` naming ``name`` when it is not a str; ``ValueError``
    naming ``name`` when it is one of transformers' own implementations and ``replace_builtin`` is off, or
    when it is not one of ours as transformers would look it up: an ASCII letter, then letters, digits, ``_``
    or ``-``, without ``flash``, ``flex_attention`` or ``sdpa`` (transformers strips ``paged|``, loads
    ``org/repo`` names from the Hub and routes those substrings to its own implementations' checks);
    ``ValueError`` / ``TypeError`` naming ``backend`` when it is not None or a registered ``varlen_attention``
    backend.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    replace_builtin = _flag("replace_builtin", replace_builtin)
    if backend is not None:
        get_backend(backend)  # an unknown name is named now, not at the first forward
    transformers = _transformers()
    builtin = _builtin_names(transformers)
    if name in builtin:
        if not replace_builtin:
            raise ValueError(f"name: {name!r} is transformers' own attention implementation; registering ours under "
                             "it would replace it for every model in this process. Use a name of ours (the default "
                             "'elit'), or pass replace_builtin=True to mean it. transformers' own: "
                             f"{', '.join(sorted(builtin))}")
    else:
        _check_name(name)

    def attention(module, query, key, value, attention_mask, **kwargs):
        return elit_attention_forward(module, query, key, value, attention_mask, elit_backend=backend, **kwargs)

    attention.__doc__ = elit_attention_forward.__doc__
    transformers.AttentionInterface.register(name, attention)
    transformers.AttentionMaskInterface.register(name, elit_attention_mask)
    return name
