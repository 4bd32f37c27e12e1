"""Round 41 of the hostile-user findings (models, checkpoints, ``official/``), each with the test that failed before
its fix:

1. a checkpoint missing its last block(s), or holding extra trailing ones, is refused naming those keys: the depth
   comes from the registry name, ``arch["depth"]``, or the file's own records (the optimizer state's parameter
   count, the second weights entry), never from the chosen weights alone;
2. ``checkpoint_info`` of one of our files names the file loaded and ``format: 'elit-kernels'``; the meta's own
   ``source`` / ``format`` (elit-convert's input) are kept as ``converted_from`` / ``original_format``;
3. ``weights="model"`` on a bare state_dict (one set of weights) is refused, and the weights are recorded as unknown;
4. malformed entries of one of our torch files (no config, no state_dict, a non-tensor, a non-str key, a meta that
   is not a dict) are CheckpointErrors naming the file and the entry, in ``load_checkpoint`` as in ``load_model``;
5. a non-string key in an official state_dict is a CheckpointError (elit-convert: exit 2, no traceback);
6. a malformed ``args`` entry, or an ``args`` field of the wrong type, is a CheckpointError naming ``args.<field>``;
7. a device this machine cannot use (mps, xpu, ...) is a ValueError naming ``device``, never a "damaged file";
8. a folder named ``*.safetensors`` is an IsADirectoryError naming the path;
12. ``latents_for_budget`` refuses a ``cfg`` that is not an ElitConfig (TypeError naming ``cfg``) and a budget above
    the config's J_max;
13. ``ElitDiT.layout`` names ``device`` when it is not a device;
14. ``dtype`` is one the model runs in (float16, bfloat16, float32, float64), not any floating dtype (float8).
"""
import argparse
import os
import pathlib
import random
import re

import pytest
import torch

