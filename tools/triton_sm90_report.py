"""Static sm_90 report of the GPU kernels, on a machine with no GPU.

Triton: every attention kernel x tile the dispatcher can choose (the heuristic tiles and the autotuner's
candidates after its own pruning, over all length buckets; for the window kernels ``window_*`` of the
``triton_window`` backend, the tile of every key tile 16..128 and query bucket) at head dims 64/72/128, bf16/fp16,
causal or not (the window kernels: not), compiled for sm_90 through each kernel's own JIT warm-up
(``JITFunction.warmup``) with the launch arguments its launcher builds (``fwd_launch`` / ``bwd_launches``, the
window modules' likewise) from realistically strided tensors: q and dO contiguous ``[T, H, D]``, k/v views of one
``[T, 2, H, D]`` projection, H = 16. A fake driver reports an
sm_90 target, so nothing runs; Triton's own ptxas log gives registers and spills.

CUDA: each ``csrc/cuda/*.cu`` compiled with ``nvcc -arch=sm_90 -Xptxas -v`` (setup.py's flags) when nvcc is
on the PATH: registers, spills and static shared memory per kernel.

    python tools/triton_sm90_report.py --json FILE [--md FILE] [--subset ci] [--jobs N] [--no-cuda] [--check]
        [--kernels K,...] [--update]

``--update`` recompiles only the rows of ``--kernels`` / ``--head-dims`` / ``--dtypes`` and replaces them in an
existing ``--json`` report (every other row, and the CUDA rows under ``--no-cuda``, kept), noting the partial run
under ``updates``; ``--md`` is rewritten from the merged report.

Rows (``triton``): kernel, head_dim, dtype, causal, BLOCK_M, BLOCK_N, num_warps, num_stages, registers,
spill_bytes (spill stores), spill_load_bytes, shared_bytes, vectorized_loads (every 16-bit tile load or
``cp.async`` is as wide as its tile allows: 16 bytes whenever a thread holds 8 or more elements, see
``narrow_tile_loads``; a 16x16 tail over 8 warps holds 1 element per thread), padded_head_dim (columns of tensor-core work, BLOCK_D + BLOCK_DT),
global_loads (count per access width in bytes), mma, compile_s. ``--check`` exits 1 when a row spills,
loads below 16 bytes, or pads D=72 past 80 columns, and when no Triton row was compiled (nothing checked); exit 77
means the CUDA backend or ptxas is missing. Argument errors (exit 2: --head-dims, --jobs, an --update file that is
not a report, --no-triton with --no-cuda, an output path that cannot be written) come before any compile.
These are compile-time statistics, not GPU runs.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD_DIMS = (64, 72, 128)
DTYPES = ("bf16", "fp16")
#: every dtype a row may have: the 16-bit ones, and float32 both ways the kernels run it (``_common.dot_precision``):
#: "fp32" on TF32 tensor cores (``torch.set_float32_matmul_precision("high")``), "fp32-ieee" exact on the CUDA
#: cores (PyTorch's default). Opt-in (``--dtypes``): the committed report covers the 16-bit ones.
ALL_DTYPES = {"bf16": ("bfloat16", "tf32"), "fp16": ("float16", "tf32"), "fp32": ("float32", "tf32"),
              "fp32-ieee": ("float32", "ieee")}
#: shared memory one block may use on sm_90 (227 KB, cudaDevAttrMaxSharedMemoryPerBlockOptin on H100 / H200): a
#: kernel compiled for more raises OutOfResources at launch instead of running
SM90_MAX_SHARED = 232448
KERNELS = ("fwd", "dkdv", "dq", "preprocess", "window_fwd", "window_dq", "window_dkdv")
#: window kernel -> its name in ``_tiles.WINDOW_TILES`` / ``attention_window.tile``
WINDOW = {"window_fwd": "fwd", "window_dq": "dq", "window_dkdv": "dkdv"}
UNAVAILABLE = 77  # exit status: no Triton CUDA backend / ptxas here (the CI test skips)
MAX_PADDED_72 = 80
MAX_HEAD_DIM = 256  # the Triton backend's largest head dim (elit_kernels/attention/backends/triton.py)


def _cli():
    """``elit_kernels._cli`` (output checks, atomic writes), importable from the checkout. It imports neither
    triton nor the Triton kernels, so ``_setup_triton`` still sees them first."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from elit_kernels import _cli as cli

    return cli


