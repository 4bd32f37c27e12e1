"""What the mutation run of the "checkpoint" group (``official/loader.py``, ``models/checkpoint.py``) found untested.

Each test pins behaviour a user sees: the whole text of an error (the file's name, the field, both sources and their
values, so a wrong label or a value never compared shows up), where the depth and ``encoder_depth`` come from, the
sizes read from the weights, what ``info`` and its notes say, and the keyword arguments ``load_checkpoint`` passes on.
Most tests hand ``read_official`` / ``official_config`` the file's contents in memory (``ckpt=``) under a name that
does not exist (``PATH``), so nothing is read from disk but the one fixture, once.
"""
import argparse
import errno
import pathlib

import numpy as np
import pytest
import torch

from elit_kernels.layout import group_major_permutation, inverse_permutation
from elit_kernels.models import ElitDiT, elit_config, load_model, save_model
from elit_kernels.models.checkpoint import (
    READABLE_FORMATS,
    CheckpointError,
    UnsafeCheckpointError,
    check_finite,
    safe_torch_load,
)
from elit_kernels.models.config import RELEASED_SWITCHES, ElitConfig, config_dict
from elit_kernels.official import loader
from elit_kernels.official.loader import (
    READ,
    _check_arch,
    apply_legacy_names,
    check_args,
    check_keys,
    check_pos_embed,
    load_checkpoint,
    official_config,
    official_shapes,
    our_info,
    read_official,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = str(ROOT / "tests" / "fixtures" / "elit_sit_tiny_a.pt")  # 'ELIT-SiT-TinyA/2': depth 4, width 16, 2 heads
ARCH = {"num_heads": 2, "dit_decoder_depth": 1}  # what its name (outside the registry) needs
PATH = "ckpts/elit-a.pt"  # the name every message must carry (never opened: the contents are passed as ckpt=)
FIXED, PER_BLOCK = 38, 10  # official tensors outside the blocks, per block (docs/released_checkpoints.md §3.1)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def raw():
    with torch.serialization.safe_globals([argparse.Namespace]):
        c = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    c.pop("reference", None)
    return c


def _file(raw, args=None, **entries):
    """A copy of the fixture's contents: ``args`` fields replaced (None: removed), top-level entries replaced
    (``_DROP``: removed)."""
    c = {k: (dict(v) if k in ("ema", "model") else v) for k, v in raw.items()}
    a = dict(vars(raw["args"]))
    a.update(args or {})
    c["args"] = argparse.Namespace(**{k: v for k, v in a.items() if v is not None})
    for k, v in entries.items():
        if v is _DROP:
            c.pop(k, None)
        else:
            c[k] = v
    return c


_DROP = object()


def _args(raw, **edits):
    a = dict(vars(raw["args"]))
    a.update(edits)
    return a


def _opt(n):
    return {"state": {}, "param_groups": [{"params": list(range(n))}]}


def _legacy(sd, enc=1):
    """``sd`` in the legacy naming (docs/released_checkpoints.md §2): blocks after the head as ``decoder_blocks``."""
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks.") and int(k.split(".")[1]) >= enc:
            i, rest = k.split(".", 2)[1:]
            k = f"decoder_blocks.{int(i) - enc}.{rest}"
        out[k] = v
    return out


def _zeros_sd(cfg):
    """An official state_dict of ``cfg``'s shapes (zeros, stride-0 views: no memory even for a registry size)."""
    return {k: torch.zeros(()).expand(*s) for k, s in official_shapes(cfg).items()}


def _expect(fn, text, error=CheckpointError):
    with pytest.raises(error) as e:
        fn()
    assert str(e.value) == text


# A custom size where every size the weights give differs from ElitConfig's defaults (in_channels 4, mlp_ratio 4,
# interface_mlp_ratio 1) and the Read MLP width (12) differs from the model width (24).
CUSTOM = ElitConfig(**{**RELEASED_SWITCHES, "latent_pos_rows": 64}, hidden=24, depth=3, heads=3, patch=1, in_channels=3,
                    input_size=8, window=2, num_classes=5, head_blocks=1, tail_blocks=1, mlp_ratio=2.0,
                    interface_mlp_ratio=0.5)
CUSTOM_ARGS = {"model": "custom", "encoder_depth": 1, "num_classes": 5, "elit_group_size": 2, "resolution": 64}
CUSTOM_ARCH = {"num_heads": 3, "dit_decoder_depth": 1, "depth": 3}
# a registry size (ELIT-SiT-S/2: depth 12, width 384, 6 heads, tail 2) at a tiny resolution
SMALL_S = ElitConfig(**{**RELEASED_SWITCHES, "latent_pos_rows": 16}, hidden=384, depth=12, heads=6, patch=2,
                     in_channels=4, input_size=8, window=2, num_classes=10, head_blocks=4, tail_blocks=2)
S_ARGS = {"model": "ELIT-SiT-S/2", "encoder_depth": 4, "num_classes": 10, "elit_group_size": 2, "resolution": 64}


# --- official_config: every pair of sources that must agree --------------------------------------------------------
_REG = {"model": "ELIT-SiT-S/2"}
_DEPTH = {**ARCH, "depth": 4}
_DISAGREE = [  # (args edits, arch, the message after "PATH: ")
    (_REG, {"num_heads": 2}, "num_heads disagrees: arch says 2, registry ELIT-SiT-S/2 says 6"),
    (_REG, {"dit_decoder_depth": 1}, "dit_decoder_depth disagrees: arch says 1, registry ELIT-SiT-S/2 says 2"),
    ({}, {**_DEPTH, "encoder_depth": 2}, "encoder_depth disagrees: arch says 2, args says 1"),
    (_REG, {"depth": 4}, "depth disagrees: arch says 4, registry ELIT-SiT-S/2 says 12"),
    ({}, {**_DEPTH, "hidden_size": 32}, "hidden_size disagrees: weights says 16, arch says 32"),
    ({}, {**_DEPTH, "patch_size": 4}, "patch_size disagrees: weights says 2, arch says 4"),
    ({}, {**_DEPTH, "decoder_hidden_size": 32}, "decoder_hidden_size disagrees: weights says 16, arch says 32"),
    ({}, {**_DEPTH, "in_channels": 3}, "in_channels disagrees: weights says 4, arch says 3"),
    ({"num_classes": 12}, _DEPTH, "num_classes disagrees: weights says 10, args says 12"),
    ({}, {**_DEPTH, "group_size": 2}, "group_size disagrees: weights says 4, arch says 2"),
    ({"elit_group_size": 2}, _DEPTH, "group_size disagrees: weights says 4, args says 2"),
    ({}, {**_DEPTH, "input_size": 32}, "input_size disagrees: weights says 16, arch says 32"),
    ({"resolution": 256}, _DEPTH, "input_size disagrees: weights says 16, args.resolution // 8 says 32"),
    ({}, {**_DEPTH, "mlp_ratio": 2.0}, "mlp_ratio disagrees: weights says 4.0, arch says 2.0"),
    ({}, {**_DEPTH, "elit_read_depth": 2}, "elit_read_depth disagrees: arch says 2, args says 1"),
    ({}, {**_DEPTH, "elit_write_depth": 2}, "elit_write_depth disagrees: arch says 2, args says 1"),
    ({}, {**_DEPTH, "qk_norm": True}, "qk_norm disagrees: arch says True, args says False"),
    # one source alone, with a value the released models never use
    ({"elit_read_depth": 2}, _DEPTH, "elit_read_depth=2 is not supported (the released checkpoints use 1)"),
    ({"elit_write_depth": None}, {**_DEPTH, "elit_write_depth": 2},
     "elit_write_depth=2 is not supported (the released checkpoints use 1)"),
    ({"qk_norm": None}, {**_DEPTH, "qk_norm": True},
     "qk_norm=True DiT blocks are not supported (the released checkpoints use False)"),
    ({"encoder_depth": None}, {**_DEPTH, "encoder_depth": 4}, "encoder_depth 4 + tail 1 exceed depth 4"),
]


@pytest.mark.parametrize("edits,arch,text", _DISAGREE,
                         ids=[t.split(" ")[0] + f"-{i}" for i, (_, _, t) in enumerate(_DISAGREE)])
def test_every_disagreement_names_the_file_the_field_and_both_sources(raw, edits, arch, text):
    """Each value read from two places (arch, args, the registry name, the weights) is compared, and a mismatch
    says which file, which field, what each source says."""
    _expect(lambda: official_config(raw["ema"], _args(raw, **edits), arch, PATH), f"{PATH}: {text}")


@pytest.mark.parametrize("arch,miss,advice", [
    ({"num_heads": 2}, "dit_decoder_depth", "{'dit_decoder_depth': T}"),
    ({"dit_decoder_depth": 1}, "num_heads", "{'num_heads': H}"),
    ({}, "num_heads, dit_decoder_depth", "{'num_heads': H, 'dit_decoder_depth': T}")])
def test_a_name_outside_the_registry_needs_both_heads_and_tail(raw, arch, miss, advice):
    """Either of num_heads / dit_decoder_depth missing is refused, naming the one(s) missing, and advising only those
    (advice naming a key already given sent elit-sample's hint to flags the user had passed)."""
    _expect(lambda: official_config(raw["ema"], _args(raw), {**arch, "depth": 4}, PATH),
            f"{PATH}: model 'ELIT-SiT-TinyA/2' is not an official registry name (known: ELIT-SiT-{{XL,L,B,S}}/{{2,4,8}}) "
            f"and arch does not give {miss}; pass arch={advice} (official constructor names) — "
            f"{'neither is' if ',' in miss else 'it is not'} stored in args or readable from the weights")


def test_encoder_depth_and_depth_missing_are_named(raw):
    _expect(lambda: official_config(raw["ema"], _args(raw, encoder_depth=None), _DEPTH, PATH),
            f"{PATH}: encoder_depth (head blocks) is in neither args nor arch; pass arch={{'encoder_depth': N}}")
    tail = (", arch gives no depth, and the file holds no record to check the 4 blocks its weights hold against (an "
            "optimizer state 'opt', or a second weights entry): a file missing its last blocks cannot be told from a "
            "shallower model; pass arch={'depth': N} (the official constructor's depth)")
    _expect(lambda: official_config(raw["ema"], _args(raw), ARCH, PATH),
            f"{PATH}: depth: model 'ELIT-SiT-TinyA/2' is not an official registry name" + tail)
    _expect(lambda: official_config(raw["ema"], _args(raw, model=None), ARCH, PATH),
            f"{PATH}: depth: the file names no model (no args.model)" + tail)
    # a record of the file gives it, and says so
    notes = []
    assert official_config(raw["ema"], _args(raw), ARCH, PATH, depth_from=("its records", 4), notes=notes).depth == 4
    assert notes == ["depth 4: from its records"]


def test_encoder_depth_may_leave_no_core_blocks(raw):
    """The bound is encoder_depth + tail <= depth: the equality is a valid (if odd) split."""
    cfg = official_config(raw["ema"], _args(raw, encoder_depth=None), {**_DEPTH, "encoder_depth": 3}, PATH)
    assert (cfg.head_blocks, cfg.tail_blocks, cfg.depth) == (3, 1, 4)


@pytest.mark.parametrize("key", ["x_embedder.proj.weight", "pos_embed", READ + "learned_query_embed",
                                 "y_embedder.embedding_table.weight", "final_layer.linear.weight",
                                 "blocks.0.mlp.fc1.weight", READ + "fit_layer.read_ff.0.fc1.weight",
                                 READ + "latent_pos_embed"])
def test_a_missing_size_key_is_named_with_the_file(raw, key):
    sd = {k: v for k, v in raw["ema"].items() if k != key}
    _expect(lambda: official_config(sd, _args(raw), _DEPTH, PATH),
            f"{PATH}: missing key {key!r} (needed to read the model's sizes)")


def test_malformed_args_given_to_official_config_name_the_file(raw):
    _expect(lambda: official_config(raw["ema"], {"model": 5}, _DEPTH, PATH),
            f"{PATH}: args.model is int (5), expected a str (the type official train.py gives it): a damaged or "
            "edited file")


def test_every_size_is_read_from_the_weights():
    """in_channels, mlp_ratio and the Read/Write MLP width (rows of read_ff fc1, not its input width) come from the
    shapes; none falls back to a default."""
    assert official_shapes(CUSTOM)[READ + "fit_layer.read_ff.0.fc1.weight"] == (12, 24)
    assert official_config(_zeros_sd(CUSTOM), CUSTOM_ARGS, CUSTOM_ARCH, PATH) == CUSTOM


def test_a_registry_name_gives_depth_heads_tail_and_patch():
    sd = _zeros_sd(SMALL_S)
    assert official_config(sd, S_ARGS, {}, PATH) == SMALL_S
    _expect(lambda: official_config(sd, {**S_ARGS, "model": "ELIT-SiT-S/4"}, {}, PATH),
            f"{PATH}: patch_size disagrees: weights says 2, registry ELIT-SiT-S/4 says 4")


# --- read_official: defaults, info, notes --------------------------------------------------------------------------
def test_read_official_defaults_to_the_ema_weights_of_the_file_at_path(raw):
    cfg, sd, info = read_official(FIXTURE, arch=ARCH)
    assert info["weights"] == "ema" and cfg.depth == 4
    assert torch.equal(sd["stem.patch_embed.weight"], raw["ema"]["x_embedder.proj.weight"])
    assert not torch.equal(sd["stem.patch_embed.weight"], raw["model"]["x_embedder.proj.weight"])


def test_info_and_notes_of_a_train_py_file(raw):
    c = _file(raw, {"elit_max_mask_prob": 0.5, "elit_min_mask_prob": 0.25}, lr_scheduler={})
    _, _, info = read_official(PATH, arch=ARCH, ckpt=c)  # ckpt given: PATH is never opened
    assert isinstance(info.pop("official_pos_embed"), torch.Tensor)
    assert info == {
        "source": PATH, "format": "official", "weights": "ema", "model": "ELIT-SiT-TinyA/2", "steps": 50000,
        "resolution": 128, "elit_max_mask_prob": 0.5, "elit_min_mask_prob": 0.25,
        "notes": ["ignored 'opt' (optimizer state; not needed for inference)",
                  "ignored 'lr_scheduler' (LR scheduler state; not needed for inference)",
                  (f"depth 4: from the optimizer state ('opt': 78 parameters = {FIXED} outside the blocks + "
                   f"{PER_BLOCK} per block)"),
                  "Read modulation: 7th chunk dropped (computed but unused by the official forward pass)"]}


def test_a_bare_state_dict_notes_what_cannot_be_told(raw):
    cfg, _, info = read_official(PATH, arch={**_DEPTH, "encoder_depth": 1}, ckpt=dict(raw["ema"]))
    assert cfg.depth == 4 and info["weights"] is None and info["steps"] is None and info["model"] is None
    assert info["notes"] == [
        "bare state_dict: no args; sizes from the weights and arch; which weights (EMA or raw) it holds cannot be told",
        "Read modulation: 7th chunk dropped (computed but unused by the official forward pass)"]
    _expect(lambda: read_official(PATH, arch=_DEPTH, ckpt={**raw["ema"], "extra": 3}),
            f"{PATH}: the state_dict is not a state_dict of tensors: 'extra' is int")


def test_steps_is_checked_when_present_and_optional(raw):
    _expect(lambda: read_official(PATH, arch=_DEPTH, ckpt=_file(raw, steps="10")),
            f"{PATH}: steps is str ('10'), expected an int (the training step official train.py saves)")
    assert read_official(PATH, arch=_DEPTH, ckpt=_file(raw, steps=_DROP))[2]["steps"] is None


def test_not_a_checkpoint_names_what_was_found():
    start = (f"{PATH}: not an ELIT-SiT checkpoint: expected a dict with 'ema'/'model' and 'args' (official train.py) "
             f"or one of our files (format {READABLE_FORMATS}), got ")
    _expect(lambda: read_official(PATH, ckpt=torch.zeros(3)), start + "Tensor")
    _expect(lambda: read_official(PATH, ckpt={f"k{i}": torch.zeros(1) for i in range(10)}),
            start + str([f"k{i}" for i in range(8)]))  # the first 8 keys


def test_check_finite_is_on_by_default_and_reaches_the_last_tensor(raw):
    ema = dict(raw["ema"])
    last = list(ema)[-1]
    ema[last] = ema[last].clone()
    ema[last][3] = float("nan")
    _expect(lambda: read_official(PATH, arch=ARCH, ckpt=_file(raw, ema=ema)),
            f"{PATH}: tensor {last!r} holds 1 non-finite values (NaN or inf) of {ema[last].numel()}, the first at index "
            "(3,): a damaged download or a diverged training run? Pass check_finite=False to load it anyway")
    assert read_official(PATH, arch=ARCH, ckpt=_file(raw, ema=ema), check_finite=False)[0].depth == 4


def test_check_finite_looks_past_entries_that_are_not_float_tensors():
    """A state_dict may hold integer counters, empty tensors or non-tensors before a damaged weight: all are
    skipped, none ends the scan."""
    sd = {"step": torch.tensor(3), "empty": torch.zeros(0), "note": "x", "w": torch.tensor([0.0, float("inf")])}
    _expect(lambda: check_finite(PATH, sd), f"{PATH}: tensor 'w' holds 1 non-finite values (NaN or inf) of 2, the first "
                                            "at index (1,): a damaged download or a diverged training run? Pass "
                                            "check_finite=False to load it anyway")


def test_numpy_reals_in_arch_are_shown_as_plain_numbers(raw):
    _expect(lambda: read_official(PATH, arch={**ARCH, "mlp_ratio": np.float32(2.0)}, ckpt=_file(raw)),
            f"{PATH}: mlp_ratio disagrees: weights says 4.0, arch says 2.0")


# --- where encoder_depth and the depth come from -------------------------------------------------------------------
def test_legacy_names_are_numbered_from_args_or_arch(raw):
    """``decoder_blocks.i`` -> ``blocks.(i + encoder_depth)``, encoder_depth from arch when given, else args."""
    legacy = _file(raw, ema=_legacy(raw["ema"]))
    note = "legacy names: decoder_blocks.i -> blocks.(i + 1)"
    for c, arch in ((legacy, _DEPTH), (_file(raw, {"encoder_depth": None}, ema=_legacy(raw["ema"])),
                                       {**_DEPTH, "encoder_depth": 1})):
        cfg, sd, info = read_official(PATH, arch=arch, ckpt=c)
        assert cfg.head_blocks == 1 and note in info["notes"]
        assert torch.equal(sd["tail.0.attn.proj.weight"], raw["ema"]["blocks.3.attn.proj.weight"])


def test_the_depth_from_the_other_legacy_entry_counts_its_decoder_blocks(raw):
    c = _file(raw, ema=_legacy(raw["ema"]), model=_legacy(raw["model"]), opt=_DROP)
    cfg, _, info = read_official(PATH, arch=ARCH, ckpt=c)
    assert cfg.depth == 4
    assert "depth 4: from the 'model' entry's blocks (blocks.0 to blocks.3)" in info["notes"]


@pytest.mark.parametrize("weights,other", [("ema", "model"), ("model", "ema")])
def test_the_depth_comes_from_the_other_weights_entry(raw, weights, other):
    cfg, _, info = read_official(PATH, weights=weights, arch=ARCH, ckpt=_file(raw, opt=_DROP))
    assert cfg.depth == 4
    assert f"depth 4: from the {other!r} entry's blocks (blocks.0 to blocks.3)" in info["notes"]


def test_the_chosen_entry_missing_its_last_block_is_caught_by_the_other(raw):
    lost = sorted(k for k in raw["ema"] if k.startswith("blocks.3."))
    ema = {k: v for k, v in raw["ema"].items() if k not in lost}
    _expect(lambda: read_official(PATH, arch=ARCH, ckpt=_file(raw, ema=ema, opt=_DROP)),
            f"{PATH}: missing keys ({len(lost)}): {', '.join(lost)}")


def test_a_ddp_prefixed_other_entry_still_gives_the_depth(raw):
    model = {"module." + k: v for k, v in raw["model"].items()}
    assert read_official(PATH, arch=ARCH, ckpt=_file(raw, model=model, opt=_DROP))[0].depth == 4


@pytest.mark.parametrize("model", [_DROP, "non_str_key", "no_blocks"], ids=["absent", "non_str_key", "no_blocks"])
def test_without_a_usable_record_the_depth_must_be_given(raw, model):
    """No opt, and no other entry (or one that is damaged or holds no blocks): the depth cannot be checked."""
    if model == "non_str_key":
        model = {**raw["model"], 5: torch.zeros(1)}
    elif model == "no_blocks":
        model = {"pos_embed": raw["model"]["pos_embed"]}
    _expect(lambda: read_official(PATH, arch=ARCH, ckpt=_file(raw, model=model, opt=_DROP)),
            f"{PATH}: depth: model 'ELIT-SiT-TinyA/2' is not an official registry name, arch gives no depth, and the "
            "file holds no record to check the 4 blocks its weights hold against (an optimizer state 'opt', or a "
            "second weights entry): a file missing its last blocks cannot be told from a shallower model; pass "
            "arch={'depth': N} (the official constructor's depth)")


@pytest.mark.parametrize("n", [FIXED + 4 * PER_BLOCK + 1, FIXED])
def test_an_optimizer_count_that_fits_no_depth_is_refused(raw, n):
    _expect(lambda: read_official(PATH, arch=ARCH, ckpt=_file(raw, opt=_opt(n))),
            f"{PATH}: the optimizer state ('opt') lists {n} parameters, which fits no depth: an ELIT-SiT model has "
            f"{FIXED} tensors outside its blocks and {PER_BLOCK} per block; the file is damaged or edited. If it is "
            "whole, pass arch={'depth': N} (the official constructor's depth)")


def test_the_optimizer_count_includes_repa_projectors(raw):
    proj = {f"projectors.0.{i}.weight": torch.zeros(2) for i in range(3)}
    c = _file(raw, ema={**raw["ema"], **proj}, model={**raw["model"], **proj}, opt=_opt(FIXED + 4 * PER_BLOCK + 3))
    cfg, _, info = read_official(PATH, arch=ARCH, ckpt=c)
    assert cfg.depth == 4
    assert (f"depth 4: from the optimizer state ('opt': 81 parameters = {FIXED} outside the blocks + 3 REPA projector "
            f"tensors + {PER_BLOCK} per block)") in info["notes"]


def test_a_one_block_model_is_read_from_its_optimizer_count():
    cfg1 = ElitConfig(**{**vars(CUSTOM), "depth": 1, "head_blocks": 0, "tail_blocks": 0})
    sd = _zeros_sd(cfg1)
    c = {"ema": sd, "model": sd, "opt": _opt(FIXED + PER_BLOCK), "args": {**CUSTOM_ARGS, "encoder_depth": 0}}
    assert read_official(PATH, arch={"num_heads": 3, "dit_decoder_depth": 0}, ckpt=c)[0] == cfg1


def test_a_registry_name_fixes_the_depth_without_consulting_the_optimizer_state():
    sd = _zeros_sd(SMALL_S)
    c = {"ema": sd, "model": sd, "opt": _opt(7), "args": S_ARGS}  # a count that fits no depth: never looked at
    assert read_official(PATH, ckpt=c)[0] == SMALL_S


# --- smaller helpers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,shown", [(57, None), (58, "b'" + "a" * 55 + "...")])
def test_long_values_are_cut_at_60_characters(size, shown):
    value = b"a" * size  # repr: 60, then 61 characters
    _expect(lambda: check_args({"model": value}, PATH),
            f"{PATH}: args.model is bytes ({shown or repr(value)}), expected a str (the type official train.py gives "
            "it): a damaged or edited file")


def test_public_checks_name_checkpoint_when_given_no_path(raw, model):
    _expect(lambda: check_args(5), "checkpoint: args is int (5), expected an argparse.Namespace (what official train.py "
                                   "saves) or a dict of its fields")
    _expect(lambda: official_config({}, {}, {}), "checkpoint: missing key 'x_embedder.proj.weight' (needed to read "
                                                 "the model's sizes)")
    sd = {k: v for k, v in raw["ema"].items() if k != "pos_embed"}
    _expect(lambda: check_keys(sd, model.cfg), "checkpoint: missing keys (1): pos_embed")
    _expect(lambda: check_pos_embed(torch.zeros_like(raw["ema"]["pos_embed"]), model),
            "checkpoint: pos_embed differs from the 2-D sin-cos table (max abs diff 1); not the official fixed table")


def test_a_bf16_table_is_accepted_within_one_bf16_step(raw, model):
    cfg = model.cfg
    ours = model.stem.pos_embed.detach().float()[inverse_permutation(group_major_permutation(cfg.grid, cfg.grid,
                                                                                             cfg.window))]
    theirs = ours.to(torch.bfloat16)[None]
    i = (ours == 1).nonzero()[0].tolist()
    theirs[0, i[0], i[1]] = 1 + 2 ** -7  # one bf16 step above 1: exactly the tolerance
    check_pos_embed(theirs, model, PATH)
    theirs[0, i[0], i[1]] = 1 + 2 ** -6
    _expect(lambda: check_pos_embed(theirs, model, PATH),
            f"{PATH}: pos_embed differs from the 2-D sin-cos table (max abs diff 0.0156); not the official fixed table")


def test_legacy_names_clashing_with_a_held_block_are_refused():
    t = torch.zeros(1)
    _expect(lambda: apply_legacy_names({"decoder_blocks.0.w": t, "blocks.1.w": t}, 1),
            "legacy names: decoder_blocks.0.w maps to blocks.1.w, which the file also holds (encoder_depth 1 does not "
            "match this file's naming)")


def test_our_info_keeps_both_meta_names():
    assert our_info("f.pt", {"source": "a.pt", "converted_from": "b.pt", "format": "official"}) == {
        "converted_from": "b.pt", "meta_source": "a.pt", "original_format": "official", "source": "f.pt",
        "format": "elit-kernels"}


def test_arch_accepts_the_official_constructors_boundary_values():
    arch = {"num_heads": 1, "dit_encoder_depth": 0, "mlp_ratio": 0.5, "class_dropout_prob": 0.0,
            "elit_max_mask_prob": 1.0, "elit_min_mask_prob": np.float64(0.0)}
    out = _check_arch(arch)
    assert out == arch and type(out["elit_min_mask_prob"]) is float


# --- load_checkpoint's arguments -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return load_checkpoint(FIXTURE, arch=ARCH, backend="torch")


def test_check_finite_must_be_a_bool():
    _expect(lambda: load_checkpoint(FIXTURE, arch=ARCH, check_finite="yes"),
            "check_finite: expected a bool, got str ('yes')", TypeError)


def test_an_official_file_is_read_once_and_loads_in_the_dtype_asked(monkeypatch):
    reads = []

    def counted(path):
        reads.append(path)
        return safe_torch_load(path)

    monkeypatch.setattr(loader, "safe_torch_load", counted)
    m = load_checkpoint(FIXTURE, arch=ARCH, backend="torch", dtype=torch.float64)
    assert reads == [FIXTURE]  # a released file is GBs: never read twice
    assert {p.dtype for p in m.parameters()} == {torch.float64}


def test_a_wrong_pos_embed_is_named_with_the_file(tmp_path, raw):
    ema = dict(raw["ema"])
    ema["pos_embed"] = ema["pos_embed"] + 0.5
    p = str(tmp_path / "pe.pt")
    torch.save(_file(raw, ema=ema), p)
    _expect(lambda: load_checkpoint(p, arch=ARCH), f"{p}: pos_embed differs from the 2-D sin-cos table (max abs diff "
                                                   "0.5); not the official fixed table")


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    d = tmp_path_factory.mktemp("ours")
    torch.manual_seed(0)
    return save_model(str(d / "tiny.safetensors"), ElitDiT(elit_config("tiny", 64)).eval()), d


def test_our_file_is_built_with_the_dtype_and_backend_asked(ours):
    m = load_checkpoint(ours[0], dtype=torch.float64, backend="torch")
    assert m.backend == "torch" and {p.dtype for p in m.parameters()} == {torch.float64}


def test_a_mismatched_state_dict_in_our_file_is_named_with_the_file(ours):
    m = load_model(ours[0])
    sd = dict(m.state_dict())
    sd.pop("latent_embed")
    p = str(ours[1] / "cut.pt")
    torch.save({"format": "elit-kernels/1", "config": config_dict(m.cfg), "state_dict": sd, "meta": {}}, p)
    _expect(lambda: load_checkpoint(p), f"{p}: state_dict does not match the config: missing keys ['latent_embed'], "
                                        "unexpected keys []")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_both_formats_load_onto_the_device_asked(ours):
    for m in (load_checkpoint(FIXTURE, arch=ARCH, device="cuda"), load_checkpoint(ours[0], device="cuda"),
              load_model(ours[0], device="cuda")):
        assert {p.device.type for p in m.parameters()} == {"cuda"}


# --- safe_torch_load -----------------------------------------------------------------------------------------------
class _Opens:
    """Pickles to ``open(marker, "w")``: a global outside the allowlist."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_allowlist_holds_even_when_the_environment_turns_weights_only_off(tmp_path, monkeypatch):
    """``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` changes torch.load's default only: the loader passes weights_only=True."""
    marker = tmp_path / "created"
    p = str(tmp_path / "h.pt")
    torch.save({"args": _Opens(str(marker))}, p)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeCheckpointError):
        safe_torch_load(p)
    assert not marker.exists()


@pytest.mark.parametrize("err,damage", [(OSError(errno.EINVAL, "Invalid argument"), True),
                                        (OSError(errno.EIO, "Input/output error"), False),
                                        (OSError(errno.EINVAL, "Invalid argument", "elsewhere"), False)])
def test_only_a_nameless_einval_is_read_as_a_damaged_file(tmp_path, monkeypatch, err, damage):
    """A seek outside the file (EINVAL naming no file) is damage; a disk error or one naming a file passes through."""
    p = tmp_path / "f.pt"
    p.write_bytes(b"PK\x03\x04 not really")

    def fail(*a, **k):
        raise err

    monkeypatch.setattr(torch, "load", fail)
    if damage:
        with pytest.raises(CheckpointError, match=rf"^{p}: cannot be read as a torch checkpoint \(OSError"):
            safe_torch_load(str(p))
    else:
        with pytest.raises(OSError) as e:
            safe_torch_load(str(p))
        assert e.value is err
