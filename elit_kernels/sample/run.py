"""``generate``: one sampling run, on one process or as one rank of a torchrun job."""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import time
import warnings
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import _cli, flow
from ..official.loader import _check_arch
from .._types import first_few
from . import options as O
from .files import (LATENT_SCALE, LOCK_NAME, atomic_write, contact_sheet, damaged_samples, finite_npy, holds_run_output,
                    latents_to_uint8, load_vae, lock_folder, npy_size, remove_temporaries, sample_name,
                    samples_on_disk, save_npy, save_png, write_npz)
from .rules import SamplingError, UsageError, plan_batches, sample_labels, sample_noise

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
SAMPLERS = ("euler", "heun")
GUIDANCE = flow.GUIDANCE_MODES


@dataclass
class SampleResult:
    """What ``generate`` did. ``npz`` / ``grid`` are None on ranks other than 0."""
    out: str
    npz: str | None
    grid: str | None
    num_samples: int
    generated: int
    skipped: int
    seconds: float
    images_per_s: float
    labels: list = field(default_factory=list, repr=False)
    budgets: list = field(default_factory=list, repr=False)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    owned: bool = False

    @property
    def on(self) -> bool:
        return self.world > 1


def _init_dist(dev: torch.device) -> _Dist:
    """Join the torchrun process group (WORLD_SIZE > 1): NCCL bound to ``dev`` on CUDA, gloo on the CPU. A group
    already initialised by the caller is used as it is (and left to the caller to destroy)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size())
    raw = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    try:
        world = int(raw)
    except ValueError:
        raise UsageError("WORLD_SIZE", f"expected an int (the process count torchrun sets), got {raw!r}") from None
    if world <= 1:
        return _Dist()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k, "").strip()]
    if missing:
        raise UsageError("WORLD_SIZE", f"{world} asks for a run of {world} processes, but {', '.join(missing)} "
                                       f"{'is' if len(missing) == 1 else 'are'} not set: launch it with torchrun "
                                       "(torchrun --nproc_per_node=N -m elit_kernels.sample ...), or unset WORLD_SIZE "
                                       "for one process")
    if not dist.is_available():
        raise UsageError("WORLD_SIZE", f"{world} asks for a run of {world} processes, but this torch was built "
                                       "without torch.distributed")
    if dev.type == "cuda":
        dist.init_process_group("nccl", device_id=dev)
    else:
        dist.init_process_group("gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), owned=True)


def _local_rank() -> int:
    """torchrun's LOCAL_RANK (0 when unset or empty); UsageError naming LOCAL_RANK when it is not an int >= 0."""
    if why := _cli.local_rank_error():
        raise UsageError("LOCAL_RANK", why.split(": ", 1)[1])
    return _cli.local_rank()


#: the largest run: file names are zero-padded global indices and the .npz holds every image
MAX_SAMPLES = 10_000_000


