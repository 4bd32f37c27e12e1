"""Load the released ELIT-SiT checkpoints (github.com/snap-research/elit ``train.py`` files) into ``ElitDiT``.

Facts used here are from ``docs/released_checkpoints.md``: §1-2 (file layout and ``args``), §3.1 (every key and
shape), §3.3 (registry and head/core/tail split). The network is rebuilt from ``args`` + the tensor shapes +
the registry name; ``arch`` (official constructor keyword names) supplies what a name outside the registry
cannot: ``num_heads`` and ``dit_decoder_depth`` (the tail count) are in neither ``args`` nor the weights.
"""
from __future__ import annotations

import argparse
import functools
import logging
import math
import re

import torch

from .._types import check_bool, is_int, is_real
from ..models.checkpoint import (READABLE_FORMATS, SAFE_GLOBALS, CheckpointError, UnsafeCheckpointError,  # noqa: F401
                                 _check_load_args, _check_load_path, check_finite as _check_finite, check_model_parts,
                                 is_model_file, model_file_parts, model_from_parts, read_model_file, safe_torch_load,
                                 verify_sha256)
from ..models.config import (RELEASED_SWITCHES, SIT_REGISTRY, ElitConfig, config_dict, elit_sit_config,
                             parse_sit_name)

log = logging.getLogger(__name__)

WEIGHTS = ("ema", "model")
# Official constructor keywords (models/sit_elit.py SiTELIT and its registry helpers) that ``arch`` accepts.
ARCH_KEYS = ("depth", "hidden_size", "decoder_hidden_size", "patch_size", "num_heads", "dit_encoder_depth",
             "dit_decoder_depth", "input_size", "in_channels", "num_classes", "encoder_depth", "group_size",
             "class_dropout_prob", "mlp_ratio", "elit_read_depth", "elit_write_depth", "qk_norm", "fused_attn",
             "enable_repa", "use_cfg", "z_dims", "projector_dim", "path_type", "enable_elit",
             "elit_max_mask_prob", "elit_min_mask_prob")
READ = "input_token_editor.adapters.0."
WRITE = "output_token_editor.adapters.0."
READ_ATTN = READ + "fit_layer.latents_attend_to_patches.0."
WRITE_ATTN = WRITE + "patches_attend_to_latents.0."
IGNORED_PREFIXES = ("projectors.",)  # REPA projector heads: training-only (docs/released_checkpoints.md §2)


# --- the config -------------------------------------------------------------------------------------------
def _shape(sd, key, path):
    if key not in sd:
        raise CheckpointError(f"{path}: missing key {key!r} (needed to read the model's sizes)")
    return tuple(sd[key].shape)


def _pick(name, values, path):
    """One value from several sources that must agree: values = [(source, value or None), ...]."""
    given = [(src, v) for src, v in values if v is not None]
    if not given:
        return None
    first = given[0][1]
    for src, v in given[1:]:
        if v != first:
            raise CheckpointError(f"{path}: {name} disagrees: {given[0][0]} says {first!r}, {src} says {v!r}")
    return first


#: the ``args`` fields the loader reads (docs/released_checkpoints.md §2) and the type train.py gives each
_ARGS_TYPES = {"model": str, "encoder_depth": int, "num_classes": int, "elit_group_size": int, "resolution": int,
               "elit_read_depth": int, "elit_write_depth": int, "qk_norm": bool, "elit_max_mask_prob": float,
               "elit_min_mask_prob": float}
_TYPE_WORDS = {str: "a str", int: "an int", bool: "a bool", float: "a real number"}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_type(value, want) -> bool:
    if want is int:
        return is_int(value)
    if want is float:
        return is_real(value)
    return isinstance(value, want)


def check_args(args, path: str = "checkpoint") -> dict:
    """A file's ``args`` entry as a dict: an ``argparse.Namespace`` (official train.py) or a dict of its fields
    (None or absent: ``{}``). Raises CheckpointError naming the file when it is anything else, or naming
    ``args.<field>`` when a field the loader reads (``_ARGS_TYPES``) has another type than train.py gives it
    (None: not given)."""
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    elif not isinstance(args, dict):
        raise CheckpointError(f"{path}: args is {type(args).__name__} ({_short(args)}), expected an argparse.Namespace "
                              "(what official train.py saves) or a dict of its fields")
    for key, want in _ARGS_TYPES.items():
        value = args.get(key)
        if value is not None and not _is_type(value, want):
            raise CheckpointError(f"{path}: args.{key} is {type(value).__name__} ({_short(value)}), expected "
                                  f"{_TYPE_WORDS[want]} (the type official train.py gives it): a damaged or edited file")
    return dict(args)


def _registry(name) -> dict | None:
    """The official constructor sizes of a registry name (``ELIT-SiT-XL/2``), or None for any other name."""
    if name is None:
        return None
    try:
        size, name_patch = parse_sit_name(name)
    except ValueError:
        return None
    return dict(zip(("depth", "hidden_size", "num_heads", "dit_decoder_depth"), SIT_REGISTRY[size]),
                patch_size=name_patch)


