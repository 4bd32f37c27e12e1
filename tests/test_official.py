"""The released ELIT-SiT checkpoints: loader, official budget semantics, samplers, converter.

Every fixture in ``tests/fixtures/elit_sit_*.pt`` (plus any listed in ``$ELIT_OFFICIAL_FIXTURES``, paths
separated by ``os.pathsep``) is a tiny checkpoint in the official layout with the official model's outputs
(``reference``; see docs/released_checkpoints.md §1). Everything here runs through ``load_checkpoint`` alone.
"""
import argparse
import glob
import json
import os
import pickle
import re

import pytest
import torch

from elit_kernels.flow import euler_sample, guided_velocity
from elit_kernels.layout import group_major_permutation
from elit_kernels.models import ElitDiT, elit_sit_config, load_model, save_model
from elit_kernels.models.config import parse_sit_name
from elit_kernels.official import (CheckpointError, UnsafeCheckpointError, convert_state_dict, latents_for_budget,
                                   load_checkpoint, official_shapes)
from elit_kernels.official.cli import main as convert_main

HERE = os.path.dirname(__file__)
FIXTURE_A = os.path.join(HERE, "fixtures", "elit_sit_tiny_a.pt")
FIXTURES = sorted(glob.glob(os.path.join(HERE, "fixtures", "elit_sit_*.pt")))
FIXTURES += [p for p in os.environ.get("ELIT_OFFICIAL_FIXTURES", "").split(os.pathsep) if p]
RTOL = 1e-5  # max|ours - official| / max|official|


def _read(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


_CACHE = {}


def ckpt(path):
    if path not in _CACHE:
        _CACHE[path] = _read(path)
    return _CACHE[path]


def arch_of(path):
    """What ``load_checkpoint`` needs besides the file: nothing for a registry name, else the constructor kwargs."""
    c = ckpt(path)
    try:
        parse_sit_name(c["args"].model)
        return None
    except ValueError:
        return dict(c["reference"]["constructor_kwargs"])


def load(path, **kw):
    kw.setdefault("arch", arch_of(path))
    kw.setdefault("backend", "torch")
    return load_checkpoint(path, **kw)


def assert_rel(out, ref, tol=RTOL, msg=""):
    err = (out.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= tol * scale, f"{msg}: max abs err {err:.3g} > {tol:g} x max|ref| {scale:.3g}"


def _guidance_mode(g):
    if g["cfg_scale"] <= 1:
        return "none"
    if g["unconditional_inference_budget"] is None:
        return "cfg"
    return "autoguidance" if g.get("autoguidance") else "ccfg"


def _j(b, cfg):
    return None if b is None else latents_for_budget(b, cfg)


# --- parity with the official outputs ------------------------------------------------------------------
@pytest.mark.parametrize("path", FIXTURES, ids=os.path.basename)
def test_outputs_match_official_at_every_stored_budget(path):
    ref = ckpt(path)["reference"]
    m = load(path)
    assert not m.training and m.cfg.budget_core_only
    x, t, y = ref["x"], ref["t"], ref["y"]
    for name, o in ref["outputs"].items():
        j = latents_for_budget(o["inference_budget"], m.cfg)
        assert j == o["latents_per_group"], name
        assert j * m.cfg.groups == o["latents_total"], name
        with torch.no_grad():
            assert_rel(m(x, t, y, j), o["out"], msg=name)


@pytest.mark.parametrize("path", FIXTURES, ids=os.path.basename)
def test_kept_slots_follow_the_official_keep_mask(path):
    # J kept per group = slots 0..J-1 of every window, in raster order of the token grid
    ref = ckpt(path)["reference"]
    m = load(path)
    cfg = m.cfg
    perm = group_major_permutation(cfg.grid, cfg.grid, cfg.window)
    for name, o in ref["outputs"].items():
        j = o["latents_per_group"]
        mask = torch.zeros(cfg.tokens, dtype=torch.bool)
        slots = torch.arange(cfg.groups)[:, None] * cfg.tokens_per_group + torch.arange(j)[None]
        mask[perm[slots.reshape(-1)]] = True
        assert torch.equal(mask, o["keep_mask"].reshape(-1)), name


@pytest.mark.parametrize("path", FIXTURES, ids=os.path.basename)
def test_mixed_per_sample_budgets_equal_each_sample_alone_and_the_official_outputs(path):
    ref = ckpt(path)["reference"]
    m = load(path)
    outs = ref["outputs"]
    names = list(outs)
    b = ref["x"].shape[0]
    pick = [names[i % len(names)] for i in range(b)]  # a different official budget per sample
    budgets = [outs[n]["latents_per_group"] for n in pick]
    assert len(set(budgets)) > 1
    x, t, y = ref["x"], ref["t"], ref["y"]
    with torch.no_grad():
        mixed = m(x, t, y, budgets)
        for i, n in enumerate(pick):
            alone = m(x[i:i + 1], t[i:i + 1], y[i:i + 1], budgets[i])
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-6, msg=f"sample {i} ({n})")
            assert_rel(mixed[i], outs[n]["out"][i], msg=f"sample {i} ({n})")


@pytest.mark.parametrize("path", FIXTURES, ids=os.path.basename)
def test_model_weights_are_not_the_ema_ones(path):
    # 'model' is a decoy (ema + 5% noise): loading it must fail the parity that 'ema' passes
    ref = ckpt(path)["reference"]
    full = ref["outputs"]["full"]
    m = load(path, weights="model")
    with torch.no_grad():
        out = m(ref["x"], ref["t"], ref["y"], full["latents_per_group"])
    err = (out - full["out"]).abs().max() / full["out"].abs().max()
    assert err > 1e-2, f"weights='model' matched the EMA outputs ({err:.3g})"
    assert m.checkpoint_info["weights"] == "model"


@pytest.mark.parametrize("path", FIXTURES, ids=os.path.basename)
def test_guided_velocities_match_official(path):
    ref = ckpt(path)["reference"]
    m = load(path)
    x = ref["x"].double()
    y = ref["sampling_y"]
    for kind, g in ref["guidance"].items():
        t = torch.full((x.shape[0],), float(g["t"]))
        with torch.no_grad():
            v = guided_velocity(m, x.float(), t, y, _j(g["inference_budget"], m.cfg), mode=_guidance_mode(g),
                                scale=g["cfg_scale"] - 1, weak_budget=_j(g["unconditional_inference_budget"], m.cfg),
                                dtype=torch.float64)
        assert v.dtype == torch.float64
        assert_rel(v, g["v"], msg=kind)


@pytest.mark.parametrize("path", FIXTURES, ids=os.path.basename)
def test_sampling_runs_match_official(path):
    ref = ckpt(path)["reference"]
    m = load(path)
    for run, g in ref["sampling"].items():
        assert g["path_type"] == "linear"
        mode = "cfg" if g["unconditional_inference_budget"] is None else ("autoguidance" if g.get("autoguidance") else "ccfg")
        out = euler_sample(m, ref["sampling_z"], ref["sampling_y"], steps=g["num_steps"],
                           budget=_j(g["inference_budget"], m.cfg), mode=mode, scale=g["cfg_scale"] - 1,
                           weak_budget=_j(g["unconditional_inference_budget"], m.cfg),
                           guidance_interval=(g["guidance_low"], g["guidance_high"]), heun=g["heun"])
        assert_rel(out, g["out"], tol=3 * RTOL, msg=run)


def test_sampling_parity_needs_the_official_rules():
    # Guard against a test that cannot fail: guiding outside the interval, or skipping Heun, moves the result.
    ref = ckpt(FIXTURE_A)["reference"]
    m = load(FIXTURE_A)
    g = ref["sampling"]["euler_cfg_interval"]
    kw = dict(steps=g["num_steps"], budget=_j(g["inference_budget"], m.cfg), mode="cfg", scale=g["cfg_scale"] - 1)
    always = euler_sample(m, ref["sampling_z"], ref["sampling_y"], **kw)
    assert (always.double() - g["out"]).abs().max() > 1e-3
    h = ref["sampling"]["heun_cfg"]
    euler = euler_sample(m, ref["sampling_z"], ref["sampling_y"], steps=h["num_steps"], mode="cfg", scale=h["cfg_scale"] - 1)
    assert (euler.double() - h["out"]).abs().max() > 1e-3


# --- the loader ---------------------------------------------------------------------------------------
def test_loader_reads_sizes_from_args_weights_and_arch():
    c = ckpt(FIXTURE_A)
    kw = c["reference"]["constructor_kwargs"]
    m = load_checkpoint(FIXTURE_A, arch={"num_heads": kw["num_heads"], "dit_decoder_depth": kw["dit_decoder_depth"]})
    cfg, lay = m.cfg, c["reference"]["layout"]
    assert (cfg.hidden, cfg.depth, cfg.heads, cfg.patch, cfg.in_channels, cfg.num_classes) == (
        kw["hidden_size"], kw["depth"], kw["num_heads"], kw["patch_size"], kw["in_channels"], kw["num_classes"])
    assert (cfg.n_head, cfg.core_blocks, cfg.n_tail) == (lay["head_blocks"], lay["core_blocks"], lay["tail_blocks"])
    assert (cfg.grid, cfg.tokens, cfg.window, cfg.groups, cfg.latents_per_group) == (
        lay["grid"], lay["tokens"], lay["group_size"], lay["groups"], lay["latents_per_group_max"])
    assert m.null_class == c["reference"]["null_class_id"]
    info = m.checkpoint_info
    assert info["weights"] == "ema" and info["steps"] == c["steps"] and info["model"] == c["args"].model
    assert any("opt" in n for n in info["notes"])


def test_every_official_key_is_used_or_deliberately_ignored():
    c = ckpt(FIXTURE_A)
    sd = c["ema"]
    m = load(FIXTURE_A)
    want = official_shapes(m.cfg)
    assert set(sd) == set(want)  # the fixture holds exactly what the config predicts
    ours = convert_state_dict(sd, m.cfg)
    assert set(ours) == set(m.state_dict())  # ... and the map fills every parameter of ours
    # Each official tensor reaches the output (pos_embed is checked against our table instead; the 7th Read
    # modulation chunk is unused by the official forward pass and dropped).
    ref = c["reference"]
    x, t, y = ref["x"][:1], ref["t"][:1], ref["y"][:1]
    with torch.no_grad():
        base = m(x, t, y)
    for key in sorted(sd):
        if key == "pos_embed":
            continue
        bumped = dict(sd)
        bumped[key] = sd[key] + 0.5 * torch.randn_like(sd[key])
        if key.endswith("fit_layer.adaLN_modulation.1.weight") or key.endswith("fit_layer.adaLN_modulation.1.bias"):
            d = m.cfg.hidden
            bumped[key] = sd[key].clone()
            bumped[key][6 * d:] += 1.0  # the unused chunk: no effect
            m.load_state_dict(convert_state_dict(bumped, m.cfg))
            with torch.no_grad():
                assert torch.equal(m(x, t, y), base), key
            bumped[key] = sd[key] + 0.5 * torch.randn_like(sd[key])
        if key.endswith("latent_pos_embed"):  # only rows 0..N-1 are read
            bumped[key] = sd[key].clone()
            bumped[key][:m.cfg.tokens] += 0.5
        m.load_state_dict(convert_state_dict(bumped, m.cfg))
        with torch.no_grad():
            assert (m(x, t, y) - base).abs().max() > 1e-6, f"{key} does not reach the output"
    m.load_state_dict(convert_state_dict(sd, m.cfg))


def _variant(tmp_path, name, edit_sd=None, edit_args=None, edit_top=None):
    """A copy of fixture A with the state_dicts / args / top level edited."""
    c = _read(FIXTURE_A)
    for w in ("ema", "model"):
        if edit_sd:
            c[w] = edit_sd(dict(c[w]))
    if edit_args:
        edit_args(c["args"])
    if edit_top:
        c = edit_top(c)
    p = tmp_path / name
    torch.save(c, p)
    return str(p)


def test_lr_scheduler_projectors_and_legacy_names_are_accepted(tmp_path):
    ref = ckpt(FIXTURE_A)["reference"]
    arch = arch_of(FIXTURE_A)
    enc = ckpt(FIXTURE_A)["args"].encoder_depth

    def legacy(sd):
        return {(f"decoder_blocks.{int(k.split('.')[1]) - enc}." + k.split(".", 2)[2]
                 if k.startswith("blocks.") and int(k.split(".")[1]) >= enc else k): v for k, v in sd.items()}

    def extras(sd):
        sd["projectors.0.0.weight"] = torch.randn(8, 16)
        return legacy(sd)

    def sched(c):
        c["lr_scheduler"] = {"_milestones": [10000], "last_epoch": 50000, "_schedulers": [{"base_lrs": [1e-4]}]}
        return c

    p = _variant(tmp_path, "v.pt", edit_sd=extras, edit_top=sched)
    m = load_checkpoint(p, arch=arch, backend="torch")  # the loader under test, not dispatch
    notes = " ".join(m.checkpoint_info["notes"])
    assert "lr_scheduler" in notes and "projectors" in notes and "legacy" in notes
    full = ref["outputs"]["full"]
    with torch.no_grad():
        assert_rel(m(ref["x"], ref["t"], ref["y"], full["latents_per_group"]), full["out"], msg="variant")


def test_bare_state_dict_with_arch(tmp_path):
    c = ckpt(FIXTURE_A)
    p = tmp_path / "ema_only.pt"
    torch.save(c["ema"], p)
    arch = {**arch_of(FIXTURE_A), "encoder_depth": c["args"].encoder_depth}
    m = load_checkpoint(str(p), arch=arch, backend="torch")
    full = c["reference"]["outputs"]["full"]
    with torch.no_grad():
        assert_rel(m(c["reference"]["x"], c["reference"]["t"], c["reference"]["y"]), full["out"], msg="bare")
    with pytest.raises(CheckpointError, match="encoder_depth"):
        load_checkpoint(str(p), arch=arch_of(FIXTURE_A) | {"encoder_depth": None})  # None: not given


def test_a_latent_table_shorter_than_the_grid_is_refused_naming_the_file_and_key(tmp_path):
    """latent_pos_embed indexes the grid's tokens by raster position: fewer rows than tokens was refused by the
    config with a bare 'latent_pos_rows: 32 < 64 tokens', naming neither the file nor the key (every other
    inconsistency names both)."""
    key = "input_token_editor.adapters.0.latent_pos_embed"

    def cut(sd):
        sd[key] = sd[key][:3].clone()
        return sd

    p = _variant(tmp_path, "short.pt", edit_sd=cut)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(p)}: {re.escape(key)} has 3 rows, fewer than the "):
        load_checkpoint(p, arch=arch_of(FIXTURE_A))