def generate(checkpoint, out: str, *, num_samples: int = 50_000, classes=None, sampler: str = "euler",
             steps: int = 50, guidance: str = "none", cfg_scale: float = 1.0, guidance_interval=(0.0, 1.0),
             budget=None, latents: int | None = None, budget_mix=None, weak_budget=None, weak_latents=None,
             batch_size: int = 32, seed: int = 0, dtype: str = "float32", backend: str | None = None, device=None,
             vae=None, latents_only: bool = False, graphed: bool | None = None, grid: int = 64,
             weights: str = "ema", arch: dict | None = None, tf32: bool = False, progress: bool = True,
             log=print) -> SampleResult:
    """Sample ``num_samples`` images from ``checkpoint`` into the folder ``out`` (files: docs/sampling.md).

    Arguments (the CLI flags are the same names with dashes):
        checkpoint: an official ELIT-SiT ``train.py`` file, a bare official state_dict (with ``arch``), a file of
            ours (``elit-convert`` / ``save_model``), or an ``ElitDiT`` already built (left unchanged: another
            dtype or device runs on a converted copy; named in config.json by a fingerprint of its weights).
        out: the output folder, a non-empty str or ``os.PathLike`` (None is refused, not a folder named "None").
        classes: None (all ``num_classes``, balanced) or a sequence of int class ids (a list, tuple, range, 1-D
            integer tensor or array; not a str or set); sample i gets ``classes[i % len(classes)]``.
        sampler / steps: ``"euler"`` or ``"heun"`` ODE (``elit_kernels.flow.euler_sample``).
        guidance / cfg_scale / guidance_interval: mode (``none``, ``cfg``, ``autoguidance``, ``ccfg``,
            ``ccfg_two_pass``), the official ``cfg_scale`` (a finite real number, not a bool; λ = cfg_scale − 1;
            > 1 with a guidance mode, 1 without), and the (low, high) times where guidance is on (a pair of reals,
            0 <= low <= high <= 1; not a str). A guidance mode whose interval holds no step's time warns
            (UserWarning naming guidance_interval and the step times) and runs unguided.
        budget / latents / budget_mix: at most one: the official float budget (fraction <= 1 or a count > 1),
            latents per group J, or a mix ``"J:w,J:w"`` / ``[(J, w), ...]`` assigned per sample by index (both
            forms checked alike by ``parse_budget_mix``: int J in 1..J_max, each once, weights finite and > 0).
            None of them: J_max.
        weak_budget / weak_latents: the weak pass of ``autoguidance`` / ``ccfg`` / ``ccfg_two_pass`` (default
            J_max // 16, min 1), at most the conditional budget of every sample (the weak pass is the weaker
            model).
        batch_size: samples per forward on each device; each budget's last batch is filled up to it with that
            budget's next indices past N, computed and not written (``rules.plan_batches``), so that sample i never
            depends on N. seed: the global seed (int >= 0). dtype: float32, bfloat16 or float16, by name or as
            the torch dtype (the model; the ODE state stays float64; float16 on a CPU warns: emulated, many times
            slower). backend: the attention
            backend (None = dispatch, or ``$ELIT_BACKEND``, checked up front: UsageError naming ELIT_BACKEND).
        device: None (``cuda:LOCAL_RANK`` when CUDA is available, else cpu), or a torch device string.
        vae: a local diffusers ``AutoencoderKL`` folder (or the module). latents_only: save latents, no decode.
        graphed: replay the forward from CUDA graphs per budget signature (None = on when the device is CUDA).
        grid: images in the contact sheet (0 = none). weights / arch: as ``official.load_checkpoint``.
        tf32: allow TF32 matmuls on CUDA during the run (the official generate.py's default; ours off).
        progress: a tqdm bar on rank 0. log: a callable taking each of rank 0's lines (default print), or
            None for none. The flags (latents_only, tf32, progress, graphed when not None) are bools: "no" or 1 is
            refused, not read as true.

    Under ``torchrun`` (WORLD_SIZE > 1; without torchrun's RANK, MASTER_ADDR and MASTER_PORT a UsageError
    naming WORLD_SIZE) it joins the process group (NCCL on CUDA, gloo on CPU) unless one is
    already initialised, and shares the canonical batches out across ranks; rank 0 writes the grid and the
    ``.npz``. Samples already in ``out`` are skipped. Raises UsageError (a ValueError naming the argument) for
    bad arguments, before anything is written; SamplingError when a rank fails (files already written are kept).
    """
    a = dict(locals())
    t_start = time.perf_counter()
    for name, lo in (("num_samples", 1), ("steps", 1), ("batch_size", 1), ("seed", 0), ("grid", 0)):
        a[name] = O.check_int(name, a[name], lo)
    if a["steps"] > flow.MAX_STEPS:  # named before the sampler allocates its times [steps + 1]
        raise UsageError("steps", f"at most {flow.MAX_STEPS:,} (flow.MAX_STEPS), got {a['steps']:,}")
    if num_samples > MAX_SAMPLES:  # the index -> file name and seeding scheme, and the .npz, are sized for this
        raise UsageError("num_samples", f"at most {MAX_SAMPLES:,} samples per run, got {num_samples:,}")
    if sampler not in SAMPLERS:
        raise UsageError("sampler", f"expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if guidance not in GUIDANCE:
        raise UsageError("guidance", f"expected one of {', '.join(GUIDANCE)}, got {guidance!r}")
    O.check_real("cfg_scale", cfg_scale, 1, " (the official cfg_scale; 1 = no guidance)")
    if guidance == "none" and cfg_scale != 1:
        raise UsageError("guidance", f"cfg_scale {cfg_scale} needs a guidance mode "
                                      f"({', '.join(m for m in GUIDANCE if m != 'none')})")
    if guidance != "none" and cfg_scale == 1:
        raise UsageError("cfg_scale", f"guidance {guidance} needs cfg_scale > 1 (1 = no guidance)")
    a["guidance_interval"] = O.usage(lambda _, v: flow._check_interval(v), "guidance_interval", guidance_interval)
    if guidance == "none" and a["guidance_interval"] != (0.0, 1.0):
        raise UsageError("guidance_interval", f"{a['guidance_interval']} needs a guidance mode (with guidance none "
                                              "no step is guided and it would be ignored)")
    for name in ("latents_only", "tf32", "progress"):
        a[name] = O.check_bool(name, a[name])
    if graphed is not None:
        a["graphed"] = O.check_bool("graphed", graphed)
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():  # as load_checkpoint takes it
        a["dtype"] = dtype = str(dtype).replace("torch.", "")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UsageError("dtype", f"expected one of float32, bfloat16, float16 (a name or the torch dtype), got "
                                  f"{dtype!r}")
    if log is None:  # no lines at all
        a["log"] = lambda *x, **k: None
    elif not callable(log):
        raise UsageError("log", f"expected a callable taking one line (print, a logger's info) or None for no "
                                f"lines, got {type(log).__name__} ({log!r})")
    if backend is None and (why := _cli.env_backend_error(None, "")):  # the name now; what it can run once loaded
        raise UsageError(_cli.ENV_BACKEND, why.split(": ", 1)[1])
    if latents_only and vae is not None:
        raise UsageError("latents_only", "saves latents without decoding; drop --vae (it would not be used)")
    if not latents_only and vae is None:
        raise UsageError("vae", "no decoder given: pass the local folder of the Stable-Diffusion VAE the checkpoint "
                                "was trained with (diffusers AutoencoderKL, e.g. a download of "
                                "stabilityai/sd-vae-ft-ema), or --latents-only to save latents")
    if classes is not None:
        a["classes"] = O.check_classes(classes)
    if not isinstance(out, (str, os.PathLike)) or not isinstance(os.fspath(out), str) or not os.fspath(out):
        raise UsageError("out", f"expected the output folder as a non-empty str or os.PathLike path, got "
                                f"{type(out).__name__} ({out!r})")
    a["out"] = out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError("out", f"{out} exists and is not a folder")

    dev = O.resolve_device(device, _local_rank())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dd = _init_dist(dev)
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if tf32 and dev.type != "cuda":
        warnings.warn(f"tf32: ignored on {dev.type}: TF32 is a matmul mode of CUDA GPUs", stacklevel=2)
    if DTYPES[dtype] == torch.float16 and dev.type == "cpu":
        warnings.warn(_cli.fp16_cpu_warning(f"dtype {dtype}") + "; prefer bfloat16 or float32", stacklevel=2)
    try:
        if tf32 and dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        return _Run(a, dd, dev, t_start).run()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32
        if dd.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def _duration(seconds: float) -> str:
    """``seconds`` as people read a run's length: "40 s", "12 min", "3.5 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _image_size(vae, cfg, dev) -> tuple[int, int]:
    """(H, W) of the images ``vae`` decodes from this model's latents: for diffusers' own AutoencoderKL from its
    config (it up-samples on every block but the last: 2^(len(block_out_channels) - 1), as diffusers' pipelines
    read it), for any other module (a wrapper passed from Python may decode to another size whatever its config
    says) by decoding one zero latent. A wrong size would make every resume take every PNG for damaged."""
    blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
    if type(vae).__name__ == "AutoencoderKL" and type(vae).__module__.startswith("diffusers.") \
            and isinstance(blocks, (list, tuple)) and blocks:
        side = cfg.input_size * 2 ** (len(blocks) - 1)
        return side, side
    with torch.no_grad():
        z = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size, device=dev)
        return tuple(latents_to_uint8(vae, z).shape[1:3])


class _Run:
    """The steps of ``generate`` after the cheap checks: set up (model, budgets, folder), plan, report, sample,
    write the ``.npz`` and the grid."""

    def __init__(self, a: dict, dd: _Dist, dev: torch.device, t_start: float):
        self.a, self.dd, self.dev, self.t_start = a, dd, dev, t_start
        self.main = dd.rank == 0
        self.say = a["log"] if self.main else (lambda *x, **k: None)

    def run(self) -> SampleResult:
        self.lock = None
        self.wrote_config = False
        self.restore = []  # (module, attribute, value) of a model passed in, put back when the run ends
        try:
            return self._run()
        except KeyboardInterrupt:
            self.discard_if_nothing_written()
            raise
        finally:
            if self.lock is not None:
                self.lock.close()  # releases the folder's run lock
            for obj, attr, value in reversed(self.restore):
                setattr(obj, attr, value)

    def discard_if_nothing_written(self) -> None:
        """Stopped before its first sample in an output folder it created (docs/sampling.md): the files this run
        wrote there go (its config.json, the run lock, the empty sample folder), the lock file while it is still
        held, so that the folder itself is removed (``_cli.remove_empty_created``). Nothing another run wrote:
        only a run that took the lock wrote a config.json, and none did while this one held it."""
        out = self.a["out"]
        if not (self.main and self.wrote_config and _cli.created_here(out)) or holds_run_output(out):
            return
        with contextlib.suppress(OSError):
            os.unlink(self.cfg_path)
            remove_temporaries(self.folder)
            os.rmdir(self.folder)
        if self.lock is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.lock.name)  # held until run() closes it: no other run has it meanwhile

    def _run(self) -> SampleResult:
        self.setup()
        self.plan()
        self.startup_report()
        t0 = time.perf_counter()
        self.sample()
        t_sampling = time.perf_counter() - t0
        npz_path = grid_path = None
        if self.main:
            npz_path, grid_path = self.write_npz_and_grid()
        elapsed = time.perf_counter() - self.t_start
        ips = self.missing / t_sampling if self.missing and t_sampling > 0 else 0.0
        self.say(f"elit-sample: done: {self.missing} new {self.what} ({self.n - self.missing} already on disk) in "
                 f"{t_sampling:.1f} s of sampling, {ips:.2f} {self.what}/s over {self.dd.world} rank(s); total "
                 f"{elapsed:.1f} s" + (f"; wrote {npz_path}" if npz_path else ""))
        return SampleResult(out=self.a["out"], npz=npz_path, grid=grid_path, num_samples=self.n,
                            generated=self.missing, skipped=self.n - self.missing, seconds=elapsed,
                            images_per_s=ips, labels=self.labels, budgets=self.budgets)

    # --- the model, the samples' labels and budgets, the folder
    def setup(self) -> None:
        a, dev = self.a, self.dev
        self.dtype = DTYPES[a["dtype"]]
        model, ckpt_name, ckpt_bytes, ckpt_fp = O.load_model(a["checkpoint"], a["weights"], a["arch"], dev,
                                                             self.dtype, a["backend"])
        if ckpt_bytes is None:  # a module passed in (or its converted copy): eval mode and backend for the run only
            self.restore = [(m, "training", m.training) for m in model.modules()]
            self.restore.append((model, "backend", getattr(model, "backend", None)))
        model.eval()
        cfg = self.cfg = model.cfg
        probe = _cli.model_probe(cfg, dev, self.dtype)
        what = f"this model ({dev.type}, {a['dtype']}, head dim {cfg.head_dim})"
        if a["backend"] is not None:
            err = _cli.backend_error("backend", a["backend"], probe, what)
            if err:
                raise UsageError("backend", err.split(": ", 1)[1])
            model.backend = a["backend"]
        elif err := _cli.env_backend_error(probe, what):  # default dispatch would run it on every call
            raise UsageError(_cli.ENV_BACKEND, err.split(": ", 1)[1])
        if why := O.core_blocks_error(model, a["arch"]):
            if any(k in (a["arch"] or {}) for k in ("encoder_depth", "dit_decoder_depth", "depth")):
                raise UsageError("arch", f"{why}: check the arch values against the model (the released ones: "
                                         "elit_kernels.official.SIT_REGISTRY)")  # likely a wrong tail count
            warnings.warn(f"checkpoint: {why}", stacklevel=3)
        self.model = model
        classes = a["classes"] if a["classes"] is not None else list(range(cfg.num_classes))
        bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, (int, np.integer))
               or not 0 <= c < cfg.num_classes]
        if bad:
            raise UsageError("classes", f"unknown class {bad[0]!r}: this model has classes 0..{cfg.num_classes - 1}")
        self.n = a["num_samples"]
        self.budgets, budget_desc = O.resolve_budgets(cfg, self.n, a["budget"], a["latents"], a["budget_mix"])
        self.budget_at = O.budget_rule(budget_desc)
        self.weak_j = O.resolve_weak(cfg, a["guidance"], a["weak_budget"], a["weak_latents"])
        # every J of a mix, not only those of the first N samples: a run may grow to more samples (docs/sampling.md)
        O.check_weak_budget(self.weak_j, [j for j, _ in budget_desc["mix"]] if "mix" in budget_desc else self.budgets,
                            next((k for k in ("budget", "latents", "budget_mix") if a[k] is not None), None),
                            next((k for k in ("weak_budget", "weak_latents") if a[k] is not None), None))
        self.vae = None
        if not a["latents_only"]:
            self.vae = a["vae"] if isinstance(a["vae"], torch.nn.Module) else load_vae(str(a["vae"]), dev)
            lc = getattr(getattr(self.vae, "config", None), "latent_channels", cfg.in_channels)
            if lc != cfg.in_channels:
                raise UsageError("vae", f"the VAE has {lc} latent channels, the model {cfg.in_channels}")
        sub = "latents" if self.vae is None else "samples"
        outputs = ("config.json", LOCK_NAME) + (("latents.npz",) if self.vae is None else
                                                ("samples.npz",) + (("grid.png",) if a["grid"] else ()))
        O.check_out(a["out"], outputs, (sub,))  # the last check: nothing is created for a bad command
        self.classes = classes
        self.labels = sample_labels(classes, range(self.n))
        self.scale = float(a["cfg_scale"]) - 1.0
        self.mode = a["guidance"] if self.scale > 0 else "none"
        low, high = a["guidance_interval"]
        ts = torch.linspace(1.0, 0.0, a["steps"] + 1, dtype=torch.float64)
        self.guided_steps = [self.mode != "none" and low <= ts[i].item() <= high for i in range(a["steps"])]
        if self.mode != "none" and not any(self.guided_steps):
            times = ", ".join(f"{ts[i].item():.4g}" for i in range(min(a["steps"], 8))) + (
                ", ..." if a["steps"] > 8 else "")
            warnings.warn(f"guidance_interval: ({low:g}, {high:g}) holds none of the {a['steps']} steps' times "
                          f"({times}): guidance {a['guidance']} is never applied and every sample is unguided; widen "
                          "--guidance-interval or take more --steps", stacklevel=3)
        self.shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        self.ext = "npy" if self.vae is None else "png"
        self.what = "latents" if self.vae is None else "images"
        self.folder = os.path.join(a["out"], "latents" if self.vae is None else "samples")
        vae_name = vae_fp = None
        inputs = {"checkpoint": None if ckpt_bytes is None else os.path.realpath(str(a["checkpoint"])), "vae": None}
        if self.vae is not None:
            v = a["vae"]
            vae_name = f"<{type(v).__name__}>" if isinstance(v, torch.nn.Module) else os.path.basename(
                os.path.abspath(str(v)))
            vae_fp = O.module_fingerprint(self.vae)  # a copy of another VAE in a folder of the same name differs
            if not isinstance(v, torch.nn.Module):
                inputs["vae"] = os.path.realpath(str(v))
        self.expected_hw = None if self.vae is None else _image_size(self.vae, cfg, dev)
        self.settings = {
            "checkpoint": ckpt_name, "checkpoint_bytes": ckpt_bytes, "checkpoint_weights": ckpt_fp,
            "weights": a["weights"],
            "arch": _check_arch(a["arch"]) or None,  # NumPy numbers as Python's: config.json is JSON
            "seed": a["seed"], "classes": "all" if a["classes"] is None else [int(c) for c in classes],
            "budgets": budget_desc, "sampler": a["sampler"], "steps": a["steps"], "guidance": a["guidance"],
            "cfg_scale": float(a["cfg_scale"]), "guidance_interval": [low, high], "weak_latents": self.weak_j,
            "dtype": str(self.dtype).replace("torch.", ""), "output": self.ext, "vae": vae_name,
            "vae_weights": vae_fp, "latent_scale": LATENT_SCALE}
        self.inputs = inputs  # where they were read from: recorded in config.json, not compared (files move)
        self.soft = {"batch_size": a["batch_size"], "backend": a["backend"], "tf32": bool(a["tf32"]),
                     "device_type": dev.type}
        self.cfg_path = os.path.join(a["out"], "config.json")
        for note in O.check_earlier_run(self.cfg_path, self.settings, self.soft, holds_run_output(a["out"])):
            self.say(f"elit-sample: note: {note}")
        os.makedirs(self.folder, exist_ok=True)

    # --- what is left, decided by rank 0 and told to every rank
    def plan(self) -> None:
        import torch.distributed as dist

        # each budget's last batch filled up to --batch-size with its next indices past N (computed, not written):
        # a sample's batch does not depend on N, so a run grown to a larger N matches a fresh one bitwise
        self.batches = plan_batches(self.budgets, self.a["batch_size"], self.budget_at)
        msg = [None, None, None]
        if self.main:
            try:
                self.lock = lock_folder(self.a["out"])
            except UsageError as e:
                msg[2] = (e.arg, e.message)  # told to every rank, which all raise it
        if self.main and msg[2] is None:
            try:  # again under the lock: another run may have written samples since setup looked
                O.check_earlier_run(self.cfg_path, self.settings, self.soft, holds_run_output(self.a["out"]))
            except UsageError as e:
                msg[2] = (e.arg, e.message)
        if self.main and msg[2] is None:
            remove_temporaries(self.folder)
            done = samples_on_disk(self.folder, self.ext)
            bad = damaged_samples(self.folder, done, self.ext, npy_size(self.shape, np.float32), self.shape,
                                  self.expected_hw)
            if bad:
                shown = first_few((sample_name(i, self.ext) for i in bad), 5)
                size = "" if self.expected_hw is None else f" or not {self.expected_hw[1]}x{self.expected_hw[0]} RGB"
                self.say(f"elit-sample: note: {len(bad)} sample file(s) in {self.folder} are damaged (empty, "
                         f"truncated, holding NaN or inf{size}, or not written by elit-sample: {shown}); they are "
                         "sampled again")
                for i in bad:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.folder, sample_name(i, self.ext)))
                done -= set(bad)
            self.note_smaller_run()
            todo = [k for k, b in enumerate(self.batches) if not all(i in done for i in b if i < self.n)]
            msg[:2] = [todo, sum(1 for k in todo for i in self.batches[k] if i < self.n and i not in done)]
            if not os.path.isfile(self.cfg_path) or not holds_run_output(self.a["out"]):
                def write(tmp):
                    with open(tmp, "w") as f:
                        json.dump({"format": O.FORMAT, "settings": self.settings, "soft": self.soft,
                                   "inputs": self.inputs}, f, indent=1)
                atomic_write(self.cfg_path, write)
                self.wrote_config = True
        if self.dd.on:
            dist.broadcast_object_list(msg, src=0)
        if msg[2] is not None:
            raise UsageError(*msg[2])
        todo, self.missing = msg[:2]
        self.padding = sum(1 for k in todo for i in self.batches[k] if i >= self.n)  # over every rank
        self.mine = [self.batches[k] for k in todo[self.dd.rank::self.dd.world]]
        self.rounds = math.ceil(len(todo) / self.dd.world)
        self.runner = self.model
        use_graphs = self.a["graphed"] if self.a["graphed"] is not None else self.dev.type == "cuda"
        if use_graphs and self.dev.type != "cuda":
            self.say(f"elit-sample: note: CUDA graphs need a CUDA device; running eagerly on {self.dev.type}")
            use_graphs = False
        if use_graphs:
            from ..models.capture import GraphedForward

            self.runner = GraphedForward(self.model, max_graphs=max(8, 4 * len(set(self.budgets))))
        self.graphs = use_graphs

    def note_smaller_run(self) -> None:
        """A note when the finished run's .npz in ``out`` holds more samples than this run writes: it is replaced by
        the smaller one (the per-sample files of the larger run stay)."""
        path = os.path.join(self.a["out"], "latents.npz" if self.vae is None else "samples.npz")
        try:
            with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
                fmt = np.lib.format
                read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}[fmt.read_magic(f)]
                old = read(f)[0][0]
        except Exception:  # noqa: BLE001 - no .npz, or not one of ours: nothing to say
            return
        if old > self.n:
            self.say(f"elit-sample: note: {path} holds {old} samples; this run replaces it with one of the first "
                     f"--num-samples {self.n} (the per-sample files of all {old} stay in {self.folder}: rerun with "
                     f"--num-samples {old} to get the larger .npz back)")

    def _inputs(self, idx):
        """Noise, labels and budgets of the batch ``idx`` (its padding past N too: by the same rules)."""
        noise = sample_noise(self.a["seed"], idx, self.shape).to(self.dev)
        y = torch.tensor(sample_labels(self.classes, idx), dtype=torch.long, device=self.dev)
        return noise, y, [self.budgets[i] if i < self.n else int(self.budget_at(i, i + 1)[0]) for i in idx]

    # --- start-up lines: the run, the measured forward time, the FLOPs (rank 0)
    def startup_report(self) -> None:
        from ..flow import guided_velocity

        a, mode = self.a, self.mode
        low, high = a["guidance_interval"]
        guided = f"guidance {mode}" + (f" (cfg_scale {a['cfg_scale']}, interval {low}..{high}"
                                       + (f", weak J={self.weak_j}" if self.weak_j is not None else "") + ")"
                                       if mode != "none" else "")
        self.say(f"elit-sample: {self.n} samples ({self.n - self.missing} already in {self.folder}, {self.missing} to "
                 f"do) on {self.dd.world} rank(s) ({self.dev.type}, {a['dtype']}), batch {a['batch_size']} per device, "
                 f"{a['steps']} {a['sampler']} steps, {guided}"
                 + (f"; {self.padding} padding sample(s) past N computed with them, not written, so that every "
                    "batch is full" if self.padding else ""))
        if not (self.main and self.mine):
            return
        noise, y, bud = self._inputs(self.mine[0])
        x, t = noise.to(self.dtype), torch.full((len(bud),), 0.5, device=self.dev)
        m0 = mode if any(self.guided_steps) else "none"
        kw = dict(mode=m0, scale=self.scale, weak_budget=self.weak_j if m0 in flow.WEAK_MODES else None) \
            if m0 != "none" else {}  # what a step of the run does: guidance (where it is on) or one plain pass

        def step():
            with torch.no_grad():
                guided_velocity(self.runner, x, t, y, bud, dtype=torch.float64, **kw)
            if self.dev.type == "cuda":
                torch.cuda.synchronize(self.dev)
        step()  # warm-up: autotune, known-answer checks, graph capture
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        steps = a["steps"]
        evals = steps + (steps - 1 if a["sampler"] == "heun" else 0)  # model evaluations per batch
        self.say(f"elit-sample: forward per step {dt * 1e3:.2f} ms (first batch: {len(bud)} "
                 f"sample{'s' if len(bud) > 1 else ''} at J={bud[0]}{', guided ' + m0 if m0 != 'none' else ''}"
                 f"{', CUDA graphs' if self.graphs else ''}); about {_duration(dt * evals * len(self.mine))} for "
                 f"this rank's {len(self.mine)} batch{'es' if len(self.mine) > 1 else ''} of {evals} "
                 f"evaluation{'s' if evals > 1 else ''} each")
        try:
            self.say("elit-sample: " + O.flops_report(self.model, self.budgets, self.weak_j, m0,
                                                      a["sampler"] == "heun", self.guided_steps, self.dev, self.dtype))
        except Exception as e:  # noqa: BLE001 - the FLOP count is information, never a reason to stop
            self.say(f"elit-sample: FLOPs not counted ({type(e).__name__}: {e})")

    # --- the loop: one canonical batch per round; after each round every rank learns whether one failed
    def sample(self) -> None:
        import torch.distributed as dist

        from ..flow import euler_sample

        a, dd = self.a, self.dd
        bar = None
        if self.main and a["progress"] and self.mine:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(1 for b in self.mine for i in b if i < self.n), unit="img", dynamic_ncols=True,
                       desc="sampling" + (f" (rank 0 of {dd.world})" if dd.on else ""),
                       bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]")
        done_before = 0  # images of the finished batches (the bar moves by fractions of a batch per step)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)  # PNG encoding releases the GIL
        save = save_npy if self.vae is None else save_png
        failure, nonfinite = None, False
        try:
            for r in range(self.rounds):
                if failure is None and r < len(self.mine):
                    idx = self.mine[r]
                    try:
                        noise, y, bud = self._inputs(idx)
                        with torch.no_grad(), warnings.catch_warnings():
                            warnings.simplefilter("ignore", flow.NonFiniteSampleWarning)  # refused below, by index
                            n_real = sum(1 for i in idx if i < self.n)
                            z = euler_sample(self.runner, noise, y, steps=a["steps"], budget=bud, mode=self.mode,
                                             scale=self.scale, weak_budget=self.weak_j,
                                             guidance_interval=a["guidance_interval"], heun=a["sampler"] == "heun",
                                             callback=None if bar is None else
                                             lambda i: bar.update(n_real / a["steps"]))  # per step: a long batch moves
                            z = z.float()
                            # padding past N is never written: its NaN is none of this run's business
                            bad = {k for k in flow.nonfinite_samples(z) if idx[k] < self.n}
                            arrs = z.cpu().numpy() if self.vae is None else latents_to_uint8(self.vae, z)
                        paths = [os.path.join(self.folder, sample_name(i, self.ext)) for i in idx]
                        jobs = [pool.submit(save, arr, p) for k, (arr, p) in enumerate(zip(arrs, paths))
                                if idx[k] < self.n and k not in bad and not os.path.isfile(p)]
                        for j in jobs:
                            j.result()
                        if bad:
                            nonfinite = True
                            raise SamplingError(self.nonfinite_message([idx[k] for k in sorted(bad)],
                                                                       [bud[k] for k in sorted(bad)]))
                        if bar is not None:  # whole images again (the steps' fractions do not add up exactly)
                            done_before += n_real
                            bar.n = done_before
                            bar.refresh()
                    except Exception as e:  # noqa: BLE001 - reported to every rank below
                        real = [i for i in idx if i < self.n]
                        failure = (f"rank {dd.rank} of {dd.world} failed on samples {real[0]}..{real[-1]}: "
                                   f"{type(e).__name__}: {e}")
                if dd.on:
                    flags = torch.zeros(dd.world, device=self.dev if dist.get_backend() == "nccl" else "cpu")
                    flags[dd.rank] = float(failure is not None)
                    dist.all_reduce(flags)
                    failed = [str(k) for k in range(dd.world) if flags[k] > 0]
                    if failed:
                        failure = failure or f"rank(s) {', '.join(failed)} of {dd.world} failed"
                if failure is not None:
                    break
        finally:
            pool.shutdown(wait=True)
            if bar is not None:
                bar.close()
        if failure is not None:
            if nonfinite and not holds_run_output(self.a["out"]):  # nothing finite came out: nothing to resume
                self.discard_if_nothing_written()
                if self.main and self.wrote_config and _cli.created_here(self.a["out"]):
                    with contextlib.suppress(OSError):
                        if self.lock is not None:
                            self.lock.close()
                            self.lock = None
                        os.rmdir(self.a["out"])  # only when empty: the folder this run created
                raise SamplingError(f"{failure}. No sample was written; rerun with the change above")
            if nonfinite:  # the same command would compute the same NaN again
                raise SamplingError(f"{failure}. The finite samples are kept in {self.folder}; rerun with the change "
                                    "above to go on from them")
            raise SamplingError(f"{failure}. The samples written before are kept in {self.folder}; rerun the same "
                                "command to resume")
        if dd.on:
            dist.barrier()  # every file is on disk; only rank 0 goes on (no collective after this)

    def nonfinite_message(self, indices: list[int], budgets: list[int]) -> str:
        """Why samples ``indices`` (run at ``budgets``) came out NaN or inf, and what to change."""
        shown = first_few(f"{i} (J={j})" for i, j in zip(indices, budgets))
        guided = self.mode != "none" and self.scale > 0
        fix = (f"guidance multiplies the difference of two velocities by cfg_scale - 1 = {self.scale:g}, and the "
               f"state outgrew {self.dtype}'s range: a smaller --cfg-scale keeps it finite" if guided else
               f"the model returned NaN or inf in {self.dtype}")
        return (f"sample{'s' if len(indices) > 1 else ''} {shown} came out NaN or inf, so no file was written for "
                f"{'them' if len(indices) > 1 else 'it'}; {fix} (float16 overflows sooner than bfloat16 or "
                "float32: --dtype)")

    # --- rank 0: the .npz (streamed from the files) and the grid
    def write_npz_and_grid(self):
        try:
            return self._write_npz_and_grid()
        except OSError as e:  # a full disk, a quota, a folder gone: the samples are whole on disk, only this is missing
            path = f": {e.filename}" if getattr(e, "filename", None) else ""
            raise SamplingError(f"cannot write the run's .npz / grid.png in {self.a['out']} ({e.strerror or e}{path}): "
                                f"nothing was replaced. Every sample is kept in {self.folder}: free disk "
                                "space (the .npz needs about as much as the sample files) and rerun the same command "
                                "to write it") from None

    def _write_npz_and_grid(self):
        n, folder = self.n, self.folder
        extra = {"labels": np.asarray(self.labels, dtype=np.int64),
                 "budgets": np.asarray(self.budgets, dtype=np.int64)}
        if self.vae is None:
            path = os.path.join(self.a["out"], "latents.npz")
            write_npz(path, (finite_npy(folder, i) for i in range(n)), n, self.shape, np.float32, extra)
            return path, None
        from PIL import Image

        first: list = []

        h, w = self.expected_hw

        def images():
            for i in range(n):
                p = os.path.join(folder, sample_name(i))
                try:
                    with Image.open(p) as im:
                        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
                except OSError as e:  # damaged inside (its signature, IHDR and IEND whole): not a full disk
                    raise SamplingError(f"{p} cannot be read ({e}): not a whole sample, so no .npz was written; "
                                        "delete it and rerun the same command to sample it again") from None
                if arr.shape != (h, w, 3):  # changed after the resume check read it
                    raise SamplingError(f"{p} is a {arr.shape[1]}x{arr.shape[0]} image, expected {w}x{h} (this VAE's): "
                                        "not a sample of this run, so no .npz was written; delete it and rerun the "
                                        "same command to sample it again")
                if i < self.a["grid"]:
                    first.append(arr)
                yield arr
        path = os.path.join(self.a["out"], "samples.npz")
        write_npz(path, images(), n, (h, w, 3), np.uint8, extra)
        grid_path = None
        if first:
            grid_path = os.path.join(self.a["out"], "grid.png")
            save_png(contact_sheet(first), grid_path)
        return path, grid_path
