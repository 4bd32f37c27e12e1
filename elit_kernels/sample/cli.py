"""The ``elit-sample`` command line: flags -> ``generate``; exit status 2 naming the flag for a usage error."""
from __future__ import annotations

import argparse
import os
import re
import sys
import warnings

from .. import _cli
from .rules import SamplingError, UsageError
from .run import DTYPES, GUIDANCE, SAMPLERS, generate


def _arch_item(text):
    from ..official.cli import _arch_item as parse

    return parse(text)


def _read_classes(text: str | None, path: str | None):
    if text is not None and path is not None:
        raise UsageError("class_file", "give --classes or --class-file, not both")
    if path is not None:
        try:
            with open(path, encoding="utf-8-sig") as f:  # a UTF-8 byte-order mark is not part of the first id
                raw = " ".join(line.split("#", 1)[0] for line in f)
        except OSError as e:
            raise UsageError("class_file", f"cannot read {path} ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise UsageError("class_file", f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); expected class "
                                           "ids separated by spaces, commas or new lines") from None
        items = raw.replace(",", " ").split()
        arg = "class_file"
    elif text is None or text.strip().lower() == "all":
        return None
    else:
        items, arg = [s.strip() for s in text.split(",") if s.strip()], "classes"
    out = []
    for s in items:
        # ASCII digits only: int() also takes "0_1" (as 1) and other scripts' digits, which a typo should not be
        if not re.fullmatch(r"[+-]?[0-9]+", s):
            raise UsageError(arg, f"unknown class {s!r}: expected integer class ids (digits 0-9)")
        out.append(int(s))
    if not out:
        raise UsageError(arg, "no class ids found")
    return out


def _interval(text: str):
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (e.g. 0,1), got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from . import __doc__ as doc

    p = argparse.ArgumentParser(prog="elit-sample", description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=_cli.user_path, help="official train.py checkpoint, bare official state_dict (with --arch), or a "
                                      "file written by elit-convert")
    p.add_argument("--out", required=True, type=_cli.user_path, help="output folder (created; an earlier run's samples there are kept)")
    p.add_argument("--vae", type=_cli.user_path, help="local folder of the diffusers AutoencoderKL to decode with (sd-vae-ft-ema / -mse)")
    p.add_argument("--latents-only", action="store_true", help="save latents (.npy, latents.npz), no decoder")
    p.add_argument("--num-samples", type=int, default=50_000, help="samples N (default 50000)")
    p.add_argument("--classes", help="'all' (default: every class, balanced) or a comma list of class ids")
    p.add_argument("--class-file", type=_cli.user_path, help="a file of class ids (whitespace or commas; # comments)")
    p.add_argument("--sampler", choices=SAMPLERS, default="euler", help="ODE sampler (default euler)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--guidance", choices=GUIDANCE, default="none", help="guidance mode (default none)")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="the official cfg_scale (λ = cfg_scale − 1; default 1)")
    p.add_argument("--guidance-interval", type=_interval, default=(0.0, 1.0), metavar="LOW,HIGH",
                   help="times where guidance is on (default 0,1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", type=float,
                   help="official float budget: a fraction in (0, 1] or a count of latents > 1")
    g.add_argument("--latents", type=int, help="latents per group J (default: all, J_max)")
    g.add_argument("--budget-mix",
                   help="per-sample mix J:WEIGHT,... of latents per group, e.g. 64:0.5,16:0.25,4:0.25")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weak-budget", type=float,
                   help="official float budget of the weak pass (autoguidance, ccfg, ccfg_two_pass)")
    w.add_argument("--weak-latents", type=int, help="latents per group of the weak pass (default J_max // 16, min 1)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per forward on each device (default 32)")
    p.add_argument("--seed", type=int, default=0, help="global seed (default 0)")
    p.add_argument("--dtype", default="float32", choices=sorted(set(DTYPES)), help="model dtype (default float32)")
    p.add_argument("--backend", help="attention backend (default: dispatch)")
    p.add_argument("--device", help="cpu or cuda[:N] (default cuda:LOCAL_RANK when available)")
    p.add_argument("--graphed", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the forward from CUDA graphs (default: on with CUDA)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA")
    p.add_argument("--grid", type=int, default=64, help="images in grid.png (default 64; 0 = none)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="which weights of a train.py file")
    p.add_argument("--arch", action="append", type=_arch_item, default=[], metavar="KEY=VALUE",
                   help="official constructor keyword for a name outside the registry (as elit-convert)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    def kept() -> str:
        from .files import samples_on_disk

        # latents/NNNNNN.npy without a VAE, samples/NNNNNN.png with one (run.py); config.json alone is no sample
        if any(samples_on_disk(os.path.join(args.out, sub), ext) for sub, ext in (("latents", "npy"),
                                                                                 ("samples", "png"))):
            return f"the samples written so far are kept in {args.out}: rerun the same command to resume"
        return "no sample was written yet: rerun the same command to start"

    return _cli.run_interruptible("elit-sample", lambda: _main(parser, args), kept)


def _one_line(default):
    """``warnings.showwarning`` for a command line: a warning of this package as one line ``elit-sample: warning:
    ...`` (as elit-bench prints its own), not a file name, line number and source line; others as before."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and os.path.abspath(str(filename)).startswith(here + os.sep):
            print(f"elit-sample: warning: {message}", file=sys.stderr if file is None else file)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def _main(parser, args) -> int:
    from ..official.cli import merge_arch

    arch, why = merge_arch(args.arch)
    if why:
        parser.error(f"--arch: {why}")
    try:
        classes = _read_classes(args.classes, args.class_file)
        with warnings.catch_warnings():  # restores showwarning after the run
            warnings.showwarning = _one_line(warnings.showwarning)
            generate(args.checkpoint, args.out, num_samples=args.num_samples, classes=classes, sampler=args.sampler,
                     steps=args.steps, guidance=args.guidance, cfg_scale=args.cfg_scale,
                     guidance_interval=args.guidance_interval, budget=args.budget, latents=args.latents,
                     budget_mix=args.budget_mix, weak_budget=args.weak_budget, weak_latents=args.weak_latents,
                     batch_size=args.batch_size, seed=args.seed, dtype=args.dtype, backend=args.backend,
                     device=args.device, vae=args.vae, latents_only=args.latents_only, graphed=args.graphed,
                     grid=args.grid, weights=args.weights, arch=arch or None, tf32=args.tf32,
                     progress=not args.no_progress)
    except UsageError as e:
        # an environment variable (ELIT_BACKEND, WORLD_SIZE) is named as it is, an argument by its flag
        flag = e.arg if e.arg == "checkpoint" or e.arg.isupper() else "--" + e.arg.replace("_", "-")
        parser.error(f"{flag}: {e.message}")
    except SamplingError as e:
        print(f"elit-sample: error: {e}", file=sys.stderr)
        return 1
    return 0
