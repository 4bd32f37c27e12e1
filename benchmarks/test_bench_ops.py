"""pytest-benchmark: varlen attention at ELIT's Read / Write / core shapes (``pytest benchmarks/ --benchmark-only``).

Small shapes on CPU (S/2 256px, J_max), XL/2 512px bf16 on CUDA. ``extra_info`` carries FLOPs and TFLOP/s.
"""
import pytest
import torch

from elit_kernels import set_value_checks, value_checks_enabled
from elit_kernels.bench.attention_cases import available_methods, elit_shapes, make_fn, quiet_warnings
from elit_kernels.models import elit_config

GPU = torch.cuda.is_available()
CFG = elit_config("XL/2", 512) if GPU else elit_config("S/2", 256)
DTYPE = torch.bfloat16 if GPU else torch.float32
BATCH = 8 if GPU else 2
SHAPES = elit_shapes(CFG, BATCH, [CFG.latents_per_group // 4, CFG.latents_per_group])
METHODS = available_methods(torch.device("cuda" if GPU else "cpu"), DTYPE, CFG.hidden // CFG.heads, CFG.heads)
METHODS = [m for m in METHODS if GPU or "flex" not in m.name]  # eager flex on CPU materialises every score


def _sync():
    if GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name.replace(" ", "-"))
def test_varlen_attention(benchmark, shape, method, backward, bench_device):
    quiet_warnings()
    was = value_checks_enabled()
    set_value_checks(False)
    try:
        try:
            fn, _ = make_fn(method, shape, bench_device, DTYPE, backward=backward)
            fn()
        except Exception as e:  # a comparator that cannot run this shape: say why
            pytest.skip(f"{method.name} cannot run {shape.name}: {type(e).__name__}: {str(e)[:120]}")

        def run():
            fn()
            _sync()
        benchmark.pedantic(run, rounds=5 if not GPU else 20, iterations=1, warmup_rounds=1)
    finally:
        set_value_checks(was)
    flops = shape.fwd_flops * (3.5 if backward else 1.0)
    benchmark.extra_info.update({"gflop": flops / 1e9, "tflops": flops / benchmark.stats.stats.median / 1e12,
                                 "exact": method.exact or shape.uniform, "device": "GPU" if GPU else "CPU"})