@pytest.mark.parametrize("kind", ["bool", "int64", "complex"])
def test_a_weight_that_is_not_floating_point_is_refused_naming_it(tmp_path, kind):
    """A bool, integer or complex tensor where a float weight belongs was cast in without a word (the output
    moved by 4 to 8; complex lost its imaginary part): refused naming the key and its dtype, in the official
    loader (elit-convert) and in our own format."""
    arch = arch_of(FIXTURE_A)
    c = {k: v for k, v in ckpt(FIXTURE_A).items() if k != "reference"}  # a copy: ckpt() is shared
    key = "t_embedder.mlp.2.weight"
    w = c["ema"][key]
    c["ema"] = {**c["ema"], key: {"bool": w > 0, "int64": (w * 10).round().long(), "complex": torch.complex(w, w)}[kind]}
    p = tmp_path / "bad.pt"
    torch.save(c, p)
    dt = c["ema"][key].dtype
    with pytest.raises(CheckpointError, match=re.escape(f"bad.pt: tensor '{key}' is {dt}, expected a floating-point "
                                                        "weight (1 such tensors in all)")):
        load_checkpoint(str(p), arch=arch, check_finite=False)
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{key}' is {dt}")):  # the finite check runs after
        load_checkpoint(str(p), arch=arch)
    ours = _tiny_file(tmp_path, ".pt")
    f = torch.load(ours, weights_only=False)
    k0 = sorted(f["state_dict"])[0]
    f["state_dict"][k0] = {"bool": f["state_dict"][k0] > 0, "int64": f["state_dict"][k0].long(),
                           "complex": f["state_dict"][k0].to(torch.complex64)}[kind]
    torch.save(f, ours)
    with pytest.raises(CheckpointError, match=re.escape(f"tensor '{k0}' is {f['state_dict'][k0].dtype}, expected a "
                                                        "floating-point weight")):
        load_model(ours)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
