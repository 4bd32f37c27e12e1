"""elit-sample: files and their contents, the seeding rule, torchrun sharding, resume, failures, usage errors.

A tiny random ElitDiT (8x8 latents, 4 groups of P = 4) and a tiny random diffusers AutoencoderKL (downsample 8:
64x64 images), both saved to a temp folder as a user would have them.
"""
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from elit_kernels import flow
from elit_kernels import sample as S
from elit_kernels.sample import options as O
from elit_kernels.sample import run as R
from elit_kernels.flow import euler_sample
from elit_kernels.models import ElitDiT, elit_config, load_model, save_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
try:  # only decoding needs it: without it the --latents-only tests and the usage errors still run
    import diffusers
except ImportError:
    diffusers = None
NO_VAE = ("elit-sample decodes images with diffusers.AutoencoderKL, which is not installed (the [integrations] "
          "extra: pip install --no-build-isolation -e \".[integrations]\")")


def need_vae():
    if diffusers is None:
        pytest.skip(NO_VAE)
FIXTURE = ROOT / "tests" / "fixtures" / "elit_sit_tiny_a.pt"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample_inputs")
    torch.manual_seed(0)
    model = ElitDiT(elit_config("tiny", 64)).eval()  # 10 classes, J_max = 4
    with torch.no_grad():
        for p in model.parameters():  # random everywhere (the init zeroes the output layers)
            p.normal_(0, 0.05)
    save_model(str(d / "tiny.pt"), model)
    if diffusers is None:  # a folder where a decoder would be: what the flag checks read before any decoding
        (d / "vae").mkdir()
        (d / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}\n')
        return {"ckpt": str(d / "tiny.pt"), "vae": str(d / "vae")}
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=64)
    vae.save_pretrained(str(d / "vae"))
    return {"ckpt": str(d / "tiny.pt"), "vae": str(d / "vae")}


def run(files, out, **kw):
    kw.setdefault("steps", 2)
    kw.setdefault("progress", False)
    kw.setdefault("log", lambda *a, **k: None)
    kw.setdefault("backend", "torch")  # the Triton interpreter (TRITON_INTERPRET=1 here) would take minutes
    if not kw.get("latents_only"):
        need_vae()
        kw.setdefault("vae", files["vae"])
    return S.generate(files["ckpt"], str(out), **kw)


def npz(path):
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def png(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def torchrun(args, nproc=2, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "elit_kernels.sample", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


# --- the seeding rule and the plan ------------------------------------------------------------------------
def test_noise_labels_and_budgets_depend_on_the_index_only():
    shape = (4, 8, 8)
    a = S.sample_noise(3, [5, 6, 7], shape)
    assert torch.equal(a[1], S.sample_noise(3, [6], shape)[0])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], S.sample_noise(4, [5], shape)[0])
    assert a.dtype == torch.float32 and 0.5 < a.std() < 1.5
    assert S.sample_labels([3, 1, 4], range(7)) == [3, 1, 4, 3, 1, 4, 3]
    mix = S.parse_budget_mix("64:0.5,16:0.25,4:0.25")
    assert [j for j, _ in mix] == [64, 16, 4]
    got = S.mix_budgets(mix, range(2000))
    assert got[1000:1010] == S.mix_budgets(mix, range(1000, 1010))
    counts = {j: got.count(j) for j in (64, 16, 4)}
    assert abs(counts[64] - 1000) <= 5 and abs(counts[16] - 500) <= 5 and abs(counts[4] - 500) <= 5, counts
    # every short run of consecutive indices holds the mix too (golden-ratio sequence)
    assert all(abs(got[k:k + 40].count(64) - 20) <= 3 for k in range(0, 2000, 40))


def test_canonical_batches_do_not_depend_on_n_except_the_last_per_budget():
    bud = S.mix_budgets(S.parse_budget_mix("4:1,1:1"), range(50))
    full, short = S.plan_batches(bud, 4), S.plan_batches(bud[:30], 4)
    assert sorted(i for b in full for i in b) == list(range(50))
    assert all(len({bud[i] for i in b}) == 1 for b in full)  # one budget per batch (one graph signature)
    complete = [b for b in short if len(b) == 4]
    assert all(b in full for b in complete)


@pytest.mark.parametrize("text", ["4", "4:0", "x:1", "4:1,4:2", "4:-1", "4:nan", "4:inf", "2.7:1", "", "4:1,"])
def test_budget_mix_parse_errors_name_the_argument(text):
    with pytest.raises(S.UsageError, match="^budget_mix: "):
        S.parse_budget_mix(text)


# the list form goes through the string form's checks (it truncated 2.7 to 2, took weight -1 and duplicate J, and
# raised ZeroDivisionError / a raw ValueError / "'int' object is not iterable")
BAD_MIXES = [[(4, -1)], [(2.7, 1)], [(2.0, 1)], [(4, 1), (4, 2)], [(4, 0)], [(4, float("nan"))], [(4, float("inf"))],
             [(True, 1)], [(4, True)], [(4, "1")], [(4,)], [(4, 1, 2)], [4], [], 5, 2.5, b"4:1", {4: 1}.items]


@pytest.mark.parametrize("mix", BAD_MIXES)
def test_budget_mix_list_form_is_checked_like_the_string(mix):
    with pytest.raises(S.UsageError, match="^budget_mix: "):
        S.parse_budget_mix(mix)
    with pytest.raises(S.UsageError, match="^mix: "):
        S.mix_budgets(mix, range(3))


def test_budget_mix_list_form_accepts_int_j_and_real_weights():
    from fractions import Fraction

    got = S.parse_budget_mix([(4, 1), (np.int64(2), 0.5), (1, Fraction(1, 4))])
    assert got == [(4, Fraction(1)), (2, Fraction(1, 2)), (1, Fraction(1, 4))] and type(got[1][0]) is int
    # NumPy's float32 / float16 (not Fraction-able as they are) and float64 / ints: their exact values
    assert S.parse_budget_mix([(4, np.float32(0.5)), (2, np.float16(0.25)), (1, np.float64(0.25))]) == [
        (4, Fraction(1, 2)), (2, Fraction(1, 4)), (1, Fraction(1, 4))]
    assert S.mix_budgets(got, range(50)) == S.mix_budgets("4:1,2:0.5,1:0.25", range(50))


