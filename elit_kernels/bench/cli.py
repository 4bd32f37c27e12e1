"""``elit-bench``: ELIT-DiT model latency vs latent budget, with FLOPs, memory and baselines.

Defaults: on a GPU, XL/2 at 512px in bf16; on CPU, S/2 at 256px in fp32, batch 4, both presets
(CPU_DEFAULT_RUNTIME below). Before timing it prints an estimate of the whole run, from the first
case it warms up, and warns when that exceeds LONG_RUN_MINUTES or a backend runs under the Triton
interpreter. Examples::

    elit-bench                                   # the default for this machine
    python -m elit_kernels.bench --device cpu --config tiny --resolution 64 --repeats 3 --out bench_out
    elit-bench --scenarios uniform,mixed --budgets 4,8,16,32,64 --backends triton,torch --out gpu_results
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .. import _cli
from .. import attention as _attention
from ..models.config import _SIZES, PRESETS, config_dict, preset_config
from .flops import count_flops
from .report import OUTPUT_FILES, check_targets, format_table, make_rows, metadata, write_outputs
from .scenarios import DEFAULT, DEFAULT_SCENARIOS, SCENARIOS, WRAPPERS, Setup, build_cases, split_backend
from .timing import (RunProgress, format_seconds, measure_memory, measure_peaks, remaining_seconds, run_interleaved,
                     sample_seconds, start_up, time_once, warm_up)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DEFAULTS = {  # device type -> (config, resolution, batch, dtype, repeats)
    "cuda": ("XL/2", 512, 8, "bf16", 5),
    "cpu": ("S/2", 256, 4, "fp32", 5),
}
# The one statement of how long the CPU default takes (README and --help quote it; tests/test_bench.py checks).
CPU_DEFAULT_RUNTIME = ("3.5 to 9.5 minutes on 2 shared CPU cores, depending on the CPU and its other load (6 runs: 3 min 21 s "
                       "on an Intel Xeon, 4 min 3 s to 9 min 23 s on an AMD EPYC; peak RSS 1.1 to 1.5 GB)")
LONG_RUN_MINUTES = 5  # warn before a run estimated longer than this


class BenchError(ValueError):
    """A bad flag: the message names the flag."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elit-bench", description=__doc__.split("\n\n")[0],
                                epilog=f"The CPU default takes {CPU_DEFAULT_RUNTIME};\nevery run prints its own "
                                       "estimate before timing. Budgets are latents per group J̃ in 1..J_max.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    p.add_argument("--config", default=None, help=f"model size: {', '.join(_SIZES)} (default: XL/2 on GPU, S/2 on CPU)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels, a multiple of 16 (8x VAE; default 512 GPU / 256 CPU)")
    p.add_argument("--batch", type=int, default=None, help="samples per forward (default 8 GPU / 4 CPU)")
    p.add_argument("--backends", default=None,
                   help="comma list of varlen_attention backends for ELIT and the plain DiT; 'default' is default "
                        "dispatch (the fastest backend measured for each attention call), what a user gets without "
                        "naming one; NAME+graph replays each ELIT forward from a CUDA graph captured per budget "
                        "signature (elit_kernels.models.capture; GPU only); NAME+compile runs it under "
                        "torch.compile(fullgraph=True), compiled once per budget signature during the warm-up "
                        "(default on GPU: default,default+graph; on CPU: torch)")
    p.add_argument("--budgets", default=None,
                   help="comma list of per-group budgets J̃, each in 1..J_max (default: J_max/16, J_max/8, …, J_max; "
                        "J_max is always added). The model also runs 0 (no latents); the benchmark does not, since "
                        "the official code and its dense baseline need at least one latent per group")
    p.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                   help=f"comma list of {', '.join(SCENARIOS)} (default: {','.join(DEFAULT_SCENARIOS)}; 'sampling' "
                        "times a whole CCFG sampling run per case against the official sampler)")
    p.add_argument("--sampling-steps", type=int, default=None,
                   help="Euler steps of one sampling run (the sampling scenario; default 50 on GPU, the official "
                        "configs' count; 4 on CPU)")
    p.add_argument("--presets", default=",".join(PRESETS),
                   help="comma list of model presets to run at the chosen size: paper (elit_config) and/or released "
                        "(the ELIT-SiT code and checkpoints, elit_sit_config; encoder_depth 8) (default: both; "
                        "one preset halves the run)")
    p.add_argument("--repeats", type=int, default=None, help="timing samples per case, interleaved (default 5)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default bf16 GPU / fp32 CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default 1 on CPU: on a shared 2-core machine, 2 OpenMP threads make "
                        "every op wait for a descheduled thread whenever another process runs; untouched on GPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up calls per case before timing (default 2 GPU / 1 CPU; the FLOP count is one more call)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget: stop repeating once it is spent (at least one full repeat; results still written)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights and inputs, in [0, 2**32 - 1] (default 0; every case of a preset "
                        "shares them)")
    p.add_argument("--out", default=None, type=_cli.user_path, metavar="DIR",
                   help="write " + ", ".join(f"DIR/{f}" for f in OUTPUT_FILES) + "; with --replot, where the "
                        "replotted files go (default: print the table only; with --replot, the replotted folder)")
    p.add_argument("--breakdown", action="store_true",
                   help="after timing, profile one eager forward per preset at the largest and smallest uniform "
                        "budget with each eager backend and print where its time goes: per stage (head, Read, "
                        "core, Write, tail, ...) and kind of op (attention, matmul, norm/elementwise, gather/copy); "
                        "device time on a GPU, host time on CPU (elit_kernels.bench.breakdown); saved in "
                        "results.json under metadata.breakdown")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the estimate and warnings still print)")
    p.add_argument("--replot", default=None, type=_cli.user_path, metavar="DIR",
                   help="time nothing: read DIR/results.json of an earlier run, print its table and targets, and "
                        "redraw DIR/summary.md and DIR/latency_vs_latents.png; with --out OUT, write all four files "
                        "to OUT instead (results.json copied, results.csv from its rows, summary.md and the plot "
                        "redrawn) and leave DIR as it is. Takes no other flag: a run flag (--budgets, --device, ...) "
                        "with --replot is a usage error (default: off)")
    return p