@pytest.mark.parametrize("bare", [False, True])
def test_a_wrapped_models_state_dict_loads_with_a_note(tmp_path, prefix, bare):
    """Every key prefixed 'module.' (DDP) or '_orig_mod.' (torch.compile): the same weights, loaded with a note
    (it was refused as 'not an ELIT-SiT checkpoint'), giving the official outputs."""
    arch = arch_of(FIXTURE_A)
    c = {k: v for k, v in ckpt(FIXTURE_A).items() if k != "reference"}  # a copy: ckpt() is shared
    ref = ckpt(FIXTURE_A)["reference"]
    c["ema"] = {prefix + k: v for k, v in c["ema"].items()}
    p = tmp_path / "wrapped.pt"
    torch.save(c["ema"] if bare else c, p)
    arch = {**arch, "encoder_depth": c["args"].encoder_depth} if bare else arch
    m = load_checkpoint(str(p), arch=arch, backend="torch")
    assert "removed the 'module.' prefix" in " ".join(m.checkpoint_info["notes"]) or prefix != "module."
    assert "prefix of every key" in " ".join(m.checkpoint_info["notes"])
    full = ref["outputs"]["full"]
    with torch.no_grad():
        assert_rel(m(ref["x"], ref["t"], ref["y"]), full["out"], msg="wrapped")


@pytest.mark.parametrize("key,value,error,match", [
    ("num_heads", 0, ValueError, "an int >= 1, got 0"),
    ("hidden_size", -3, ValueError, "an int >= 1, got -3"),
    ("num_heads", "2", TypeError, "an int, got str"),
    ("num_heads", 2.0, TypeError, "an int, got float"),
    ("depth", True, TypeError, "an int, got bool"),
    ("dit_decoder_depth", -1, ValueError, "an int >= 0, got -1"),
    ("encoder_depth", "1", TypeError, "an int, got str"),
    ("mlp_ratio", 0, ValueError, "a finite real > 0, got 0"),
    ("mlp_ratio", float("inf"), ValueError, "a finite real > 0, got inf"),
    ("mlp_ratio", "4", TypeError, "a real number, got str"),
    ("class_dropout_prob", 1.5, ValueError, r"a real in \[0, 1\], got 1.5"),
    ("elit_max_mask_prob", float("nan"), ValueError, r"a real in \[0, 1\], got nan"),
    ("qk_norm", 1, TypeError, "a bool, got int"),
])
def test_arch_values_are_checked_by_name(key, value, error, match):
    # checked before the file is read, so a missing file does not hide the bad value
    with pytest.raises(error, match=rf"^arch: {key}: expected {match}"):
        load_checkpoint("/nonexistent/ckpt.pt", arch={"num_heads": 2, "dit_decoder_depth": 1, key: value})
    # the values the official constructor takes pass: sizes, counts (0 included), reals, bools, None (not given)
    import numpy as np

    arch = arch_of(FIXTURE_A)
    m = load_checkpoint(FIXTURE_A, arch={"num_heads": np.int64(arch["num_heads"]),  # NumPy ints are ints
                                         "dit_decoder_depth": arch["dit_decoder_depth"], "encoder_depth": None,
                                         "mlp_ratio": np.float32(4), "class_dropout_prob": 0.1, "qk_norm": False,
                                         "path_type": "linear"})
    assert m.cfg.mlp_ratio == 4 and type(m.cfg.heads) is int
    # keys the loader takes but does not read are listed, not silently dropped
    assert "arch keys not read (training-only, or fixed by the weights): class_dropout_prob, path_type" in \
        m.checkpoint_info["notes"]


def test_arch_enable_elit_false_is_refused():
    with pytest.raises(ValueError, match=r"^arch: enable_elit: False describes a plain SiT; this loader reads ELIT-SiT"):
        load_checkpoint(FIXTURE_A, arch={**arch_of(FIXTURE_A), "enable_elit": False})
    assert load_checkpoint(FIXTURE_A, arch={**arch_of(FIXTURE_A), "enable_elit": True}).cfg.heads > 0


