"""The static sm_90 check (``tools/triton_sm90_report.py``) without a GPU: its parsers on canned compiler
output, and a CI-sized compile of the Triton kernels for sm_90 that must show no register spills,
16-byte vector tile loads and D=72 run as at most 80 columns of tensor-core work.

The compile runs in a subprocess: the tests run the kernels under ``TRITON_INTERPRET=1``, where ``triton.jit``
gives interpreted functions that cannot be compiled, and the fake sm_90 driver is process-wide.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "triton_sm90_report.py")


def _tool():
    spec = importlib.util.spec_from_file_location("triton_sm90_report", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


R = _tool()

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_varlen_attn_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _varlen_attn_fwd_kernel
    464 bytes stack frame, 460 bytes spill stores, 452 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 464 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z6kernelIfEvPT_' for 'sm_90'
ptxas info    : Function properties for _Z6kernelIfEvPT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 8704 bytes smem, 400 bytes cmem[0]
"""

# TTGIR of a D=72 key tile before the alignment hints (rows of 144 bytes: 2-byte accesses) and after.
TTGIR = """\
#blocked = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [1, 32], warpsPerCTA = [4, 1], order = [1, 0]}>
#blocked1 = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [4, 8], warpsPerCTA = [4, 1], order = [1, 0]}>
#blocked2 = #ttg.blocked<{sizePerThread = [1, 4], threadsPerWarp = [8, 4], warpsPerCTA = [8, 1], order = [1, 0]}>
    %a = tt.load %p, %m, %o : tensor<64x128x!tt.ptr<bf16>, #blocked> loc(#loc1)
    %b = ttg.async_copy_global_to_local %p1, %s mask %m other %o {contiguity = 8 : i32} : \
tensor<64x64x!tt.ptr<bf16>, #blocked1> -> <64x64xbf16, #shared, #smem, mutable> loc(#loc2)
    %c = ttg.async_copy_global_to_local %p2, %s2 mask %m other %o {contiguity = 4 : i32} : \
tensor<64x16x!tt.ptr<f16>, #blocked2> -> <64x16xf16, #shared, #smem, mutable> loc(#loc3)
    %d = tt.load %lse, %m : tensor<64x!tt.ptr<f32>, #blocked3> loc(#loc4)
"""


def test_parse_ptxas():
    triton_fn, cuda_fn = R.parse_ptxas(PTXAS_LOG)
    assert triton_fn == dict(name="_varlen_attn_fwd_kernel", registers=255, spill_bytes=460, spill_load_bytes=452,
                             stack_bytes=464, smem_bytes=0)
    assert cuda_fn["registers"] == 40 and cuda_fn["spill_bytes"] == 0 and cuda_fn["smem_bytes"] == 8704


def test_narrow_tile_loads():
    # With 8 warps a 64x16 tile holds 4 elements per thread: 4-element (8-byte) copies are as wide as it
    # gets. The unaligned 64x128 load (1 element per access) is flagged; fp32 LSE rows are no tile loads.
    bad = R.narrow_tile_loads(TTGIR, num_warps=8)
    assert bad == ["tt.load 64x128 bf16: 1 elements per access, 8 possible"]
    # With 4 warps the same 64x16 tile holds 8 elements per thread, so 4 is too narrow.
    assert R.narrow_tile_loads(TTGIR, num_warps=4)[1:] == [
        "ttg.async_copy_global_to_local 64x16 f16: 4 elements per access, 8 possible"]


def test_global_load_widths():
    ptx = """
    ld.global.b16 { %rs1 }, [ %rd1 + 0 ];
    ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd2 + 0 ];
    @%p1 ld.global.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd3 + 0 ];
    cp.async.cg.shared.global [ %r7 + 0 ], [ %rd4 + 0 ], 0x10, %r8;
    cp.async.ca.shared.global [ %r9 + 0 ], [ %rd5 + 0 ], 0x8, %r10;
    """
    assert R.global_loads(ptx) == {2: 1, 8: 2, 16: 2}


def _row(**kw):
    row = dict(kernel="fwd", head_dim=72, dtype="bf16", causal=False, BLOCK_M=64, BLOCK_N=64, num_warps=4,
               num_stages=2, registers=200, spill_bytes=0, spill_load_bytes=0, vectorized_loads=True,
               narrow_loads=[], padded_head_dim=80, mma=["wgmma", "cp.async"])
    row.update(kw)
    return row


def test_violations_name_the_row_and_the_problem():
    assert R.violations([_row()]) == []
    bad = R.violations([_row(spill_bytes=8, spill_load_bytes=8), _row(padded_head_dim=128),
                        _row(vectorized_loads=False, narrow_loads=["tt.load 64x128 bf16"]), _row(head_dim=128,
                                                                                                   padded_head_dim=128)])
    assert len(bad) == 3
    assert "fwd D=72 bf16 full 64x64 w4 s2: spills 8 B" in bad[0]
    assert "padded to 128" in bad[1] and "64x128" in bad[2]
    # An attention kernel must run its products on the tensor cores; the preprocess has none.
    assert R.violations([_row(kernel="window_fwd", mma=["cp.async"])]) == [
        "window_fwd D=72 bf16 full 64x64 w4 s2: no tensor-core instruction (mma.sync / wgmma) in the PTX"]
    assert R.violations([_row(kernel="window_dq", mma=["mma.sync"]), _row(kernel="preprocess", mma=[])]) == []
    # Exact float32 runs on the CUDA cores by design: no tensor-core instruction expected there.
    assert R.violations([_row(dtype="fp32-ieee", mma=["cp.async"])]) == []
    assert R.violations([_row(dtype="fp32", mma=["cp.async"])]) != []


