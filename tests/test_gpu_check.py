"""tools/gpu_check.sh on a machine without a GPU: it must exit cleanly, inside its budget, with summary.json
and at most 8 files (the GPU machine returns no more), the GPU test stage having run (and skipped; without
triton installed, the Triton tests skip as a module, naming the missing package)."""
import importlib.util
import json
import os
import xml.etree.ElementTree as ET
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cases import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path; on a GPU machine run the script itself")
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils timeout")
def test_gpu_check_without_a_gpu_exits_cleanly(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_SKIP_BUILD": "1",
           "GPU_CHECK_SECONDS": "400"}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert {"summary.json", "gpu_check.log", "artifacts.tar.gz"} <= set(files), files
    s = json.loads((out / "summary.json").read_text())
    stages = {x["stage"]: x["rc"] for x in s["stages"]}
    assert stages["build"].startswith("skipped") and stages["bench: model bf16"].startswith("skipped")
    assert stages["dispatch: measure"].startswith("skipped")
    assert stages["tests: gpu"] in ("0", "5")
    assert s["ok"] is True and "gpu none" in " ".join(s["env"])
    assert s["tests"]["not_run"]["count"] == 0
    # the GPU selection is what it claims: the CUDA kernels' tests and argument checks, the real-size bf16/fp16
    # Triton tests (when triton is installed), the known-answer checks on the GPU, the model path; no fp32 compiles
    names = [f"{c.get('classname')}::{c.get('name')}" for c in ET.parse(out / "junit_gpu.xml").getroot().iter("testcase")]
    assert any("test_attention_cuda_matches_reference" in n for n in names)
    assert any("known_answer_on_gpu[cuda" in n for n in names)
    assert any("test_gpu_forward_has_no_host_sync" in n for n in names)
    if importlib.util.find_spec("triton") is not None:
        assert sum("known_answer_on_gpu[triton" in n for n in names) == 6
        assert any("test_gpu_values_and_grads" in n for n in names)
    else:  # the CPU-only install: the Triton test module skips as a whole, and says it is for want of triton
        skips = [c.find("skipped") for c in ET.parse(out / "junit_gpu.xml").getroot().iter("testcase")
                 if "test_triton_attention" in f"{c.get('classname')}::{c.get('name')}"]
        why = [None if sk is None else f"{sk.get('message', '')} {sk.text or ''}" for sk in skips]
        assert why and all(w is not None and "triton is not installed" in w for w in why), why
    assert not any("fp32" in n for n in names if "triton" in n)
    plan = (out / "gpu_check.log").read_text()
    limits = [int(line.split()[-1]) for line in plan.split("=== plan")[1].split("===")[1].strip().splitlines()
              if line.strip() and line.split()[-1].isdigit()]
    import re

    budget = int(re.search(r'BUDGET="\$\{GPU_CHECK_SECONDS:-(\d+)\}"', (ROOT / "tools" / "gpu_check.sh").read_text())[1])
    # at the default budget the limits leave 40 s for the start-up probes, the test collection and the summary, and
    # the whole run fits one 600 s device call with room for the machine's transfers
    assert sum(limits) <= budget - 40 and budget <= 480, f"the stage limits add up to {sum(limits)} s of {budget} s"
    assert "summary: OK" in r.stdout.strip().splitlines()[-1]


def test_ops_summary_ratios_name_each_of_our_kernels(tmp_path):
    # gpu_summary's op table: every method's TFLOP/s per (shape, pass), the best exact one, and the ratio to it of default
    # dispatch (with segments, without, and as a drop-in caller gets it) and of each of our kernels (None when the
    # run has no such row, e.g. triton_window on a core shape it refuses).
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gpu_summary
    finally:
        sys.path.pop(0)
    rows = [{"shape": s, "pass": "fwd", "method": m, "tflops": t}
            for s, m, t in (("read J=4", "elit:triton", 1.1), ("read J=4", "elit:triton_window", 4.4),
                            ("read J=4", "elit:torch_varlen", 3.2), ("read J=4", "elit:default", 3.3),
                            ("read J=4", "elit:default(drop-in)", 2.2), ("core", "elit:triton", 100.0),
                            ("read J=4", "sdpa_flash(padded)", 9.9),
                            ("core", "elit:triton_window", None), ("core", "sdpa_cudnn(padded)", 300.0))]
    rows[6]["exact"] = False  # a padded comparator on a ragged shape: faster, other numbers, never "best"
    assert rows[6]["method"] == "sdpa_flash(padded)"
    path = tmp_path / "ops.json"
    path.write_text(json.dumps({"rows": rows}))
    best = gpu_summary.ops_summary(str(path))["best"]
    assert best["read J=4 fwd"] == {"best": "elit:triton_window", "tflops": 4.4, "elit:default / best": 0.75,
                                    "elit:default(no segments) / best": None, "elit:default(drop-in) / best": 0.5,
                                    "elit:triton / best": 0.25, "elit:triton_window / best": 1.0,
                                    "elit:cuda / best": None}
    assert best["core fwd"]["best"] == "sdpa_cudnn(padded)" and best["core fwd"]["elit:triton_window / best"] is None


