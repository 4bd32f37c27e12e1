"""Varlen attention op benchmark at ELIT's Read, Write and core shapes, every backend and comparator in one run.

    python benchmarks/bench_ops.py --out DIR            # GPU: XL/2 512px shapes, bf16; CPU: a reduced set
    python benchmarks/bench_ops.py --device cpu --quick

Methods: default dispatch given the host-side segments (``elit:default``, as the ELIT model calls it), given only
the tensors (``elit:default(no segments)``, value checks off as for every other row) and as a flash-attn drop-in
caller gets it (``elit:default(drop-in)``: value checks on, so one host read of cu_seqlens per call, whose
segments dispatch then uses); every registered varlen_attention backend that supports the inputs (torch,
triton, cuda/cpp, torch_varlen = torch.nn.attention.varlen, flash_attn when importable), SDPA flash / cuDNN /
efficient on padded batches (padding is set up untimed; on ragged shapes without a mask they compute padding too,
so their rows say exact=false), and FlexAttention with a document mask (compiled on CUDA).
FLOPs: 4·Σ(Lq·Lk)·H·D forward, ×3.5 for forward+backward (backward = 2.5× forward). A CPU number is
labelled CPU. Cases are interleaved over repeats and medians quoted (docs/design.md §5).

Slack rows: 128 segments of 4 tokens (H 2, D 64) passed with max_seqlen 4 and with
max_seqlen 512, for every backend; ``slack_ratio`` = ms at 512 / ms at 4 (target <= 1.5: the cost must
follow the data, not the bound).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

from elit_kernels import set_value_checks
from elit_kernels import _cli
from elit_kernels._cli import output_dir_error
from elit_kernels.bench.attention_cases import (Method, OpShape, available_methods, dispatch_overhead_us,
                                               elit_shapes, make_fn, min_bytes, quiet_warnings)
from elit_kernels.bench.report import metadata
from elit_kernels.bench.timing import measure_peaks, time_call
from elit_kernels.models import elit_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OUTPUT_FILES = ("ops.json", "ops.csv")  # what --out DIR gets


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--config", default=None, help="model size for the shapes (default XL/2 GPU, S/2 CPU)")
    p.add_argument("--resolution", type=int, default=None, help="default 512 GPU, 256 CPU")
    p.add_argument("--batch", type=int, default=None, help="default 8 GPU, 4 CPU")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 GPU, fp32 CPU")
    p.add_argument("--repeats", type=int, default=None, help="interleaved samples per case (default 5 GPU, 5 CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default 1 on CPU: 2 threads on a shared 2-core box wait on each other)")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--include-reference", action="store_true", help="also time the (slow) reference backend")
    p.add_argument("--budgets", default=None,
                   help="comma list of budgets for the shapes; 'ragged' = one budget per sample from J_max/16 to J_max "
                        "(default: J_max/4,J_max with --quick/CPU, else J_max/16,J_max/4,J_max,ragged)")
    p.add_argument("--flex", default="all", choices=["all", "core", "none"],
                   help="which shapes get FlexAttention (it compiles per shape on CUDA; 'core' saves minutes)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget: set-up and compiling stop at 70 %% of it (every forward first, FlexAttention "
                        "last; rows left say so), repeats once it is spent (at least one; results still written)")
    p.add_argument("--quick", action="store_true", help="fewer shapes (the CPU default)")
    p.add_argument("--no-slack", action="store_true",
                   help="skip the max_seqlen-slack rows (128 segments of 4 tokens at max_seqlen 4 vs 512)")
    p.add_argument("--slack-only", action="store_true", help="only the max_seqlen-slack rows")
    p.add_argument("--head-dims", default=None,
                   help="comma list of head dims to run the shapes at (same heads and token counts; default: the "
                        "config's, 72 for XL/2), e.g. 64,72,128 to compare every backend across them")
    p.add_argument("--out", default=None, type=_cli.user_path, help="write DIR/ops.json and DIR/ops.csv")
    args = p.parse_args(argv)
    # every check before the output folder is created, and all of them before any timing
    if args.slack_only and args.no_slack:
        p.error("--slack-only: contradicts --no-slack (only the slack rows, and none of them: nothing to time)")
    if args.max_seconds is not None and (why := _cli.finite_error(args.max_seconds, 0.0, what="time in seconds")):
        p.error(f"--max-seconds: {why}")
    try:
        dev = _cli.bench_device(args.device)
    except ValueError as err:
        p.error(f"--device: {err}")
    args.device = str(dev)
    gpu = dev.type == "cuda"
    # None is "not given" (a 0 given is checked below, not replaced by the default)
    if args.config is None:
        args.config = "XL/2" if gpu else "S/2"
    if args.resolution is None:
        args.resolution = 512 if gpu else 256
    if args.batch is None:
        args.batch = 8 if gpu else 4
    if args.dtype is None:
        args.dtype = "bf16" if gpu else "fp32"
    if args.repeats is None:
        args.repeats = 5
    args.quick = args.quick or not gpu
    if args.threads is None and not gpu:
        args.threads = 1
    for name in ("resolution", "batch", "repeats") + (("threads",) if args.threads is not None else ()):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    try:
        args.cfg = elit_config(args.config, args.resolution)
    except ValueError as e:
        p.error(f"--config/--resolution: {e}")
    try:
        args.head_dims = [int(x) for x in args.head_dims.split(",")] if args.head_dims else [args.cfg.head_dim]
    except ValueError:
        p.error(f"--head-dims: expected a comma list of integers, got {args.head_dims!r}")
    if any(not 1 <= d <= 256 for d in args.head_dims):
        p.error(f"--head-dims: each head dim must be in 1..256, got {args.head_dims}")
    if args.out and (why := output_dir_error(args.out, OUTPUT_FILES)):  # now, not after the timing
        p.error(f"--out: {why}")
    return args, dev


# max_seqlen of the slack rows: the exact one first (the ratio's base), then a slack bound.
SLACK_MAX = (4, 512)


def _with_max_seqlen(m: Method, max_len: int) -> Method:
    """``m`` called with max_seqlen_q = max_seqlen_k = ``max_len`` whatever the real lengths."""
    return Method(m.name, m.exact, lambda q, k, v, cu_q, cu_k, mq, mk: m.build(q, k, v, cu_q, cu_k, max_len, max_len))


def warm_up_order(planned: list) -> list[int]:
    """Indices of ``planned`` (``(row, method, shape)``) in the order they are set up and compiled, so that a
    ``--max-seconds`` deadline loses the least decisive rows: every forward first, then forward + backward,
    then the max_seqlen-slack rows, and FlexAttention (compiled: seconds per shape and pass) last; in the
    table's order within each. The 12-04 H200 run, warming in the table's order, timed only the first
    shape's forwards (12 of 222 rows)."""
    def key(i):
        row, m, _ = planned[i]
        return (m.name.startswith("flex"), row["kind"] == "slack", row["pass"] != "fwd", i)
    return sorted(range(len(planned)), key=key)


