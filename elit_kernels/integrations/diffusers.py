"""``elit_kernels`` as diffusers attention, without the flash-attn package.

    from elit_kernels.integrations.diffusers import use_elit
    use_elit(transformer)          # every attention of the model, whichever route it takes

Supported: diffusers 0.42.x (tested with 0.42.1). Two routes, because diffusers models reach attention in two ways:

1. **The attention dispatcher** (Flux, QwenImage, Wan, ... : processors with an ``_attention_backend``
   attribute that call ``dispatch_attention_fn``). diffusers has no public way to add a backend: its names are
   the closed enum ``AttentionBackendName``. ``register()`` adds the member ``ELIT = "elit"`` to that enum and
   registers ``elit_dispatch_attention`` for it; then ``model.set_attention_backend("elit")``,
   ``with attention_backend("elit"):`` and ``use_elit(model)`` work as for the built-in backends.
2. **Attention processors** (DiT, PixArt: ``AttnProcessor2_0`` / ``AttnProcessor``; SD3: ``JointAttnProcessor2_0``),
   which call ``F.scaled_dot_product_attention`` themselves: ``use_elit`` replaces them with
   ``ElitAttnProcessor`` / ``ElitJointAttnProcessor``, which compute the same projections and norms, accept the
   same attention masks and run the attention through ``elit_kernels``. One deliberate difference: the
   replacement applies ``attn.scale`` (the model's declared scale, as ``AttnProcessor`` does), where
   ``AttnProcessor2_0`` ignores it; they differ only for ``Attention(scale_qk=False)`` given an
   ``AttnProcessor2_0`` by hand (diffusers picks ``AttnProcessor`` for those), and ``use_elit`` warns then.

``is_causal`` (dispatcher) is top-left aligned as diffusers' ``"native"`` backend (SDPA) computes it, also when
``S_q != S_k``; the kernels' own causal is bottom-right (flash-attn), so ``attention_bshd`` shifts it.

Private names touched (all in ``diffusers.models.attention_dispatch`` unless said): ``_AttentionBackendRegistry``
(its ``register`` decorator and the ``_backends`` table), the ``Enum`` internals of ``AttentionBackendName``
(``_member_map_``, ``_value2member_map_``, ``_member_names_``) to add the member, and the processors'
``_attention_backend`` attribute (set by ``use_elit``). When a diffusers version moves one of them, ``register``
raises ``ImportError`` naming the missing name, the installed version and the supported one.

Masks: a boolean mask (True = attend) or an additive one (0 = attend, <= -1e4 = masked, as diffusers' models
build them) that is the same for every query and head is a *key mask*: the valid keys of each sample are
gathered wherever they are (not assumed to be a prefix) and the batch runs as one packed call. A mask that
differs between queries or heads, or an additive bias with other values, raises ``NotImplementedError`` naming
``attn_mask``; so do ``dropout_p > 0`` and context parallelism (``_parallel_config``). A mask together with
``is_causal`` raises ``ValueError`` naming ``is_causal`` (SDPA refuses the pair too).
"""
from __future__ import annotations

import importlib.metadata
import math
import warnings

import torch

from .._types import check_bool
from ..attention import get_backend
from ..dropin import _uniform_cu, flash_attn_func, flash_attn_varlen_func
from ..layout import _cu  # int32 [n + 1] offsets of a lengths tensor

SUPPORTED = "diffusers 0.42.x (tested with 0.42.1)"
NAME = "elit"
_bound: list = []  # the backend the dispatcher entry runs, once registered
# Additive masks: at or below this a key counts as masked (diffusers builds -10000 or finfo.min biases).
_MASKED_BELOW = -1e4


