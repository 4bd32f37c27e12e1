"""The scale arguments of the Triton attention kernels, checked without importing Triton (the backend's
``not_supported_reasons`` reads ``score_args_reason`` on every dispatch decision)."""
from __future__ import annotations

LOG2E = 1.4426950408889634
_F32_MAX = 3.4028234663852886e38


def _score_args(softmax_scale: float, softcap: float) -> tuple[float, float]:
    if softcap > 0.0:
        return softmax_scale / softcap, softcap * LOG2E
    return softmax_scale * LOG2E, 0.0


def score_args_reason(softmax_scale: float, softcap: float = 0.0) -> str | None:
    """Why the kernels cannot take this ``softmax_scale`` and ``softcap``, or None. ``score_args``' values are
    float32 kernel arguments: ``|scale| * log2(e)`` past float32's max (``|scale|`` above ~2.36e38), likewise
    ``softcap * log2(e)``, or ``scale / softcap`` (1e30 / 1e-30) became inf, and every output NaN (a fuzz; the
    contract takes any scale and softcap within float32's range, which the other backends run)."""
    qk, cap2 = _score_args(softmax_scale, softcap)
    if abs(qk) <= _F32_MAX and cap2 <= _F32_MAX:
        return None
    if cap2 > _F32_MAX:
        what = f"softcap {softcap:g} * log2(e)"
    elif softcap > 0.0:
        what = f"softmax_scale / softcap = {softmax_scale:g} / {softcap:g}"
    else:
        what = f"softmax_scale {softmax_scale:g} * log2(e)"
    return f"{what} overflows float32, in which the Triton kernels take it"


def score_args(softmax_scale: float, softcap: float = 0.0) -> tuple[float, float]:
    """``(qk_scale, cap2)`` for ``_common.scores``: without softcap ``scale * log2(e)`` (and 0); with it the tanh
    argument's scale ``scale / softcap`` and ``softcap * log2(e)``. ValueError when one overflows float32
    (``score_args_reason``: it names ``softmax_scale`` or ``softcap``)."""
    why = score_args_reason(softmax_scale, softcap)
    if why is not None:
        raise ValueError(why)
    return _score_args(softmax_scale, softcap)