def test_a_tile_past_sm90_shared_memory_is_a_violation():
    # float32 window dQ at D=72, 64 x 128 compiled for 246016 bytes (Triton 3.6): an H100 / H200 block holds
    # 232448, so the launch would raise OutOfResources
    assert R.violations([_row(shared_bytes=R.SM90_MAX_SHARED)]) == []
    assert R.violations([_row(kernel="window_dq", dtype="fp32", shared_bytes=246016)]) == [
        "window_dq D=72 fp32 full 64x64 w4 s2: 246016 B of shared memory, more than sm_90's 232448 B per block "
        "(the launch raises OutOfResources)"]


def test_float32_tile_loads_are_checked_at_four_elements():
    ttgir = """\
#blocked = #ttg.blocked<{sizePerThread = [1, 2], threadsPerWarp = [2, 16], warpsPerCTA = [4, 1], order = [1, 0]}>
#blocked1 = #ttg.blocked<{sizePerThread = [1, 4], threadsPerWarp = [4, 8], warpsPerCTA = [4, 1], order = [1, 0]}>
    %a = tt.load %p, %m, %o : tensor<64x64x!tt.ptr<f32>, #blocked> loc(#loc1)
    %b = tt.load %p, %m, %o : tensor<64x64x!tt.ptr<f32>, #blocked1> loc(#loc2)
"""
    assert R.narrow_tile_loads(ttgir, num_warps=4) == ["tt.load 64x64 f32: 2 elements per access, 4 possible"]


def test_unknown_dtypes_are_refused_naming_the_choices(capsys):
    with pytest.raises(SystemExit):
        R.main(["--json", "/dev/null", "--dtypes", "bf16,fp64"])
    assert "--dtypes: unknown fp64; choose from bf16, fp16, fp32, fp32-ieee" in capsys.readouterr().err


def test_update_replaces_only_the_recompiled_rows():
    old = dict(commit="a", date="d0", triton_version="3.8.0", triton=[_row(), _row(kernel="window_fwd", registers=1),
                                                                    _row(kernel="window_fwd", head_dim=64)],
               cuda=[dict(file="x.cu", kernel="k", registers=1, spill_bytes=0, shared_bytes=0)], cuda_skipped=None)
    new = dict(commit="b", date="d1", triton_version="3.8.0", triton_seconds=1.0,
               triton=[_row(kernel="window_fwd", registers=2)], cuda=[], cuda_skipped="nvcc not on the PATH")
    merged = R.merge_reports(old, new, {("window_fwd", 72, "bf16")}, cuda_rerun=False)
    assert [(r["kernel"], r["head_dim"], r["registers"]) for r in merged["triton"]] == [
        ("fwd", 72, 200), ("window_fwd", 64, 200), ("window_fwd", 72, 2)]
    assert merged["cuda"] == old["cuda"] and merged["commit"] == "a"
    assert merged["updates"] == [dict(rows=["window_fwd D=72 bf16"], commit="b", date="d1", triton_version="3.8.0",
                                      triton_seconds=1.0)]
    assert "Updated d1 (commit b, Triton 3.8.0): the rows of window_fwd recompiled" in R.markdown(
        dict(merged, note="n", target="t", violations=[]))


def test_sm90_compile_ci_subset(tmp_path):
    """CI subset of the sm_90 report (the script itself covers every dispatchable tile): no spills, vector
    loads, D=72 padded to at most 80; about a minute on 2 cores."""
    out, md = tmp_path / "report.json", tmp_path / "report.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.time()
    p = subprocess.run([sys.executable, TOOL, "--json", str(out), "--md", str(md), "--subset", "ci", "--no-cuda"], env=env,
                       capture_output=True, text=True, timeout=900)
    if p.returncode == R.UNAVAILABLE:
        pytest.skip(f"sm_90 compile unavailable here: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["triton"]
    print(f"{len(rows)} sm_90 compiles in {time.time() - t0:.0f} s (Triton {report['triton_version']})")
    assert {(r["kernel"], r["causal"]) for r in rows if r["head_dim"] == 72} >= {
        (k, c) for k in ("fwd", "dkdv", "dq") for c in (False, True)} | {("preprocess", False)} | {
        (f"window_{k}", False) for k in ("fwd", "dq", "dkdv")}
    # the window kernels at the Read tile (J = 4 queries padded to 16 rows x 64 keys) run on the tensor cores
    assert all({"mma.sync", "wgmma"} & set(r["mma"]) for r in rows if r["kernel"].startswith("window_"))
    assert {r["head_dim"] for r in rows} == {64, 72, 128}
    assert all(r["padded_head_dim"] <= 80 for r in rows if r["head_dim"] == 72)
    assert R.violations(rows) == [], "\n".join(R.violations(rows))
    summary = md.read_text()  # one line per kernel x head dim, with the worst tile's numbers
    assert "Violations: 0" in summary
    for k in ("fwd", "dkdv", "dq", "window_fwd", "window_dq", "window_dkdv"):
        assert f"| {k} | 72 |" in summary and f"| {k} | 128 |" in summary
