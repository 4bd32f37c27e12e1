"""What every command-line tool of the package shares: path flags read as the shell would have read them."""
import os

import pytest

from elit_kernels.bench.cli import build_parser as bench_parser
from elit_kernels.demo import build_parser as demo_parser
from elit_kernels.official.cli import build_parser as convert_parser
from elit_kernels.sample.cli import build_parser as sample_parser

# (parser, arguments that make it parse, the path destinations to look at)
CLIS = {
    "elit-sample": (sample_parser, ["CKPT", "--out", "O", "--vae", "V", "--class-file", "C"],
                    ("checkpoint", "out", "vae", "class_file")),
    "elit-convert": (convert_parser, ["CKPT", "--out", "O"], ("checkpoint", "out")),
    "elit-demo": (demo_parser, ["--out", "O", "--save", "S", "--load", "L"], ("out", "save", "load")),
    "elit-bench": (bench_parser, ["--out", "O", "--replot", "R"], ("out", "replot")),
}


@pytest.mark.parametrize("tool", sorted(CLIS))
@pytest.mark.parametrize("form", ["--flag=~/x", "--flag ~/x"])
def test_path_flags_expand_a_leading_tilde(tool, form, monkeypatch, tmp_path):
    # `--out=~/x` reaches argparse unexpanded (the shell expands ~ only at the start of a word): it must mean the
    # home folder, not create a folder named "~" in the working directory
    monkeypatch.setenv("HOME", str(tmp_path))
    build, argv, dests = CLIS[tool]
    parser = build()
    flags = {a.dest: (a.option_strings[0] if a.option_strings else None) for a in parser._actions}
    for dest in dests:
        args = list(argv)
        flag = flags[dest]
        if flag is None:  # the positional checkpoint
            args[0] = "~/x"
        else:
            i = args.index(flag)
            del args[i:i + 2]
            args += [f"{flag}=~/x"] if form == "--flag=~/x" else [flag, "~/x"]
        got = getattr(parser.parse_args(args), dest)
        assert got == os.path.join(str(tmp_path), "x"), (tool, dest, got)
    plain = parser.parse_args(argv)
    assert all(getattr(plain, d) == argv[argv.index(flags[d]) + 1] if flags[d] else getattr(plain, d) == argv[0]
               for d in dests)  # other paths untouched


# (main, the function its work runs in, arguments that pass the flag checks, what the line says is kept)
def _interruptible(tool, tmp_path):
    import elit_kernels.bench.cli as bench
    import elit_kernels.demo as demo
    import elit_kernels.official.cli as convert
    import elit_kernels.sample.cli as sample

    ck = tmp_path / "ck.pt"
    ck.write_bytes(b"x")
    return {"elit-sample": (sample, "generate", [str(ck), "--out", str(tmp_path / "o")], "no sample was written yet: "
                            "rerun the same command to start"),
            "elit-convert": (convert, "load_checkpoint", [str(ck), "--out", str(tmp_path / "c.pt")],
                             "was not written (it is written whole or not at all)"),
            "elit-demo": (demo, "_run", ["--out", str(tmp_path / "d")], "rerun to get them"),
            "elit-bench": (bench, "resolve", [], "nothing was written")}[tool]


