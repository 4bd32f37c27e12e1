"""Build script for elit-kernels.

Pure-Python install works anywhere torch is installed. The compiled extension ``elit_kernels._C``
(csrc/) is added by ``_extensions()`` when its sources exist. Install with
``pip install --no-build-isolation -e .`` so the build uses the torch already installed instead of
pulling a second copy into an isolated build environment.
"""
import os
import subprocess
import sys

from setuptools import find_packages, setup


def _shared_libstdcxx() -> list[str]:
    """The shared libstdc++ this process (which has imported torch) runs on, as a link input for _C.

    Some compilers find only a static libstdc++ (a toolchain whose own runtime is not installed next to it,
    as /opt/gcc on the GPU machines here): _C then carries a private copy of the C++ runtime, and since a
    shared object binds its own symbols first, its stream and locale code runs on torch's locale objects
    and crashes the process (SIGSEGV) the first time a check formats a number into its error message.
    Naming the shared library torch already uses, after the objects, makes the linker take every C++
    runtime symbol from it. Empty where /proc/self/maps does not exist (not Linux).
    """
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libstdc++.so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.isfile(p))[:1]


_ERROR_PATH_PROBE = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("elit_kernels._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
q, cu = torch.zeros(2, 1, 8), torch.tensor([0, 2], dtype=torch.int32)
try:
    mod.checks.varlen_attn_fwd(q, q, q, cu, cu, -5, 2, 1.0, False, cuda=False)
except RuntimeError as e:
    sys.exit(0 if "got -5" in str(e) else f"unexpected message: {e}")
sys.exit("no error raised for max_seqlen_q = -5")
"""


def _check_error_path(path: str) -> None:
    """Load the freshly built _C in a child process and make one of its checks fail: a build whose error
    path crashes (see _shared_libstdcxx) fails here, not in the user's process."""
    r = subprocess.run([sys.executable, "-c", _ERROR_PATH_PROBE, path], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(
            f"elit-kernels: the built extension {path} does not raise its argument errors cleanly (the probe "
            f"exited with {r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}). An exit code of -11 "
            "(SIGSEGV) means it was linked with a second, static copy of the C++ runtime: build with a compiler "
            "that links libstdc++ dynamically (e.g. CXX=g++ CC=gcc from the system).")


def _extensions():
    """``elit_kernels._C`` from csrc/: a CUDAExtension when torch has CUDA and nvcc is found, else C++ only.

    Environment: ELIT_SKIP_CUDA_BUILD=1 builds the C++ (CPU) ops only; TORCH_CUDA_ARCH_LIST picks the
    GPU targets (default "8.0;9.0"); MAX_JOBS caps parallel compiler jobs (default: up to 4).
    """
    import glob
    import shutil

    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.isdir(os.path.join(here, "csrc")):
        return [], {}
    # nvcc on the PATH may be a wrapper script outside the toolkit (/usr/local/bin/nvcc); torch would
    # then take its parent as CUDA_HOME and miss the headers. Point CUDA_HOME at a real toolkit.
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        nvcc = shutil.which("nvcc")
        cands = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
        cands.append("/usr/local/cuda")
        for c in cands:
            if os.path.exists(os.path.join(c, "include", "cuda_runtime.h")) and os.path.exists(os.path.join(c, "bin", "nvcc")):
                os.environ["CUDA_HOME"] = c
                break
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        raise RuntimeError(
            "elit-kernels: building the compiled extension elit_kernels._C needs torch importable at build time "
            f"({e}). Install torch first, then run `pip install --no-build-isolation -e .` (without "
            "--no-build-isolation pip would build against a second copy of torch).") from e

    os.environ.setdefault("MAX_JOBS", str(max(1, min(4, os.cpu_count() or 1))))
    skip_cuda = os.environ.get("ELIT_SKIP_CUDA_BUILD", "0") not in ("", "0", "false", "False")
    with_cuda = (not skip_cuda) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # Stringified in C++ (ELIT_STR): no quotes, so the value survives ninja's shell.
    defines = [f"-DELIT_BUILD_TORCH_VERSION={torch.__version__}"]
    cxx = ["-O3"] + defines
    link = _shared_libstdcxx()
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # Kernels (*.cu) include no ATen header, so nvcc's per-arch passes stay cheap; their ATen glue is
        # csrc/cuda/*.cpp, compiled once by the host compiler.
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        defines.append("-DELIT_WITH_CUDA=1")
        cxx.append("-DELIT_WITH_CUDA=1")
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
                "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                "-U__CUDA_NO_HALF2_OPERATORS__"] + defines
        ext = cpp_extension.CUDAExtension(
            "elit_kernels._C", sources, include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    else:
        ext = cpp_extension.CppExtension(
            "elit_kernels._C", sources, include_dirs=[os.path.join(here, "csrc")], extra_compile_args={"cxx": cxx},
            extra_link_args=link)

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        def run(self):
            super().run()
            for e in self.extensions:
                _check_error_path(self.get_ext_fullpath(e.name))

    return [ext], {"build_ext": BuildExt}


ext_modules, cmdclass = _extensions()

setup(
    name="elit-kernels",
    version="0.1.0",
    description="Fused varlen attention kernels and a reference model for ELIT diffusion transformers",
    packages=find_packages(include=["elit_kernels", "elit_kernels.*"]),
    py_modules=["elit_kernels_cli"],  # the console scripts' launcher: imports no torch before a Ctrl-C can be handled
    package_data={"elit_kernels.attention": ["dispatch_table.json"]},
    python_requires=">=3.10",
    # No upper pins and no triton pin: an installed torch that satisfies this is used as it is.
    install_requires=["torch>=2.10", "tqdm", "matplotlib", "numpy", "safetensors"],
    extras_require={"dev": ["pytest", "pytest-benchmark", "ninja", "pybind11"], "demo": ["scikit-learn"],
                    # the versions tests/test_integrations.py runs against (requirements.txt pins the same)
                    "integrations": ["transformers==5.24.0", "diffusers==0.42.1"],
                    "mutation": ["mutmut>=3.3"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": [
        "elit-bench=elit_kernels_cli:bench",
        "elit-demo=elit_kernels_cli:demo",
        "elit-convert=elit_kernels_cli:convert",
        "elit-sample=elit_kernels_cli:sample",
    ]},
)