def main(argv=None) -> int:
    args, dev = parse(argv)
    quiet_warnings()
    set_value_checks(False)  # host copies of cu_seqlens are validation, not the op
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.monotonic()
    cfg, dtype = args.cfg, DTYPES[args.dtype]
    jm = cfg.latents_per_group
    ragged = [min(jm, max(1, jm // 16) * (1 << (i % 5))) for i in range(args.batch)]  # J_max/16 … J_max per sample
    if args.budgets:
        budgets = []
        for item in args.budgets.split(","):
            item = item.strip()
            if item == "ragged":
                budgets.append(ragged)
            elif item.isdigit() and 1 <= int(item) <= jm:
                budgets.append(int(item))
            else:
                print(f"bench_ops.py: error: --budgets: {item!r} is not 'ragged' or an integer in [1, {jm}]",
                      file=sys.stderr)
                return 2
    elif args.quick:
        budgets = [max(1, jm // 4), jm]
    else:
        budgets = [max(1, jm // 16), max(1, jm // 4), jm, ragged]
    shapes = [] if args.slack_only else elit_shapes(cfg, args.batch, budgets)
    passes = ["fwd"] if args.no_backward else ["fwd", "fwd+bwd"]
    rows = []
    # (shape, max_seqlen override or None, methods)
    work = []
    for d in args.head_dims:
        d_methods = available_methods(dev, dtype, d, cfg.heads, include_reference=args.include_reference)
        for shape in shapes:
            if d != shape.head_dim:
                shape = dataclasses.replace(shape, head_dim=d, name=f"{shape.name} D{d}")
            work.append((shape, None, d_methods))
    methods = available_methods(dev, dtype, 64, 2, include_reference=args.include_reference)
    if not args.no_slack:
        slack_methods = [m for m in methods if m.name.startswith("elit:")]
        for max_len in SLACK_MAX:
            work.append((OpShape(f"slack 128x4 max={max_len}", "slack", [4] * 128, [4] * 128, 2, 64), max_len,
                         slack_methods))
    if not any(shape_methods for _, _, shape_methods in work):
        print("bench_ops.py: error: nothing to time (no shape, or no method for the shapes)", file=sys.stderr)
        return 2
    planned = []  # (row, method, shape) in the order the table prints them
    for shape, max_len, shape_methods in work:
        for ps in passes:
            for m in shape_methods:
                if m.name.startswith("flex") and (args.flex == "none" or (args.flex == "core" and shape.kind != "core")):
                    continue
                if max_len is not None:
                    m = _with_max_seqlen(m, max_len)
                row = {"shape": shape.name, "kind": shape.kind, "pass": ps, "method": m.name,
                       "exact": m.exact or shape.uniform, "segments": len(shape.lens_q), "total_q": sum(shape.lens_q),
                       "total_k": sum(shape.lens_k), "heads": shape.heads, "head_dim": shape.head_dim,
                       "gflop": shape.fwd_flops * (3.5 if ps == "fwd+bwd" else 1.0) / 1e9, "times_ms": [],
                       "min_bytes": min_bytes(shape, torch.empty((), dtype=dtype).element_size()),
                       "error": None}
                planned.append((row, m, shape))
                rows.append(row)
    warmed = {}  # row index -> (fn, grad tensors)
    for i in warm_up_order(planned):
        row, m, shape = planned[i]
        if args.max_seconds and time.monotonic() - t_start > 0.7 * args.max_seconds:
            row["error"] = "skipped: --max-seconds spent during warm-up"
            continue
        try:
            fn, g2n = make_fn(m, shape, dev, dtype, backward=(row["pass"] == "fwd+bwd"))
            fn()  # warm-up (and compile)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            warmed[i] = (fn, g2n)
        except Exception as e:  # a comparator that cannot run this shape says why, the rest go on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    cases = [(planned[i][0], *warmed[i]) for i in sorted(warmed)]
    # this device's own ceilings, measured in this run with the same clock: the roofline fractions' denominators
    peaks = measure_peaks(dev, dtype)
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.repeats * len(cases), desc="ops", leave=False)
    except ImportError:
        bar = None
    for _ in range(args.repeats):  # interleaved: every case once per repeat
        for row, fn, g2n in cases:
            row["times_ms"].append(time_call(fn, dev, g2n))
            if bar is not None:
                bar.update(1)
        if args.max_seconds and time.monotonic() - t_start > args.max_seconds:
            break
    if bar is not None:
        bar.close()
    for row in rows:
        t = row.pop("times_ms")
        row["ms"] = statistics.median(t) if t else None
        row["min_ms"] = min(t) if t else None
        row["max_ms"] = max(t) if t else None
        row["tflops"] = row["gflop"] / row["ms"] if row["ms"] else None  # GFLOP/ms = TFLOP/s
    exact_ms = {(r["method"], r["pass"]): r["ms"] for r in rows if r["shape"] == f"slack 128x4 max={SLACK_MAX[0]}"}
    for r in rows:
        base = exact_ms.get((r["method"], r["pass"])) if r["kind"] == "slack" else None
        r["slack_ratio"] = r["ms"] / base if (base and r["ms"]) else None
    for r in rows:  # roofline: the fewest bytes a forward moves, and the fraction of this device's measured ceilings
        r["min_mb"] = round(r["min_bytes"] / 1e6, 3) if r.get("min_bytes") else None
        r["gbps"] = r["min_bytes"] / r["ms"] / 1e6 if (r.get("min_bytes") and r["ms"] and r["pass"] == "fwd") else None
        r["pct_peak_flops"] = 100 * r["tflops"] / peaks["tflops"] if r["tflops"] else None
        r["pct_peak_bw"] = 100 * r["gbps"] / peaks["gbps"] if r["gbps"] else None
    overhead = dispatch_overhead_us(dev, dtype, cfg.heads, args.head_dims[0])
    md = metadata(dev, {"config": args.config, "resolution": args.resolution, "batch": args.batch,
                        "head_dims": args.head_dims,
                        "dtype": args.dtype, "repeats": args.repeats, "threads": args.threads,
                        "flops": "4*sum(Lq*Lk)*H*D fwd, x3.5 fwd+bwd; useful (ragged) FLOPs for every method",
                        "bytes": "fwd: q, k, v read once and out written once; pct_peak_* against this device's "
                                 "ceilings measured in this run (peaks)",
                        "peaks": peaks, "dispatch_overhead_us": overhead})
    label = "CPU" if dev.type == "cpu" else "GPU"
    dev_name = md["device"] if md["device"].startswith(label) else f"{label}: {md['device']}"
    print(f"varlen attention ops — {dev_name}, {args.config} {args.resolution}px batch {args.batch} "
          f"{args.dtype}, torch {md['torch']}")
    print(f"{label} ceilings measured in this run: {peaks['tflops']:.4g} TFLOP/s ({args.dtype} matmul, n "
          f"{peaks['matmul_n']}), {peaks['gbps']:.4g} GB/s (copy of {peaks['copy_mb']} MB); %F and %BW below are "
          "fractions of them")
    print(f"{'shape':<22}{'pass':<9}{'method':<26}{'ms':>9}{'TFLOP/s':>9}{'%F':>6}{'GB/s':>8}{'%BW':>6}  note")
    for r in rows:
        note = r["error"] or ("" if r["exact"] else "padded, no mask (timing only)")
        if r.get("slack_ratio") is not None and r["shape"] != f"slack 128x4 max={SLACK_MAX[0]}":
            note = f"slack ratio {r['slack_ratio']:.2f}x vs max_seqlen {SLACK_MAX[0]}"
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "-"
        tf = f"{r['tflops']:.3f}" if r["tflops"] is not None else "-"
        gb = f"{r['gbps']:.0f}" if r.get("gbps") is not None else "-"
        pf, pb = (f"{r[k]:.0f}" if r.get(k) is not None else "-" for k in ("pct_peak_flops", "pct_peak_bw"))
        print(f"{r['shape'][:21]:<22}{r['pass']:<9}{r['method'][:25]:<26}{ms:>9}{tf:>9}{pf:>6}{gb:>8}{pb:>6}  {note}")
    print(f"{label}: host time added per call to the backend it picks ({overhead['backend']}, "
          f"{overhead['direct_us']:.1f} us here): varlen_attention {overhead['added_us']:.1f} us, an AttentionPlan "
          f"(the model's path) {overhead['plan_added_us']:.1f} us (Read-like call, host-side segments)")
    if args.out:
        full = [{**r, "device": md["device"], "torch": md["torch"], "triton": md["triton"],
                 "git_commit": md["git_commit"], "date": md["date"]} for r in rows]

        def write_json(tmp):
            with open(tmp, "w") as f:
                json.dump({"metadata": md, "rows": full}, f, indent=1)

        def write_csv(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(full[0]) if full else ["shape", "pass", "method"])
                w.writeheader()
                w.writerows(full)
        try:  # each file whole or not at all; a write error is one line
            _cli.write_output(os.path.join(args.out, "ops.json"), write_json)
            _cli.write_output(os.path.join(args.out, "ops.csv"), write_csv)
        except _cli.OutputWriteError as e:
            print(f"bench_ops.py: error: {e}", file=sys.stderr)
            return 1
        print(f"wrote {args.out}/ops.json, {args.out}/ops.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