def _version() -> str:
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _dispatch_module():
    try:
        from diffusers.models import attention_dispatch as ad
    except ImportError as e:
        raise ImportError(f"elit_kernels.integrations.diffusers needs {SUPPORTED}; importing "
                          f"diffusers.models.attention_dispatch failed ({e}); installed: {_version()}") from e
    for name in ("AttentionBackendName", "_AttentionBackendRegistry"):
        if not hasattr(ad, name):
            raise ImportError(f"elit_kernels.integrations.diffusers supports {SUPPORTED}: diffusers {_version()} has "
                              f"no diffusers.models.attention_dispatch.{name}")
    enum_cls, reg = ad.AttentionBackendName, ad._AttentionBackendRegistry
    for owner, name in ((enum_cls, "_member_map_"), (enum_cls, "_value2member_map_"), (enum_cls, "_member_names_"),
                        (reg, "register"), (reg, "_backends")):
        if not hasattr(owner, name):
            raise ImportError(f"elit_kernels.integrations.diffusers supports {SUPPORTED}: diffusers {_version()} has "
                              f"no {owner.__name__}.{name}")
    return ad


def _add_enum_member(enum_cls, name: str, value: str):
    """The member ``enum_cls.<name> = value``, added once (a ``str`` enum: built as ``str.__new__``)."""
    if value in enum_cls._value2member_map_:
        return enum_cls._value2member_map_[value]
    member = str.__new__(enum_cls, value)
    member._name_, member._value_ = name, value
    member.__objclass__ = enum_cls
    if hasattr(enum_cls, "_sort_order_"):
        member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    if name not in enum_cls.__dict__:  # attribute access (AttentionBackendName.ELIT), bypassing the enum's guard
        type.__setattr__(enum_cls, name, member)
    if enum_cls(value) is not member:
        raise ImportError(f"elit_kernels.integrations.diffusers supports {SUPPORTED}: could not add the member "
                          f"{name}={value!r} to AttentionBackendName in diffusers {_version()}")
    return member


def key_mask(attn_mask: torch.Tensor, batch: int, seqlen_q: int, seqlen_k: int, heads: int) -> torch.Tensor:
    """``attn_mask`` as a boolean key mask ``[batch, seqlen_k]`` (True = attend).

    Accepts boolean masks (True = attend) and additive ones (0 = attend, <= -1e4 = masked: a sample whose keys are
    all masked has no valid key and gets zeros, where SDPA adds the one bias to every score and gives what its
    rounding leaves, ordinary attention for -1e4 and a plain mean for finfo.min), shaped ``[S_k]`` (one
    key mask for every sample: SDPA, diffusers' native backend, broadcasts it so, and diffusers' varlen backends
    read it so in ``_normalize_attn_mask``), ``[B | 1, S_k]``, ``[B | 1, 1 | S_q, S_k]`` or
    ``[B | 1, 1 | H, 1 | S_q, S_k]`` (diffusers' layouts: a 2-D mask is per sample, a 3-D one per sample and query;
    SDPA itself, the native backend, broadcasts a 3-D mask's first dim over heads: when B == H the two readings
    differ, and this one is diffusers').
    Raises ``NotImplementedError`` naming ``attn_mask`` when the mask differs between queries or heads, or holds
    additive values other than 0 and <= -1e4; ``ValueError`` naming ``attn_mask`` for any other shape, listing the
    supported ones: "does not broadcast" when even SDPA's reading of the shape fails to broadcast to
    ``[batch, heads, seqlen_q, seqlen_k]`` (a wrong S_k), "is not supported" otherwise (e.g. ``[S_q, S_k]``, which
    SDPA takes as a per-query mask but diffusers' 2-D layout reads as ``[B, S_k]``).
    """
    m = attn_mask
    if m.dtype != torch.bool:
        ok = m == 0
        if not bool((ok | (m <= _MASKED_BELOW)).all()):
            raise NotImplementedError("attn_mask: additive biases other than 0 (attend) and <= -1e4 (masked) are not "
                                      "supported; pass a boolean mask")
        m = ok
    if m.dim() == 1:
        m = m[None, None, None, :]
    elif m.dim() == 2:
        m = m[:, None, None, :]
    elif m.dim() == 3:
        m = m[:, None]
    if m.dim() != 4 or m.shape[-1] != seqlen_k or m.shape[0] not in (1, batch) or m.shape[1] not in (1, heads) \
            or m.shape[2] not in (1, seqlen_q):
        target = (batch, heads, seqlen_q, seqlen_k)
        try:  # SDPA's own reading of the shape: when even that fails, the shape broadcasts in no layout
            torch.broadcast_shapes(tuple(attn_mask.shape), target)
            why = "is not supported"
        except RuntimeError:
            why = "does not broadcast to [batch={}, heads={}, seqlen_q={}, seqlen_k={}]".format(*target)
        raise ValueError(f"attn_mask: shape {tuple(attn_mask.shape)} {why}; expected [S_k], [B | 1, S_k], "
                         f"[B | 1, 1 | S_q, S_k] or [B | 1, 1 | H, 1 | S_q, S_k] with B={batch}, H={heads}, "
                         f"S_q={seqlen_q}, S_k={seqlen_k} (diffusers' layouts: a 2-D mask is per sample, a 3-D one "
                         "per sample and query)")
    first = m[:, :1, :1]
    if not bool((m == first).all()):
        raise NotImplementedError("attn_mask: masks that differ between queries or heads are not supported (only key "
                                  "masks, the same for every query of a sample)")
    return first[:, 0, 0].expand(batch, seqlen_k)


