"""``elit-demo``: train a tiny ELIT-DiT with tail dropping on CPU and show that its latents are importance-ordered.

The model (``demo_config``: hidden 64, 1 head / 1 core / 1 tail block, 4 groups of 16 tokens, J_max 16)
learns class-conditional rectified flow on scikit-learn's bundled 8x8 digits upsampled to 16x16 (see
``data.py`` for why). Training drops a random tail of latents in every group (J̃ ~ U{J_min..J_max} once
per batch, as the paper; ``--per-sample-budgets`` draws one per sample, a ragged batch). Then:

- ``loss_by_budget.png`` / ``results.json``: held-out loss at every budget J̃ = J_min..J_max, with the
  same held-out (t, noise) for every budget;
- ``samples.png``: class-conditional samples, one row per budget, same noise and class down each column.

``--load`` starts from a checkpoint (``--save``'s; a bf16 / fp16 / fp64 file is cast to float32, the demo's
dtype) and trains ``--steps`` more (default 0). With 0 steps, the training-only flags (--seed, --lr, --batch,
--per-sample-budgets) would be ignored and are refused (exit 2); --latent-init-std is refused with any --load.
The figures' titles, the shaded trained range and results.json's ``train`` describe the evaluated model's
training (the checkpoint's meta, or this run's); ``--j-min`` then sets only the evaluated range (``eval``).

Run ``elit-demo`` (about 4 minutes on 2 CPU cores), ``elit-demo --quick`` (under a minute), or under
``torchrun --nproc_per_node 2 -m elit_kernels.demo`` for DDP on CPU (gloo). ``main`` returns 0.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import subprocess
import sys
import time

import torch

from .. import _cli
from .data import IMAGE_SIZE, NUM_CLASSES, load_digits_split
from .evaluate import grid_budgets, heldout_loss_by_budget, sample_grid, write_grid_png, write_loss_png
from .train import (DistInfo, TrainSettings, demo_config, init_distributed, load_checkpoint, save_checkpoint,
                    shutdown_distributed, spread_latent_init, train)

__all__ = ["main", "run", "build_parser", "demo_config", "load_checkpoint", "save_checkpoint"]

DEFAULTS = {"steps": 2000, "batch": 32, "sample_steps": 32, "eval_reps": 4}
DEFAULT_J_MAX = 16
QUICK = {"steps": 250, "batch": 32, "sample_steps": 12, "eval_reps": 1}
# The flags that only shape training (None in the parser, so that one given explicitly, even at its default,
# can be told apart: with --load and no --steps it would be ignored, and is refused instead) and their defaults.
TRAIN_DEFAULTS = {"seed": 0, "lr": 4e-3, "latent_init_std": 1.0, "per_sample_budgets": False}
TRAIN_ONLY = ("seed", "lr", "batch", "per_sample_budgets", "latent_init_std")
OUTPUT_FILES = ("samples.png", "loss_by_budget.png", "results.json")  # what a run writes into --out
# The training settings a checkpoint's meta records (save_checkpoint below), reported for a loaded model.
META_KEYS = ("latent_init_std", "j_min", "trained_steps", "seed", "batch", "per_sample_budgets", "lr", "world_size")
DIST_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets for init_process_group


def build_parser() -> argparse.ArgumentParser:
    # Defaults are written into each help text (ArgumentDefaultsHelpFormatter would print them a second
    # time, and "default: None" where the real default depends on --quick or --load).
    p = argparse.ArgumentParser(prog="elit-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", type=_cli.user_path, metavar="DIR",
                   help="directory for samples.png, loss_by_budget.png, results.json and, with a bare --save, "
                        "checkpoint.pt (default demo_out)")
    p.add_argument("--quick", action="store_true",
                   help="a run of under a minute on 2 cores: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
                        + " unless given explicitly")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps, >= 0 (default {DEFAULTS['steps']}; {QUICK['steps']} with --quick; 0 with --load)")
    p.add_argument("--batch", type=int, default=None,
                   help=f"global batch, split over DDP ranks (default {DEFAULTS['batch']}; {QUICK['batch']} with --quick)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the model init, data order, budgets, t and noise of training, in [0, 2**32 - 1] "
                        "(default 0)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak AdamW learning rate, > 0 (warm-up, then cosine to 10%%; default 4e-3)")
    p.add_argument("--latent-init-std", type=float, default=None,
                   help="std of the initial shared latent embeddings of a new model, >= 0 (0: keep the model's init; "
                        "see train.spread_latent_init; default 1; refused with --load, which keeps the checkpoint's)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per process (default 1: this model's ops are too small to gain from more, "
                        "and spinning OpenMP threads collapse on shared cores)")
    p.add_argument("--j-min", type=int, default=None,
                   help="smallest trained and evaluated budget J_min, in 1..J_max (default 1, or the checkpoint's with "
                        "--load; with --load and no --steps it sets only the evaluated range)")
    p.add_argument("--j-max", type=int, default=None,
                   help=f"latents per group J_max, >= 1 (default {DEFAULT_J_MAX}; fixed by the checkpoint with --load)")
    p.add_argument("--per-sample-budgets", action="store_true", default=None,
                   help="draw J̃ per sample (a ragged batch) instead of once per batch (the paper)")
    p.add_argument("--backend", default=None,
                   help="varlen_attention backend name (default: the dispatcher's choice; on CPU with TRITON_INTERPRET=1 "
                        "that is the interpreted, very slow triton backend, so pass --backend torch there)")
    p.add_argument("--sample-steps", type=int, default=None,
                   help=f"Euler steps for the sample grid (default {DEFAULTS['sample_steps']}; "
                        f"{QUICK['sample_steps']} with --quick)")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance scale for the sample grid, >= 0 (default 0: none)")
    p.add_argument("--eval-reps", type=int, default=None,
                   help=f"(t, noise) draws per held-out image (default {DEFAULTS['eval_reps']}; "
                        f"{QUICK['eval_reps']} with --quick)")
    p.add_argument("--save", nargs="?", const="", default=None, type=_cli.user_path, metavar="PATH",
                   help="save a checkpoint (config + state_dict); PATH defaults to OUT/checkpoint.pt; an existing "
                        "file there is refused unless --force")
    p.add_argument("--force", action="store_true", help="let --save replace an existing file")
    p.add_argument("--load", default=None, type=_cli.user_path, metavar="PATH",
                   help="start from this checkpoint (an elit-demo --save file, any float dtype: cast to float32; then "
                        "train --steps more, default 0; with 0 steps the training-only flags --seed, --lr, --batch, "
                        "--per-sample-budgets are refused, and the figures and results.json report the checkpoint's "
                        "own training)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def _resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Check every flag that needs no model or data, fill in defaults; a usage error (exit 2) names the flag."""
    base = QUICK if args.quick else DEFAULTS
    given = [k for k in TRAIN_ONLY if getattr(args, k) is not None]  # before the defaults fill them in
    for k in ("batch", "sample_steps", "eval_reps"):
        if getattr(args, k) is None:
            setattr(args, k, base[k])
    for k, v in TRAIN_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps is None:
        args.steps = 0 if args.load else base["steps"]
    if args.load is not None:
        if "latent_init_std" in given:
            parser.error("--latent-init-std: initialises the latent embeddings of a new model; --load keeps the "
                         "checkpoint's (omit --latent-init-std with --load)")
        if args.steps == 0 and (train_flags := [k for k in given if k != "latent_init_std"]):
            flag = "--" + train_flags[0].replace("_", "-")
            parser.error(f"{flag}: a training setting, but --load with --steps 0 trains nothing (the figures and "
                         f"results.json report the checkpoint's own training); omit {flag}, or pass --steps N to "
                         "train N more steps with it")
    for k in ("steps", "batch", "sample_steps", "eval_reps", "threads"):
        v = getattr(args, k)
        if v < (0 if k == "steps" else 1):
            parser.error(f"--{k.replace('_', '-')}: expected a {'non-negative' if k == 'steps' else 'positive'} int, got {v}")
    from .._cli import seed_error

    if (msg := seed_error("--seed", args.seed)) is not None:
        parser.error(msg)
    if args.j_max is not None and args.j_max < 1:
        parser.error(f"--j-max: expected J_max >= 1 latents per group (default {DEFAULT_J_MAX}), got {args.j_max}")
    if args.j_min is not None:
        hi = args.j_max if args.j_max is not None else None if args.load else DEFAULT_J_MAX
        if args.j_min < 1 or (hi is not None and args.j_min > hi):
            parser.error(f"--j-min: expected 1 <= J_min <= J_max{f' = {hi}' if hi else ''}, got {args.j_min}")
    for flag, value, above, what in (("--lr", args.lr, True, "learning rate"),
                                     ("--latent-init-std", args.latent_init_std, False, "std"),
                                     ("--guidance", args.guidance, False, "CFG scale")):
        if why := _cli.finite_error(value, above=above, what=what):
            parser.error(f"{flag}: {why}")
    if args.backend is not None:
        from ..attention import known_backends

        if args.backend not in known_backends():
            parser.error(f"--backend: unknown backend {args.backend!r}; choose from {', '.join(known_backends())}")
    elif why := _cli.env_backend_error(None, ""):  # default dispatch would read it on every attention call
        parser.error(why)
    if args.load is not None and not os.path.isfile(args.load):
        parser.error(f"--load: no such file: {args.load}" if not os.path.exists(args.load)
                     else f"--load: {args.load} is not a file (expected an elit-demo --save checkpoint)")
    # Both written after training: checked (and --out created) now, so a run never ends in a write error.
    from .._cli import output_dir_error, output_file_error

    if why := output_dir_error(args.out, OUTPUT_FILES):
        parser.error(f"--out: {why}")
    if args.save == "":
        args.save = os.path.join(args.out, "checkpoint.pt")
    if args.save is not None and (why := output_file_error(args.save)):
        parser.error(f"--save: {why}")
    if args.save is not None:
        for name in OUTPUT_FILES:  # the figures and results.json are written after the checkpoint: it would be lost
            own = os.path.join(args.out, name)
            if os.path.realpath(args.save) == os.path.realpath(own):
                parser.error(f"--save: {args.save} would be replaced by {own}, an output of this run (--out "
                             f"{args.out} gets {', '.join(OUTPUT_FILES)}) written after the checkpoint; save it "
                             f"elsewhere (a bare --save writes {os.path.join(args.out, 'checkpoint.pt')})")
    if args.save is not None and os.path.lexists(args.save) and not args.force:
        same = args.load is not None and os.path.realpath(args.save) == os.path.realpath(args.load)
        parser.error(f"--save: {args.save} exists{' (it is the --load checkpoint)' if same else ''}; pass --force "
                     "to overwrite it, or save elsewhere")
    if why := _dist_env_error():
        parser.error(why)
    return args


