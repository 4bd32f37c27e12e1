"""``elit-bench``: ELIT-DiT model latency vs latent budget, with FLOPs, memory and baselines.

Defaults: on a GPU, XL/2 at 512px in bf16; on CPU, S/2 at 256px in fp32 with a small batch (a few
minutes on 2 cores). Examples::

    elit-bench                                   # the default for this machine
    python -m elit_kernels.bench --device cpu --config tiny --resolution 64 --repeats 3 --out bench_out
    elit-bench --scenarios uniform,mixed --budgets 4,8,16,32,64 --backends triton,torch --out gpu_results
"""
from __future__ import annotations

import argparse
import time

import torch

from .. import attention as _attention
from ..backends import describe_backends, get_backend, known_backends
from ..models.config import _SIZES, PRESETS, config_dict, preset_config
from .flops import count_flops
from .report import check_targets, format_table, make_rows, metadata, write_outputs
from .scenarios import SCENARIOS, Setup, build_cases
from .timing import measure_memory, run_interleaved, warm_up

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DEFAULTS = {  # device type -> (config, resolution, batch, dtype, repeats)
    "cuda": ("XL/2", 512, 8, "bf16", 5),
    "cpu": ("S/2", 256, 4, "fp32", 5),
}


class BenchError(ValueError):
    """A bad flag: the message names the flag."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elit-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    p.add_argument("--config", default=None, help=f"model size: {', '.join(_SIZES)} (default: XL/2 on GPU, S/2 on CPU)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (8x VAE; default 512 GPU / 256 CPU)")
    p.add_argument("--batch", type=int, default=None, help="samples per forward (default 8 GPU / 4 CPU)")
    p.add_argument("--backends", default=None,
                   help="comma list of varlen_attention backends for ELIT and the plain DiT "
                        "(default on GPU: every available backend that supports the inputs, except 'reference'; on CPU: torch)")
    p.add_argument("--budgets", default=None,
                   help="comma list of per-group budgets J̃ (default: J_max/16, J_max/8, …, J_max; J_max is always added)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    p.add_argument("--presets", default=",".join(PRESETS),
                   help="comma list of model presets to run at the chosen size: paper (elit_config) and/or released "
                        "(the ELIT-SiT code and checkpoints, elit_sit_config; encoder_depth 8) (default: both)")
    p.add_argument("--repeats", type=int, default=None, help="timing samples per case, interleaved (default 5)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default bf16 GPU / fp32 CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default 1 on CPU: on a shared 2-core machine, 2 OpenMP threads make "
                        "every op wait for a descheduled thread whenever another process runs; untouched on GPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up calls per case before timing (default 2 GPU / 1 CPU; the FLOP count is one more call)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time budget: stop repeating once it is spent (at least one full repeat; results still written)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write DIR/results.json, results.csv and latency_vs_latents.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


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


def _probe_inputs(cfg, device, dtype):
    """Small inputs of the model's head dim / dtype / device, to ask backends whether they can run."""
    d = cfg.hidden // cfg.heads
    q = torch.zeros(4, cfg.heads, d, device=device, dtype=dtype)
    cu = torch.tensor([0, 2, 4], dtype=torch.int32, device=device)
    return _attention.validate_inputs(q, q, q, cu, cu, 2, 2, None, False)


def resolve(args) -> tuple[Setup, dict]:
    """Check every flag and fill in defaults; raises BenchError naming the flag."""
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise BenchError(f"--device: {args.device!r} is not a device (expected cpu or cuda[:N])") from None
        if device.type not in ("cpu", "cuda"):
            raise BenchError(f"--device: only cpu and cuda are supported, got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device: cuda requested but torch.cuda.is_available() is False on this machine")
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
            raise BenchError(f"--presets: {pr} and {presets[0]} differ in groups / J_max / head dim at {name} {res}px; "
                             "run them separately")
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
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    if threads is not None and threads < 1:
        raise BenchError(f"--threads: expected a positive integer, got {threads}")
    if args.max_seconds is not None and args.max_seconds <= 0:
        raise BenchError(f"--max-seconds: expected a positive number, got {args.max_seconds}")
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 1)
    if warmup < 0:
        raise BenchError(f"--warmup: expected >= 0, got {warmup}")
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
            raise BenchError(f"--budgets: each budget must be in [1, {jm}] (J_max of {name} at {res}px), got {bad[0]}")
    budgets = sorted(set(budgets) | {jm})
    scen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in scen if s not in SCENARIOS]
    if bad or not scen:
        raise BenchError(f"--scenarios: unknown scenario {bad[0] if bad else args.scenarios!r}; choose from {', '.join(SCENARIOS)}")
    notes = []
    if "mixed" in scen and batch < 2:
        if args.scenarios != ",".join(SCENARIOS):
            raise BenchError("--scenarios: 'mixed' needs --batch >= 2 (samples with different budgets)")
        scen.remove("mixed")
        notes.append("mixed skipped: batch 1")
    probe = _probe_inputs(cfg, device, dtype)
    if args.backends is None:
        backends = [r["name"] for r in describe_backends(probe) if r["name"] != "reference" and not r["reasons"]]
        if device.type == "cpu":
            # CPU default: the fair baseline only, so the run fits ~3 minutes of 2 shared cores. Other CPU
            # backends (cpp) on request; the Triton interpreter is a correctness tool, never a benchmark.
            backends = [b for b in backends if b == "torch"] or [b for b in backends if b != "triton"]
        if not backends:
            backends = ["reference"]
    else:
        backends = [s.strip() for s in args.backends.split(",") if s.strip()]
        if not backends:
            raise BenchError("--backends: expected a comma-separated list of backend names")
        for b in backends:
            if b not in known_backends():
                raise BenchError(f"--backends: unknown backend {b!r}; known: {', '.join(known_backends())}")
            be = get_backend(b)
            reasons = ["not available in this environment"] if not be.is_available() else be.not_supported_reasons(probe)
            if reasons:
                raise BenchError(f"--backends: backend {b!r} cannot run {dname} on {device.type} "
                                 f"(head dim {cfg.hidden // cfg.heads}): " + "; ".join(reasons))
        backends = list(dict.fromkeys(backends))
    setup = Setup(cfgs=cfgs, device=device, dtype=dtype, batch=batch, budgets=budgets, backends=backends,
                  scenarios=scen, seed=args.seed)
    extra = {"config": name, "presets": presets, "preset_configs": {pr: config_dict(c) for pr, c in cfgs.items()},
             "resolution": res, "batch": batch, "dtype": dname, "budgets": budgets,
             "backends": backends,
             "threads": threads, "max_seconds": args.max_seconds, "scenarios": scen, "repeats": repeats, "warmup": warmup,
             "j_max": jm, "groups": cfg.groups, "tokens_per_group": cfg.tokens_per_group, "notes": notes}
    return setup, extra


