"""Round 41 of the hostile-user findings on the tools and bench scripts, each with the test that failed before its
fix:

1. F1: ``tools/gpu_summary.py`` is NOT OK without test results (no junit_gpu.xml, one it cannot parse, one that is
   not junit) or with a nonzero ``--exit-code``, and says why (``test_summary_is_not_ok_without_test_results``,
   ``test_summary_is_not_ok_when_the_script_failed``; ``test_summary_is_ok_with_passing_results``: the OK path);
2. F2: one malformed input (stages.tsv, ops.json, elementwise.json, model.json, the sampling results, the dispatch
   report, env.txt, collected.txt) is "could not read X: reason" in summary.json, and everything else is still
   written (``test_one_malformed_input_is_recorded_and_the_rest_kept``); null values and rows without some keys
   are taken as they are (``test_rows_with_nulls_or_missing_keys_are_summarised``); a missing --out folder is
   created (``test_a_missing_out_folder_is_created``);
3. F5: bench_ops / bench_elementwise refuse an --out whose output file is a folder before any timing
   (``test_bench_ops_checks_its_output_files_before_timing``, ``test_bench_elementwise_checks_its_output_file``),
   and write whole or not at all (``test_bench_ops_writes_whole_or_not_at_all``); triton_sm90_report checks
   --json / --md before it compiles (``test_sm90_report_checks_its_output_files_first``);
4. F6: 0 given to --batch / --repeats / --resolution is refused naming the flag, not replaced by the default
   (``test_bench_ops_refuses_zero``, ``test_bench_elementwise_refuses_zero``);
5. F7: bench_ops --max-seconds must be finite and > 0 (``test_bench_ops_max_seconds_is_checked``);
6. F8: bench_ops --slack-only with --no-slack is refused (``test_bench_ops_refuses_slack_only_with_no_slack``),
   and a run with nothing to time writes nothing (``test_bench_ops_with_nothing_to_time_writes_nothing``);
7. F9: --device that is not a device, or not cpu / cuda (meta), is a usage error in both bench scripts
   (``test_bench_devices_are_checked``);
8. F14: triton_sm90_report's argument errors come before any compile (--head-dims not integers or out of range,
   --jobs < 1, an --update file that is not a report, --no-triton with --no-cuda, --check with --no-triton)
   (``test_sm90_report_argument_errors_come_first``), and --check with nothing compiled fails saying so
   (``test_sm90_report_check_with_nothing_compiled_fails``);
9. F15: ``tools/mutation.py --list MODULE`` lists only those modules, unknown names are refused with --list and
   --report, and --report refuses module names (it rewrites the whole report)
   (``test_mutation_list_and_report_honour_module_names``).

No test here compiles a kernel or starts a mutation run: the compile and run entry points are replaced by
functions that fail the test when reached.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
from cases import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]


_load = load_script


# ------------------------------------------------------------------------------------------------------------------
# tools/gpu_summary.py (F1, F2)
# ------------------------------------------------------------------------------------------------------------------

JUNIT_PASS = ('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="1">'
              '<testcase classname="tests.test_cext" name="test_a" time="0.1"/></testsuite></testsuites>')


def summarize(tmp_path, *extra, out="o", work="w"):
    o, w = tmp_path / out, tmp_path / work
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_summary.py"), "--out", str(o), "--work", str(w),
                        *extra], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    s = json.loads((o / "summary.json").read_text())
    return s, r.stdout


def good_inputs(tmp_path, junit=JUNIT_PASS):
    o, w = tmp_path / "o", tmp_path / "w"
    o.mkdir(exist_ok=True)
    w.mkdir(exist_ok=True)
    if junit is not None:
        (o / "junit_gpu.xml").write_text(junit)
    (w / "stages.tsv").write_text("build\tskipped:no CUDA device\t0\ntests: gpu\t0\t12\n")
    (w / "env.txt").write_text("gpu none\n")
    (w / "collected.txt").write_text("tests/test_cext.py::test_a\n")
    (o / "ops.json").write_text(json.dumps({"rows": [
        {"shape": "core", "pass": "fwd", "method": "elit:triton", "tflops": 100.0},
        {"shape": "core", "pass": "fwd", "method": "sdpa", "tflops": 200.0}]}))
    (w / "elementwise").mkdir(exist_ok=True)
    (w / "elementwise" / "elementwise.json").write_text(json.dumps({"rows": [
        {"op": "gated_residual", "impl": "native", "ms": 1.0, "gbps": 10.0, "pct_peak_bw": None}]}))
    model = {"rows": [{"scenario": "uniform", "model": "elit", "preset": "p", "backend": "b", "budget": 4,
                       "case": "dense", "latency_ms": 1.0},
                      {"scenario": "uniform", "model": "official", "preset": "p", "backend": "b", "budget": 4,
                       "case": "dense", "latency_ms": 2.0}]}
    (o / "model.json").write_text(json.dumps(model))
    (w / "sampling").mkdir(exist_ok=True)
    (w / "sampling" / "results.json").write_text(json.dumps(model))
    (o / "dispatch_report.md").write_text("| shape | x |\n|---|---|\n| core | 1 |\nPer-call host time 3 us\n")
    return o, w


def test_summary_is_ok_with_passing_results(tmp_path):
    good_inputs(tmp_path)
    s, out = summarize(tmp_path, "--exit-code", "0")
    assert s["ok"] is True and s["problems"] == [] and s["why_not_ok"] == []
    assert s["ops"]["best"]["core fwd"]["best"] == "sdpa" and s["model"]["ratios"][0]["value"] == 0.5
    assert s["dispatch"]["rows"] == ["| core | 1 |"] and s["elementwise"]["gated_residual"]["native"]["gbps"] == 10.0
    assert out.strip().splitlines()[-1].startswith("summary: OK")


@pytest.mark.parametrize("junit, why", [(None, "no test results"), ("garbage<", "could not read"),
                                        ("<html/>", "not a junit"), ("", "could not read")])
def test_summary_is_not_ok_without_test_results(tmp_path, junit, why):
    good_inputs(tmp_path, junit=junit)
    s, out = summarize(tmp_path)
    assert s["ok"] is False, s
    assert any(why in w and "junit_gpu.xml" in w for w in s["why_not_ok"]), s["why_not_ok"]
    last = out.strip().splitlines()[-1]
    assert last.startswith("summary: NOT OK") and "junit_gpu.xml" in last, last
    # the rest is still there
    assert s["ops"]["best"]["core fwd"]["best"] == "sdpa" and s["stages"][1]["stage"] == "tests: gpu"


def test_summary_is_not_ok_when_the_script_failed(tmp_path):
    good_inputs(tmp_path)
    s, out = summarize(tmp_path, "--exit-code", "1")
    assert s["ok"] is False and any("exit status 1" in w for w in s["why_not_ok"]), s
    assert "exit status 1" in out.strip().splitlines()[-1]
    # nothing at all: no junit, no stages
    s, out = summarize(tmp_path, "--exit-code", "1", out="o2", work="w2")
    assert s["ok"] is False and len(s["why_not_ok"]) >= 2, s


BAD_INPUTS = {  # what to break -> (relative path under tmp_path, content)
    "stages: secs": ("w/stages.tsv", "build\tskipped:x\t0\ntests: gpu\t0\tabc\n"),
    "stages: fields": ("w/stages.tsv", "build\t0\n"),
    "ops: truncated": ("o/ops.json", '{"rows": [{"shape": "core", "pass": "fw'),
    "ops: a list": ("o/ops.json", "[]"),
    "ops: rows not a list": ("o/ops.json", '{"rows": 3}'),
    "elementwise: not json": ("w/elementwise/elementwise.json", "\x00\x01"),
    "model: a string": ("o/model.json", '"x"'),
    "model: bad breakdown": ("o/model.json", '{"rows": [], "metadata": {"breakdown": [{"preset": 1}]}}'),
    "sampling: rows of ints": ("w/sampling/results.json", '{"rows": [1, 2]}'),
    "dispatch: a folder": ("o/dispatch_report.md", None),
    "env: a folder": ("w/env.txt", None),
    "collected: a folder": ("w/collected.txt", None),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_one_malformed_input_is_recorded_and_the_rest_kept(tmp_path, case):
    good_inputs(tmp_path)
    rel, content = BAD_INPUTS[case]
    path = tmp_path / rel
    if content is None:
        path.unlink()
        path.mkdir()
    else:
        path.write_text(content)
    s, out = summarize(tmp_path)
    assert any(p.startswith(f"could not read {path}") for p in s["problems"]), s["problems"]
    assert s["ok"] is False and any(f"could not read {path}" in w for w in s["why_not_ok"])
    assert f"could not read {path}" in out
    # what was readable is all there
    assert s["tests"]["gpu"]["by_backend"] == {"cuda": {"passed": 1, "failed": 0, "skipped": 0}}
    sections = {"ops": "core fwd", "elementwise": "gated_residual", "model": "ratios", "sampling": "ratios"}
    for key, inner in sections.items():
        if not rel.endswith({"ops": "ops.json", "elementwise": "elementwise.json", "model": "model.json",
                             "sampling": "sampling/results.json"}[key]):
            got = s[key].get("best", s[key]) if key == "ops" else s[key]
            assert inner in got, (key, s[key])
    if not rel.endswith("dispatch_report.md"):
        assert s["dispatch"]["rows"] == ["| core | 1 |"]


def test_rows_with_nulls_or_missing_keys_are_summarised(tmp_path):
    o, w = good_inputs(tmp_path)
    (w / "elementwise" / "elementwise.json").write_text(json.dumps({"rows": [
        {"op": "x", "impl": "native", "ms": 1.0, "gbps": None}]}))
    (o / "model.json").write_text(json.dumps({"rows": [{"scenario": "uniform"}]}))
    (o / "ops.json").write_text(json.dumps({"rows": [{"shape": "core", "pass": "fwd", "method": "m", "tflops": 0.01}]}))
    s, _ = summarize(tmp_path)
    assert s["elementwise"]["x"]["native"] == {"ms": 1.0, "gbps": None, "pct_peak_bw": None}
    assert s["model"]["ratios"] == [] and s["ops"]["best"]["core fwd"]["tflops"] == 0.0
    assert s["problems"] == [] and s["ok"] is True


def test_a_missing_out_folder_is_created(tmp_path):
    s, out = summarize(tmp_path, out="not/yet")
    assert (tmp_path / "not" / "yet" / "summary.json").is_file() and s["ok"] is False
    assert "NOT OK" in out.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------------------------
# benchmarks/bench_ops.py, benchmarks/bench_elementwise.py (F5-F9)
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench_ops():
    return _load("benchmarks/bench_ops.py", "bench_ops_r41")


def run_bench_ops(argv, patch: str = ""):
    """bench_ops.main(argv) in a fresh interpreter without TRITON_INTERPRET (tests/conftest.py sets it here, and the
    default dispatch would then time the Triton kernels under the interpreter: minutes), after running ``patch``
    (Python, with the module as ``B``)."""
    code = (f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('B', {str(ROOT / 'benchmarks' / 'bench_ops.py')!r}); "
            "B = importlib.util.module_from_spec(spec); spec.loader.exec_module(B)\n"
            f"{patch}\nsys.exit(B.main({argv!r}))")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ELIT_BACKEND")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def bench_ew():
    return _load("benchmarks/bench_elementwise.py", "bench_elementwise_r41")


TINY_OPS = ["--device", "cpu", "--config", "tiny", "--resolution", "64", "--repeats", "1", "--no-backward",
            "--no-slack", "--flex", "none", "--budgets", "4"]
TINY_EW = ["--device", "cpu", "--config", "tiny", "--resolution", "64", "--batch", "1", "--repeats", "1",
           "--no-compile"]


def usage_error(capsys, parse, argv, flag):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: {flag}" in err, err
    return err


@pytest.mark.parametrize("flag", ["--batch", "--repeats", "--resolution"])
def test_bench_ops_refuses_zero(bench_ops, capsys, flag):
    usage_error(capsys, bench_ops.parse, [*TINY_OPS, flag, "0"], flag)


@pytest.mark.parametrize("flag", ["--batch", "--resolution", "--repeats"])
def test_bench_elementwise_refuses_zero(bench_ew, capsys, flag):
    usage_error(capsys, bench_ew.parse, [*TINY_EW, flag, "0"], flag)


@pytest.mark.parametrize("value", ["0", "nan", "-1", "inf"])
def test_bench_ops_max_seconds_is_checked(bench_ops, capsys, value):
    usage_error(capsys, bench_ops.parse, [*TINY_OPS, "--max-seconds", value], "--max-seconds")
    args, _ = bench_ops.parse([*TINY_OPS, "--max-seconds", "0.5"])
    assert args.max_seconds == 0.5


def test_bench_ops_refuses_slack_only_with_no_slack(bench_ops, capsys, tmp_path):
    err = usage_error(capsys, bench_ops.parse, [*TINY_OPS, "--slack-only", "--out", str(tmp_path / "o")],
                      "--slack-only")
    assert "--no-slack" in err and not (tmp_path / "o").exists()


def test_bench_ops_with_nothing_to_time_writes_nothing(tmp_path):
    r = run_bench_ops([*TINY_OPS, "--out", str(tmp_path)], "B.elit_shapes = lambda *a: []")
    assert r.returncode == 2 and "nothing to time" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert not (tmp_path / "ops.json").exists() and not (tmp_path / "ops.csv").exists()


@pytest.mark.parametrize("device", ["foo", "meta", "cuda:x"])
def test_bench_devices_are_checked(bench_ops, bench_ew, capsys, device):
    base_ops = [a for a in TINY_OPS if a not in ("--device", "cpu")]
    base_ew = [a for a in TINY_EW if a not in ("--device", "cpu")]
    usage_error(capsys, bench_ops.parse, [*base_ops, "--device", device], "--device")
    usage_error(capsys, bench_ew.parse, [*base_ew, "--device", device], "--device")


@pytest.mark.parametrize("name", ["ops.json", "ops.csv"])
def test_bench_ops_checks_its_output_files_before_timing(bench_ops, capsys, tmp_path, name):
    (tmp_path / name).mkdir()
    err = usage_error(capsys, bench_ops.parse, [*TINY_OPS, "--out", str(tmp_path)], "--out")
    assert f"{tmp_path / name} is a folder" in err


def test_bench_elementwise_checks_its_output_file(bench_ew, capsys, tmp_path):
    (tmp_path / "elementwise.json").mkdir()
    err = usage_error(capsys, bench_ew.parse, [*TINY_EW, "--out", str(tmp_path)], "--out")
    assert f"{tmp_path / 'elementwise.json'} is a folder" in err


def test_bench_ops_writes_whole_or_not_at_all(tmp_path):
    (tmp_path / "ops.json").write_text('{"old": true}')
    full_disk = ("import errno\ndef full_disk(obj, f, **kw):\n    f.write('{\"rows\": [')\n"
                 "    raise OSError(errno.ENOSPC, 'No space left on device')\nB.json.dump = full_disk")
    r = run_bench_ops([*TINY_OPS, "--out", str(tmp_path)], full_disk)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"cannot write {tmp_path / 'ops.json'} (No space left on device)" in r.stderr, r.stderr
    assert (tmp_path / "ops.json").read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ops.json"]  # no temporary file left, no ops.csv


# ------------------------------------------------------------------------------------------------------------------
# tools/triton_sm90_report.py (F5, F14): never compiles here
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def sm90(monkeypatch):
    R = _load("tools/triton_sm90_report.py", "triton_sm90_report_r41")

    def no_compile(*a, **k):
        pytest.fail("reached the compile stage")
    for name in ("triton_unavailable", "_setup_triton", "compile_triton", "cuda_rows", "triton_jobs"):
        monkeypatch.setattr(R, name, no_compile)
    return R


def test_sm90_report_checks_its_output_files_first(sm90, capsys, tmp_path):
    usage_error(capsys, sm90.main, ["--json", "/nonexist/r.json"], "--json")
    usage_error(capsys, sm90.main, ["--json", str(tmp_path)], "--json")
    usage_error(capsys, sm90.main, ["--json", str(tmp_path / "r.json"), "--md", "/nonexist/r.md"], "--md")


@pytest.mark.parametrize("argv, flag", [
    (["--head-dims", "abc"], "--head-dims"), (["--head-dims", "0"], "--head-dims"),
    (["--head-dims", "512"], "--head-dims"), (["--head-dims", ""], "--head-dims"),
    (["--jobs", "0"], "--jobs"), (["--update"], "--update"),
    (["--no-triton", "--no-cuda"], "--no-triton"), (["--no-triton", "--check"], "--check")])
def test_sm90_report_argument_errors_come_first(sm90, capsys, tmp_path, argv, flag):
    report = tmp_path / "r.json"
    report.write_text("[]")  # --update: not a report (a list)
    usage_error(capsys, sm90.main, ["--json", str(report), *argv], flag)
    assert report.read_text() == "[]"


def test_sm90_report_check_with_nothing_compiled_fails(sm90, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(sm90, "triton_unavailable", lambda: None)
    monkeypatch.setattr(sm90, "_setup_triton", lambda: None)
    monkeypatch.setattr(sm90, "triton_jobs", lambda *a, **k: [])  # e.g. a --kernels / --subset with no tile
    monkeypatch.setattr(sm90, "cuda_rows", lambda *a, **k: ([], "nvcc not on the PATH"))
    pytest.importorskip("triton")
    out = tmp_path / "r.json"
    assert sm90.main(["--json", str(out), "--check", "--kernels", "fwd"]) == 1
    assert "--check: nothing was compiled" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# tools/mutation.py (F15): never runs mutmut here
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def mutation(monkeypatch):
    M = _load("tools/mutation.py", "mutation_r41")

    def no_run(*a, **k):
        pytest.fail("started a mutation run or rewrote the report")
    for name in ("run_module", "run_triton_mutants", "write_report"):
        monkeypatch.setattr(M, name, no_run)
    return M


def test_mutation_list_and_report_honour_module_names(mutation, capsys):
    assert mutation.main(["--list", "layout", "flow"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["layout", "flow"], lines
    for argv in (["--list", "nosuch"], ["--report", "nosuch"], ["--report", "layout"]):
        with pytest.raises(SystemExit) as e:
            mutation.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and ("nosuch" in err or "--report" in err), (argv, err)
    assert mutation.main(["--list"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(mutation.MODULES)