def _dist_env_error() -> str | None:
    """Why the environment is not a torchrun launch that ``init_distributed`` can join (None when it is one, or
    names none of RANK / WORLD_SIZE: one process): RANK or WORLD_SIZE set without the rest of ``DIST_VARS``, or a
    LOCAL_RANK that is not an int >= 0."""
    from .._cli import local_rank_error

    if why := local_rank_error():
        return why
    set_ = [k for k in ("RANK", "WORLD_SIZE") if k in os.environ]
    missing = [k for k in DIST_VARS if not os.environ.get(k)]
    if not set_ or not missing:
        return None
    return (f"environment: {' and '.join(set_)} set without {', '.join(missing)}; a distributed run needs "
            f"{', '.join(DIST_VARS)} (torchrun sets them all): launch under torchrun --nproc_per_node N -m "
            f"elit_kernels.demo, or unset {' and '.join(set_)} to run one process")


def _check_backend(args, parser, cfg) -> None:
    """``--backend`` must run this model's attention here (CPU, fp32, its heads and head dim); say so when the
    backend that will run is Triton's CPU interpreter (correct, but slow enough to make the demo take hours)."""
    from .. import _cli

    probe = _cli.model_probe(cfg, "cpu", torch.float32)
    if args.backend is not None:
        err = _cli.backend_error("--backend", args.backend, probe, "the demo model (CPU, fp32)")
        if err:
            parser.error(err)
    elif err := _cli.env_backend_error(probe, "the demo model (CPU, fp32)"):
        parser.error(err)
    chosen = args.backend or _cli.env_backend() or next(iter(_cli.usable_backends(probe)), None)
    if chosen in ("triton", "triton_window") and _cli.triton_interpreted():
        print(f"elit-demo: warning: the {chosen} backend runs under the Triton interpreter (TRITON_INTERPRET=1): "
              "correct but very slow; pass --backend torch for a run of minutes", file=sys.stderr)


