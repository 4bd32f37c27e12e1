"""Model configs (models/config.py): the paper preset's sizes and splits, derived quantities, and the
errors each invalid field raises (naming the field)."""
import pytest

from elit_kernels.models.config import ElitConfig, config_dict, config_from_dict, elit_config, elit_sit_config

# name, resolution -> hidden, depth, heads, input_size, window, groups, J_max, head/core/tail (paper §4: 16 groups,
# 4-20-4 for 28 blocks and 3-6-3 for 12; ours for 24: a quarter capped at 4)
PAPER = [
    ("S/2", 256, 384, 12, 6, 32, 4, 16, 16, (3, 6, 3)),
    ("B/2", 256, 768, 12, 12, 32, 4, 16, 16, (3, 6, 3)),
    ("L/2", 256, 1024, 24, 16, 32, 4, 16, 16, (4, 16, 4)),
    ("XL/2", 256, 1152, 28, 16, 32, 4, 16, 16, (4, 20, 4)),
    ("XL/2", 512, 1152, 28, 16, 64, 8, 16, 64, (4, 20, 4)),
    ("tiny", 64, 64, 3, 2, 8, 2, 4, 4, (1, 1, 1)),
]


@pytest.mark.parametrize("name,res,hidden,depth,heads,size,window,groups,jmax,split", PAPER,
                         ids=[f"{p[0]}-{p[1]}" for p in PAPER])
def test_paper_presets(name, res, hidden, depth, heads, size, window, groups, jmax, split):
    c = elit_config(name, res)
    assert (c.hidden, c.depth, c.heads, c.input_size, c.window) == (hidden, depth, heads, size, window)
    assert (c.groups, c.latents_per_group, c.tokens_per_group) == (groups, jmax, window * window)
    assert (c.n_head, c.core_blocks, c.n_tail) == split
    assert c.grid == size // 2 and c.tokens == c.grid ** 2 and c.head_dim == hidden // heads
    assert c.num_classes == (10 if name == "tiny" else 1000)
    assert not c.budget_core_only and c.block_qk_norm  # the paper's switches


@pytest.mark.parametrize("depth,split", [(28, 4), (12, 3), (24, 4), (16, 4), (8, 2), (3, 0)])
def test_default_split_for_any_depth(depth, split):
    c = ElitConfig(depth=depth)
    assert c.n_head == c.n_tail == split and c.core_blocks == depth - 2 * split


def test_overrides_and_explicit_splits():
    c = elit_config("S/2", 256, head_blocks=2, tail_blocks=1, j_max=4)
    assert (c.n_head, c.core_blocks, c.n_tail, c.latents_per_group) == (2, 9, 1, 4)
    assert elit_config("tiny", 64, head_blocks=0).n_head == 0


@pytest.mark.parametrize("res", [16, 32, 256, 512])
def test_resolutions_accepted(res):
    assert elit_config("tiny", res).input_size == res // 8


@pytest.mark.parametrize("res", [0, 4, 12, -8, 260, 256.0, True, "256", None])
def test_bad_resolution_names_it(res):
    with pytest.raises(ValueError, match="^resolution: expected a positive multiple of 8"):
        elit_config("S/2", res)
    with pytest.raises(ValueError, match="^resolution"):
        elit_sit_config("S/2", res)


def test_unknown_name():
    with pytest.raises(ValueError, match="^name: unknown config 'M/2'; known: S/2, B/2, L/2, XL/2, tiny"):
        elit_config("M/2")


@pytest.mark.parametrize("field", ["hidden", "depth", "heads", "patch", "in_channels", "input_size", "window",
                                   "num_classes", "latent_pos_rows"])
@pytest.mark.parametrize("value", [0, -1, 1.0, True])
def test_positive_int_fields(field, value):
    with pytest.raises(ValueError, match=f"^{field}: expected a positive int"):
        ElitConfig(**{field: value})