def replot(src: str, out: str | None = None) -> int:
    """``--replot DIR [--out OUT]``: the table, targets, summary.md and plot of DIR/results.json, re-rendered by
    this version, into DIR, or into OUT with a copy of results.json and results.csv from its rows (DIR untouched).
    A file older than a row field (``steps``, ``tflops``, ``pct_peak_flops``) gets it derived (``derive_rows``).
    A results.json that cannot be read, or lacks a field the replot reads or has it of the wrong type, is a
    BenchError naming the file, the row and the key, raised before anything is written."""
    import json
    import os
    import shutil

    from .report import derive_rows, markdown_summary, plot, results_error, write_csv, write_text

    path = os.path.join(src, OUTPUT_FILES[0])
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise BenchError(f"--replot: cannot read {path} ({type(e).__name__}: {e}); expected the results.json that "
                         "elit-bench --out DIR wrote") from None
    if why := results_error(data):
        raise BenchError(f"--replot: {path}: {why}")
    md = data["metadata"]
    rows = derive_rows(data["rows"], md)  # an older file's TFLOP/s from its GFLOPs and latencies
    dst = src if out is None else out
    if out is None:
        if why := _cli.output_dir_error(src, OUTPUT_FILES[2:]):
            raise BenchError(f"--replot: {why}; --out OUT writes the replotted files to another folder")
    elif why := _cli.output_dir_error(out, OUTPUT_FILES):
        raise BenchError(f"--out: {why}")
    copy = out is not None and not os.path.samefile(src, out)
    targets = check_targets(rows, md.get("device_type"))
    word = "CPU" if md.get("device_type") != "cuda" else "GPU"
    print(format_table(rows, targets, f"{word} ({md.get('device')}), {md.get('config')} {md.get('resolution')}px "
                                      f"batch {md.get('batch')} {md.get('dtype')}, torch {md.get('torch')} (replotted)"))
    # each file whole or not at all (a full disk keeps an earlier file, never leaves it empty); OutputWriteError
    # naming the file otherwise
    if copy:
        p = _cli.write_output(os.path.join(dst, OUTPUT_FILES[0]), lambda tmp: shutil.copyfile(path, tmp))
        print(f"wrote {p}")
        p = os.path.join(dst, OUTPUT_FILES[1])
        write_csv(p, rows)
        print(f"wrote {p}")
    p = write_text(os.path.join(dst, OUTPUT_FILES[2]), markdown_summary(rows, targets, md))
    print(f"wrote {p}")
    p = os.path.join(dst, OUTPUT_FILES[3])
    plot(rows, md, p)
    print(f"wrote {p}")
    return 0