class _Hostile:
    """Pickles to ``os.system(...)``: a file carrying it must be refused, never executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    c = _read(FIXTURE_A)
    c["args"] = _Hostile(marker)
    p = tmp_path / "hostile.pt"
    torch.save(c, p)
    with pytest.raises(UnsafeCheckpointError, match=r"refused: the file pickles \S*system, which is not in the "
                                                    r"allowlist of what ELIT checkpoints need \(argparse\.Namespace\); "
                                                    "it was not executed") as e:
        load_checkpoint(str(p), arch=arch_of(FIXTURE_A))
    assert str(p) in str(e.value)
    assert not marker.exists()
    # the same through elit-convert: exit 2, no traceback, nothing written
    with pytest.raises(SystemExit) as ex:
        convert_main([str(p), "--out", str(tmp_path / "o.safetensors")])
    assert ex.value.code == 2 and not marker.exists() and not (tmp_path / "o.safetensors").exists()
    with pytest.raises(pickle.UnpicklingError):  # and torch's own default refuses it too (the control)
        torch.load(p, weights_only=True)


@pytest.mark.parametrize("case,match", [
    ("weights", r"weights: expected one of \('ema', 'model'\)"),
    ("arch_key", r"arch: unknown keyword\(s\) \['heads'\]"),
    ("no_arch", r"'ELIT-SiT-TinyA/2' is not an official registry name.*num_heads, dit_decoder_depth"),
    ("registry_mismatch", r"hidden_size disagrees: weights says 16, registry ELIT-SiT-S/2 says 384"),
    ("arch_mismatch", r"num_classes disagrees: weights says 10, arch says 12"),
    ("heads", r"num_heads 3 does not divide the width 16"),
    ("plain_sit", r"not an ELIT-SiT checkpoint: no Read/Write interface keys"),
    ("not_a_checkpoint", r"not an ELIT-SiT checkpoint: expected a dict with 'ema'/'model' and 'args'"),
    ("missing", r"missing keys \(2\): blocks\.2\.mlp\.fc2\.bias, output_token_editor\.adapters\.0\.pos_embed"),
    ("unexpected", r"unexpected keys \(1\): blocks\.1\.attn\.extra"),
    ("shape", r"shape mismatch for blocks\.2\.mlp\.fc1\.weight: expected \[64, 16\], got \[32, 16\]"),
    ("no_ema", r"no 'ema' entry.*try weights='model'"),
    ("qk_norm", r"qk_norm=True DiT blocks are not supported"),
    ("legacy_no_encoder_depth", r"legacy decoder_blocks\.\* names need encoder_depth"),
])
def test_loader_errors_name_the_problem(tmp_path, case, match):
    arch = arch_of(FIXTURE_A)
    kw = {"arch": arch}
    if case == "weights":
        kw["weights"] = "best"
        p = FIXTURE_A
    elif case == "arch_key":
        kw["arch"] = {"heads": 2}
        p = FIXTURE_A
    elif case == "no_arch":
        kw["arch"] = None
        p = FIXTURE_A
    elif case == "registry_mismatch":
        p = _variant(tmp_path, "r.pt", edit_args=lambda a: setattr(a, "model", "ELIT-SiT-S/2"))
        kw["arch"] = None
    elif case == "arch_mismatch":
        kw["arch"] = arch | {"num_classes": 12}
        p = FIXTURE_A
    elif case == "heads":
        kw["arch"] = arch | {"num_heads": 3}
        p = FIXTURE_A
    elif case == "plain_sit":
        p = _variant(tmp_path, "s.pt", edit_sd=lambda sd: {k: v for k, v in sd.items() if "token_editor" not in k})
    elif case == "not_a_checkpoint":
        p = tmp_path / "n.pt"
        torch.save({"weights": torch.zeros(2)}, p)
    elif case == "missing":
        p = _variant(tmp_path, "m.pt", edit_sd=lambda sd: {k: v for k, v in sd.items() if k not in (
            "blocks.2.mlp.fc2.bias", "output_token_editor.adapters.0.pos_embed")})
    elif case == "unexpected":
        p = _variant(tmp_path, "u.pt", edit_sd=lambda sd: sd | {"blocks.1.attn.extra": torch.zeros(3)})
    elif case == "shape":
        p = _variant(tmp_path, "sh.pt", edit_sd=lambda sd: sd | {"blocks.2.mlp.fc1.weight": torch.zeros(32, 16)})
    elif case == "no_ema":
        p = _variant(tmp_path, "ne.pt", edit_top=lambda c: {k: v for k, v in c.items() if k != "ema"})
    elif case == "qk_norm":
        p = _variant(tmp_path, "q.pt", edit_args=lambda a: setattr(a, "qk_norm", True))
        kw["arch"] = {k: arch[k] for k in ("num_heads", "dit_decoder_depth")}
    elif case == "legacy_no_encoder_depth":  # a bare state_dict: no args to number the blocks from
        p = tmp_path / "l.pt"
        torch.save({(k.replace("blocks.3.", "decoder_blocks.0.") if k.startswith("blocks.3.") else k): v
                    for k, v in ckpt(FIXTURE_A)["ema"].items()}, p)
        kw["arch"] = {k: arch[k] for k in ("num_heads", "dit_decoder_depth")}
    with pytest.raises(ValueError, match=match) as e:
        load_checkpoint(str(p), **kw)
    if case not in ("weights", "arch_key"):
        assert str(p) in str(e.value)  # a file-level error names the file


# --- our own format and elit-convert ------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_convert_round_trips(tmp_path, suffix, capsys):
    out = tmp_path / ("tiny" + suffix)
    kw = ckpt(FIXTURE_A)["reference"]["constructor_kwargs"]
    rc = convert_main([FIXTURE_A, "--out", str(out), "--arch", f"num_heads={kw['num_heads']}",
                       "--arch", f"dit_decoder_depth={kw['dit_decoder_depth']}"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "budget_core_only" in printed and "interface_qk_norm" in printed and f"wrote {out}" in printed
    direct = load(FIXTURE_A)
    for reader in (lambda: load_checkpoint(str(out), backend="torch"), lambda: load_model(str(out), backend="torch")):
        m = reader()
        assert m.cfg == direct.cfg and not m.training
        for k, v in direct.state_dict().items():
            assert torch.equal(m.state_dict()[k], v), k
    m, meta = load_model(str(out), backend="torch", return_meta=True)
    assert meta["weights"] == "ema" and meta["model"] == "ELIT-SiT-TinyA/2"
    ref = ckpt(FIXTURE_A)["reference"]
    with torch.no_grad():
        assert_rel(m(ref["x"], ref["t"], ref["y"]), ref["outputs"]["full"]["out"], msg="converted")
    with pytest.raises(ValueError, match="weights: .* elit-kernels file"):
        load_checkpoint(str(out), weights="model")


def test_convert_cli_usage_errors(tmp_path, capsys):
    def run(argv):
        with pytest.raises(SystemExit) as e:
            convert_main(argv)
        assert e.value.code == 2
        return capsys.readouterr().err

    assert "checkpoint: no such file" in run([str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o.pt")])
    err = run([FIXTURE_A, "--out", str(tmp_path / "o.pt")])
    assert "--arch num_heads=H --arch dit_decoder_depth=T" in err and "Traceback" not in err
    (tmp_path / "exists.pt").write_bytes(b"x")
    assert "--out: " in run([FIXTURE_A, "--out", str(tmp_path / "exists.pt"), "--arch", "num_heads=2"])
    assert "--arch: unknown keyword" in run([FIXTURE_A, "--out", str(tmp_path / "o2.pt"), "--arch", "heads=2"])
    assert "--weights" in run([FIXTURE_A, "--out", str(tmp_path / "o3.pt"), "--weights", "best"])
    # the flag replaces the loader's own argument name: "--arch: arch: ..." said it twice
    assert "arch: arch:" not in run([FIXTURE_A, "--out", str(tmp_path / "o2.pt"), "--arch", "heads=2"])
    assert "checkpoint: " + str(tmp_path) + " is a folder (expected a file)" in run(
        [str(tmp_path), "--out", str(tmp_path / "o.pt")])
    # arch values of the wrong type or range: named, before anything divides by them
    assert "--arch: num_heads: expected an int >= 1, got 0" in run(
        [FIXTURE_A, "--out", str(tmp_path / "o4.pt"), "--arch", "num_heads=0", "--arch", "dit_decoder_depth=1"])
    assert "--arch: num_heads: expected an int, got str ('two')" in run(
        [FIXTURE_A, "--out", str(tmp_path / "o5.pt"), "--arch", '{"num_heads": "two", "dit_decoder_depth": 1}'])
    # a key given twice with two values: which was meant cannot be told (the same value twice is harmless)
    assert "--arch: num_heads is given twice (4 and 2); give it once" in run(
        [FIXTURE_A, "--out", str(tmp_path / "o6.pt"), "--arch", "num_heads=4", "--arch", '{"num_heads": 2}'])
    # an output path that cannot be written is refused before the checkpoint is read
    for out, why in ((tmp_path, "is a folder (expected a file path)"), ("", "'' is an empty path"),
                     ("/proc/elit-convert.safetensors", "cannot write into /proc"),
                     (tmp_path / "no" / "o.pt", "does not exist")):
        err = run([FIXTURE_A, "--out", str(out), "--force", "--arch", "num_heads=2"])
        assert "--out: " in err and why in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.pt"]  # nothing written by the refused runs
    # --force never overwrites the input itself, whatever name reaches it (a symlink, a hard link)
    victim = tmp_path / "victim.pt"
    victim.write_bytes(open(FIXTURE_A, "rb").read())
    os.symlink(victim, tmp_path / "link.pt")
    os.link(victim, tmp_path / "hard.pt")
    for out in ("link.pt", "hard.pt"):
        err = run([str(victim), "--out", str(tmp_path / out), "--force", "--arch", "num_heads=2", "--arch",
                   "dit_decoder_depth=1"])
        assert "--out: must differ from the input checkpoint (it is the same file)" in err, err
    assert victim.read_bytes() == open(FIXTURE_A, "rb").read()


def test_convert_write_error_is_one_line(tmp_path, capsys, monkeypatch):
    """A full disk while elit-convert writes: a traceback before (elit-sample, elit-demo and elit-bench give one
    line); the output is not left half-written either way."""
    import errno

    import elit_kernels.official.cli as convert_cli

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert_cli, "save_model", full)
    out = tmp_path / "o.safetensors"
    kw = ckpt(FIXTURE_A)["reference"]["constructor_kwargs"]
    rc = convert_main([FIXTURE_A, "--out", str(out), "--arch", f"num_heads={kw['num_heads']}", "--arch",
                       f"dit_decoder_depth={kw['dit_decoder_depth']}"])
    err = capsys.readouterr().err
    assert rc == 1 and err == f"elit-convert: error: cannot write {out} (No space left on device): not written (a " \
                              "file already there is left as it was)\n", err
    assert not out.exists()


def test_save_and_load_model_paper_preset(tmp_path):
    from elit_kernels.models import elit_config

    torch.manual_seed(0)
    m = ElitDiT(elit_config("tiny", 64))
    for suffix in (".safetensors", ".pt"):
        p = save_model(str(tmp_path / ("m" + suffix)), m, meta={"note": "test"})
        m2, meta = load_model(p, return_meta=True)
        assert m2.cfg == m.cfg and meta == {"note": "test"}
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    with pytest.raises(ValueError, match="not an elit-kernels model file"):
        load_model(FIXTURE_A)


def test_load_model_forwards_backend_dtype_and_names_the_file(tmp_path):
    from elit_kernels.models import elit_config
    from elit_kernels.models.checkpoint import FORMAT, config_dict

    torch.manual_seed(0)
    m = ElitDiT(elit_config("tiny", 64))
    for suffix in (".safetensors", ".pt"):
        p = save_model(str(tmp_path / ("m" + suffix)), m)
        m2 = load_model(p, backend="reference", dtype=torch.float64)
        assert m2.backend == "reference" and not m2.training
        assert {t.dtype for t in m2.parameters()} == {torch.float64}
        assert load_model(p).backend is None and next(load_model(p).parameters()).dtype == torch.float32
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    legacy = str(tmp_path / "legacy.pt")  # an older writer: no "meta" entry
    torch.save({"format": FORMAT, "config": config_dict(m.cfg), "state_dict": sd}, legacy)
    assert load_model(legacy, return_meta=True)[1] == {}
    sd.pop(next(iter(sd)))
    broken = str(tmp_path / "broken.pt")
    torch.save({"format": FORMAT, "config": config_dict(m.cfg), "state_dict": sd, "meta": {}}, broken)
    with pytest.raises(ValueError, match=f"^{re.escape(broken)}: state_dict does not match the config: missing keys"):
        load_model(broken)


def _tiny_file(tmp_path, suffix):
    from elit_kernels.models import elit_config

    torch.manual_seed(0)
    return save_model(str(tmp_path / ("m" + suffix)), ElitDiT(elit_config("tiny", 64)))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_have_the_umasks_mode_and_are_never_partial(tmp_path, suffix, umask, monkeypatch):
    """safetensors creates its file 0600 whatever the umask; save_model (and so elit-convert and elit-demo
    --save) leaves 0o666 & ~umask, as any file the user writes. A save that fails halfway leaves the old file
    and no temporary behind."""
    import elit_kernels.models.checkpoint as ck

    old = os.umask(umask)
    try:
        path = _tiny_file(tmp_path, suffix)
    finally:
        os.umask(old)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~umask)
    before = open(path, "rb").read()

    def broken(*a, **k):
        raise KeyboardInterrupt  # a Ctrl-C in the middle of the write

    monkeypatch.setattr(torch, "save", broken)
    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        ck.save_model(path, load_model(path))
    assert open(path, "rb").read() == before and sorted(os.listdir(tmp_path)) == ["m" + suffix]


def test_a_replaced_file_keeps_its_mode_and_a_symlink_is_written_through(tmp_path):
    """save_model over an existing file leaves that file's mode (as open(path, "w") would); a path that is a
    symlink is written through: the link stays, its target holds the new model."""
    first = _tiny_file(tmp_path, ".safetensors")
    os.chmod(first, 0o640)
    save_model(first, load_model(first))
    assert os.stat(first).st_mode & 0o777 == 0o640
    link = tmp_path / "link.safetensors"
    link.symlink_to(first)
    m = load_model(first)
    with torch.no_grad():
        next(m.parameters()).add_(1.0)
    save_model(str(link), m)
    assert link.is_symlink() and os.readlink(link) == first
    assert torch.equal(next(load_model(first).parameters()), next(m.parameters()))
    assert sorted(os.listdir(tmp_path)) == ["link.safetensors", "m.safetensors"]


@pytest.mark.parametrize("case", ["empty", "text", "html", "truncated_torch", "truncated_safetensors",
                                  "html_safetensors"])
def test_unreadable_files_name_the_file_and_the_reason(tmp_path, case, capsys):
    # a partial download or a web page saved under the checkpoint's name: an error that names the file, its
    # size and first bytes and the reader's reason, never a bare IndexError/KeyError from inside torch.load
    body = {"empty": b"", "text": b"hello checkpoint\n" * 4, "html": b"<!DOCTYPE html><html>404</html>"}
    if case in body:
        p, kind = str(tmp_path / f"{case}.pt"), "torch checkpoint"
        with open(p, "wb") as f:
            f.write(body[case])
    else:
        suffix = ".pt" if case == "truncated_torch" else ".safetensors"
        good = _tiny_file(tmp_path, suffix)
        with open(good, "rb") as f:
            data = f.read()
        p, kind = str(tmp_path / f"{case}{suffix}"), ("torch checkpoint" if suffix == ".pt" else "safetensors file")
        with open(p, "wb") as f:
            f.write(b"<html>404</html>" if case == "html_safetensors" else data[: len(data) // 2])
    size = os.path.getsize(p)
    for reader in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError, match=f"^{re.escape(p)}: cannot be read as a {kind} "
                                                  rf"\((?!NoneType)\w+(: [^;]+)?; the file has {size} bytes, starting b") as e:
            reader(p)
        assert "Nothing in it was executed" in str(e.value) and not isinstance(e.value, UnsafeCheckpointError)
    with pytest.raises(SystemExit) as ex:  # elit-convert: exit 2 with the same message, no traceback
        convert_main([p, "--out", str(tmp_path / "o.safetensors")])
    assert ex.value.code == 2 and "cannot be read as a" in capsys.readouterr().err


def test_unreadable_message_gives_the_reader_s_first_sentence_and_the_first_bytes(tmp_path):
    from elit_kernels.models.checkpoint import _unreadable

    p = str(tmp_path / "f.pt")
    with open(p, "wb") as f:
        f.write(b"0123456789abcdefGHIJ")  # 20 bytes: the message shows the first 16
    tail = "; the file has 20 bytes, starting b'0123456789abcdef')"
    weights_only = pickle.UnpicklingError(
        "Weights only load failed. In PyTorch 2.6, we changed the default.\nWeightsUnpickler error: \n\n"
        "Unsupported operand 60\n\nCheck the documentation. WeightsUnpickler error: again")
    for err, why in ((weights_only, "UnpicklingError: Unsupported operand 60"),
                     (RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory. "
                                   "This is an internal miniz error. If you see it"), "RuntimeError: PytorchStreamReader "
                      "failed reading zip archive: failed finding central directory"),
                     (KeyError(101), "KeyError: 101"), (EOFError(), "EOFError"), (ValueError("bad header."),
                                                                                 "ValueError: bad header")):
        msg = str(_unreadable(p, "torch checkpoint", err))
        assert msg.startswith(f"{p}: cannot be read as a torch checkpoint ({why}{tail}. A damaged"), msg
    gone = str(tmp_path / "gone.pt")
    assert "(EOFError; the file could not be opened to show its size)" in str(_unreadable(gone, "torch checkpoint",
                                                                                          EOFError()))


def test_a_checkpoint_saved_on_a_gpu_loads_on_a_cpu(tmp_path, monkeypatch):
    # the released files were written from CUDA tensors; torch.load without map_location would try to put
    # them back on a GPU. Written here with every storage tagged "cuda:0", as a GPU run writes them.
    c = _read(FIXTURE_A)
    p = str(tmp_path / "from_gpu.pt")
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(c, p)
    monkeypatch.undo()
    if not torch.cuda.is_available():  # the control: torch's own default cannot read it here
        with pytest.raises(RuntimeError, match="CUDA"):
            with torch.serialization.safe_globals([argparse.Namespace]):
                torch.load(p, weights_only=True)
    m = load_checkpoint(p, arch=arch_of(FIXTURE_A), backend="torch")
    assert {t.device.type for t in m.state_dict().values()} == {"cpu"}
    ref = c["reference"]
    with torch.no_grad():
        assert_rel(m(ref["x"], ref["t"], ref["y"]), ref["outputs"]["full"]["out"], msg="from gpu")


def test_torch_files_are_memory_mapped_when_they_can_be(tmp_path, monkeypatch):
    from elit_kernels.models.checkpoint import safe_torch_load

    calls, real = [], torch.load

    def spy(*a, **kw):
        calls.append(kw.get("mmap"))
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    t = torch.randn(64)
    zip_file, legacy = str(tmp_path / "z.pt"), str(tmp_path / "l.pt")
    torch.save({"t": t}, zip_file)
    torch.save({"t": t}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(safe_torch_load(zip_file)["t"], t) and calls == [True]  # mapped, not read whole
    calls.clear()
    assert torch.equal(safe_torch_load(legacy)["t"], t) and calls == [True, False]  # legacy: cannot map, read


def test_our_files_read_back_with_their_defaults(tmp_path):
    from safetensors.torch import save_file

    from elit_kernels.models.checkpoint import FORMAT, config_dict, model_from_parts, read_model_file

    p = _tiny_file(tmp_path, ".safetensors")
    config, sd, meta = read_model_file(p)  # default device: the CPU
    assert meta == {} and {v.device.type for v in sd.values()} == {"cpu"}
    assert read_model_file(FIXTURE_A) is None  # not a .safetensors name: the caller tries a torch file
    m = model_from_parts(config, sd)  # defaults: CPU, eval mode, the file's dtype
    assert not m.training and {v.device.type for v in m.state_dict().values()} == {"cpu"}
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    bare = str(tmp_path / "no_meta.safetensors")  # an older writer: format and config, no meta
    save_file(sd, bare, metadata={"format": FORMAT, "config": json.dumps(config_dict(m.cfg))})
    assert read_model_file(bare)[2] == {}
    no_config = str(tmp_path / "no_config.safetensors")
    save_file(sd, no_config, metadata={"format": FORMAT})
    with pytest.raises(CheckpointError, match=f"^{re.escape(no_config)}: a safetensors file without elit-kernels "
                                              "metadata .*config absent"):
        load_model(no_config)
    # damaged JSON in either metadata field, or JSON that is not an object: named, as a CheckpointError
    good = json.dumps(config_dict(m.cfg))
    for field, md, why in (("config", {"config": "{not json"}, "is not valid JSON"),
                           ("meta", {"config": good, "meta": "[1, 2"}, "is not valid JSON"),
                           ("config", {"config": "[1, 2]"}, "should be a JSON object, got list"),
                           ("meta", {"config": good, "meta": "3"}, "should be a JSON object, got int")):
        bad = str(tmp_path / f"bad_{field}.safetensors")
        save_file(sd, bad, metadata={"format": FORMAT, **md})
        for load in (read_model_file, load_model):
            with pytest.raises(CheckpointError, match=f"^{re.escape(bad)}: the '{field}' metadata of this "
                                                      f"safetensors file {why}"):
                load(bad)
    k = "core.0.mlp.fc1.weight"
    with pytest.raises(ValueError, match=r"^checkpoint: state_dict does not match the config: missing keys \[\], "
                                         r"unexpected keys \['extra'\]"):
        model_from_parts(config, {**sd, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=rf"^checkpoint: shape mismatch for {re.escape(k)}: expected \(256, 64\), "
                                         r"got \(64, 256\) \(1 mismatched in all\)"):
        model_from_parts(config, {**sd, k: sd[k].T.contiguous()})


# --- budgets and the released config ------------------------------------------------------------------
def test_latents_for_budget_official_rules():
    cfg = elit_sit_config("XL/2", 256)  # P = 16, N = 256, G = 16
    assert [latents_for_budget(b, cfg) for b in (1, 1.0, 0.5, 0.3, 0.25, 0.0625, 0.9375)] == [16, 16, 8, 4, 4, 1, 15]
    assert [latents_for_budget(b, cfg) for b in (16, 48.0, 64, 255, 256)] == [1, 3, 4, 15, 16]
    c512 = elit_sit_config("XL/2", 512)  # P = 64, N = 1024
    assert [latents_for_budget(b, c512) for b in (0.0625, 0.125, 1.0, 512)] == [4, 8, 64, 32]
    # P = 9 (group size 3): the official float arithmetic gives 2 for 3/9, not 3
    c9 = elit_sit_config("S/2", 96, group_size=3)
    assert latents_for_budget(3 / 9, c9) == 2 and latents_for_budget(1.0, c9) == 9
    for bad, match in ((0.06, "keeps 0 latents per group"), (15, "keeps 0 latents per group"), (0, "fraction in"),
                       (-0.5, "fraction in"), (float("nan"), "fraction in"), (257, "<= N = 256"), (None, "None")):
        with pytest.raises(ValueError, match="budget: .*" + match):
            latents_for_budget(bad, cfg)
    for bad in (True, "0.5"):
        with pytest.raises(TypeError, match="budget"):
            latents_for_budget(bad, cfg)


def test_released_config_registry():
    c = elit_sit_config("XL/2", 256)
    assert (c.hidden, c.depth, c.heads, c.n_head, c.core_blocks, c.n_tail, c.groups, c.tokens_per_group) == (
        1152, 28, 16, 8, 16, 4, 16, 16)
    assert elit_sit_config("ELIT-SiT-XL/2", 512).tokens_per_group == 64
    assert (elit_sit_config("B/4", 256).patch, elit_sit_config("S/8", 512).grid) == (4, 8)
    # 705.1 M official parameters at 256 px, 706.2 M at 512 px (README §3.1): ours plus the fixed pos_embed
    # table and the unused 7th Read modulation chunk
    for res, official in ((256, 705.1e6), (512, 706.2e6)):
        c = elit_sit_config("XL/2", res)
        with torch.device("meta"):
            n = sum(p.numel() for p in ElitDiT(c).parameters())
        n += c.tokens * c.hidden + c.hidden * c.hidden + c.hidden
        assert abs(n - official) < 0.05e6, (res, n)
    with pytest.raises(ValueError, match="name: unknown ELIT-SiT registry name"):
        elit_sit_config("XL/3")
    with pytest.raises(ValueError, match="group_size"):
        elit_sit_config("XL/2", 256, group_size=5)
    with pytest.raises(ValueError, match="encoder_depth"):
        elit_sit_config("S/2", 256, encoder_depth=11)


# --- both presets on every CPU backend -------------------------------------------------------------------
def _backend_or_skip(name):
    from elit_kernels import describe_backends

    row = next((r for r in describe_backends() if r["name"] == name), None)
    if row is None or not row["available"]:
        pytest.skip(f"backend {name!r} not available here: {row['unavailable_reason'] if row else 'not registered'}")


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_released_checkpoint_on_each_backend(backend):
    _backend_or_skip(backend)
    ref = ckpt(FIXTURE_A)["reference"]
    m = load(FIXTURE_A, backend=backend)
    outs = ref["outputs"]
    pick = ["full", "one_per_group", "half", "count_48_of_64"]
    budgets = [outs[n]["latents_per_group"] for n in pick]
    with torch.no_grad():
        got = m(ref["x"], ref["t"], ref["y"], budgets)
    for i, n in enumerate(pick):
        assert_rel(got[i], outs[n]["out"][i], msg=f"{backend} sample {i} ({n})")


@pytest.mark.parametrize("preset", ["paper", "released"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_both_presets_match_the_reference_backend_values_and_grads(preset, backend):
    from elit_kernels.models.config import preset_config

    _backend_or_skip(backend)
    cfg = preset_config(preset, "tiny", 64)
    torch.manual_seed(0)
    m_ref = ElitDiT(cfg, backend="reference")
    with torch.no_grad():
        for p in m_ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m = ElitDiT(cfg, backend=backend)
    m.load_state_dict(m_ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t, y = torch.rand(3, generator=g), torch.tensor([1, cfg.num_classes, 4])
    budgets = [4, 1, 2]
    o_ref, o = m_ref(x, t, y, budgets), m(x, t, y, budgets)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    o_ref.square().sum().backward()
    o.square().sum().backward()
    for (n, p_ref), p in zip(m_ref.named_parameters(), m.parameters()):
        assert p_ref.grad is not None and p_ref.grad.abs().max() > 0, n
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=n)


# --- other sizes: a released-preset model exported to the official layout loads back exactly ----------------
def _to_official(m):
    """Our released-preset state_dict -> the official key layout (the inverse of convert_state_dict)."""
    from elit_kernels.official.loader import READ, READ_ATTN, WRITE, WRITE_ATTN

    cfg, sd = m.cfg, m.state_dict()
    d = cfg.hidden
    perm = group_major_permutation(cfg.grid, cfg.grid, cfg.window)
    pos = torch.empty_like(m.stem.pos_embed)
    pos[perm] = m.stem.pos_embed  # back to raster order
    out = {"pos_embed": pos[None], "x_embedder.proj.weight": sd["stem.patch_embed.weight"],
           "x_embedder.proj.bias": sd["stem.patch_embed.bias"],
           "y_embedder.embedding_table.weight": sd["stem.y_embed.weight"],
           READ + "learned_query_embed": sd["latent_embed"], READ + "pos_embed": sd["read_pos_embed"],
           READ + "latent_pos_embed": sd["latent_pos_embed"], WRITE + "pos_embed": sd["write_pos_embed"],
           READ + "fit_layer.adaLN_modulation.1.weight": torch.cat([sd["read.ada.weight"], torch.randn(d, d)]),
           READ + "fit_layer.adaLN_modulation.1.bias": torch.cat([sd["read.ada.bias"], torch.randn(d)]),
           READ + "fit_layer.read_ff.0.fc1.weight": sd["read.mlp.fc1.weight"],
           READ + "fit_layer.read_ff.0.fc2.weight": sd["read.mlp.fc2.weight"],
           WRITE + "write_ff.0.fc1.weight": sd["write.mlp.fc1.weight"],
           WRITE + "write_ff.0.fc2.weight": sd["write.mlp.fc2.weight"]}
    for w in ("weight", "bias"):
        for j in (0, 2):
            out[f"t_embedder.mlp.{j}.{w}"] = sd[f"stem.t_embed.mlp.{j}.{w}"]
        out[f"final_layer.linear.{w}"] = sd[f"stem.final.linear.{w}"]
        out[f"final_layer.adaLN_modulation.1.{w}"] = sd[f"stem.final.ada.{w}"]
    blocks = [f"head.{i}" for i in range(cfg.n_head)] + [f"core.{i}" for i in range(cfg.core_blocks)] + \
             [f"tail.{i}" for i in range(cfg.n_tail)]
    for i, src in enumerate(blocks):
        for w in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{w}"] = torch.cat([sd[f"{src}.attn.q.{w}"], sd[f"{src}.attn.kv.{w}"]])
            for a, b in (("attn.proj", "attn.proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"), ("adaLN_modulation.1", "ada")):
                out[f"blocks.{i}.{a}.{w}"] = sd[f"{src}.{b}.{w}"]
    for a, src in ((READ_ATTN, "read.attn"), (WRITE_ATTN, "write.attn")):
        for w in ("weight", "bias"):
            out[a + f"q_proj.{w}"], out[a + f"kv_proj.{w}"] = sd[f"{src}.q.{w}"], sd[f"{src}.kv.{w}"]
            out[a + f"proj.{w}"] = sd[f"{src}.proj.{w}"]
        out[a + "q_norm.scale"], out[a + "k_norm.scale"] = sd[f"{src}.q_norm.weight"], sd[f"{src}.k_norm.weight"]
    return out


@pytest.mark.parametrize("sizes", [
    dict(hidden=24, depth=5, heads=3, head_blocks=2, tail_blocks=1, window=2, num_classes=7, input_size=16, patch=2),
    dict(hidden=32, depth=4, heads=4, head_blocks=0, tail_blocks=2, window=4, num_classes=3, input_size=32, patch=4),
], ids=["gs2_h3", "p4_gs4_h4"])
def test_other_sizes_load_back_exactly(tmp_path, sizes):
    from elit_kernels.models import ElitConfig
    from elit_kernels.models.config import RELEASED_SWITCHES

    cfg = ElitConfig(**sizes, **RELEASED_SWITCHES)
    torch.manual_seed(0)
    m = ElitDiT(cfg, backend="torch")
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    sd = _to_official(m)
    args = argparse.Namespace(model="ELIT-SiT-Custom/2", num_classes=cfg.num_classes, encoder_depth=cfg.n_head,
                              resolution=cfg.input_size * 8, elit_group_size=cfg.window, qk_norm=False,
                              elit_read_depth=1, elit_write_depth=1, elit_max_mask_prob=0.9375, elit_min_mask_prob=0.0)
    p = tmp_path / "custom.pt"
    torch.save({"model": sd, "ema": sd, "opt": {"state": {}, "param_groups": []}, "args": args, "steps": 7,
                "lr_scheduler": {"_milestones": [10000], "last_epoch": 7}}, p)
    loaded = load_checkpoint(str(p), arch={"num_heads": cfg.heads, "dit_decoder_depth": cfg.n_tail}, backend="torch")
    assert loaded.cfg == cfg
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t, y = torch.rand(3, generator=g), torch.tensor([0, cfg.num_classes, 2])
    with torch.no_grad():
        for budgets in (None, [1, cfg.latents_per_group, 2]):
            torch.testing.assert_close(loaded(x, t, y, budgets), m(x, t, y, budgets), rtol=0, atol=0)


# --- dtypes, damage, torch floor ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_files_load_in_their_own_dtype(tmp_path, dtype):
    """dtype=None keeps the file's dtype (no float32 copy of a bf16 model), for our files and official ones;
    the values are the file's exactly."""
    from elit_kernels.models import elit_config

    torch.manual_seed(0)
    m = ElitDiT(elit_config("tiny", 64)).to(dtype)
    for suffix in (".safetensors", ".pt"):
        p = save_model(str(tmp_path / ("m" + suffix)), m)
        for loaded in (load_model(p), load_checkpoint(p, backend="torch")):
            assert {t.dtype for t in loaded.parameters()} == {dtype}, suffix
            assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values()))
        assert next(load_model(p, dtype=torch.float32).parameters()).dtype == torch.float32
    c = _read(FIXTURE_A)
    for w in ("ema", "model"):
        c[w] = {k: v.to(dtype) for k, v in c[w].items()}
    official = str(tmp_path / "official_half.pt")
    torch.save(c, official)
    model = load(official)
    assert {t.dtype for t in model.parameters()} == {dtype}
    want = convert_state_dict(c["ema"], model.cfg)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())