# ---------------------------------------------------------------------------------------------
# Parsing (pure functions; tests feed them canned logs)
# ---------------------------------------------------------------------------------------------

def parse_ptxas(log: str) -> list[dict]:
    """Per entry function in a ``ptxas -v`` log: name, registers, spill_bytes (stores), spill_load_bytes,
    stack_bytes, smem_bytes (static shared memory; Triton's dynamic shared memory is not in it)."""
    out, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = dict(name=m.group(1), registers=None, spill_bytes=0, spill_load_bytes=0, stack_bytes=0,
                       smem_bytes=0)
            out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack_bytes=int(m.group(1)), spill_bytes=int(m.group(2)), spill_load_bytes=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem_bytes"] = int(s.group(1)) if s else 0
    return out


_LD = re.compile(r"\bld\.global((?:\.[\w:]+)*)\s")
_CP = re.compile(r"\bcp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")
_BITS = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "bf16": 2, "b32": 4, "u32": 4,
         "s32": 4, "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8, "b128": 16}


def global_loads(ptx: str) -> dict[int, int]:
    """Count of global loads per access width in bytes (``ld.global`` and ``cp.async`` global->shared)."""
    widths: dict[int, int] = {}
    for m in _LD.finditer(ptx):
        mods = m.group(1).split(".")
        vec = next((int(x[1:]) for x in mods if re.fullmatch(r"v[248]", x)), 1)
        size = next((_BITS[x] for x in reversed(mods) if x in _BITS), None)
        if size is not None:
            widths[vec * size] = widths.get(vec * size, 0) + 1
    for m in _CP.finditer(ptx):
        size = int(m.group(1), 0)
        widths[size] = widths.get(size, 0) + 1
    return dict(sorted(widths.items()))


_LAYOUT = re.compile(r"^(#blocked\d*) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\].*order = \[([\d, ]+)\]", re.M)
_TILE_LOAD = re.compile(r"\b(tt\.load|ttg\.async_copy_global_to_local)\b[^\n]*?: tensor<(\d+(?:x\d+)+)x!tt\.ptr<(bf16|f16|f32)>, "
                        r"(#blocked\d*)>")