def _given_flags(argv) -> list[str]:
    """The flags ``argv`` gives (parsed as main parses it: abbreviations, ``--flag=value``), in the order given;
    a flag is given even when its value equals the default."""
    q = build_parser()
    for a in q._actions:
        a.default = argparse.SUPPRESS
    given = vars(q.parse_args(argv))
    flags = [a.option_strings[-1] for a in q._actions if a.dest in given and a.option_strings]
    words = [w.split("=", 1)[0] for w in (sys.argv[1:] if argv is None else list(argv))]

    def first(flag):
        return next((i for i, w in enumerate(words) if w.startswith("--") and len(w) > 2 and flag.startswith(w)),
                    len(words))
    return sorted(flags, key=first)


def _int_list(flag: str, text: str) -> list[int]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise BenchError(f"{flag}: expected a comma-separated list of integers, got {text!r}")
    out = []
    for s in items:
        try:
            out.append(int(s))
        except ValueError:
            raise BenchError(f"{flag}: {s!r} is not an integer (expected e.g. 1,2,4,8,16)") from None
    return out


def resolve(args) -> tuple[Setup, dict]:
    """Check every flag and fill in defaults; raises BenchError naming the flag."""
    try:
        device = _cli.bench_device(args.device)
    except ValueError as e:
        raise BenchError(f"--device: {e}") from None
    d_cfg, d_res, d_batch, d_dtype, d_rep = DEFAULTS[device.type]
    name = args.config or d_cfg
    if name not in _SIZES:
        raise BenchError(f"--config: unknown config {name!r}; known: {', '.join(_SIZES)}")
    res = args.resolution if args.resolution is not None else d_res
    if res < 16 or res % 16:
        raise BenchError(f"--resolution: expected a positive multiple of 16 (8x VAE, patch 2), got {res}")
    presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    bad = [s for s in presets if s not in PRESETS]
    if bad or not presets:
        raise BenchError(f"--presets: unknown preset {bad[0] if bad else args.presets!r}; choose from {', '.join(PRESETS)}")
    presets = list(dict.fromkeys(presets))
    try:
        cfgs = {pr: preset_config(pr, name, res) for pr in presets}
    except ValueError as e:
        raise BenchError(f"--resolution: {res}px does not fit config {name}: {e}") from None
    cfg = cfgs[presets[0]]
    for pr, c in cfgs.items():
        if (c.latents_per_group, c.groups, c.head_dim) != (cfg.latents_per_group, cfg.groups, cfg.head_dim):
            raise BenchError(f"--presets: {pr} and {presets[0]} differ in groups / J_max / head dim at {name} {res}px "
                             f"({presets[0]}: {cfg.groups} groups, J_max {cfg.latents_per_group}; {pr}: {c.groups} groups, "
                             f"J_max {c.latents_per_group}); run them one at a time: --presets {presets[0]} or "
                             f"--presets {pr}")
    batch = args.batch if args.batch is not None else d_batch
    if batch < 1:
        raise BenchError(f"--batch: expected a positive integer, got {batch}")
    dname = (args.dtype or d_dtype).lower()
    if dname not in DTYPES:
        raise BenchError(f"--dtype: expected one of fp32, bf16, fp16, got {args.dtype!r}")
    dtype = DTYPES[dname]
    repeats = args.repeats if args.repeats is not None else d_rep
    if repeats < 1:
        raise BenchError(f"--repeats: expected a positive integer, got {repeats}")
    if (msg := _cli.seed_error("--seed", args.seed)) is not None:
        raise BenchError(msg)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    if threads is not None and threads < 1:
        raise BenchError(f"--threads: expected a positive integer, got {threads}")
    if args.max_seconds is not None and (why := _cli.finite_error(args.max_seconds, what="number of seconds")):
        raise BenchError(f"--max-seconds: {why}")
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 1)
    if warmup < 1:  # the first call also sizes the CPU timing loop (timing.warm_up): there is always one
        raise BenchError(f"--warmup: expected >= 1 (the first call also sizes the timing loop), got {warmup}")
    jm = cfg.latents_per_group
    if args.budgets is None:
        budgets, j = [], jm
        while j >= max(1, jm // 16) and j >= 1:
            budgets.append(j)
            j //= 2
    else:
        budgets = _int_list("--budgets", args.budgets)
        bad = [j for j in budgets if not 1 <= j <= jm]
        if bad:
            raise BenchError(f"--budgets: each budget must be in 1..{jm} (J_max of {name} at {res}px), got {bad[0]}")
    budgets = sorted(set(budgets) | {jm})
    warnings = []
    scen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in scen if s not in SCENARIOS]
    if bad or not scen:
        raise BenchError(f"--scenarios: unknown scenario {bad[0] if bad else args.scenarios!r}; choose from {', '.join(SCENARIOS)}")
    scen = list(dict.fromkeys(scen))  # a scenario named twice runs once, as --presets, --budgets and --backends
    notes = []
    if "mixed" in scen and batch < 2:
        if args.scenarios != ",".join(DEFAULT_SCENARIOS):
            raise BenchError("--scenarios: 'mixed' needs --batch >= 2 (samples with different budgets)")
        scen.remove("mixed")
        notes.append("mixed skipped: batch 1")
    if len(budgets) == 1:
        # what a one-point sweep leaves with nothing to vary, of the scenarios this run has (the weak budget of
        # guidance and sampling is max(1, J_max // 16), not one of --budgets: it equals J_max only when J_max is 1)
        flat = ["every uniform ratio to the full budget is 1"] * ("uniform" in scen) \
            + ["the mixed batch has a single budget (ragged = padded = sum of parts)"] * ("mixed" in scen)
        weak = [x for x in ("guidance", "sampling") if x in scen and jm == 1]
        if weak:
            flat.append(f"the {' and '.join(weak)} weak budget equals J_max, so CCFG is CFG")
        if flat:
            why = (f"J_max is {jm} for {name} at {res}px" if jm == 1
                   else f"--budgets {args.budgets} gives only J_max = {jm}")
            warnings.append(f"a one-point budget sweep ({why}): {'; '.join(flat)}; for a sweep pick a larger "
                            "--resolution" + (" or more --budgets" if jm > 1 else ""))
    probe = _cli.model_probe(cfg, device, dtype)
    if args.backends is None and device.type != "cpu":
        backends = [DEFAULT, DEFAULT + "+graph"]
    elif args.backends is None:
        backends = [b for b in _cli.usable_backends(probe) if b != "reference"]
        if device.type == "cpu":
            # CPU default: the fair baseline only, so the run stays short. Other CPU backends (cpp) on
            # request; the Triton interpreter is a correctness tool, never a benchmark.
            backends = [b for b in backends if b == "torch"] or [b for b in backends if not b.startswith("triton")]
        if not backends:
            backends = ["reference"]
    else:
        backends = [s.strip() for s in args.backends.split(",") if s.strip()]
        if not backends:
            raise BenchError("--backends: expected a comma-separated list of backend names")
        for b in backends:
            be_name, wrap = split_backend(b)
            if (wrap not in ("",) + WRAPPERS) or b.endswith("+") or b.startswith("+"):
                raise BenchError(f"--backends: {b!r}: unknown suffix '+{wrap}'; expected NAME, NAME+graph or "
                                 "NAME+compile")
            if wrap == "graph" and device.type != "cuda":
                raise BenchError(f"--backends: {b!r} replays CUDA graphs, which needs --device cuda")
            if be_name is None:
                continue
            err = _cli.backend_error("--backends", be_name, probe, f"{dname} on {device.type} (head dim {cfg.hidden // cfg.heads})")
            if err:
                raise BenchError(err)
        backends = list(dict.fromkeys(backends))
    default_label = None
    if any(split_backend(b)[0] is None for b in backends):  # default dispatch reads $ELIT_BACKEND on every call
        if err := _cli.env_backend_error(probe, f"{dname} on {device.type} (head dim {cfg.hidden // cfg.heads})"):
            raise BenchError(err)
        if (env := _cli.env_backend()) is not None:
            default_label = f"({_cli.ENV_BACKEND}={env})"
            notes.append(f"the {DEFAULT} rows ran every attention call on {env} ({_cli.ENV_BACKEND}={env} was set), not "
                         f"on default dispatch's choice; they are labelled '{DEFAULT} {default_label}'")
    if dtype == torch.float16 and device.type == "cpu":
        warnings.append(_cli.fp16_cpu_warning(f"--dtype {dname}") + ", and its times say nothing about a GPU; prefer "
                        "--dtype bf16 or fp32")
    for tb in [b for b in backends if b in ("triton", "triton_window")] if _cli.triton_interpreted() else []:
        warnings.append(f"backend {tb} runs under the Triton interpreter (TRITON_INTERPRET=1): a correctness tool, "
                        "orders of magnitude slower than the compiled kernel (over a minute per case at S/2); its times "
                        "say nothing about the GPU kernel")
    steps = args.sampling_steps if args.sampling_steps is not None else (50 if device.type == "cuda" else 4)
    if isinstance(steps, bool) or steps < 1:
        raise BenchError(f"--sampling-steps: expected an int >= 1, got {steps}")
    # last of the checks, as it creates the folder: a run never ends in a write error after its timing
    if getattr(args, "out", None) and (why := _cli.output_dir_error(args.out, OUTPUT_FILES)):
        raise BenchError(f"--out: {why}")
    setup = Setup(cfgs=cfgs, device=device, dtype=dtype, batch=batch, budgets=budgets, backends=backends,
                  scenarios=scen, seed=args.seed, sampling_steps=steps)
    extra = {"config": name, "presets": presets, "preset_configs": {pr: config_dict(c) for pr, c in cfgs.items()},
             "resolution": res, "batch": batch, "dtype": dname, "budgets": budgets,
             "backends": backends,
             "threads": threads, "max_seconds": args.max_seconds, "scenarios": scen, "repeats": repeats, "warmup": warmup,
             "j_max": jm, "groups": cfg.groups, "tokens_per_group": cfg.tokens_per_group, "notes": notes,
             "warnings": warnings, "breakdown": bool(args.breakdown), "default_label": default_label,
             "sampling_steps": steps if "sampling" in scen else None}
    return setup, extra