def _damaged(sd: dict, key: str, index=(0,)) -> dict:
    sd = {k: v.clone() for k, v in sd.items()}
    sd[key].view(-1)[index[0]] = float("nan")
    return sd


def test_non_finite_weights_are_refused_naming_the_file_and_the_tensor(tmp_path):
    from elit_kernels.models import elit_config
    from elit_kernels.models.checkpoint import FORMAT, config_dict

    torch.manual_seed(0)
    m = ElitDiT(elit_config("tiny", 64))
    sd = m.state_dict()
    keys = list(sd)
    bad_key = keys[len(keys) // 2]
    for suffix in (".safetensors", ".pt"):
        p = str(tmp_path / ("nan" + suffix))
        if suffix == ".pt":
            torch.save({"format": FORMAT, "config": config_dict(m.cfg), "state_dict": _damaged(sd, bad_key, (3,)),
                        "meta": {}}, p)
        else:
            from safetensors import safe_open
            from safetensors.torch import load_file, save_file

            save_model(p, m)
            with safe_open(p, framework="pt") as f:
                md = f.metadata()
            save_file(_damaged(load_file(p), bad_key, (3,)), p, metadata=md)
        match = rf"^{re.escape(p)}: tensor '{re.escape(bad_key)}' holds 1 non-finite values"
        with pytest.raises(CheckpointError, match=match):
            load_model(p)
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(p)
        loaded = load_model(p, check_finite=False)  # on request, loaded as it is
        assert loaded.state_dict()[bad_key].isnan().sum() == 1
    # official files: the error names the file's own key
    official_key = "blocks.1.mlp.fc1.weight"
    p = _variant(tmp_path, "nan_official.pt", edit_sd=lambda sd: _damaged(sd, official_key, (5,)))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(p)}: tensor '{official_key}' holds 1 non-finite"):
        load(p)
    assert load(p, check_finite=False).cfg == load(FIXTURE_A).cfg


