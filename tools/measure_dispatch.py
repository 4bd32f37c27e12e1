"""Measure the dispatch table on this GPU: every attention shape class of an ELIT model, every eligible backend.

For each call the model makes (ELIT-SiT-XL/2 at 512 px by default: spatial self-attention, Read, Write, core at
uniform budgets, mixed batches and CCFG batches, with and without host-side segments), forward and forward +
backward, it times every default-eligible backend with ``elit_kernels.attention.dispatch.time_backends`` and
writes:

- ``dispatch_table.json``: the rankings in the format ``dispatch.py`` reads (commit it as
  ``elit_kernels/attention/dispatch_table.json``), each entry with the device, versions, commit and date of the
  run that measured it: this run's entries, and those of the committed table (``--merge``) of shape classes it
  did not measure, so a run on another GPU, or one cut short, adds to the table instead of replacing it;
- ``dispatch_report.md``: per shape, the time of what default dispatch picked *before* this measurement
  (committed table or static order) against the fastest backend, FlashAttention-2 varlen (``torch_varlen``)
  and each SDPA kernel; and the per-call host time ``varlen_attention`` and an ``AttentionPlan`` add to the chosen backend.

    python tools/measure_dispatch.py --out DIR [--max-seconds 60] [--batch 16] [--head-dim 72] [--merge TABLE]

GPU only (exits 2 on a machine without CUDA). Stops starting new shapes once ``--max-seconds`` is spent and
writes what it measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

from elit_kernels import _cli
from elit_kernels._cli import output_dir_error


_COMMITTED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "elit_kernels", "attention",
                          "dispatch_table.json")


def _shapes(batch: int, groups: int, p: int, j_max: int, heads: int, d: int):
    """(label, lens_q, lens_k, heads, d, with_segments) of the model's attention calls."""
    n = groups * p
    out = [(f"spatial {batch}x{n}", [n] * batch, [n] * batch, heads, d, True)]
    for j in (j_max, j_max // 4, j_max // 16, 1):
        j = max(1, j)
        out.append((f"read J={j}", [j] * (batch * groups), [p] * (batch * groups), heads, d, True))
        out.append((f"write J={j}", [p] * (batch * groups), [j] * (batch * groups), heads, d, True))
        out.append((f"core J={j}", [groups * j] * batch, [groups * j] * batch, heads, d, True))
    q4 = max(1, batch // 4)
    mixed = [j_max] * q4 + [j_max // 4] * q4 + [max(1, j_max // 16)] * q4 + [1] * (batch - 3 * q4)
    half = batch // 2
    ccfg = [j_max] * half + [max(1, j_max // 16)] * (batch - half)
    for name, bud in (("mixed", mixed), ("ccfg", ccfg)):
        lens = [groups * j for j in bud]
        out.append((f"core {name}", lens, lens, heads, d, True))
        out.append((f"core {name}, no segments", lens, lens, heads, d, False))
        rq = [j for j in bud for _ in range(groups)]
        out.append((f"read {name}", rq, [p] * len(rq), heads, d, True))
    out.append(("core 4x4096 D128", [4096] * 4, [4096] * 4, 16, 128, True))
    return out


# What the released XL/2 forward runs, most decisive first: spatial, Read/Write at J_max (under the released budget
# semantics they see every latent at any budget), the core at every budget and the ragged cores (where the table
# chooses among varlen kernels); then the paper preset's smaller Read/Write and the rest.
_FIRST = ("spatial", "read J=64", "write J=64", "core J=64", "core mixed", "core ccfg", "core J=16", "core J=4",
          "core J=1")


def _priority(shapes: list, passes: list, fp32_labels: set) -> list:
    """``(label, lens_q, lens_k, heads, d, with_segments, dtype, grad)`` in the order they are measured, so the
    ``--max-seconds`` budget is spent on what inference uses first: every forward (shapes in ``_FIRST`` order,
    then the rest), then the fp32 forwards, then forward + backward in the same order."""
    rank = {lab: i for i, lab in enumerate(_FIRST)}
    ordered = sorted(shapes, key=lambda s: min((r for lab, r in rank.items() if s[0] == lab or
                                                s[0].startswith(lab + " ")), default=len(rank)))
    fwd = [(*s, dt, g) for dt, g in passes if not g for s in ordered]
    fp32 = [(*s, torch.float32, False) for s in ordered if s[0] in fp32_labels]
    bwd = [(*s, dt, g) for dt, g in passes if g for s in ordered]
    return fwd + fp32 + bwd


def _inputs(lens_q, lens_k, heads, d, dtype, grad, with_segments, seed, device="cuda"):
    """Validated inputs of one row. A row without segments measures the class of a call whose lengths only the
    device knows ("ragged"): the value checks must not derive them (``derive_segments=False``), or its
    few runs would be measured as the "runs" class a second time and no ragged entry would be written."""
    from elit_kernels.attention import SegmentRuns, validate_inputs

    g = torch.Generator(device=device).manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q, k, v = (torch.randn(n, heads, d, device=device, dtype=dtype, generator=g).requires_grad_(grad)
               for n in (tq, tk, tk))
    cq = torch.zeros(len(lens_q) + 1, dtype=torch.int32)
    ck = torch.zeros(len(lens_k) + 1, dtype=torch.int32)
    cq[1:] = torch.tensor(lens_q).cumsum(0)
    ck[1:] = torch.tensor(lens_k).cumsum(0)
    seg = SegmentRuns.from_lengths(lens_q, lens_k) if with_segments else None
    return validate_inputs(q, k, v, cq.to(device), ck.to(device), max(lens_q), max(lens_k), None, False,
                           segments=seg, derive_segments=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=_cli.user_path)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=72)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--merge", type=_cli.user_path, default=_COMMITTED,
                    help="a dispatch table whose entries of shape classes this run does not measure are kept in the "
                         "one it writes (other GPUs; classes a shorter run did not reach); default: the committed "
                         "elit_kernels/attention/dispatch_table.json. '' writes this run's entries alone")
    args = ap.parse_args(argv)
    for flag, value, ok, want in (
            ("--max-seconds", args.max_seconds, math.isfinite(args.max_seconds) and args.max_seconds > 0,
             "a finite number of seconds > 0 (nan never stopped)"),
            ("--batch", args.batch, args.batch >= 1, "an int >= 1"),
            ("--head-dim", args.head_dim, 1 <= args.head_dim <= 256, "an int in 1..256"),
            ("--repeats", args.repeats, args.repeats >= 1, "an int >= 1 (0 wrote an empty table)")):
        if not ok:  # checked before the CUDA check: a bad command is named on any machine
            ap.error(f"{flag}: expected {want}, got {value!r}")
    try:  # read now: a table that cannot be merged is a usage error before minutes of measuring, not after
        keep = args.merge and (args.merge != _COMMITTED or os.path.exists(_COMMITTED))  # an install without it
        args.merge_table = _read_table(args.merge) if keep else None
    except ValueError as e:
        ap.error(f"--merge: {args.merge} {e} (pass --merge '' to write this run's entries alone)")
    if not torch.cuda.is_available():
        print("measure_dispatch: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if why := output_dir_error(args.out):
        ap.error(f"--out: {why}")
    t_start = time.perf_counter()
    gpu = torch.cuda.get_device_name()
    shapes = _shapes(args.batch, 16, 64, 64, 16, args.head_dim)
    entries, lines = [], []
    passes = [(torch.bfloat16, False), (torch.bfloat16, True)]
    fp32_labels = {f"spatial {args.batch}x1024", "core J=64", "read J=64", "core mixed, no segments"}
    interrupted = False
    try:  # a SIGINT (gpu_check's stage limit) keeps what was measured: written below, the overhead left out
        _measure(args, shapes, passes, fp32_labels, t_start, entries, lines)
    except KeyboardInterrupt:
        interrupted = True
        lines.append("| (interrupted: the rest not run) | | | | | | | |")
    _write(args, gpu, entries, lines, t_start, interrupted)
    return 130 if interrupted else 0


def _measure(args, shapes, passes, fp32_labels, t_start, entries, lines) -> None:
    """Time every shape in priority order until --max-seconds, appending table entries and report lines."""
    from elit_kernels.attention import dispatch as D  # after main's CUDA check: imports the package

    for label, lq, lk, h, d, ws, dtype, grad in _priority(shapes, passes, fp32_labels):
        if time.perf_counter() - t_start > args.max_seconds:  # what is left: listed as not run
            lines.append(f"| {label} | {str(dtype)[6:]} | {'fwd+bwd' if grad else 'fwd'} | not run: --max-seconds spent |")
            continue
        inp = _inputs(lq, lk, h, d, dtype, grad, ws, seed=len(entries))
        D.clear_decisions()
        before, src = D.ranking(inp)
        picked = D.select_backend(inp).name
        ms = D.time_backends(inp, args.repeats)
        if not ms:
            continue
        order = sorted(ms, key=ms.get)
        c = D.shape_class(inp)
        entries.append({**{k: c[k] for k in ("gpu", "arch", "dtype", "kind", "grad", "head_dim", "lq", "lk",
                                             "segments")},
                        "ranking": order, "ms": {k: round(v, 4) for k, v in ms.items()}, "shape": label})
        best = ms[order[0]]
        fa2 = ms.get("torch_varlen")
        lines.append(f"| {label} | {c['dtype']} | {'fwd+bwd' if grad else 'fwd'} | {picked} ({src}) "
                     f"{ms.get(picked, float('nan')):.3f} | {order[0]} {best:.3f} | "
                     f"{ms.get(picked, float('nan')) / best:.2f} | "
                     + (f"{fa2:.3f} ({fa2 / ms.get(picked, fa2):.2f}x)" if fa2 else "n/a") + " | "
                     + ", ".join(f"{k} {v:.3f}" for k, v in sorted(ms.items(), key=lambda kv: kv[1])) + " |")
        print(lines[-1], flush=True)
        del inp


#: the shape class dispatch reads an entry for: a run that measures a class replaces every older entry of it (a
#: cut run's new entries must not be blended with an older run's ranking of the same class)
_ENTRY_KEY = ("gpu", "dtype", "kind", "grad", "head_dim", "lq", "lk", "segments")
_PROVENANCE = ("device", "torch", "triton", "cuda", "date", "commit", "source")


def _read_table(path: str) -> dict:
    """The table at ``path`` (ValueError saying why it cannot be merged)."""
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except FileNotFoundError:
        raise ValueError("does not exist") from None
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested past the parser's depth
        raise ValueError(f"cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(old, dict) or not isinstance(old.get("entries"), list) \
            or not all(isinstance(e, dict) for e in old["entries"]):
        raise ValueError("is not a dispatch table (an object whose 'entries' is a list of objects)")
    from elit_kernels.attention.dispatch import _valid_entry

    for i, e in enumerate(old["entries"]):
        if not _valid_entry(e) or not isinstance(e.get("shape", ""), str):
            raise ValueError(f"holds an entry dispatch cannot read (entries[{i}]: gpu, arch, dtype, kind and shape "
                             "must be strings, head_dim, lq, lk and segments ints, grad a bool, ranking a list of "
                             "names)")
    return old


def merge_tables(old: dict | None, entries: list[dict], run: dict) -> tuple[dict, int]:
    """``(table, kept)``: this run's ``entries`` and every entry of ``old`` (a table as read from
    dispatch_table.json, or None) of a shape class this run did not measure (``_ENTRY_KEY``): other GPUs'
    rankings and this GPU's classes a shorter run did not reach stay; a class measured again is this run's alone.
    ``kept`` counts the entries from ``old``. Every entry carries the ``_PROVENANCE`` fields of the run that
    measured it (an old entry without them takes its table's top-level ones); the top level describes this run,
    and ``devices`` lists the GPUs held."""
    stamp = {k: run.get(k) for k in _PROVENANCE}
    new = [{**e, **stamp} for e in entries]

    def key(e):  # grad may be absent from an old entry (dispatch reads it as False)
        return tuple(bool(e.get(k, False)) if k == "grad" else e.get(k) for k in _ENTRY_KEY)

    measured = {key(e) for e in new}
    kept = []
    for e in (old or {}).get("entries", []):
        if key(e) in measured:
            continue
        kept.append({**{k: old.get(k) for k in _PROVENANCE if old.get(k) is not None}, **e})
    merged = new + kept
    table = {"about": "Backend rankings measured on GPUs by tools/measure_dispatch.py, read by "
                      "elit_kernels.attention.dispatch (nearest entry of the same GPU, dtype, kind and pass; a GPU "
                      "with no entries reads those of its architecture, 'arch'). "
                      "Each entry names the run that measured it; the top level describes the newest run.",
             **run, "devices": sorted({str(e.get("gpu")) for e in merged}), "entries": merged}
    return table, len(kept)


def _write(args, gpu, entries, lines, t_start, interrupted: bool) -> None:
    """dispatch_table.json and dispatch_report.md (with the per-call overhead unless ``interrupted``)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    run = {"device": gpu, "torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
           "source": f"tools/measure_dispatch.py, ELIT-SiT-XL/2 512px shapes, batch {args.batch}, "
                     f"head dim {args.head_dim}, {args.repeats} timed calls per backend (median)"}
    table, kept = merge_tables(args.merge_table, entries, run)
    with open(os.path.join(args.out, "dispatch_table.json"), "w") as f:
        json.dump(table, f, indent=1)
    if args.merge_table is not None:
        print(f"measure_dispatch: dispatch_table.json holds this run's {len(entries)} entries and {kept} kept from "
              f"{args.merge} (other GPUs, and this GPU's shape classes this run did not measure)")
    # per-call overhead on a tiny Read-like call with host-side segments (the op bench's measurement)
    from elit_kernels.bench.attention_cases import dispatch_overhead_us

    o = None if interrupted else dispatch_overhead_us(torch.device("cuda"), torch.bfloat16, 16, args.head_dim)
    with open(os.path.join(args.out, "dispatch_report.md"), "w") as f:
        f.write(f"# Dispatch measurement on {gpu}\n\ntorch {torch.__version__}, triton {tv}, commit {commit}, "
                f"{table['date']}. ms per call (median of {args.repeats}); 'picked' is what default dispatch chose "
                "before this measurement (committed table or static order).\n\n"
                "| shape | dtype | pass | picked (source) ms | fastest ms | picked / fastest | FA2 varlen ms (vs picked) "
                "| every backend, ms |\n|---|---|---|---|---|---|---|---|\n")
        f.write("\n".join(lines) + "\n\n")
        if o is not None:
            f.write(f"Per-call host time added to the chosen backend ({o['backend']}, {o['direct_us']:.1f} us a call "
                    f"itself; Read-like call, 8 windows, host-side segments): varlen_attention {o['added_us']:.1f} us, "
                    f"an AttentionPlan (the model's path) {o['plan_added_us']:.1f} us.\n")
    if o is not None:
        print(f"overhead: varlen_attention +{o['added_us']:.1f} us/call, plan +{o['plan_added_us']:.1f} us/call over "
              f"{o['backend']} ({o['direct_us']:.1f} us/call)")
    print(f"measure_dispatch: {len(entries)} entries in {time.perf_counter() - t_start:.0f} s -> {args.out}"
          + (" (interrupted)" if interrupted else ""))


if __name__ == "__main__":
    sys.exit(main())