@pytest.mark.parametrize("tool", sorted(CLIS))
def test_ctrl_c_is_one_line_and_status_130(tool, tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt anywhere in a run: exit status 130 (as a shell reports SIGINT) and one line saying
    what is kept, not a traceback from wherever the interpreter was."""
    module, where, argv, kept = _interruptible(tool, tmp_path)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, where, interrupted)
    assert module.main(argv) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"{tool}: interrupted; ") and kept in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # no empty output folder left behind


def test_an_interrupted_run_removes_only_the_empty_folders_it_created(tmp_path):
    """``remove_empty_created``: the folders ``output_dir_error`` made (parents too), deepest first, and only while
    empty; a folder that was there before, or that holds a file, stays."""
    from elit_kernels import _cli

    before = tmp_path / "was_here"
    before.mkdir()
    _cli._CREATED.clear()
    assert _cli.output_dir_error(str(before / "a" / "b")) is None
    assert _cli.output_dir_error(str(tmp_path / "c" / "d")) is None
    (tmp_path / "c" / "d" / "result.json").write_text("{}")
    _cli.remove_empty_created()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "c", "c/d", "c/d/result.json", "was_here"]
    assert _cli._CREATED == []


def test_sigint_during_sampling_keeps_the_samples_and_a_rerun_resumes(tmp_path):
    """A real SIGINT to a running elit-sample: status 130, the one line, the finished samples on disk, and the
    same command run again completes the rest (the resume reads the files)."""
    import signal
    import subprocess
    import sys
    import time

    from elit_kernels.models import ElitDiT, elit_config, save_model

    ck = save_model(str(tmp_path / "m.safetensors"), ElitDiT(elit_config("tiny", 64)))
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "elit_kernels.sample", ck, "--out", str(out), "--num-samples", "48", "--batch-size",
           "2", "--steps", "40", "--latents-only", "--no-progress", "--backend", "torch"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and \
            len(list((out / "latents").glob("*.npy")) if (out / "latents").is_dir() else []) < 2:
        time.sleep(0.1)
    assert p.poll() is None, "the run ended before it could be interrupted: " + p.communicate()[1]
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == (f"elit-sample: interrupted; the samples written so far are kept in {out}: "
                                            "rerun the same command to resume") and "Traceback" not in err, err
    kept = len(list((out / "latents").glob("*.npy")))
    assert 2 <= kept < 48
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{48 - kept} new latents ({kept} already on disk)" in r.stdout + r.stderr, r.stdout + r.stderr


def test_console_scripts_go_through_the_launcher_that_imports_no_torch():
    """The installed ``elit-*`` scripts start in ``elit_kernels_cli``, which imports no torch itself (so a Ctrl-C
    while torch imports is handled), and each runs its CLI's ``main``."""
    import importlib
    import importlib.metadata
    import subprocess
    import sys

    import elit_kernels_cli as launcher

    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")
               if e.dist is not None and e.dist.name == "elit-kernels"}
    assert sorted(scripts) == sorted(CLIS) == sorted(launcher.TARGETS), scripts
    for name, value in scripts.items():
        module, func = value.split(":")
        assert module == "elit_kernels_cli", value
        assert callable(importlib.import_module(launcher.TARGETS[name]).main), name
        assert getattr(launcher, func).__code__.co_consts.count(name) == 1, (name, func)  # launches its own CLI
    code = "import sys, elit_kernels_cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'elit_kernels')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.parametrize("when", ["import", "main"])
