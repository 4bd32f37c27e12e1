"""pytest-benchmark: ELIT-DiT forward vs latent budget, the official-style and plain-DiT baselines.

``pytest benchmarks/ --benchmark-only``. CPU: S/2 256px fp32 batch 2; CUDA: XL/2 512px bf16 batch 8.
For the full interleaved study with FLOP ratios use ``elit-bench``; this suite is for tracking one
number per case over time (``--benchmark-autosave`` / ``--benchmark-compare``).
"""
import pytest
import torch

from elit_kernels import set_value_checks, value_checks_enabled
from elit_kernels.bench import OfficialStyleElit, count_flops
from elit_kernels.bench.scenarios import randomize_
from elit_kernels.models import ElitDiT, PlainDiT, elit_config

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
CFG = elit_config("XL/2", 512) if GPU else elit_config("S/2", 256)
DTYPE = torch.bfloat16 if GPU else torch.float32
BATCH = 8 if GPU else 2
JM = CFG.latents_per_group
BUDGETS = [JM // 16, JM // 4, JM] if JM >= 16 else [1, JM]


@pytest.fixture(scope="module")
def models():
    elit = ElitDiT(CFG, backend="torch")
    randomize_(elit, 0)
    elit = elit.to(DEV, DTYPE).eval()
    plain = PlainDiT(CFG, backend="torch")
    randomize_(plain, 1)
    plain = plain.to(DEV, DTYPE).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, CFG.in_channels, CFG.input_size, CFG.input_size, generator=g).to(DEV, DTYPE)
    t = torch.rand(BATCH, generator=g).to(DEV)
    y = torch.randint(0, CFG.num_classes, (BATCH,), generator=g).to(DEV)
    return elit, OfficialStyleElit(elit).eval(), plain, (x, t, y)


def _bench(benchmark, fn, models_for_flops):
    was = value_checks_enabled()
    set_value_checks(False)
    try:
        flops = count_flops(fn, models_for_flops)["total"]

        def run():
            with torch.no_grad():
                fn()
            if GPU:
                torch.cuda.synchronize()
        benchmark.pedantic(run, rounds=5 if not GPU else 20, iterations=1, warmup_rounds=1)
    finally:
        set_value_checks(was)
    benchmark.extra_info.update({"gflops": flops / 1e9, "device": "GPU" if GPU else "CPU", "batch": BATCH})


@pytest.mark.parametrize("budget", BUDGETS)
def test_elit_forward(benchmark, models, budget):
    elit, _, _, (x, t, y) = models
    _bench(benchmark, lambda: elit(x, t, y, budget), [elit])


@pytest.mark.parametrize("budget", BUDGETS)
def test_official_style_forward(benchmark, models, budget):
    _, off, _, (x, t, y) = models
    _bench(benchmark, lambda: off(x, t, y, budget), [off])


def test_elit_mixed_batch(benchmark, models):
    elit, _, _, (x, t, y) = models
    buds = [BUDGETS[i % len(BUDGETS)] for i in range(BATCH)]
    _bench(benchmark, lambda: elit(x, t, y, buds), [elit])


def test_plain_dit_forward(benchmark, models):
    _, _, plain, (x, t, y) = models
    _bench(benchmark, lambda: plain(x, t, y), [plain])
