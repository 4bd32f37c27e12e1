"""Shared launch-time helpers for the Triton attention kernels (block choice, dtype flags, poisoning)."""
from __future__ import annotations

import os

import torch
import triton

LOG2E = 1.4426950408889634

# Debug aid (DESIGN.md §5): fill kernel outputs with NaN before launch so an element a kernel
# forgets to write fails the tests instead of passing on leftover memory.
_poison_outputs = os.environ.get("ELIT_POISON_OUTPUTS", "0") not in ("0", "", "false", "False")


def set_poison_outputs(enabled: bool) -> None:
    """NaN-fill every output buffer of the Triton kernels before they run (tests; costs a memset)."""
    global _poison_outputs
    _poison_outputs = bool(enabled)


def poison_outputs_enabled() -> bool:
    return _poison_outputs


def alloc(shape, dtype, device) -> torch.Tensor:
    if _poison_outputs:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def interpreting() -> bool:
    """True when Triton runs kernels through its NumPy interpreter (read at launch, not import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexpr flags that depend on the dtype and on the interpreter.

    UPCAST: the interpreter multiplies bf16 bit patterns in tl.dot (triton#11584), so dot operands
    are widened to fp32 there; on a GPU bf16 goes to the tensor cores as is.
    DOT_PREC: fp32 inputs would silently run as TF32 on tensor cores (10-bit mantissa), which breaks
    the fp32 tolerance; "ieee" keeps fp32 exact. 16-bit inputs ignore the setting.
    """
    return {
        "UPCAST": bool(interpreting() and dtype == torch.bfloat16),
        "DOT_PREC": "ieee" if dtype == torch.float32 else "tf32",
    }


def block_d(head_dim: int) -> int:
    # tl.arange needs a power of two and tl.dot a K of at least 16: D=72 runs as 128 with a mask.
    return max(16, triton.next_power_of_2(head_dim))


def bucket(n: int) -> int:
    """Autotune key for a max length: its power-of-two bucket (>= 16), so every new budget (a new
    max_seqlen) does not trigger a fresh tuning run, while Read/Write (<=64) and core (up to 4096)
    shapes still tune separately."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


# Under the interpreter every program is Python over NumPy: the smallest legal tiles keep the
# dots cheap and autotuning (many timed reruns) would only multiply the cost.
INTERP_BLOCK_M = 16
INTERP_BLOCK_N = 16


def tile_configs(bm_choices, bn_choices, warps_stages):
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in bm_choices for bn in bn_choices for (w, s) in warps_stages
    ]


def prune_by_length(q_tile: str, k_tile: str):
    """An ``early_config_prune`` that drops tiles larger than the (bucketed) max lengths.

    ELIT's Read segments hold 1-64 queries against 16-64 keys; a 128-row tile would be mostly
    masked work, so only tiles that fit the longest segment are timed. Large head dims (>128)
    also drop the largest tiles, which would spill registers / exceed shared memory.
    """

    def prune(configs, named_args, **kwargs):
        args = dict(named_args)
        args.update(kwargs)
        qb, kb, bd = args["max_q_bucket"], args["max_k_bucket"], args["BLOCK_D"]
        keep = []
        for c in configs:
            m, n = c.kwargs[q_tile], c.kwargs[k_tile]
            if m > qb or n > kb:
                continue
            if bd > 128 and m * n > 64 * 64:
                continue
            keep.append(c)
        if not keep:  # always keep the smallest tile
            keep = [min(configs, key=lambda c: (c.kwargs[q_tile] * c.kwargs[k_tile], c.num_warps, c.num_stages))]
        return keep

    return prune