def _say(msg: str) -> None:
    print(f"elit-bench: {msg}", file=sys.stderr, flush=True)


def _estimate(extra: dict, by_backend: dict, to_warm: list, to_time: list, t_start: float, dev) -> None:
    """Print the run-time estimate once the probes (``by_backend``: the first case of each backend) are warmed up;
    warn when it is long."""
    repeats, ref = extra["repeats"], next(iter(by_backend.values()))
    est = extra["estimate_s"] = time.monotonic() - t_start + remaining_seconds(to_warm, to_time, repeats, ref, dev,
                                                                               by_backend)
    capped = extra.get("max_seconds") is not None and est > extra["max_seconds"]
    speeds = "; ".join(f"{b}: warm-up {c.warm_s:.1f} s{' (compile)' if b.endswith('+compile') else ''}"
                       f"{' (capture)' if b.endswith('+graph') else ''}, {sample_seconds(c, dev):.2f} s a sample"
                       for b, c in by_backend.items())
    _say(f"estimated run time {format_seconds(est)}: {len(to_time)} cases, {extra['warmup']} warm-up call(s) and "
         f"{repeats} timed samples each, at the speed of the first case ({ref.preset} {ref.model} J̃={ref.budget}) "
         f"of each backend: {speeds}"
         + (f"; --max-seconds stops it after about {format_seconds(extra['max_seconds'])}" if capped else ""))
    if est > 60 * LONG_RUN_MINUTES and not capped:
        _say(f"warning: this run takes about {format_seconds(est)}, over {LONG_RUN_MINUTES} min. Shorter: "
             "--presets paper (half the cases), --scenarios uniform, --repeats 3, --max-seconds S (stops "
             "repeating, still writes the results), or a smaller --config / --resolution")


