"""Per-stage time and FLOPs of one ELIT-DiT forward vs budget: where does latency stop tracking FLOPs?

    python benchmarks/stage_breakdown.py                       # CPU: S/2 256px fp32 batch 4, 1 thread
    python benchmarks/stage_breakdown.py --budgets 1,4,16 --repeats 7 --out DIR

Stages: head blocks, Read, core blocks, Write, tail blocks (forward hooks, perf_counter; CPU is
synchronous, on CUDA each hook synchronizes, which adds a little) and "rest" (layout build, patch
embed, latent gather, final layer, un-patchify) = total − stages. FLOPs per stage: FlopCounterMode
per module plus analytic attention (4·Σ Lq·Lk·H·D). Budgets are interleaved over repeats; medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from elit_kernels import _cli, set_value_checks
from elit_kernels.bench.report import metadata
from elit_kernels.bench.scenarios import randomize_
from elit_kernels.models import ElitDiT, elit_config

STAGES = ("head", "read", "core", "write", "tail")


def stage_of(name: str) -> str | None:
    top = name.split(".")[0]
    return top if top in STAGES else None


def attention_flops(cfg, j, b):
    h, d = cfg.heads, cfg.hidden // cfg.heads
    n, g, p = cfg.grid ** 2, cfg.groups, cfg.tokens_per_group
    f = {"head": cfg.n_head * n * n, "read": g * j * p, "core": cfg.core_blocks * (g * j) ** 2, "write": g * j * p,
         "tail": cfg.n_tail * n * n}
    return {k: 4 * b * v * h * d for k, v in f.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="S/2")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--budgets", default=None, help="default J_max/16 … J_max, powers of two")
    p.add_argument("--backend", default="torch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, type=_cli.user_path, help="write DIR/stages.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    set_value_checks(False)
    dev = torch.device(a.device)
    cfg = elit_config(a.config, a.resolution)
    jm = cfg.latents_per_group
    budgets = [int(s) for s in a.budgets.split(",")] if a.budgets else [jm >> k for k in range(4, -1, -1) if jm >> k >= 1]
    m = ElitDiT(cfg, backend=a.backend)
    randomize_(m, 0)
    m = m.to(dev).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g).to(dev)
    t, y = torch.rand(a.batch, generator=g).to(dev), torch.randint(0, cfg.num_classes, (a.batch,), generator=g).to(dev)

    acc: dict[str, float] = {}
    starts: dict[int, float] = {}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def pre(mod, _inp):
        sync()
        starts[id(mod)] = time.perf_counter()

    def post(mod, _inp, _out):
        sync()
        acc[mod._stage] = acc.get(mod._stage, 0.0) + (time.perf_counter() - starts.pop(id(mod))) * 1e3

    for name, mod in m.named_modules():
        st = stage_of(name)
        if (st in ("read", "write") and name == st) or (st in ("head", "core", "tail") and name.count(".") == 1):
            mod._stage = st
            mod.register_forward_pre_hook(pre)
            mod.register_forward_hook(post)
    samples = {j: [] for j in budgets}
    with torch.no_grad():
        for j in budgets:
            m(x, t, y, j)
        for _ in range(a.repeats):
            for j in budgets:
                acc.clear()
                sync()
                t0 = time.perf_counter()
                m(x, t, y, j)
                sync()
                total = (time.perf_counter() - t0) * 1e3
                row = dict(acc)
                row["rest"] = total - sum(acc.values())
                row["total"] = total
                samples[j].append(row)
        flops = {}
        for j in budgets:
            with FlopCounterMode(display=False) as fc:
                m(x, t, y, j)
            per = {s: 0 for s in STAGES}
            for mod_name, ops in fc.get_flop_counts().items():
                parts = mod_name.split(".")
                if len(parts) >= 2 and parts[1] in STAGES and (len(parts) == 2 if parts[1] in ("read", "write") else len(parts) == 3):
                    per[parts[1]] += sum(ops.values())
            # CPU SDPA has no FlopCounterMode formula: drop whatever it saw and use the analytic count
            for s, f in attention_flops(cfg, j, a.batch).items():
                per[s] += f
            per["total"] = int(fc.get_total_flops()) + sum(attention_flops(cfg, j, a.batch).values())
            per["rest"] = per["total"] - sum(per[s] for s in STAGES)
            flops[j] = per
    cols = STAGES + ("rest", "total")
    med = {j: {c: statistics.median(r[c] for r in samples[j]) for c in cols} for j in budgets}
    full = med[jm] if jm in med else med[max(budgets)]
    ffull = flops[jm] if jm in flops else flops[max(budgets)]
    label = "CPU" if dev.type == "cpu" else "GPU"
    print(f"{label} stage breakdown: {a.config} {a.resolution}px batch {a.batch}, backend {a.backend}, "
          f"{a.threads} thread(s); median ms over {a.repeats} interleaved repeats (GFLOPs below)")
    print("J  " + "".join(f"{c:>9}" for c in cols) + f"{'lat/full':>10}{'flop/full':>10}")
    for j in budgets:
        print(f"{j:<3}" + "".join(f"{med[j][c]:9.1f}" for c in cols)
              + f"{med[j]['total'] / full['total']:10.3f}{flops[j]['total'] / ffull['total']:10.3f}")
    for j in budgets:
        print(f"{j:<3}" + "".join(f"{flops[j][c] / 1e9:9.2f}" for c in cols))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        md = metadata(dev, {"config": a.config, "resolution": a.resolution, "batch": a.batch, "backend": a.backend,
                            "threads": a.threads, "repeats": a.repeats})
        with open(os.path.join(a.out, "stages.json"), "w") as f:
            json.dump({"metadata": md, "median_ms": med, "flops": flops, "samples_ms": samples}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
