"""The elit-demo end to end: the importance-ordering claim, its files, checkpoints, and the DDP path."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn", reason='the demo\'s data set ships with scikit-learn, not installed: the optional '
                    'extra `pip install -e ".[demo]"`')

from elit_kernels.demo import build_parser, load_checkpoint, main  # noqa: E402
from elit_kernels.demo.evaluate import grid_budgets  # noqa: E402
from elit_kernels.demo.train import demo_config  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run (seed 0) shared by the tests below: ~45 s on 2 busy cores."""
    out = tmp_path_factory.mktemp("demo_quick")
    ckpt = out / "model.pt"
    # --backend torch: conftest sets TRITON_INTERPRET=1, under which the dispatcher would pick the (slow)
    # interpreted Triton kernels on CPU.
    assert main(["--quick", "--seed", "0", "--out", str(out), "--save", str(ckpt), "--no-progress",
                 "--backend", "torch"]) == 0
    with open(out / "results.json") as f:
        return out, ckpt, json.load(f)


def test_quick_run_smoke_latents_look_importance_ordered(quick_run):
    # A smoke test of the demo's claim, not a check of correctness: it passes under several planted model
    # bugs (mutation audit); the model's correctness is tests/test_model.py's and tests/test_official.py's job.
    _, _, res = quick_run
    loss = {int(b): v for b, v in res["loss_by_budget"].items()}
    j_min, j_max = res["importance_ordered"]["j_min"], res["importance_ordered"]["j_max"]
    assert sorted(loss) == list(range(j_min, j_max + 1))
    assert all(v == v and 0 < v < 2 for v in loss.values())  # finite, and learned (init loss is ~1.5)
    # The central claim: the full latent budget beats the smallest one on held-out data.
    assert loss[j_max] < loss[j_min], loss
    assert res["importance_ordered"]["holds"] is True


def test_quick_run_writes_files(quick_run):
    out, ckpt, res = quick_run
    for name in ("samples.png", "loss_by_budget.png", "results.json"):
        p = out / name
        assert p.is_file() and p.stat().st_size > 1000, name
        if name.endswith(".png"):
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ckpt.is_file()
    cfg = demo_config()
    assert res["config"]["j_max"] == cfg.latents_per_group == 16
    assert res["samples"]["rows_budgets"] == grid_budgets(1, 16) == [1, 2, 4, 8, 16]
    assert res["train"]["steps_this_run"] == res["train"]["trained_steps"] == 250


def test_checkpoint_round_trip_is_exact(quick_run, tmp_path):
    out, ckpt, res = quick_run
    a, meta = load_checkpoint(str(ckpt), backend="torch")
    b, _ = load_checkpoint(str(ckpt), backend="torch")
    assert a.cfg == demo_config() and meta["trained_steps"] == 250
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    for k, v in a.state_dict().items():
        assert torch.equal(v, raw[k]), k
    g = torch.Generator().manual_seed(7)
    x, t = torch.randn(3, 1, 16, 16, generator=g), torch.rand(3, generator=g)
    y = torch.tensor([0, 5, a.null_class])
    with torch.no_grad():
        assert torch.equal(a(x, t, y, [16, 3, 1]), b(x, t, y, [16, 3, 1]))
    # The loaded model reproduces the trained model's held-out losses bit for bit.
    again = tmp_path / "again"
    assert main(["--load", str(ckpt), "--quick", "--out", str(again), "--no-progress", "--backend", "torch"]) == 0
    with open(again / "results.json") as f:
        res2 = json.load(f)
    assert res2["loss_by_budget"] == res["loss_by_budget"]
    assert res2["train"]["steps_this_run"] == 0 and res2["train"]["trained_steps"] == 250


