"""Round 40 of the hostile-user findings, each with the test that failed before its fix:

1. a torch checkpoint cut short (an interrupted download) is a CheckpointError naming the file, exit 2 in the CLIs;
2. ``$ELIT_BACKEND`` is checked at start-up by elit-sample / elit-demo / elit-bench, an elit-bench run whose every
   case failed exits non-zero, and rows run on ``$ELIT_BACKEND`` say so;
3. elit-sample's samples do not depend on N (a run grown to a larger --num-samples is bitwise a fresh one);
4. a ``.npy`` holding NaN or inf is a damaged sample, never copied into the .npz;
5. elit-bench / elit-demo write their files whole or not at all, and a write error is one line;
6. the small ones: a folder as elit-sample's checkpoint, duplicate --scenarios, --weak-latents above the budget,
   --dtype fp16 on a CPU.
"""
import errno
import json
import os
import pathlib
import random

import numpy as np
import pytest
import torch

from elit_kernels import _cli, known_backends
from elit_kernels import sample as S
from elit_kernels.models import ElitDiT, elit_config, load_model, save_model
from elit_kernels.models.checkpoint import CheckpointError, safe_torch_load
from elit_kernels.sample import files as F
from elit_kernels.sample import options as O
from elit_kernels.sample import run as R

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "elit_sit_tiny_a.pt"
ARCH = ["--arch", "num_heads=2", "--arch", "dit_decoder_depth=1"]
SHORT = ["--num-samples", "2", "--steps", "1", "--no-progress"]  # a run of seconds, should a check let it start


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(autouse=True)
def no_env_backend(monkeypatch):
    monkeypatch.delenv("ELIT_BACKEND", raising=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random ElitDiT (8x8 latents, 10 classes, J_max 4) saved as a user would have it."""
    d = tmp_path_factory.mktemp("r40_inputs")
    torch.manual_seed(40)
    model = ElitDiT(elit_config("tiny", 64)).eval()
    with torch.no_grad():
        for p in model.parameters():  # random everywhere (the init zeroes the output layers)
            p.normal_(0, 0.05)
    path = d / "tiny.pt"
    save_model(str(path), model)
    return str(path)


def gen(ckpt, out, **kw):
    kw.setdefault("steps", 2)
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda *a, **k: None)
    kw.setdefault("backend", "torch")
    kw.setdefault("latents_only", True)
    return S.generate(ckpt, str(out), **kw)


def npz(path):
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def cut(src, dst, rng):
    """``dst``: the first few per cent of ``src`` (an interrupted download), a random length in the range where
    torch's zip reader seeks before the file's start (a file shorter than a zip's largest end record)."""
    data = pathlib.Path(src).read_bytes()
    n = rng.randint(8_000, 60_000)
    pathlib.Path(dst).write_bytes(data[:n])
    return n


# --- 1. a truncated torch checkpoint --------------------------------------------------------------------------------
def test_truncated_torch_checkpoint_is_a_checkpoint_error_naming_file_and_size(tmp_path):
    rng = random.Random()
    bad = tmp_path / f"download_{rng.randrange(10**6)}.pt"
    n = cut(FIXTURE, bad, rng)
    from elit_kernels.official import load_checkpoint

    for load in (safe_torch_load, lambda p: load_checkpoint(p, arch={"num_heads": 2, "dit_decoder_depth": 1}),
                 load_model):
        with pytest.raises(CheckpointError) as e:
            load(str(bad))
        msg = str(e.value)
        assert msg.startswith(f"{bad}: cannot be read as a torch checkpoint"), msg
        assert f"the file has {n} bytes, starting b'PK" in msg and "truncated" in msg


def test_truncated_checkpoint_of_ours_is_a_checkpoint_error(tmp_path, ckpt):
    bad = tmp_path / "ours.pt"
    n = cut(ckpt, bad, random.Random())
    with pytest.raises(CheckpointError, match=rf"^{bad}: cannot be read .* the file has {n} bytes"):
        load_model(str(bad))


def test_missing_and_unreadable_checkpoints_still_say_so(tmp_path, monkeypatch, ckpt, capsys):
    gone = tmp_path / f"gone_{random.randrange(10**6)}.pt"
    with pytest.raises(FileNotFoundError, match=str(gone)):
        load_model(str(gone))
    with pytest.raises(IsADirectoryError):
        load_model(str(tmp_path))

    def refused(path, *a, **k):  # root reads every file: a permission refused, as the OS would raise it
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
    monkeypatch.setattr(torch, "load", refused)
    with pytest.raises(PermissionError, match="Permission denied"):
        load_model(ckpt)
    with pytest.raises(SystemExit) as e:  # elit-sample: one line naming the file, exit 2
        S.main([ckpt, "--latents-only", "--out", str(tmp_path / "o"), *SHORT])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"checkpoint: cannot read {ckpt} (Permission denied)" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_truncated_checkpoint_exits_2_from_the_clis(tmp_path, capsys):
    from elit_kernels.official.cli import main as convert_main

    bad = tmp_path / "half.pt"
    n = cut(FIXTURE, bad, random.Random())
    with pytest.raises(SystemExit) as e:
        convert_main([str(bad), "--out", str(tmp_path / "never.pt"), *ARCH])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{bad}: cannot be read as a torch checkpoint" in err and f"{n} bytes" in err
    assert not (tmp_path / "never.pt").exists()
    with pytest.raises(SystemExit) as e:
        S.main([str(bad), *ARCH, "--latents-only", "--out", str(tmp_path / "s"), *SHORT])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"checkpoint: {bad}: cannot be read as a torch checkpoint" in err
    assert not (tmp_path / "s").exists()


# --- 2. $ELIT_BACKEND -----------------------------------------------------------------------------------------------
def typo():
    """A backend name that is not registered (a typo of one that is)."""
    name = random.choice(known_backends())
    k = random.randrange(len(name))
    return name[:k] + name[k + 1:] + random.choice("xqz")


def test_elit_sample_checks_elit_backend_before_writing(tmp_path, ckpt, capsys, monkeypatch):
    bad = typo()
    monkeypatch.setenv("ELIT_BACKEND", bad)
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        S.main([ckpt, "--latents-only", "--out", str(out), "--num-samples", "1", "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith(f"elit-sample: error: ELIT_BACKEND: unknown backend {bad!r}; "
                                                    f"choose from {', '.join(known_backends())}")
    assert not out.exists()  # no config.json, lock or latents/ left behind
    with pytest.raises(S.UsageError, match=f"^ELIT_BACKEND: unknown backend {bad!r}"):  # the API too
        S.generate(ckpt, str(out), latents_only=True, num_samples=1, steps=1, progress=False)
    assert not out.exists()
    # --backend names the backend: the variable is not read
    monkeypatch.setenv("ELIT_BACKEND", bad)
    res = gen(ckpt, out, num_samples=1, steps=1)
    assert res.generated == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend can run here")
def test_elit_sample_refuses_an_elit_backend_that_cannot_run_the_model(tmp_path, ckpt, capsys, monkeypatch):
    monkeypatch.setenv("ELIT_BACKEND", " cuda\n")  # spaces around it, as a script may leave them
    with pytest.raises(SystemExit) as e:
        S.main([ckpt, "--latents-only", "--out", str(tmp_path / "o"), *SHORT])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "ELIT_BACKEND: backend 'cuda' cannot run this model (cpu, float32" in err
    assert "Usable here: " in err and not (tmp_path / "o").exists()


def test_elit_sample_runs_on_a_valid_elit_backend(tmp_path, ckpt, monkeypatch):
    monkeypatch.setenv("ELIT_BACKEND", "torch")
    a = gen(ckpt, tmp_path / "env", backend=None, num_samples=2, seed=7)
    b = gen(ckpt, tmp_path / "flag", backend="torch", num_samples=2, seed=7)
    assert np.array_equal(npz(a.npz)["arr_0"], npz(b.npz)["arr_0"])


def test_elit_demo_checks_elit_backend_at_start_up(tmp_path, capsys, monkeypatch):
    from elit_kernels.demo import main as demo_main

    bad = typo()
    monkeypatch.setenv("ELIT_BACKEND", bad)
    out = tmp_path / "d"
    with pytest.raises(SystemExit) as e:
        demo_main(["--steps", "1", "--batch", "4", "--sample-steps", "1", "--eval-reps", "1", "--no-progress",
                   "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith(f"elit-demo: error: ELIT_BACKEND: unknown backend {bad!r}; choose "
                                                    f"from {', '.join(known_backends())}")
    assert not out.exists()


BENCH = ["--config", "tiny", "--resolution", "64", "--presets", "paper", "--repeats", "1", "--scenarios", "uniform",
         "--budgets", "4", "--no-progress"]


def test_elit_bench_checks_elit_backend_for_default_dispatch(tmp_path, capsys, monkeypatch):
    from elit_kernels.bench.cli import main as bench_main

    bad = typo()
    monkeypatch.setenv("ELIT_BACKEND", bad)
    with pytest.raises(SystemExit) as e:
        bench_main([*BENCH, "--backends", "torch,default", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith(f"elit-bench: error: ELIT_BACKEND: unknown backend {bad!r}; "
                                                    f"choose from {', '.join(known_backends())}")
    assert not (tmp_path / "b").exists()


def test_elit_bench_labels_rows_run_on_elit_backend(tmp_path, capsys, monkeypatch):
    from elit_kernels.bench.cli import main as bench_main

    monkeypatch.setenv("ELIT_BACKEND", "reference")
    out = tmp_path / "b"
    assert bench_main([*BENCH, "--backends", "default,torch", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    elit = {r["backend"] for r in data["rows"] if r["model"] == "elit"}
    assert elit == {"default (ELIT_BACKEND=reference)", "torch"}
    assert any("ELIT_BACKEND=reference" in n for n in data["metadata"]["notes"])
    assert "default (ELIT_BACKEND=reference)" in capsys.readouterr().out
    assert bench_main(["--replot", str(out)]) == 0  # the file stays readable by its own --replot
    assert "default (ELIT_BACKEND=reference)" in (out / "summary.md").read_text()


def test_elit_bench_exits_non_zero_when_every_case_failed(tmp_path, capsys, monkeypatch):
    from elit_kernels.bench import cli

    why = f"simulated failure {random.randrange(10**6)}"

    def fails(*a, **k):
        raise RuntimeError(why)
    monkeypatch.setattr(cli, "warm_up", fails)
    rc = cli.main([*BENCH, "--backends", "torch", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and any(why in line and "FAILED" in line for line in err)
    assert err[-1].startswith("elit-bench: error: every case failed (") and "nothing was timed" in err[-1]


# --- 3. samples do not depend on N ------------------------------------------------------------------------------
@pytest.mark.parametrize("mix", [None, "4:1,2:1,1:1"], ids=["one_budget", "budget_mix"])
def test_growing_num_samples_gives_the_samples_of_a_fresh_run(tmp_path, ckpt, mix):
    rng = random.Random()
    seed, b = rng.randrange(1, 10**6), 4
    n1, n2 = rng.randint(1, 3), rng.randint(6, 9)
    kw = dict(batch_size=b, seed=seed, budget_mix=mix, steps=2)
    if mix is None:  # the released tiny model (16x16 latents), where a batch of 3 rounds unlike a batch of 4
        ckpt, kw["arch"] = str(FIXTURE), {"num_heads": 2, "dit_decoder_depth": 1}
    fresh = npz(gen(ckpt, tmp_path / "fresh", num_samples=n2, **kw).npz)
    grown = tmp_path / "grown"
    small = npz(gen(ckpt, grown, num_samples=n1, **kw).npz)
    assert sorted(os.listdir(grown / "latents")) == [f"{i:06d}.npy" for i in range(n1)]  # the padding: not written
    res = gen(ckpt, grown, num_samples=n2, **kw)
    assert (res.generated, res.skipped) == (n2 - n1, n1)
    got = npz(res.npz)
    for k in fresh:
        assert np.array_equal(got[k], fresh[k]), k  # bitwise
    assert np.array_equal(small["arr_0"], fresh["arr_0"][:n1])


def test_canonical_batches_are_the_same_for_every_n():
    rng = random.Random()
    b = rng.randint(2, 7)
    mix = [(j, rng.randint(1, 9)) for j in rng.sample(range(1, 65), rng.randint(1, 4))]
    rule = S.budget_rule(mix)
    big = rng.randint(400, 600)
    full = S.plan_batches(S.mix_budgets(mix, range(big)), b, rule)
    for n in rng.sample(range(1, 200), 20):
        got = S.plan_batches(S.mix_budgets(mix, range(n)), b, rule)
        assert all(len(x) == b for x in got)  # every batch full: the last one of each budget padded past n
        assert got == [x for x in full if min(x) < n], n  # the k-th b indices of each budget, whatever n
        assert sorted(i for x in got for i in x if i < n) == list(range(n))
        for x in got:
            assert len(set(rule(min(x), min(x) + 1).tolist() + [int(rule(i, i + 1)[0]) for i in x])) == 1
    assert S.plan_batches([3] * 5, 4, S.budget_rule(3)) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_mix_budgets_in_integers_match_the_rule_in_fractions():
    from fractions import Fraction

    rng = random.Random()
    phi = 0x9E3779B97F4A7C15
    for _ in range(30):
        mix = [(j, Fraction(rng.randint(1, 999), rng.randint(1, 999))) for j in rng.sample(range(1, 65), rng.randint(1, 5))]
        total, cums, acc = sum(w for _, w in mix), [], Fraction(0)
        for j, w in mix:
            acc += w / total
            cums.append((acc, j))
        idx = [rng.randrange(2 ** 63) for _ in range(40)] + list(range(rng.randrange(1000), 1000 + 40))
        want = [next(j for c, j in cums if Fraction((i + 1) * phi % 2 ** 64, 2 ** 64) < c) for i in idx]
        assert S.mix_budgets(mix, idx) == want
        start = rng.randrange(10**9)
        assert S.mix_budgets(mix, range(start, start + 50)) == S.mix_budgets(mix, list(range(start, start + 50)))


# --- 4. a non-finite .npy on disk -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_npy_on_disk_is_damaged_and_sampled_again(tmp_path, ckpt, bad_value):
    rng = np.random.default_rng()
    out = tmp_path / "o"
    kw = dict(num_samples=4, batch_size=2, seed=int(rng.integers(1, 10**6)), steps=1)
    want = npz(gen(ckpt, out, **kw).npz)
    k = int(rng.integers(0, 4))
    arr = rng.standard_normal((4, 8, 8)).astype(np.float32)  # right shape and dtype: same size as a good file
    arr.flat[int(rng.integers(0, arr.size))] = bad_value
    np.save(out / "latents" / f"{k:06d}.npy", arr)
    notes = []
    res = gen(ckpt, out, log=notes.append, **kw)
    assert res.generated == 1
    note = next(n for n in notes if "damaged" in n)
    assert f"{k:06d}.npy" in note and "NaN or inf" in note
    got = npz(res.npz)
    assert np.isfinite(got["arr_0"]).all() and np.array_equal(got["arr_0"], want["arr_0"])


def test_a_npy_of_another_dtype_but_the_same_size_is_damaged(tmp_path):
    rng = np.random.default_rng()
    shape = (4, 8, 8)
    np.save(tmp_path / "000000.npy", rng.standard_normal(shape).astype(np.float32))
    np.save(tmp_path / "000001.npy", rng.integers(1, 100, shape).astype(np.int32))  # same size, not a sample
    assert os.path.getsize(tmp_path / "000000.npy") == os.path.getsize(tmp_path / "000001.npy")
    assert F.damaged_samples(str(tmp_path), [0, 1], "npy", F.npy_size(shape, np.float32), shape) == [1]


def test_the_npz_never_takes_a_non_finite_sample(tmp_path, ckpt, monkeypatch):
    """A file turned non-finite after the resume check (damage while the run goes on) stops the .npz."""
    out = tmp_path / "o"
    gen(ckpt, out, num_samples=3, steps=1)
    os.unlink(out / "latents.npz")
    arr = np.random.default_rng().standard_normal((4, 8, 8)).astype(np.float32)
    arr[1, 2, 3] = np.nan
    np.save(out / "latents" / "000002.npy", arr)
    monkeypatch.setattr(R, "damaged_samples", lambda *a, **k: [])  # the damage comes after the check
    with pytest.raises(S.SamplingError, match=r"000002\.npy holds NaN or inf, so no \.npz was written"):
        gen(ckpt, out, num_samples=3, steps=1)
    assert not (out / "latents.npz").exists()


# --- 5. whole files or none -------------------------------------------------------------------------------------
def full_disk_savefig(monkeypatch):
    """matplotlib's savefig writing half a PNG, then the disk is full."""
    from matplotlib.figure import Figure

    def savefig(self, fname, *a, **k):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Figure, "savefig", savefig)


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    from elit_kernels.bench.cli import main as bench_main

    out = tmp_path_factory.mktemp("r40_bench")
    assert bench_main([*BENCH, "--backends", "torch", "--out", str(out)]) == 0
    return out


def test_bench_replot_on_a_full_disk_keeps_the_old_png(tmp_path, bench_out, capsys, monkeypatch):
    from elit_kernels.bench.cli import main as bench_main

    dst = tmp_path / "x"
    dst.mkdir()
    old = os.urandom(64)
    (dst / "latency_vs_latents.png").write_bytes(old)
    full_disk_savefig(monkeypatch)
    capsys.readouterr()
    assert bench_main(["--replot", str(bench_out), "--out", str(dst)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"elit-bench: error: cannot write {dst / 'latency_vs_latents.png'} (No space left on device): "
                       "not written (a file already there is left as it was)")
    assert (dst / "latency_vs_latents.png").read_bytes() == old
    assert sorted(os.listdir(dst)) == ["latency_vs_latents.png", "results.csv", "results.json", "summary.md"]


def test_bench_text_outputs_are_whole_or_absent(tmp_path, bench_out, monkeypatch):
    from elit_kernels.bench import report

    data = json.loads((bench_out / "results.json").read_text())
    rows, md = data["rows"], data["metadata"]
    real_open = open
    old = os.urandom(32).hex()

    class HalfFull:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[:len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(report, "open", lambda *a, **k: HalfFull(real_open(*a, **k)), raising=False)
    for name in ("results.json", "summary.md"):
        (tmp_path / name).write_text(old)
    with pytest.raises(_cli.OutputWriteError, match=f"^cannot write {tmp_path / 'results.json'} "
                       r"\(No space left on device\)"):
        report.write_outputs(str(tmp_path), rows, data["targets"], md)
    assert (tmp_path / "results.json").read_text() == old
    with pytest.raises(_cli.OutputWriteError, match="results.csv"):
        report.write_csv(str(tmp_path / "results.csv"), rows)
    assert sorted(os.listdir(tmp_path)) == ["results.json", "summary.md"]  # no temporary or partial file left


def test_demo_figures_are_whole_or_absent(tmp_path, monkeypatch):
    from elit_kernels.demo.evaluate import write_loss_png

    path = tmp_path / "loss_by_budget.png"
    old = os.urandom(48)
    path.write_bytes(old)
    full_disk_savefig(monkeypatch)
    with pytest.raises(_cli.OutputWriteError, match=f"^cannot write {path} \\(No space left on device\\)"):
        write_loss_png(str(path), {j: random.random() for j in range(1, 5)}, 1, 4)
    assert path.read_bytes() == old and os.listdir(tmp_path) == [path.name]


def test_demo_write_error_is_one_line(tmp_path, capsys, monkeypatch):
    from elit_kernels import demo

    def full(path, *a, **k):
        raise _cli.OutputWriteError(path, OSError(errno.ENOSPC, "No space left on device"))
    monkeypatch.setattr(demo, "write_grid_png", full)
    monkeypatch.setattr(demo, "heldout_loss_by_budget", lambda m, x, y, budgets, **k: {b: 1.0 / b for b in budgets})
    monkeypatch.setattr(demo, "sample_grid", lambda m, rows, classes, **k: torch.rand(len(rows), len(classes), 1, 16, 16))
    out = tmp_path / "d"
    rc = demo.main(["--steps", "0", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1] == (f"elit-demo: error: cannot write {out / 'samples.png'} (No space left on device): "
                                   "not written (a file already there is left as it was)")


# --- 6. the small ones ------------------------------------------------------------------------------------------
def test_elit_sample_says_a_folder_is_a_folder(tmp_path, capsys):
    d = tmp_path / f"ckpt_{random.randrange(10**6)}"
    d.mkdir()
    with pytest.raises(SystemExit) as e:
        S.main([str(d), "--latents-only", "--out", str(tmp_path / "o"), *SHORT])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"checkpoint: {d} is a folder (expected a file)" in err and "no such file" not in err


def test_elit_bench_scenarios_named_twice_run_once():
    from elit_kernels.bench.cli import build_parser, resolve

    names = ["uniform", "mixed", "guidance"]
    picked = random.sample(names, 2)
    text = ",".join(picked + picked[::-1] + picked)
    _, extra = resolve(build_parser().parse_args([*BENCH[:6], "--scenarios", text, "--backends", "torch"]))
    assert extra["scenarios"] == picked


def test_weak_latents_above_the_budget_are_refused_naming_both(tmp_path, ckpt, capsys):
    j = random.randint(1, 3)  # the model's J_max is 4
    weak = random.randint(j + 1, 4)
    with pytest.raises(SystemExit) as e:
        S.main([ckpt, "--latents-only", "--out", str(tmp_path / "o"), *SHORT, "--guidance",
                random.choice(["ccfg", "autoguidance", "ccfg_two_pass"]), "--cfg-scale", "2", "--latents", str(j),
                "--weak-latents", str(weak)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--weak-latents: the weak pass's {weak} latents per group are more than the " \
        f"conditional pass's {j} (--latents)" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(S.UsageError, match=r"^weak_latents: .* more than the conditional pass's 1 \(the smallest J "
                                           r"of --budget-mix\)"):
        gen(ckpt, tmp_path / "m", budget_mix="4:1,1:1", guidance="ccfg", cfg_scale=2.0, weak_latents=2)
    # equal is fine (CCFG then is CFG), and the default J_max // 16 never exceeds a budget the user chose...
    O.check_weak_budget(j, [j, 4], "latents", "weak_latents")
    # ...except where the budget is below it: then the budget's option is named, with what to pass
    low, dflt = random.randint(1, 3), random.randint(4, 8)
    with pytest.raises(S.UsageError, match=rf"^budget_mix: {low} latents per group is below the weak pass's default "
                                           rf"of {dflt} .* pass --weak-latents {low} or less"):
        O.check_weak_budget(dflt, [64, low], "budget_mix", None)


def test_fp16_on_a_cpu_warns_as_elit_bench_does(tmp_path, ckpt):
    from elit_kernels.bench.cli import build_parser, resolve

    with pytest.warns(UserWarning, match=r"^dtype float16 on a CPU: most CPUs have no fp16 matmul and PyTorch "
                                         r"emulates it, many times slower than fp32"):
        gen(ckpt, tmp_path / "o", num_samples=1, steps=1, dtype="float16")
    _, extra = resolve(build_parser().parse_args([*BENCH[:6], "--dtype", "fp16", "--backends", "torch"]))
    assert [w for w in extra["warnings"] if w.startswith(_cli.fp16_cpu_warning("--dtype fp16"))]


def test_fp16_on_a_cpu_warns_in_one_line_on_the_command_line(tmp_path, ckpt, capsys):
    assert S.main([ckpt, "--latents-only", "--out", str(tmp_path / "o"), *SHORT, "--dtype", "fp16",
                   "--backend", "torch"]) == 0
    err = capsys.readouterr().err
    assert f"elit-sample: warning: {_cli.fp16_cpu_warning('dtype fp16')}; prefer bfloat16 or float32\n" in err
    assert "UserWarning" not in err
