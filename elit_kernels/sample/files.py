"""The files of a sampling run: atomic per-sample writes, the streamed ``.npz``, the contact sheet, the VAE."""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import socket
import time
import zipfile

import numpy as np
import torch

from .._files import atomic_write
from .rules import SamplingError, UsageError

LATENT_SCALE = 0.18215  # SD-VAE latent scale of the released checkpoints: decode z / 0.18215 (SiT/REPA generate.py)
_NAME = re.compile(r"^(\d{6,})\.(png|npy)$")


def sample_name(index: int, ext: str = "png") -> str:
    """``000123.png``: the file of sample ``index`` (6 digits, more past 999,999)."""
    return f"{index:06d}.{ext}"


def save_png(arr: np.ndarray, path: str) -> None:
    """uint8 [H, W, 3] -> an RGB PNG at ``path``, atomically."""
    from PIL import Image

    atomic_write(path, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))


def save_npy(arr: np.ndarray, path: str) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, arr)
    atomic_write(path, write)


def write_npz(path: str, items, n: int, shape: tuple, dtype, extra: dict) -> None:
    """An uncompressed ``.npz`` like ``np.savez(path, arr_0=..., **extra)``, with ``arr_0`` [n, *shape] streamed
    from ``items`` (one array per sample) so memory holds one sample at a time. Written atomically; raises
    SamplingError when ``items`` does not hold n arrays of ``shape``."""
    dt = np.dtype(dtype)

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False, "shape": (n, *shape)})
                count = 0
                for a in items:
                    a = np.ascontiguousarray(a, dtype=dt)
                    if a.shape != tuple(shape):
                        raise SamplingError(f"sample {count}: shape {a.shape}, expected {tuple(shape)}")
                    f.write(a.tobytes())
                    count += 1
                if count != n:
                    raise SamplingError(f"{path}: {count} samples, expected {n}")
            for k, v in extra.items():
                with zf.open(f"{k}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(v), allow_pickle=False)
    atomic_write(path, write)


def contact_sheet(images: list, columns: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3] images -> one grid image, row-major, ceil(sqrt(n)) columns by default, 2-pixel gutters."""
    n = len(images)
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = images[0].shape[:2]
    g = 2
    sheet = np.zeros((rows * h + (rows - 1) * g, cols * w + (cols - 1) * g, 3), np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        sheet[r * (h + g):r * (h + g) + h, c * (w + g):c * (w + g) + w] = im
    return sheet


def latents_to_uint8(vae, z: torch.Tensor) -> np.ndarray:
    """Decode latents [B, C, h, w] as the released checkpoints' sampling code does: ``vae.decode(z / 0.18215)``,
    ``x -> clamp(255·(x + 1)/2, 0, 255)`` truncated to uint8. Returns [B, H, W, 3] uint8 (HWC, the ADM layout)."""
    p = next(vae.parameters())
    img = vae.decode(z.to(device=p.device, dtype=p.dtype) / LATENT_SCALE).sample
    img = torch.clamp(255.0 * (img.float() + 1) / 2, 0, 255)
    return img.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def load_vae(folder: str, device):
    """``diffusers.AutoencoderKL.from_pretrained(folder, local_files_only=True)`` in fp32 on ``device`` (eval).
    Raises UsageError naming ``vae`` when the folder or diffusers is missing; nothing is downloaded."""
    what = ("the local folder of the Stable-Diffusion VAE the checkpoint was trained with (a diffusers "
            "AutoencoderKL folder: config.json + diffusion_pytorch_model.safetensors, e.g. a download of "
            "stabilityai/sd-vae-ft-ema or stabilityai/sd-vae-ft-mse), or --latents-only to save latents instead")
    if os.path.isfile(folder):
        raise UsageError("vae", f"{folder} is a file; expected the folder that holds it"
                                + (f" ({os.path.dirname(folder) or '.'})" if os.path.basename(folder) == "config.json"
                                   else "") + f": pass {what}")
    if not os.path.isdir(folder):
        raise UsageError("vae", f"no such folder: {folder}; pass {what}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UsageError("vae", f"{folder} has no config.json, so it is not a diffusers model folder; pass {what}")
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise UsageError("vae", f"decoding needs diffusers ({e}): install the [integrations] extra (pip install "
                                "-e \".[integrations]\" in this repository, the diffusers version the tests run), or "
                                "use --latents-only") from None
    try:
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32,
                                            low_cpu_mem_usage=False)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad --vae folder
        first = str(e).splitlines()[0] if str(e) else ""
        raise UsageError("vae", f"{folder} could not be loaded as an AutoencoderKL ({type(e).__name__}: {first}); "
                                f"pass {what}") from None
    return vae.to(device).eval()


#: what a run leaves in its output folder besides the per-sample files (rank 0's last step)
RUN_OUTPUTS = ("latents.npz", "samples.npz", "grid.png")


def holds_run_output(out: str) -> bool:
    """Whether the output folder ``out`` holds anything a run produced: a sample file (``latents/NNNNNN.npy``,
    ``samples/NNNNNN.png``) or a run's ``.npz`` / grid (the per-sample files may have been deleted after a run
    finished): then its config.json describes it and is never replaced."""
    return (any(os.path.isfile(os.path.join(out, name)) for name in RUN_OUTPUTS)
            or any(samples_on_disk(os.path.join(out, sub), ext) for sub, ext in (("latents", "npy"),
                                                                                ("samples", "png"))))


def samples_on_disk(folder: str, ext: str) -> set[int]:
    """Indices whose file (``NNNNNN.ext``, a regular file) exists in ``folder``."""
    if not os.path.isdir(folder):
        return set()
    out = set()
    for e in os.scandir(folder):
        m = _NAME.match(e.name)
        if m and m.group(2) == ext and e.is_file():
            out.add(int(m.group(1)))
    return out


_PNG_HEAD = b"\x89PNG\r\n\x1a\n"
_PNG_TAIL = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with


def npy_size(shape: tuple, dtype) -> int:
    """Bytes of the ``.npy`` file ``save_npy`` writes for one array of ``shape`` and ``dtype`` (fixed: NumPy pads
    the header to a fixed multiple)."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype=dtype))
    return buf.tell()