def _checkpoint_meta(path: str, meta, j_max: int, parser) -> dict:
    """The training settings a loaded checkpoint's meta records (``META_KEYS``), checked: a damaged or hand-edited
    entry is a usage error naming the file and the entry (never a flag the user did not pass). A missing entry (a
    model not trained by elit-demo) is left out: nothing is claimed about it."""
    from .._types import is_bool, is_int, is_real

    if not isinstance(meta, dict):
        parser.error(f"--load: {path}: its meta is {type(meta).__name__}, expected a dict of training settings")

    def check(key, ok, expected):
        v = meta.get(key)
        if v is not None and not ok(v):
            parser.error(f"--load: {path}: its meta {key} is {v!r}, expected {expected} (a damaged or hand-edited "
                         "checkpoint)")
    check("j_min", lambda v: is_int(v) and 1 <= v <= j_max, f"an int in 1..{j_max} (the model's J_max)")
    check("trained_steps", lambda v: is_int(v) and v >= 0, "an int >= 0")
    check("seed", lambda v: is_int(v) and _cli.seed_error("seed", v) is None, f"an int in [0, {_cli.MAX_SEED}]")
    check("batch", lambda v: is_int(v) and v >= 1, "an int >= 1")
    check("world_size", lambda v: is_int(v) and v >= 1, "an int >= 1")
    check("lr", lambda v: is_real(v) and _cli.finite_error(float(v)) is None, "a finite number > 0")
    check("latent_init_std", lambda v: is_real(v) and _cli.finite_error(float(v), above=False) is None,
          "a finite number >= 0")
    check("per_sample_budgets", is_bool, "true or false")
    out = dict(meta)
    for k in META_KEYS:
        if out.get(k) is not None:
            out[k] = (bool if k == "per_sample_budgets" else float if k in ("lr", "latent_init_std") else int)(out[k])
    return out


