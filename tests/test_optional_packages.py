"""Every documented install passes the test command: what an optional package enables skips, naming it.

The CPU-only install (torch's CPU build + ``pip install -e ".[dev,demo]"``) has no triton and no
``[integrations]`` extra (transformers, diffusers); an install without a compiler has no ``elit_kernels._C``.
CI has all of them, so here a part of the suite runs in a child pytest with those packages hidden
(``tests/hide_optional/sitecustomize.py``: ``sys.modules[name] = None``, inherited by every Python process the
child starts, such as the README blocks and ``tools/gpu_check.sh``). It must pass, and each skip caused by a
hidden package must say what to install. The selection is the tests that touch those packages directly, kept
to well under a minute; the whole suite runs the same way by hand::

    ELIT_HIDE_MODULES=triton,transformers,diffusers PYTHONPATH=tests/hide_optional python -m pytest -q -rs tests
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIDE_DIR = ROOT / "tests" / "hide_optional"

# install -> (hidden modules, test selection, skip reasons that must appear)
INSTALLS = {
    "cpu-only": (["triton", "transformers", "diffusers"],
                 ["tests/test_integrations.py", "tests/test_triton_attention.py", "tests/test_triton_window.py",
                  "tests/test_backends.py",
                  "tests/test_gpu_check.py", "tests/test_docs.py",
                  "-k", "not test_docstring_examples and not (test_python_block_runs_standalone and not needs)"],
                 ['`pip install --no-build-isolation -e ".[integrations]"`', "triton is not installed (pip install triton"]),
    "no-compiler": (["triton", "transformers", "diffusers", "elit_kernels._C"],
                    ["tests/test_cext.py", "tests/test_backends.py"],
                    ["elit_kernels._C is not built", "pip install --no-build-isolation -e ."]),
}


def run_hidden(hidden: list[str], args: list[str]) -> subprocess.CompletedProcess:
    """``python -m pytest -q -rs ARGS`` from the repository root with ``hidden`` modules made unimportable."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ELIT_REQUIRE_EXTENSION")}
    env["ELIT_HIDE_MODULES"] = ",".join(hidden)
    env["PYTHONPATH"] = os.pathsep.join([str(HIDE_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)


def test_hiding_makes_a_package_look_uninstalled():
    code = ("import importlib.util, sys\n"
            "try:\n    import json\nexcept ImportError as e:\n    print('ImportError', type(e).__name__)\n"
            "print(importlib.util.find_spec('json'), 'csv' in sys.modules and sys.modules['csv'] is None)\n")
    env = {**os.environ, "ELIT_HIDE_MODULES": "json, csv", "PYTHONPATH": str(HIDE_DIR)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ImportError", "ModuleNotFoundError", "None", "True"], r.stdout
    # and a child of that child too (the README blocks and gpu_check.sh run in their own interpreters)
    nested = f"import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', {code!r}]).returncode)"
    r2 = subprocess.run([sys.executable, "-c", nested], env=env, capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0 and r2.stdout == r.stdout, (r2.stdout, r2.stderr)


@pytest.mark.parametrize("install", list(INSTALLS))
def test_suite_passes_with_clean_skips_when_optional_packages_are_absent(install):
    hidden, args, must_say = INSTALLS[install]
    r = run_hidden(hidden, args)
    out = r.stdout + r.stderr
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert r.returncode == 0, f"{install}: the suite fails without {hidden}:\n{out[-6000:]}"
    assert re.search(r"\d+ passed", tail) and re.search(r"\d+ skipped", tail), tail
    assert not re.search(r"\d+ (failed|errors?)\b", tail), tail
    skips = re.findall(r"^SKIPPED \[\d+\] (\S+?):\d+: (.*)$", r.stdout, re.M)
    assert skips, r.stdout[-3000:]
    # every skip caused by a hidden package names it and how to install it
    names = [h.rpartition(".")[2] if h.startswith("elit_kernels.") else h for h in hidden]
    for path, why in skips:
        if any(re.search(rf"\b{re.escape(n)}\b", why) for n in names):
            assert "pip install" in why, (path, why)
    said = " ".join(why for _, why in skips)
    for text in must_say:
        assert text in said, (text, sorted({w for _, w in skips}))