# --- one run ----------------------------------------------------------------------------------------------
def test_run_writes_pngs_grid_and_npz(files, tmp_path):
    out = tmp_path / "run"
    res = run(files, out, num_samples=7, batch_size=3, budget_mix="4:0.5,1:0.5", guidance="ccfg", cfg_scale=2.0,
              seed=5, grid=4)
    names = sorted(os.listdir(out / "samples"))
    assert names == [f"{i:06d}.png" for i in range(7)]
    d = npz(out / "samples.npz")
    assert set(d) == {"arr_0", "labels", "budgets"}
    assert d["arr_0"].shape == (7, 64, 64, 3) and d["arr_0"].dtype == np.uint8
    assert d["labels"].tolist() == [i % 10 for i in range(7)] and d["labels"].dtype == np.int64
    want_bud = S.mix_budgets([(4, 1), (1, 1)], range(7))
    assert d["budgets"].tolist() == want_bud and set(want_bud) == {4, 1}
    assert res.generated == 7 and res.skipped == 0 and res.budgets == want_bud
    for i in range(7):
        assert np.array_equal(png(out / "samples" / f"{i:06d}.png"), d["arr_0"][i])
    assert d["arr_0"].std() > 5  # a decoded image, not a constant
    sheet = png(out / "grid.png")
    assert sheet.shape == (2 * 64 + 2, 2 * 64 + 2, 3)
    assert np.array_equal(sheet[:64, 66:], d["arr_0"][1]) and np.array_equal(sheet[66:, 66:], d["arr_0"][3])
    # the ADM evaluator reads the stored member arr_0.npy's header and streams the rest
    with zipfile.ZipFile(out / "samples.npz") as zf, zf.open("arr_0.npy") as f:
        assert zf.getinfo("arr_0.npy").compress_type == zipfile.ZIP_STORED
        assert np.lib.format.read_magic(f) in ((1, 0), (2, 0))

    # the images are the decoded latents of the same samples: vae.decode(z / 0.18215), (x + 1) / 2 * 255, truncated
    lat = tmp_path / "lat"
    run(files, lat, num_samples=7, batch_size=3, budget_mix="4:0.5,1:0.5", guidance="ccfg", cfg_scale=2.0, seed=5,
        latents_only=True)
    z = npz(lat / "latents.npz")
    assert z["arr_0"].shape == (7, 4, 8, 8) and z["arr_0"].dtype == np.float32
    assert np.array_equal(z["labels"], d["labels"]) and np.array_equal(z["budgets"], d["budgets"])
    assert sorted(os.listdir(lat / "latents")) == [f"{i:06d}.npy" for i in range(7)]
    vae = diffusers.AutoencoderKL.from_pretrained(files["vae"]).eval()
    # each budget's last batch is filled past N (computed, not written): its padding's latents from a run of a larger
    # N, which holds the same samples 0..6 (sample i does not depend on N)
    batches = S.plan_batches(want_bud, 3, S.budget_rule([(4, 1), (1, 1)]))
    n_all = 1 + max(i for b in batches for i in b)
    run(files, tmp_path / "lat_all", num_samples=n_all, batch_size=3, budget_mix="4:0.5,1:0.5", guidance="ccfg",
        cfg_scale=2.0, seed=5, latents_only=True)
    z_all = npz(tmp_path / "lat_all" / "latents.npz")["arr_0"]
    assert np.array_equal(z_all[:7], z["arr_0"])
    for batch in batches:
        with torch.no_grad():
            x = vae.decode(torch.from_numpy(z_all[batch]) / 0.18215).sample
        want = torch.clamp(255 * (x + 1) / 2, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
        real = [i for i in batch if i < 7]
        assert np.array_equal(d["arr_0"][real], want[:len(real)])


def test_budget_mix_matches_euler_sample_per_sample(files, tmp_path):
    kw = dict(num_samples=6, batch_size=4, budget_mix="4:1,2:1,1:1", guidance="ccfg", cfg_scale=3.0, steps=3,
              sampler="heun", guidance_interval=(0.2, 0.9), weak_latents=1, seed=11)
    run(files, tmp_path / "o", latents_only=True, **kw)
    d = npz(tmp_path / "o" / "latents.npz")
    bud = d["budgets"].tolist()
    assert len(set(bud)) == 3
    model = load_model(files["ckpt"], backend="torch")
    common = dict(steps=3, mode="ccfg", scale=2.0, weak_budget=1, guidance_interval=(0.2, 0.9), heun=True)
    for i in range(6):  # each sample alone, at its recorded budget
        z = euler_sample(model, S.sample_noise(11, [i], (4, 8, 8)), torch.tensor([i % 10]), budget=[bud[i]], **common)
        torch.testing.assert_close(torch.from_numpy(d["arr_0"][i]), z[0], atol=2e-5, rtol=1e-4)
    rule = S.budget_rule("4:1,2:1,1:1")
    for b in S.plan_batches(bud, 4, rule):  # and bitwise in its canonical batch, filled past N = 6
        z = euler_sample(model, S.sample_noise(11, b, (4, 8, 8)), torch.tensor([i % 10 for i in b]),
                         budget=[int(rule(i, i + 1)[0]) for i in b], **common)
        real = [i for i in b if i < 6]
        assert len(b) == 4 and torch.equal(torch.from_numpy(d["arr_0"][real]), z[:len(real)])


def test_official_checkpoint_with_arch_and_a_float_budget(tmp_path, capsys):
    out = tmp_path / "o"
    rc = S.main([str(FIXTURE), "--arch", "num_heads=2", "--arch", "dit_decoder_depth=1", "--latents-only",
                 "--num-samples", "3", "--steps", "2", "--budget", "0.5", "--classes", "1,5", "--graphed",
                 "--no-progress", "--backend", "torch", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    d = npz(out / "latents.npz")
    assert d["arr_0"].shape == (3, 4, 16, 16) and d["budgets"].tolist() == [8, 8, 8]
    assert d["labels"].tolist() == [1, 5, 1]
    assert "CUDA graphs need a CUDA device" in text and "forward per step" in text and "FLOPs" in text
    assert "images/s" not in text and "latents/s" in text


# --- resume and failure -----------------------------------------------------------------------------------
def test_interrupted_run_resumes_without_duplicates_or_losses(files, tmp_path, monkeypatch):
    kw = dict(num_samples=8, batch_size=3, budget_mix="4:1,1:1", seed=2)
    ref = tmp_path / "ref"
    run(files, ref, **kw)
    want = npz(ref / "samples.npz")

    out = tmp_path / "out"
    calls = {"n": 0}
    real = R.latents_to_uint8

    def dies_on_the_third_batch(vae, z):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(vae, z)
    monkeypatch.setattr(R, "latents_to_uint8", dies_on_the_third_batch)
    with pytest.raises(S.SamplingError, match="rank 0 of 1 failed on samples .*simulated crash.*rerun"):
        run(files, out, **kw)
    monkeypatch.setattr(R, "latents_to_uint8", real)
    first = sorted(os.listdir(out / "samples"))
    b = S.plan_batches(S.mix_budgets([(4, 1), (1, 1)], range(8)), 3)
    assert first == sorted(f"{i:06d}.png" for i in b[0] + b[1])  # the two batches done are kept
    assert not (out / "samples.npz").exists()
    # damage the folder further: one sample deleted, a stale temporary file left behind
    os.unlink(out / "samples" / first[0])
    (out / "samples" / ".000001.png.123.abcd.tmp").write_bytes(b"partial")
    kept = {n: os.stat(out / "samples" / n).st_mtime_ns for n in first[1:]}

    res = run(files, out, **kw)
    assert (res.generated, res.skipped) == (9 - len(first), len(first) - 1)
    names = sorted(os.listdir(out / "samples"))
    assert names == [f"{i:06d}.png" for i in range(8)]  # no duplicates, nothing lost, temp file gone
    assert all(os.stat(out / "samples" / n).st_mtime_ns == t for n, t in kept.items())  # not rewritten
    got = npz(out / "samples.npz")
    for k in want:
        assert np.array_equal(got[k], want[k]), k  # bitwise the uninterrupted run

    res = run(files, out, **kw)  # nothing left to do
    assert (res.generated, res.skipped) == (0, 8)


@pytest.mark.parametrize("latents_only", [True, False], ids=["npy", "png"])
def test_resume_samples_damaged_files_again(files, tmp_path, latents_only):
    """A sample file is written by an atomic rename, so a damaged one comes from outside (a copy that ran out of
    disk, a crash of the file system). Resuming must not take it as done: the .npz would hold garbage or fail to
    build. Empty, truncated and foreign files are named, sampled again, and the result is the undamaged run's."""
    out = tmp_path / "o"
    kw = dict(num_samples=5, batch_size=2, seed=3, latents_only=latents_only)
    want = npz(run(files, out, **kw).npz)
    ext = "npy" if latents_only else "png"
    sub = out / ("latents" if latents_only else "samples")
    (sub / f"000001.{ext}").write_bytes(b"")
    whole = (sub / f"000002.{ext}").read_bytes()
    (sub / f"000002.{ext}").write_bytes(whole[:len(whole) // 2])
    (sub / f"000004.{ext}").write_bytes(b"not a sample " * 20)
    kept = {n: os.stat(sub / n).st_mtime_ns for n in (f"000000.{ext}", f"000003.{ext}")}
    notes = []
    res = run(files, out, log=notes.append, **kw)
    assert (res.generated, res.skipped) == (3, 2)
    note = next(n for n in notes if "damaged" in n)
    assert note.startswith("elit-sample: note: 3 sample file(s)") and f"000001.{ext}, 000002.{ext}, 000004.{ext}" in note
    assert all(os.stat(sub / n).st_mtime_ns == t for n, t in kept.items())  # the whole ones are kept
    got = npz(res.npz)
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    assert (sub / f"000002.{ext}").read_bytes() == whole


def test_samples_that_come_out_nan_or_inf_are_refused_not_written(files, tmp_path, monkeypatch):
    """NaN latents would decode to black images or garbage in the .npz, silently. The finite samples of the batch
    are written, the others named (index and J) with what to change; rerunning with the change resumes."""
    out = tmp_path / "o"
    kw = dict(num_samples=4, batch_size=4, seed=1, latents_only=True)
    real = flow.euler_sample

    def nan_in_sample_2(*a, **k):
        z = real(*a, **k)
        z[2] = float("nan")
        return z
    monkeypatch.setattr(flow, "euler_sample", nan_in_sample_2)
    with pytest.raises(S.SamplingError, match=r"rank 0 of 1 failed on samples 0\.\.3: SamplingError: sample 2 \(J=4\) "
                       r"came out NaN or inf, so no file was written for it; the model returned NaN or inf in "
                       r"torch.float32.*The finite samples are kept in .*; rerun with the change above"):
        run(files, out, **kw)
    assert sorted(os.listdir(out / "latents")) == ["000000.npy", "000001.npy", "000003.npy"]
    assert not (out / "samples.npz").exists()
    monkeypatch.setattr(flow, "euler_sample", real)
    with pytest.raises(S.SamplingError, match=r"SamplingError: samples 0 \(J=4\), 1 \(J=4\), 2 \(J=4\), 3 \(J=4\) came "
                       r"out NaN or inf.* by cfg_scale - 1 = 1e\+40, .* a smaller --cfg-scale keeps it finite"
                       r".*\. No sample was written; rerun with the change above$"):
        run(files, tmp_path / "huge", guidance="cfg", cfg_scale=1e40, **kw)
    # none came out finite: nothing to resume, so the folder it created goes, as after a Ctrl-C before the first one
    assert not (tmp_path / "huge").exists()
    (tmp_path / "was_here").mkdir()
    with pytest.raises(S.SamplingError, match=r"No sample was written"):
        run(files, tmp_path / "was_here", guidance="cfg", cfg_scale=1e40, **kw)
    assert not os.listdir(tmp_path / "was_here" / "latents")  # a folder that was there stays (as after a Ctrl-C)
    res = run(files, out, **kw)  # the cause gone, the run resumes: only sample 2 is sampled again
    assert (res.generated, res.skipped) == (1, 3)


def test_a_second_run_on_a_folder_in_use_is_refused(files, tmp_path):
    """Two runs on one --out would delete each other's temporary files and write the same samples twice: the
    second is refused by name, before it touches the folder, and the folder is free again once the first ends
    (however it ends: the lock is an flock, released by the operating system with its process)."""
    from elit_kernels.sample.files import lock_folder

    out = tmp_path / "o"
    run(files, out, num_samples=2, batch_size=2, latents_only=True)
    held = lock_folder(str(out))  # as a run in progress holds it (another open file: flock locks conflict)
    try:
        tmp = out / "latents" / ".000009.npy.1.abcd.tmp"
        tmp.write_bytes(b"another run's sample in the making")
        with pytest.raises(S.UsageError, match=r"^out: .* is being written by another elit-sample run \(pid "
                                               rf"{os.getpid()} on .*\); wait for it to finish or use another --out"):
            run(files, out, num_samples=3, batch_size=2, latents_only=True)
        assert tmp.exists()  # the other run's files were not touched
    finally:
        held.close()
    res = run(files, out, num_samples=3, batch_size=2, latents_only=True)
    assert (res.generated, res.skipped) == (1, 2)


def test_resume_refuses_a_folder_of_another_run(files, tmp_path, capsys):
    out = tmp_path / "o"
    run(files, out, num_samples=2, batch_size=2, seed=1, latents_only=True)
    with pytest.raises(S.UsageError, match=r"^out: .*different run \(seed: 1 there, 2 now"):
        run(files, out, num_samples=2, batch_size=2, seed=2, latents_only=True)
    notes = []
    run(files, out, num_samples=3, batch_size=1, seed=1, latents_only=True, log=notes.append)
    assert any("resuming with different batch_size (was 2, now 1)" in n for n in notes)


# --- torchrun ---------------------------------------------------------------------------------------------
def test_two_process_torchrun_matches_one_process(files, tmp_path):
    need_vae()
    classes = tmp_path / "classes.txt"
    classes.write_text("# a few classes\n3, 7\n9\n")
    common = [files["ckpt"], "--vae", files["vae"], "--num-samples", "7", "--steps", "2", "--class-file",
              str(classes), "--budget-mix", "4:2,2:1", "--guidance", "cfg", "--cfg-scale", "1.5", "--seed", "9",
              "--no-progress", "--backend", "torch"]
    r = torchrun(common + ["--batch-size", "2", "--out", str(tmp_path / "two")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 2 rank(s)" in r.stdout and "forward per step" in r.stdout
    two = npz(tmp_path / "two" / "samples.npz")
    assert two["labels"].tolist() == [[3, 7, 9][i % 3] for i in range(7)]

    one_res = run(files, tmp_path / "one", num_samples=7, steps=2, classes=[3, 7, 9], budget_mix="4:2,2:1",
                  guidance="cfg", cfg_scale=1.5, seed=9, batch_size=2)
    one = npz(one_res.npz)
    for k in ("arr_0", "labels", "budgets"):
        assert np.array_equal(one[k], two[k]), k  # bitwise: the batches are the same whatever the world size
    for i in range(7):
        assert (tmp_path / "two" / "samples" / f"{i:06d}.png").read_bytes() == \
               (tmp_path / "one" / "samples" / f"{i:06d}.png").read_bytes()

    # Another batch size: the same noise, labels and budgets; the images differ only where the batched matmuls
    # round differently (BLAS kernels depend on the row count), i.e. at most one uint8 level.
    other = npz(run(files, tmp_path / "three", num_samples=7, steps=2, classes=[3, 7, 9], budget_mix="4:2,2:1",
                    guidance="cfg", cfg_scale=1.5, seed=9, batch_size=3).npz)
    assert np.array_equal(other["labels"], two["labels"]) and np.array_equal(other["budgets"], two["budgets"])
    assert np.abs(other["arr_0"].astype(int) - two["arr_0"].astype(int)).max() <= 1


def test_a_failing_rank_stops_the_run_and_keeps_what_was_written(files, tmp_path):
    need_vae()
    out = tmp_path / "o"
    # batches of 1 at one budget: rank 0 gets samples 0, 2, 4; rank 1 gets 1, 3, 5. A folder where rank 1's
    # second PNG must go makes its write fail.
    (out / "samples" / "000003.png").mkdir(parents=True)
    r = torchrun([files["ckpt"], "--vae", files["vae"], "--num-samples", "6", "--steps", "1", "--batch-size", "1",
                  "--no-progress", "--backend", "torch", "--out", str(out)])
    assert r.returncode != 0
    assert "rank 1 of 2 failed on samples 3..3" in r.stderr and "rerun the same command" in r.stderr, r.stderr[-3000:]
    assert not (out / "samples.npz").exists()
    written = sorted(p.name for p in (out / "samples").iterdir() if p.is_file())
    assert {"000000.png", "000001.png"} <= set(written) and "000005.png" not in written
    assert not [n for n in os.listdir(out / "samples") if n.endswith(".tmp")]


# --- usage errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,flag", [
    (["--classes", "3,10"], "--classes: unknown class 10"),
    (["--classes", "3,cat"], "--classes: unknown class 'cat'"),
    (["--latents", "5"], "--latents: expected an int in [1, 4]"),
    (["--budget", "0.1"], "--budget: "),
    (["--budget", "65"], "--budget: "),
    (["--budget-mix", "4:1,8:1"], "--budget-mix: J = 8"),
    (["--guidance", "ccfg"], "--cfg-scale: guidance ccfg needs cfg_scale > 1"),
    (["--cfg-scale", "2"], "--guidance: "),
    (["--guidance", "cfg", "--cfg-scale", "2", "--weak-latents", "1"], "--weak-latents: "),
    (["--guidance-interval", "0.5,0.2"], "--guidance-interval: "),
    (["--num-samples", "0"], "--num-samples: "),
    (["--num-samples", "99999999999999999999"], "--num-samples: at most 10,000,000 samples per run"),
    (["--backend", "nope"], "--backend: unknown backend 'nope'"),
    (["--vae", "MISSING"], "--vae: no such folder"),
    (["--latents-only", "--vae", "VAE"], "--latents-only: "),
    (["--out", "FILE"], "--out: "),
    (["--out", "FILE/sub"], "--out: cannot write"),
    (["--class-file", "LATIN1"], "--class-file: "),  # not UTF-8: named, not a UnicodeDecodeError
])
def test_bad_arguments_exit_2_naming_the_argument(files, tmp_path, capsys, extra, flag):
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "latin1.txt").write_bytes(b"\xff\xfe1\n")
    sub = {"MISSING": str(tmp_path / "no_vae"), "VAE": files["vae"], "FILE": str(afile),
           "LATIN1": str(tmp_path / "latin1.txt")}
    extra = [sub.get(e, e.replace("FILE", str(afile))) for e in extra]
    argv = [files["ckpt"], "--num-samples", "2", "--steps", "1", "--no-progress"]
    if "--backend" not in extra:
        argv += ["--backend", "torch"]
    if "--vae" not in extra and "--latents-only" not in extra:  # without diffusers, --vae itself would be refused
        argv += ["--vae", files["vae"]] if diffusers is not None else ["--latents-only"]
    if "--out" not in extra:
        argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        S.main(argv + extra)
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag in err, err
    if "--out" not in extra:
        assert not (tmp_path / "out").exists()  # nothing created for a bad command


def test_missing_checkpoint_and_vae_hint(tmp_path, capsys, files):
    with pytest.raises(SystemExit) as e:
        S.main([str(tmp_path / "nope.pt"), "--latents-only", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "checkpoint: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        S.main([files["ckpt"], "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--vae: no decoder given" in err and "--latents-only" in err


@pytest.mark.parametrize("kw,name", [
    (dict(out=None), "out"), (dict(out=3), "out"), (dict(out=""), "out"), (dict(out=b"bytes_dir"), "out"),
    (dict(cfg_scale=True, guidance="cfg"), "cfg_scale"), (dict(cfg_scale=float("inf"), guidance="cfg"), "cfg_scale"),
    (dict(cfg_scale="2", guidance="cfg"), "cfg_scale"), (dict(cfg_scale=float("nan")), "cfg_scale"),
    (dict(guidance_interval="01"), "guidance_interval"), (dict(guidance_interval=(0, 0.5, 1)), "guidance_interval"),
    (dict(latents_only="yes"), "latents_only"), (dict(tf32=1), "tf32"), (dict(progress="no"), "progress"),
    (dict(graphed="yes"), "graphed"), (dict(dtype=["float32"]), "dtype"),
    (dict(budget_mix=5), "budget_mix"), (dict(budget_mix=[(4, 1), (4, 1)]), "budget_mix"),
    (dict(budget_mix=[(2.7, 1)]), "budget_mix"), (dict(budget_mix=[(4, 0)]), "budget_mix"),
    (dict(budget_mix=[(8, 1)]), "budget_mix"),  # J past this model's J_max = 4
    (dict(steps=2 ** 40), "steps"),  # past flow.MAX_STEPS: named before the times [steps + 1] are allocated
    (dict(guidance_interval={0: 1, 1: 2}), "guidance_interval"),  # a dict's keys are not a pair
    (dict(guidance_interval=(0.2, 0.9)), "guidance_interval"),  # guidance none guides no step: it would be ignored
])
def test_generate_refuses_bad_library_arguments_by_name(files, tmp_path, kw, name):
    kw = dict(kw)  # the parametrize dict is shared by every run of the test in this process: pop from a copy
    out = kw.pop("out", tmp_path / "o")
    kw = {"num_samples": 2, "steps": 1, "latents_only": True, "backend": "torch", "progress": False,
          "log": lambda *a, **k: None, **kw}
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a str(None) folder would land here
    try:
        with pytest.raises(S.UsageError, match=f"^{name}: "):
            S.generate(files["ckpt"], out, **kw)
    finally:
        os.chdir(cwd)
    assert os.listdir(tmp_path) == []  # nothing created for a bad call


def test_generate_takes_a_path_and_a_guidance_interval_that_guides_no_step(files, tmp_path):
    """out as a pathlib.Path; ccfg with an interval that holds no step's t_cur: every step is one plain pass (the
    start-up timing then runs unguided, without the weak budget it would ignore)."""
    out = tmp_path / "p"
    notes = []
    with pytest.warns(UserWarning, match=r"^guidance_interval: \(0, 0\.5\) holds none of the 1 steps' times \(1\)"):
        res = S.generate(files["ckpt"], out, num_samples=2, steps=1, latents_only=True, backend="torch",
                         progress=False, guidance="ccfg", cfg_scale=3.0, guidance_interval=(0.0, 0.5),
                         log=notes.append)
    assert res.out == str(out) and (out / "latents.npz").is_file()
    assert any("forward per step" in n and "guided" not in n for n in notes), notes


def test_class_file_reads_utf8_with_or_without_a_byte_order_mark(tmp_path):
    from elit_kernels.sample.cli import _read_classes

    for raw in (b"3, 7\n# a comment\n9\n", b"\xef\xbb\xbf3, 7\n9\n"):  # plain, and with a UTF-8 BOM
        (tmp_path / "c.txt").write_bytes(raw)
        assert _read_classes(None, str(tmp_path / "c.txt")) == [3, 7, 9]
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe1\n")
    with pytest.raises(S.UsageError, match=r"^class_file: .*c.txt is not UTF-8 text \(byte 0: invalid start byte\)"):
        _read_classes(None, str(tmp_path / "c.txt"))


def test_tf32_on_a_cpu_says_it_is_ignored(files, tmp_path):
    with pytest.warns(UserWarning, match="^tf32: ignored on cpu: TF32 is a matmul mode of CUDA GPUs"):
        run(files, tmp_path / "o", num_samples=1, steps=1, latents_only=True, tf32=True)


def test_generate_takes_numpy_numbers_and_writes_python_ones(files, tmp_path):
    """NumPy ints and bools (what reading a config array gives) are the Python values they equal: the run is the
    Python-valued run, and the run file records Python values (a NumPy scalar is not JSON)."""
    runs = {}
    for name, kw in (("py", dict(num_samples=2, steps=1, batch_size=2, seed=0, latents_only=True, progress=False)),
                     ("np", dict(num_samples=np.int64(2), steps=np.int32(1), batch_size=np.int64(2), seed=np.int64(0),
                                 latents_only=np.True_, progress=np.False_))):
        res = S.generate(files["ckpt"], tmp_path / name, backend="torch", log=lambda *a, **k: None, **kw)
        runs[name] = (res, np.load(res.npz)["arr_0"])
    assert runs["np"][0].num_samples == 2 and type(runs["np"][0].num_samples) is int
    assert np.array_equal(runs["np"][1], runs["py"][1])
    settings = {n: sorted(p.name for p in (tmp_path / n).iterdir()) for n in runs}
    assert settings["np"] == settings["py"]


# --- what the fuzzing of the sampler's edges found ------------------------------------------------------
def test_a_model_passed_in_is_left_as_it_was_and_resuming_with_another_model_is_refused(files, tmp_path):
    """generate(model) converted the caller's module in place (its dtype, eval mode, backend), and config.json named
    every module "<ElitDiT>": resuming with other weights mixed two models' samples in one run. The module is left
    as it was (a converted copy where the dtype differs), its name carries a fingerprint of its weights, and
    resuming with another model is refused; with the same one it resumes."""
    m = load_model(files["ckpt"]).train()
    w0 = next(m.parameters()).detach().clone()
    out = tmp_path / "o"
    kw = dict(num_samples=2, steps=1, batch_size=2, latents_only=True, progress=False, backend="torch",
              log=lambda *a, **k: None)
    S.generate(m, out, dtype="bfloat16", **kw)
    assert next(m.parameters()).dtype == torch.float32 and torch.equal(next(m.parameters()), w0)
    assert m.training and all(x.training for x in m.modules()) and m.backend is None
    other = load_model(files["ckpt"])
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    with pytest.raises(S.UsageError, match=r"^out: .*different run \(checkpoint: '<ElitDiT weights [0-9a-f]{16}>' "
                                           r"there, '<ElitDiT weights [0-9a-f]{16}>' now"):
        S.generate(other, out, dtype="bfloat16", **{**kw, "num_samples": 3})
    res = S.generate(m, out, dtype="bfloat16", **{**kw, "num_samples": 3})  # the same weights: resumes
    assert (res.generated, res.skipped) == (1, 2)
    with pytest.raises(S.UsageError, match="^arch: only for a checkpoint file"):
        S.generate(m, tmp_path / "x", arch={"num_heads": 2}, **kw)


def test_the_weak_budget_is_checked_against_every_j_of_a_mix_not_the_first_n_samples(files, tmp_path):
    """A mix whose smallest J falls on no sample of a small run passed the check, and the same run grown to more
    samples was then refused: the weak J is checked against every J of the mix (docs/sampling.md)."""
    mix = "4:0.9,1:0.1"
    assert 1 not in S.mix_budgets(mix, range(2))  # the first two samples have J = 4
    with pytest.raises(S.UsageError, match=r"^weak_latents: the weak pass's 2 latents per group are more than the "
                                           r"conditional pass's 1 \(the smallest J of --budget-mix\)"):
        run(files, tmp_path / "o", num_samples=2, latents_only=True, guidance="ccfg", cfg_scale=2.0,
            budget_mix=mix, weak_latents=2)


def test_numpy_numbers_in_arch_are_written_as_python_ones(tmp_path):
    """arch values as NumPy ints load (the loader takes them), and config.json, which is JSON, gets Python ints:
    it was a TypeError from json after the output folder was made."""
    import json

    out = tmp_path / "o"
    S.generate(str(FIXTURE), out, arch={"num_heads": np.int64(2), "dit_decoder_depth": np.int32(1)}, num_samples=1,
               steps=1, latents_only=True, backend="torch", progress=False, log=lambda *a, **k: None)
    arch = json.loads((out / "config.json").read_text())["settings"]["arch"]
    assert arch == {"num_heads": 2, "dit_decoder_depth": 1}


@pytest.mark.parametrize("world, env, why", [
    ("2", {}, "2 asks for a run of 2 processes, but RANK, MASTER_ADDR, MASTER_PORT are not set: launch it with "
              "torchrun"),
    ("2", {"RANK": "0", "MASTER_ADDR": "localhost"}, "MASTER_PORT is not set"),
    ("two", {}, "expected an int (the process count torchrun sets), got 'two'"),
])
def test_a_world_size_without_torchrun_is_a_usage_error(files, tmp_path, monkeypatch, capsys, world, env, why):
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", world)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        S.main([files["ckpt"], "--latents-only", "--num-samples", "1", "--steps", "1", "--no-progress",
                "--backend", "torch", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "elit-sample: error: WORLD_SIZE: " in err and why in err, err
    assert not (tmp_path / "o").exists()


def test_ctrl_c_before_the_first_sample_removes_the_folder_it_created_and_a_leftover_config_is_replaced(
        files, tmp_path, monkeypatch, capsys):
    """docs/sampling.md: stopped before anything was written, an output folder the run created is removed again
    (config.json, the run lock and the empty latents/ were left, and the folder then refused a run of other
    settings although it held no sample). In a folder that was there before, the run's config.json stays, and a
    run of other settings replaces it, with a note, because no sample depends on it."""
    argv = [files["ckpt"], "--latents-only", "--num-samples", "2", "--steps", "1", "--no-progress", "--backend",
            "torch"]

    def interrupted(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(R._Run, "sample", interrupted)
        assert S.main(argv + ["--out", str(tmp_path / "new" / "deep")]) == 130
        assert not (tmp_path / "new").exists()
        (tmp_path / "was_here").mkdir()
        assert S.main(argv + ["--out", str(tmp_path / "was_here")]) == 130
    assert (tmp_path / "was_here" / "config.json").is_file()
    assert "no sample was written yet" in capsys.readouterr().err
    notes = []
    res = S.generate(files["ckpt"], tmp_path / "was_here", num_samples=2, steps=1, seed=5, latents_only=True,
                     backend="torch", progress=False, log=notes.append)
    assert res.generated == 2
    assert any("wrote no sample: its config.json is replaced" in n and "seed: 0 there, 5 now" in n for n in notes)
    with pytest.raises(S.UsageError, match=r"^out: .*different run \(seed: 5 there, 0 now"):  # now it holds samples
        S.generate(files["ckpt"], tmp_path / "was_here", num_samples=2, steps=1, latents_only=True, backend="torch",
                   progress=False, log=notes.append)


@pytest.mark.parametrize("classes, why", [
    ("1,2", "expected a sequence of int class ids, got str '1,2' (on the command line: --classes 1,2,3)"),
    ({3, 1}, "expected an ordered sequence of int class ids"),
    (torch.tensor([[1, 2]]), "expected a 1-D integer tensor or array of class ids, got shape (1, 2)"),
    (np.array([1.0, 2.0]), "expected a 1-D integer tensor or array of class ids"),
    ([], "empty class list"),
])
def test_classes_of_the_wrong_kind_are_refused_by_name(files, tmp_path, classes, why):
    with pytest.raises(S.UsageError, match="^classes: " + __import__("re").escape(why)):
        run(files, tmp_path / "o", num_samples=2, latents_only=True, classes=classes)
    assert not (tmp_path / "o").exists()


def test_classes_as_a_tensor_or_array_are_the_list_they_hold(files, tmp_path):
    runs = [run(files, tmp_path / str(i), num_samples=3, latents_only=True, classes=c).labels
            for i, c in enumerate(([2, 7], torch.tensor([2, 7]), np.array([2, 7], dtype=np.int32)))]
    assert [list(map(int, r)) for r in runs] == [[2, 7, 2]] * 3


@pytest.mark.parametrize("text", ["0_1", "\u0661", "1.0", "0x1"])
def test_class_ids_on_the_command_line_are_ascii_digits(text):
    from elit_kernels.sample.cli import _read_classes

    with pytest.raises(S.UsageError, match="^classes: unknown class .*: expected integer class ids"):
        _read_classes(text, None)
    assert _read_classes(" 3, +4 ", None) == [3, 4]


def test_a_finished_run_whose_sample_files_were_deleted_still_refuses_other_settings(files, tmp_path):
    """After a run, deleting latents/ (keeping latents.npz) is common: its config.json still describes the .npz,
    and a run of other settings must be refused, not replace the config and overwrite the .npz."""
    import shutil

    out = tmp_path / "o"
    run(files, out, num_samples=2, latents_only=True)
    before = (out / "latents.npz").read_bytes()
    shutil.rmtree(out / "latents")
    with pytest.raises(S.UsageError, match=r"^out: .*different run \(seed: 0 there, 5 now"):
        run(files, out, num_samples=2, latents_only=True, seed=5)
    assert (out / "latents.npz").read_bytes() == before


def test_the_earlier_run_is_checked_again_under_the_lock(files, tmp_path, monkeypatch):
    """Whether the folder holds samples is decided again once the run holds the folder's lock: a run of other
    settings that finished between this run's start-up checks and its lock must not be taken for 'no sample yet'
    (its samples would be mixed with this run's under its config.json)."""
    out = tmp_path / "o"
    run(files, out, num_samples=2, latents_only=True)
    saved = {p.name: p.read_bytes() for p in (out / "latents").iterdir()}
    for p in (out / "latents").iterdir():
        p.unlink()
    (out / "latents.npz").unlink()
    real = R.lock_folder

    def finished_meanwhile(folder):
        for name, data in saved.items():  # the other run's samples land after the start-up check
            (out / "latents" / name).write_bytes(data)
        return real(folder)

    monkeypatch.setattr(R, "lock_folder", finished_meanwhile)
    with pytest.raises(S.UsageError, match=r"^out: .*different run \(seed: 0 there, 5 now"):
        run(files, out, num_samples=2, latents_only=True, seed=5)


def test_ctrl_c_before_the_lock_removes_nothing_another_run_wrote(files, tmp_path, monkeypatch):
    """A run stopped before it took the lock wrote nothing: the config.json and lock file in its folder are
    another run's (which holds the lock), even in a folder this process created."""
    from elit_kernels import _cli

    out = tmp_path / "o"
    assert _cli.output_dir_error(str(out)) is None  # created in this process
    (out / "config.json").write_text("{}")
    (out / ".elit-sample.lock").write_text("pid 1 on elsewhere\n")

    def interrupted(folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "lock_folder", interrupted)
    argv = [files["ckpt"], "--latents-only", "--num-samples", "2", "--steps", "1", "--no-progress", "--backend",
            "torch", "--out", str(out)]
    monkeypatch.setattr(O, "check_earlier_run", lambda *a, **k: [])  # the placeholder config.json is not compared
    assert S.main(argv) == 130
    assert sorted(p.name for p in out.iterdir()) == [".elit-sample.lock", "config.json", "latents"]


# --- the second fuzzing round: inputs identified by content, the output folder's entries, late failures ----
def _same_name_copies(files, tmp_path, scale=1.5):
    """``a/tiny.pt`` (the fixture's model) and ``b/tiny.pt`` (its weights x ``scale``): one name, one size."""
    m = load_model(files["ckpt"])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_model(str(tmp_path / "a" / "tiny.pt"), m)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    save_model(str(tmp_path / "b" / "tiny.pt"), m)
    a, b = tmp_path / "a" / "tiny.pt", tmp_path / "b" / "tiny.pt"
    assert os.path.getsize(a) == os.path.getsize(b)
    return str(a), str(b)


def test_resuming_with_another_checkpoint_of_the_same_name_and_size_is_refused(files, tmp_path, capsys):
    """config.json recorded the checkpoint's file name and size only: another model in a file of the same name and
    size resumed silently, and the .npz mixed two models. The weights' fingerprint is recorded and compared, as
    for a model passed in; the same file resumes."""
    a, b = _same_name_copies(files, tmp_path)
    out = str(tmp_path / "o")
    argv = ["--latents-only", "--steps", "1", "--batch-size", "2", "--no-progress", "--backend", "torch",
            "--out", out]
    assert S.main([a, "--num-samples", "2"] + argv) == 0
    with pytest.raises(SystemExit) as e:
        S.main([b, "--num-samples", "4"] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: --out: " in err and "checkpoint_weights: '" in err, err
    assert "the checkpoint given now holds other weights than the one that run used" in err, err
    assert sorted(os.listdir(os.path.join(out, "latents"))) == ["000000.npy", "000001.npy"]
    assert S.main([a, "--num-samples", "3"] + argv) == 0


def test_a_config_json_without_the_fingerprints_resumes_with_a_note(files, tmp_path):
    """A run folder of an earlier version (no checkpoint_weights / vae_weights recorded) still resumes: not
    compared, and the note says so."""
    import json

    out = tmp_path / "o"
    run(files, out, num_samples=2, latents_only=True)
    cfg = json.loads((out / "config.json").read_text())
    del cfg["settings"]["checkpoint_weights"], cfg["settings"]["vae_weights"]
    (out / "config.json").write_text(json.dumps(cfg))
    notes = []
    res = run(files, out, num_samples=3, latents_only=True, log=notes.append)
    assert (res.generated, res.skipped) == (1, 2)
    assert any("did not record checkpoint_weights" in n and "not compared" in n for n in notes), notes


def test_resuming_with_another_vae_in_a_folder_of_the_same_name_is_refused(files, tmp_path):
    """config.json recorded only the VAE folder's last name ("vae"): another VAE there resumed silently."""
    need_vae()
    import shutil

    for side in ("a", "b"):
        shutil.copytree(files["vae"], tmp_path / side / "vae")
    vae = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "b" / "vae"))
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.mul_(1.5)
    vae.save_pretrained(str(tmp_path / "b" / "vae"))
    out = tmp_path / "o"
    run(files, out, num_samples=1, batch_size=1, vae=str(tmp_path / "a" / "vae"))
    with pytest.raises(S.UsageError, match=r"^out: .*vae_weights: '[0-9a-f]{16}' there, '[0-9a-f]{16}' now.*the "
                                           r"--vae given now holds other weights"):
        run(files, out, num_samples=2, batch_size=1, vae=str(tmp_path / "b" / "vae"))
    import json

    inputs = json.loads((out / "config.json").read_text())["inputs"]
    assert inputs == {"checkpoint": os.path.realpath(files["ckpt"]), "vae": os.path.realpath(tmp_path / "a" / "vae")}
    res = run(files, out, num_samples=2, batch_size=1, vae=str(tmp_path / "a" / "vae"))
    assert (res.generated, res.skipped) == (1, 1)


def test_a_full_disk_while_writing_the_npz_is_one_line_naming_what_to_do(files, tmp_path, capsys, monkeypatch):
    import errno

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(R, "write_npz", full)
    argv = [files["ckpt"], "--latents-only", "--num-samples", "2", "--steps", "1", "--no-progress", "--backend",
            "torch", "--out", str(tmp_path / "o")]
    assert S.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("elit-sample: error: cannot write the run's .npz") and err.count("\n") == 1, err
    assert "No space left on device" in err and "free disk space" in err and "rerun the same command" in err
    assert len(os.listdir(tmp_path / "o" / "latents")) == 2  # the samples are kept
    monkeypatch.undo()
    assert S.main(argv) == 0 and (tmp_path / "o" / "latents.npz").is_file()


@pytest.mark.parametrize("entry, kind", [("latents.npz", "dir"), ("latents", "file"), ("config.json", "dir"),
                                         (".elit-sample.lock", "dir")])
def test_an_output_entry_of_the_wrong_kind_is_refused_before_sampling(files, tmp_path, capsys, monkeypatch, entry,
                                                                       kind):
    out = tmp_path / "o"
    out.mkdir()
    (out / entry).mkdir() if kind == "dir" else (out / entry).write_text("x")
    monkeypatch.setattr(R._Run, "sample", lambda self: pytest.fail("sampled before the --out check"))
    with pytest.raises(SystemExit) as e:
        S.main([files["ckpt"], "--latents-only", "--num-samples", "2", "--steps", "1", "--no-progress", "--backend",
                "torch", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: --out: " in err and str(out / entry) in err, err
    assert ("is a folder" if kind == "dir" else "is a file") in err and "Traceback" not in err


@pytest.mark.parametrize("value, ok", [("abc", False), ("-1", False), ("1.0", False), ("", True), (" 0 ", True)])
def test_a_malformed_local_rank_is_a_usage_error(files, tmp_path, capsys, monkeypatch, value, ok):
    monkeypatch.setenv("LOCAL_RANK", value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = [files["ckpt"], "--latents-only", "--num-samples", "1", "--steps", "1", "--no-progress", "--backend",
            "torch", "--device", "cpu", "--out", str(tmp_path / "o")]
    if ok:
        assert S.main(argv) == 0
        return
    with pytest.raises(SystemExit) as e:
        S.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: LOCAL_RANK: expected an int >= 0" in err and repr(value) in err, err
    assert not (tmp_path / "o").exists()


def test_a_foreign_png_of_another_size_is_sampled_again(files, tmp_path, monkeypatch):
    """A valid PNG of another size under a sample's name passed the resume check; the .npz step then failed,
    blaming the next sample, with no path. It is damaged (sampled again); one that appears after the check is
    named with its path."""
    need_vae()
    from PIL import Image

    out = tmp_path / "o"
    kw = dict(num_samples=2, batch_size=1)
    want = npz(run(files, out, **kw).npz)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out / "samples" / "000000.png")
    notes = []
    res = run(files, out, log=notes.append, **kw)
    assert (res.generated, res.skipped) == (1, 1)
    assert any("damaged" in n and "not 64x64 RGB" in n and "000000.png" in n for n in notes), notes
    assert np.array_equal(npz(res.npz)["arr_0"], want["arr_0"])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out / "samples" / "000001.png")
    monkeypatch.setattr(R, "damaged_samples", lambda *a, **k: [])  # as if it changed after the check
    with pytest.raises(S.SamplingError, match=r"000001\.png is a 8x8 image, expected 64x64 .*delete it and rerun"):
        run(files, out, **kw)


def test_the_image_size_of_a_vae_that_is_not_diffusers_own_is_decoded_not_read_from_its_config():
    """A module passed in with an AutoencoderKL-like config that decodes to another size (a wrapper) was given the
    config's size: every resume then took every PNG for damaged, resampled all of them and failed at the .npz."""
    import types

    class Wrapper(torch.nn.Module):
        config = types.SimpleNamespace(block_out_channels=[8, 8, 8, 8], latent_channels=4)  # says 8x

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def decode(self, z):
            return types.SimpleNamespace(sample=torch.nn.functional.interpolate(z[:, :3], scale_factor=4) * self.w)

    cfg = types.SimpleNamespace(in_channels=4, input_size=8)
    assert R._image_size(Wrapper(), cfg, torch.device("cpu")) == (32, 32)


def test_a_sample_png_damaged_inside_is_named_not_taken_for_a_full_disk(files, tmp_path):
    """A PNG whose signature, IHDR and IEND are whole but whose data is not passes the resume check; reading it
    raised OSError, which the .npz step's full-disk message took for a write error (no file named, "free disk
    space", and the same on every rerun)."""
    need_vae()
    out = tmp_path / "o"
    kw = dict(num_samples=2, batch_size=1)
    run(files, out, **kw)
    p = out / "samples" / "000001.png"
    data = bytearray(p.read_bytes())
    data[len(data) // 2:len(data) // 2 + 8] = bytes(8)
    p.write_bytes(bytes(data))
    (out / "samples.npz").unlink()
    with pytest.raises(S.SamplingError, match=r"000001\.png cannot be read .*delete it and rerun the same command"):
        run(files, out, **kw)


def test_guidance_that_guides_no_step_warns_naming_the_interval_and_the_step_times(files, tmp_path):
    with pytest.warns(UserWarning, match=r"^guidance_interval: \(0\.1, 0\.2\) holds none of the 2 steps' times "
                                         r"\(1, 0\.5\): guidance cfg is never applied"):
        run(files, tmp_path / "o", num_samples=1, latents_only=True, guidance="cfg", cfg_scale=4.0,
            guidance_interval=(0.1, 0.2))


def test_a_model_without_core_blocks_is_refused_from_arch_and_warned_otherwise(files, tmp_path):
    """The budget acts in the core blocks: with none (head + tail = depth), every budget gives the same output.
    From --arch that is a wrong tail count most likely: refused naming arch; a model built so: a warning."""
    import dataclasses

    with pytest.raises(S.UsageError, match=r"^arch: this model has no core block \(1 head \+ 3 tail blocks = depth 4; "
                                           r"from arch dit_decoder_depth=3\)"):
        S.generate(str(FIXTURE), tmp_path / "a", arch={"num_heads": 2, "dit_decoder_depth": 3}, num_samples=1,
                   steps=1, latents_only=True, backend="torch", progress=False, log=lambda *a, **k: None)
    assert not (tmp_path / "a").exists()
    m = load_model(files["ckpt"])
    cfg = dataclasses.replace(m.cfg, head_blocks=1, tail_blocks=m.cfg.depth - 1)
    with pytest.warns(UserWarning, match=r"^checkpoint: this model has no core block"):
        S.generate(ElitDiT(cfg).eval(), tmp_path / "b", num_samples=1, steps=1, latents_only=True, backend="torch",
                   progress=False, log=lambda *a, **k: None)


def test_a_smaller_num_samples_says_it_replaces_the_larger_npz(files, tmp_path):
    out = tmp_path / "o"
    run(files, out, num_samples=4, batch_size=2, latents_only=True)
    notes = []
    res = run(files, out, num_samples=2, batch_size=2, latents_only=True, log=notes.append)
    assert np.load(res.npz)["arr_0"].shape[0] == 2
    assert any("latents.npz holds 4 samples; this run replaces it with one of the first --num-samples 2" in n
               for n in notes), notes
    assert len(os.listdir(out / "latents")) == 4


def test_log_none_is_no_lines_and_a_non_callable_log_is_refused_up_front(files, tmp_path, capsys):
    res = S.generate(files["ckpt"], tmp_path / "a", num_samples=1, steps=1, latents_only=True, backend="torch",
                     progress=False, log=None)
    assert res.generated == 1 and capsys.readouterr().out == ""
    with pytest.raises(S.UsageError, match=r"^log: expected a callable"):
        S.generate(files["ckpt"], tmp_path / "b", num_samples=1, steps=1, latents_only=True, backend="torch",
                   progress=False, log="stdout")
    assert not (tmp_path / "b").exists()


def test_dtype_as_a_torch_dtype_is_its_name(files, tmp_path):
    import json

    res = run(files, tmp_path / "a", num_samples=1, steps=1, latents_only=True, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["settings"]["dtype"] == "bfloat16"
    want = run(files, tmp_path / "b", num_samples=1, steps=1, latents_only=True, dtype="bfloat16")
    assert np.array_equal(np.load(res.npz)["arr_0"], np.load(want.npz)["arr_0"])


@pytest.mark.parametrize("arch, why", [({"num_heads": 3, "dit_decoder_depth": 1}, "num_heads 3 does not divide"),
                                       ({"num_heads": 2, "dit_decoder_depth": 4}, "tail 4 exceed depth 4")])
def test_arch_values_the_weights_contradict_are_named_as_arch(tmp_path, capsys, arch, why):
    argv = [str(FIXTURE), "--latents-only", "--num-samples", "1", "--steps", "1", "--no-progress", "--backend",
            "torch", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        S.main(argv + [x for k, v in arch.items() for x in ("--arch", f"{k}={v}")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: --arch: " in err and why in err, err


def test_nan_weights_name_no_argument_elit_sample_lacks(files, tmp_path):
    m = load_model(files["ckpt"])
    with torch.no_grad():
        next(m.parameters()).view(-1)[0] = float("nan")
    save_model(str(tmp_path / "nan.pt"), m)
    with pytest.raises(S.UsageError, match=r"^checkpoint: .*non-finite values") as e:
        S.generate(str(tmp_path / "nan.pt"), tmp_path / "o", num_samples=1, steps=1, latents_only=True,
                   backend="torch", progress=False, log=None)
    assert "Pass check_finite=False" not in str(e.value) and "load_checkpoint(path, check_finite=False)" in str(e.value)


def test_a_vae_config_file_is_named_a_file_not_a_missing_folder(files, tmp_path):
    with pytest.raises(S.UsageError, match=r"^vae: .*config\.json is a file; expected the folder that holds it \("):
        run(files, tmp_path / "o", num_samples=1, vae=os.path.join(files["vae"], "config.json"))


def test_the_bar_moves_at_every_step_and_the_start_up_line_estimates_the_run(files, tmp_path, monkeypatch):
    """A bar that moved once per batch stood at 0 through a whole batch of a long run (--steps 3000: minutes); it
    moves by a fraction of the batch at each step and lands on whole images at each batch's end. The start-up line
    gives the measured forward time and an estimate of the run."""
    import tqdm.auto

    seen = []

    class Recording(tqdm.auto.tqdm):
        def update(self, n=1):
            super().update(n)
            seen.append(self.n)

        def refresh(self, *a, **k):
            seen.append(("refresh", self.n))
            return super().refresh(*a, **k)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    notes = []
    run(files, tmp_path / "o", num_samples=3, batch_size=2, steps=4, latents_only=True, progress=True,
        log=notes.append)
    steps = [n for n in seen if not isinstance(n, tuple)]
    assert steps == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.25, 2.5, 2.75, 3.0]), seen  # 2 images, then 1
    assert ("refresh", 2) in seen and ("refresh", 3) in seen
    line = next(n for n in notes if "forward per step" in n)
    assert re.search(r"about \d+ s for this rank's 2 batches of 4 evaluations each", line), line


def test_euler_sample_calls_its_callback_after_each_step_and_checks_it(files):
    from elit_kernels import flow

    m = load_model(files["ckpt"], backend="torch")
    c, n = m.cfg.in_channels, m.cfg.input_size
    x, y = torch.randn(2, c, n, n), torch.tensor([0, 1])
    calls = []
    want = flow.euler_sample(m, x, y, steps=3, heun=True)
    got = flow.euler_sample(m, x, y, steps=3, heun=True, callback=calls.append)
    assert calls == [0, 1, 2] and torch.equal(got, want)  # called once per step; the result is unchanged
    with pytest.raises(TypeError, match=r"^callback: expected None or a callable step -> None, got str"):
        flow.euler_sample(m, x, y, steps=3, callback="print")