def test_dispatch_measurement_rows_without_segments_measure_the_ragged_class():
    # The value checks derive the segments of a call made without them (up to 64 runs); measure_dispatch's "no
    # segments" rows stand for callers whose lengths only the device knows, so they must stay in the ragged class.
    # Before they did not, the mixed/CCFG cores "without segments" were measured as the "runs" class a second time.
    from elit_kernels.attention.dispatch import shape_class

    md = load_script("tools/measure_dispatch.py", "measure_dispatch")
    shapes = md._shapes(8, 4, 8, 8, 2, 16)
    without = [s for s in shapes if not s[5]]
    assert without, "no row without segments"
    for label, lq, lk, h, d, with_segments in shapes:
        kind = shape_class(md._inputs(lq, lk, h, d, torch.float32, False, with_segments, 0, device="cpu"))["kind"]
        assert (kind == "ragged") == (not with_segments), (label, kind)


def test_dispatch_measurement_spends_its_budget_on_inference_first():
    # tools/measure_dispatch.py stops at --max-seconds (the H200 run measured 13 of 44 shape x pass rows, 5 of them backward): the
    # forwards of the released model's calls come first, then fp32, then forward + backward; each row once.
    md = load_script("tools/measure_dispatch.py", "measure_dispatch")
    shapes = md._shapes(16, 16, 64, 64, 16, 72)
    passes = [(torch.bfloat16, False), (torch.bfloat16, True)]
    fp32 = {"spatial 16x1024", "core J=64"}
    work = md._priority(shapes, passes, fp32)
    assert len(work) == 2 * len(shapes) + len(fp32)
    assert len({(w[0], w[6], w[7]) for w in work}) == len(work)
    assert [w[0] for w in work[:9]] == ["spatial 16x1024", "read J=64", "write J=64", "core J=64", "core mixed",
                                        "core ccfg", "core J=16", "core J=4", "core J=1"]
    kinds = [("fp32" if w[6] == torch.float32 else "bwd" if w[7] else "fwd") for w in work]
    assert kinds == ["fwd"] * len(shapes) + ["fp32"] * len(fp32) + ["bwd"] * len(shapes)
    assert [w[0] for w in work if w[7]][:4] == ["spatial 16x1024", "read J=64", "write J=64", "core J=64"]


def test_elementwise_bench_checks_and_times_every_implementation(tmp_path):
    # benchmarks/bench_elementwise.py (gpu_check's elementwise stage) on the CPU: every registered implementation and
    # native under torch.compile, each checked against the fp32 reference first; gpu_summary reads its output.
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_elementwise.py"), "--device", "cpu",
                        "--config", "S/2", "--resolution", "64", "--batch", "2", "--repeats", "1",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads((tmp_path / "elementwise.json").read_text())["rows"]
    from elit_kernels.elementwise import ELEMENTWISE_IMPLS
    want = {(op, impl) for op in ("layernorm_modulate", "gated_residual")
            for impl in [*ELEMENTWISE_IMPLS, "native+compile"]}
    assert {(x["op"], x["impl"]) for x in rows} == want
    for x in rows:
        assert x["error"] is None and x["ms"] > 0 and x["max_abs_err"] < 1e-4, x
        assert x["tokens"] == 2 * 16 and x["hidden"] == 384
    gs = load_script("tools/gpu_summary.py", "gpu_summary")
    summ = gs.elementwise_summary(str(tmp_path / "elementwise.json"))
    for op in ("layernorm_modulate", "gated_residual"):
        ratio = summ[op]["fused / best of native, native+compile"]
        if "fused" in ELEMENTWISE_IMPLS:
            best = min(summ[op]["native"]["ms"], summ[op]["native+compile"]["ms"])
            assert ratio == round(summ[op]["fused"]["ms"] / best, 3)
        else:
            print("no fused elementwise ops here (elit_kernels._C not built): the ratio is None")
            assert ratio is None
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_elementwise.py"), "--device", "cpu",
                          "--out", "/proc/elit-ew"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 2 and "--out: cannot write into /proc/elit-ew" in bad.stderr, bad.stderr


