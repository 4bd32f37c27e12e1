"""Build script for elit-kernels.

Pure-Python install works anywhere torch is installed. The compiled extension ``elit_kernels._C``
(csrc/) is added by ``_extensions()`` when its sources exist. Install with
``pip install --no-build-isolation -e .`` so the build uses the torch already installed instead of
pulling a second copy into an isolated build environment.
"""
from setuptools import find_packages, setup


def _extensions():
    """``elit_kernels._C`` from csrc/: a CUDAExtension when torch has CUDA and nvcc is found, else C++ only.

    Environment: ELIT_SKIP_CUDA_BUILD=1 builds the C++ (CPU) ops only; TORCH_CUDA_ARCH_LIST picks the
    GPU targets (default "8.0;9.0"); MAX_JOBS caps parallel compiler jobs (default: up to 4).
    """
    import glob
    import os
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
            extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    else:
        ext = cpp_extension.CppExtension(
            "elit_kernels._C", sources, include_dirs=[os.path.join(here, "csrc")], extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="elit-kernels",
    version="0.1.0",
    description="Fused varlen attention kernels and a reference model for ELIT diffusion transformers",
    packages=find_packages(include=["elit_kernels", "elit_kernels.*"]),
    package_data={"elit_kernels.attention": ["dispatch_table.json"]},
    python_requires=">=3.10",
    # No upper pins and no triton pin: an installed torch that satisfies this is used as it is.
    install_requires=["torch>=2.5", "tqdm", "matplotlib", "numpy", "safetensors"],
    extras_require={"dev": ["pytest", "pytest-benchmark", "ninja", "pybind11"], "demo": ["scikit-learn"],
                    "integrations": ["transformers>=5,<6", "diffusers>=0.42,<0.43"],
                    "mutation": ["mutmut>=3.3"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": [
        "elit-bench=elit_kernels.bench.cli:main",
        "elit-demo=elit_kernels.demo:main",
        "elit-convert=elit_kernels.official.cli:main",
        "elit-sample=elit_kernels.sample.cli:main",
    ]},
)