def _weights_depth(keys, encoder_depth=None) -> int:
    """1 + the largest block index among ``keys`` (``blocks.{i}.``; legacy ``decoder_blocks.{i}.`` counted from
    ``encoder_depth`` when it is an int); 0 for none."""
    depth = 0
    for k in keys:
        if not isinstance(k, str):
            continue
        if m := re.match(r"blocks\.(\d+)\.", k):
            depth = max(depth, int(m.group(1)) + 1)
        elif (m := re.match(r"decoder_blocks\.(\d+)\.", k)) and is_int(encoder_depth):
            depth = max(depth, int(m.group(1)) + encoder_depth + 1)
    return depth


def official_config(sd: dict, args: dict, arch: dict, path: str = "checkpoint", *,
                    depth_from: tuple[str, int] | None = None, notes: list | None = None) -> ElitConfig:
    """The ``ElitConfig`` (released preset) of an official state_dict, from its ``args``, its shapes, the
    registry name ``args['model']`` and ``arch`` (official constructor keywords). Errors name what is missing.

    The depth is never read from ``sd``'s block keys, which cannot tell a file missing its last blocks from a
    shallower model: it is the registry name's or ``arch['depth']``, else ``depth_from`` (``(source, depth)``: a
    record of the same file, such as its optimizer state; ``read_official`` finds them); with none of these,
    CheckpointError asking for ``arch['depth']``. ``check_keys`` then names missing or unexpected blocks. Where
    the depth came from ``depth_from``, a line saying so is appended to ``notes``."""
    args = check_args(args, path)
    d, cin, p, _ = _shape(sd, "x_embedder.proj.weight", path)
    n = _shape(sd, "pos_embed", path)[1]
    grid = math.isqrt(n)
    if grid * grid != n:
        raise CheckpointError(f"{path}: pos_embed has {n} tokens, not a square grid")
    big_p = _shape(sd, READ + "learned_query_embed", path)[0]
    gs = math.isqrt(big_p)
    if gs * gs != big_p:
        raise CheckpointError(f"{path}: learned_query_embed has {big_p} rows, not a square group")
    ncls = _shape(sd, "y_embedder.embedding_table.weight", path)[0] - 1
    out_rows = _shape(sd, "final_layer.linear.weight", path)[0]
    if out_rows != p * p * cin:
        raise CheckpointError(f"{path}: final_layer.linear has {out_rows} rows, expected patch² × in_channels = "
                              f"{p * p * cin} (learned-sigma outputs are not supported)")
    mlp_hidden = _shape(sd, "blocks.0.mlp.fc1.weight", path)[0]
    read_hidden = _shape(sd, READ + "fit_layer.read_ff.0.fc1.weight", path)[0]
    rows = _shape(sd, READ + "latent_pos_embed", path)[0]

    name = args.get("model")
    reg = _registry(name)
    heads = _pick("num_heads", [("arch", arch.get("num_heads")), ("registry " + str(name), (reg or {}).get("num_heads"))], path)
    tail = _pick("dit_decoder_depth", [("arch", arch.get("dit_decoder_depth")),
                                       ("registry " + str(name), (reg or {}).get("dit_decoder_depth"))], path)
    if heads is None or tail is None:
        miss = [k for k, v in (("num_heads", heads), ("dit_decoder_depth", tail)) if v is None]
        raise CheckpointError(
            f"{path}: model {name!r} is not an official registry name "
            f"(known: ELIT-SiT-{{{','.join(SIT_REGISTRY)}}}/{{2,4,8}}) and arch does not give {', '.join(miss)}; "
            "pass arch={" + ", ".join(f"'{k}': {dict(num_heads='H', dit_decoder_depth='T')[k]}" for k in miss)
            + "} (official constructor names) — " + ("neither is" if len(miss) > 1 else "it is not")
            + " stored in args or readable from the weights")
    enc = _pick("encoder_depth", [("arch", arch.get("encoder_depth")), ("args", args.get("encoder_depth"))], path)
    if enc is None:
        raise CheckpointError(f"{path}: encoder_depth (head blocks) is in neither args nor arch; pass arch={{'encoder_depth': N}}")
    depth = _pick("depth", [("arch", arch.get("depth")), ("registry " + str(name), (reg or {}).get("depth"))], path)
    if depth is None and depth_from is not None:
        source, depth = depth_from
        if notes is not None:
            notes.append(f"depth {depth}: from {source}")
    if depth is None:
        held = _weights_depth(sd)
        raise CheckpointError(
            f"{path}: depth: " + (f"model {name!r} is not an official registry name" if name is not None else
                                  "the file names no model (no args.model)")
            + ", arch gives no depth, and the file holds "
            f"no record to check the {held} blocks its weights hold against (an optimizer state 'opt', or a second "
            "weights entry): a file missing its last blocks cannot be told from a shallower model; pass "
            "arch={'depth': N} (the official constructor's depth)")
    for key, weights_value in (("hidden_size", d), ("patch_size", p)):
        _pick(key, [("weights", weights_value), ("arch", arch.get(key)), ("registry " + str(name), (reg or {}).get(key))], path)
    _pick("decoder_hidden_size", [("weights", d), ("arch", arch.get("decoder_hidden_size"))], path)
    _pick("in_channels", [("weights", cin), ("arch", arch.get("in_channels"))], path)
    _pick("num_classes", [("weights", ncls), ("arch", arch.get("num_classes")), ("args", args.get("num_classes"))], path)
    _pick("group_size", [("weights", gs), ("arch", arch.get("group_size")), ("args", args.get("elit_group_size"))], path)
    res = args.get("resolution")
    _pick("input_size", [("weights", grid * p), ("arch", arch.get("input_size")),
                         ("args.resolution // 8", res // 8 if isinstance(res, int) else None)], path)
    _pick("mlp_ratio", [("weights", mlp_hidden / d), ("arch", arch.get("mlp_ratio"))], path)
    for key in ("elit_read_depth", "elit_write_depth"):
        v = _pick(key, [("arch", arch.get(key)), ("args", args.get(key))], path)
        if v not in (None, 1):
            raise CheckpointError(f"{path}: {key}={v} is not supported (the released checkpoints use 1)")
    if _pick("qk_norm", [("arch", arch.get("qk_norm")), ("args", args.get("qk_norm"))], path):
        raise CheckpointError(f"{path}: qk_norm=True DiT blocks are not supported (the released checkpoints use False)")
    if d % heads:
        raise CheckpointError(f"{path}: num_heads {heads} does not divide the width {d}")
    if grid % gs:
        raise CheckpointError(f"{path}: group size {gs} does not divide the {grid}x{grid} token grid")
    if not 0 <= enc <= depth - tail:
        raise CheckpointError(f"{path}: encoder_depth {enc} + tail {tail} exceed depth {depth}")
    if rows < grid * grid:
        raise CheckpointError(f"{path}: {READ}latent_pos_embed has {rows} rows, fewer than the {grid}x{grid} = "
                              f"{grid * grid} tokens of the grid it indexes by raster position")
    try:
        return ElitConfig(
            **{**RELEASED_SWITCHES, "latent_pos_rows": rows},
            hidden=d, depth=depth, heads=heads, patch=p, in_channels=cin, input_size=grid * p, window=gs,
            num_classes=ncls, head_blocks=enc, tail_blocks=tail, mlp_ratio=mlp_hidden / d,
            interface_mlp_ratio=read_hidden / d)
    except ValueError as e:  # any other inconsistency the config's own checks find: named with the file
        raise CheckpointError(f"{path}: {e}") from None


# --- the key map ------------------------------------------------------------------------------------------
def official_shapes(cfg: ElitConfig) -> dict:
    """Every key of an official ELIT-SiT state_dict for ``cfg`` and its shape (README §3.1)."""
    d, p, cin, big_p = cfg.hidden, cfg.patch, cfg.in_channels, cfg.tokens_per_group
    hid, rhid = int(d * cfg.mlp_ratio), int(d * cfg.interface_mlp_ratio)
    s = {"pos_embed": (1, cfg.tokens, d), "x_embedder.proj.weight": (d, cin, p, p), "x_embedder.proj.bias": (d,),
         "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,), "t_embedder.mlp.2.weight": (d, d),
         "t_embedder.mlp.2.bias": (d,), "y_embedder.embedding_table.weight": (cfg.num_classes + 1, d),
         "final_layer.linear.weight": (p * p * cin, d), "final_layer.linear.bias": (p * p * cin,),
         "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,)}
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        s.update({b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d),
                  b + "attn.proj.bias": (d,), b + "mlp.fc1.weight": (hid, d), b + "mlp.fc1.bias": (hid,),
                  b + "mlp.fc2.weight": (d, hid), b + "mlp.fc2.bias": (d,),
                  b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,)})
    s.update({READ + "learned_query_embed": (big_p, d), READ + "pos_embed": (big_p, d),
              READ + "latent_pos_embed": (cfg.latent_pos_rows, d),
              READ + "fit_layer.adaLN_modulation.1.weight": (7 * d, d), READ + "fit_layer.adaLN_modulation.1.bias": (7 * d,),
              READ + "fit_layer.read_ff.0.fc1.weight": (rhid, d), READ + "fit_layer.read_ff.0.fc2.weight": (d, rhid),
              WRITE + "pos_embed": (big_p, d),
              WRITE + "write_ff.0.fc1.weight": (rhid, d), WRITE + "write_ff.0.fc2.weight": (d, rhid)})
    for a in (READ_ATTN, WRITE_ATTN):
        s.update({a + "q_proj.weight": (d, d), a + "q_proj.bias": (d,), a + "kv_proj.weight": (2 * d, d),
                  a + "kv_proj.bias": (2 * d,), a + "q_norm.scale": (d,), a + "k_norm.scale": (d,),
                  a + "proj.weight": (d, d), a + "proj.bias": (d,)})
    return s


def _block_target(cfg: ElitConfig, i: int) -> str:
    if i < cfg.n_head:
        return f"head.{i}"
    if i < cfg.n_head + cfg.core_blocks:
        return f"core.{i - cfg.n_head}"
    return f"tail.{i - cfg.n_head - cfg.core_blocks}"


def convert_state_dict(sd: dict, cfg: ElitConfig) -> dict:
    """Official ELIT-SiT state_dict -> ``ElitDiT(cfg)`` state_dict (views where possible, no copies).

    Fused ``qkv`` rows ``[q | k | v]`` split into our ``q`` and ``kv``; the Read's 7-chunk modulation keeps its
    first 6 chunks (the 7th is unused by the official forward pass); RMSNorm ``scale`` -> ``weight``;
    ``pos_embed`` is not copied (ours is the same fixed table, checked by ``check_pos_embed``)."""
    d = cfg.hidden
    out = {"stem.patch_embed.weight": sd["x_embedder.proj.weight"], "stem.patch_embed.bias": sd["x_embedder.proj.bias"],
           "stem.y_embed.weight": sd["y_embedder.embedding_table.weight"],
           "latent_embed": sd[READ + "learned_query_embed"], "read_pos_embed": sd[READ + "pos_embed"],
           "latent_pos_embed": sd[READ + "latent_pos_embed"], "write_pos_embed": sd[WRITE + "pos_embed"],
           "read.ada.weight": sd[READ + "fit_layer.adaLN_modulation.1.weight"][: 6 * d],
           "read.ada.bias": sd[READ + "fit_layer.adaLN_modulation.1.bias"][: 6 * d]}
    for j in (0, 2):
        for w in ("weight", "bias"):
            out[f"stem.t_embed.mlp.{j}.{w}"] = sd[f"t_embedder.mlp.{j}.{w}"]
    for w in ("weight", "bias"):
        out[f"stem.final.linear.{w}"] = sd[f"final_layer.linear.{w}"]
        out[f"stem.final.ada.{w}"] = sd[f"final_layer.adaLN_modulation.1.{w}"]
    for i in range(cfg.depth):
        src, dst = f"blocks.{i}.", _block_target(cfg, i) + "."
        for w in ("weight", "bias"):
            qkv = sd[src + f"attn.qkv.{w}"]
            out[dst + f"attn.q.{w}"], out[dst + f"attn.kv.{w}"] = qkv[:d], qkv[d:]
            out[dst + f"attn.proj.{w}"] = sd[src + f"attn.proj.{w}"]
            out[dst + f"mlp.fc1.{w}"], out[dst + f"mlp.fc2.{w}"] = sd[src + f"mlp.fc1.{w}"], sd[src + f"mlp.fc2.{w}"]
            out[dst + f"ada.{w}"] = sd[src + f"adaLN_modulation.1.{w}"]
    for a, dst in ((READ_ATTN, "read.attn."), (WRITE_ATTN, "write.attn.")):
        for w in ("weight", "bias"):
            out[dst + f"q.{w}"], out[dst + f"kv.{w}"] = sd[a + f"q_proj.{w}"], sd[a + f"kv_proj.{w}"]
            out[dst + f"proj.{w}"] = sd[a + f"proj.{w}"]
        out[dst + "q_norm.weight"], out[dst + "k_norm.weight"] = sd[a + "q_norm.scale"], sd[a + "k_norm.scale"]
    for src, dst in ((READ + "fit_layer.read_ff.0.", "read.mlp."), (WRITE + "write_ff.0.", "write.mlp.")):
        out[dst + "fc1.weight"], out[dst + "fc2.weight"] = sd[src + "fc1.weight"], sd[src + "fc2.weight"]
    return out


def check_keys(sd: dict, cfg: ElitConfig, path: str = "checkpoint") -> list[str]:
    """Compare an official state_dict with what ``cfg`` expects. Returns the deliberately ignored keys;
    raises CheckpointError listing missing keys, unexpected keys, or the first shape mismatch."""
    want = official_shapes(cfg)
    ignored = sorted(k for k in sd if k.startswith(IGNORED_PREFIXES))
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want) - set(ignored))
    if missing:
        raise CheckpointError(f"{path}: missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(f"{path}: shape mismatch for {k}: expected {list(shape)}, got {list(sd[k].shape)}")
    return ignored


def check_pos_embed(pos_embed: torch.Tensor, model, path: str = "checkpoint") -> None:
    """The stored fixed sin-cos table must equal ours (raster order, column half first), else the token
    order or channel convention differs from what this loader assumes."""
    from ..layout import group_major_permutation, inverse_permutation

    cfg = model.cfg
    perm = group_major_permutation(cfg.grid, cfg.grid, cfg.window)
    ours = model.stem.pos_embed.detach().float().cpu()[inverse_permutation(perm)]
    theirs = pos_embed[0].float()
    err = (ours - theirs).abs().max().item()
    # a bf16/fp16 file (or model) holds the table rounded to its precision (|values| <= 1)
    tol = max([1e-5] + [torch.finfo(t.dtype).eps for t in (model.stem.pos_embed, pos_embed) if t.is_floating_point()])
    if not err <= tol:
        raise CheckpointError(f"{path}: pos_embed differs from the 2-D sin-cos table (max abs diff {err:.3g}); "
                              "not the official fixed table")


def apply_legacy_names(sd: dict, encoder_depth: int) -> dict:
    """Older files named the blocks after the head ``decoder_blocks.{i}`` (docs/released_checkpoints.md §2, ``--legacy``):
    map them to ``blocks.{i + encoder_depth}``."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"decoder_blocks\.(\d+)\.(.*)", k)
        new = f"blocks.{int(m.group(1)) + encoder_depth}.{m.group(2)}" if m else k
        if new in out or (m and new in sd):
            raise CheckpointError(f"legacy names: {k} maps to {new}, which the file also holds "
                                  f"(encoder_depth {encoder_depth} does not match this file's naming)")
        out[new] = v
    return out


# --- the public loader ------------------------------------------------------------------------------------
def _check_arch(arch) -> dict:
    if arch is None:
        return {}
    if not isinstance(arch, dict):
        raise TypeError(f"arch: expected a dict of official constructor keywords, got {type(arch).__name__}")
    bad = sorted(set(arch) - set(ARCH_KEYS))
    if bad:
        raise ValueError(f"arch: unknown keyword(s) {bad}; known (official SiTELIT constructor names): {', '.join(ARCH_KEYS)}")
    for key, value in arch.items():
        _check_arch_value(key, value)
    # NumPy ints and floats as Python's (the config takes plain ints)
    return {k: int(v) if is_int(v) else float(v) if is_real(v) else v for k, v in arch.items()}


# What each ``arch`` keyword takes (the official constructor's types); the rest (path_type, z_dims) are not read.
_ARCH_POSITIVE_INTS = ("depth", "hidden_size", "decoder_hidden_size", "patch_size", "num_heads", "input_size",
                       "in_channels", "num_classes", "group_size", "projector_dim")
_ARCH_COUNTS = ("dit_encoder_depth", "dit_decoder_depth", "encoder_depth", "elit_read_depth", "elit_write_depth")
_ARCH_REALS = ("class_dropout_prob", "mlp_ratio", "elit_max_mask_prob", "elit_min_mask_prob")
_ARCH_BOOLS = ("qk_norm", "fused_attn", "enable_repa", "use_cfg", "enable_elit")


#: ``arch`` keywords the loader takes but does not read: training-only switches, or sizes the weights fix
_ARCH_UNREAD = ("dit_encoder_depth", "class_dropout_prob", "fused_attn", "enable_repa", "use_cfg", "z_dims",
                "projector_dim", "path_type", "elit_max_mask_prob", "elit_min_mask_prob")


#: key prefixes of a wrapped model's state_dict: DistributedDataParallel / DataParallel, torch.compile
_WRAPPER_PREFIXES = (("module.", "a DistributedDataParallel / DataParallel model"),
                     ("_orig_mod.", "a torch.compile'd model"))


def _strip_wrapper_prefixes(sd: dict, notes: list) -> dict:
    """``sd`` without the prefix every key carries when the state_dict was taken from a wrapped model (the
    weights are the same), each removal noted; unchanged otherwise."""
    while sd and all(isinstance(k, str) for k in sd):
        for prefix, what in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                notes.append(f"removed the {prefix!r} prefix of every key (a state_dict of {what})")
                break
        else:
            return sd
    return sd


def _check_arch_value(key: str, value) -> None:
    """TypeError / ValueError naming ``arch[key]`` when ``value`` is not what the official constructor takes for it
    (an int >= 1 for sizes, >= 0 for block counts, a finite real > 0 for ``mlp_ratio`` and in [0, 1] for the
    probabilities, a bool for switches; None: not given, as if the key were absent)."""
    where = f"arch: {key}"
    if value is None:
        return
    if key in _ARCH_POSITIVE_INTS + _ARCH_COUNTS:
        if not is_int(value):
            raise TypeError(f"{where}: expected an int, got {type(value).__name__} ({value!r})")
        lo = 1 if key in _ARCH_POSITIVE_INTS else 0
        if value < lo:
            raise ValueError(f"{where}: expected an int >= {lo}, got {value!r}")
    elif key in _ARCH_REALS:
        if not is_real(value):
            raise TypeError(f"{where}: expected a real number, got {type(value).__name__} ({value!r})")
        ok = 0 < value < math.inf if key == "mlp_ratio" else 0 <= value <= 1
        if not ok:
            raise ValueError(f"{where}: expected {'a finite real > 0' if key == 'mlp_ratio' else 'a real in [0, 1]'}"
                             f", got {value!r}")
    elif key in _ARCH_BOOLS and not isinstance(value, bool):
        raise TypeError(f"{where}: expected a bool, got {type(value).__name__} ({value!r})")
    if key == "enable_elit" and value is False:
        raise ValueError(f"{where}: False describes a plain SiT; this loader reads ELIT-SiT checkpoints (Read/Write "
                         "interface weights), whose constructor has enable_elit=True")


def _check_weights(weights) -> None:
    if weights not in WEIGHTS:
        raise ValueError(f"weights: expected one of {WEIGHTS} ('ema' is what the official sampling scripts load), "
                         f"got {weights!r}")


@functools.lru_cache(maxsize=None)
def _key_counts() -> tuple[int, int]:
    """(official tensors outside the blocks, tensors per block): the same for every size (``official_shapes``)."""
    cfg = elit_sit_config("S/2", 256)
    shapes = official_shapes(cfg)
    per_block = sum(k.startswith("blocks.0.") for k in shapes)
    return len(shapes) - per_block * cfg.depth, per_block


def _opt_param_count(ckpt: dict) -> int | None:
    """How many parameters the file's optimizer state lists (official train.py: AdamW over
    ``model.parameters()``, one per tensor of the state_dict), or None when it has none that says."""
    opt = ckpt.get("opt")
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    if not isinstance(groups, list):
        return None
    try:
        n = sum(len(g["params"]) for g in groups)
    except (TypeError, KeyError):
        return None
    return n or None


def _file_depth(ckpt: dict, weights: str, sd: dict, encoder_depth, path: str) -> tuple[str, int] | None:
    """``(source, depth)`` from a record of the file other than the chosen weights, or None: the optimizer
    state's parameter count first (the model's whole parameter list, whatever the weights hold), else the other
    weights entry's blocks (train.py saves ``model`` and ``ema`` from one model). Raises CheckpointError when the
    optimizer state's count fits no depth."""
    n = _opt_param_count(ckpt)
    if n is not None:
        fixed, per_block = _key_counts()
        extra = sum(1 for k in sd if k.startswith(IGNORED_PREFIXES))
        depth, rest = divmod(n - fixed - extra, per_block)
        if rest or depth < 1:
            raise CheckpointError(
                f"{path}: the optimizer state ('opt') lists {n} parameters, which fits no depth: an ELIT-SiT model "
                f"has {fixed} tensors outside its blocks and {per_block} per block"
                + (f", and this file {extra} REPA projector tensors" if extra else "")
                + "; the file is damaged or edited. If it is whole, pass arch={'depth': N} (the official "
                "constructor's depth)")
        return (f"the optimizer state ('opt': {n} parameters = {fixed} outside the blocks"
                + (f" + {extra} REPA projector tensors" if extra else "") + f" + {per_block} per block)", depth)
    other = next(w for w in WEIGHTS if w != weights)
    sd2 = ckpt.get(other)
    if isinstance(sd2, dict) and sd2 and all(isinstance(k, str) for k in sd2):
        depth = _weights_depth(_strip_wrapper_prefixes(sd2, []), encoder_depth)
        if depth:
            return f"the {other!r} entry's blocks (blocks.0 to blocks.{depth - 1})", depth
    return None