@pytest.mark.parametrize("kw,match", [
    (dict(patch=3), "^patch: 3 must divide input_size 32"),
    (dict(window=3), "^window: 3 must divide the token grid side 16"),
    (dict(heads=5), "^heads: 5 must divide hidden 384"),
    (dict(hidden=1028, heads=2), "^hidden/heads: head dim 1028/2 = 514 exceeds 256"),
    (dict(j_max=0), "^j_max: expected None or a positive int"),
    (dict(j_max=True), "^j_max: expected None or a positive int"),
    (dict(head_blocks=7, tail_blocks=6), r"^head_blocks/tail_blocks: 7\+6 exceed depth 12"),
    (dict(interface_qk_norm="layer"), "^interface_qk_norm: expected one of"),
    (dict(hidden=390, heads=6), "^hidden: 390 must be divisible by 4"),
    (dict(learned_interface_pos=True, j_max=4), "^j_max: learned_interface_pos indexes latents"),
    (dict(learned_interface_pos=True, latent_pos_rows=100), r"^latent_pos_rows: 100 < 256 tokens"),
])
def test_invalid_combinations_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        ElitConfig(**kw)


def test_valid_edges():
    assert ElitConfig(hidden=512, heads=2).head_dim == 256  # the largest head dim the backends take
    assert ElitConfig(head_blocks=6, tail_blocks=6).core_blocks == 0
    assert ElitConfig(hidden=396, heads=6, latent_group_pos=False).hidden == 396  # any multiple of 4
    with pytest.raises(ValueError, match="hidden: 390 must be divisible by 4 for the 2-D sin-cos position"):
        ElitConfig(hidden=390, heads=6, latent_group_pos=False)  # the patch tokens' table is sin-cos in every config
    assert ElitConfig(learned_interface_pos=True, latent_pos_rows=256).latent_pos_rows == 256
    assert ElitConfig(j_max=1).latents_per_group == 1  # the smallest J_max
    assert elit_config("S/2") == elit_config("S/2", 256)  # the default resolution
    from elit_kernels.models.config import _check_resolution

    _check_resolution(8)  # the smallest resolution: one latent pixel
    for bad in (0, 7, 9, 8.0, True):
        with pytest.raises(ValueError, match=r"^resolution: expected a positive multiple of 8"):
            _check_resolution(bad)


def test_config_dict_round_trip_and_unknown_keys():
    c = elit_sit_config("S/2", 256)
    assert config_from_dict(config_dict(c)) == c
    with pytest.raises(ValueError, match=r"^config: unknown ElitConfig field\(s\) \['colour'\]"):
        config_from_dict({**config_dict(c), "colour": 1})


# The released preset (docs/released_checkpoints.md §3.3): registry size -> depth, hidden, heads, tail blocks.
@pytest.mark.parametrize("name,res,want", [
    ("XL/2", 256, dict(hidden=1152, depth=28, heads=16, patch=2, input_size=32, window=4, n_tail=4)),
    ("ELIT-SiT-XL/2", 512, dict(hidden=1152, depth=28, heads=16, patch=2, input_size=64, window=8, n_tail=4)),
    ("L/4", 256, dict(hidden=1024, depth=24, heads=16, patch=4, input_size=32, window=4, n_tail=4)),
    ("B/2", 256, dict(hidden=768, depth=12, heads=12, patch=2, input_size=32, window=4, n_tail=2)),
    ("S/8", 512, dict(hidden=384, depth=12, heads=6, patch=8, input_size=64, window=8, n_tail=2)),
    ("S/2", 128, dict(hidden=384, depth=12, heads=6, patch=2, input_size=16, window=4, n_tail=2)),  # other res: 4
])
def test_released_presets(name, res, want):
    c = elit_sit_config(name, res)
    got = {k: getattr(c, k) for k in want}
    assert got == want
    assert c.n_head == 8 and c.core_blocks == c.depth - 8 - c.n_tail  # encoder_depth 8 (train.py's default)
    assert c.num_classes == 1000 and c.latents_per_group == c.tokens_per_group == c.window ** 2
    assert c.budget_core_only and not c.block_qk_norm and c.learned_interface_pos  # the released switches


