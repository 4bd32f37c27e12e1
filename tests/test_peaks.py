"""The roofline denominators: ``bench.timing.measure_peaks`` measures the card's matmul and copy ceilings in the
bench's own run, and bench_ops / bench_elementwise / gpu_summary take every fraction against them, on any device
(they were fixed H200 figures, reported only when the card's name said H200: an H100 run got no roofline)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cases import load_script

from elit_kernels.bench import timing
from elit_kernels.bench.timing import measure_peaks

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_peaks_follow_the_definitions(monkeypatch):
    # a fixed clock: 2 ms for the matmul, 0.5 ms for the copy -> 2n^3 / 2 ms and (read + written) / 0.5 ms
    calls = []

    def clock(fn, device, *a, **k):
        calls.append(device)
        return 2.0 if len(calls) == 1 else 0.5
    monkeypatch.setattr(timing, "time_call", clock)
    p = measure_peaks(CPU, torch.float32, (64, 3))
    assert p["tflops"] == pytest.approx(2 * 64**3 / 2.0 / 1e9)
    elems = 3 * 10**6 // 4
    assert p["gbps"] == pytest.approx(2 * elems * 4 / 0.5 / 1e6)
    assert (p["matmul_n"], p["copy_mb"], p["dtype"], p["fp32_matmul_precision"]) == (64, 3, "float32", None)
    assert "shrunk" not in p["method"]
    assert calls == [CPU, CPU]
    assert measure_peaks(CPU, torch.bfloat16, (8, 1))["fp32_matmul_precision"] is None


def test_peaks_measured_here_are_positive_and_finite():
    p = measure_peaks(CPU, torch.float32, (128, 4))
    assert all(math.isfinite(p[k]) and p[k] > 0 for k in ("tflops", "gbps")), p
    assert "torch.mm" in p["method"] and "copy_" in p["method"]


@pytest.mark.parametrize("sizes", [(0, 1), (8, 0), (8.0, 1), (True, 1), (8, "1"), (-1, 4), (64,), (64, 1, 2), 64])
def test_peak_sizes_are_checked(sizes):
    with pytest.raises(ValueError, match=r"^sizes: expected \(matmul side, copy MB\), two positive ints"):
        measure_peaks(CPU, torch.float32, sizes)


@pytest.mark.parametrize("dtype", [torch.int32, "float32", None, torch.float8_e4m3fn])
def test_peak_dtype_is_checked(dtype):
    with pytest.raises(ValueError, match="^dtype: expected one of torch.float16, torch.bfloat16"):
        measure_peaks(CPU, dtype, (8, 1))


@pytest.mark.parametrize("kw, name", [({"device": None}, "device"), ({"device": "nowhere"}, "device"),
                                      ({"seed": None}, "seed"), ({"seed": 2**70}, "seed"), ({"seed": -1}, "seed")])
def test_peak_device_and_seed_are_checked(kw, name):
    args = {"device": CPU, "dtype": torch.float32, "sizes": (8, 1), **kw}
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        measure_peaks(**args)
    assert measure_peaks("cpu", torch.float32, (8, 1))["matmul_n"] == 8  # a device string is a device


def _run(script: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the bench as a user runs it
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)


def _summary():
    return load_script("tools/gpu_summary.py", "gpu_summary_peaks")


def test_op_bench_takes_its_roofline_against_peaks_it_measured(tmp_path):
    r = _run("bench_ops.py", ["--device", "cpu", "--config", "tiny", "--resolution", "64", "--repeats", "1",
                              "--no-backward", "--no-slack", "--flex", "none", "--budgets", "4", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "CPU ceilings measured in this run:" in r.stdout
    data = json.loads((tmp_path / "ops.json").read_text())
    peaks = data["metadata"]["peaks"]
    assert peaks["tflops"] > 0 and peaks["gbps"] > 0 and peaks["dtype"] == "float32"
    timed = [x for x in data["rows"] if x["ms"]]
    assert timed, data["rows"]
    for x in timed:
        assert x["pct_peak_flops"] == pytest.approx(100 * x["tflops"] / peaks["tflops"]), x
        assert x["pct_peak_bw"] == pytest.approx(100 * x["gbps"] / peaks["gbps"]), x
    s = _summary().ops_summary(str(tmp_path / "ops.json"))
    assert s["peaks"] == {"tflops": round(peaks["tflops"], 1), "gbps": round(peaks["gbps"], 1),
                          "matmul_n": peaks["matmul_n"], "copy_mb": peaks["copy_mb"]}
    x = timed[0]
    if round(x["tflops"], 1):  # the summary keeps rows whose rounded TFLOP/s is a number (0.0 on a slow CPU too)
        assert s["pct_peak_bw"][f"{x['shape']} {x['pass']}"][x["method"]] == round(x["pct_peak_bw"], 1)


def test_elementwise_bench_takes_its_bandwidth_against_the_copy_rate_it_measured(tmp_path):
    r = _run("bench_elementwise.py", ["--device", "cpu", "--config", "tiny", "--resolution", "64", "--batch", "1",
                                      "--repeats", "1", "--no-compile", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "CPU copy rate measured in this run:" in r.stdout
    data = json.loads((tmp_path / "elementwise.json").read_text())
    gbps = data["metadata"]["peaks"]["gbps"]
    assert gbps > 0
    for x in data["rows"]:
        assert x["pct_peak_bw"] == pytest.approx(100 * x["gbps"] / gbps), x
    s = _summary().elementwise_summary(str(tmp_path / "elementwise.json"))
    assert s["gated_residual"]["native"]["pct_peak_bw"] == round(
        next(x["pct_peak_bw"] for x in data["rows"] if (x["op"], x["impl"]) == ("gated_residual", "native")), 1)


def test_model_bench_rows_say_what_fraction_of_the_machine_a_forward_reaches(tmp_path):
    # elit-bench: each row's FLOPs over its median latency, against the matmul rate measured in the same run
    # (on the H200 eager PyTorch reached about a third of the machine at J = 64, less at small budgets)
    from elit_kernels.bench.report import make_rows, markdown_summary
    from elit_kernels.bench.timing import Case

    c = Case(scenario="uniform", case="uniform", model="elit", backend="torch", budget=4, budgets=[4, 4], batch=2,
             latents=4.0, fn=lambda: None, times_ms=[2.0, 4.0, 3.0], flops={"total": 6e9, "attention": 1e9})
    untimed = Case(scenario="uniform", case="uniform", model="elit", backend="triton", budget=4, budgets=[4, 4],
                   batch=2, latents=4.0, fn=lambda: None, flops={"total": 6e9, "attention": 1e9})
    peaks = {"tflops": 8.0, "dtype": "bfloat16"}
    row, none = make_rows([c, untimed], CPU, peaks)
    assert row["tflops"] == pytest.approx(6e9 / 1e9 / 3.0)  # GFLOP / ms = TFLOP/s: 2 TFLOP/s
    assert row["pct_peak_flops"] == pytest.approx(25.0)
    assert none["tflops"] is None and none["pct_peak_flops"] is None
    assert make_rows([c], CPU)[0]["pct_peak_flops"] is None  # no measured peak: no fraction
    md = markdown_summary([row], [], {"device_type": "cpu", "peaks": peaks})
    assert "% peak: TFLOP/s against 8 TFLOP/s, the bfloat16 matmul rate measured" in md
    assert "| 2.000 | 25.0 |" in md
    assert "% peak: TFLOP/s against" not in markdown_summary([row], [], {"device_type": "cpu"})  # an older results.json


def test_gpu_summary_lists_the_fraction_of_the_machine_each_uniform_forward_reaches(tmp_path):
    rows = [{"scenario": "uniform", "preset": "released", "model": "elit", "backend": "default", "budget": 64,
             "tflops": 250.04, "pct_peak_flops": 31.26, "latency_ms": 60.0},
            {"scenario": "uniform", "preset": "released", "model": "official", "backend": "sdpa_dense", "budget": 64,
             "tflops": 270.0, "pct_peak_flops": None, "latency_ms": 55.0},
            {"scenario": "mixed", "preset": "released", "model": "elit", "backend": "default", "budget": 64,
             "tflops": 1.0, "pct_peak_flops": 1.0, "latency_ms": 1.0}]
    (tmp_path / "model.json").write_text(json.dumps({"metadata": {}, "rows": rows}))
    got = _summary().model_summary(str(tmp_path / "model.json"))["pct_peak_flops"]
    assert got == [{"preset": "released", "model": "elit", "backend": "default", "budget": 64, "tflops": 250.0,
                    "pct": 31.3}]


def test_a_device_short_of_memory_is_measured_at_smaller_sizes(monkeypatch):
    # a small card (or one the bench has filled) must not lose the whole bench to the peak measurement: the sizes
    # shrink until the buffers fit, and the result says which were used
    real = torch.randn

    def scarce(*shape, **kw):  # room for a 300 x 300 matrix and 3M copy elements (12 MB of fp32)
        if math.prod(shape) > (300 * 300 if len(shape) == 2 else 3 * 10**6):
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real(*shape, **kw)
    monkeypatch.setattr(torch, "randn", scarce)
    p = measure_peaks(CPU, torch.float32, (1024, 64))
    assert (p["matmul_n"], p["copy_mb"]) == (256, 8) and p["tflops"] > 0 and p["gbps"] > 0
    assert "n shrunk from 1024 after running out of memory; MB shrunk from 64" in p["method"]
    # each measurement shrinks on its own, and never past the size asked
    q = measure_peaks(CPU, torch.float32, (100, 64))
    assert (q["matmul_n"], q["copy_mb"]) == (100, 8) and "n shrunk" not in q["method"]
    monkeypatch.setattr(torch, "randn", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("none left")))
    with pytest.raises(torch.OutOfMemoryError):
        measure_peaks(CPU, torch.float32, (512, 16))


def test_gpu_summary_gives_no_fractions_for_files_without_measured_peaks(tmp_path):
    # files written before the benches measured their ceilings took pct_peak_* against fixed H200 figures: the
    # summary must not print those as fractions of the card's measured rates
    ops = {"metadata": {}, "rows": [{"shape": "read", "pass": "fwd", "method": "m", "tflops": 5.0, "pct_peak_bw": 36.2}]}
    (tmp_path / "ops.json").write_text(json.dumps(ops))
    s = _summary().ops_summary(str(tmp_path / "ops.json"))
    assert s["peaks"] is None and s["pct_peak_bw"] == {}
    ew = {"metadata": {}, "rows": [{"op": "x", "impl": "native", "ms": 1.0, "gbps": 10.0, "pct_peak_bw": 0.2}]}
    (tmp_path / "elementwise.json").write_text(json.dumps(ew))
    assert _summary().elementwise_summary(str(tmp_path / "elementwise.json"))["x"]["native"]["pct_peak_bw"] is None