def _causal_top_left(query, key, value, scale, dropout_p, backend):
    """``is_causal`` as ``torch.nn.functional.scaled_dot_product_attention`` (diffusers' native backend) aligns
    it: top-left, query ``i`` sees key ``j`` iff ``j <= i``. The kernels' ``causal`` is bottom-right
    (``j <= i + S_k - S_q``, flash-attn); the two agree when ``S_q == S_k``. ``S_q < S_k``: keys from ``S_q`` on
    are seen by no query, so the call runs on the first ``S_q`` keys with bottom-right causal (their gradients
    are zeros). ``S_q > S_k``: no causal, window ``(-1, S_q - S_k)`` (query ``i`` sees
    ``j <= i + S_k - S_q + (S_q - S_k) = i``)."""
    sq, sk = query.shape[1], key.shape[1]
    if sq <= sk:
        return flash_attn_func(query, key[:, :sq], value[:, :sq], dropout_p, scale, True, backend=backend)
    return flash_attn_func(query, key, value, dropout_p, scale, False, (-1, sq - sk), backend=backend)


def attention_bshd(query, key, value, attn_mask=None, *, scale=None, is_causal=False, dropout_p=0.0, backend=None):
    """Attention on ``[B, S_q, H, D]`` queries and ``[B, S_k, H_kv, D]`` keys/values (``H % H_kv == 0``) ->
    ``[B, S_q, H, D]``, with an optional key mask (``key_mask``): the valid keys of each sample are gathered
    wherever they are and all samples run as one packed ``flash_attn_varlen_func`` call. A query whose sample
    has no valid key gets zeros (SDPA, given an additive mask, returns what its rounding of the shared bias
    leaves: see ``key_mask``).

    ``is_causal``: top-left aligned, as ``torch.nn.functional.scaled_dot_product_attention`` and diffusers'
    native backend (query ``i`` sees key ``j`` iff ``j <= i``; differs from flash-attn's bottom-right alignment
    when ``S_q != S_k``). Raises ``ValueError`` naming ``is_causal`` when it comes with ``attn_mask`` (SDPA
    refuses that pair too; the gathered keys would lose their positions); otherwise as ``key_mask`` and
    ``flash_attn_varlen_func``."""
    is_causal = check_bool("is_causal", is_causal)  # a truthy "False" turned causal on
    if is_causal and attn_mask is not None:
        raise ValueError("is_causal: True together with attn_mask is not supported (as torch's "
                         "scaled_dot_product_attention, diffusers' native backend, refuses it): pass is_causal=False "
                         "with a mask, or is_causal=True without one")
    if attn_mask is None:
        if is_causal:
            return _causal_top_left(query, key, value, scale, dropout_p, backend)
        return flash_attn_func(query, key, value, dropout_p, scale, False, backend=backend)
    b, sq, h, d = query.shape
    sk = key.shape[1]
    ok = key_mask(attn_mask.to(query.device), b, sq, sk, h)
    idx = ok.flatten().nonzero().flatten()
    counts = ok.sum(1)
    cu_k, cu_q = _cu(counts), _uniform_cu(b, sq, query.device)
    out = flash_attn_varlen_func(query.reshape(b * sq, h, d), key.reshape(b * sk, *key.shape[2:])[idx],
                                 value.reshape(b * sk, *value.shape[2:])[idx], cu_q, cu_k, sq, int(counts.max()),
                                 dropout_p, scale, False, backend=backend)
    return out.view(b, sq, h, d)