def test_per_sample_budgets_and_backend_option(tmp_path):
    out = tmp_path / "ragged"
    args = ["--steps", "3", "--batch", "8", "--per-sample-budgets", "--backend", "reference", "--sample-steps", "1",
            "--eval-reps", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    with open(out / "results.json") as f:
        res = json.load(f)
    assert res["train"]["per_sample_budgets"] is True and res["train"]["backend"] == "reference"


@pytest.mark.parametrize("argv,flag,valid", [
    (["--j-max", "0"], "--j-max", "J_max >= 1"),
    (["--j-min", "0"], "--j-min", "1 <= J_min <= J_max = 16"),
    (["--j-min", "17"], "--j-min", "1 <= J_min <= J_max = 16"),
    (["--j-min", "5", "--j-max", "4"], "--j-min", "1 <= J_min <= J_max = 4"),
    (["--steps", "-1"], "--steps", "non-negative"),
    (["--batch", "0"], "--batch", "positive"),
    (["--batch", "5000", "--steps", "1"], "--batch", "training images per process"),
    (["--sample-steps", "0"], "--sample-steps", "positive"),
    (["--eval-reps", "0"], "--eval-reps", "positive"),
    (["--threads", "0"], "--threads", "positive"),
    (["--lr", "0"], "--lr", "finite learning rate > 0, got 0.0"),
    (["--lr", "inf"], "--lr", "finite learning rate > 0, got inf"),
    (["--lr", "nan"], "--lr", "finite learning rate > 0, got nan"),
    (["--latent-init-std", "-1"], "--latent-init-std", ">= 0"),
    (["--latent-init-std", "inf"], "--latent-init-std", "finite std >= 0, got inf"),
    (["--guidance", "-2"], "--guidance", ">= 0"),
    (["--guidance", "inf"], "--guidance", "finite CFG scale >= 0, got inf"),
    (["--seed", "-1"], "--seed", "[0, 4294967295]"),
    (["--seed", str(2**64)], "--seed", "[0, 4294967295]"),  # torch's manual_seed overflows past 2**64 - 1
    (["--backend", "no-such-backend"], "--backend", ("choose from ", "torch", "cpp, reference")),
    (["--backend", "torch_varlen"], "--backend", "Usable here: "),  # a CUDA-only comparator on CPU
    (["--load", "missing.pt"], "--load", "no such file: missing.pt"),
    (["--load", "."], "--load", "is not a file"),
    (["--load", "NOT_A_CHECKPOINT"], "--load", "cannot load"),
    (["--out", "A_FILE"], "--out", "exists and is not a folder"),
    (["--out", "/proc/elit-demo-out"], "--out", "cannot write into /proc/elit-demo-out"),
    (["--save", "."], "--save", "is a folder (expected a file path)"),
    (["--save", "/proc/elit-demo.pt"], "--save", "cannot write into /proc"),
    (["--save", "no/such/folder/ck.pt"], "--save", "no/such/folder does not exist"),
    (["--save", "ck.pt/"], "--save", "ck.pt/ names a folder (a trailing '/'; expected a file path)"),
    (["--save", "DANGLING"], "--save", "does not exist"),  # a symlink into a missing folder
    (["--quick", "--steps", "x"], "--steps", "invalid int value"),
])
def test_usage_errors_name_the_flag(argv, flag, valid, tmp_path, capsys, monkeypatch):
    """A usage error: exit status 2, the message names the flag and the valid values, no traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "NOT_A_CHECKPOINT").write_text("not a checkpoint\n")
    (tmp_path / "A_FILE").write_text("x")
    (tmp_path / "DANGLING").symlink_to(tmp_path / "missing" / "ck.pt")
    with pytest.raises(SystemExit) as e:
        main(argv + ["--no-progress", "--sample-steps" if "--sample-steps" not in argv else "--seed", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {flag}:" in err or f"error: argument {flag}:" in err, err
    assert all(v in err for v in ((valid,) if isinstance(valid, str) else valid)), err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_backend_that_cannot_run_here_is_a_usage_error(monkeypatch, capsys):
    # Without TRITON_INTERPRET (a plain CPU session) the triton backend cannot run: say so, list what can.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["--backend", "triton", "--steps", "0", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: --backend: backend 'triton' cannot run the demo model" in err and "Usable here: torch" in err, err


@pytest.mark.parametrize("backend,warns", [(None, True), ("triton", True), ("torch", False)])
def test_interpreted_triton_is_announced(backend, warns, monkeypatch, capsys):
    import elit_kernels.demo as demo

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from elit_kernels.attention import get_backend

    if not get_backend("triton").is_available():
        pytest.skip(f"triton backend: {get_backend('triton').unavailable_reason}")
    p = build_parser()
    args = p.parse_args([] if backend is None else ["--backend", backend])
    demo._check_backend(args, p, demo_config())
    assert ("warning: the triton backend runs under the Triton interpreter" in capsys.readouterr().err) == warns


def test_a_backend_too_short_for_the_models_segments_is_refused_up_front(monkeypatch, capsys):
    # triton_window holds key segments of at most 128 keys; the demo model's spatial blocks attend over all
    # N tokens of a sample. Probing on two tiny segments accepted it, and the run then failed at the first
    # head block: the probe carries the model's longest segment now.
    import elit_kernels.demo as demo
    from elit_kernels import _cli
    from elit_kernels.attention import get_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not get_backend("triton_window").is_available():
        pytest.skip(f"triton_window backend: {get_backend('triton_window').unavailable_reason}")
    import dataclasses

    p = build_parser()
    small = demo_config()  # 64 tokens a sample: the window backend holds every segment of it
    assert small.tokens <= get_backend("triton_window").MAX_KEYS
    demo._check_backend(p.parse_args(["--backend", "triton_window"]), p, small)
    cfg = dataclasses.replace(small, input_size=2 * small.input_size)  # 4x the tokens
    assert cfg.tokens > get_backend("triton_window").MAX_KEYS, "the model must be too long for the check"
    with pytest.raises(SystemExit) as e:
        demo._check_backend(p.parse_args(["--backend", "triton_window"]), p, cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (f"--backend: backend 'triton_window' cannot run the demo model (CPU, fp32): the longest key segment is "
            f"{cfg.tokens}: key segments of at most 128 keys" in err), err
    assert "Usable here:" in err and "triton_window" not in err.split("Usable here:")[1], err
    # the same backend at a length it holds passes the probe
    assert _cli.backend_problems("triton_window", _cli.probe_inputs(cfg.heads, cfg.head_dim, "cpu", torch.float32,
                                                                   max_seqlen=128)) == []


def test_j_max_conflicting_with_the_checkpoint(quick_run, capsys):
    _, ckpt, _ = quick_run
    with pytest.raises(SystemExit) as e:
        main(["--load", str(ckpt), "--j-max", "8", "--no-progress"])
    assert e.value.code == 2
    assert "error: --j-max: 8 conflicts with the checkpoint's J_max 16" in capsys.readouterr().err


def test_a_model_that_is_not_the_demos_is_refused_before_training_or_saving(tmp_path, capsys):
    """A valid checkpoint of another model (4x8x8 inputs) loads, but the demo trains and evaluates on 1x16x16
    digits: a usage error naming --load, before any step and before --save writes anything."""
    from elit_kernels.models import ElitDiT, elit_config, save_model

    ckpt = save_model(str(tmp_path / "other.safetensors"), ElitDiT(elit_config("tiny", 64)))
    saved = tmp_path / "saved.pt"
    with pytest.raises(SystemExit) as e:
        main(["--load", ckpt, "--save", str(saved), "--steps", "1", "--out", str(tmp_path / "o"), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (f"error: --load: {ckpt} holds a model of 4x8x8 inputs and 10 classes; elit-demo trains and evaluates "
            "on 1x16x16 digits of 10 classes" in err), err
    out = tmp_path / "o"  # the flag checks create --out (probing that it takes files); nothing was written into it
    assert not saved.exists() and (not out.exists() or not any(out.iterdir()))


def test_usage_error_from_the_console_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "elit_kernels.demo", "--j-max", "0"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "error: --j-max:" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_help_states_each_default_once():
    from elit_kernels.demo import DEFAULTS, QUICK

    p = build_parser()
    text = p.format_help()
    assert "default: None" not in text
    helps = {a.dest: a.help for a in p._actions}
    for dest, h in helps.items():
        assert h and h.count("default") <= 1, (dest, h)
    for k in DEFAULTS:
        assert f"default {DEFAULTS[k]}" in helps[k] and f"{QUICK[k]} with --quick" in helps[k], (k, helps[k])
    assert p.parse_args([]).out == "demo_out"


def test_ddp_two_processes(tmp_path):
    """torchrun, 2 CPU processes (gloo, DistributedDataParallel, DistributedSampler); only rank 0 writes."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "elit_kernels.demo", "--steps", "3", "--batch", "8", "--sample-steps", "1", "--eval-reps", "1",
           "--out", str(out), "--save", "--no-progress", "--backend", "torch"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    # Own session, so a hung run's workers can be killed with their launcher (else their pipes stay open).
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True)
    try:
        log, _ = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log, _ = p.communicate()
        pytest.fail("torchrun run timed out:\n" + log[-3000:])
    assert p.returncode == 0, log[-3000:]
    with open(out / "results.json") as f:
        res = json.load(f)
    assert res["train"]["world_size"] == 2 and res["train"]["per_rank_batch"] == 4
    assert res["train"]["ddp_params_in_sync"] is True
    assert min(min(b) for b in res["train"]["budgets_first_steps_rank0"]) < 16  # some steps dropped a tail
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "loss_by_budget.png", "results.json", "samples.png"]
    model, meta = load_checkpoint(str(out / "checkpoint.pt"))
    assert meta["world_size"] == 2 and meta["trained_steps"] == 3
