"""Loader for the compiled extension ``elit_kernels._C`` (csrc/).

When ``_C`` loads, this module registers, on the Python side, what the C++ schemas need:

- fake (meta) impls and autograd formulas for every ``torch.ops.elit.*`` op defined in C++;
- the ``"fused"`` elementwise implementation (``elit_kernels.elementwise``);
- the output poison switch (``elit_kernels._outputs``, ``ELIT_POISON_OUTPUTS``), handed to ``_C`` now and on
  every change.

The attention backends over these ops (``cuda``, ``cpp``) live in ``elit_kernels.attention.backends.compiled``
and ask this loader whether they can run. When ``_C`` is missing, or was built for another torch, it warns
once (with the build info and how to build), ``unavailable_reason`` says why, and the pure-Python backends
keep working. Importing this module never raises because of the extension; it imports nothing from the
attention package or the model.

Ops (shapes as in ``varlen_attention``)::

    out, lse = torch.ops.elit.varlen_attn_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal)  # lse [H, total_q]
    # optional trailing window_left=-1, window_right=-1, softcap=0.0 (sliding window / logit cap, CPU only)
    # k/v [total_k, H_kv, D] with H % H_kv == 0; lse +inf on rows that see no key
    out, mean, rstd = torch.ops.elit.layernorm_modulate_fwd(x, shift, scale, index, eps)
    out = torch.ops.elit.gated_residual_fwd(x, y, gate, index)
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings

import torch

from . import _outputs
from ._autograd import alert_not_deterministic, first_order_only, register_varlen_autograd, saveable_index
from ._transforms import _fwd, active_transform, peek
from .elementwise import ElementwiseImpl, check_eps, register_elementwise

_C = None
_BUILD_INFO: dict | None = None  # read once at load: a pybind call inside dispatch would break torch.compile graphs
load_error: str | None = None  # the warning, when _C is not usable
unavailable_reason: str | None = None  # its short form, shown by describe_backends() for cuda/cpp
_BUILD_HINT = ("Build it with `pip install --no-build-isolation -e .` from the repository root (nvcc and a CUDA "
               "build of torch give the CUDA kernels; ELIT_SKIP_CUDA_BUILD=1 builds the C++ CPU ops only).")


def _warn_once(msg: str) -> None:
    global load_error
    if load_error is None:
        load_error = msg
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _load():
    global _C, _BUILD_INFO, unavailable_reason
    name = __name__.rpartition(".")[0] + "._C"
    # Look before importing: `from . import _C` inside the package's own __init__ reports a never-built
    # extension as "cannot import name '_C' from partially initialized module (circular import)", an
    # ImportError indistinguishable from a broken build.
    if importlib.util.find_spec(name) is None:
        unavailable_reason = f"{name} is not built (pip install --no-build-isolation -e .)"
        _warn_once(f"{name} is not built: the cuda/cpp backends and the 'fused' elementwise ops are off "
                   f"(running torch {torch.__version__}). {_BUILD_HINT}")
        return None
    try:
        ext = importlib.import_module(name)
    except ImportError as e:
        unavailable_reason = f"{name} failed to load ({e}); rebuild it for torch {torch.__version__}"
        _warn_once(f"{name} failed to load ({e}); it was probably built for another torch: the cuda/cpp backends "
                   f"and the 'fused' elementwise ops are off (running torch {torch.__version__}). {_BUILD_HINT}")
        return None
    info = ext.build_info()
    if info.get("torch_version") != torch.__version__:
        unavailable_reason = (f"{name} is stale: built for torch {info.get('torch_version')}, running torch "
                              f"{torch.__version__}; rebuild it")
        _warn_once(f"{name} is stale: built for torch {info.get('torch_version')}, running torch "
                   f"{torch.__version__} (build info: {info}); not using it. {_BUILD_HINT}")
        return None
    if not hasattr(ext, "set_poison_outputs"):  # built before the poison switch reached the compiled ops
        unavailable_reason = f"{name} is stale: it predates the output poison switch (set_poison_outputs); rebuild it"
        _warn_once(f"{name} is stale: it has no set_poison_outputs, so ELIT_POISON_OUTPUTS would not reach its ops "
                   f"(build info: {info}); not using it. {_BUILD_HINT}")
        return None
    _C, _BUILD_INFO = ext, info
    _outputs.add_listener(ext.set_poison_outputs)  # the compiled ops follow the package's poison switch
    return ext


def available() -> bool:
    """True when the compiled extension loaded and matches the running torch."""
    return _C is not None


def build_info() -> dict | None:
    """``_C``'s build info (torch_version, with_cuda, cuda_archs, cuda_version, kernels), or None."""
    return None if _BUILD_INFO is None else dict(_BUILD_INFO)