def elit_dispatch_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                            scale: float | None = None, enable_gqa: bool = False, _parallel_config=None, *,
                            elit_backend: str | None = None) -> torch.Tensor:
    """The ``"elit"`` backend of diffusers' attention dispatcher: ``[B, S, H, D]`` in and out (the dispatcher's
    layout), GQA when k/v have fewer heads (``enable_gqa`` or not), masks as ``attention_bshd``; ``is_causal``
    top-left aligned as diffusers' ``"native"`` backend (SDPA) computes it, also when ``S_q != S_k``.

    Raises ``NotImplementedError`` naming ``_parallel_config`` (context parallelism), ``dropout_p`` (> 0) or
    ``attn_mask`` (see ``key_mask``); ``ValueError`` naming ``is_causal`` when it comes with ``attn_mask``
    (``"native"`` raises for that pair too).
    """
    if _parallel_config is not None:
        raise NotImplementedError("_parallel_config: context parallelism is not supported by the elit backend")
    return attention_bshd(query, key, value, attn_mask, scale=scale, is_causal=is_causal, dropout_p=dropout_p,
                          backend=elit_backend)


def register(backend: str | None = None):
    """Add ``"elit"`` to diffusers' attention dispatcher (``AttentionBackendName.ELIT``) running
    ``elit_dispatch_attention`` on ``elit_kernels`` backend ``backend`` (None: dispatch per call). Idempotent;
    a second call rebinds ``backend``. Returns the enum member.

    The dispatcher backend is one per process: rebinding it to another ``backend`` changes it for every model
    already routed through it (``use_elit``), so a rebind warns, naming both backends.

    Raises ``ImportError`` naming the supported diffusers version and the missing name when the private names
    listed in the module docstring have moved; ``ValueError`` / ``TypeError`` naming ``backend`` when it is not
    None or a registered ``varlen_attention`` backend.
    """
    if backend is not None:
        get_backend(backend)  # an unknown name is named now, not at the first forward
    ad = _dispatch_module()
    if _bound and _bound[-1] != backend:
        warnings.warn(f"register: the '{NAME}' attention dispatcher backend ran elit_kernels backend {_bound[-1]!r}; "
                      f"it now runs {backend!r} for every model routed through it (ElitAttnProcessor / "
                      "ElitJointAttnProcessor keep the backend they were made with; use_elit(model, backend) "
                      "rebinds a model's)", stacklevel=2)
    _bound[:] = [backend]
    member = _add_enum_member(ad.AttentionBackendName, NAME.upper(), NAME)

    def elit(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
             _parallel_config=None):
        return elit_dispatch_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                       _parallel_config, elit_backend=backend)

    elit.__doc__ = elit_dispatch_attention.__doc__
    ad._AttentionBackendRegistry.register(member)(elit)
    if ad._AttentionBackendRegistry._backends.get(member) is not elit:
        raise ImportError(f"elit_kernels.integrations.diffusers supports {SUPPORTED}: registering the backend in "
                          f"diffusers {_version()} did not reach _AttentionBackendRegistry._backends")
    return member