def test_released_defaults_and_arguments():
    assert elit_sit_config() == elit_sit_config("XL/2", 256, encoder_depth=8, group_size=None, num_classes=1000)
    c = elit_sit_config("S/2", 256, encoder_depth=0, group_size=2, num_classes=10, mlp_ratio=2.0)
    assert (c.n_head, c.n_tail, c.window, c.groups, c.num_classes, c.mlp_ratio) == (0, 2, 2, 64, 10, 2.0)
    assert elit_sit_config("S/2", 256, encoder_depth=10).core_blocks == 0  # depth - tail: the largest
    assert elit_sit_config("S/2", 256, group_size=1).groups == 256


@pytest.mark.parametrize("kw,match", [
    (dict(group_size=0), "^group_size: 0 must be a positive int dividing the 16x16 token grid"),
    (dict(group_size=3), "^group_size: 3 must be"),
    (dict(group_size=True), "^group_size: True must be"),
    (dict(group_size=4.0), "^group_size: 4.0 must be"),
    (dict(encoder_depth=-1), r"^encoder_depth: expected an int in \[0, 10\]"),
    (dict(encoder_depth=11), r"^encoder_depth: expected an int in \[0, 10\]"),
    (dict(encoder_depth=True), r"^encoder_depth: expected an int"),
    (dict(encoder_depth=8.0), r"^encoder_depth: expected an int"),
])
def test_released_argument_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        elit_sit_config("S/2", 256, **kw)


def test_released_name_errors():
    for bad in ("M/2", "XL/3", "xl/2", "XL", None):
        with pytest.raises(ValueError, match="^name: unknown ELIT-SiT registry name"):
            elit_sit_config(bad)
    with pytest.raises(ValueError, match="^resolution: 72px gives a 9x9 latent, not divisible by patch 2"):
        elit_sit_config("S/2", 72)


def test_preset_config():
    from elit_kernels.models.config import RELEASED_SWITCHES, preset_config

    assert preset_config("paper", "S/2", 512) == elit_config("S/2", 512)
    assert preset_config("released", "S/2", 512) == elit_sit_config("S/2", 512)
    assert preset_config("released", "tiny", 64) == elit_config("tiny", 64, **RELEASED_SWITCHES)
    assert preset_config("paper", "S/2") == elit_config("S/2", 256)
    with pytest.raises(ValueError, match="^preset: expected one of"):
        preset_config("official", "S/2")


@pytest.mark.parametrize("field, value", [("mlp_ratio", -1.0), ("mlp_ratio", float("nan")), ("mlp_ratio", "4"),
                                          ("interface_mlp_ratio", 0), ("timestep_scale", float("inf")),
                                          ("timestep_scale", True), ("head_blocks", -1), ("tail_blocks", 1.5),
                                          ("block_qk_norm", "no"), ("budget_core_only", 1),
                                          ("pos_embed_column_first", None)])
def test_every_field_of_a_config_is_checked_by_name(field, value):
    with pytest.raises(ValueError, match=f"^{field}: expected "):
        elit_config("tiny", 64, **{field: value})


def test_every_switch_is_checked_as_a_bool():
    # the list of bool fields the config checks is every field whose default is a bool
    from dataclasses import fields

    from elit_kernels.models import ElitConfig
    from elit_kernels.models.config import _BOOL_FIELDS

    assert set(_BOOL_FIELDS) == {f.name for f in fields(ElitConfig) if isinstance(f.default, bool)}


def test_a_saved_config_must_hold_every_field():
    from elit_kernels.models import config_dict, config_from_dict

    d = config_dict(elit_config("tiny", 64))
    assert config_from_dict(d, complete=True) == elit_config("tiny", 64)
    d.pop("timestep_scale")
    assert config_from_dict(d).timestep_scale == 1000.0  # a partial dict is for overrides
    with pytest.raises(ValueError, match=r"^config: missing ElitConfig field\(s\) \['timestep_scale'\]"):
        config_from_dict(d, complete=True)
    with pytest.raises(ValueError, match="^config: expected a dict"):
        config_from_dict(None)