def test_a_cut_stage_gets_a_benchmark_deadline_from_what_it_gets():
    """A late stage cut to what is left of the budget must not run its benchmark to the deadline of its full limit
    (it would be killed before writing anything): ``cap`` gives what the stage gets, ``secs`` the bench's
    --max-seconds from that, at least 5;
    found reading the GPU-only code paths, 2026-12-07."""
    import re

    text = (ROOT / "tools" / "gpu_check.sh").read_text()
    funcs = "\n".join(line for line in text.splitlines() if re.match(r"^(left|cap|secs)\(\) ", line))
    script = (f"{funcs}\ndeclare -A LIMIT=([model]=80 [ops]=30)\nBUDGET=100\nSECONDS=50\n"
              'echo "$(cap model) $(secs "$(cap model)" 25) $(cap ops) $(secs 10 25)"')
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.split() == ["40", "15", "30", "5"], r.stdout + r.stderr


def test_dispatch_measurement_writes_what_it_measured_when_its_stage_is_interrupted(tmp_path, monkeypatch):
    """gpu_check stops a stage past its limit with SIGINT: measure_dispatch keeps the rows it measured (the table
    and the report, without the overhead line it had no time for) and exits 130, instead of losing both files
    (found reading the GPU-only code paths). CUDA faked: the measurement itself is replaced."""
    md = load_script("tools/measure_dispatch.py", "measure_dispatch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")

    def measure_then_sigint(args, shapes, passes, fp32_labels, t_start, entries, lines):
        entries.append({"gpu": "Fake GPU", "dtype": "bfloat16", "shape": "read J=64", "ranking": ["torch"],
                        "ms": {"torch": 0.1}})
        lines.append("| read J=64 | bfloat16 | fwd | torch (table) 0.100 | torch 0.100 | 1.00 | n/a | torch 0.100 |")
        raise KeyboardInterrupt
    monkeypatch.setattr(md, "_measure", measure_then_sigint)
    assert md.main(["--out", str(tmp_path), "--merge", ""]) == 130
    table = json.loads((tmp_path / "dispatch_table.json").read_text())
    assert [e["shape"] for e in table["entries"]] == ["read J=64"] and table["device"] == "Fake GPU"
    # by default the committed table's entries stay beside what the cut run measured
    assert md.main(["--out", str(tmp_path / "merged")]) == 130
    merged = json.loads((tmp_path / "merged" / "dispatch_table.json").read_text())
    committed = json.loads((ROOT / "elit_kernels" / "attention" / "dispatch_table.json").read_text())
    assert merged["entries"][0]["gpu"] == "Fake GPU" and len(merged["entries"]) == 1 + len(committed["entries"])
    report = (tmp_path / "dispatch_report.md").read_text()
    assert "| read J=64 |" in report and "interrupted" in report and "Per-call host time" not in report


def test_elementwise_bench_writes_what_it_timed_when_interrupted(tmp_path, monkeypatch):
    """gpu_check's stage limit (SIGINT) in the elementwise bench: the rows timed so far are written, the others say
    they were not timed, and it exits 130, instead of losing elementwise.json;
    found reading the GPU-only code paths, 2026-12-07."""
    be = load_script("benchmarks/bench_elementwise.py", "bench_elementwise")
    real, calls = be.time_call, []

    def interrupted_on_the_third(fn, dev):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(fn, dev)
    monkeypatch.setattr(be, "time_call", interrupted_on_the_third)
    argv = ["--device", "cpu", "--config", "S/2", "--resolution", "64", "--batch", "2", "--repeats", "1",
            "--no-compile", "--out", str(tmp_path)]
    assert be.main(argv) == 130
    rows = json.loads((tmp_path / "elementwise.json").read_text())["rows"]
    timed = [r for r in rows if r["ms"] is not None]
    assert len(timed) == 2 and all(r["error"] is None for r in timed)
    assert rows[2:] and all(r["error"] == "not timed: interrupted (the stage's time limit)" for r in rows[2:])


def _measure_dispatch():
    return load_script("tools/measure_dispatch.py", "measure_dispatch_merge")