def test_ctrl_c_while_a_script_starts_is_one_line_and_status_130(when, tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt while the CLI's module imports (torch: seconds) or before its ``main`` handles one
    itself: status 130 and one line, as later in the run."""
    import signal
    import sys

    import elit_kernels_cli as launcher

    body = "raise KeyboardInterrupt\n" if when == "import" else "def main():\n    raise KeyboardInterrupt\n"
    (tmp_path / "slow_cli_for_test.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(launcher.TARGETS, "elit-bench", "slow_cli_for_test")
    monkeypatch.delitem(sys.modules, "slow_cli_for_test", raising=False)
    assert launcher.bench() == 130
    assert capsys.readouterr().err == "elit-bench: interrupted while starting; nothing was written\n"
    (tmp_path / "ok_cli_for_test.py").write_text("def main():\n    return 7\n")
    monkeypatch.setitem(launcher.TARGETS, "elit-bench", "ok_cli_for_test")
    handler = signal.getsignal(signal.SIGINT)
    assert launcher.bench() == 7  # otherwise main's status, as it is
    assert signal.getsignal(signal.SIGINT) is handler  # the import's SIGINT handler is put back


def test_ctrl_c_between_the_start_up_guard_and_main_is_the_one_line(tmp_path, monkeypatch, capsys):
    """The guard is lifted (Python's handler back) before ``main`` runs its own: a KeyboardInterrupt landing right
    there is still the one line and status 130, not a traceback (a hostile review found the window)."""
    import sys

    import elit_kernels_cli as launcher

    (tmp_path / "ok_cli_for_test.py").write_text("def main():\n    return 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(launcher.TARGETS, "elit-bench", "ok_cli_for_test")
    monkeypatch.delitem(sys.modules, "ok_cli_for_test", raising=False)
    real = launcher.end_start

    def end_start_then_interrupt():
        real()
        raise KeyboardInterrupt  # a Ctrl-C the moment Python's handler is back, before main's own handler

    monkeypatch.setattr(launcher, "end_start", end_start_then_interrupt)
    assert launcher.bench() == 130
    assert capsys.readouterr().err == "elit-bench: interrupted while starting; nothing was written\n"


SWALLOWING_IMPORT = """import os, signal
try:  # an import that swallows whatever is raised inside it, as torch's C initialisation does with numpy's import
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(10000):
        pass
except BaseException:
    pass
def main():
    print("ran on after the interrupt")
    return 0
"""


def _sigint_as_at_a_terminal():
    """``preexec_fn``: SIGINT at its default in the child, as a terminal starts a command. A test process started
    with SIGINT ignored (a background job of a non-interactive shell) passes the ignore on, and Python then leaves
    it ignored: the tests that check Ctrl-C handling would test the wrong start."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sigint", ["default", "ignored", "stdout closed", "stderr closed"])
def test_sigint_inside_an_import_that_swallows_exceptions_still_stops_the_start(sigint, tmp_path):
    """A Ctrl-C while the CLI's module imports must not raise inside that import: a library that catches it (torch's
    C initialisation clears any error from importing numpy) would go on half-initialised (the flaky failure this
    replaces: every case then failed with a RecursionError). It ends the process with the one line and status 130;
    an ignored SIGINT (nohup) stays ignored, and the handler is Python's own again once the import is done. A closed
    stdout does not lose the line; with stderr closed it goes nowhere (never into stdout's data)."""
    import subprocess
    import sys

    (tmp_path / "swallow_cli_for_test.py").write_text(SWALLOWING_IMPORT)
    ignore = "signal.signal(signal.SIGINT, signal.SIG_IGN); " if sigint == "ignored" else ""
    code = ("import signal, sys, elit_kernels_cli as launcher; " + ignore +
            "launcher.TARGETS['elit-bench'] = 'swallow_cli_for_test'; status = launcher.bench(); "
            "print('handler restored:', signal.getsignal(signal.SIGINT) is signal.SIG_IGN); sys.exit(status)")
    closed = {"stdout closed": 1, "stderr closed": 2}.get(sigint)

    def start():  # the child starts with Python's own SIGINT handling even where pytest runs with it ignored
        _sigint_as_at_a_terminal()  # (a background job of a non-interactive shell: a new user's run failed here)
        if closed is not None:
            os.close(closed)

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                           [str(tmp_path), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))])},
                       preexec_fn=start)
    if sigint == "stdout closed":
        assert (r.returncode, r.stderr) == (130, "elit-bench: interrupted while starting; nothing was written\n"), r
    elif sigint == "stderr closed":
        assert (r.returncode, r.stdout) == (130, ""), r
    elif sigint == "default":
        assert (r.returncode, r.stdout, r.stderr) == (
            130, "", "elit-bench: interrupted while starting; nothing was written\n"), r
    else:
        assert (r.returncode, r.stdout, r.stderr) == (0, "ran on after the interrupt\nhandler restored: True\n", ""), r