def _title(meta: dict, steps: int, prior: int | None, j_min: int, j_max: int) -> str:
    """The figures' title: the training of the evaluated model (``meta``: this run's, or the loaded checkpoint's;
    what it does not record is left out), its steps (``prior`` of them loaded, when this run trained more), and the
    evaluated budgets when they are not the trained ones."""
    title = f"ELIT-DiT tiny, digits 16x16, {steps} steps" + (f" ({prior} loaded + {steps - prior})" if prior else "")
    how = {True: "per-sample", False: "per-batch"}.get(meta.get("per_sample_budgets"))
    trained = meta.get("j_min")
    if how or trained:
        title += ", " + " ".join(filter(None, (how, f"J̃ ~ U{{{trained}..{j_max}}}" if trained else None)))
    if trained != j_min:
        title += f"\nevaluated J̃ = {j_min}..{j_max}"
    return title


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run(argv=None) -> dict | None:
    """Everything ``main`` does; returns the results dict on rank 0 (None on other ranks)."""
    parser = build_parser()
    try:
        return _run_checked(parser, parser.parse_args(argv))
    except SystemExit:  # a usage error after --out was created (--save, --load, --backend): no empty --out left
        _cli.remove_empty_created()
        raise


def _run_checked(parser, args) -> dict | None:
    args = _resolve(args, parser)
    threads = torch.get_num_threads()
    try:
        info = init_distributed()
    except (ValueError, RuntimeError) as e:  # a malformed RANK, an unreachable MASTER_ADDR: before any work
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        parser.error(f"environment: cannot join the torch.distributed process group of {', '.join(DIST_VARS)} "
                     f"({msg}); launch under torchrun, or unset RANK and WORLD_SIZE to run one process")
    torch.set_num_threads(args.threads)
    try:
        return _run(args, parser, info)
    finally:
        shutdown_distributed(info)
        torch.set_num_threads(threads)  # main() may run inside another program (the tests)


