"""elit-sample's rules, files and option checks, called directly (no sampling run): the exact values the rules give,
the files' edge cases, and the argument checks' names and results. Each expected value is derived in the test from
the definition in the docstring, not read back from the code under test (mutation testing: tools/mutation.py).
"""
import json
import os
import pathlib
import re
import time
import types
import zipfile

import numpy as np
import pytest
import torch

from elit_kernels import sample as S
from elit_kernels.bench.flops import count_flops
from elit_kernels.models import ElitDiT, elit_config
from elit_kernels.official.loader import load_checkpoint
from elit_kernels.sample import files as F
from elit_kernels.sample import options as O

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "elit_sit_tiny_a.pt"  # an official checkpoint; needs these two arch keys
ARCH = {"num_heads": 2, "dit_decoder_depth": 1}
PHI64 = 0x9E3779B97F4A7C15
CPU = torch.device("cpu")


# --- rules ----------------------------------------------------------------------------------------------------
def test_sample_seed_is_the_full_64_bit_word_of_the_seed_sequence():
    # generate_state(1, uint64) is the first two uint32 words of the SeedSequence, little-endian: lo | hi << 32
    for seed, index in ((0, 0), (7, 3), (12345, 999_999)):
        lo, hi = (int(w) for w in np.random.SeedSequence([seed, index]).generate_state(2, np.uint32))
        assert S.sample_seed(seed, index) == lo | hi << 32
    assert any(S.sample_seed(1, i) >= 2 ** 32 for i in range(4))  # a 64-bit seed, not a 32-bit one


def test_mix_budgets_follow_the_golden_ratio_sequence_exactly():
    # u_i = ((i + 1) * PHI64 mod 2^64) / 2^64; with weights 1:1 the first J takes u < 1/2, i.e. the integer
    # (i + 1) * PHI64 mod 2^64 below 2^63; with 1:3 the first J takes u < 1/4 (below 2^62)
    idx = list(range(40))
    assert S.mix_budgets("2:1,1:1", idx) == [2 if (i + 1) * PHI64 % 2 ** 64 < 2 ** 63 else 1 for i in idx]
    assert S.mix_budgets([(3, 1), (1, 3)], idx) == [3 if (i + 1) * PHI64 % 2 ** 64 < 2 ** 62 else 1 for i in idx]
    # a u exactly on a slice boundary belongs to the next slice (u < c, not <=): PHI64 is odd, so
    # (i + 1) * PHI64 = 2^63 (mod 2^64) for i + 1 = 2^63, where u = 1/2 exactly
    assert (2 ** 63) * PHI64 % 2 ** 64 == 2 ** 63
    assert S.mix_budgets("2:1,1:1", [2 ** 63 - 1]) == [1]


def test_plan_batches_puts_the_largest_budget_first():
    # indices of each budget in index order, cut every 2; budgets in decreasing order (4 before 1)
    assert S.plan_batches([1, 4, 1, 4, 4], 2) == [[1, 3], [4], [0, 2]]
    assert S.plan_batches([2, 3, 1], 5) == [[1], [0], [2]]


# --- files ----------------------------------------------------------------------------------------------------
def test_write_npz_converts_each_item_to_the_declared_dtype(tmp_path):
    items = [np.arange(6, dtype=np.float64).reshape(2, 3) / 3 + k for k in range(3)]  # float64 in, float32 out
    path = str(tmp_path / "a.npz")
    F.write_npz(path, iter(items), 3, (2, 3), np.float32, {"labels": np.array([5, 6, 7])})
    with np.load(path) as d:
        assert d["arr_0"].dtype == np.float32 and np.array_equal(d["arr_0"], np.stack(items).astype(np.float32))
        assert d["labels"].tolist() == [5, 6, 7]