def has_kernel(name: str) -> bool:
    return _BUILD_INFO is not None and name in _BUILD_INFO["kernels"]


# ---------------------------------------------------------------------------------------------
# Fake impls and autograd for the C++ ops.
# ---------------------------------------------------------------------------------------------

def _stat_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# csrc/cuda/modulate_kernels.cu sums the per-sample parameter gradients with atomicAdd; the CPU kernels do not
_ATOMICS = "on CUDA the per-sample shift/scale/gate gradients are summed with atomicAdd"
_DETERMINISTIC_INSTEAD = "the model's elementwise='native' (the default) or 'reference' is deterministic"
_ELEMENTWISE_HINT = ("the model's elementwise='native' or 'reference' implementations differentiate twice "
                     "(plain PyTorch)")


def _register_op_python_parts() -> None:
    """Fakes and autograd of the C++ ops. The attention, layernorm_modulate and gated_residual backwards refuse
    double backward (``_autograd.first_order_only``)."""
    lib = "elit::"

    # Every C++ op returns contiguous tensors whatever its input strides (they copy or index rows), so the
    # fakes do too: ``new_empty(shape)``, never ``empty_like`` (which keeps a permuted input's strides and
    # makes torch.compile assert on the real ones).
    @torch.library.register_fake(lib + "varlen_attn_fwd")
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left=-1,
          window_right=-1, softcap=0.0):
        return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_stat_dtype(q))

    @torch.library.register_fake(lib + "varlen_attn_bwd")
    def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
          window_left=-1, window_right=-1, softcap=0.0):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake(lib + "layernorm_modulate_fwd")
    def _(x, shift, scale, index, eps):
        t = x.shape[0]
        return x.new_empty(x.shape), x.new_empty((t,), dtype=_stat_dtype(x)), x.new_empty((t,), dtype=_stat_dtype(x))

    @torch.library.register_fake(lib + "layernorm_modulate_bwd")
    def _(grad_out, x, scale, index, mean, rstd):
        return x.new_empty(x.shape), scale.new_empty(scale.shape), scale.new_empty(scale.shape)

    @torch.library.register_fake(lib + "gated_residual_fwd")
    def _(x, y, gate, index):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "gated_residual_bwd")
    def _(grad_out, y, gate, index):
        return y.new_empty(y.shape), gate.new_empty(gate.shape)

    register_varlen_autograd(lib + "varlen_attn_fwd", torch.ops.elit.varlen_attn_bwd)

    def lnm_setup(ctx, inputs, output):
        x, shift, scale, index, eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, scale, saveable_index(index), mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    def lnm_backward(ctx, grad_out, grad_mean, grad_rstd):
        x, scale, index, mean, rstd = ctx.saved_tensors
        if x.is_cuda:
            alert_not_deterministic(lib + "layernorm_modulate_bwd", _ATOMICS, _DETERMINISTIC_INSTEAD)
        if grad_out is None:
            grad_out = torch.zeros_like(x)
        gx, gshift, gscale = first_order_only(lib + "layernorm_modulate_fwd", _ELEMENTWISE_HINT,
                                              torch.ops.elit.layernorm_modulate_bwd, grad_out, x, scale, index, mean,
                                              rstd)
        return gx, gshift, gscale, None, None

    torch.library.register_autograd(lib + "layernorm_modulate_fwd", lnm_backward, setup_context=lnm_setup)

    def gr_setup(ctx, inputs, output):
        x, y, gate, index = inputs
        ctx.save_for_backward(y, gate, saveable_index(index))

    def gr_backward(ctx, grad_out):
        y, gate, index = ctx.saved_tensors
        if y.is_cuda:
            alert_not_deterministic(lib + "gated_residual_bwd", _ATOMICS, _DETERMINISTIC_INSTEAD)
        gy, ggate = first_order_only(lib + "gated_residual_fwd", _ELEMENTWISE_HINT, torch.ops.elit.gated_residual_bwd,
                                     grad_out, y, gate, index)
        return grad_out, gy, ggate, None

    torch.library.register_autograd(lib + "gated_residual_fwd", gr_backward, setup_context=gr_setup)