def _run(args, parser, info: DistInfo) -> dict | None:
    t_start = time.perf_counter()
    data = load_digits_split()
    meta_in, loaded_dtype = {}, None
    if args.load:
        try:
            model, meta_in = load_checkpoint(args.load, backend=args.backend)
        except (ValueError, TypeError, RuntimeError, OSError, pickle.UnpicklingError, EOFError) as e:
            # CheckpointError (not ours, refused pickle) is a ValueError; torch.load raises the others
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            parser.error(f"--load: cannot load {args.load} as an elit-demo checkpoint: {msg}")
        c = model.cfg
        if (c.in_channels, c.input_size) != (1, IMAGE_SIZE) or c.num_classes < NUM_CLASSES:
            # checked before any training or --save: the demo's data and evaluation need these
            parser.error(f"--load: {args.load} holds a model of {c.in_channels}x{c.input_size}x{c.input_size} inputs "
                         f"and {c.num_classes} classes; elit-demo trains and evaluates on 1x{IMAGE_SIZE}x{IMAGE_SIZE} "
                         f"digits of {NUM_CLASSES} classes (load a checkpoint elit-demo --save wrote)")
        if args.j_max is not None and args.j_max != model.cfg.latents_per_group:
            parser.error(f"--j-max: {args.j_max} conflicts with the checkpoint's J_max {model.cfg.latents_per_group} "
                         "(omit --j-max with --load)")
        meta_in = _checkpoint_meta(args.load, meta_in, model.cfg.latents_per_group, parser)
        loaded_dtype = next(model.parameters()).dtype
        if loaded_dtype != torch.float32:  # the demo's data, backend probe and sampling are float32
            model = model.to(torch.float32)
            print(f"elit-demo: note: {args.load} holds {str(loaded_dtype).removeprefix('torch.')} weights; cast to "
                  "float32, the demo's dtype (a --save writes float32)", file=sys.stderr)
    else:
        from ..models import ElitDiT

        torch.manual_seed(args.seed)  # model init; DDP broadcasts rank 0's weights anyway
        model = ElitDiT(demo_config(args.j_max if args.j_max is not None else DEFAULT_J_MAX), backend=args.backend)
        spread_latent_init(model, args.latent_init_std, args.seed)
    cfg = model.cfg
    _check_backend(args, parser, cfg)
    j_max = cfg.latents_per_group
    # j_min: the evaluated range; train_j_min: the range the evaluated model was trained on (this run's when it
    # trains, else the checkpoint's, None when its meta does not say)
    j_min = args.j_min if args.j_min is not None else meta_in.get("j_min") or 1
    if not 1 <= j_min <= j_max:
        parser.error(f"--j-min: expected 1 <= J_min <= J_max = {j_max}, got {j_min}")
    train_j_min = j_min if args.steps > 0 else meta_in.get("j_min") if args.load else j_min

    settings = TrainSettings(steps=args.steps, batch=args.batch, lr=args.lr, j_min=j_min,
                             per_sample_budgets=args.per_sample_budgets, seed=args.seed,
                             progress=not args.no_progress)
    try:
        train_stats = train(model, data, settings, info) if args.steps > 0 else {"seconds": 0.0}
    except ValueError as e:  # train's own argument checks, raised before the first step, name the setting
        name = str(e).partition(":")[0]
        if name not in ("batch", "j_min"):
            raise
        parser.error(f"--{name.replace('_', '-')}: {str(e).partition(':')[2].strip()}")
    if info.enabled:
        torch.distributed.barrier()
    if not info.is_main:
        return None

    prior_steps = meta_in.get("trained_steps") or 0
    trained_steps = prior_steps + args.steps
    if args.load and args.steps == 0:  # nothing trained here: describe the checkpoint's own training, as its meta does
        meta = {k: meta_in[k] for k in META_KEYS if meta_in.get(k) is not None}
    else:  # this run's training (continuing a checkpoint: on top of its weights, whose init it keeps)
        meta = {"latent_init_std": meta_in.get("latent_init_std") if args.load else args.latent_init_std,
                "j_min": j_min, "seed": args.seed, "batch": args.batch, "per_sample_budgets": args.per_sample_budgets,
                "lr": args.lr, "world_size": info.world_size}
        meta = {k: v for k, v in meta.items() if v is not None}
    meta["trained_steps"] = trained_steps
    if args.save:
        try:
            save_checkpoint(args.save, model, meta)  # whole or not at all (save_model)
        except OSError as e:
            raise _cli.OutputWriteError(args.save, e) from None

    t_eval = time.perf_counter()
    budgets = list(range(j_min, j_max + 1))
    loss_by_budget = heldout_loss_by_budget(model, data.test_x, data.test_y, budgets, reps=args.eval_reps)
    rows = grid_budgets(j_min, j_max)
    classes = list(range(10))
    samples = sample_grid(model, rows, classes, steps=args.sample_steps, guidance=args.guidance)
    eval_seconds = time.perf_counter() - t_eval

    os.makedirs(args.out, exist_ok=True)
    files = {"samples": os.path.join(args.out, "samples.png"), "loss_plot": os.path.join(args.out, "loss_by_budget.png"),
             "results": os.path.join(args.out, "results.json")}
    first = torch.stack([data.test_x[(data.test_y == c).nonzero()[0, 0]] for c in classes])
    title = _title(meta, trained_steps, prior_steps if args.load and args.steps else None, j_min, j_max)
    write_grid_png(files["samples"], samples, rows, cfg.groups, classes, data_row=first, title=title)
    write_loss_png(files["loss_plot"], loss_by_budget, train_j_min, cfg.groups, title=title)

    from ..models import config_dict

    results = {
        "loss_by_budget": {str(b): v for b, v in loss_by_budget.items()},
        "importance_ordered": {"j_min": j_min, "j_max": j_max, "loss_at_j_min": loss_by_budget[j_min],
                               "loss_at_j_max": loss_by_budget[j_max],
                               "holds": loss_by_budget[j_max] < loss_by_budget[j_min]},
        "config": config_dict(cfg),
        "train": {**dict.fromkeys(META_KEYS), **meta, "steps_this_run": args.steps, "loaded_from": args.load,
                  "loaded_dtype": loaded_dtype and str(loaded_dtype).removeprefix("torch."),
                  **({"loaded_meta": meta_in} if args.load else {}), "saved_to": args.save,
                  "backend": args.backend, "quick": args.quick, **train_stats},
        "eval": {"j_min": j_min, "j_max": j_max, "heldout_images": int(data.test_x.shape[0]), "reps": args.eval_reps,
                 "seed": 1234,
                 "t": "logit-normal(0, 1), one fixed draw per image and rep, shared by every budget"},
        "samples": {"rows_budgets": rows, "columns_classes": classes, "euler_steps": args.sample_steps,
                    "guidance": args.guidance, "seed": 4321},
        "data": "sklearn load_digits (bundled), 8x8 -> 16x16 bilinear, scaled to [-1, 1], 15% held out (split seed 0)",
        "files": files,
        "seconds": {"train": train_stats["seconds"], "eval_and_sampling": eval_seconds,
                    "total": time.perf_counter() - t_start},
        "env": {"torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
                "threads": torch.get_num_threads(), "commit": _git_commit(),
                "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
    _cli.write_output(files["results"], write)
    print(f"held-out loss by budget J̃ (latents per group; J_max={j_max}):", file=sys.stderr)
    for b, v in loss_by_budget.items():
        print(f"  J̃={b:3d}  K={cfg.groups * b:3d}  loss {v:.4f}", file=sys.stderr)
    print(f"wrote {', '.join(files.values())}" + (f", {args.save}" if args.save else ""), file=sys.stderr)
    return results


def main(argv=None) -> int:
    def body() -> int:
        try:
            run(argv)
        except _cli.OutputWriteError as e:  # a full disk, a folder gone: one line, each file whole or absent
            print(f"elit-demo: error: {e}", file=sys.stderr)
            return 1
        return 0
    return _cli.run_interruptible("elit-demo", body,
                                  "the checkpoint (--save) is written after training and the figures and "
                                  "results.json at the end; rerun to get them")
