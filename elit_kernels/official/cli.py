"""``elit-convert``: a released ELIT-SiT checkpoint -> our own model file (config + state_dict).

Examples::

    elit-convert elit_sit_imagenet_256px_1k_0400000.pt --out elit_sit_xl2_256.safetensors
    elit-convert tiny.pt --out tiny.pt.elit --arch num_heads=2 --arch dit_decoder_depth=1 --weights model

The output is safetensors when ``--out`` ends in ``.safetensors`` (nothing pickled), else a torch file;
``elit_kernels.official.load_checkpoint`` and ``elit_kernels.models.load_model`` read both. Exit status 2
for a usage error or a file that cannot be converted (the message says why), 0 on success.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys

from .. import __version__
from .. import _cli
from .._cli import output_file_error
from ..models.checkpoint import save_model
from ..models.config import config_dict
from .loader import ARCH_KEYS, WEIGHTS, CheckpointError, load_checkpoint


def _arch_item(text: str):
    """``key=value`` (value a Python/JSON literal: 2, 1.5, true, 'x') or a JSON object of several."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON object ({e})") from None
    key, sep, val = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE or a JSON object, got {text!r}")
    val = val.strip()
    low = {"true": "True", "false": "False", "null": "None"}.get(val.lower(), val)
    try:
        parsed = ast.literal_eval(low)
    except (ValueError, SyntaxError):
        parsed = val
    return {key.strip(): parsed}


def merge_arch(items: list[dict]) -> tuple[dict, str | None]:
    """The ``--arch`` items (each ``_arch_item``'s dict) as one dict, and the usage error when a key is given
    twice with different values (which one was meant cannot be told; the same value twice is harmless)."""
    arch: dict = {}
    for item in items:
        for k, v in item.items():
            if k in arch and arch[k] != v:
                return arch, f"{k} is given twice ({arch[k]!r} and {v!r}); give it once"
            arch[k] = v
    return arch, None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elit-convert", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=_cli.user_path, help="an official ELIT-SiT train.py checkpoint (.pt), or one of our files")
    p.add_argument("--out", required=True, type=_cli.user_path, help="output file: *.safetensors for safetensors, any other name for a torch file")
    p.add_argument("--weights", default="ema", choices=WEIGHTS,
                   help="which weights to convert: ema (what the official sampling scripts load; default) or model")
    p.add_argument("--arch", action="append", type=_arch_item, default=[], metavar="KEY=VALUE",
                   help="official constructor keyword for a model name outside the registry, e.g. num_heads=2 "
                        f"dit_decoder_depth=1 (repeatable, or one JSON object). Known: {', '.join(ARCH_KEYS)}")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return _cli.run_interruptible("elit-convert", lambda: _main(parser, args),
                                  f"{args.out} was not written (it is written whole or not at all)")


def _main(parser, args) -> int:
    arch, why = merge_arch(args.arch)
    if why:
        parser.error(f"--arch: {why}")
    if why := _cli.input_file_error(args.checkpoint):  # missing, a folder, or not a regular file
        parser.error(f"checkpoint: {why}")
    if os.path.exists(args.out) and not args.force:
        parser.error(f"--out: {args.out} exists; pass --force to overwrite it")
    same = os.path.realpath(args.out) == os.path.realpath(args.checkpoint) or (
        os.path.exists(args.out) and os.path.samefile(args.out, args.checkpoint))  # a symlink or a hard link too
    if same:
        parser.error("--out: must differ from the input checkpoint (it is the same file)")
    if why := output_file_error(args.out):  # before reading a multi-GB checkpoint, not after
        parser.error(f"--out: {why}")
    try:
        model = load_checkpoint(args.checkpoint, weights=args.weights, arch=arch or None)
    except OSError as e:  # the file system's answer (permission refused, a read error); damage is a CheckpointError
        parser.error(f"checkpoint: cannot read {args.checkpoint} ({e.strerror or e})")
    except (CheckpointError, ValueError, TypeError) as e:
        msg = str(e)
        flag = "--arch" if msg.startswith("arch") else "--weights" if msg.startswith("weights") else "checkpoint"
        if flag != "checkpoint":  # the loader names its argument first ("arch: ..."): the flag replaces it
            msg = msg.split(": ", 1)[1] if ": " in msg else msg
        if hint := _cli.arch_hint(msg):
            msg += f" (on the command line: {hint})"
        parser.error(f"{flag}: {msg}" if flag != "checkpoint" or not msg.startswith(args.checkpoint) else msg)
    info = dict(getattr(model, "checkpoint_info", {}))
    meta = {k: info.get(k) for k in ("format", "weights", "model", "steps", "resolution", "elit_max_mask_prob",
                                     "elit_min_mask_prob")}
    meta.update(source=os.path.basename(args.checkpoint), converted_by=f"elit-kernels {__version__}",
                notes=info.get("notes", []))
    try:
        save_model(args.out, model, meta=meta)  # whole or not at all
    except OSError as e:  # a full disk, a folder gone: one line (as elit-demo and elit-bench), nothing half-written
        err = e if isinstance(e, _cli.OutputWriteError) else _cli.OutputWriteError(args.out, e)
        print(f"elit-convert: error: {err}", file=sys.stderr)
        return 1
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.checkpoint}: {info.get('model') or 'ELIT-SiT'} ({args.weights} weights"
          + (f", step {info['steps']}" if info.get("steps") is not None else "") + ")")
    for note in info.get("notes", []):
        print(f"  note: {note}")
    print(f"config (elit_kernels.models.ElitConfig; {n_params / 1e6:.1f}M parameters, {cfg.n_head} head / "
          f"{cfg.core_blocks} core / {cfg.n_tail} tail blocks, {cfg.groups} groups of P = {cfg.tokens_per_group}):")
    for k, v in config_dict(cfg).items():
        print(f"  {k:24s} {v!r}")
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":  # python -m elit_kernels.official.cli
    import elit_kernels_cli

    sys.exit(elit_kernels_cli.run_started("elit-convert", main))  # ends the start-up Ctrl-C guard