def run(setup: Setup, extra: dict, *, progress: bool = True) -> tuple[list[dict], list[dict], dict]:
    """Build, warm up, count FLOPs, measure memory, time interleaved. Returns (rows, targets, metadata).

    Prints (stderr) what it is about to do, then, after the first full-budget case is warmed up, an
    estimate of the whole run (and a warning when it exceeds LONG_RUN_MINUTES); one progress bar covers
    warm-up and timing, its total refined as each case's own speed is measured."""
    dev = setup.device
    t_start = time.monotonic()
    was = _attention.value_checks_enabled()
    # The eager cu_seqlens value checks copy device->host on every attention call; a benchmark
    # measures the kernels, not the validation (the layout is built by our own code).
    _attention.set_value_checks(False)
    threads_was = torch.get_num_threads()
    if extra.get("threads"):
        torch.set_num_threads(extra["threads"])
    bar = limit_was = None
    try:
        cases, meta = build_cases(setup)
        # A compiled model compiles once per budget signature, and dynamo keeps at most recompile_limit (8 by
        # default) graphs per forward, running it eagerly past that: a +compile row must not time eager forwards.
        n_compiled = sum(split_backend(c.backend)[1] == "compile" for c in cases)
        if n_compiled:
            limit_was = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit_was, 2 * n_compiled + 8)
        repeats = extra["repeats"]
        # The probes, warmed up first: each backend's first full-budget ELIT case (the costliest single forward of
        # the uniform sweep). Until a case has its own measured speed, the estimate counts it at its backend's
        # probe's: a +compile or +graph backend's warm-up also compiles or captures, once per budget signature.
        def first_of(backend):
            mine = [c for c in cases if c.backend == backend]
            return next((c for c in mine if c.scenario == "uniform" and c.model == "elit"
                         and c.budget == extra["j_max"]), mine[0] if mine else None)

        probes = []
        for b in dict.fromkeys([cases[0].backend, *extra["backends"]]):
            if (c := first_of(b)) is not None:
                probes.append(c)
        order = probes + [c for c in cases if c not in probes]
        _say(f"{len(cases)} cases ({', '.join(extra['presets'])} × {', '.join(extra['scenarios'])}; backends "
             f"{', '.join(extra['backends'])}): {extra['warmup']} warm-up call(s) + a FLOP count each, then "
             f"{repeats} interleaved timing repeats; warming up the first case of each backend to estimate the run time")
        # one-time costs (FlopCounterMode's first entry, CUDA start-up) before the probes, so that their warm-up,
        # at which the estimate counts every case, holds only what each case pays
        extra["start_up_s"] = start_up(dev, setup.dtype)
        t_work = time.monotonic()
        deadline = t_start + extra["max_seconds"] if extra.get("max_seconds") else None
        skipped, failed = [], []

        def warmed_probes() -> dict:
            return {c.backend: c for c in probes if c.warm_s is not None and c not in failed}

        def refresh(i_warm: int, desc: str) -> None:
            ref = next((x for x in order if x.warm_s is not None and x not in failed), None)
            if ref is None or not estimated:
                return
            nonlocal bar
            if bar is None:  # created after the estimate is printed, so the two do not share a line
                bar = RunProgress(progress)
            pending = [c for c in order if c not in skipped and c not in failed]
            bar.update(time.monotonic() - t_work,
                       remaining_seconds(order[i_warm:], pending, repeats, ref, dev, warmed_probes()), desc)

        estimated = False
        with torch.no_grad():
            for i, c in enumerate(order):
                if (deadline is not None and time.monotonic() > t_start + 0.7 * extra["max_seconds"]
                        and any(x.warm_s is not None and x not in failed for x in order[:i])):
                    skipped.append(c)  # keep time for the repeats (once one case can be timed); the row says so
                    continue
                t0 = time.monotonic()
                try:
                    warm_up(c, dev, extra["warmup"], 20.0)
                    c.flops = count_flops(c.count_fn or c.fn, c.models)
                    c.peak_mem_mb = measure_memory(c, dev)
                except Exception as e:  # one backend failing one case must not lose the whole run
                    c.note = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    failed.append(c)
                c.warm_s = time.monotonic() - t0
                stand_in = not estimated and i >= len(probes) - 1 and not warmed_probes()  # every probe failed
                if c not in failed and (c in probes or stand_in):
                    # Warm calls for the estimate (the warm-up's last call may be the cold first one: 2.5 s vs a
                    # 1.65 s median measured); not kept as samples, which come from the interleaved repeats.
                    c.call_ms = min(time_once(c, dev)[0] for _ in range(2))
                if not estimated and i >= len(probes) - 1:
                    by_backend = {c.backend: c} if stand_in and c not in failed else warmed_probes()
                    if by_backend:
                        estimated = True
                        _estimate(extra, by_backend, order[i + 1:], [x for x in order if x not in failed], t_start,
                                  dev)
                refresh(i + 1, "warm-up + FLOPs")
        for c in skipped:
            c.note = "skipped: --max-seconds spent during warm-up"
        timed = [c for c in cases if c not in skipped and c not in failed]
        # the device's matmul rate, for each row's fraction of it. Measured before the timing: gpu_check's stage-limit
        # SIGINT comes late in a run, where --breakdown keeps the timed rows; between the timing and the breakdown it
        # would lose them all
        peaks = measure_peaks(dev, setup.dtype)
        extra["peaks"] = peaks
        refresh(len(order), "timing")
        extra["repeats_done"] = run_interleaved(timed, dev, repeats, progress=lambda: refresh(len(order), "timing"),
                                                deadline=deadline, seed=setup.seed)
        extra["run_seconds"] = time.monotonic() - t_start
        extra["notes"] = extra["notes"] + [f"{len(skipped)} cases skipped (time budget)"] * bool(skipped) \
            + [f"{len(failed)} cases failed (see their note)"] * bool(failed)
        rows = make_rows(cases, dev, peaks)
        if extra.get("default_label"):  # say what ran: $ELIT_BACKEND, not default dispatch
            for r in rows:
                if split_backend(r["backend"])[0] is None:
                    r["backend"] = f"{r['backend']} {extra['default_label']}"
        if extra.get("breakdown"):
            extra["breakdown"] = run_breakdowns(cases, extra)
        md_threads = torch.get_num_threads()
    finally:
        if bar is not None:
            bar.close()
        if limit_was is not None:
            torch._dynamo.config.recompile_limit = limit_was
        _attention.set_value_checks(was)
        torch.set_num_threads(threads_was)
    targets = check_targets(rows, dev.type)
    md = metadata(dev, {**extra, **meta, "memory": "peak_mem_mb: memory one call allocates beyond what is held before it (MiB; weights "
                        "and inputs excluded); " + ("torch.cuda.max_memory_allocated - memory_allocated before"
                        if dev.type == "cuda" else "torch.profiler memory events (profile_memory=True), running sum's max"),
                        "timer": "triton.testing.do_bench median per repeat" if dev.type == "cuda"
                        else "time.perf_counter (wall, latency_ms) and time.process_time (cpu_ms) after warm-up, "
                             "one sample per repeat",
                        "flops": "torch.utils.flop_counter.FlopCounterMode (non-attention) + analytic attention "
                                 "4*sum(Lq*Lk)*H*D from the layout (FlopCounterMode cannot see varlen ops)",
                        "value_checks": "off while timing", "cpu_threads": md_threads})
    return rows, targets, md


