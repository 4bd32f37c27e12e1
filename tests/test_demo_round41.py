"""Round 41 of the hostile-user findings on elit-demo, the FLOP helpers and the config presets, each with the test
that failed before its fix:

- F3: with ``--load`` and no training steps, the training-only flags (--seed, --lr, --batch, --per-sample-budgets,
  --latent-init-std) are a usage error naming the flag (--latent-init-std with any --load); with --steps they
  train the continuation and are recorded; the figure titles, the loss plot's shaded range and results.json's
  ``train`` describe the checkpoint's training (its j_min, per-sample or per-batch), the evaluated range is
  ``eval.j_min`` / ``eval.j_max``, and a --save stores the trained j_min
  (``test_load_refuses_training_flags_it_would_ignore``, ``test_load_with_steps_trains_with_the_flags``,
  ``test_loaded_figures_and_results_describe_the_checkpoints_training``);
- F4: a --save path that is one of the run's own outputs in --out is refused before any work, naming both
  (``test_save_colliding_with_an_output_is_refused``);
- F5: an output file of --out that cannot be written (a folder in its place) is refused before training
  (``test_unwritable_output_file_is_refused_before_training``);
- F10: ``count_flops`` takes a single module, names a bad ``models``, and never leaves its stub backend registered
  (``test_count_flops_models_argument_and_registry``);
- F11: ``elit_attention_flops`` / ``plain_attention_flops`` check budgets as the model does and refuse negative
  batches (``test_flop_helpers_validate_budgets_and_batch``);
- F12: a bf16 / fp16 / fp64 model file loads, is cast to the demo's float32, and runs
  (``test_load_of_a_low_or_high_precision_file_runs_in_float32``);
- F13: damaged checkpoint meta is a usage error about the file, never about a flag not given
  (``test_damaged_checkpoint_meta_names_the_file``);
- F16: ``elit_config`` / ``elit_sit_config`` refuse an override that conflicts with what the resolution (or name,
  group_size, encoder_depth) derives, naming both, and an unknown override names the fields
  (``test_config_overrides_conflicting_with_derived_fields``, ``test_config_unknown_override_names_the_fields``);
- F17: RANK / WORLD_SIZE without MASTER_ADDR / MASTER_PORT is a one-line usage error naming the variables
  (``test_rank_without_master_addr_is_a_usage_error``).
"""
import json
import os
import random

import pytest
import torch

pytest.importorskip("sklearn", reason='the demo\'s data set ships with scikit-learn, not installed: the optional '
                    'extra `pip install -e ".[demo]"`')

from elit_kernels import known_backends  # noqa: E402
from elit_kernels import demo  # noqa: E402
from elit_kernels.bench import count_flops, elit_attention_flops, plain_attention_flops  # noqa: E402
from elit_kernels.bench.flops import STUB_BACKEND  # noqa: E402
from elit_kernels.demo.train import demo_config  # noqa: E402
from elit_kernels.models import ElitDiT, PlainDiT, elit_config, load_model, save_model  # noqa: E402
from elit_kernels.models.config import elit_sit_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FAST = ["--sample-steps", "1", "--eval-reps", "1", "--no-progress", "--backend", "torch"]


@pytest.fixture(autouse=True)
def no_dist_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ELIT_BACKEND"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def fast_eval(monkeypatch):
    """Stand-ins for the held-out loss and the sample grid (the slow part of an evaluation), recording the figures'
    arguments: the flag checks and the titles are what these tests look at."""
    seen = {}
    monkeypatch.setattr(demo, "heldout_loss_by_budget", lambda m, x, y, budgets, **k: {b: 1.0 / b for b in budgets})
    monkeypatch.setattr(demo, "sample_grid", lambda m, rows, classes, **k: torch.rand(len(rows), len(classes), 1, 16, 16))
    grid, loss = demo.write_grid_png, demo.write_loss_png

    def g(path, samples, rows, groups, classes, **k):
        seen["grid_title"], seen["rows"] = k.get("title"), rows
        return grid(path, samples, rows, groups, classes, **k)

    def lo(path, lbb, j_min, groups, **k):
        seen["loss_title"], seen["loss_j_min"], seen["loss_budgets"] = k.get("title"), j_min, sorted(lbb)
        return loss(path, lbb, j_min, groups, **k)
    monkeypatch.setattr(demo, "write_grid_png", g)
    monkeypatch.setattr(demo, "write_loss_png", lo)
    return seen