def _default_scale(attn) -> float | None:
    """The softmax scale ``AttnProcessor2_0`` runs with whatever ``attn.scale`` says: SDPA's default,
    ``head_dim**-0.5`` with ``head_dim = to_k.out_features // heads`` (its own computation); None for a module
    without ``scale``, ``heads`` or a linear ``to_k``."""
    out = getattr(getattr(attn, "to_k", None), "out_features", None)
    if not isinstance(getattr(attn, "scale", None), (int, float)) or not getattr(attn, "heads", None) or not out:
        return None
    return (out // attn.heads) ** -0.5


class ElitAttnProcessor:
    """Processor for diffusers' ``Attention`` modules that default to ``AttnProcessor2_0`` / ``AttnProcessor``
    (DiT, PixArt, UNet blocks): the same projections, norms, residual and rescale, with the attention run by
    ``elit_kernels`` (``attention_bshd``).

    ``attention_mask``: every form those processors accept, prepared the same way (``attn.prepare_attention_mask``,
    then viewed as ``[batch, heads, 1 | S_q, S_k]``): ``[B, S_k]``, ``[B, 1 | S_q, S_k]``,
    ``[B * heads, 1 | S_q, S_k]``, boolean or additive; then read as ``key_mask`` (a mask that differs between
    queries or heads raises ``NotImplementedError`` naming ``attn_mask``).

    Scale: ``attn.scale``, the model's declared scale, as ``AttnProcessor`` (``get_attention_scores``) applies it.
    ``AttnProcessor2_0`` ignores ``attn.scale`` and runs SDPA's default ``head_dim**-0.5``, so the two agree exactly
    when ``attn.scale == head_dim**-0.5`` (``scale_qk=True``, the default); for ``scale_qk=False``
    (``attn.scale = 1.0``, e.g. T5FilmDecoder) this processor matches ``AttnProcessor``, which is what diffusers
    itself picks for such modules, not an ``AttnProcessor2_0`` set on them by hand (``use_elit`` warns when it
    replaces one)."""

    def __init__(self, backend: str | None = None):
        self.backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image = hidden_states.dim() == 4
        if image:
            b, c, hh, ww = hidden_states.shape
            hidden_states = hidden_states.view(b, c, hh * ww).transpose(1, 2)
        if attention_mask is not None:  # as AttnProcessor2_0: lengths from the keys' source, [B, H, 1 | S_q, S_k]
            batch, seqlen_k = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[:2]
            attention_mask = attn.prepare_attention_mask(attention_mask, seqlen_k, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, t.shape[-1] // head_dim, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = attention_bshd(q, k, v, attention_mask, scale=attn.scale, backend=self.backend)
        hidden_states = out.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if image:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, hh, ww)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class ElitJointAttnProcessor:
    """Processor for SD3's joint attention (``JointAttnProcessor2_0``): the sample's and the context's
    projections attend together (sample tokens first), split back after; attention by ``elit_kernels``."""

    def __init__(self, backend: str | None = None):
        self.backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("attention_mask: SD3's joint attention takes none (as diffusers' processor)")
        batch, n = hidden_states.shape[0], hidden_states.shape[1]
        head_dim = attn.to_k.out_features // attn.heads
        q, k, v = (p(hidden_states).view(batch, -1, attn.heads, head_dim) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if encoder_hidden_states is not None:
            cq, ck, cv = (p(encoder_hidden_states).view(batch, -1, attn.heads, head_dim)
                          for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 1), torch.cat([k, ck], 1), torch.cat([v, cv], 1)
        out = attention_bshd(q, k, v, backend=self.backend).reshape(batch, -1, attn.heads * head_dim).to(q.dtype)
        context = None
        if encoder_hidden_states is not None:
            out, context = out[:, :n], out[:, n:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if context is None else (out, context)


# diffusers processors that ElitAttnProcessor / ElitJointAttnProcessor compute the same attention as.
_PROCESSOR_FOR = {"AttnProcessor2_0": ElitAttnProcessor, "AttnProcessor": ElitAttnProcessor,
                  "JointAttnProcessor2_0": ElitJointAttnProcessor}


def use_elit(model: torch.nn.Module, backend: str | None = None) -> dict:
    """Route every attention of diffusers ``model`` through ``elit_kernels``.

    Dispatcher-based processors (those with ``_attention_backend``) get the ``"elit"`` dispatcher backend
    (``register``); ``AttnProcessor2_0`` / ``AttnProcessor`` / ``JointAttnProcessor2_0`` are replaced by
    ``ElitAttnProcessor`` / ``ElitJointAttnProcessor``. Other processors (IP-adapter, LoRA-fused, ...) are left
    as they are, with one warning naming their classes.

    ``backend``: the ``varlen_attention`` backend (None: dispatch per call). The replaced processors keep it per
    model; the dispatcher entry is one per process, so routing a second model with another backend changes it
    for the first too (``register`` warns when it does). Calling ``use_elit`` again on the same model with
    another backend rebinds it: processors already ours that ran another backend are replaced by new ones
    running ``backend`` (new instances: a processor shared with another model is not changed), with a warning
    naming both backends.

    An ``AttnProcessor2_0`` on a module whose ``attn.scale`` is not ``head_dim**-0.5`` (``scale_qk=False``, set by
    hand: diffusers picks ``AttnProcessor`` there) ignored that scale; its replacement applies it (see
    ``ElitAttnProcessor``), so the outputs change: warned, naming the count.

    Returns ``{"dispatcher": n, "processor": n, "rebound": n, "unchanged": [class names]}``: ``processor`` counts
    the modules whose processor is ours after the call (replaced now or already ours), ``rebound`` those of them
    that were ours with another backend. Raises ``ImportError`` and the ``backend`` errors as ``register``;
    ``TypeError`` naming ``model`` when it is not a ``torch.nn.Module``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a diffusers model), got {type(model).__name__}")
    member = register(backend)
    report = {"dispatcher": 0, "processor": 0, "rebound": 0, "unchanged": []}
    old_backends, rescaled = set(), 0
    for module in model.modules():
        proc = getattr(module, "processor", None)
        if proc is None or not hasattr(module, "set_processor"):
            continue
        if hasattr(proc, "_attention_backend"):
            proc._attention_backend = member
            report["dispatcher"] += 1
        elif type(proc).__name__ in _PROCESSOR_FOR:
            default = _default_scale(module) if type(proc).__name__ == "AttnProcessor2_0" else None
            if default is not None and not math.isclose(module.scale, default):
                rescaled += 1
            module.set_processor(_PROCESSOR_FOR[type(proc).__name__](backend))
            report["processor"] += 1
        elif isinstance(proc, (ElitAttnProcessor, ElitJointAttnProcessor)):
            if proc.backend != backend:
                old_backends.add(proc.backend)
                module.set_processor(type(proc)(backend))
                report["rebound"] += 1
            report["processor"] += 1
        else:
            report["unchanged"].append(type(proc).__name__)
    if report["rebound"]:
        warnings.warn(f"use_elit: {report['rebound']} elit attention processors ran elit_kernels backend(s) "
                      f"{', '.join(sorted(repr(b) for b in old_backends))}; they now run {backend!r}", stacklevel=2)
    if rescaled:
        warnings.warn(f"use_elit: {rescaled} AttnProcessor2_0 processors were on attentions whose attn.scale is not "
                      "head_dim**-0.5 (scale_qk=False); AttnProcessor2_0 ignored attn.scale, ElitAttnProcessor "
                      "applies it (as AttnProcessor, diffusers' own choice for such modules), so their outputs "
                      "change", stacklevel=2)
    if report["unchanged"]:
        warnings.warn(f"use_elit: {len(report['unchanged'])} attention processors kept their own attention "
                      f"(classes {sorted(set(report['unchanged']))}): elit_kernels has no equivalent processor for them",
                      stacklevel=2)
    return report


__all__ = ["ElitAttnProcessor", "ElitJointAttnProcessor", "attention_bshd", "elit_dispatch_attention", "key_mask",
           "register", "use_elit"]