def run_breakdowns(cases, extra) -> list[dict]:
    """``forward_breakdown`` of each eager ElitDiT case of the uniform sweep at the largest and smallest budget
    (one profiled forward each, after the timing so that it cannot disturb it).

    A Ctrl-C (a time limit's SIGINT) during the breakdowns ends them, not the run: the timed rows are written
    with the breakdowns done so far, ``extra["interrupted"]`` is set and elit-bench exits 130 after writing."""
    from .breakdown import forward_breakdown

    out = []
    picks = [c for c in cases if c.scenario == "uniform" and c.model == "elit" and c.inputs is not None
             and not split_backend(c.backend)[1] and not c.note.startswith("FAILED")]
    for c in picks:
        same = [x.budget for x in picks if (x.preset, x.backend) == (c.preset, c.backend)]
        if c.budget not in (max(same), min(same)):
            continue
        x, t, y = c.inputs
        try:
            b = forward_breakdown(c.models[0], x, t, y, c.budgets)
        except KeyboardInterrupt:
            _say(f"breakdown interrupted at {c.preset} {c.backend} J̃={c.budget}: the timed results are written "
                 f"with the {len(out)} breakdown(s) done")
            extra["interrupted"] = True
            break
        except Exception as e:  # the profiler missing a feature must not lose the timed run
            _say(f"breakdown of {c.preset} {c.backend} J̃={c.budget} failed: {type(e).__name__}: {e}")
            continue
        out.append({"preset": c.preset, "backend": c.backend, "budget": c.budget, **b})
    return out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return _cli.run_interruptible("elit-bench", lambda: _main(parser, args, argv),
                                  "nothing was written (the tables and files come at the end of a run)")