def read_official(path: str, *, weights: str = "ema", arch: dict | None = None, ckpt=None, check_finite: bool = True):
    """Read an official file -> ``(cfg, our state_dict, info)`` without building a model.

    ``ckpt``: the file's contents when already read with ``safe_torch_load``. ``check_finite``: refuse a
    tensor of the chosen weights that holds NaN or inf (``models.checkpoint.check_finite``, naming the file's
    key; one pass over those weights). ``info``: provenance and
    notes (what was ignored and why) for ``load_checkpoint`` and ``elit-convert``; ``info["official_pos_embed"]``
    is the stored sin-cos table (checked against ours by ``check_pos_embed``); ``info["weights"]`` is None for a
    bare state_dict (one set of weights, EMA or raw: which cannot be told), where ``weights="model"`` is refused.

    The depth comes from the registry name or ``arch['depth']``, else from the file's optimizer state (its
    parameter count) or its other weights entry, never from the chosen weights alone (``official_config``): a
    file missing its last blocks is a CheckpointError listing their keys."""
    _check_weights(weights)
    arch = _check_arch(arch)
    if ckpt is None:
        ckpt = safe_torch_load(path)
    notes = []
    unread = sorted(k for k, v in arch.items() if k in _ARCH_UNREAD and v is not None)
    if unread:
        notes.append(f"arch keys not read (training-only, or fixed by the weights): {', '.join(unread)}")
    if isinstance(ckpt, dict) and not any(w in ckpt for w in WEIGHTS):
        ckpt = _strip_wrapper_prefixes(ckpt, notes)
    bare = isinstance(ckpt, dict) and "x_embedder.proj.weight" in ckpt
    if bare:  # a bare state_dict (e.g. ckpt['ema'] saved alone)
        if weights != "ema":
            raise ValueError(f"weights: {path} is a bare state_dict (one set of weights, no 'ema'/'model' entries), "
                             f"so {weights!r} cannot be chosen; leave the default")
        sd, args, what = ckpt, {}, "the state_dict"
        notes.append("bare state_dict: no args; sizes from the weights and arch; which weights (EMA or raw) it holds "
                     "cannot be told")
    elif isinstance(ckpt, dict) and any(w in ckpt for w in WEIGHTS):
        if weights not in ckpt:
            raise CheckpointError(f"{path}: no {weights!r} entry (has {sorted(k for k in ckpt if isinstance(k, str))}); "
                                  f"try weights={[w for w in WEIGHTS if w in ckpt][0]!r}")
        sd, what = ckpt[weights], f"the {weights!r} entry"
        args = check_args(ckpt.get("args"), path)
        if ckpt.get("steps") is not None and not is_int(ckpt["steps"]):
            raise CheckpointError(f"{path}: steps is {type(ckpt['steps']).__name__} ({_short(ckpt['steps'])}), "
                                  "expected an int (the training step official train.py saves)")
        for k, why in (("opt", "optimizer state"), ("lr_scheduler", "LR scheduler state")):
            if k in ckpt:
                notes.append(f"ignored {k!r} ({why}; not needed for inference)")
    else:
        keys = sorted(ckpt, key=repr)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not an ELIT-SiT checkpoint: expected a dict with 'ema'/'model' and 'args' "
                              f"(official train.py) or one of our files (format {READABLE_FORMATS}), got {keys}")
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: {what} is {type(sd).__name__}, expected a state_dict (a dict of tensors)")
    for k, v in sd.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{path}: {what} has a key that is not a string: {_short(k)} ({type(k).__name__}); "
                                  "the file is damaged or not an ELIT-SiT checkpoint")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: {what} is not a state_dict of tensors: {k!r} is {type(v).__name__}")
    sd = _strip_wrapper_prefixes(sd, notes)
    bad = [(k, v.dtype) for k, v in sd.items() if not v.is_floating_point()]
    if bad:  # every weight and buffer of the released models is floating point; a cast would hide the damage
        raise CheckpointError(f"{path}: tensor {bad[0][0]!r} is {bad[0][1]}, expected a floating-point weight "
                              f"({len(bad)} such tensors in all): the file is damaged or not an ELIT-SiT checkpoint")
    if check_finite:
        _check_finite(str(path), sd)
    if READ + "learned_query_embed" not in sd:
        raise CheckpointError(f"{path}: not an ELIT-SiT checkpoint: no Read/Write interface keys "
                              f"({READ}...); a plain SiT or DFM checkpoint has the same file layout")
    enc = arch.get("encoder_depth") if arch.get("encoder_depth") is not None else args.get("encoder_depth")
    if any(k.startswith("decoder_blocks.") for k in sd):
        if isinstance(enc, bool) or not isinstance(enc, int):
            raise CheckpointError(f"{path}: legacy decoder_blocks.* names need encoder_depth (in args or arch) to "
                                  f"number the blocks, got {enc!r}")
        try:
            sd = apply_legacy_names(sd, enc)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        notes.append(f"legacy names: decoder_blocks.i -> blocks.(i + {enc})")
    depth_from = None
    if not bare and arch.get("depth") is None and (_registry(args.get("model")) or {}).get("depth") is None:
        depth_from = _file_depth(ckpt, weights, sd, enc, path)  # only where neither the name nor arch gives it
    cfg = official_config(sd, args, arch, path, depth_from=depth_from, notes=notes)
    ignored = check_keys(sd, cfg, path)
    if ignored:
        notes.append(f"ignored {len(ignored)} REPA projector tensors (projectors.*; training-only)")
    notes.append("Read modulation: 7th chunk dropped (computed but unused by the official forward pass)")
    info = {"source": str(path), "format": "official", "weights": None if bare else weights, "model": args.get("model"),
            "steps": None if bare else ckpt.get("steps"), "resolution": args.get("resolution"),
            "elit_max_mask_prob": args.get("elit_max_mask_prob"), "elit_min_mask_prob": args.get("elit_min_mask_prob"),
            "notes": notes, "official_pos_embed": sd["pos_embed"]}
    return cfg, convert_state_dict(sd, cfg), info