def _ckpt(path, j_max=4, meta=None, dtype=None, seed=None):
    torch.manual_seed(random.randrange(2**31) if seed is None else seed)
    m = ElitDiT(demo_config(j_max))
    if dtype is not None:
        m = m.to(dtype)
    return save_model(str(path), m, meta)


def _usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err, err
    return err


# F3 -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", [["--seed", "5"], ["--seed", "0"], ["--lr", "0.1"], ["--lr", "4e-3"], ["--batch", "4"],
                                  ["--per-sample-budgets"], ["--latent-init-std", "0.3"], ["--latent-init-std", "1"]])
def test_load_refuses_training_flags_it_would_ignore(flag, tmp_path, capsys, fast_eval):
    """Given even at its default value: an explicit training flag with nothing to train is a mistake to name."""
    ck = _ckpt(tmp_path / "m.pt", meta={"j_min": 1, "trained_steps": 3, "seed": 77, "lr": 0.5, "batch": 8,
                                        "per_sample_budgets": True})
    out = tmp_path / "o"
    err = _usage_error(["--load", ck, "--out", str(out)] + flag + FAST, capsys)
    assert f"error: {flag[0]}:" in err and "--load" in err, err
    assert not (out / "results.json").exists()
    if flag[0] == "--latent-init-std":  # the loaded weights are kept, also when training more
        err = _usage_error(["--load", ck, "--steps", "1", "--out", str(out)] + flag + FAST, capsys)
        assert f"error: {flag[0]}:" in err, err


def test_load_with_steps_trains_with_the_flags(tmp_path, fast_eval):
    ck = _ckpt(tmp_path / "m.pt", meta={"j_min": 2, "trained_steps": 3, "seed": 77, "lr": 0.5, "batch": 8,
                                        "per_sample_budgets": False, "latent_init_std": 0.0})
    seed, out = random.randrange(1000), tmp_path / "o"
    assert demo.main(["--load", ck, "--steps", "1", "--seed", str(seed), "--lr", "0.01", "--batch", "4",
                      "--per-sample-budgets", "--out", str(out), "--save", str(tmp_path / "s.pt")] + FAST) == 0
    res = json.loads((out / "results.json").read_text())
    tr = res["train"]
    assert (tr["seed"], tr["lr"], tr["batch"], tr["per_sample_budgets"], tr["j_min"], tr["trained_steps"]) == \
        (seed, 0.01, 4, True, 2, 4)
    assert tr["latent_init_std"] == 0.0 and tr["loaded_meta"]["seed"] == 77
    assert "per-sample" in fast_eval["grid_title"] and "U{2..4}" in fast_eval["loss_title"]
    _, meta = load_model(str(tmp_path / "s.pt"), return_meta=True)
    assert meta["seed"] == seed and meta["j_min"] == 2 and meta["trained_steps"] == 4


def test_loaded_figures_and_results_describe_the_checkpoints_training(tmp_path, fast_eval):
    psb = random.choice([True, False])
    ck = _ckpt(tmp_path / "m.pt", meta={"j_min": 1, "trained_steps": 3, "seed": 77, "lr": 0.5, "batch": 8,
                                        "per_sample_budgets": psb, "latent_init_std": 0.0})
    j_eval = random.randint(2, 4)
    out, saved = tmp_path / "o", tmp_path / "again.pt"
    assert demo.main(["--load", ck, "--j-min", str(j_eval), "--out", str(out), "--save", str(saved)] + FAST) == 0
    res = json.loads((out / "results.json").read_text())
    tr = res["train"]
    assert (tr["j_min"], tr["per_sample_budgets"], tr["seed"], tr["lr"], tr["batch"], tr["trained_steps"]) == \
        (1, psb, 77, 0.5, 8, 3)
    assert (res["eval"]["j_min"], res["eval"]["j_max"]) == (j_eval, 4)
    assert res["importance_ordered"]["j_min"] == j_eval and sorted(map(int, res["loss_by_budget"])) == \
        list(range(j_eval, 5))
    how = "per-sample" if psb else "per-batch"
    for t in (fast_eval["grid_title"], fast_eval["loss_title"]):
        assert f"3 steps, {how} J̃ ~ U{{1..4}}" in t, t
        assert f"evaluated J̃ = {j_eval}..4" in t, t
    assert fast_eval["loss_j_min"] == 1 and fast_eval["loss_budgets"] == list(range(j_eval, 5))
    _, meta = load_model(str(saved), return_meta=True)
    assert meta["j_min"] == 1 and meta["per_sample_budgets"] is psb and meta["seed"] == 77