def _main(parser, args, argv=None) -> int:
    if args.replot is not None:
        extra = [f for f in _given_flags(argv) if f not in ("--replot", "--out")]
        if extra:
            parser.error(f"--replot: takes no run flags; got {', '.join(extra)} (--replot DIR times nothing; the "
                         "only flag it takes is --out OUT, where to write the replotted files)")
        try:
            return replot(args.replot, args.out)
        except BenchError as e:
            parser.error(str(e))
        except _cli.OutputWriteError as e:  # a full disk: one line; every file whole or as it was
            _say(f"error: {e}")
            return 1
    try:
        setup, extra = resolve(args)
    except BenchError as e:
        parser.error(str(e))  # exits with status 2 and the usage line
    for w in extra["warnings"]:
        _say(f"warning: {w}")
    rows, targets, md = run(setup, extra, progress=not args.no_progress)
    label = ("CPU" if setup.device.type == "cpu" else "GPU") + f" ({md['device']}), {extra['config']} " \
        f"{extra['resolution']}px batch {extra['batch']} {extra['dtype']}, torch {md['torch']}"
    print(format_table(rows, targets, label))
    if args.breakdown:
        from .breakdown import format_breakdown

        for b in md.get("breakdown") or []:
            print(format_breakdown(b, f"where one forward's time goes: {b['preset']} {b['backend']} J̃={b['budget']}"))
    for r in rows:  # a case that could not run says why on screen, not only in the files
        note = r.get("note") or ""
        if note.startswith("FAILED") or note.startswith("skipped"):
            _say(f"{r['preset']} {r['scenario']} {r['case']} {r['model']} {r['backend']} J̃={r.get('budget')}: {note}")
    if args.out:
        try:
            for p in write_outputs(args.out, rows, targets, md):
                print(f"wrote {p}")
        except _cli.OutputWriteError as e:  # a full disk: one line; every file whole or as it was
            _say(f"error: {e}")
            return 1
    failed = [r for r in rows if (r.get("note") or "").startswith("FAILED")]
    if rows and len(failed) == len(rows):
        _say(f"error: every case failed ({len(rows)} of {len(rows)}; their reasons are above"
             + (f" and in {args.out}" if args.out else "") + "): nothing was timed")
        return 1
    if extra.get("interrupted"):
        _say("interrupted during --breakdown; the timed results above are complete" + (" and written" if args.out
                                                                                     else ""))
        return _cli.SIGINT_STATUS
    _say(f"done in {format_seconds(extra['run_seconds'])}"
         + (f" (estimated {format_seconds(extra['estimate_s'])})" if extra.get("estimate_s") else ""))
    return 0