def test_a_dispatch_run_on_another_gpu_adds_to_the_committed_table():
    # The committed table holds the H200's rankings; a measure_dispatch run on an H100 (or one cut short on the H200)
    # wrote only its own entries, so committing it dropped every other measurement. It merges now: this run's entries
    # replace the same measurement only, each entry names the run that measured it, and dispatch reads both GPUs.
    from elit_kernels.attention import dispatch as D

    md = _measure_dispatch()
    committed = json.loads((ROOT / "elit_kernels" / "attention" / "dispatch_table.json").read_text())
    h200 = [e for e in committed["entries"] if e["gpu"] == "NVIDIA H200"]
    assert h200, "the committed table has H200 entries"
    h100_name = "NVIDIA H100 80GB HBM3"
    new_h100 = {**{k: h200[0][k] for k in ("dtype", "kind", "grad", "head_dim", "lq", "lk", "segments", "shape")},
                "gpu": h100_name, "ranking": ["torch_varlen", "torch"], "ms": {"torch_varlen": 0.1, "torch": 0.2}}
    remeasured = {**h200[1], "ranking": list(reversed(h200[1]["ranking"])), "ms": None, "shape": "relabelled"}
    run = {"device": h100_name, "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "date": "2027-01-01T00:00:00Z",
           "commit": "abc1234", "source": "test"}
    table, kept = md.merge_tables(committed, [new_h100, remeasured], run)
    same_class = [e for e in committed["entries"] if all(e[k] == h200[1][k] for k in md._ENTRY_KEY)]
    # every committed entry of the re-measured class is replaced (Read and Write at J = P are one class), nothing else
    assert kept == len(committed["entries"]) - len(same_class) and same_class
    assert table["devices"] == sorted({h100_name, "NVIDIA H200"}) and table["device"] == h100_name
    by_shape = {(e["gpu"], e["shape"], e["dtype"], e["grad"]): e for e in table["entries"]}
    assert len(by_shape) == len(table["entries"])
    other = next(e for e in h200 if any(e[k] != h200[1][k] for k in md._ENTRY_KEY))
    old = by_shape[("NVIDIA H200", other["shape"], other["dtype"], other["grad"])]
    assert old["date"] == committed["date"] and old["ranking"] == other["ranking"]  # provenance of its own run
    again = by_shape[("NVIDIA H200", "relabelled", h200[1]["dtype"], h200[1]["grad"])]  # the class, not its label
    assert again["ranking"] == remeasured["ranking"] and again["date"] == run["date"]
    # dispatch reads the merged file: each GPU gets its own ranking
    cls = {k: h200[0][k] for k in ("dtype", "kind", "grad", "head_dim", "lq", "lk", "segments")}
    assert D.table_ranking({**cls, "gpu": h100_name}, table) == ["torch_varlen", "torch"]
    assert D.table_ranking({**cls, "gpu": "NVIDIA H200"}, table) == D.table_ranking({**cls, "gpu": "NVIDIA H200"},
                                                                                    committed)
    assert all(D._valid_entry(e) for e in table["entries"])
    # every committed entry names its architecture, so that a GPU the table has not measured reads its siblings':
    # an H100 with no entries of its own gets the H200's ranking, not the static order
    assert all(e.get("arch") == "sm_90" for e in h200)
    assert D.table_match({**cls, "gpu": h100_name, "arch": "sm_90"}, committed) == (
        D.table_ranking({**cls, "gpu": "NVIDIA H200"}, committed), "arch")
    alone, kept = md.merge_tables(None, [new_h100], run)
    assert kept == 0 and alone["entries"] == [{**new_h100, **run}]


@pytest.mark.parametrize("content, why", [("{", "cannot be read"), ("[]", "is not a dispatch table"),
                                          ('{"entries": [1]}', "is not a dispatch table"), (None, "does not exist"),
                                          ('{"entries": [{"gpu": "A", "shape": ["x"]}]}', "holds an entry dispatch "
                                           "cannot read (entries[0]:")])
def test_a_table_that_cannot_be_merged_is_a_usage_error_before_any_measurement(tmp_path, capsys, content, why):
    md = _measure_dispatch()
    bad = tmp_path / "table.json"
    if content is not None:
        bad.write_text(content)
    with pytest.raises(SystemExit) as e:
        md.main(["--out", str(tmp_path / "o"), "--merge", str(bad)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--merge: {bad} {why}" in err and "--merge ''" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value, want", [("--max-seconds", "nan", "a finite number of seconds > 0"),
                                               ("--max-seconds", "0", "a finite number of seconds > 0"),
                                               ("--repeats", "0", "an int >= 1"), ("--batch", "0", "an int >= 1"),
                                               ("--head-dim", "300", "an int in 1..256")])
def test_measure_dispatch_names_a_bad_flag_on_any_machine(flag, value, want, tmp_path, capsys):
    """--max-seconds nan never stopped and --repeats 0 wrote an empty table (a fuzz): refused before the CUDA
    check, naming the flag."""
    md = load_script("tools/measure_dispatch.py", "measure_dispatch")
    with pytest.raises(SystemExit) as e:
        md.main(["--out", str(tmp_path / "o"), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: {flag}: expected {want}" in err, err
    assert not (tmp_path / "o").exists()
