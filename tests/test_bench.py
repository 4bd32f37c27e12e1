"""elit-bench: the CLI end to end on a tiny config, the official-style baseline, FLOP counting, bad flags."""
import csv
import json
import subprocess
import sys

import pytest
import torch

from elit_kernels import known_backends
from elit_kernels.bench import OfficialStyleElit, count_flops, elit_attention_flops, plain_attention_flops
from elit_kernels.bench.cli import main
from elit_kernels.bench.scenarios import mixed_budgets, randomize_
from elit_kernels.models import ElitDiT, PlainDiT, elit_config
from elit_kernels.models.config import preset_config

TINY = ["--device", "cpu", "--config", "tiny", "--resolution", "64", "--no-progress"]


def _inputs(cfg, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    return x, torch.rand(b, generator=g), torch.randint(0, cfg.num_classes, (b,), generator=g)


def test_cli_end_to_end_writes_json_csv_png(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(TINY + ["--batch", "2", "--repeats", "2", "--warmup", "1", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "CPU" in stdout and "median_ms" in stdout and "targets:" in stdout
    data = json.loads((out / "results.json").read_text())
    md = data["metadata"]
    for k in ("device", "torch", "triton", "git_commit", "date", "config", "dtype", "budgets"):
        assert k in md, k
    assert md["device"].startswith("CPU") and md["config"] == "tiny" and md["budgets"] == [1, 2, 4]
    assert md["presets"] == ["paper", "released"]
    rows = data["rows"]
    seen = {(r["scenario"], r["case"], r["model"]) for r in rows if r["preset"] == "released"}
    assert seen == {(r["scenario"], r["case"], r["model"]) for r in rows if r["preset"] == "paper"}
    for want in [("uniform", "uniform", "elit"), ("uniform", "uniform", "official"), ("uniform", "plain_dit", "plain"),
                 ("mixed", "ragged", "elit"), ("mixed", "padded", "elit"), ("mixed", "sum_of_parts", "elit"),
                 ("guidance", "cfg", "elit"), ("guidance", "ccfg_two_pass", "elit"), ("guidance", "ccfg", "elit")]:
        assert want in seen, want
    for r in rows:
        for k in ("scenario", "backend", "budget", "latency_ms", "gflops", "device", "torch", "triton", "git_commit", "date"):
            assert k in r, k
        assert r["latency_ms"] > 0 and r["cpu_ms"] > 0 and r["gflops"] > 0 and r["repeats"] == 2
        assert r["min_ms"] <= r["latency_ms"] <= r["max_ms"]
        assert r["peak_mem_mb"] is None  # CPU: not measured, said so in metadata
    full = [r for r in rows if r["scenario"] == "uniform" and r["model"] == "elit" and r["budget"] == 4]
    assert len(full) == 2 and all(r["latency_ratio"] == pytest.approx(1.0) and r["flops_ratio"] == pytest.approx(1.0)
                                  for r in full)
    # FLOPs fall with the budget; attention FLOPs are the analytic count from the layout, per preset
    for preset in ("paper", "released"):
        uni = sorted((r for r in rows if r["scenario"] == "uniform" and r["model"] == "elit" and r["backend"] == "torch"
                      and r["preset"] == preset), key=lambda r: r["budget"])
        assert [r["budget"] for r in uni] == [1, 2, 4]
        assert uni[0]["gflops"] < uni[1]["gflops"] < uni[2]["gflops"]
        cfg = preset_config(preset, "tiny", 64)
        assert uni[0]["attention_gflops"] * 1e9 == pytest.approx(elit_attention_flops(cfg, [1, 1]))
    with open(out / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert {"scenario", "backend", "budget", "latency_ms", "gflops", "device", "git_commit"} <= set(csv_rows[0])
    assert (out / "latency_vs_latents.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "summary.md").read_text().startswith("### CPU")
    assert "_bench_flop_stub" not in known_backends()


def test_time_budget_spent_still_writes_rows(tmp_path, capsys):
    # --max-seconds spent before any case is warmed up: every row says it was skipped; files still written
    out = tmp_path / "b"
    assert main(TINY + ["--scenarios", "uniform", "--max-seconds", "0.001", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows and all(r["latency_ms"] is None and r["note"].startswith("skipped") for r in rows)
    assert (out / "latency_vs_latents.png").exists() and (out / "summary.md").exists()


@pytest.mark.parametrize("preset,name,res", [("paper", "tiny", 64), ("paper", "tiny", 128), ("released", "tiny", 64),
                                             ("released", "tiny", 128)])
def test_official_style_equals_elit_for_uniform_budgets(preset, name, res):
    cfg = preset_config(preset, name, res)
    m = ElitDiT(cfg, backend="torch").eval()
    randomize_(m, seed=1, std=0.05)
    off = OfficialStyleElit(m)
    x, t, y = _inputs(cfg, 3)
    with torch.no_grad():
        for j in range(1, cfg.latents_per_group + 1):
            ref = m(x, t, y, j)
            got = off(x, t, y, [j] * 3)
            assert ref.abs().max() > 0.1  # random weights: not a trivially zero network
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"budget {j}")


def test_official_style_needs_one_budget_per_batch():
    m = ElitDiT(elit_config("tiny", 64))
    x, t, y = _inputs(m.cfg, 2)
    with pytest.raises(ValueError, match="budgets: the official-style path needs one budget"):
        OfficialStyleElit(m)(x, t, y, [1, 2])
    with pytest.raises(ValueError, match=r"budgets: each budget must be in \[1, 4\]"):
        OfficialStyleElit(m)(x, t, y, 0)


@pytest.mark.parametrize("preset", ["paper", "released"])
def test_flop_count_matches_analytic_attention_and_leaves_no_stub(preset):
    cfg = preset_config(preset, "tiny", 64)
    m = ElitDiT(cfg, backend="torch").eval()
    p = PlainDiT(cfg, backend="torch").eval()
    x, t, y = _inputs(cfg, 3)
    f = count_flops(lambda: m(x, t, y, [1, 4, 2]), [m])
    assert f["attention"] == elit_attention_flops(cfg, [1, 4, 2]) and f["other"] > 0
    assert m.backend == "torch" and "_bench_flop_stub" not in known_backends()
    fo = count_flops(lambda: OfficialStyleElit(m)(x, t, y, 2), [])
    assert fo["attention"] == elit_attention_flops(cfg, [2, 2, 2])
    assert count_flops(lambda: p(x, t, y), [p])["attention"] == plain_attention_flops(cfg, 3)


def test_mixed_budgets_spread():
    assert mixed_budgets([1, 2, 4, 8, 16], 4) == [1, 2, 8, 16]
    assert mixed_budgets([4, 8, 16, 32, 64], 8)[0] == 4 and mixed_budgets([4, 8, 16, 32, 64], 8)[-1] == 64


@pytest.mark.parametrize("argv,flag", [
    (["--budgets", "1,x"], "--budgets"),
    (["--budgets", "0,4"], "--budgets"),
    (["--budgets", "9"], "--budgets"),
    (["--config", "huge"], "--config"),
    (["--resolution", "60"], "--resolution"),
    (["--batch", "0"], "--batch"),
    (["--repeats", "0"], "--repeats"),
    (["--dtype", "int8"], "--dtype"),
    (["--scenarios", "uniform,bogus"], "--scenarios"),
    (["--scenarios", "mixed", "--batch", "1"], "--scenarios"),
    (["--presets", "paper,dit"], "--presets"),
    (["--backends", "nope"], "--backends"),
    (["--backends", "torch_varlen"], "--backends"),  # CUDA-only comparator on CPU
    (["--device", "tpu"], "--device"),
    (["--threads", "0"], "--threads"),
    (["--max-seconds", "0"], "--max-seconds"),
])
def test_bad_flags_error_clearly(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(TINY + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {flag}:" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_cuda_flag_without_gpu_errors(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cuda"])
    assert "error: --device: cuda requested" in capsys.readouterr().err


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "elit_kernels.bench", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--budgets" in r.stdout and "--scenarios" in r.stdout


def test_attention_flops_pinned_by_hand():
    # Lq = Lk = 2, H = 1, D = 8: QK^T is 2·2·8 multiply-adds, PV the same -> 2·(2·2·2·8) = 128 FLOPs
    from elit_kernels.bench.flops import AttentionFlops

    assert AttentionFlops().add_segments([2], [2], heads=1, head_dim=8) == 128


@pytest.mark.parametrize("preset", ["paper", "released"])
def test_model_flops_match_an_independent_count(preset):
    # Every matmul of one forward counted from the architecture by hand: 2·tokens·in·out per Linear, the
    # patch conv, and 4·Lq·Lk·D per head of attention; compared with FlopCounterMode + the analytic attention.
    cfg = preset_config(preset, "tiny", 64)
    m = ElitDiT(cfg, backend="torch").eval()
    budgets = [1, 4, 2]
    b = len(budgets)
    x, t, y = _inputs(cfg, b)
    d, n, g, p = cfg.hidden, cfg.tokens, cfg.groups, cfg.tokens_per_group
    hid, ihid = int(d * cfg.mlp_ratio), int(d * cfg.interface_mlp_ratio)
    lat = g * sum(budgets)  # core latents
    lat_iface = b * g * cfg.latents_per_group if cfg.budget_core_only else lat
    lin = lambda tokens, i, o: 2 * tokens * i * o  # noqa: E731
    block = lambda tokens: lin(tokens, d, 3 * d) + lin(tokens, d, d) + lin(tokens, d, hid) + lin(tokens, hid, d)  # noqa: E731
    cond = lin(b, 256, d) + lin(b, d, d)  # timestep MLP
    ada = lambda chunks: lin(b, d, chunks * d)  # noqa: E731
    total = lin(b * n, cfg.in_channels * cfg.patch ** 2, d) + cond
    total += (cfg.n_head + cfg.n_tail) * (block(b * n) + ada(6)) + cfg.core_blocks * (block(lat) + ada(6))
    read_q = lat_iface
    total += lin(read_q, d, d) + lin(b * n, d, 2 * d) + lin(read_q, d, d) + lin(read_q, d, ihid) + lin(read_q, ihid, d)
    total += ada(8 if cfg.read_modulates_queries else 6)
    total += lin(b * n, d, d) + lin(lat_iface, d, 2 * d) + lin(b * n, d, d) + lin(b * n, d, ihid) + lin(b * n, ihid, d)
    total += ada(2) + lin(b * n, d, cfg.patch ** 2 * cfg.in_channels)  # final layer
    h, hd = cfg.heads, cfg.head_dim
    attn = sum(4 * h * hd * ((cfg.n_head + cfg.n_tail) * n * n + cfg.core_blocks * (g * j) ** 2) for j in budgets)
    attn += 2 * 4 * h * hd * lat_iface * p  # Read and Write: every (latent, token) pair of a group
    f = count_flops(lambda: m(x, t, y, budgets), [m])
    assert f["attention"] == attn
    assert f["total"] == total + attn