def narrow_tile_loads(ttgir: str, num_warps: int) -> list[str]:
    """Tile loads / async copies of 16-bit or 32-bit elements in the TTGIR whose vector (the layout's elements
    per thread along the contiguous dim) is narrower than the tile allows: ``min(16 bytes / element size,
    elements / threads)``, so 16 bytes whenever a thread holds 8 (16-bit) or 4 (32-bit) elements or more (a
    64x16 bf16 tile over 8 warps allows 4). Empty when every tile load is as wide as its shape permits, i.e.
    Triton proved 16-byte aligned rows. (The fp32 LSE / delta rows are 1-D loads, not tile loads.)"""
    layouts = {m.group(1): ([int(x) for x in m.group(2).split(",")], [int(x) for x in m.group(3).split(",")])
               for m in _LAYOUT.finditer(ttgir)}
    bad = []
    for m in _TILE_LOAD.finditer(ttgir):
        shape = [int(x) for x in m.group(2).split("x")]
        spt, order = layouts[m.group(4)]
        vec = spt[order[0]]
        want = min(4 if m.group(3) == "f32" else 8, shape[order[0]],
                   max(1, (shape[0] * shape[-1] if len(shape) == 2 else shape[0])
                                           // (32 * num_warps)))
        if vec < want:
            bad.append(f"{m.group(1)} {m.group(2)} {m.group(3)}: {vec} elements per access, {want} possible")
    return bad


def mma_kinds(ptx: str) -> list[str]:
    kinds = [k for k, pat in (("wgmma", r"wgmma\.mma_async"), ("mma.sync", r"\bmma\.sync"),
                              ("cp.async", r"\bcp\.async\.c[ag]"), ("tma", r"cp\.async\.bulk\.tensor")) if re.search(pat, ptx)]
    return kinds


#: kernels with no matrix product (no tensor-core instruction expected)
NO_DOT = ("preprocess",)


def violations(rows: list[dict]) -> list[str]:
    """Rows that fail ``--check``: spills, loads narrower than 16 bytes, D=72 padded past 80, more shared memory
    than an sm_90 block has (``SM90_MAX_SHARED``: the launch would raise), an attention kernel without
    tensor-core instructions (``mma.sync`` / ``wgmma``) in its PTX (fp32-ieee rows excepted: exact float32 runs
    on the CUDA cores by design)."""
    bad = []
    for r in rows:
        tag = (f"{r['kernel']} D={r['head_dim']} {r['dtype']} {'causal' if r['causal'] else 'full'} "
               f"{r['BLOCK_M']}x{r['BLOCK_N']} w{r['num_warps']} s{r['num_stages']}")
        if r.get("error"):
            bad.append(f"{tag}: compile error {r['error']}")
            continue
        if r["registers"] is None:
            bad.append(f"{tag}: no ptxas statistics")
        if r["spill_bytes"] or r["spill_load_bytes"]:
            bad.append(f"{tag}: spills {r['spill_bytes']} B stores / {r['spill_load_bytes']} B loads")
        if not r["vectorized_loads"]:
            bad.append(f"{tag}: narrow tile loads {r['narrow_loads']}")
        if r["head_dim"] == 72 and r["padded_head_dim"] > MAX_PADDED_72:
            bad.append(f"{tag}: D=72 padded to {r['padded_head_dim']} columns")
        if (r.get("shared_bytes") or 0) > SM90_MAX_SHARED:
            bad.append(f"{tag}: {r['shared_bytes']} B of shared memory, more than sm_90's {SM90_MAX_SHARED} B per "
                       "block (the launch raises OutOfResources)")
        if (r["kernel"] not in NO_DOT and r["dtype"] != "fp32-ieee"
                and not {"mma.sync", "wgmma"} & set(r.get("mma") or ())):
            bad.append(f"{tag}: no tensor-core instruction (mma.sync / wgmma) in the PTX")
    return bad


# ---------------------------------------------------------------------------------------------
# Triton (fake sm_90 driver)
# ---------------------------------------------------------------------------------------------

_ENV: dict = {}


def _setup_triton() -> None:
    """Point Triton at a fake sm_90 driver and a fresh cache (so ptxas runs and logs every kernel)."""
    if _ENV:
        return
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_sm90_")
    import torch
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    target = GPUTarget("cuda", 90, 32)

    class FakeDriver:
        def get_current_target(self):
            return target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def is_active(self):
            return True

    driver.set_active(FakeDriver())
    knobs.nvidia.dump_ptxas_log = True
    if hasattr(knobs, "compilation") and hasattr(knobs.compilation, "always_compile"):
        knobs.compilation.always_compile = True
    sys.path.insert(0, ROOT)
    from elit_kernels._triton import attention_bwd, attention_fwd, attention_window, attention_window_bwd

    _ENV.update(torch=torch, F=attention_fwd, B=attention_bwd, W=attention_window, WB=attention_window_bwd)


def triton_unavailable() -> str | None:
    """Why sm_90 compiles cannot run here, or None."""
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as e:  # noqa: BLE001
        return f"Triton's CUDA backend is not importable ({type(e).__name__}: {e})"
    try:
        path = get_ptxas().path
    except TypeError:  # older signature: get_ptxas(arch)
        path = get_ptxas(90).path
    except Exception as e:  # noqa: BLE001
        return f"no ptxas ({type(e).__name__}: {e})"
    if not path or not os.path.exists(path):
        return f"no ptxas at {path!r}"
    return None


def _tensors(D: int, dtype: str, H: int = 16, T: int = 4096, S: int = 64):
    torch = _ENV["torch"]
    dt = getattr(torch, ALL_DTYPES[dtype][0])
    q = torch.empty(T, H, D, dtype=dt)
    k, v = torch.empty(T, 2, H, D, dtype=dt).unbind(1)  # as the model's kv projection gives them
    f32 = dict(dtype=torch.float32)
    return dict(q=q, k=k, v=v, out=torch.empty(T, H, D, dtype=dt), dout=torch.empty(T, H, D, dtype=dt),
                lse=torch.empty(H, T, **f32), delta=torch.empty(H, T, **f32), dq=torch.empty(T, H, D, dtype=dt),
                dk=torch.empty(T, H, D, dtype=dt), dv=torch.empty(T, H, D, dtype=dt),
                cu=torch.zeros(S + 1, dtype=torch.int32), max_len=T // S * 2)


def _window_launch(kernel: str, D: int, dtype: str):
    """(JITFunction, args, meta without the tile, grid as a function of the tile) of a window kernel, as
    ``attention_window``'s launchers build them; HEADS as for 4096 Read windows x 16 heads."""
    W, WB = _ENV["W"], _ENV["WB"]
    t = _tensors(D, dtype)
    name = WINDOW[kernel]
    heads = W.heads_per_program(4096, t["k"].shape[1], W._tiles.WINDOW_HEADS[name])
    blocks = dict(BLOCK_M=16, BLOCK_N=16, HEADS=heads)  # the tile itself comes from the job
    if name == "fwd":
        args, meta, grid = W.fwd_launch(t["q"], t["k"], t["v"], t["out"], t["lse"], t["cu"], t["cu"], D ** -0.5, blocks)
        jit = W._window_attn_fwd_kernel
    else:
        launches = WB.bwd_launches(t["dout"], t["q"], t["k"], t["v"], t["out"], t["lse"], t["delta"], t["dq"], t["dk"],
                                  t["dv"], t["cu"], t["cu"], D ** -0.5,
                                  {"dq": blocks, "dkdv": dict(blocks, KEY_TILE=W.MAX_KEYS)})
        args, meta, grid = launches[name]
        jit = {"dq": WB._window_attn_bwd_dq_kernel, "dkdv": WB._window_attn_bwd_dkdv_kernel}[name]
    meta = {k: v for k, v in meta.items() if k not in ("BLOCK_M", "BLOCK_N")}
    return jit, args, meta, lambda m: grid


def _launch(kernel: str, D: int, dtype: str, causal: bool):
    """(JITFunction, args, meta, grid) exactly as the launcher would build them."""
    if kernel in WINDOW:
        return _window_launch(kernel, D, dtype)
    F, B = _ENV["F"], _ENV["B"]
    t = _tensors(D, dtype)
    scale = D ** -0.5
    if kernel == "fwd":
        args, meta, grid = F.fwd_launch(t["q"], t["k"], t["v"], t["out"], t["lse"], t["cu"], t["cu"], t["max_len"],
                                        t["max_len"], scale, causal)
        return F._varlen_attn_fwd_kernel, args, meta, grid
    launches = B.bwd_launches(t["dout"], t["q"], t["k"], t["v"], t["out"], t["lse"], t["delta"], t["dq"], t["dk"],
                              t["dv"], t["cu"], t["cu"], t["max_len"], t["max_len"], scale, causal)
    jit = {"dkdv": B._varlen_attn_bwd_dkdv_kernel, "dq": B._varlen_attn_bwd_dq_kernel,
           "preprocess": B._varlen_attn_bwd_preprocess_kernel}[kernel]
    return (jit, *launches[kernel])


def dispatch_tiles(kernel: str, head_dim: int) -> list[tuple[int, int, int, int]]:
    """Every (BLOCK_M, BLOCK_N, num_warps, num_stages) the launchers can run on a GPU at this head dim: the
    heuristic tile and the autotuner's configs after its own ``early_config_prune``, over all length buckets."""
    _setup_triton()
    F, B = _ENV["F"], _ENV["B"]
    C, T = F.C, F._tiles
    bd, bdt = C.head_blocks(head_dim)
    if kernel == "preprocess":
        return [(B.PRE_BLOCK_T, 0, 4, 3)]  # Triton's default warps / stages (the launcher passes none)
    if kernel in WINDOW:  # the key tile is the whole segment: every key tile x query bucket the launcher sizes
        W = _ENV["W"]
        key_rows = W._tiles.window_key_block if kernel == "window_dkdv" else (lambda bn, padded: bn)
        return sorted({(bm, key_rows(bn, bd + bdt), warps, stages)
                       for bn in (16, 32, 64, 128) for qb in (16, 32, 64, 128)
                       for bm, warps, stages in [W._tiles.window_tile(WINDOW[kernel], qb, bn, bd + bdt)]})
    tuner = {"fwd": F._varlen_attn_fwd_kernel_tuned, "dkdv": B._varlen_attn_bwd_dkdv_kernel_tuned,
             "dq": B._varlen_attn_bwd_dq_kernel_tuned}[kernel]
    buckets = [2 ** i for i in range(4, 15)]
    tiles = set()
    for qb in buckets:
        for kb in buckets:
            tiles.add(T.heuristic(kernel, qb, kb, bd + bdt)[:4])
            named = dict(max_q_bucket=qb, max_k_bucket=kb, HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_DT=bdt)
            for c in tuner.early_config_prune(tuner.configs, named):
                tiles.add((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages))
    return sorted(tiles)


def compile_triton(job: tuple) -> dict:
    """Compile one (kernel, head_dim, dtype, causal, tile) for sm_90 and return its report row."""
    _setup_triton()
    kernel, D, dtype, causal, (bm, bn, warps, stages) = job
    row = dict(kernel=kernel, head_dim=D, dtype=dtype, causal=causal, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
               num_stages=stages)
    jit, args, meta, grid = _launch(kernel, D, dtype, causal)
    if "DOT_PREC" in meta:  # the launcher read torch's float32 setting; the row's dtype says which variant
        meta["DOT_PREC"] = ALL_DTYPES[dtype][1]
    tile = dict(BLOCK_T=bm) if kernel == "preprocess" else dict(BLOCK_M=bm, BLOCK_N=bn)
    buf = io.StringIO()
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(buf):
            compiled = jit.warmup(*args, grid=grid(tile), num_warps=warps, num_stages=stages, **tile, **meta)
    except Exception as e:  # noqa: BLE001
        return dict(row, error=f"{type(e).__name__}: {str(e)[:500]}")
    stats = (parse_ptxas(buf.getvalue()) or [dict(registers=None, spill_bytes=None, spill_load_bytes=None)])[0]
    ptx = compiled.asm["ptx"]
    widths = global_loads(ptx)
    narrow = narrow_tile_loads(compiled.asm["ttgir"], warps)
    return dict(row, registers=stats["registers"], spill_bytes=stats["spill_bytes"],
                spill_load_bytes=stats["spill_load_bytes"], shared_bytes=int(compiled.metadata.shared),
                vectorized_loads=not narrow, narrow_loads=narrow, padded_head_dim=meta["BLOCK_D"] + meta["BLOCK_DT"],
                global_loads={str(k): v for k, v in widths.items()}, mma=mma_kinds(ptx), align=meta["ALIGN"],
                compile_s=round(time.time() - t0, 2))


# A representative subset for CI (2 cores, about a minute): at D=72 every kernel in both orientations with
# its largest tile (most registers), a 16-row tile and the 8-warp wgmma tiles; at D=64 and 128 the largest.
CI_TILES = {"fwd": [(128, 64, 8, 2), (64, 64, 8, 2), (16, 32, 4, 2)], "dkdv": [(16, 128, 8, 2), (32, 64, 8, 2),
                                                                               (16, 32, 4, 2)],
            "dq": [(128, 32, 8, 2), (64, 32, 8, 2), (16, 32, 4, 2)], "preprocess": [(64, 0, 4, 3)],
            # window kernels: Read J = 4 x 64 keys (16-row query tile), Write / J = 64 x 64, the 128-key tiles
            "window_fwd": [(16, 64, 4, 2), (64, 64, 4, 2), (64, 128, 4, 2)],
            "window_dq": [(16, 64, 4, 2), (64, 128, 8, 2)], "window_dkdv": [(16, 64, 8, 2), (16, 128, 8, 2)]}


def triton_jobs(subset: str, kernels=KERNELS, head_dims=HEAD_DIMS, dtypes=DTYPES) -> list[tuple]:
    jobs = []
    for kernel in kernels:
        for D in head_dims:
            tiles = dispatch_tiles(kernel, D)
            for dtype in dtypes:
                if kernel in NO_DOT and dtype == "fp32-ieee":
                    continue  # no matrix product: the fp32 row is the same kernel
                for causal in ((False,) if kernel == "preprocess" or kernel in WINDOW else (False, True)):
                    for tile in tiles:
                        if subset == "ci":
                            ci = [t for t in CI_TILES[kernel] if t in tiles]
                            # fp16 compiles as bf16 does; float32 (opt-in) keeps its own rows
                            if tile not in ci or dtype == "fp16" or (D != 72 and (tile != ci[0] or causal)):
                                continue
                        jobs.append((kernel, D, dtype, causal, tile))
    return jobs


# ---------------------------------------------------------------------------------------------
# CUDA (.cu through nvcc)
# ---------------------------------------------------------------------------------------------

# Kernels whose shared memory is dynamic (``extern __shared__``, sized by a config struct with the same
# template arguments as the kernel): ptxas reports 0 static bytes, so a host probe prints ``Cfg::bytes``.
DYNAMIC_SMEM = {"varlen_attn_fwd_kernel": "FwdCfg", "varlen_attn_bwd_dq_kernel": "DqCfg",
                "varlen_attn_bwd_dkv_kernel": "DkvCfg"}


def _nvcc_flags(arch: str) -> list[str]:
    from torch.utils import cpp_extension
    return ["-O3", "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__", "-DELIT_WITH_CUDA=1",
            "-std=c++17", f"-arch={arch}", "-I", os.path.join(ROOT, "csrc"),
            *[f"-I{p}" for p in cpp_extension.include_paths()]]


def _dynamic_smem(nvcc: str, flags: list[str], src: str, rows: list[dict], tmp: str) -> None:
    """Fill ``dynamic_shared_bytes`` of ``rows`` (one .cu file) from a host program that includes the file."""
    lines = []
    for i, r in enumerate(rows):
        m = re.search(r"(\w+)<([^<>]*)>$", r["kernel"])
        if m and m.group(1) in DYNAMIC_SMEM:
            cfg = f"elit::attn::{DYNAMIC_SMEM[m.group(1)]}<{m.group(2)}>::bytes"
            lines.append(f'  std::printf("{i} %zu\\n", static_cast<size_t>({cfg}));')
    if not lines:
        return
    probe = os.path.join(tmp, "smem_probe.cu")
    with open(probe, "w") as f:
        f.write(f'#include <cstdio>\n#include "{src}"\nint main() {{\n' + "\n".join(lines) + "\n  return 0;\n}\n")
    exe = os.path.join(tmp, "smem_probe")
    p = subprocess.run([nvcc, *flags, probe, "-o", exe], capture_output=True, text=True)
    if p.returncode:
        for r in rows:
            r.setdefault("dynamic_shared_bytes", None)
        return
    for line in subprocess.run([exe], capture_output=True, text=True).stdout.splitlines():
        i, n = line.split()
        rows[int(i)]["dynamic_shared_bytes"] = int(n)


def _short_name(demangled: str) -> str:
    """``void elit::attn::(anonymous namespace)::k<__half, 72, 4, 64>(args...)`` -> ``elit::attn::k<__half, 72, 4, 64>``."""
    name = demangled.replace("(anonymous namespace)::", "")
    return re.sub(r"^void ", "", name.split("(")[0])


def cuda_rows(arch: str = "sm_90", files=None) -> tuple[list[dict], str | None]:
    """``nvcc -arch=sm_90 -Xptxas -v`` over csrc/cuda/*.cu with setup.py's flags: a row per kernel with
    registers, spills, static shared memory (ptxas) and dynamic shared memory (the kernel's launch config)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return [], "nvcc not on the PATH"
    try:
        flags = _nvcc_flags(arch)
    except Exception as e:  # noqa: BLE001
        return [], f"torch include paths unavailable ({e})"
    demangle = shutil.which("cu++filt") or shutil.which("c++filt")
    src_dir = os.path.join(ROOT, "csrc", "cuda")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in files or sorted(f for f in os.listdir(src_dir) if f.endswith(".cu")):
            t0 = time.time()
            src = os.path.join(src_dir, name)
            p = subprocess.run([nvcc, *flags, "-Xptxas", "-v", "-c", src, "-o", os.path.join(tmp, name + ".o")],
                               capture_output=True, text=True)
            if p.returncode:
                out.append(dict(file=name, error=p.stderr[-2000:]))
                continue
            entries = parse_ptxas(p.stdout + p.stderr)
            names = [e["name"] for e in entries]
            if demangle and names:
                names = subprocess.run([demangle], input="\n".join(names), capture_output=True,
                                       text=True).stdout.splitlines()
            rows = [dict(file=name, kernel=_short_name(pretty), mangled=e["name"], registers=e["registers"],
                         spill_bytes=e["spill_bytes"], spill_load_bytes=e["spill_load_bytes"],
                         stack_bytes=e["stack_bytes"], shared_bytes=e["smem_bytes"], dynamic_shared_bytes=0)
                    for e, pretty in zip(entries, names)]
            _dynamic_smem(nvcc, flags, src, rows, tmp)
            out += rows
            print(f"nvcc {name}: {len(rows)} kernels, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return out, None


# ---------------------------------------------------------------------------------------------

def _git_commit() -> str | None:
    """HEAD, with ``+dirty`` when the kernels or this tool differ from it."""
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "elit_kernels/_triton", "csrc", "tools"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001
        return None


def merge_reports(old: dict, new: dict, replaced: set, cuda_rerun: bool) -> dict:
    """``old`` with its Triton rows of every (kernel, head_dim, dtype) in ``replaced`` swapped for ``new``'s rows
    (the rest kept, in order), the CUDA rows replaced only when ``cuda_rerun``; the partial run is appended to
    ``updates`` (what it recompiled, its commit, date and Triton version)."""
    kept = [r for r in old.get("triton", []) if (r.get("kernel"), r.get("head_dim"), r.get("dtype")) not in replaced]
    merged = dict(old, triton=kept + new["triton"])
    if cuda_rerun:
        merged["cuda"], merged["cuda_skipped"] = new.get("cuda"), new.get("cuda_skipped")
    merged["updates"] = list(old.get("updates", [])) + [dict(
        rows=sorted(f"{k} D={d} {dt}" for k, d, dt in replaced), commit=new["commit"], date=new["date"],
        triton_version=new["triton_version"], triton_seconds=new["triton_seconds"])]
    return merged


def markdown(report: dict) -> str:
    """The report as a short markdown page: per Triton kernel x head dim, the worst tile; then the CUDA kernels."""
    out = [f"# Static sm_90 report ({report['date']}, commit {report['commit']}, Triton {report['triton_version']})", "",
           f"{report['note']}; `python tools/triton_sm90_report.py --json FILE --md FILE` on a machine without a GPU.",
           f"Target: {report['target']}. Violations: {len(report['violations'])}.", "",
           *[line for u in report.get("updates", []) for line in (
               f"Updated {u['date']} (commit {u['commit']}, Triton {u['triton_version']}): the rows of "
               f"{', '.join(sorted({r.split()[0] for r in u['rows']}))} recompiled, the others as above.", "")],
           "## Triton: worst tile per kernel, head dim and dtype (causal or not)", "",
           "| kernel | D | dtype | tiles | max registers | max spill bytes | max shared bytes | all loads vectorized | "
           "padded D |", "|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in report["triton"]:  # the 16-bit types compile alike: one line for both
        dt = "bf16/fp16" if r.get("dtype") in ("bf16", "fp16") else str(r.get("dtype"))
        groups.setdefault((r.get("kernel"), r.get("head_dim"), dt), []).append(r)
    for (kernel, d, dt), rs in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0, kv[0][2])):
        ok = [r for r in rs if "error" not in r]
        mx = (lambda k: max((r.get(k) or 0) for r in ok) if ok else "-")
        vec = all(r.get("vectorized_loads") for r in ok) if ok else "-"
        pad = sorted({r.get("padded_head_dim") for r in ok})
        errs = len(rs) - len(ok)
        out.append(f"| {kernel} | {d} | {dt} | {len(rs)}{f' ({errs} failed)' if errs else ''} | {mx('registers')} | "
                   f"{mx('spill_bytes')} | {mx('shared_bytes')} | {vec} | {', '.join(map(str, pad))} |")
    if report.get("cuda"):
        out += ["", "## CUDA (`nvcc -arch=sm_90 -Xptxas -v`)", "",
                "| file | kernel | registers | spill bytes | static shared bytes | dynamic shared bytes |", "|---|---|---|---|---|---|"]
        for r in report["cuda"]:
            if "error" in r:
                out.append(f"| {r['file']} | compile error | | | | |")
            else:
                out.append(f"| {r['file']} | `{r['kernel']}` | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | "
                           f"{r.get('dynamic_shared_bytes')} |")
    elif report.get("cuda_skipped"):
        out += ["", f"CUDA part skipped: {report['cuda_skipped']}."]
    if report["violations"]:
        out += ["", "## Violations", ""] + [f"- {v}" for v in report["violations"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="output file")
    ap.add_argument("--md", help="also write a markdown summary here")
    ap.add_argument("--subset", choices=("all", "ci"), default="all")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    ap.add_argument("--dtypes", default=",".join(DTYPES),
                    help=f"comma-separated, from {', '.join(ALL_DTYPES)} (default: {','.join(DTYPES)})")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    ap.add_argument("--no-cuda", action="store_true", help="skip the nvcc report of csrc/cuda/*.cu")
    ap.add_argument("--no-triton", action="store_true", help="only the nvcc report of csrc/cuda/*.cu")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 on a spill, a narrow load, D=72 padded past 80, more shared memory than sm_90 has "
                         "or no tensor-core instruction")
    ap.add_argument("--update", action="store_true",
                    help="replace only the rows of this run's kernels / head dims / dtypes in the existing --json "
                         "report (other rows kept; CUDA rows kept under --no-cuda)")
    a = ap.parse_args(argv)
    # every argument checked here, before the first compile (a run takes minutes)
    unknown = sorted(set(a.kernels.split(",")) - set(KERNELS))
    if unknown:
        ap.error(f"--kernels: unknown {', '.join(unknown)}; choose from {', '.join(KERNELS)}")
    unknown = sorted(set(a.dtypes.split(",")) - set(ALL_DTYPES))
    if unknown:
        ap.error(f"--dtypes: unknown {', '.join(unknown)}; choose from {', '.join(ALL_DTYPES)}")
    try:
        head_dims = [int(d) for d in a.head_dims.split(",")]
    except ValueError:
        ap.error(f"--head-dims: expected a comma list of integers, got {a.head_dims!r}")
    if any(not 1 <= d <= MAX_HEAD_DIM for d in head_dims):
        ap.error(f"--head-dims: each head dim must be in 1..{MAX_HEAD_DIM} (the Triton backend's range), "
                 f"got {a.head_dims}")
    if a.jobs < 1:
        ap.error(f"--jobs: expected a positive integer, got {a.jobs}")
    if a.no_triton and a.no_cuda:
        ap.error("--no-triton: with --no-cuda nothing would be compiled")
    if a.check and a.no_triton and not a.update:
        ap.error("--check: checks the Triton rows, and --no-triton compiles none (nothing would be checked)")
    cli = _cli()
    for flag, path in (("--json", a.json), ("--md", a.md)):
        if path is not None and (why := cli.output_file_error(path)):
            ap.error(f"{flag}: {why}")
    old = None
    if a.update:
        try:
            with open(a.json) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            ap.error(f"--update: cannot read the existing report {a.json} ({e})")
        if not isinstance(old, dict) or not isinstance(old.get("triton", []), list) or not all(
                isinstance(r, dict) for r in old.get("triton", [])):
            ap.error(f"--update: {a.json} is not a report of this tool (expected a JSON object whose 'triton' is a "
                     f"list of rows, got {type(old).__name__})")

    why = triton_unavailable()
    if why:
        print(f"unavailable: {why}", file=sys.stderr)
        return UNAVAILABLE
    _setup_triton()
    import triton
    jobs = [] if a.no_triton else triton_jobs(a.subset, a.kernels.split(","), head_dims, a.dtypes.split(","))
    print(f"{len(jobs)} Triton compiles for sm_90 (Triton {triton.__version__})", file=sys.stderr, flush=True)
    t0 = time.time()
    rows = []
    if a.jobs > 1:
        import concurrent.futures as cf
        import multiprocessing as mp
        with cf.ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn")) as ex:
            rows = list(ex.map(compile_triton, jobs))
    else:
        for i, job in enumerate(jobs):
            rows.append(compile_triton(job))
            r = rows[-1]
            print(f"[{i + 1}/{len(jobs)}] {job[0]} D={job[1]} {job[2]} causal={job[3]} {job[4]}: "
                  f"regs={r.get('registers')} spill={r.get('spill_bytes')} smem={r.get('shared_bytes')} "
                  f"vec={r.get('vectorized_loads')} {r.get('error', '')}", file=sys.stderr, flush=True)
    report = dict(triton_version=triton.__version__, target="cuda sm_90 (fake driver, compile only)",
                  commit=_git_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  note="compile-time statistics from ptxas, not GPU runs", triton_seconds=round(time.time() - t0, 1),
                  triton=rows)
    if not a.no_cuda:
        report["cuda"], report["cuda_skipped"] = cuda_rows()
    if old is not None:
        report = merge_reports(old, report, {(j[0], j[1], j[2]) for j in jobs}, cuda_rerun=not a.no_cuda)
    bad = violations(report["triton"])
    report["violations"] = bad

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)

    def write_md(tmp):
        with open(tmp, "w") as f:
            f.write(markdown(report))
    try:  # each file whole or not at all (a report being updated is never left half-written)
        cli.write_output(a.json, write_json)
        if a.md:
            cli.write_output(a.md, write_md)
    except cli.OutputWriteError as e:
        print(f"triton_sm90_report.py: error: {e}", file=sys.stderr)
        return 1
    print(f"{len(rows)} rows, {len(bad)} violations -> {a.json}", file=sys.stderr)
    for b in bad:
        print("  " + b, file=sys.stderr)
    if a.check and not report["triton"]:
        print("--check: nothing was compiled (no Triton row for these --kernels / --head-dims / --dtypes / "
              "--subset), so nothing was checked", file=sys.stderr)
        return 1
    return 1 if (a.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