@pytest.mark.parametrize("how", ["console script", "python -m"])
def test_real_sigint_while_elit_bench_imports_torch(how, tmp_path):
    """A real Ctrl-C half a second after ``elit-bench`` starts (while it imports torch, or later if this machine
    imports it faster): status 130 and one line, no traceback, and no run going on half-initialised. The console
    script pip installed beside this interpreter (not a version manager's shim, a shell script that would defer
    the signal), or ``python -m elit_kernels.bench``, in a session of its own that gets SIGINT as a terminal's
    process group does."""
    import signal
    import subprocess
    import sys
    import time

    exe = os.path.join(os.path.dirname(sys.executable), "elit-bench")
    if how == "console script" and not os.path.isfile(exe):
        pytest.skip(f"no elit-bench console script beside {sys.executable} (package not installed with pip)")
    cmd = [exe] if how == "console script" else [sys.executable, "-m", "elit_kernels.bench"]
    p = subprocess.Popen(cmd + ["--out", str(tmp_path / "b")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.5)
    os.killpg(p.pid, signal.SIGINT)
    try:
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("elit-bench: interrupted"), err


def test_python_m_runs_are_guarded_from_the_package_import_until_main():
    """``python -m elit_kernels.<tool>`` imports the package (and torch) before its ``__main__``: the package starts
    the start-up guard itself when ``sys.argv[0]`` is ``-m`` and the module is a CLI's, and each ``__main__`` ends it
    (``run_started``) before its ``main`` runs, so a Ctrl-C during sampling is ``main``'s to handle again."""
    import subprocess
    import sys

    import elit_kernels_cli as launcher

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for module, prog in launcher.MODULE_RUNS.items():
        assert launcher.module_run_prog(["python", "-u", "-m", module, "--out", "x"]) == prog
        path = os.path.join(root, *module.split("."))
        source = open(path + ".py" if os.path.isfile(path + ".py") else os.path.join(path, "__main__.py")).read()
        assert source.count(f'elit_kernels_cli.run_started("{prog}", main)') == 1, module
    for argv in (["python", "-X", "importtime", "-melit_kernels.sample"], ["python", "-m", "elit_kernels.sample"],
                 ["python", "-um", "elit_kernels.sample"], ["python", "-uBmelit_kernels.sample"],
                 ["python", "-uW", "ignore", "-m", "elit_kernels.sample"], ["python", "-m", "elit_kernels.sample.__main__"],
                 ["python", "--check-hash-based-pycs", "never", "-m", "elit_kernels.sample"]):
        assert launcher.module_run_prog(argv) == "elit-sample", argv
    for argv in (["python", "-m", "elit_kernels.models"], ["python", "-m", "pytest", "-m", "elit_kernels.bench"],
                 ["python", "run.py", "-m", "elit_kernels.bench"], ["python", "-c", "pass", "-m", "elit_kernels.bench"],
                 ["python", "-uc", "pass"], ["python", "-", "-m", "elit_kernels.bench"], ["python", "-m"], ["python"],
                 ["python", "-m", "elit_kernels.bench.cli"]):
        assert launcher.module_run_prog(argv) is None, argv
    code = ("import signal, sys; sys.argv[0] = '-m'; sys.orig_argv = [sys.executable, '-m', 'elit_kernels.bench']; "
            "import elit_kernels, elit_kernels_cli as launcher; "
            "print(type(signal.getsignal(signal.SIGINT)).__name__, signal.getsignal(signal.SIGINT).prog); "
            "print(launcher.run_started('elit-bench', lambda: 5), signal.getsignal(signal.SIGINT) is "
            "signal.default_int_handler)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       preexec_fn=_sigint_as_at_a_terminal)
    assert (r.returncode, r.stdout) == (0, "_EndStart elit-bench\n5 True\n"), r
    r = subprocess.run([sys.executable, "-c", "import signal, elit_kernels; print(signal.getsignal(signal.SIGINT) is "
                        "signal.default_int_handler)"], capture_output=True, text=True, timeout=120,
                       preexec_fn=_sigint_as_at_a_terminal)
    assert (r.returncode, r.stdout) == (0, "True\n"), r  # a plain import changes nothing


def test_a_bad_environment_switch_is_one_usage_line_not_an_import_traceback():
    """ELIT_TUNE=bogus (any switch _env reads at import, ELIT_TRITON_AUTOTUNE included) gave every console script,
    even --help, a full import traceback with status 1 (a fuzz): one line naming the variable, status 2."""
    import subprocess
    import sys

    for var, value in (("ELIT_TUNE", "bogus"), ("ELIT_TRITON_AUTOTUNE", "2")):
        r = subprocess.run([sys.executable, "-c", "import sys, elit_kernels_cli as l; sys.exit(l.bench())", "--help"],
                           capture_output=True, text=True, timeout=120, env={**os.environ, var: value},
                           preexec_fn=_sigint_as_at_a_terminal)
        assert r.returncode == 2 and r.stdout == "", r
        assert r.stderr.startswith(f"elit-bench: error: ${var}: expected 1/true/yes/on or 0/false/no/off") \
            and r.stderr.count("\n") == 1, r


def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch):
    """TRITON_INTERPRET=true makes triton interpret; the package called the triton backend unavailable (it read
    only "1"). One reader for every part (_env.triton_interpreted), and the unavailable reason shows a value it
    reads as off."""
    import torch

    from elit_kernels._env import triton_interpreted
    from elit_kernels.attention import get_backend
    from elit_kernels.attention.registry import unavailable_reason

    for value, on in (("1", True), ("true", True), ("ON", True), ("y", True), ("0", False), ("2", False),
                      (" 1", False), ("", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert triton_interpreted() is on, value
    if torch.cuda.is_available():
        print("a CUDA device is present: the triton backend's CPU availability is not what is checked here")
        return
    monkeypatch.setenv("TRITON_INTERPRET", "off")
    why = unavailable_reason(get_backend("triton"))
    assert why is not None and ("TRITON_INTERPRET is 'off', which triton reads as off" in why
                                or "triton is not installed" in why), why