from elit_kernels.models import ElitDiT, elit_config, load_model, save_model
from elit_kernels.models.checkpoint import CheckpointError
from elit_kernels.official import latents_for_budget, load_checkpoint
from elit_kernels.official.cli import main as convert_main

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = str(ROOT / "tests" / "fixtures" / "elit_sit_tiny_a.pt")
ARCH = {"num_heads": 2, "dit_decoder_depth": 1}  # what fixture A's name (outside the registry) needs
ARCH_CLI = ["--arch", "num_heads=2", "--arch", "dit_decoder_depth=1"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _read(path=FIXTURE):
    with torch.serialization.safe_globals([argparse.Namespace]):
        c = torch.load(path, map_location="cpu", weights_only=True)
    c.pop("reference", None)
    return c


def _block_keys(sd, i):
    return sorted(k for k in sd if k.startswith(f"blocks.{i}."))


def _depth(sd):
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One of our own files (a random tiny ElitDiT), as a torch file and as safetensors."""
    d = tmp_path_factory.mktemp("r41")
    torch.manual_seed(random.randrange(1 << 30))
    model = ElitDiT(elit_config("tiny", 64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model, save_model(str(d / "tiny.pt"), model), save_model(str(d / "tiny.safetensors"), model)


# --- 1. depth is never read from the weights alone ---------------------------------------------------------------
def test_a_missing_last_block_is_refused_naming_its_keys(tmp_path):
    rng = random.Random()
    c = _read()
    depth = _depth(c["ema"])
    k = rng.choice([1, 2])  # drop the last k blocks: each shallower model would still be a valid config
    lost = [key for i in range(depth - k, depth) for key in _block_keys(c["ema"], i)]
    weights = rng.choice(["ema", "model"])

    def cut(entries, drop_opt=False):
        d = {**c, **{w: {key: v for key, v in c[w].items() if key not in lost} for w in entries}}
        if drop_opt:
            d.pop("opt")
        p = tmp_path / f"cut_{'_'.join(entries)}_{drop_opt}.pt"
        torch.save(d, p)
        return str(p)

    # only the chosen entry cut: the other entry (and the optimizer state) give the depth
    # both entries cut: the optimizer state still counts the parameters
    # only the chosen entry cut, no optimizer state: the other entry alone
    for p in (cut([weights]), cut(["ema", "model"]), cut([weights], drop_opt=True)):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(p, arch=ARCH, weights=weights)
        msg = str(e.value)
        assert msg.startswith(p + ": ") and f"missing keys ({len(lost)})" in msg, msg
        assert all(key in msg for key in lost), msg
    # a bare state_dict cut short: nothing in the file states the depth, so arch must
    bare = tmp_path / "bare.pt"
    torch.save({key: v for key, v in c["ema"].items() if key not in lost}, bare)
    arch = {**ARCH, "encoder_depth": c["args"].encoder_depth}
    with pytest.raises(CheckpointError, match=re.escape(f"{bare}: depth: ") + r".*pass arch=\{'depth': N\}"):
        load_checkpoint(str(bare), arch=arch)
    with pytest.raises(CheckpointError, match=f"missing keys \\({len(lost)}\\): " + re.escape(", ".join(sorted(lost)))):
        load_checkpoint(str(bare), arch={**arch, "depth": depth})
    # elit-convert: one line naming the --arch flag to pass, exit 2
    with pytest.raises(SystemExit) as ex:
        convert_main([str(bare), "--out", str(tmp_path / "o.pt"), "--arch", "encoder_depth=1", *ARCH_CLI])
    assert ex.value.code == 2


def test_extra_trailing_blocks_are_refused_and_an_intact_file_loads_noting_its_depth(tmp_path, capsys):
    rng = random.Random()
    c = _read()
    depth = _depth(c["ema"])
    extra = rng.choice([1, 2])
    src = rng.randrange(depth)
    added = {}
    for j in range(depth, depth + extra):
        for key in _block_keys(c["ema"], src):
            added[key.replace(f"blocks.{src}.", f"blocks.{j}.", 1)] = torch.randn_like(c["ema"][key])
    for both in (False, True):
        d = {**c, "ema": {**c["ema"], **added}}
        if both:
            d["model"] = {**c["model"], **added}
        p = tmp_path / f"extra_{both}.pt"
        torch.save(d, p)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(str(p), arch=ARCH)
        assert f"unexpected keys ({len(added)})" in str(e.value) and all(k in str(e.value) for k in added)
    # the intact file: the depth is the one the optimizer state counts, said in the notes
    m = load_checkpoint(FIXTURE, arch=ARCH)
    assert m.cfg.depth == depth
    assert any(n.startswith(f"depth {depth}: from the optimizer state") for n in m.checkpoint_info["notes"])


# --- 2. checkpoint_info of our files ------------------------------------------------------------------------------
def test_a_converted_files_info_names_the_file_loaded(tmp_path, capsys, tiny):
    suffix = random.choice([".safetensors", ".pt"])
    out = str(tmp_path / ("conv" + suffix))
    assert convert_main([FIXTURE, "--out", out, *ARCH_CLI]) == 0
    info = load_checkpoint(out).checkpoint_info
    assert info["source"] == out and info["format"] == "elit-kernels"
    assert info["converted_from"] == os.path.basename(FIXTURE) and info["original_format"] == "official"
    # any meta: the loader's own keys win, the meta's values are kept under other names
    model = tiny[0]
    src, fmt = f"x{random.randrange(10**6)}", f"f{random.randrange(10**6)}"
    p = save_model(str(tmp_path / ("m" + suffix)), model, meta={"source": src, "format": fmt, "note": src})
    info = load_checkpoint(p).checkpoint_info
    assert (info["source"], info["format"], info["converted_from"], info["original_format"], info["note"]) == (
        p, "elit-kernels", src, fmt, src)


# --- 3. weights="model" on a bare state_dict ---------------------------------------------------------------------
def test_weights_model_is_refused_for_a_bare_state_dict(tmp_path):
    c = _read()
    w = random.choice(["ema", "model"])
    p = tmp_path / "bare.pt"
    torch.save(c[w], p)
    arch = {**ARCH, "encoder_depth": c["args"].encoder_depth, "depth": _depth(c[w])}
    with pytest.raises(ValueError, match=r"^weights: .*bare.pt is a bare state_dict"):
        load_checkpoint(str(p), arch=arch, weights="model")
    m = load_checkpoint(str(p), arch=arch)
    assert m.checkpoint_info["weights"] is None  # which set these are cannot be told
    assert any("bare state_dict" in n and "which weights" in n for n in m.checkpoint_info["notes"])


# --- 4. malformed entries of our torch files -------------------------------------------------------------------
@pytest.mark.parametrize("case,match", [
    ("no_config", r"has no 'config' entry"),
    ("no_state_dict", r"has no 'state_dict' entry"),
    ("config_list", r"its config is list, expected a dict of ElitConfig fields"),
    ("tensor_list", r"its state_dict is not a dict of tensors \(got dict holding \['Tensor', 'list'\]\): "
                    r"'latent_embed' is list"),
    ("state_dict_none", r"its state_dict is not a dict of tensors \(got NoneType\)"),
    ("int_key", r"its state_dict has a key that is not a string: \d+ \(int\)"),
    ("meta_list", r"its meta is list, expected a dict"),
])
def test_malformed_entries_of_our_torch_files_are_named_by_both_loaders(tmp_path, tiny, case, match):
    o = torch.load(tiny[1], weights_only=True)
    if case == "no_config":
        o.pop("config")
    elif case == "no_state_dict":
        o.pop("state_dict")
    elif case == "config_list":
        o["config"] = list(o["config"].items())
    elif case == "tensor_list":
        o["state_dict"] = {**o["state_dict"], "latent_embed": o["state_dict"]["latent_embed"].tolist()}
    elif case == "state_dict_none":
        o["state_dict"] = None
    elif case == "int_key":
        o["state_dict"] = {**o["state_dict"], random.randrange(1, 1000): torch.zeros(1)}
    elif case == "meta_list":
        o["meta"] = [random.random()]
    p = tmp_path / f"{case}.pt"
    torch.save(o, p)
    for reader in (load_model, load_checkpoint):
        with pytest.raises(CheckpointError, match="^" + re.escape(str(p)) + ": " + match):
            reader(str(p))


# --- 5. non-string keys in an official state_dict --------------------------------------------------------------
def test_a_non_string_key_in_an_official_state_dict_is_named(tmp_path, capsys):
    c = _read()
    key = random.randrange(1, 1000)
    c["ema"][key] = torch.zeros(1)
    p = str(tmp_path / "intkey.pt")
    torch.save(c, p)
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: the 'ema' entry has a key that is not a string: "
                                                        f"{key} (int)")):
        load_checkpoint(p, arch=ARCH)
    with pytest.raises(SystemExit) as ex:
        convert_main([p, "--out", str(tmp_path / "o.pt"), *ARCH_CLI])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and "Traceback" not in err and "not a string" in err
    # a top-level dict of mixed keys: "not an ELIT-SiT checkpoint", not a TypeError of sorting them
    p2 = str(tmp_path / "mixed.pt")
    torch.save({key: torch.zeros(1), "w": torch.zeros(1)}, p2)
    with pytest.raises(CheckpointError, match=re.escape(p2) + ": not an ELIT-SiT checkpoint"):
        load_checkpoint(p2)


# --- 6. malformed args -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,match", [
    ("hello", r"args is str \('hello'\), expected an argparse.Namespace"),
    ([1, 2], r"args is list \(\[1, 2\]\), expected an argparse.Namespace"),
    ({"encoder_depth": "1"}, r"args.encoder_depth is str \('1'\), expected an int"),
    ({"encoder_depth": 1.0}, r"args.encoder_depth is float \(1.0\), expected an int"),
    ({"encoder_depth": True}, r"args.encoder_depth is bool \(True\), expected an int"),
    ({"resolution": "128"}, r"args.resolution is str \('128'\), expected an int"),
    ({"num_classes": 10.0}, r"args.num_classes is float \(10.0\), expected an int"),
    ({"qk_norm": "False"}, r"args.qk_norm is str \('False'\), expected a bool"),
    ({"model": 7}, r"args.model is int \(7\), expected a str"),
])
def test_malformed_args_are_named(tmp_path, capsys, value, match):
    c = _read()
    if isinstance(value, dict):
        for k, v in value.items():
            setattr(c["args"], k, v)
    else:
        c["args"] = value
    p = str(tmp_path / "args.pt")
    torch.save(c, p)
    with pytest.raises(CheckpointError, match="^" + re.escape(p) + ": " + match):
        load_checkpoint(p, arch=ARCH)
    with pytest.raises(SystemExit) as ex:
        convert_main([p, "--out", str(tmp_path / "o.pt"), *ARCH_CLI])
    assert ex.value.code == 2 and "Traceback" not in capsys.readouterr().err


# --- 7. devices this machine cannot use ------------------------------------------------------------------------
def _usable(dev):
    try:
        torch.empty(0, device=dev)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("dev", ["mps", "xpu", "ipu", "xla", "hpu", "mtia", "cuda"])
def test_a_device_this_machine_cannot_use_is_named(tiny, dev):
    if _usable(dev):
        pytest.skip(f"{dev} is usable here")
    for path in tiny[1:]:
        for reader in (load_model, load_checkpoint):
            with pytest.raises(ValueError, match=f"^device: {dev}") as e:
                reader(path, device=dev)
            assert "damaged" not in str(e.value)
    with pytest.raises(ValueError, match=f"^device: {dev}"):
        load_checkpoint(FIXTURE, arch=ARCH, device=dev)


# --- 8. a folder named like a checkpoint -----------------------------------------------------------------------
def test_a_folder_named_like_a_checkpoint_is_named(tmp_path):
    for name in ("f.safetensors", "f.pt"):
        d = tmp_path / f"{random.randrange(10**6)}{name}"
        d.mkdir()
        for reader in (load_model, load_checkpoint):
            with pytest.raises(IsADirectoryError, match=re.escape(f"path: {d} is a folder; expected a checkpoint "
                                                                  "file")):
                reader(str(d))


# --- 12. latents_for_budget's cfg ------------------------------------------------------------------------------
def test_latents_for_budget_names_a_bad_cfg_and_refuses_budgets_above_j_max():
    for bad in (None, "XL/2", {"tokens_per_group": 16}, 3):
        with pytest.raises(TypeError, match=rf"^cfg: expected an ElitConfig \(or a model with \.cfg\), got "
                                            rf"{type(bad).__name__}"):
            latents_for_budget(0.5, bad)
    j_max = random.choice([1, 2, 4, 8])
    cfg = elit_config("S/2", 256, j_max=j_max)  # the paper preset: J_max may be below P
    p, n = cfg.tokens_per_group, cfg.tokens
    for j in range(1, p + 1):
        frac, count = j / p, j * n // p
        if j <= j_max:
            assert latents_for_budget(frac, cfg) == j and latents_for_budget(count, cfg) == j
        else:
            for b in (frac, count):
                with pytest.raises(ValueError, match=rf"^budget: .* keeps {j} latents per group, above this "
                                                     rf"config's J_max = {j_max}"):
                    latents_for_budget(b, cfg)


# --- 13. ElitDiT.layout's device ---------------------------------------------------------------------------------
def test_layout_names_a_bad_device(tiny):
    model = tiny[0]
    j = model.cfg.latents_per_group
    budgets = [random.randint(1, j) for _ in range(2)]
    for dev in (None, "bogus", 3.5, [0]):
        with pytest.raises(ValueError, match=r"^device: expected a torch.device or a device string"):
            model.layout(budgets, 2, dev)
    for dev in ("mps", "xla"):  # a device this machine cannot hold tensors on: named, not torch's dispatcher error
        if not _usable(dev):
            with pytest.raises(ValueError, match=f"^device: {dev} requested"):
                model.layout(budgets, 2, dev)
    assert list(model.layout(budgets, 2, torch.device("cpu")).budgets) == budgets


# --- 14. dtypes the model runs in ----------------------------------------------------------------------------------
def test_dtype_is_one_the_model_runs_in(tiny):
    bad = [d for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                           "float8_e5m2fnuz", "float8_e8m0fnu")) if d is not None]
    for d in random.sample(bad, len(bad)):
        for reader in (load_model, load_checkpoint):
            with pytest.raises(TypeError, match=r"^dtype: expected None or a floating torch.dtype the model runs in "
                                                r"\(torch.float16, torch.bfloat16, torch.float32, torch.float64\)"):
                reader(tiny[2], dtype=d)
    d = random.choice([torch.float16, torch.bfloat16, torch.float32, torch.float64])
    assert load_model(tiny[2], dtype=d).latent_embed.dtype == d