def test_write_npz_marks_every_member_zip64(tmp_path, monkeypatch):
    """A full run's arr_0 passes the 4 GiB ZIP limit (50,000 x 256 x 256 x 3 bytes): a member opened for writing
    without force_zip64 raises at close once it outgrows ZIP64_LIMIT. Scaled down: a 64-byte limit."""
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 64)
    items = [np.full((4, 4), k, np.float32) for k in range(3)]  # 3 x 64 bytes of data
    labels = np.arange(20)  # 160 bytes of data
    path = str(tmp_path / "big.npz")
    F.write_npz(path, items, 3, (4, 4), np.float32, {"labels": labels})
    with np.load(path) as d:
        assert np.array_equal(d["arr_0"], np.stack(items)) and np.array_equal(d["labels"], labels)


def test_write_npz_refuses_object_arrays_and_leaves_no_file(tmp_path):
    # allow_pickle=False: an object array would make an .npz that np.load refuses without allow_pickle
    path = tmp_path / "o.npz"
    with pytest.raises(ValueError):
        F.write_npz(str(path), [np.zeros(2, np.float32)], 1, (2,), np.float32, {"x": np.array([{}], dtype=object)})
    assert os.listdir(tmp_path) == []


def test_contact_sheet_of_one_image_is_the_image():
    # n = 1: ceil(sqrt(1)) = 1 column, 1 row, no gutter
    im = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    assert np.array_equal(F.contact_sheet([im]), im)