def _whole_npy(path: str, size: int, npy_bytes: int | None, shape: tuple | None) -> bool:
    """A ``.npy`` as ``save_npy`` writes it: ``npy_bytes`` long; with ``shape``, also a float32 array of that shape
    whose every value is finite (read whole: elit-sample never writes a NaN or inf sample, so such a file came from
    outside, and it would put garbage into the .npz)."""
    if size != npy_bytes:
        return False
    if shape is None:
        return True
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return a.dtype == np.float32 and a.shape == tuple(shape) and bool(np.isfinite(a).all())


def damaged_samples(folder: str, indices, ext: str, npy_bytes: int | None = None,
                    shape: tuple | None = None, image_hw: tuple | None = None) -> list[int]:
    """Of ``indices`` (samples whose file exists), those whose file is not one this tool writes whole: a ``.npy``
    of another size than ``npy_bytes`` or (given ``shape``) not a finite float32 array of ``shape`` (NaN or inf
    in it: read whole), a ``.png`` without the PNG signature or the final IEND chunk (a zero-byte, truncated or
    foreign file) or (given ``image_hw``, the (H, W) this run's VAE decodes to) not an 8-bit RGB image of that
    size (its IHDR chunk: a valid image of another run or program).
    Every file is written by an atomic rename and a non-finite sample is never written, so only
    damage from outside (a full disk on a copy, a crash of the file system, another program) makes one; a few bytes
    read per PNG."""
    bad = []
    for i in sorted(indices):
        path = os.path.join(folder, sample_name(i, ext))
        try:
            size = os.path.getsize(path)
            if ext == "npy":
                ok = _whole_npy(path, size, npy_bytes, shape)
            else:
                with open(path, "rb") as f:
                    head = f.read(len(_PNG_HEAD) + 18)  # the signature, then the IHDR chunk's length, type, W, H, ...
                    f.seek(max(0, size - len(_PNG_TAIL)))
                    ok = size >= len(_PNG_HEAD) + len(_PNG_TAIL) and head[:8] == _PNG_HEAD and f.read() == _PNG_TAIL
                if ok and image_hw is not None:  # what save_png writes: 8-bit RGB (colour type 2), not interlaced
                    ok = (len(head) == 26 and head[12:16] == b"IHDR" and head[24:26] == b"\x08\x02"
                          and (int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big"))
                          == tuple(image_hw))
        except OSError:
            ok = False
        if not ok:
            bad.append(i)
    return bad


def finite_npy(folder: str, index: int) -> np.ndarray:
    """Sample ``index``'s ``.npy`` for the ``.npz``; SamplingError naming the file when it holds NaN or inf (a file
    damaged after the run checked it: the .npz never takes a non-finite sample; rerunning resamples it)."""
    path = os.path.join(folder, sample_name(index, "npy"))
    a = np.load(path, allow_pickle=False)
    if not np.isfinite(a).all():
        raise SamplingError(f"{path} holds NaN or inf, so no .npz was written (elit-sample never writes such a file: "
                            "damage from outside?); rerun the same command to sample it again")
    return a


LOCK_NAME = ".elit-sample.lock"


def lock_folder(folder: str):
    """Take ``folder``'s run lock (an exclusive ``fcntl.flock`` on ``folder/.elit-sample.lock``) for this process and
    return the open lock file: the lock lasts until it is closed or the process ends, however it ends (no stale
    lock after a crash). Raises UsageError naming ``out`` when another run holds it, with what that run wrote
    (pid, host, start time). Two runs in one folder would delete each other's temporary files and write the same
    samples twice. Returns None where ``fcntl`` does not exist (not POSIX): no lock there."""
    try:
        import fcntl
    except ImportError:
        return None
    path = os.path.join(folder, LOCK_NAME)
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "holder unknown"
        f.close()
        raise UsageError("out", f"{os.path.dirname(path) or '.'} is being written by another elit-sample run "
                                f"({holder}); wait for it to finish or use another --out folder (two runs in one "
                                "folder would overwrite each other's files)") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def remove_temporaries(folder: str) -> None:
    """Delete the hidden ``.*.tmp`` files an interrupted run left behind."""
    if os.path.isdir(folder):
        for e in os.scandir(folder):
            if e.name.startswith(".") and e.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
