"""The model's elementwise ops (adaLN LayerNorm + modulate, gated residual) at one block's shape, every
implementation in one interleaved run, with the bandwidth each reaches.

    python benchmarks/bench_elementwise.py --out DIR      # GPU: XL/2 512px, batch 16, bf16 ([16384, 1152])
    python benchmarks/bench_elementwise.py --device cpu   # CPU: S/2 256px, batch 4, fp32 ([1024, 384])

What it decides: whether a compiled elementwise kernel (``fused``, from ``elit_kernels._C``) earns its place
beside what PyTorch already gives, ``native`` eager (the models' default) and ``native`` under
``torch.compile`` (inductor fuses it into one kernel). Implementations: every registered one that runs on the
device (``elit_kernels.elementwise.ELEMENTWISE_IMPLS``), plus ``native+compile``. Inputs: per-sample adaLN
parameters ``[B, C]`` broadcast over each sample's N tokens (one run of equal lengths, as the spatial blocks).

Bytes: the fewest a kernel can move: LayerNorm + modulate reads x and writes the output (2·T·C elements, the
``[B, C]`` parameters are negligible), the gated residual reads x and y and writes the output (3·T·C).
``pct_peak_bw``: GB/s against this device's copy rate, measured in the same run (``bench.timing.measure_peaks``,
recorded as ``peaks``). Each implementation is first
checked against the fp32 reference on the same inputs (``max_abs_err``). A CPU number is labelled CPU;
medians of interleaved repeats (CUDA: ``triton.testing.do_bench``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

from elit_kernels import _cli
from elit_kernels._cli import output_dir_error
from elit_kernels.bench.report import metadata
from elit_kernels.bench.timing import measure_peaks, time_call
from elit_kernels.elementwise import ELEMENTWISE_IMPLS, get_elementwise
from elit_kernels.layout import TokenRuns
from elit_kernels.models import elit_config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: (config, resolution, batch, dtype) per device type: the model stage's shape on a GPU, the CPU default otherwise
DEFAULTS = {"cuda": ("XL/2", 512, 16, "bf16"), "cpu": ("S/2", 256, 4, "fp32")}
OPS = ("layernorm_modulate", "gated_residual")
EPS = 1e-6  # the models' LayerNorm eps (DiT's adaLN)
OUTPUT_FILES = ("elementwise.json",)  # what --out DIR gets


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--config", default=None, help="model size whose hidden width is used (default XL/2 GPU, S/2 CPU)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 512 GPU, 256 CPU)")
    p.add_argument("--batch", type=int, default=None, help="samples (default 16 GPU, 4 CPU)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bf16 GPU, fp32 CPU")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing samples per case (default 5)")
    p.add_argument("--no-compile", action="store_true", help="leave out native+compile (its compile takes seconds)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default 1 on CPU, as elit-bench: on a shared 2-core machine 2 OpenMP "
                        "threads wait for each other; untouched on GPU)")
    p.add_argument("--out", default=None, type=_cli.user_path, help="write DIR/elementwise.json")
    args = p.parse_args(argv)
    try:
        dev = _cli.bench_device(args.device)
    except ValueError as err:
        p.error(f"--device: {err}")
    cfg_name, res, batch, dtype = DEFAULTS[dev.type]
    # None is "not given": a 0 given is refused below, not replaced by the default
    args.config = cfg_name if args.config is None else args.config
    args.resolution = res if args.resolution is None else args.resolution
    args.batch = batch if args.batch is None else args.batch
    args.dtype = dtype if args.dtype is None else args.dtype
    for name in ("resolution", "batch", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if args.threads is None and dev.type == "cpu":
        args.threads = 1
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: expected a positive int, got {args.threads}")
    try:
        args.cfg = elit_config(args.config, args.resolution)
    except ValueError as e:
        p.error(f"--config / --resolution: {e}")
    if args.out and (why := output_dir_error(args.out, OUTPUT_FILES)):  # now, not after the timing
        p.error(f"--out: {why}")
    return args, dev


def implementations(dev: torch.device, compiled: bool) -> dict:
    """``{name: (layernorm_modulate, gated_residual)}`` taking ``(x, shift, scale, runs)`` / ``(x, y, gate,
    runs)``: every registered implementation (``fused`` only where ``_C`` has kernels for the device), plus
    ``native`` under ``torch.compile`` when ``compiled``."""
    out = {}
    for name in ELEMENTWISE_IMPLS:
        impl = get_elementwise(name)
        out[name] = (impl.layernorm_modulate, impl.gated_residual)
    if compiled:
        native = get_elementwise("native")
        out["native+compile"] = (torch.compile(native.layernorm_modulate, fullgraph=True),
                                 torch.compile(native.gated_residual, fullgraph=True))
    return out


def make_inputs(t: int, c: int, b: int, dev, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x, y = (torch.randn(t, c, generator=g).to(dev, dtype) for _ in range(2))
    shift, scale, gate = (0.1 * torch.randn(b, c, generator=g).to(dev, dtype) for _ in range(3))
    return x, y, shift, scale, gate


def main(argv=None) -> int:
    args, dev = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, cfg = DTYPES[args.dtype], args.cfg
    n, c, b = cfg.tokens, cfg.hidden, args.batch
    t = b * n
    runs = TokenRuns.from_counts([n] * b)
    x, y, shift, scale, gate = make_inputs(t, c, b, dev, dtype)
    ref = get_elementwise("reference")
    with torch.no_grad():
        want = {"layernorm_modulate": ref.layernorm_modulate(x.float(), shift.float(), scale.float(), runs, EPS),
                "gated_residual": ref.gated_residual(x.float(), y.float(), gate.float(), runs)}
    elem = x.element_size()
    moved = {"layernorm_modulate": 2 * t * c * elem, "gated_residual": 3 * t * c * elem}
    rows, cases = [], []
    peaks = measure_peaks(dev, dtype)  # the copy rate the bandwidth fractions are taken against, measured here
    try:  # a SIGINT (gpu_check's stage limit) keeps what was measured: the rows below are written with it
        _warm_and_time(args, dev, implementations(dev, not args.no_compile), x, shift, scale, y, gate, runs, want,
                       moved, t, c, rows, cases)
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
        for row in rows:
            if not row["times_ms"] and row["error"] is None:
                row["error"] = "not timed: interrupted (the stage's time limit)"
    for row in rows:
        ts = row.pop("times_ms")
        row["ms"] = statistics.median(ts) if ts else None
        row["gbps"] = row["min_mb"] * 1e6 / row["ms"] / 1e6 if row["ms"] else None
        row["pct_peak_bw"] = 100 * row["gbps"] / peaks["gbps"] if row["gbps"] else None
    md = metadata(dev, {"config": args.config, "resolution": args.resolution, "batch": b, "dtype": args.dtype,
                        "repeats": args.repeats, "shape": [t, c], "threads": args.threads,
                        "bytes": "layernorm_modulate 2*T*C, gated_residual 3*T*C elements (x [, y] read, out written)",
                        "peaks": peaks})
    label = "CPU" if dev.type == "cpu" else "GPU"
    print(f"elementwise ops — {label}: {md['device']}, [{t}, {c}] {args.dtype} ({args.config} {args.resolution}px "
          f"batch {b}), torch {md['torch']}")
    print(f"{label} copy rate measured in this run: {peaks['gbps']:.4g} GB/s (copy of {peaks['copy_mb']} MB; % BW "
          "below is a fraction of it)")
    print(f"{'op':<20}{'impl':<16}{'ms':>9}{'GB/s':>9}{'% BW':>7}{'max err':>10}  note")
    for r in rows:
        ms = f"{r['ms']:.4f}" if r["ms"] is not None else "-"
        gb = f"{r['gbps']:.3g}" if r["gbps"] is not None else "-"
        pct = f"{r['pct_peak_bw']:.0f}" if r["pct_peak_bw"] is not None else "-"
        err = f"{r['max_abs_err']:.1e}" if r.get("max_abs_err") is not None else "-"
        print(f"{r['op']:<20}{r['impl']:<16}{ms:>9}{gb:>9}{pct:>7}{err:>10}  {r['error'] or ''}")
    if args.out:
        path = os.path.join(args.out, "elementwise.json")

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump({"metadata": md, "rows": rows}, f, indent=1)
        try:  # whole or not at all; a write error is one line
            _cli.write_output(path, write)
        except _cli.OutputWriteError as e:
            print(f"bench_elementwise.py: error: {e}", file=sys.stderr)
            return 1
        print(f"wrote {path}")
    return 130 if interrupted else 0


def _warm_and_time(args, dev, impls, x, shift, scale, y, gate, runs, want, moved, t, c, rows, cases) -> None:
    """Warm up and check every implementation x op against the fp32 reference (appending ``rows`` and the runnable
    ``cases``), then time the cases interleaved, ``args.repeats`` times each."""
    for name, (ln_mod, gated) in impls.items():
        calls = {"layernorm_modulate": lambda f=ln_mod: f(x, shift, scale, runs, EPS),
                 "gated_residual": lambda f=gated: f(x, y, gate, runs)}
        for op in OPS:
            row = {"op": op, "impl": name, "tokens": t, "hidden": c, "dtype": args.dtype, "min_mb": moved[op] / 1e6,
                   "times_ms": [], "error": None}
            try:
                with torch.no_grad():
                    got = calls[op]()  # warm-up (and compile), then the check against the fp32 reference
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                row["max_abs_err"] = float((got.float() - want[op]).abs().max())
                cases.append((row, calls[op]))
            except Exception as e:  # an implementation that cannot run here says why; the rest go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            rows.append(row)
    with torch.no_grad():
        for _ in range(args.repeats):  # interleaved: every case once per repeat
            for row, fn in cases:
                row["times_ms"].append(time_call(fn, dev))


if __name__ == "__main__":
    sys.exit(main())
