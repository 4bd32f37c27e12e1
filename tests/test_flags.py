"""Every public flag of the package reads the same way (``elit_kernels._types.check_bool``): a bool or NumPy's
bool (``array.any()``) is taken, anything else ("no", 1, a tensor) is a TypeError naming the flag and what was
given, before any work. One table, so a new flag that checks its own way shows up here."""
import os
import re
import tempfile

import numpy as np
import pytest
import torch

from elit_kernels import flash_attn_func, flash_attn_qkvpacked_func, flash_attn_varlen_func, varlen_attention
from elit_kernels._outputs import set_poison_outputs
from elit_kernels.attention import AttentionPlan, set_value_checks, tuning, validate_inputs, value_checks_enabled
from elit_kernels.attention.known_answer import verify_backend
from elit_kernels.flow import euler_sample, sample_budgets
from elit_kernels.models import ElitDiT, elit_config
from elit_kernels.models.checkpoint import load_model, save_model
from elit_kernels.official import load_checkpoint
from elit_kernels.testing import cu_seqlens

_q = torch.randn(5, 2, 8)
_cu = cu_seqlens([3, 2])


_SAVED = []


def _ours():
    """One of our files (save_model), written once per test process."""
    if not _SAVED:
        _SAVED.append(os.path.join(tempfile.mkdtemp(prefix="elit_flags_"), "tiny.pt"))
        save_model(_SAVED[0], ElitDiT(elit_config("tiny", 32)))
    return _SAVED[0]


def _euler(**kw):
    m = ElitDiT(elit_config("tiny", 32)).eval()
    x = torch.randn(1, m.cfg.in_channels, m.cfg.input_size, m.cfg.input_size)
    with torch.no_grad():
        return euler_sample(m, x, torch.tensor([1]), steps=1, **kw)


def _tuning(v):
    with tuning(v):
        pass


def _poison(v):
    try:
        set_poison_outputs(v)
    finally:
        set_poison_outputs(False)


def _value_checks(v):
    was = value_checks_enabled()
    try:
        set_value_checks(v)
    finally:
        set_value_checks(was)


def _autotune(v):
    try:  # triton is not in the CPU-only install (requirements-cpu.txt)
        from elit_kernels._triton._common import autotune_enabled, set_autotune
    except ImportError as e:
        pytest.skip(f"triton not importable ({e}): set_autotune is the Triton kernels' switch")
    was = autotune_enabled()
    try:
        set_autotune(v)
    finally:
        set_autotune(was)


FLAGS = {  # flag name -> call with the flag set to v
    "varlen_attention causal": ("causal", lambda v: varlen_attention(_q, _q, _q, _cu, _cu, 3, 3, causal=v)),
    "varlen_attention return_lse": ("return_lse",
                                    lambda v: varlen_attention(_q, _q, _q, _cu, _cu, 3, 3, return_lse=v)),
    "AttentionPlan causal": ("causal", lambda v: AttentionPlan(_cu, _cu, 3, 3, causal=v)),
    "validate_inputs derive_segments": ("derive_segments", lambda v: validate_inputs(
        _q, _q, _q, _cu, _cu, 3, 3, derive_segments=v)),
    "flash_attn_varlen_func deterministic": ("deterministic", lambda v: flash_attn_varlen_func(
        _q, _q, _q, _cu, _cu, 3, 3, deterministic=v)),
    "flash_attn_varlen_func return_attn_probs": ("return_attn_probs", lambda v: flash_attn_varlen_func(
        _q, _q, _q, _cu, _cu, 3, 3, return_attn_probs=v)),
    "flash_attn_varlen_func causal": ("causal", lambda v: flash_attn_varlen_func(_q, _q, _q, _cu, _cu, 3, 3, causal=v)),
    "flash_attn_func causal": ("causal", lambda v: flash_attn_func(_q[None], _q[None], _q[None], causal=v)),
    "flash_attn_qkvpacked_func causal": ("causal", lambda v: flash_attn_qkvpacked_func(
        torch.randn(1, 5, 3, 2, 8), causal=v)),
    "verify_backend causal": ("causal", lambda v: verify_backend("reference", "cpu", torch.float32, 8, causal=v)),
    "verify_backend grad": ("grad", lambda v: verify_backend("reference", "cpu", torch.float32, 8, grad=v)),
    "tuning enabled": ("enabled", _tuning),
    "set_poison_outputs enabled": ("enabled", _poison),
    "set_value_checks enabled": ("enabled", _value_checks),
    "set_autotune enabled": ("enabled", _autotune),
    "euler_sample heun": ("heun", lambda v: _euler(heun=v)),
    "euler_sample graphed": ("graphed", lambda v: _euler(graphed=v)),
    "sample_budgets per_sample": ("per_sample", lambda v: sample_budgets(2, 1, 4, per_sample=v)),
    "load_checkpoint check_finite": ("check_finite", lambda v: load_checkpoint(_ours(), check_finite=v)),
    "load_model check_finite": ("check_finite", lambda v: load_model(_ours(), check_finite=v)),
    "load_model return_meta": ("return_meta", lambda v: load_model(_ours(), return_meta=v)),
}


@pytest.mark.parametrize("call", sorted(FLAGS))
def test_every_flag_reads_the_same_way(call):
    name, fn = FLAGS[call]
    # flash-attn's drop-ins take an int as well (flash-attn tests its flags for truth), and say so.
    expected = "a bool or an int (as flash-attn takes its flags)" if call.startswith("flash_attn") else "a bool"
    for bad, shown in (("no", "str ('no')"), (torch.tensor([True, False]), "torch.Tensor"), (None, "NoneType (None)")):
        with pytest.raises(TypeError, match=rf"^{name}: expected {re.escape(expected)}, got {re.escape(shown)}$"):
            fn(bad)
    for good in (np.True_, np.False_, True):
        fn(good)  # taken: no TypeError