def test_latents_to_uint8_decodes_in_the_vaes_dtype():
    """A VAE in float64: the latents go in as float64 (a float32 input would not run), divided by 0.18215; the
    output is clamp(255 (x + 1) / 2, 0, 255) in float32, truncated, HWC."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, 1, 1, generator=g, dtype=torch.float64) * 0.1

    class VAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(w.clone())

        def decode(self, z):
            return types.SimpleNamespace(sample=torch.nn.functional.conv2d(z, self.w))

    z = torch.randn(2, 4, 3, 5, generator=g)
    got = F.latents_to_uint8(VAE(), z)
    x = np.einsum("oc,bchw->bhwo", w[:, :, 0, 0].numpy(), z.double().numpy() / 0.18215).astype(np.float32)
    want = np.floor(np.clip(np.float32(255.0) * (x + np.float32(1)) / np.float32(2), 0, 255)).astype(np.uint8)
    assert got.shape == (2, 3, 5, 3) and got.dtype == np.uint8
    assert np.array_equal(got, want)
    assert 0 < (want == 0).sum() + (want == 255).sum() < want.size  # some clamped, some not


def test_samples_on_disk_counts_only_regular_files_of_the_extension(tmp_path):
    for name in ("000001.npy", "1234567.npy", "000002.png", "12345.npy", "notes.txt", ".000004.npy.1.ab.tmp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "000003.npy").mkdir()  # a folder with a sample's name is not a sample
    # 6+ digits, the extension asked for, a regular file: 000001.npy and 1234567.npy
    assert F.samples_on_disk(str(tmp_path), "npy") == {1, 1234567}
    assert F.samples_on_disk(str(tmp_path), "png") == {2}


def test_a_png_of_exactly_signature_plus_iend_is_whole(tmp_path):
    # the rule: the 8-byte signature at the start and the 12-byte IEND chunk at the end; 20 bytes hold both
    (tmp_path / "000000.png").write_bytes(F._PNG_HEAD + F._PNG_TAIL)
    (tmp_path / "000001.png").write_bytes(F._PNG_HEAD + F._PNG_TAIL[1:])  # 19 bytes: the chunk cut
    assert F.damaged_samples(str(tmp_path), [0, 1], "png") == [1]


def test_lock_folder_writes_its_holder_into_the_folder(tmp_path, monkeypatch):
    folder, elsewhere = tmp_path / "out", tmp_path / "cwd"
    folder.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = time.time()
    f = F.lock_folder(str(folder))
    try:
        text = (folder / F.LOCK_NAME).read_text()
    finally:
        f.close()
    assert os.listdir(elsewhere) == []
    m = re.fullmatch(rf"pid {os.getpid()} on .+, started (\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d)\n", text)
    assert m, text
    started = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
    assert before - 2 <= started <= time.time() + 1


def test_remove_temporaries_removes_only_hidden_tmp_files(tmp_path):
    for name in (".000001.png.12.abcd.tmp", "000002.png", "keep.tmp", ".hidden"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".a_folder.tmp").mkdir()  # cannot be unlinked: skipped, not an error
    F.remove_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".a_folder.tmp", ".hidden", "000002.png", "keep.tmp"]


# --- options --------------------------------------------------------------------------------------------------
def test_check_real_applies_its_lower_bound_and_says_what():
    assert O.check_real("cfg_scale", 1, 1, " (1 = no guidance)") == 1.0
    with pytest.raises(S.UsageError, match=r"^cfg_scale: expected a finite real number >= 1 \(1 = no guidance\), "
                                           r"got 0\.5$"):
        O.check_real("cfg_scale", 0.5, 1, " (1 = no guidance)")


def test_resolve_budgets_returns_the_budgets_and_their_description():
    cfg = elit_config("tiny", 64)  # J_max = 4
    assert O.resolve_budgets(cfg, 3, None, 2, None) == ([2, 2, 2], {"latents": 2})
    assert O.resolve_budgets(cfg, 2, None, None, None) == ([4, 4], {"latents": 4})
    bud, desc = O.resolve_budgets(cfg, 5, None, None, "4:0.5,1:1.5")
    assert bud == S.mix_budgets([(4, 1), (1, 3)], range(5)) and desc == {"mix": [[4, "1/2"], [1, "3/2"]]}
    for kw, second in ((dict(budget=0.5, latents=2), "latents"), (dict(budget=0.5, budget_mix="4:1"), "budget_mix"),
                       (dict(latents=2, budget_mix="4:1"), "budget_mix")):
        args = [kw.get(k) for k in ("budget", "latents", "budget_mix")]
        got = ", ".join(k for k in ("budget", "latents", "budget_mix") if k in kw)
        with pytest.raises(S.UsageError, match=rf"^{second}: give one of budget, latents, budget_mix \(got {got}\)$"):
            O.resolve_budgets(cfg, 2, *args)
    with pytest.raises(S.UsageError, match=r"^latents: expected an int in \[1, 4\], got 5"):
        O.resolve_budgets(cfg, 2, None, 5, None)


def test_resolve_weak_default_and_checks():
    # the default is J_max // 16, at least 1: 64 -> 4 (an int), 4 -> 1
    got = O.resolve_weak(types.SimpleNamespace(latents_per_group=64), "ccfg", None, None)
    assert got == 4 and type(got) is int
    cfg = elit_config("tiny", 64)
    assert O.resolve_weak(cfg, "autoguidance", None, None) == 1
    assert O.resolve_weak(cfg, "ccfg", None, 3) == 3
    assert O.resolve_weak(cfg, "cfg", None, None) is None
    with pytest.raises(S.UsageError, match=r"^weak_latents: expected an int in \[1, 4\], got 5"):
        O.resolve_weak(cfg, "ccfg", None, 5)
    with pytest.raises(S.UsageError, match="^weak_latents: give weak_budget or weak_latents, not both"):
        O.resolve_weak(cfg, "ccfg", 0.5, 1)
    with pytest.raises(S.UsageError, match="^weak_budget: only autoguidance, ccfg, ccfg_two_pass use a weak budget"):
        O.resolve_weak(cfg, "cfg", 0.5, None)


def test_check_earlier_run_reads_partial_and_foreign_run_files(tmp_path):
    path = str(tmp_path / "config.json")

    def write(d):
        with open(path, "w") as f:
            json.dump(d, f)

    write({"format": "another-tool/1", "settings": {"seed": 1}})
    with pytest.raises(S.UsageError, match="^out: .* was not written by elit-sample"):
        O.check_earlier_run(path, {"seed": 1}, {})
    write({"format": O.FORMAT})  # no settings and no soft entry: every setting differs, no note
    with pytest.raises(S.UsageError, match=r"^out: .*different run \(seed: None there, 1 now\)"):
        O.check_earlier_run(path, {"seed": 1}, {})
    assert O.check_earlier_run(path, {}, {"batch_size": 2}) == []
    write({"format": O.FORMAT, "settings": {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}, "soft": {"backend": "torch"}})
    # a soft setting the earlier run did not record is no note; one it recorded differently is
    assert O.check_earlier_run(path, {"a": 1}, {"batch_size": 2, "backend": "triton"}) == [
        "resuming with different backend (was 'torch', now 'triton'): the remaining samples differ from a fresh run's "
        "by floating-point rounding only"]
    # five settings differ: the first four are shown, "; "-separated
    with pytest.raises(S.UsageError) as e:
        O.check_earlier_run(path, {k: 0 for k in "abcde"}, {})
    assert "(a: 1 there, 0 now; b: 2 there, 0 now; c: 3 there, 0 now; d: 4 there, 0 now)" in str(e.value)


def test_load_model_passes_weights_dtype_and_backend_to_the_loader():
    model, name, size, fingerprint = O.load_model(str(FIXTURE), "model", ARCH, CPU, torch.float64, "torch")
    assert (name, size) == ("elit_sit_tiny_a.pt", os.path.getsize(FIXTURE))
    assert fingerprint == O.module_fingerprint(model)  # the loaded weights identify the file (config.json)
    assert model.backend == "torch" and not model.training
    want = load_checkpoint(str(FIXTURE), weights="model", arch=ARCH, dtype=torch.float64)
    ema = load_checkpoint(str(FIXTURE), weights="ema", arch=ARCH, dtype=torch.float64)
    got, w, e = model.state_dict(), want.state_dict(), ema.state_dict()
    assert all(v.dtype == torch.float64 and torch.equal(v, w[k]) for k, v in got.items() if v.is_floating_point())
    assert any(not torch.equal(v, e[k]) for k, v in got.items())  # the "model" weights, not the default "ema"


def test_load_model_names_the_argument_the_loader_names(tmp_path):
    def loader_error(**kw):
        with pytest.raises((ValueError, TypeError)) as e:
            load_checkpoint(**{"path": str(FIXTURE), "arch": ARCH, **kw})
        return str(e.value)

    cases = [("arch", dict(arch={"bogus": 1})), ("weights", dict(weights="bogus")), ("device", dict(device="tpu")),
             ("dtype", dict(dtype=torch.int64))]
    for arg, kw in cases:
        msg = loader_error(**kw)
        assert msg.startswith(arg + ": ")
        a = {"weights": "ema", "arch": ARCH, "device": CPU, "dtype": None, **kw}
        with pytest.raises(S.UsageError) as e:
            O.load_model(str(FIXTURE), a["weights"], a["arch"], a["device"], a["dtype"], "torch")
        # the loader's message without its "arg: " prefix (the rest may hold ": " too: arch's does)
        assert (e.value.arg, e.value.message) == (arg, msg[len(arg) + 2:])
    assert ": " in loader_error(arch={"bogus": 1})[len("arch: "):]
    # a file problem is the checkpoint's, the loader's message whole, with the command-line hint for arch
    msg = loader_error(arch=None)
    with pytest.raises(S.UsageError) as e:
        O.load_model(str(FIXTURE), "ema", None, CPU, None, "torch")
    assert (e.value.arg, e.value.message) == (
        "checkpoint", msg + " (on the command line: --arch num_heads=H --arch dit_decoder_depth=T)")
    # the hint follows the loader's advice: a bare state_dict with its heads given lacks encoder_depth (the fixed
    # hint named num_heads and dit_decoder_depth, already given)
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(str(FIXTURE), weights_only=False)["ema"], bare)
    with pytest.raises(S.UsageError) as e:
        O.load_model(str(bare), "ema", {**ARCH, "depth": 4}, CPU, None, "torch")
    assert e.value.arg == "checkpoint" and e.value.message.endswith("(on the command line: --arch encoder_depth=N)")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(S.UsageError) as e:
        O.load_model(str(bad), "ema", None, CPU, None, "torch")
    assert e.value.arg == "checkpoint" and e.value.message.startswith(str(bad) + ": ")


@pytest.mark.parametrize("f,text", [(999.0, "999 FLOP"), (1e6, "1 MFLOP"), (2.5e9, "2.5 GFLOP"), (1e9, "1 GFLOP"),
                                    (1e12, "1 TFLOP"), (7.25e13, "72.5 TFLOP"), (1e15, "1 PFLOP"),
                                    (1.234e16, "12.3 PFLOP")])
def test_flops_unit(f, text):
    # the largest unit the count reaches (a count equal to the unit is in it), 3 significant digits
    assert O._flops(f) == text


def test_flops_report_mean_per_image_by_hand():
    torch.manual_seed(0)
    model = ElitDiT(elit_config("tiny", 64)).eval()  # 4 x 8 x 8 latents, J_max = 4

    def fwd(j):  # FLOPs of one forward of one image at J (bench.flops.count_flops)
        x, t, y = torch.zeros(1, 4, 8, 8), torch.full((1,), 0.5), torch.zeros(1, dtype=torch.long)
        return count_flops(lambda: model(x, t, y, [j]), [model])["total"]

    per = {j: fwd(j) for j in (4, 2, 1)}
    assert per[4] > per[2] > per[1] and all(1e6 <= v < 1e9 for v in per.values())

    def mflop(v):
        return f"{v / 1e6:.3g} MFLOP"

    # budgets 4, 2, 4; weak J = 1 (ccfg); Heun (two forwards per step but the last); guided steps 0 and 2:
    # image(J) = 2 (per[J] + per[1]) + 2 per[J] + (per[J] + per[1]); mean = (2 image(4) + image(2)) / 3
    def image(j):
        return 2 * (per[j] + per[1]) + 2 * per[j] + (per[j] + per[1])
    got = O.flops_report(model, [4, 2, 4], 1, "ccfg", True, [True, False, True], CPU, torch.float32)
    assert got == (f"FLOPs of one forward of one image: J=4: {mflop(per[4])}, J=2: {mflop(per[2])}, J=1: "
                   f"{mflop(per[1])}; per image over 3 steps (J=4 67%, J=2 33%, guidance ccfg): "
                   f"{mflop((2 * image(4) + image(2)) / 3)}")
    # cfg (the guided pass at the sample's own J), Euler, guided step 1 only; budgets 2, 4, 2, 2:
    # image(J) = per[J] + 2 per[J]; mean = (image(4) + 3 image(2)) / 4
    got = O.flops_report(model, [2, 4, 2, 2], None, "cfg", False, [False, True], CPU, torch.float32)
    assert got == (f"FLOPs of one forward of one image: J=4: {mflop(per[4])}, J=2: {mflop(per[2])}; per image over "
                   f"2 steps (J=4 25%, J=2 75%, guidance cfg): {mflop((3 * per[4] + 3 * 3 * per[2]) / 4)}")
    # no guided step: one forward per step, no guidance named
    got = O.flops_report(model, [1], None, "none", False, [False, False, False], CPU, torch.float32)
    assert got == (f"FLOPs of one forward of one image: J=1: {mflop(per[1])}; per image over 3 steps (J=1 100%): "
                   f"{mflop(3 * per[1])}")


def test_flops_report_feeds_the_model_in_its_dtype():
    # a float64 model refuses float32 input (TypeError naming x): the report's inputs are in the run's dtype; FLOPs
    # do not depend on the dtype, so the count is the float32 model's (bench.flops.count_flops)
    torch.manual_seed(0)
    model = ElitDiT(elit_config("tiny", 64)).eval()
    x, t, y = torch.zeros(1, 4, 8, 8), torch.full((1,), 0.5), torch.zeros(1, dtype=torch.long)
    per = count_flops(lambda: model(x, t, y, [2]), [model])["total"]
    got = O.flops_report(model.double(), [2], None, "none", False, [False], CPU, torch.float64)
    assert got == (f"FLOPs of one forward of one image: J=2: {per / 1e6:.3g} MFLOP; per image over 1 steps "
                   f"(J=2 100%): {per / 1e6:.3g} MFLOP")