# ---------------------------------------------------------------------------------------------
# The fused elementwise ops (the attention ops are reached through elit_kernels.attention).
# ---------------------------------------------------------------------------------------------

def layernorm_modulate(x, shift, scale, index, eps: float = 1e-6):
    """Fused ``LayerNorm(x) * (1 + scale[index]) + shift[index]``; x ``[T, C]``, shift/scale ``[B, C]`` of any
    floating dtype, cast to x's dtype first as ``"native"`` does (under ``torch.autocast`` the adaLN parameters
    come out of a linear in bf16/fp16 while x stays fp32); the result has x's dtype. ``eps``: a finite real
    >= 0 (``elementwise.check_eps``: TypeError / ValueError naming ``eps``). NotImplementedError under forward-mode AD
    or ``torch.func.grad`` (``_refuse_transform``)."""
    eps = check_eps(eps)
    _refuse_transform("layernorm_modulate", x, shift, scale)
    shift, scale = shift.to(x.dtype), scale.to(x.dtype)
    if x.is_cuda and not has_kernel("layernorm_modulate_cuda"):
        from .reference.modulate import layernorm_modulate as ref
        return ref(x, shift, scale, index, eps)
    return torch.ops.elit.layernorm_modulate_fwd(x, shift, scale, index, eps)[0]


def _refuse_transform(op: str, *tensors) -> None:
    """NotImplementedError naming the op and what to use instead under an autograd transform its custom op cannot
    follow (``_transforms.active_transform``: it would give a zero tangent silently, or fail naming nothing)."""
    if peek() is None and _fwd._current_level < 0:  # active_transform's first test, inlined: the fused ops are chosen for speed
        return
    t = active_transform(*tensors)
    if t is not None:
        raise NotImplementedError(f"elementwise='fused' ({op}): cannot be differentiated under {t} (a C++/CUDA op "
                                  "with a reverse-mode backward formula only); the model's elementwise='native' "
                                  "(its default) or 'reference' run PyTorch's own ops there")


def gated_residual(x, y, gate, index):
    """Fused ``x + gate[index] * y``; x, y ``[T, C]``, gate ``[B, C]``; y and gate of any floating dtype, cast to
    x's dtype first as ``"native"`` does; the result has x's dtype. NotImplementedError under forward-mode AD or
    ``torch.func.grad`` (``_refuse_transform``)."""
    _refuse_transform("gated_residual", x, y, gate)
    y, gate = y.to(x.dtype), gate.to(x.dtype)
    if x.is_cuda and not has_kernel("gated_residual_cuda"):
        from .reference.modulate import gated_residual as ref
        return ref(x, y, gate, index)
    return torch.ops.elit.gated_residual_fwd(x, y, gate, index)


if _load() is not None:
    _register_op_python_parts()
    register_elementwise("fused", ElementwiseImpl(layernorm_modulate, gated_residual))