#: what ``checkpoint_info`` of one of our files says itself, and the name a meta value of that name is kept under
#: (elit-convert's meta holds the original file's ``source`` and ``format``)
_OWN_INFO = {"source": "converted_from", "format": "original_format"}


def our_info(path: str, meta: dict) -> dict:
    """``checkpoint_info`` of one of our files: its ``meta``, then ``source`` (the file loaded) and ``format``
    (``'elit-kernels'``). A meta value under one of those two names is kept as ``converted_from`` /
    ``original_format`` (``meta_source`` / ``meta_format`` when the meta holds that name too)."""
    info = dict(meta)
    for key, keep in _OWN_INFO.items():
        if key in info:
            value = info.pop(key)
            info[keep if keep not in meta else f"meta_{key}"] = value
    info.update(source=str(path), format="elit-kernels")
    return info


def load_checkpoint(path: str, *, weights: str = "ema", arch: dict | None = None, device="cpu", dtype=None,
                    backend: str | None = None, check_finite: bool = True, sha256: str | None = None):
    """A released ELIT-SiT checkpoint (or one of our files) -> ``ElitDiT`` in eval mode.

    Arguments:
        path: an official ``train.py`` checkpoint (``{"model", "ema", "opt", "args", "steps"[, "lr_scheduler"]}``,
            README §1), a bare official state_dict, or a file written by ``elit-convert`` / ``save_model``
            (``.safetensors`` or torch).
        weights: ``"ema"`` (default; what the official sampling scripts load) or ``"model"`` (the raw weights).
        arch: official constructor keywords (``num_heads``, ``dit_decoder_depth``, ``encoder_depth``, ...) for a
            model name outside the official registry; checked against the weights where both say something.
        device, dtype: where and in what dtype to put the weights (default: CPU, the file's dtype: a bf16 file
            gives a bf16 model, allocated as such).
        backend: the model's ``varlen_attention`` backend (None = dispatch).
        check_finite: refuse weights holding NaN or inf (default; one pass over the weights, about 0.1 s per GB
            on one CPU core): a damaged download that still parses shows up this way.
        sha256: the file's expected SHA-256 (64 hex digits), checked before anything is parsed (one read of the
            whole file); None skips it.

    Safety: official files are read with ``torch.load(weights_only=True)`` and an allowlist of exactly
    ``argparse.Namespace`` (the ``args`` entry); a file pickling any other global raises
    ``UnsafeCheckpointError`` without running it. ``opt``, ``lr_scheduler`` and REPA ``projectors.*`` are
    ignored; ``model.checkpoint_info`` lists what was ignored and where the weights came from.

    Raises CheckpointError (a ValueError) naming the file and the problem: not an ELIT-SiT checkpoint,
    missing or unexpected keys (listed), a shape mismatch (key, expected, got), an unknown registry name
    without ``arch``, a SHA-256 mismatch, a tensor holding NaN or inf (named); ValueError for ``weights`` not in
    {"ema", "model"}, unknown ``arch`` keys, an ``arch`` value out of its range or a malformed ``sha256``; TypeError
    for an ``arch`` value of the wrong type (both name ``arch`` and the key); RuntimeError for a torch-format file on
    torch older than 2.10, whose ``weights_only`` loader is not safe against crafted files.
    """
    _check_weights(weights)
    arch = _check_arch(arch)
    path = _check_load_path(path)
    device = _check_load_args(device, dtype, backend)
    check_finite = check_bool("check_finite", check_finite)
    if sha256 is not None:
        verify_sha256(path, sha256)
    ours, ckpt = read_model_file(path, device="cpu"), None
    if ours is not None:
        ours = check_model_parts(path, *ours)
    else:
        ckpt = safe_torch_load(path)
        if is_model_file(ckpt):
            ours = model_file_parts(path, ckpt)  # the same checks as load_model's
    if ours is not None:
        if arch:
            raise ValueError(f"arch: {path} is an elit-kernels file, which stores its config; do not pass arch")
        if weights != "ema":
            raise ValueError(f"weights: {path} is an elit-kernels file holding one set of weights "
                             f"({ours[2].get('weights', 'unknown')!r} when converted); use the default")
        config, sd, meta = ours
        if check_finite:
            _check_finite(str(path), sd)
        model = model_from_parts(config, sd, backend=backend, device=device, dtype=dtype, source=str(path))
        model.checkpoint_info = our_info(path, meta)
        return model
    cfg, sd, info = read_official(path, weights=weights, arch=arch, ckpt=ckpt, check_finite=check_finite)
    model = model_from_parts(config_dict(cfg), sd, backend=backend, device=device, dtype=dtype, source=str(path))
    check_pos_embed(info.pop("official_pos_embed"), model, str(path))
    for n in info["notes"]:
        log.info("%s: %s", path, n)
    model.checkpoint_info = info
    return model