# F4 -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["samples.png", "loss_by_budget.png", "results.json"])
def test_save_colliding_with_an_output_is_refused(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = "o3"
    spelled = random.choice([f"{out}/{name}", f"./{out}/../{out}/{name}", str(tmp_path / out / name)])
    err = _usage_error(["--steps", "2", "--out", out, "--save", spelled] + FAST, capsys)
    assert f"error: --save: {spelled}" in err and os.path.join(out, name) in err and "--out" in err, err
    assert not (tmp_path / out / name).exists()


# F5 -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["samples.png", "loss_by_budget.png", "results.json"])
def test_unwritable_output_file_is_refused_before_training(name, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o2"
    (out / name).mkdir(parents=True)
    monkeypatch.setattr(demo, "train", lambda *a, **k: pytest.fail("trained before the output check"))
    err = _usage_error(["--steps", "2", "--out", str(out)] + FAST, capsys)
    assert "error: --out:" in err and str(out / name) in err, err
    assert sorted(p.name for p in out.iterdir()) == [name]


# F12 ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_load_of_a_low_or_high_precision_file_runs_in_float32(dtype, tmp_path, capsys):
    ck = _ckpt(tmp_path / "m.pt", j_max=2, meta={"j_min": 1, "trained_steps": 0}, dtype=dtype)
    out, saved = tmp_path / "o", tmp_path / "s.pt"
    steps = random.choice(["0", "1"])
    assert demo.main(["--load", ck, "--steps", steps, "--batch", "4", "--out", str(out), "--save", str(saved)]
                     + FAST if steps == "1" else ["--load", ck, "--out", str(out), "--save", str(saved)] + FAST) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["train"]["loaded_dtype"] == str(dtype).removeprefix("torch.")
    assert all(v == v for v in res["loss_by_budget"].values())
    m = load_model(str(saved))
    assert next(m.parameters()).dtype == torch.float32
    assert "cast to float32" in capsys.readouterr().err


# F13 ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("meta,field", [({"j_min": "abc"}, "j_min"), ({"j_min": [1]}, "j_min"), ({"j_min": 0}, "j_min"),
                                        ({"j_min": 99}, "j_min"), ({"j_min": True}, "j_min"), ({"j_min": 1.5}, "j_min"),
                                        ({"trained_steps": "x"}, "trained_steps"), ({"trained_steps": -1}, "trained_steps"),
                                        ({"per_sample_budgets": "yes"}, "per_sample_budgets"), ({"seed": -3}, "seed"),
                                        ({"lr": "fast"}, "lr"), ({"batch": 0}, "batch")])
def test_damaged_checkpoint_meta_names_the_file(meta, field, tmp_path, capsys, fast_eval):
    ck = _ckpt(tmp_path / random.choice(["m.pt", "m.safetensors"]), meta=meta)
    argv = ["--load", ck, "--out", str(tmp_path / "o")] + FAST
    if field == "j_min":  # --j-min given: the evaluation range is the flag's, but the meta is still damaged
        argv += random.choice([[], ["--j-min", "2"]])
    err = _usage_error(argv, capsys)
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"elit-demo: error: --load: {ck}: its meta {field}"), err
    assert "error: --j-min" not in err, err


# F17 ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env", [{"RANK": "0", "WORLD_SIZE": "1"}, {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "x"},
                                 {"RANK": "0"}, {"WORLD_SIZE": "2"}])