def test_numpy_scalars_are_the_python_values_they_equal():
    """A config built from NumPy values (read from an array, a .npz) is the config built from Python ones: equal,
    same hash, Python types in every field (config_dict writes them to JSON); a NumPy bool is still not an int."""
    import json

    import numpy as np

    c = ElitConfig(hidden=np.int64(64), depth=np.int32(3), heads=np.uint8(4), j_max=np.int16(4),
                   head_blocks=np.int64(1), mlp_ratio=np.float32(2.0), block_qk_norm=np.False_,
                   interface_qk_norm=np.str_("full_width"), input_size=np.int64(8), window=np.int64(2))
    want = ElitConfig(hidden=64, depth=3, heads=4, j_max=4, head_blocks=1, mlp_ratio=2.0, block_qk_norm=False,
                      interface_qk_norm="full_width", input_size=8, window=2)
    assert c == want and hash(c) == hash(want)
    assert all(type(getattr(c, k)) is type(getattr(want, k)) for k in config_dict(want))
    json.dumps(config_dict(c))
    for field in ("hidden", "j_max", "head_blocks"):
        with pytest.raises(ValueError, match=f"^{field}: expected"):
            ElitConfig(**{field: np.True_})
    with pytest.raises(ValueError, match="^hidden: expected a positive int, got 64.0"):
        ElitConfig(hidden=np.float64(64))
    assert elit_config("tiny", np.int64(64)) == elit_config("tiny", 64)
    assert elit_sit_config("S/2", np.int64(256), encoder_depth=np.int64(2), group_size=np.int64(4)) == \
        elit_sit_config("S/2", 256, encoder_depth=2, group_size=4)
    with pytest.raises(ValueError, match="^resolution"):
        elit_config("tiny", np.float64(64))


def test_a_config_is_refused_where_the_model_could_not_be_built_or_run():
    """Round 41: ``hidden`` not divisible by 4 was accepted without latent sin-cos tables, but the patch tokens'
    table is always 2-D sin-cos (ElitDiT could not be built); an MLP ratio giving int(hidden * ratio) = 0
    features built zero-width MLPs; and a resolution too small for the derived window or patch blamed
    ``group_size`` / ``patch``, which the user never passed."""
    from elit_kernels.models import ElitDiT
    from elit_kernels.models.config import elit_sit_config

    with pytest.raises(ValueError, match="hidden: 6 must be divisible by 4"):
        ElitConfig(hidden=6, heads=3, latent_group_pos=False, input_size=8, window=2, depth=3)
    ElitDiT(ElitConfig(hidden=8, heads=2, latent_group_pos=False, input_size=8, window=2, depth=3))  # builds
    for field in ("mlp_ratio", "interface_mlp_ratio"):
        with pytest.raises(ValueError, match=rf"{field}: 0.001 gives MLPs of int\(64 \* ratio\) = 0 features"):
            elit_config("tiny", 64, **{field: 0.001})
        assert getattr(elit_config("tiny", 64, **{field: 1 / 64}), field) == 1 / 64  # one feature: the edge
    with pytest.raises(ValueError, match=r"^resolution: 64px gives S/8 a 1x1 token grid, .*multiple of 256 px"):
        elit_sit_config("S/8", 64)
    assert elit_sit_config("S/8", 256).grid == 4
    with pytest.raises(ValueError, match=r"^group_size: 3 must be a positive int dividing the 4x4"):
        elit_sit_config("S/8", 256, group_size=3)  # given, so named
    with pytest.raises(ValueError, match=r"^resolution: 8px gives a 1x1 latent, not divisible by tiny's patch 2; "
                                         r"expected a multiple of 16 px"):
        elit_config("tiny", 8)
    with pytest.raises(ValueError, match=r"^patch: 4 must divide input_size 2"):
        elit_config("tiny", 16, patch=4)  # given, so named