def test_sha256_is_checked_before_parsing(tmp_path):
    import hashlib

    from elit_kernels.models.checkpoint import file_sha256

    p = _tiny_file(tmp_path, ".safetensors")
    with open(p, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert file_sha256(p) == digest
    load_model(p, sha256=digest.upper())  # any case
    load_checkpoint(FIXTURE_A, sha256=file_sha256(FIXTURE_A), arch=arch_of(FIXTURE_A), backend="torch")
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    for loader in (load_model, load_checkpoint):
        with pytest.raises(CheckpointError, match=rf"^{re.escape(p)}: SHA-256 {digest} does not match the expected "
                                                  rf"{wrong}"):
            loader(p, sha256=wrong)
        with pytest.raises(ValueError, match="^sha256: expected 64 hex digits"):
            loader(p, sha256="abc")


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # safetensors' path for the faked old torch
def test_torch_files_are_refused_on_a_torch_without_the_weights_only_fixes(tmp_path, monkeypatch):
    import elit_kernels.models.checkpoint as ck

    pt = _tiny_file(tmp_path, ".pt")
    st = _tiny_file(tmp_path, ".safetensors")
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    for old in ("2.5.1", "2.9.1+cu128", "1.13.0"):
        monkeypatch.setattr(torch, "__version__", old)
        for loader in (load_model, load_checkpoint, ck.safe_torch_load):
            with pytest.raises(RuntimeError, match=rf"^{re.escape(pt)}: refusing to read a torch checkpoint with "
                                                   rf"torch {re.escape(old)}: .*CVE-2025-32434.*CVE-2026-24747"):
                loader(pt)
        assert type(load_model(st)).__name__ == "ElitDiT"  # safetensors: nothing unpickled, any torch
    assert loads == []  # refused before torch.load ran
    assert ck._torch_release("2.10.0") == (2, 10) and ck._torch_release("2.14.1+cu130") >= ck.MIN_SAFE_TORCH


def test_our_files_refuse_what_would_load_silently_wrong_or_not_at_all(tmp_path):
    # found by a break-it trial: a config missing a field loaded with the paper default (outputs off by 15.7);
    # save_model wrote a .pt that load_model refused; hand-made files raised KeyError/AttributeError
    import datetime

    from elit_kernels.models import elit_config

    torch.manual_seed(0)  # the released switches, none of them the paper's default
    m = ElitDiT(elit_config("tiny", 64, timestep_scale=1.0, pos_embed_column_first=True, budget_core_only=True))
    p = save_model(str(tmp_path / "m.pt"), m)
    ck = torch.load(p, weights_only=True)
    for key in ("timestep_scale", "budget_core_only", "pos_embed_column_first"):
        bad = {**ck, "config": {k: v for k, v in ck["config"].items() if k != key}}
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=rf"bad.pt: config: missing ElitConfig field\(s\) \['{key}'\]"):
            load_model(str(tmp_path / "bad.pt"))
    for part, value, match in (("config", None, "its config is NoneType"), ("state_dict", None, "its state_dict is not"),
                               ("state_dict", {"a": 1}, r"not a dict of tensors \(got dict holding \['int'\]\)")):
        torch.save({**ck, part: value}, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=match):
            load_model(str(tmp_path / "bad.pt"))
    for suffix in (".pt", ".safetensors"):
        with pytest.raises(TypeError, match="^meta: must be JSON-serialisable"):
            save_model(str(tmp_path / ("d" + suffix)), m, meta={"when": datetime.datetime(2020, 1, 1)})
        assert not (tmp_path / ("d" + suffix)).exists()
    with pytest.raises(TypeError, match="^meta: expected a dict"):
        save_model(str(tmp_path / "e.pt"), m, meta=[1, 2])
    with pytest.raises(IsADirectoryError, match="^path: .* is a directory"):
        save_model(str(tmp_path), m)
    for fn in (lambda: save_model(None, m), lambda: load_model(None), lambda: load_model(3)):
        with pytest.raises(TypeError, match="^path: expected a file path"):
            fn()
    for kw, err, match in ((dict(dtype="float32"), TypeError, "^dtype: expected None or a floating torch.dtype"),
                           (dict(dtype=torch.int64), TypeError, "^dtype: "), (dict(device="bogus"), ValueError, "^device: "),
                           (dict(backend="bogus"), ValueError, "^backend: unknown backend"),
                           (dict(check_finite="no"), TypeError, "^check_finite: expected a bool")):
        with pytest.raises(err, match=match):
            load_model(p, **kw)
    with pytest.raises(TypeError, match="^dtype: "):
        load_checkpoint(p, dtype="float32")
    torch.save({**ck, "meta": None}, tmp_path / "nometa.pt")
    assert load_model(str(tmp_path / "nometa.pt"), return_meta=True)[1] == {}