def run(setup: Setup, extra: dict, *, progress: bool = True) -> tuple[list[dict], list[dict], dict]:
    """Build, warm up, count FLOPs, measure memory, time interleaved. Returns (rows, targets, metadata)."""
    dev = setup.device
    t_start = time.monotonic()
    was = _attention.value_checks_enabled()
    # The eager cu_seqlens value checks copy device->host on every attention call; a benchmark
    # measures the kernels, not the validation (the layout is built by our own code).
    _attention.set_value_checks(False)
    threads_was = torch.get_num_threads()
    if extra.get("threads"):
        torch.set_num_threads(extra["threads"])
    try:
        cases, meta = build_cases(setup)
        it = cases
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(cases, desc="warm-up + FLOPs", unit="case", leave=False)
        deadline = t_start + extra["max_seconds"] if extra.get("max_seconds") else None
        skipped, failed = [], []
        with torch.no_grad():
            for c in it:
                if deadline is not None and time.monotonic() > t_start + 0.7 * extra["max_seconds"]:
                    skipped.append(c)  # keep time for the repeats; the row says so
                    continue
                try:
                    warm_up(c, dev, extra["warmup"], 20.0)
                    c.flops = count_flops(c.fn, c.models)
                    c.peak_mem_mb = measure_memory(c, dev)
                except Exception as e:  # one backend failing one case must not lose the whole run
                    c.note = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    failed.append(c)
        for c in skipped:
            c.note = "skipped: --max-seconds spent during warm-up"
        timed = [c for c in cases if c not in skipped and c not in failed]
        extra["repeats_done"] = run_interleaved(timed, dev, extra["repeats"], progress=progress, deadline=deadline)
        extra["notes"] = extra["notes"] + [f"{len(skipped)} cases skipped (time budget)"] * bool(skipped) \
            + [f"{len(failed)} cases failed (see their note)"] * bool(failed)
        rows = make_rows(cases, dev)
        md_threads = torch.get_num_threads()
    finally:
        _attention.set_value_checks(was)
        torch.set_num_threads(threads_was)
    targets = check_targets(rows)
    md = metadata(dev, {**extra, **meta, "memory": "torch.cuda.max_memory_allocated during one call (MiB, incl. weights)"
                        if dev.type == "cuda" else "not measured on CPU (null)",
                        "timer": "triton.testing.do_bench median per repeat" if dev.type == "cuda"
                        else "time.perf_counter (wall, latency_ms) and time.process_time (cpu_ms) after warm-up, "
                             "one sample per repeat",
                        "flops": "torch.utils.flop_counter.FlopCounterMode (non-attention) + analytic attention "
                                 "4*sum(Lq*Lk)*H*D from the layout (FlopCounterMode cannot see varlen ops)",
                        "value_checks": "off while timing", "cpu_threads": md_threads})
    return rows, targets, md


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup, extra = resolve(args)
    except BenchError as e:
        parser.error(str(e))  # exits with status 2 and the usage line
    rows, targets, md = run(setup, extra, progress=not args.no_progress)
    label = ("CPU" if setup.device.type == "cpu" else "GPU") + f" ({md['device']}), {extra['config']} " \
        f"{extra['resolution']}px batch {extra['batch']} {extra['dtype']}, torch {md['torch']}"
    print(format_table(rows, targets, label))
    if args.out:
        for p in write_outputs(args.out, rows, targets, md):
            print(f"wrote {p}")
    return 0
