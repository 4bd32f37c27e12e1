"""elit-bench: the CLI end to end on a tiny config, the official-style baseline, FLOP counting, bad flags."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from elit_kernels import known_backends
from elit_kernels.bench import OfficialStyleElit, count_flops, elit_attention_flops, plain_attention_flops
from elit_kernels.bench import cli
from elit_kernels.bench.cli import build_parser, main, resolve
from elit_kernels.bench.report import OUTPUT_FILES, check_targets, format_table
from elit_kernels.bench.timing import Case, measure_memory, remaining_seconds
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
    assert "CPU" in stdout and "median_ms" in stdout and "\ntargets (" in stdout and "checks hold" in stdout
    data = json.loads((out / "results.json").read_text())
    md = data["metadata"]
    assert md["estimate_s"] > 0 and md["run_seconds"] > 0
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
        assert r["peak_mem_mb"] > 0  # CPU: torch.profiler memory events
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
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    help_out = " ".join(build_parser().format_help().split())
    assert all(f"DIR/{f}" in help_out for f in OUTPUT_FILES), help_out  # --out lists what it writes
    summary = (out / "summary.md").read_text()
    assert summary.startswith("### CPU")
    _check_summary_explains_rows(summary, rows)
    _check_figure_is_legible(rows, md)
    # --replot redraws summary.md and the plot from results.json alone, as the run wrote them
    (out / "summary.md").unlink()
    (out / "latency_vs_latents.png").unlink()
    capsys.readouterr()
    assert main(["--replot", str(out)]) == 0
    assert (out / "summary.md").read_text() == summary
    assert (out / "latency_vs_latents.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "checks hold" in capsys.readouterr().out
    assert "_bench_flop_stub" not in known_backends()


def _check_summary_explains_rows(summary, rows):
    """summary.md explains every model, backend and case name its rows use, and says what this run found."""
    how = summary[summary.index("## How to read this"):]
    for name in {r["model"] for r in rows} | {r["case"] for r in rows if r["case"] != "uniform"} | {"sdpa_dense"}:
        if name != "plain_dit":  # the plain DiT row is explained under its model name
            assert f"`{name}`" in how, name
    assert "guidance ratios" in how and "When the dense path is faster, and why" in how
    found = summary[summary.index("## In this run"):summary.index("## How to read this")]
    for preset in {r["preset"] for r in rows}:
        assert f"- {preset}, J̃ = " in found and f"- {preset}, mixed budgets" in found and f"- {preset}, guidance" in found


def _check_figure_is_legible(rows, md):
    """Every preset gets four titled panels (uniform latency, relative to J_max, mixed bars, guidance bars), every
    timed mixed/guidance row is a bar, and no line lies exactly on another (equal series are merged)."""
    import matplotlib.pyplot as plt

    from elit_kernels.bench.report import make_figure

    fig = make_figure(rows, md)
    try:
        presets = list(dict.fromkeys(r["preset"] for r in rows))
        axes = fig.axes
        assert len(axes) == 4 * len(presets)
        for i, preset in enumerate(presets):
            row_axes = axes[4 * i:4 * i + 4]
            assert all(ax.get_title().startswith(f"{preset}: ") for ax in row_axes), [a.get_title() for a in row_axes]
            for ax, scen in zip(row_axes[2:], ("mixed", "guidance")):
                rs = [r for r in rows if r["preset"] == preset and r["scenario"] == scen and r["latency_ms"]]
                assert len(ax.patches) == len(rs) > 0, (scen, len(ax.patches), len(rs))
                # no empty slot: the bars of one group stand side by side
                xs = sorted(p.get_x() for p in ax.patches)
                w = ax.patches[0].get_width()
                groups = 1
                for a, b in zip(xs, xs[1:]):
                    if b - a > 1.5 * w:
                        groups += 1
                    else:
                        assert b - a == pytest.approx(w), (scen, xs)
                assert groups == len({(r["model"], r["backend"]) for r in rs}), (scen, xs)
                # each value is written inside its bar, below the lower whisker (never on it)
                labels = {t.get_text(): t.get_position()[1] for t in ax.texts}
                for r in rs:
                    y = labels[f"{r['latency_ms']:.0f}"]
                    assert 0 < y < min(r["q1_ms"], r["latency_ms"]), (scen, r["case"], y, r["q1_ms"])
                assert ax.get_ylim()[0] == 0
                assert all(t.get_fontsize() >= 9 for t in ax.get_legend().get_texts())
            assert row_axes[0].get_ylim()[0] == 0 and row_axes[1].get_ylim()[0] == 0  # latency axes start at zero
            for ax in row_axes[:2]:
                lines = [(tuple(map(float, ln.get_xdata())), tuple(map(float, ln.get_ydata()))) for ln in ax.get_lines()
                         if len(ln.get_xdata()) > 1]
                assert lines and len(set(lines)) == len(lines), ax.get_title()
                assert ax.get_legend() is not None
                assert all(t.get_fontsize() >= 9 for t in ax.get_legend().get_texts())
        # the symbols are explained in the figure itself
        caption = " ".join(t.get_text() for t in fig.texts)
        for term in ("J̃:", "J_max:", "G·J̃ = latents per sample", "Dashed gray line: a plain DiT", "official/sdpa_dense ="):
            assert term in caption, term
    finally:
        plt.close(fig)


def test_time_budget_spent_still_times_one_case_and_writes_rows(tmp_path, capsys):
    """--max-seconds spent before the first case is warmed up: that case is still warmed and timed (the help
    promises at least one full repeat; every case was skipped and the run said "done" with nothing timed), the
    others say they were skipped; files written."""
    out = tmp_path / "b"
    assert main(TINY + ["--scenarios", "uniform", "--max-seconds", "0.001", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    timed = [r for r in rows if r["latency_ms"] is not None]
    assert len(timed) == 1 and len(rows) > 1
    assert all(r["note"].startswith("skipped") for r in rows if r not in timed)
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
    assert f["total"] == f["attention"] + f["other"]
    # one varlen call per head/tail/core block, plus Read and Write
    assert f["attention_calls"] == cfg.n_head + cfg.n_tail + cfg.core_blocks + 2
    assert m.backend == "torch" and "_bench_flop_stub" not in known_backends()
    fo = count_flops(lambda: OfficialStyleElit(m)(x, t, y, 2), [])
    assert fo["attention"] == elit_attention_flops(cfg, [2, 2, 2])
    fp = count_flops(lambda: p(x, t, y), [p])
    assert fp["attention"] == plain_attention_flops(cfg, 3) and fp["attention_calls"] == cfg.depth
    assert type(elit_attention_flops(cfg, [1, 4, 2])) is int and type(plain_attention_flops(cfg, 3)) is int
    from elit_kernels.bench.flops import active_counters
    assert active_counters() == []  # nothing counting outside count_flops


def test_a_flop_count_that_cannot_see_the_attention_says_so():
    """count_flops with a wrapper as models (it set .backend on the wrapper, which no attention reads) or with no
    models returned attention 0 and a total without it, silently (a fuzz). Nested counts each count their calls'
    attention (the outer one had 0)."""
    import warnings

    cfg = preset_config("paper", "tiny", 64)
    m = ElitDiT(cfg, backend="torch").eval()
    x, t, y = _inputs(cfg, 2)
    want = elit_attention_flops(cfg, [1, 3])
    with pytest.raises(ValueError, match=r"^models: Sequential has no backend attribute; pass the ElitDiT"):
        count_flops(lambda: m(x, t, y, [1, 3]), torch.nn.Sequential(m))
    with pytest.warns(UserWarning, match=r"^count_flops: no attention call was counted"):
        assert count_flops(lambda: m(x, t, y, [1, 3]), [])["attention"] == 0
    with pytest.raises(TypeError, match=r"^fn: expected a callable"):
        count_flops(None, m)
    inner = {}

    def nested():
        inner.update(count_flops(lambda: m(x, t, y, [1, 3]), [m]))

    outer = count_flops(nested, [m])
    assert inner["attention"] == outer["attention"] == want and outer["other"] == inner["other"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a count that sees its attention does not warn
        count_flops(lambda: m(x, t, y, [1, 3]), [m])
    assert elit_attention_flops(m, [1, 3]) == want  # a model for its config, as latents_for_budget takes it
    with pytest.raises(TypeError, match=r"^cfg: expected an ElitConfig or an ElitDiT, got NoneType"):
        elit_attention_flops(None, [1, 3])


def test_mixed_budgets_spread():
    assert mixed_budgets([1, 2, 4, 8, 16], 4) == [1, 2, 8, 16]
    assert mixed_budgets([4, 8, 16, 32, 64], 8)[0] == 4 and mixed_budgets([4, 8, 16, 32, 64], 8)[-1] == 64


@pytest.mark.parametrize("argv,flag,valid", [
    (["--budgets", "1,x"], "--budgets", "expected e.g. 1,2,4"),
    (["--budgets", "0,4"], "--budgets", "in 1..4"),
    (["--budgets", "9"], "--budgets", "in 1..4"),
    (["--config", "huge"], "--config", "known: S/2, B/2"),
    (["--resolution", "60"], "--resolution", "multiple of 16"),
    (["--batch", "0"], "--batch", "positive integer"),
    (["--repeats", "0"], "--repeats", "positive integer"),
    (["--dtype", "int8"], "--dtype", "fp32, bf16, fp16"),
    (["--scenarios", "uniform,bogus"], "--scenarios", "choose from uniform, mixed, guidance, baselines"),
    (["--scenarios", "mixed", "--batch", "1"], "--scenarios", "--batch >= 2"),
    (["--presets", "paper,dit"], "--presets", "choose from paper, released"),
    (["--config", "S/2"], "--presets", "--presets paper or --presets released"),  # 64px: 16 groups vs 1
    (["--backends", "nope"], "--backends", "choose from "),
    (["--backends", "torch_varlen"], "--backends", "Usable here: "),  # CUDA-only comparator on CPU
    (["--device", "tpu"], "--device", "cpu or cuda"),
    (["--threads", "0"], "--threads", "positive integer"),
    (["--max-seconds", "0"], "--max-seconds", "finite number of seconds > 0, got 0.0"),
    (["--max-seconds", "nan"], "--max-seconds", "finite number of seconds > 0, got nan"),
    (["--max-seconds", "inf"], "--max-seconds", "finite number of seconds > 0, got inf"),
    (["--out", "/proc/elit-bench-out"], "--out", "cannot write into /proc/elit-bench-out"),
    (["--out", __file__], "--out", "exists and is not a folder"),
    (["--warmup", "-1"], "--warmup", ">= 1"),
    (["--warmup", "0"], "--warmup", ">= 1 (the first call also sizes the timing loop)"),  # it ran one anyway
    (["--seed", "-1"], "--seed", "[0, 4294967295]"),
    (["--seed", str(2**64)], "--seed", "[0, 4294967295]"),
    (["--batch", "two"], "--batch", "invalid int value"),
])
def test_bad_flags_error_clearly(argv, flag, valid, capsys):
    """A usage error: exit status 2, the message names the flag and the valid values, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(TINY + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {flag}:" in err or f"error: argument {flag}:" in err, err
    assert valid in err, err
    assert "Traceback" not in err


def test_a_folder_where_an_output_file_goes_is_refused_before_timing(tmp_path, capsys):
    (tmp_path / "results.json").mkdir()
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--out", str(tmp_path)])
    assert e.value.code == 2
    assert f"error: --out: {tmp_path / 'results.json'} is a folder (expected a file path)" in capsys.readouterr().err


def test_op_bench_refuses_an_unwritable_out_before_timing():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_ops.py"), "--device", "cpu", "--out",
                        "/proc/elit-bench-ops"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "error: --out: cannot write into /proc/elit-bench-ops" in r.stderr, r.stderr
    assert r.stdout == "", r.stdout  # nothing was timed


def test_replot_of_a_folder_without_results_errors_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--replot", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--replot: cannot read" in err and "results.json" in err, err


@pytest.fixture(scope="module")
def replot_src(tmp_path_factory):
    """The results.json (and the rest) of one short real run, for --replot to read."""
    out = tmp_path_factory.mktemp("replot") / "src"
    assert main(TINY + ["--batch", "2", "--repeats", "1", "--warmup", "1", "--presets", "paper", "--scenarios",
                        "uniform", "--out", str(out)]) == 0
    return out


def _set(i, key, value):
    def damage(d):
        d["rows"][i][key] = value
    return damage


def _meta(key, value):
    def damage(d):
        d["metadata"][key] = value
    return damage


def _del(*path):
    def damage(d):
        obj = d
        for k in path[:-1]:
            obj = obj[k]
        del obj[path[-1]]
    return damage


def _top(key, value):
    def damage(d):
        d[key] = value
    return damage


# (name, how the results.json of a run is damaged, what the usage error says after "--replot: DIR/results.json: ")
DAMAGED = [
    ("list", lambda d: [1, 2], 'the top level is a list; expected an object with "metadata" and "rows"'),
    ("meta_missing", _del("metadata"), "no metadata at the top level"),
    ("rows_missing", _del("rows"), "no rows at the top level"),
    ("meta_str", _top("metadata", "hi"), "metadata is a string; expected an object"),
    ("rows_dict", _top("rows", {"a": 1}), "rows is an object; expected a list"),
    ("row_is_int", lambda d: d["rows"].__setitem__(0, 5), "rows[0] is an integer; expected an object"),
    ("row_missing_latency", _del("rows", 0, "latency_ms"), "rows[0] has no latency_ms; expected a finite number or null"),
    ("row_missing_preset", _del("rows", 1, "preset"), "rows[1] has no preset; expected a string"),
    ("row_str_latency", _set(0, "latency_ms", "fast"),
     'rows[0].latency_ms is "fast" (a string); expected a finite number or null'),
    ("row_nan_latency", _set(1, "latency_ms", float("nan")), "rows[1].latency_ms is NaN (a number); expected a finite"),
    ("row_inf_q3", _set(1, "q3_ms", float("inf")), "rows[1].q3_ms is Infinity (a number); expected a finite"),
    ("row_bool_latency", _set(0, "latency_ms", True), "rows[0].latency_ms is true (a boolean); expected a finite"),
    ("row_huge_int_latency", _set(0, "latency_ms", 10**400),
     f"rows[0].latency_ms is 1{'0' * 36}... (an integer); expected a finite number within ±1e308"),
    ("row_null_latents", _set(0, "latents", None), "rows[0].latents is null; expected a finite number"),
    ("row_str_budget", _set(0, "budget", "4"), 'rows[0].budget is "4" (a string); expected an integer or null'),
    ("row_int_backend", _set(0, "backend", 7), "rows[0].backend is 7 (an integer); expected a string"),
    ("row_list_ratio", _set(0, "latency_over_flops", [1]), "rows[0].latency_over_flops is [1] (a list)"),
    ("row_null_q1", _set(0, "q1_ms", None), "rows[0].q1_ms is null while rows[0].latency_ms is"),
    ("row_median_outside_iqr", _set(0, "q3_ms", 0.0), "rows[0]: expected q1_ms <= latency_ms <= q3_ms"),
    ("meta_list_j_max", _meta("j_max", [4]), "metadata.j_max is [4] (a list); expected an integer or null"),
    ("meta_int_commit", _meta("git_commit", 5), "metadata.git_commit is 5 (an integer); expected a string or null"),
    ("row_str_tflops", _set(0, "tflops", "fast"), 'rows[0].tflops is "fast" (a string); expected a finite number or '
     "null"),
    ("row_nan_pct_peak", _set(1, "pct_peak_flops", float("nan")), "rows[1].pct_peak_flops is NaN (a number)"),
    ("row_float_steps", _set(0, "steps", 2.5), "rows[0].steps is 2.5 (a number); expected an integer or null"),
    ("row_huge_batch", _set(0, "batch", 10**400),
     f"rows[0].batch is 1{'0' * 36}... (an integer); expected an integer within ±1e308"),
]


@pytest.mark.parametrize("name,damage,says", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_replot_of_a_damaged_results_json_is_a_usage_error(replot_src, tmp_path, capsys, name, damage, says):
    """Every field --replot reads is checked, with its type, before anything is drawn: a usage error naming the
    file, the row and the key, never a traceback, and nothing written."""
    data = json.loads((replot_src / "results.json").read_text())
    data = damage(data) or data
    d = tmp_path / name
    d.mkdir()
    path = d / "results.json"
    path.write_text(json.dumps(data))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--replot", str(d)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --replot: {path}: {says}" in err, err
    assert "Traceback" not in err
    assert [p.name for p in d.iterdir()] == ["results.json"]  # nothing written


@pytest.mark.parametrize("name", ["failed_row", "null_latency_only", "no_rows", "garbage_targets", "no_metadata_keys"])
def test_replot_accepts_what_a_run_can_write(replot_src, tmp_path, capsys, name):
    """Not damage: a failed case (no times), an empty table, a stale targets list (--replot recomputes it),
    metadata without the optional keys."""
    data = json.loads((replot_src / "results.json").read_text())
    if name == "failed_row":
        data["rows"][0].update(latency_ms=None, q1_ms=None, q3_ms=None, cpu_ms=None, latency_ratio=None,
                               latency_over_flops=None, cpu_ratio=None, cpu_over_flops=None, gflops=None)
    elif name == "null_latency_only":
        data["rows"][0]["latency_ms"] = None
    elif name == "no_rows":
        data["rows"] = []
    elif name == "garbage_targets":
        data["targets"] = [{"x": 1}]
    else:
        data["metadata"] = {}
    (tmp_path / "results.json").write_text(json.dumps(data))
    assert main(["--replot", str(tmp_path)]) == 0
    assert (tmp_path / "summary.md").read_text().startswith("### CPU")
    assert (tmp_path / "latency_vs_latents.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replot_of_a_results_json_older_than_a_row_field_derives_it(replot_src, tmp_path, capsys):
    """The committed CPU results predate the rows' ``steps``, ``tflops`` and ``pct_peak_flops``: --replot refused
    them ("rows[0] has no steps"), and once it read them it showed "-" for TFLOP/s. It now fills ``steps`` (None),
    ``tflops`` (GFLOPs over the median latency) and ``pct_peak_flops`` (against the file's measured peak, when it
    has one)."""
    data = json.loads((replot_src / "results.json").read_text())
    timed = [r for r in data["rows"] if r["latency_ms"] and r["gflops"]]
    assert timed, "the fixture run has timed rows with FLOPs"
    for r in data["rows"]:
        for key in ("steps", "tflops", "pct_peak_flops"):
            r.pop(key, None)
    for peaks, d in ((None, tmp_path / "old"), ({"tflops": 2.0, "dtype": "float32"}, tmp_path / "peaks")):
        d.mkdir()
        data["metadata"].pop("peaks", None)
        if peaks:
            data["metadata"]["peaks"] = peaks
        (d / "results.json").write_text(json.dumps(data))
        assert main(["--replot", str(d)]) == 0
        table = [line for line in (d / "summary.md").read_text().splitlines() if line.startswith("| paper")]
        r = timed[0]
        want_tf = r["gflops"] / r["latency_ms"]
        row = next(line for line in table if f"| {r['latency_ms']:.1f} |" in line and f"| {r['gflops']:.2f} |" in line)
        cells = [c.strip() for c in row.split("|")]
        i = cells.index(f"{r['gflops']:.2f}")
        assert float(cells[i + 1]) == pytest.approx(want_tf, rel=2e-3, abs=1e-3), row
        assert cells[i + 2] == ("-" if peaks is None else f"{100 * want_tf / 2.0:.1f}"), row
    from elit_kernels.bench.report import derive_rows

    rows = [{"gflops": 6.0, "latency_ms": 2.0, "tflops": 9.0}, {"gflops": None, "latency_ms": 2.0}]
    got = derive_rows(rows, {"peaks": {"tflops": 3.0}})
    assert [(g["steps"], g["tflops"], g["pct_peak_flops"]) for g in got] == [(None, 9.0, 300.0), (None, None, None)]
    assert "steps" not in rows[0] and "pct_peak_flops" not in rows[1]  # the rows given are left as they were


@pytest.mark.parametrize("argv,got", [
    (["--budgets", "99", "--device", "cuda"], "got --budgets, --device"),
    (["--device", "cuda", "--budgets", "99"], "got --device, --budgets"),  # in the order given
    (["--seed", "0"], "got --seed"),  # given, even at its default value
    (["--budg=4", "--no-progress"], "got --budgets, --no-progress"),  # abbreviated, --flag=value
    (["--breakdown", "--out", "X"], "got --breakdown"),
])
def test_replot_refuses_run_flags(replot_src, tmp_path, capsys, argv, got):
    src = tmp_path / "src"
    src.mkdir()
    (src / "results.json").write_bytes((replot_src / "results.json").read_bytes())
    with pytest.raises(SystemExit) as e:
        main(["--replot", str(src)] + [str(tmp_path / a) if a == "X" else a for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --replot: takes no run flags; {got} (" in err and "only flag it takes is --out" in err, err
    assert [p.name for p in src.iterdir()] == ["results.json"] and not (tmp_path / "X").exists()  # nothing written


def test_replot_writes_to_out_and_leaves_the_source_as_it_was(replot_src, tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "a" / "dst"
    src.mkdir()
    for f in ("results.json", "results.csv"):
        (src / f).write_bytes((replot_src / f).read_bytes())
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in src.iterdir()}
    assert main(["--replot", str(src), "--out", str(dst)]) == 0
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in src.iterdir()} == before  # untouched
    assert sorted(p.name for p in dst.iterdir()) == sorted(OUTPUT_FILES)
    assert (dst / "results.json").read_bytes() == (src / "results.json").read_bytes()
    assert (dst / "results.csv").read_text() == (src / "results.csv").read_text()  # what the run wrote
    assert (dst / "summary.md").read_text() == (replot_src / "summary.md").read_text()
    assert (dst / "latency_vs_latents.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {dst / 'summary.md'}" in capsys.readouterr().out
    # OUT can itself be replotted, and --out DIR naming the source is the in-place replot
    assert main(["--replot", str(dst), "--out", str(dst)]) == 0
    assert sorted(p.name for p in dst.iterdir()) == sorted(OUTPUT_FILES)
    help_out = " ".join(build_parser().format_help().split())
    assert "with --out OUT, write all four files to OUT" in help_out and "Takes no other flag" in help_out


def test_replot_refuses_an_out_it_cannot_write(replot_src, tmp_path, capsys):
    (tmp_path / "results.json").write_bytes((replot_src / "results.json").read_bytes())
    with pytest.raises(SystemExit) as e:
        main(["--replot", str(tmp_path), "--out", str(tmp_path / "results.json")])
    assert e.value.code == 2
    assert f"error: --out: {tmp_path / 'results.json'} exists and is not a folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_usage_error_from_the_console_has_no_traceback():
    r = subprocess.run([sys.executable, "-m", "elit_kernels.bench", "--config", "tiny", "--resolution", "64",
                        "--budgets", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "error: --budgets: each budget must be in 1..4" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_every_option_has_help_and_states_its_default():
    for a in build_parser()._actions:
        assert a.help and a.help.strip(), a.option_strings
        if a.default not in (None, False, "==SUPPRESS=="):
            assert f"default {a.default}" in a.help or "default:" in a.help, (a.option_strings, a.default, a.help)


def test_the_cpu_runtime_statement_is_one():
    """README, the CLI's docstring and --help give the CPU default's run time in the same words."""
    import pathlib

    readme = " ".join((pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert cli.CPU_DEFAULT_RUNTIME in readme
    assert cli.CPU_DEFAULT_RUNTIME in " ".join(build_parser().format_help().split())
    assert "CPU_DEFAULT_RUNTIME" in cli.__doc__ and "a few minutes" not in cli.__doc__


def _resolve(argv):
    return resolve(build_parser().parse_args(argv))


@pytest.mark.parametrize("argv,why", [
    (["--device", "cpu", "--config", "S/2", "--resolution", "64", "--presets", "paper"], "J_max is 1 for S/2 at 64px"),
    (TINY + ["--budgets", "4"], "--budgets 4 gives only J_max = 4"),
])
def test_one_point_budget_sweep_warns(argv, why):
    setup, extra = _resolve(argv)
    assert setup.budgets == [setup.cfgs["paper"].latents_per_group]
    assert len(extra["warnings"]) == 1 and "one-point budget sweep" in extra["warnings"][0] and why in extra["warnings"][0]


@pytest.mark.parametrize("argv,says,not_said", [
    (TINY + ["--budgets", "4", "--scenarios", "uniform"], ["uniform ratio"], ["mixed", "guidance", "sampling"]),
    (TINY + ["--budgets", "4", "--scenarios", "mixed"], ["mixed batch"], ["uniform", "guidance", "sampling"]),
    (TINY + ["--budgets", "4"], ["uniform ratio", "mixed batch"], ["guidance", "sampling"]),  # weak J̃ 1 < J_max 4
    (["--device", "cpu", "--config", "S/2", "--resolution", "64", "--presets", "paper", "--scenarios",
      "uniform,guidance,sampling"], ["uniform ratio", "guidance and sampling weak budget equals J_max"], ["mixed"]),
])
def test_one_point_sweep_warning_names_only_the_selected_scenarios(argv, says, not_said):
    (w,) = _resolve(argv)[1]["warnings"]
    assert w.startswith("a one-point budget sweep")
    assert all(x in w for x in says) and not any(x in w for x in not_said), w


@pytest.mark.parametrize("scenarios", ["guidance", "baselines"])
def test_no_one_point_warning_when_no_selected_scenario_needs_a_sweep(scenarios):
    # guidance's weak budget is max(1, J_max // 16), not one of --budgets: at J_max 4 it is 1, still a contrast
    assert _resolve(TINY + ["--budgets", "4", "--scenarios", scenarios])[1]["warnings"] == []


def test_no_warning_for_an_ordinary_run():
    assert _resolve(TINY)[1]["warnings"] == []


@pytest.mark.parametrize("flag", ["float16", "fp16"])
def test_fp16_on_cpu_warns_and_suggests_bf16_or_fp32(flag):
    warnings = _resolve(TINY + ["--dtype", flag])[1]["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith(f"--dtype {flag} on a CPU: most CPUs have no fp16 matmul")
    assert "prefer --dtype bf16 or fp32" in warnings[0]
    assert _resolve(TINY + ["--dtype", "bf16"])[1]["warnings"] == []


@pytest.mark.parametrize("name", ["triton", "triton_window"])
def test_interpreted_triton_warns(monkeypatch, name):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if name not in known_backends() or not __import__("elit_kernels").attention.get_backend(name).is_available():
        pytest.skip(__import__("elit_kernels").attention.get_backend(name).unavailable_reason)
    _, extra = _resolve(TINY + ["--backends", f"torch,{name}"])
    assert [w for w in extra["warnings"] if "Triton interpreter" in w and w.startswith(f"backend {name} ")], \
        extra["warnings"]


def test_warnings_print_before_anything_runs(monkeypatch, capsys):
    def no_run(setup, extra, progress=True):
        err = capsys.readouterr().err
        assert "warning: a one-point budget sweep" in err, err
        raise SystemExit(7)

    monkeypatch.setattr(cli, "run", no_run)
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--budgets", "4"])
    assert e.value.code == 7


def _case(name, batch=2, budgets=None, call_ms=None, inner=1, warm_s=None, times=0):
    c = Case("uniform", name, "elit", "torch", 1, budgets if budgets is not None else [1] * batch, batch, 1.0, lambda: None)
    c.call_ms, c.inner, c.warm_s, c.times_ms = call_ms, inner, warm_s, [1.0] * times
    return c


def test_a_value_is_printed_with_the_digits_its_verdict_needs():
    from elit_kernels.bench.report import targets_text, value_text

    fail = {"value": 1.10036, "limit": 1.10, "holds": False}
    assert value_text(fail) == "1.1004"  # 3 decimals would print 1.100, which reads as meeting <= 1.10
    assert value_text({"value": 1.0996, "limit": 1.10, "holds": True}) == "1.100"  # a pass at 1.100 reads right
    assert value_text({"value": 0.93217, "limit": 0.95, "holds": True}) == "0.932"
    assert value_text({"value": 1.1000004, "limit": 1.10, "holds": False}) == "1.1000004"
    line = targets_text([{**fail, "target": "latency_ratio <= 1.10 x flops_ratio", "clock": "cpu", "preset": "paper",
                          "backend": "torch", "budget": 2, "meant_for": "CPU and GPU", "informational": False}], "CPU")[-2]
    assert line.startswith("  FAIL") and line.endswith("value=1.1004"), line


def test_remaining_seconds_covers_warm_up_and_timing():
    cpu = torch.device("cpu")
    probe = _case("probe", call_ms=100.0, inner=1, warm_s=0.3)
    other = _case("cfg", budgets=[1] * 4)  # not warmed up yet: counted at the probe's speed
    fast = _case("fast", call_ms=5.0, inner=4, warm_s=0.02)
    # Before timing: other's warm-up (0.3 s) + 3 repeats of every case (probe 0.1, other 0.1, fast 4 × 0.005).
    assert remaining_seconds([other], [probe, other, fast], 3, probe, cpu) == pytest.approx(0.3 + 3 * (0.1 + 0.1 + 0.02))
    # Part-way through timing only the missing samples are left, each case at its own measured speed.
    probe.times_ms, fast.times_ms = [1.0] * 3, [1.0] * 2
    other.call_ms, other.warm_s = 150.0, 0.5
    assert remaining_seconds([], [probe, other, fast], 3, probe, cpu) == pytest.approx(3 * 0.15 + 1 * 0.02)


def test_remaining_seconds_counts_each_backend_at_its_own_probe():
    # A compiled backend's warm-up holds a compile, which each of its budget signatures pays again: its cases are
    # counted at its own probe's warm-up and speed, not at the eager probe's.
    cpu = torch.device("cpu")
    probe = _case("probe", call_ms=100.0, warm_s=0.3)
    compiled_probe = _case("probe", call_ms=40.0, warm_s=20.0)
    compiled_probe.backend = "torch+compile"
    eager, compiled = _case("a"), _case("b")
    compiled.backend = "torch+compile"
    by_backend = {"torch": probe, "torch+compile": compiled_probe}
    got = remaining_seconds([eager, compiled], [eager, compiled], 2, probe, cpu, by_backend)
    assert got == pytest.approx(0.3 + 20.0 + 2 * (0.1 + 0.04))
    # without the map every case counts at the probe's (the old estimate: 20 s of compile missing)
    assert remaining_seconds([eager, compiled], [eager, compiled], 2, probe, cpu) == pytest.approx(0.6 + 2 * 0.2)


def test_estimate_includes_the_compile_of_each_signature(monkeypatch):
    # A stand-in for torch.compile whose compile takes 1 s per budget signature (a real inductor compile is tens of
    # seconds at S/2 on this CPU): the estimate printed before timing must hold those seconds.
    import time

    class SlowToCompile(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.seen = model, set()

        def forward(self, x, t, y, budgets=None, **kw):
            if repr(budgets) not in self.seen:
                self.seen.add(repr(budgets))
                time.sleep(1.0)
            return self.model(x, t, y, budgets, **kw)

    monkeypatch.setattr(torch, "compile", lambda model, **kw: SlowToCompile(model))
    events, estimates = [], []
    monkeypatch.setattr(cli, "_say", lambda msg: events.append(msg))
    real = cli._estimate
    monkeypatch.setattr(cli, "_estimate", lambda extra, *a: (real(extra, *a), estimates.append(extra["estimate_s"])))
    assert main(TINY + ["--presets", "paper", "--scenarios", "uniform", "--budgets", "1,2,4", "--repeats", "1",
                        "--backends", "torch,torch+compile"]) == 0
    est = next(e for e in events if e.startswith("estimated run time"))
    assert "torch: warm-up" in est and "torch+compile: warm-up 1." in est and "(compile)" in est, est
    # all three 1 s compiles are in the estimate: the probe's, already spent, and two more counted at its speed (a
    # lower bound only, so a slow or loaded machine cannot fail it; counted at the eager probe's speed it was < 1 s)
    assert estimates[0] >= 3.0, estimates


def test_estimate_does_not_charge_one_time_start_up_to_every_case(monkeypatch):
    # FlopCounterMode's first entry in a process costs 0.9 s on this CPU (its op table), every later one 0.2 ms:
    # charged to the first case's warm-up, at which the estimate counts every case not yet warmed up, it made a
    # 4 s tiny run estimate 40 s. A stand-in whose first entry costs 5 s: that is start-up, spent once.
    import time

    from torch.utils import flop_counter

    real_enter, entered = flop_counter.FlopCounterMode.__enter__, []

    def enter(self):
        if not entered:
            entered.append(True)
            time.sleep(5.0)
        return real_enter(self)

    monkeypatch.setattr(flop_counter.FlopCounterMode, "__enter__", enter)
    estimates = []
    real = cli._estimate
    monkeypatch.setattr(cli, "_estimate", lambda extra, *a: (real(extra, *a), estimates.append(extra["estimate_s"])))
    monkeypatch.setattr(cli, "_say", lambda msg: None)
    assert main(TINY + ["--presets", "paper", "--scenarios", "uniform", "--budgets", "1,2,4", "--repeats", "1"]) == 0
    # the 5 s are in the estimate once (spent before it), not three times (once per case: >= 15 s); the run's own
    # share, ~1.5 s here, may double on a loaded machine
    assert 5.0 <= estimates[0] < 10.0, estimates


class _RecordingProgress:
    updates: list = []

    def __init__(self, enabled):
        _RecordingProgress.updates = []

    def update(self, done_s, left_s, desc=None):
        self.updates.append((done_s, left_s, desc))

    def close(self):
        pass


def test_estimate_before_timing_and_one_bar_over_the_run(monkeypatch, capsys):
    events = []
    monkeypatch.setattr(cli, "_say", lambda msg: events.append(msg))
    real = cli.run_interleaved
    monkeypatch.setattr(cli, "run_interleaved", lambda *a, **k: (events.append("<timing>"), real(*a, **k))[1])
    monkeypatch.setattr(cli, "RunProgress", _RecordingProgress)
    monkeypatch.setattr(cli, "LONG_RUN_MINUTES", 0)  # any estimate is "long": the warning must show
    t0 = __import__("time").monotonic()
    assert main(TINY + ["--presets", "paper", "--scenarios", "uniform", "--repeats", "6"]) == 0
    took = __import__("time").monotonic() - t0
    i_est = next(i for i, e in enumerate(events) if e.startswith("estimated run time"))
    assert events.index("<timing>") > i_est
    assert events[i_est + 1].startswith("warning: this run takes about") and "--max-seconds" in events[i_est + 1]
    ups = _RecordingProgress.updates
    assert {u[2] for u in ups} == {"warm-up + FLOPs", "timing"}
    # The bar's first total already covers timing (6 repeats of every case dominate this run), not warm-up alone.
    first_total = ups[0][0] + ups[0][1]
    assert 0.25 * took < first_total < 4 * took, (first_total, took)
    assert ups[-1][1] == pytest.approx(0.0, abs=1e-9)  # ends at 100%


def test_no_long_run_warning_under_the_limit(monkeypatch):
    events = []
    monkeypatch.setattr(cli, "_say", lambda msg: events.append(msg))
    monkeypatch.setattr(cli, "LONG_RUN_MINUTES", 10_000)
    assert main(TINY + ["--presets", "paper", "--scenarios", "uniform", "--repeats", "1"]) == 0
    assert any(e.startswith("estimated run time") for e in events)
    assert not any(e.startswith("warning") for e in events), events


def test_console_table_keeps_every_cell_whole():
    from elit_kernels.bench.report import ROW_FIELDS

    long_budgets = ",".join(str(j) for j in range(1, 30))
    row = dict.fromkeys(ROW_FIELDS)
    row.update(preset="released", scenario="guidance", case="ccfg_two_pass", model="official", backend="sdpa_dense",
               budgets=long_budgets, latents=123.5, latency_ms=12345.678, q1_ms=1.0, q3_ms=2.0, cpu_ms=3.0, gflops=4.0)
    table = format_table([row], [], "CPU")
    for v in ("released", "ccfg_two_pass", "sdpa_dense", long_budgets, "12345.68", "123.5"):
        assert v in table, v


def test_budget_lists_are_compact_and_whole():
    from elit_kernels.bench.report import _compact

    assert _compact([16] * 4 + [1] * 4) == "16x4,1x4"
    assert _compact([1, 2, 2, 8]) == "1,2,2,8"
    assert _compact([4, 4]) == "4x2"


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


def _row(scenario, case, model, backend, budget, ms, budgets="-", over_flops=None, flops_ratio=None):
    return {"preset": "paper", "scenario": scenario, "case": case, "model": model, "backend": backend, "budget": budget,
            "budgets": budgets, "latency_ms": ms, "cpu_ms": None, "latency_over_flops": over_flops, "cpu_over_flops": None,
            "flops_ratio": flops_ratio}


def test_check_targets_pairs_rows_and_limits():
    """Each target divides the right pair of rows and compares with its own limit (values chosen on both sides). The
    J_max row is its own latency reference (1.00 by construction): no check, which could not fail."""
    rows = [_row("uniform", "uniform", "elit", "torch", 16, 100.0, over_flops=1.0, flops_ratio=1.0),
            _row("uniform", "uniform", "elit", "torch", 4, 40.0, over_flops=1.12, flops_ratio=0.357),
            _row("uniform", "uniform", "official", "sdpa_dense", 16, 101.0),
            _row("uniform", "uniform", "official", "sdpa_dense", 4, 38.0),
            _row("mixed", "ragged", "elit", "torch", 16, 60.0, "16x2,1x2"),
            _row("mixed", "sum_of_parts", "elit", "torch", 16, 10.0),  # the elit sum of parts is not the reference
            _row("mixed", "sum_of_parts", "official", "sdpa_dense", 16, 65.0),
            _row("guidance", "ccfg", "elit", "torch", 16, 95.0, "16x4,1x4"),
            _row("guidance", "ccfg_two_pass", "elit", "torch", 16, 100.0, "16x4,1x4"),
            _row("guidance", "ccfg_two_pass", "official", "sdpa_dense", 16, 50.0, "16x4,1x4")]
    got = {(t["target"].split(" <=")[0], str(t["budget"])): (round(t["value"], 4), t["holds"]) for t in check_targets(rows)}
    assert got == {("latency_ratio", "4"): (1.12, False),
                   ("ragged / dense", "16"): (round(100 / 101, 4), True), ("ragged / dense", "4"): (round(40 / 38, 4), False),
                   ("mixed ragged", "16x2,1x2"): (round(60 / 65, 4), True), ("one-pass CCFG", "16x4,1x4"): (0.95, False)}


def test_measure_memory_cpu_counts_the_live_peak():
    """CPU peak = the most bytes alive at once during the call, not the total allocated: two 1 MiB temporaries
    alive together then freed, then a third one: 2 MiB."""
    x = torch.randn(512, 512)  # 1 MiB, held before the call: not counted

    def fn():
        a = x + 1
        b = a * 2
        del a, b
        c = x - 1
        return float(c[0, 0])
    case = Case("s", "c", "plain", "torch", None, [], 1, 0.0, fn)
    assert measure_memory(case, torch.device("cpu")) == pytest.approx(2.0, abs=0.01)


def test_each_repeat_visits_every_case_once_in_its_own_seeded_order():
    from elit_kernels.bench import timing

    orders = [timing.repeat_order(6, r) for r in range(8)]
    assert all(sorted(o) == list(range(6)) for o in orders)
    assert len({tuple(o) for o in orders}) > 1, "a fixed order charges the same cases every repeat"
    assert len({o[0] for o in orders}) > 1, "the same case would always go first"
    assert orders == [timing.repeat_order(6, r) for r in range(8)]  # the same orders in every run
    assert any(timing.repeat_order(6, r, seed=1) != timing.repeat_order(6, r, seed=0) for r in range(4))
    visits = []

    class _C:
        def __init__(self, i):
            self.i, self.times_ms, self.cpu_times_ms = i, [], []

    cases = [_C(i) for i in range(5)]
    real = timing.time_once
    try:
        timing.time_once = lambda case, device, rep: (visits.append(case.i), (1.0, 1.0))[1]
        assert timing.run_interleaved(cases, torch.device("cpu"), 3, seed=4) == 3
    finally:
        timing.time_once = real
    assert visits == [i for r in range(3) for i in timing.repeat_order(5, r, 4)]
    assert all(c.times_ms == [1.0] * 3 for c in cases)


def test_targets_say_what_they_are_and_where_a_fail_is_expected():
    """Each checked target prints what it is and the devices it is meant for; on a CPU the GPU targets' FAILs are
    marked informational, and the verdict counts them apart (on a GPU nothing is informational)."""
    from elit_kernels.bench.report import TARGET_INFO, markdown_summary, targets_text

    rows = [_row("uniform", "uniform", "elit", "torch", 16, 100.0, over_flops=1.0),
            _row("uniform", "uniform", "elit", "torch", 4, 40.0, over_flops=1.0),
            _row("uniform", "uniform", "official", "sdpa_dense", 16, 101.0),
            _row("uniform", "uniform", "official", "sdpa_dense", 4, 38.0),  # ragged/dense 40/38: a FAIL
            _row("guidance", "ccfg", "elit", "torch", 16, 95.0, "16x4,1x4"),  # 0.95 > 0.90: a FAIL
            _row("guidance", "ccfg_two_pass", "elit", "torch", 16, 100.0, "16x4,1x4")]
    cpu = check_targets(rows, "cpu")
    assert {(t["target"].split(" <=")[0], t["meant_for"], t["informational"]) for t in cpu} == {
        ("latency_ratio", "CPU and GPU", False), ("ragged / dense", "GPU", True), ("one-pass CCFG", "GPU", True)}
    assert not any(t["informational"] for t in check_targets(rows, "cuda"))
    text = "\n".join(targets_text(cpu, "CPU"))
    for key in ("latency_ratio", "ragged / dense", "one-pass CCFG"):
        assert TARGET_INFO[key]["name"] + ": " + TARGET_INFO[key]["what"] in text, key
    fails = [ln for ln in text.splitlines() if ln.lstrip().startswith("FAIL")]
    assert len(fails) == 2 and all(ln.endswith("(GPU target; on CPU informational)") for ln in fails), fails
    assert "on CPU informational, a FAIL is expected: on a CPU both paths run the same matmuls" in text
    assert text.splitlines()[-1].startswith("3 of 5 checks hold; 2 FAIL: 0 on targets meant for CPU, 2 on GPU-only")
    gpu_text = "\n".join(targets_text(check_targets(rows, "cuda"), "GPU"))
    assert "2 FAIL: 2 on targets meant for GPU." in gpu_text and "informational" not in gpu_text.split("checks hold")[1]
    md = markdown_summary([dict(r, q1_ms=None, q3_ms=None, cpu_ratio=None, latency_ratio=None, flops_ratio=None,
                                gflops=None, peak_mem_mb=None, latents=1) for r in rows], cpu, {"device_type": "cpu"})
    assert "| ragged / dense <= 1.00 | wall | paper | torch | 4 | 1.053 | FAIL | GPU (informational on CPU) |" in md
    assert "3 of 5 checks hold" in md


def test_no_internal_issue_numbers_in_user_facing_text():
    """README, docs, results, code and its comments speak to users: no "issue <number>" (the tracker is internal)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    files = [root / "README.md", *root.glob("docs/**/*.md"), *root.glob("benchmarks/**/*.md"),
             *root.glob("benchmarks/**/*.py"), *root.glob("elit_kernels/**/*.py"), *root.glob("tools/*"),
             *root.glob("tests/*.py"), *root.glob("csrc/**/*.*")]
    pat = re.compile(r"\bissues? *#? *\d|\bissue #", re.I)
    bad = [f"{p.relative_to(root)}:{i}" for p in files if p.is_file()
           for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if pat.search(line)]
    assert not bad, bad


# --- where one forward's time goes (elit_kernels.bench.breakdown) ---------------------------------------------

def test_op_kind_sorts_profiler_names():
    from elit_kernels.bench.breakdown import op_kind

    want = {"aten::scaled_dot_product_attention": "attention", "elit::varlen_attn_fwd_triton": "attention",
            "aten::_flash_attention_forward": "attention", "aten::linear": "matmul", "aten::addmm": "matmul",
            "aten::conv2d": "matmul", "aten::native_layer_norm": "norm/elementwise", "aten::gelu": "norm/elementwise",
            "aten::mul": "norm/elementwise", "aten::index_copy": "gather/copy", "aten::to": "gather/copy",
            "aten::cat": "gather/copy", "aten::embedding": "other"}
    assert {n: op_kind(n) for n in want} == want


def test_breakdown_attributes_self_time_to_innermost_stage_and_outermost_op():
    from types import SimpleNamespace as E

    from elit_kernels.bench.breakdown import attribute

    def ev(name, parent=None, cpu=0.0, dev=0.0):
        return E(name=name, cpu_parent=parent, self_cpu_time_total=cpu, self_device_time_total=dev)

    head = ev("elit.stage:head", cpu=100)
    read = ev("elit.stage:read", head, cpu=50)  # a stage inside another: the innermost one counts
    lin = ev("aten::linear", read, cpu=1, dev=0)
    mm = ev("aten::addmm", lin, cpu=2, dev=7)
    ln = ev("aten::layer_norm", head, cpu=3, dev=4)
    glue = ev("aten::index_select", None, cpu=5, dev=6)
    # On a GPU the profiler also lists each kernel as an event of its own (device_type CUDA, no host parent), whose
    # time its launching op's self_device_time_total already holds; and async events: neither counts again
    from torch.autograd import DeviceType
    kernel = E(name="sm90_xmma_gemm_bf16", cpu_parent=None, self_cpu_time_total=0, self_device_time_total=7,
               device_type=DeviceType.CUDA, is_async=False)
    async_ev = E(name="aten::copy_", cpu_parent=None, self_cpu_time_total=9, self_device_time_total=9,
                 device_type=DeviceType.CPU, is_async=True)
    events = [head, read, lin, mm, ln, glue, kernel, async_ev]
    assert attribute(events, device=True) == {("read", "matmul"): 7, ("head", "norm/elementwise"): 4,
                                              ("glue", "gather/copy"): 6}
    assert attribute(events, device=False) == {("read", "matmul"): 3, ("head", "norm/elementwise"): 3,
                                               ("glue", "gather/copy"): 5}


@pytest.mark.parametrize("preset", ["paper", "released"])
def test_forward_breakdown_covers_every_stage_and_leaves_the_model_as_it_was(preset):
    from elit_kernels.bench.breakdown import format_breakdown, forward_breakdown

    cfg = preset_config(preset, "tiny", 64)
    torch.manual_seed(0)
    m = ElitDiT(cfg).eval()
    randomize_(m, 1)
    x, t, y = _inputs(cfg, 3)
    budgets = [cfg.latents_per_group, 1, 2]
    with torch.no_grad():
        before = m(x, t, y, budgets)
    b = forward_breakdown(m, x, t, y, budgets)
    assert b["clock"] == "host" and b["total_ms"] > 0 and b["wall_ms"] > 0
    assert {"embed", "head", "read", "core", "write", "tail", "final"} <= set(b["stages"])
    for stage in ("head", "read", "core", "write", "tail"):
        assert any(r["stage"] == stage and r["kind"] == "attention" and r["ms"] > 0 for r in b["rows"]), stage
        assert any(r["stage"] == stage and r["kind"] == "matmul" and r["ms"] > 0 for r in b["rows"]), stage
    assert sum(r["ms"] for r in b["rows"]) == pytest.approx(b["total_ms"])
    assert sum(b["stages"].values()) == pytest.approx(b["total_ms"])
    assert sum(r["share"] for r in b["rows"]) == pytest.approx(1.0)
    assert [r["ms"] for r in b["rows"]] == sorted((r["ms"] for r in b["rows"]), reverse=True)
    for mod in m.modules():  # the hooks are gone: later calls pay nothing
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(m(x, t, y, budgets), before)
    text = format_breakdown(b, "t")
    assert text.splitlines()[0].startswith("t: host time") and "\n  all " in text and "read" in text


def test_cli_breakdown_profiles_largest_and_smallest_budget(tmp_path, capsys):
    out = tmp_path / "bd"
    assert main(TINY + ["--batch", "2", "--repeats", "1", "--warmup", "1", "--scenarios", "uniform", "--budgets", "1,2,4",
                        "--presets", "released", "--backends", "torch", "--breakdown", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("where one forward's time goes: released torch") == 2
    header = next(line for line in stdout.splitlines() if line.strip().startswith("stage"))
    assert " norm/elementwise " in header and "matmulnorm" not in header, header  # every column name stands apart
    bd = json.loads((out / "results.json").read_text())["metadata"]["breakdown"]
    assert sorted(b["budget"] for b in bd) == [1, 4]
    assert all(b["total_ms"] > 0 and b["stages"]["read"] > 0 for b in bd)


def test_cli_sampling_scenario_times_whole_runs_against_the_official_sampler(tmp_path, capsys):
    assert "sampling" not in build_parser().parse_args([]).scenarios.split(",")  # asked for by name only
    out = tmp_path / "s"
    assert main(TINY + ["--batch", "2", "--repeats", "1", "--warmup", "1", "--scenarios", "sampling", "--budgets", "4",
                        "--presets", "released", "--backends", "torch", "--sampling-steps", "2", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert data["metadata"]["sampling_steps"] == 2
    rows = {(r["case"], r["model"]): r for r in data["rows"] if r["scenario"] == "sampling"}
    assert set(rows) == {("ccfg", "elit"), ("ccfg_two_pass", "official")}
    for r in rows.values():
        assert r["steps"] == 2 and r["budgets"] == "4,4,1,1" and r["warmup_s"] > 0
        assert r["images_per_s"] == pytest.approx(2 / (r["latency_ms"] / 1e3))
        assert r["steps_per_s"] == pytest.approx(2 / (r["latency_ms"] / 1e3))
    ours, off = rows[("ccfg", "elit")], rows[("ccfg_two_pass", "official")]
    assert ours["latency_ratio"] == pytest.approx(ours["latency_ms"] / off["latency_ms"])
    # the same work both ways (same steps, budgets and batch): equal FLOPs
    assert ours["gflops"] == pytest.approx(off["gflops"], rel=0.02)
    t = [x for x in data["targets"] if x["target"].startswith("sampling CCFG")]
    assert t and all(x["informational"] for x in t) and "sampling run" in stdout
    assert "- released, sampling on torch: 2 CCFG steps of 2 images in " in (out / "summary.md").read_text()
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--sampling-steps", "0"])
    assert e.value.code == 2 and "--sampling-steps" in capsys.readouterr().err


def test_a_ctrl_c_during_the_breakdown_keeps_the_timed_results(tmp_path, capsys, monkeypatch):
    """gpu_check's stage limit (SIGINT) can fall in --breakdown, after the deadline: the timed rows are written with
    the breakdowns done, and elit-bench exits 130 saying so, instead of losing the whole run;
    found reading the GPU-only code paths, 2026-12-07."""
    import elit_kernels.bench.breakdown as bd_mod

    real = bd_mod.forward_breakdown
    calls = []

    def second_interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(bd_mod, "forward_breakdown", second_interrupted)
    out = tmp_path / "bd"
    assert main(TINY + ["--batch", "2", "--repeats", "1", "--warmup", "1", "--scenarios", "uniform", "--budgets", "1,4",
                        "--presets", "released", "--backends", "torch", "--breakdown", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "breakdown interrupted at released torch" in err and "interrupted during --breakdown" in err
    res = json.loads((out / "results.json").read_text())
    assert len(res["metadata"]["breakdown"]) == 1 and res["rows"]
    assert all(r["latency_ms"] and r["repeats"] == 1 for r in res["rows"])  # every case timed


def test_op_bench_warms_up_every_forward_first_and_flex_last():
    # bench_ops stops warming up at 70 % of --max-seconds: the 12-04 H200 run warmed in the table's order and timed
    # only the first shape's forwards. Forwards of every shape come first, then forward + backward, then the slack
    # rows, then FlexAttention (it compiles per shape and pass); within each, the table's order.
    from cases import load_script
    from elit_kernels.bench.attention_cases import Method

    ops = load_script("benchmarks/bench_ops.py", "bench_ops")
    planned = []
    for shape, kind in (("read", "read"), ("core", "core"), ("slack", "slack")):
        for ps in ("fwd", "fwd+bwd"):
            for name in ("elit:default", "flex_attention"):
                planned.append(({"shape": shape, "kind": kind, "pass": ps}, Method(name, True, None), None))
    got = [(planned[i][0]["shape"], planned[i][0]["pass"], planned[i][1].name) for i in ops.warm_up_order(planned)]
    assert got == [("read", "fwd", "elit:default"), ("core", "fwd", "elit:default"),
                   ("read", "fwd+bwd", "elit:default"), ("core", "fwd+bwd", "elit:default"),
                   ("slack", "fwd", "elit:default"), ("slack", "fwd+bwd", "elit:default"),
                   ("read", "fwd", "flex_attention"), ("core", "fwd", "flex_attention"),
                   ("read", "fwd+bwd", "flex_attention"), ("core", "fwd+bwd", "flex_attention"),
                   ("slack", "fwd", "flex_attention"), ("slack", "fwd+bwd", "flex_attention")]