def test_rank_without_master_addr_is_a_usage_error(env, tmp_path, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(demo, "train", lambda *a, **k: pytest.fail("ran"))
    err = _usage_error(["--steps", "0", "--out", str(tmp_path / "o")] + FAST, capsys)
    line = err.strip().splitlines()[-1]
    assert line.startswith("elit-demo: error: ") and "torchrun" in line, err
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        assert k in line, err
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("value", ["abc", "-1", "1.0"])
def test_a_malformed_local_rank_is_a_usage_error(value, tmp_path, capsys, monkeypatch):
    """LOCAL_RANK is read as elit-sample reads it (_cli.local_rank_error): a traceback from int() before."""
    monkeypatch.setenv("LOCAL_RANK", value)
    monkeypatch.setattr(demo, "train", lambda *a, **k: pytest.fail("ran"))
    err = _usage_error(["--steps", "0", "--out", str(tmp_path / "o")] + FAST, capsys)
    assert "elit-demo: error: LOCAL_RANK: expected an int >= 0" in err and repr(value) in err, err


# F10 ----------------------------------------------------------------------------------------------------------

def test_count_flops_models_argument_and_registry():
    before = known_backends()
    torch.manual_seed(random.randrange(2**31))
    m = ElitDiT(elit_config("tiny", 64))
    b = random.randint(1, 4)
    x, t = torch.randn(b, 4, 8, 8), torch.rand(b)
    y = torch.randint(0, 10, (b,))
    budgets = [random.randint(0, 4) for _ in range(b)]
    one = count_flops(lambda: m(x, t, y, budgets), m)  # a single module: as [m]
    assert one == count_flops(lambda: m(x, t, y, budgets), [m])
    assert one["attention"] == elit_attention_flops(m.cfg, budgets)
    assert m.backend is None and known_backends() == before
    for bad in (5, "m", [m, 3], [None], {"a": m}):
        with pytest.raises(TypeError, match=r"^models: "):
            count_flops(lambda: m(x, t, y, budgets), bad)
        assert STUB_BACKEND not in known_backends() and known_backends() == before
    with pytest.raises(ZeroDivisionError):
        count_flops(lambda: 1 / 0, (m,))
    assert STUB_BACKEND not in known_backends() and m.backend is None
    # nested: the inner count leaves the outer's stub registered; the outer removes it
    p = PlainDiT(elit_config("tiny", 64))

    def outer():
        inner = count_flops(lambda: p(x, t, y), p)
        assert inner["attention"] == plain_attention_flops(p.cfg, b)
        assert STUB_BACKEND in known_backends()
        m(x, t, y, budgets)
    count_flops(outer, [m])
    assert known_backends() == before


# F11 ----------------------------------------------------------------------------------------------------------

def test_flop_helpers_validate_budgets_and_batch():
    cfg = elit_config("tiny", 64)
    j = cfg.latents_per_group
    n = random.randint(1, 5)
    k = random.randint(0, j)
    assert elit_attention_flops(cfg, [k] * n) == elit_attention_flops(cfg, k, batch=n)
    assert elit_attention_flops(cfg, None, batch=n) == elit_attention_flops(cfg, [j] * n)
    assert elit_attention_flops(cfg, torch.tensor([k] * n)) == elit_attention_flops(cfg, [k] * n)
    assert elit_attention_flops(cfg, [], batch=0) == 0 and plain_attention_flops(cfg, 0) == 0
    for bad, exc, what in (([j + 1 + random.randint(0, 90)], ValueError, r"\[0, 4\]"), ([-1], ValueError, r"\[0, 4\]"),
                           ([2.5], TypeError, "float"), ([True], TypeError, "bool"), ("12", TypeError, "str")):
        with pytest.raises(exc, match=r"^budgets: .*" + what):
            elit_attention_flops(cfg, bad)
    with pytest.raises(ValueError, match=r"^batch: "):
        elit_attention_flops(cfg, 2)  # an int budget needs the batch
    with pytest.raises(ValueError, match=r"^budgets: expected 3 budgets"):
        elit_attention_flops(cfg, [1, 2], batch=3)
    for bad in (-random.randint(1, 9), 2.5, True, "3", None):
        with pytest.raises(ValueError, match=r"^batch: expected an int >= 0"):
            plain_attention_flops(cfg, bad)


# F16 ----------------------------------------------------------------------------------------------------------

def test_config_overrides_conflicting_with_derived_fields():
    res = random.choice([64, 128, 256])
    wrong = res // 8 // 2
    with pytest.raises(ValueError, match=rf"^input_size: {wrong} conflicts with resolution {res}"):
        elit_config("tiny", res, input_size=wrong)
    assert elit_config("tiny", 128, input_size=16) == elit_config("tiny", 128)  # the derived value: accepted
    assert demo_config().input_size == 16
    with pytest.raises(ValueError, match=r"^input_size: 16 conflicts with resolution 256"):
        elit_sit_config("S/2", 256, input_size=16)
    with pytest.raises(ValueError, match=r"^patch: 4 conflicts with name 'S/2'"):
        elit_sit_config("S/2", 256, patch=4)
    with pytest.raises(ValueError, match=r"^window: 2 conflicts with group_size"):
        elit_sit_config("S/2", 256, window=2)
    with pytest.raises(ValueError, match=r"^head_blocks: 3 conflicts with encoder_depth"):
        elit_sit_config("S/2", 256, head_blocks=3)
    assert elit_sit_config("S/2", 256, window=4, patch=2, head_blocks=8, input_size=32) == elit_sit_config("S/2", 256)
    assert elit_sit_config("S/2", 256, group_size=2, window=2).window == 2


def test_config_unknown_override_names_the_fields():
    bogus = random.choice(["bogus", "n_head", "latents_per_group", "groups"])
    for make in (lambda: elit_config("tiny", 64, **{bogus: 1}), lambda: elit_sit_config("S/2", 256, **{bogus: 1})):
        with pytest.raises(ValueError, match=rf"^overrides: unknown ElitConfig field\(s\) \['{bogus}'\]; known: .*'window'"):
            make()


# --- the sampler fuzz round: --save over an existing file, an empty --out after a late usage error -----------

@pytest.mark.parametrize("which", ["other", "load"])
def test_save_over_an_existing_file_is_refused_without_force(which, tmp_path, capsys, monkeypatch, fast_eval):
    """--save replaced any file there silently (even the --load checkpoint); elit-convert refuses without --force:
    refused before any training, the file left as it was; with --force it is replaced."""
    ck = _ckpt(tmp_path / "m.pt", j_max=2, meta={"j_min": 1, "trained_steps": 0})
    target = tmp_path / "notes.txt" if which == "other" else tmp_path / "m.pt"
    if which == "other":
        target.write_text("my precious notes\n")
    before = target.read_bytes()
    monkeypatch.setattr(demo, "train", lambda *a, **k: pytest.fail("trained before the --save check"))
    err = _usage_error(["--load", ck, "--out", str(tmp_path / "o"), "--save", str(target)] + FAST, capsys)
    assert f"error: --save: {target} exists" in err and "--force" in err, err
    assert ("the --load checkpoint" in err) == (which == "load"), err
    assert target.read_bytes() == before and not (tmp_path / "o").exists()
    assert demo.main(["--load", ck, "--out", str(tmp_path / "o"), "--save", str(target), "--force"] + FAST) == 0
    assert load_model(str(target)).cfg.latents_per_group == 2


def test_a_usage_error_after_out_was_created_leaves_no_empty_out(tmp_path, capsys):
    """--load (not a checkpoint) and --backend (not usable for the model) are checked once --out exists: the
    folder this run created is removed again when they are refused."""
    (tmp_path / "bad.pt").write_text("not a checkpoint\n")
    err = _usage_error(["--load", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "a" / "o")] + FAST, capsys)
    assert "error: --load:" in err and not (tmp_path / "a").exists()
    err = _usage_error(["--steps", "1", "--out", str(tmp_path / "b"), "--sample-steps", "1", "--no-progress",
                        "--backend", "torch_varlen"], capsys)
    assert "error: --backend:" in err and not (tmp_path / "b").exists()