def test_torch_floor_is_inclusive_and_an_unparseable_version_is_refused(tmp_path, monkeypatch):
    pt = _tiny_file(tmp_path, ".pt")
    monkeypatch.setattr(torch, "__version__", "2.10.0")  # the floor itself has both fixes: read
    assert type(load_model(pt)).__name__ == "ElitDiT"
    monkeypatch.setattr(torch, "__version__", "unknown")  # a version we cannot tell: refused, not guessed
    with pytest.raises(RuntimeError, match=rf"^{re.escape(pt)}: refusing to read a torch checkpoint with torch unknown"):
        load_model(pt)


def test_file_sha256_reads_a_large_file_in_bounded_chunks(tmp_path, monkeypatch):
    import hashlib

    import elit_kernels.models.checkpoint as ck

    data = bytes(range(256)) * (10 * 1024 + 1)  # 2.5 MiB + 256 bytes
    p = tmp_path / "big.bin"
    p.write_bytes(data)
    reads, real_open = [], open

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

    monkeypatch.setattr(ck, "open", lambda *a, **k: Spy(real_open(*a, **k)), raising=False)
    assert ck.file_sha256(str(p)) == hashlib.sha256(data).hexdigest()
    assert max(reads) == 1 << 20 and len(reads) == 4  # bounded reads (1 MiB, as documented): a multi-GB checkpoint
    # is hashed in constant memory


