"""Arguments of a sampling run checked and resolved against the model: device, checkpoint, budgets, the output
folder and an earlier run's settings; the FLOPs report. Every error is a UsageError naming the argument."""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
from fractions import Fraction

import numpy as np
import torch

from .. import flow
from ..flow import WEAK_MODES
from .rules import UsageError, mix_budgets, parse_budget_mix

FORMAT = "elit-sample/1"


def usage(check, name, *args):
    """``check(name, *args)`` (one of ``elit_kernels.flow``'s argument checks, the rules the library API uses) with
    its TypeError / ValueError turned into a UsageError naming ``name``: the CLI reports it with exit status 2."""
    try:
        return check(name, *args)
    except (TypeError, ValueError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(name, str(e).split(": ", 1)[-1]) from None


def check_int(name, v, lo, hi=None):
    """An int in [lo, hi] (not a bool); UsageError naming ``name``."""
    return usage(flow._check_int, name, v, lo, hi)


def check_real(name, v, lo=None, what=""):
    """A finite real number >= lo (not a bool), as a float; UsageError naming ``name``."""
    return usage(flow._check_real, name, v, lo, what)


def check_bool(name, v):
    """A flag: True or False (not "no", not 1); UsageError naming ``name``."""
    return usage(flow._check_bool, name, v)


def check_classes(classes) -> list:
    """``classes`` as a list of class ids, in order: a sequence (list, tuple, range) or a 1-D integer tensor /
    NumPy array. UsageError naming ``classes`` for a str (``"1,2"`` is the command line's form), a set or dict
    (no order: sample i gets ``classes[i % len(classes)]``), an empty list; the ids' range is checked against
    the model later."""
    if isinstance(classes, (str, bytes, bytearray)):
        raise UsageError("classes", f"expected a sequence of int class ids, got {type(classes).__name__} "
                                    f"{classes!r} (on the command line: --classes 1,2,3)")
    if isinstance(classes, (set, frozenset, dict)):
        raise UsageError("classes", f"expected an ordered sequence of int class ids (sample i gets classes[i % "
                                    f"len(classes)]), got a {type(classes).__name__}")
    if isinstance(classes, (torch.Tensor, np.ndarray)):
        if classes.ndim != 1 or classes.dtype in (torch.bool, np.bool_) or not (
                (isinstance(classes, torch.Tensor) and not classes.is_floating_point() and not classes.is_complex())
                or (isinstance(classes, np.ndarray) and np.issubdtype(classes.dtype, np.integer))):
            raise UsageError("classes", f"expected a 1-D integer tensor or array of class ids, got shape "
                                        f"{tuple(classes.shape)} and dtype {classes.dtype}")
        classes = classes.tolist()
    try:
        out = list(classes)
    except TypeError:
        raise UsageError("classes", f"expected a sequence of int class ids, got {type(classes).__name__}") from None
    if not out:
        raise UsageError("classes", "empty class list")
    return out


def resolve_device(device, local_rank: int) -> torch.device:
    """None -> ``cuda:LOCAL_RANK`` when CUDA is available, else cpu; ``cuda`` -> ``cuda:LOCAL_RANK``."""
    if device is None:
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError("device", f"not a torch device ({e}); e.g. cpu, cuda, cuda:1") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("device", f"{device} asked for but no CUDA device is available here; use cpu")
        if d.index is None:
            d = torch.device(f"cuda:{local_rank}")
    elif d.type != "cpu":
        raise UsageError("device", f"expected cpu or cuda[:N], got {device!r}")
    return d


def load_model(checkpoint, weights, arch, device, dtype, backend):
    """(model, the checkpoint's name, its size in bytes or None for a module passed in, the fingerprint of the
    weights the run samples with: ``module_fingerprint``). A file is loaded in eval mode; its fingerprint tells
    two files of one name and size apart (resuming with another one is refused: config.json records it).
    A module passed in is not changed: when a parameter or buffer is on another device or (floating point)
    of another dtype, the run uses a converted copy (``copy.deepcopy``: memory for a second model); its train /
    eval modes and ``backend`` are set for the run by the caller and put back after (``_Run``). Its name holds
    a fingerprint of its weights (``module_fingerprint``), so that resuming a run with another module is refused
    like resuming with another file."""
    from ..models.checkpoint import CheckpointError
    from ..official import load_checkpoint

    if isinstance(checkpoint, torch.nn.Module):
        if arch:
            raise UsageError("arch", "only for a checkpoint file (a bare state_dict); the model passed in has its "
                                     "config")
        model = checkpoint
        if any(t.device != device or (t.is_floating_point() and t.dtype != dtype)
               for t in itertools.chain(model.parameters(), model.buffers())):
            model = copy.deepcopy(model).to(device=device, dtype=dtype)
        base = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: named and fingerprinted as its model
        fp = module_fingerprint(base)
        return model, f"<{type(base).__name__} weights {fp}>", None, fp
    from .._cli import arch_hint, input_file_error

    if why := input_file_error(str(checkpoint)):
        raise UsageError("checkpoint", why)
    try:
        model = load_checkpoint(str(checkpoint), weights=weights, arch=arch or None, device=device, dtype=dtype,
                                backend=backend)
    except OSError as e:  # the file system's answer (a permission refused, a read error); damage is a CheckpointError
        raise UsageError("checkpoint", f"cannot read {checkpoint} ({e.strerror or e})") from None
    except (CheckpointError, ValueError, TypeError) as e:
        msg = str(e)
        # the loader names the argument at the start of its message: report it under that argument's flag
        arg = next((k for k in ("arch", "weights", "backend", "device", "dtype") if msg.startswith(k + ":")),
                   "checkpoint")
        if arg != "checkpoint":
            msg = msg.split(": ", 1)[1]
        elif any(k in (arch or {}) and re.search(pattern, msg) for k, pattern in _ARCH_MESSAGES):
            arg = "arch"  # a value the caller gave (--arch) that the weights contradict: that argument is wrong
            msg += ("; check the --arch / arch values against the model (the released ones: "
                    "elit_kernels.official.SIT_REGISTRY)")
        elif hint := arch_hint(msg):
            msg += f" (on the command line: {hint})"
        if "check_finite=False" in msg:  # a load_checkpoint argument that generate / elit-sample do not take
            msg = msg.replace("Pass check_finite=False to load it anyway",
                              "elit-sample / generate never sample from such weights (to inspect them, load the "
                              "file in Python with elit_kernels.official.load_checkpoint(path, check_finite=False))")
        raise UsageError(arg, msg) from None
    return model, os.path.basename(str(checkpoint)), os.path.getsize(str(checkpoint)), module_fingerprint(model)


#: (arch key, a loader message about its value): reported under ``arch`` when the caller gave that key
_ARCH_MESSAGES = (("num_heads", r"num_heads \d+ does not divide"), ("dit_decoder_depth", r"\+ tail \d+ exceed depth"),
                  ("encoder_depth", r"encoder_depth \d+ \+ tail \d+ exceed depth"),
                  ("depth", r"\+ tail \d+ exceed depth"))


def core_blocks_error(model, arch) -> str | None:
    """Why sampling ``model`` at different budgets would be pointless: it has no core block (head + tail blocks =
    depth), and the budget J acts in the core only, so every budget gives the same output; None otherwise."""
    cfg = model.cfg
    if getattr(cfg, "core_blocks", 1) > 0:
        return None
    src = [k for k in ("encoder_depth", "dit_decoder_depth", "depth") if k in (arch or {})]
    return (f"this model has no core block ({cfg.n_head} head + {cfg.n_tail} tail blocks = depth {cfg.depth}"
            + (f"; from arch {', '.join(f'{k}={arch[k]}' for k in src)}" if src else "")
            + "): the budget acts in the core only, so every budget (--latents, --budget, --budget-mix) gives the "
              "same output")


def module_fingerprint(model: torch.nn.Module) -> str:
    """16 hex digits of SHA-256 over the model's config (``model.cfg``, if any: an ELIT model's), every state_dict
    entry's name and shape, and up to 4096 evenly spaced values of each (exactly, as float32): what tells one set of weights from
    another (a fine-tune changes them all) at the cost of one small copy to the host, not of hashing every
    weight (1.35 GB at XL/2 in bf16). The same on any device."""
    from ..models.config import config_dict

    h = hashlib.sha256()
    cfg = getattr(model, "cfg", None)
    # Another module's config (a diffusers VAE's) is left out: a library upgrade that adds a key with its default
    # would change the fingerprint of the same weights, and a resume would be refused.
    h.update(json.dumps(config_dict(cfg) if cfg is not None else None, sort_keys=True, default=str).encode())
    parts = []
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)};".encode())
        flat = t.detach().reshape(-1)
        parts.append(flat[::max(1, flat.numel() // 4096)][:4096].float())
    if parts:
        h.update(torch.cat(parts).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_budgets(cfg, n, budget, latents, budget_mix):
    """Per-sample J for the N samples, and the description stored in config.json."""
    from ..official import latents_for_budget

    j_max = cfg.latents_per_group
    given = [k for k, v in (("budget", budget), ("latents", latents), ("budget_mix", budget_mix)) if v is not None]
    if len(given) > 1:
        raise UsageError(given[1], f"give one of budget, latents, budget_mix (got {', '.join(given)})")
    if budget_mix is not None:
        mix = parse_budget_mix(budget_mix)  # the string and the list form: the same checks
        for j, _ in mix:
            if not 1 <= j <= j_max:
                raise UsageError("budget_mix", f"J = {j} latents per group is out of range: this model takes "
                                               f"1..{j_max}")
        return mix_budgets(mix, range(n)), {"mix": [[j, str(w)] for j, w in mix]}
    if budget is not None:
        try:
            j = latents_for_budget(budget, cfg)
        except (ValueError, TypeError) as e:
            raise UsageError("budget", str(e).split(": ", 1)[-1]) from None
    elif latents is not None:
        j = check_int("latents", latents, 1, j_max)
    else:
        j = j_max
    return [j] * n, {"latents": j}


def budget_rule(desc: dict):
    """``rules.budget_rule`` of ``resolve_budgets``' description: the budgets of any indices (past N too:
    ``rules.plan_batches`` fills a last batch with them)."""
    from .rules import budget_rule as rule

    return rule([(j, Fraction(w)) for j, w in desc["mix"]] if "mix" in desc else desc["latents"])


def check_weak_budget(weak_j, budgets, budget_arg, weak_arg) -> None:
    """The weak pass (autoguidance, ccfg, ccfg_two_pass) is the weaker model: at most as many latents as the
    conditional pass of every sample. With more, "guidance" would push each sample away from a better model
    toward its own worse one, and cost more than it saves. ``budget_arg`` / ``weak_arg``: the arguments that set
    the two (None: the default); UsageError naming both when some sample's J is below the weak J."""
    if weak_j is None or not budgets:
        return
    low = min(budgets)
    if weak_j <= low:
        return
    cond = ("the smallest J of --budget-mix" if budget_arg == "budget_mix" else f"--{budget_arg}" if budget_arg
            else "J_max, the default")
    if weak_arg is None:  # the default weak J, J_max // 16, above a budget the user chose
        raise UsageError(budget_arg, f"{low} latents per group is below the weak pass's default of {weak_j} (J_max // "
                                     f"16); the weak pass must not have more latents than the conditional one: pass "
                                     f"--weak-latents {low} or less")
    raise UsageError(weak_arg, f"the weak pass's {weak_j} latents per group are more than the conditional pass's {low} "
                               f"({cond}): the weak pass of autoguidance / ccfg is the weaker model, so it takes at "
                               f"most as many latents as every sample's own budget; give at most {low}")


def resolve_weak(cfg, guidance, weak_budget, weak_latents):
    """J of the weak pass (autoguidance / ccfg), None for the other modes; default J_max // 16 (min 1), the
    official 1/16."""
    from ..official import latents_for_budget

    given = [k for k, v in (("weak_budget", weak_budget), ("weak_latents", weak_latents)) if v is not None]
    if given and guidance not in WEAK_MODES:
        raise UsageError(given[0], f"only {', '.join(WEAK_MODES)} use a weak budget; guidance is {guidance!r}")
    if len(given) > 1:
        raise UsageError("weak_latents", "give weak_budget or weak_latents, not both")
    if guidance not in WEAK_MODES:
        return None
    if weak_budget is not None:
        try:
            return latents_for_budget(weak_budget, cfg)
        except (ValueError, TypeError) as e:
            raise UsageError("weak_budget", str(e).split(": ", 1)[-1]) from None
    if weak_latents is not None:
        return check_int("weak_latents", weak_latents, 1, cfg.latents_per_group)
    return max(1, cfg.latents_per_group // 16)


def check_out(out: str, files: tuple = (), folders: tuple = ()) -> None:
    """Create ``out`` and write a probe file into it; UsageError naming ``out`` when that fails, or when an entry
    the run writes there is of the wrong kind: one of ``files`` (config.json, the .npz, ...) a folder, one of
    ``folders`` (latents/, samples/) a file. Checked before any sampling: the run would fail at its end."""
    from .._cli import output_dir_error

    why = output_dir_error(out)
    if why:
        raise UsageError("out", why)
    for name in files:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            raise UsageError("out", f"{path} is a folder, where this run writes its {name} file; move it away or use "
                                    "another --out folder")
    for name in folders:
        path = os.path.join(out, name)
        if os.path.lexists(path) and not os.path.isdir(path):
            raise UsageError("out", f"{path} is a file, where this run writes its samples into a folder {name}/; "
                                    "move it away or use another --out folder")


#: settings config.json did not record before elit-sample identified the weights by content: a config.json
#: without them is of an earlier version, resumed without comparing them (with a note)
IDENTITY_KEYS = {"checkpoint_weights": "checkpoint", "vae_weights": "--vae"}


def check_earlier_run(path: str, settings: dict, soft: dict, has_samples: bool = True) -> list[str]:
    """Compare with an earlier run's config.json: UsageError naming ``out`` when a setting that decides the images
    differs and the folder holds samples; otherwise notes, one line each: the ones that only move rounding (batch
    size, backend, ...), or, when the folder holds no sample (``has_samples`` False: a run stopped before its
    first one), that the earlier run's settings are replaced (``generate`` writes its own config.json then). A
    config.json not written by elit-sample is refused, never replaced."""
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError("out", f"{path} is not readable JSON ({e}); use a new --out folder") from None
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise UsageError("out", f"{path} was not written by elit-sample ({FORMAT}); use a new --out folder")
    was, was_soft = old.get("settings", {}), old.get("soft", {})
    if not isinstance(was, dict) or not isinstance(was_soft, dict):
        raise UsageError("out", f"{path} was not written by elit-sample ({FORMAT}); use a new --out folder")
    unrecorded = [k for k in IDENTITY_KEYS if k in settings and k not in was]
    diff = [k for k in settings if k not in unrecorded and was.get(k) != settings[k]]
    show = "; ".join(f"{k}: {was.get(k)!r} there, {settings[k]!r} now" for k in diff[:4])
    if diff and not has_samples:
        return [f"an earlier run in {os.path.dirname(path) or '.'} with other settings ({show}) wrote no sample: its "
                "config.json is replaced by this run's"]
    if diff:
        other = [IDENTITY_KEYS[k] for k in diff if k in IDENTITY_KEYS]
        why = "".join(f"; the {w} given now holds other weights than the one that run used (whatever its file or "
                      f"folder name): pass that run's {w}" for w in other)
        raise UsageError("out", f"{os.path.dirname(path)} holds samples of a different run ({show}){why}; resume with "
                                "the same settings or use a new --out folder")
    notes = [f"{path} is of an earlier elit-sample that did not record {k} (a fingerprint of the weights): not "
             f"compared, so make sure {IDENTITY_KEYS[k]} is the one that run used" for k in unrecorded
             if settings[k] is not None
             and not (k == "checkpoint_weights" and settings.get("checkpoint_bytes") is None)]  # a module: its name
    # holds the fingerprint, compared above
    return notes + [f"resuming with different {k} (was {was_soft[k]!r}, now {soft[k]!r}): the remaining samples differ "
                    "from a fresh run's by floating-point rounding only" for k in soft
                    if k in was_soft and was_soft[k] != soft[k]]


def flops_report(model, budgets, weak_j, guidance, heun, guided_steps, device, dtype) -> str:
    """One line: FLOPs of one forward of one image per budget (``elit_kernels.bench.flops.count_flops``), and the
    mean per image of this run (its mix, guidance on ``guided_steps``, Heun's second evaluation)."""
    from ..bench.flops import count_flops

    cfg, steps = model.cfg, len(guided_steps)

    def forward(j):
        x = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size, device=device, dtype=dtype)
        t = torch.full((1,), 0.5, device=device)
        y = torch.zeros(1, dtype=torch.long, device=device)
        return count_flops(lambda: model(x, t, y, [j]), [model])["total"]

    counts: dict[int, int] = {}
    for j in budgets:
        counts[j] = counts.get(j, 0) + 1
    per = {j: forward(j) for j in sorted(set(counts) | ({weak_j} - {None}), reverse=True)}

    def image(j):
        tot = 0
        for i, guided in enumerate(guided_steps):
            f = per[j] + ((per[j] if guidance == "cfg" else per[weak_j]) if guided else 0)
            tot += (2 if heun and i < steps - 1 else 1) * f
        return tot
    n = len(budgets)
    mean = sum(c * image(j) for j, c in counts.items()) / n
    fw = ", ".join(f"J={j}: {_flops(per[j])}" for j in per)
    mix = ", ".join(f"J={j} {c / n:.0%}" for j, c in sorted(counts.items(), reverse=True))
    return (f"FLOPs of one forward of one image: {fw}; per image over {steps} steps ({mix}"
            f"{', guidance ' + guidance if any(guided_steps) else ''}): {_flops(mean)}")


def _flops(f: float) -> str:
    for unit, s in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= s:
            return f"{f / s:.3g} {unit}"
    return f"{f:.3g} FLOP"