def test_check_finite_skips_what_cannot_hold_nan_and_names_the_first_bad_index():
    from elit_kernels.models.checkpoint import check_finite

    check_finite("f.pt", {"steps": 50000, "ids": torch.arange(5), "empty": torch.empty(0),
                          "big": torch.full((4,), 3e38), "w": torch.ones(3)})  # "big": only its sum overflows
    grid = torch.zeros(2, 3)
    grid[1, 2] = float("inf")
    for t, of, first in ((torch.tensor([float("nan")]), 1, "(0,)"), (grid, 6, "(1, 2)")):
        with pytest.raises(CheckpointError, match=re.escape(f"f.pt: tensor 'scale' holds 1 non-finite values (NaN or "
                                                            f"inf) of {of}, the first at index {first}: a damaged")):
            check_finite("f.pt", {"w": torch.ones(3), "scale": t})


def test_load_args_are_checked_before_the_file_is_read(tmp_path, monkeypatch):
    from elit_kernels.attention import known_backends

    missing = str(tmp_path / "missing.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for reader in (load_model, load_checkpoint):
        with pytest.raises(ValueError, match=re.escape("device: cuda:0 requested, but torch.cuda.is_available() is "
                                                       "False")):
            reader(missing, device="cuda:0")
        for meta in ("meta", torch.device("meta")):  # no values to hold the weights: refused, not a weightless model
            with pytest.raises(ValueError, match=re.escape("device: 'meta' holds no weights, so a loaded model would "
                                                           "have none; load on 'cpu' or a GPU")):
                reader(missing, device=meta)
        with pytest.raises(ValueError, match=re.escape(f"backend: unknown backend 'bogus'; known backends: "
                                                       f"{', '.join(known_backends())}")):
            reader(missing, backend="bogus")
    with pytest.raises(TypeError, match=re.escape("return_meta: expected a bool, got str ('yes')")):
        load_model(missing, return_meta="yes")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA machine: the device is accepted
    with pytest.raises(FileNotFoundError):
        load_model(missing, device="cuda:0")


def test_save_model_refuses_non_finite_meta(tmp_path):
    torch.manual_seed(0)
    from elit_kernels.models import elit_config

    m = ElitDiT(elit_config("tiny", 64))
    for meta in ({"loss": float("nan")}, {"lr": [float("inf")]}):  # JSON has no NaN/inf
        for suffix in (".pt", ".safetensors"):
            with pytest.raises(TypeError, match=r"^meta: must be JSON-serialisable \(str keys; str, finite numbers"):
                save_model(str(tmp_path / ("n" + suffix)), m, meta=meta)
            assert not (tmp_path / ("n" + suffix)).exists()


def test_file_dtype_is_the_floating_dtype_holding_most_elements():
    from elit_kernels.models.checkpoint import file_dtype

    f32, bf16 = torch.float32, torch.bfloat16
    sd = {"a": torch.zeros(3, dtype=f32), "b": torch.zeros(5, dtype=bf16), "c": torch.zeros(3, dtype=f32),
          "ids": torch.arange(10)}
    assert file_dtype(sd) == f32  # 6 float32 elements against 5 bfloat16; the int64 ones do not count
    assert file_dtype({**sd, "d": torch.zeros(2, dtype=bf16)}) == bf16  # 7 against 6
    assert file_dtype({"ids": torch.arange(3)}) is None and file_dtype({}) is None


def test_a_bf16_file_is_built_in_bf16_buffers_included(tmp_path, monkeypatch):
    from elit_kernels.models import elit_config

    torch.manual_seed(0)
    m = ElitDiT(elit_config("tiny", 64)).to(torch.bfloat16)
    p = save_model(str(tmp_path / "m.safetensors"), m)
    allocated, real = [], torch.nn.Module.to_empty

    def spy(self, *a, **k):
        allocated.append({t.dtype for t in self.parameters()})
        return real(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "to_empty", spy)
    loaded = load_model(p)
    assert allocated == [{torch.bfloat16}]  # allocated in bf16 directly: no full-size float32 copy
    want, got = dict(m.named_buffers()), dict(loaded.named_buffers())
    assert set(got) == set(want) and any(b.is_floating_point() for b in want.values())
    for k, b in want.items():  # the fixed tables too (not in the file): the model's dtype and values
        assert got[k].dtype == b.dtype and torch.equal(got[k], b), k
