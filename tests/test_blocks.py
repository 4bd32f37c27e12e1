"""The model's building blocks and its construction, each against a formula or a fact written here:
norms at magnitudes where eps matters, the timestep sinusoid, the sin-cos default, the blocks' defaults,
initial scales, buffers (device, dtype, never in the state_dict), input errors, the empty batch."""
import copy
import math

import pytest
import torch

from elit_kernels.models import ElitDiT, PlainDiT, elit_config
from elit_kernels.models.blocks import (Attention, DiTBlock, ReadBlock, RMSNorm, TimestepEmbedder, WriteBlock,
                                        sincos_2d)
from elit_kernels.models.config import preset_config


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _perturbed(model, std=0.05):
    """adaLN-Zero and zero-initialised output layers make a fresh model trivial; move every weight."""
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(std * torch.randn_like(prm))
    return model


def _rms_truth(x, weight, eps, outside):
    x = x.double()
    ms = x.pow(2).mean(-1, keepdim=True)
    y = x / (ms.sqrt() + eps) if outside else x / torch.sqrt(ms + eps)
    return y * weight.double()


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # at 1e-3, mean(x²) ~ 1e-6: eps is half of it
def test_rms_norm_formulas(scale):
    x = _randn(5, 32) * scale
    norm = RMSNorm(32)  # the default: eps 1e-6 inside the root (per-head QK-norm, the paper preset)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * _randn(32, seed=1))
    torch.testing.assert_close(norm(x).double(), _rms_truth(x, norm.weight, 1e-6, False), rtol=1e-5, atol=0)
    att = Attention(64, 2, "full_width")  # released Read/Write: one norm over all C, eps 1e-5 outside the root
    xw = _randn(5, 64, seed=2) * scale
    for n in (att.q_norm, att.k_norm):
        with torch.no_grad():
            n.weight.copy_(1 + 0.1 * _randn(64, seed=3))
        torch.testing.assert_close(n(xw).double(), _rms_truth(xw, n.weight, 1e-5, True), rtol=1e-5, atol=0)
    att = Attention(64, 2, "per_head")
    for n in (att.q_norm, att.k_norm):
        torch.testing.assert_close(n(x).double(), _rms_truth(x, n.weight, 1e-6, False), rtol=1e-5, atol=0)


def test_rms_norm_returns_the_input_dtype():
    # computed in fp32, returned in x's dtype, with an fp32 gain (a model in fp32 fed bf16 q/k under autocast)
    x = _randn(3, 16).bfloat16()
    out = RMSNorm(16)(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _rms_truth(x.float(), torch.ones(16), 1e-6, False), rtol=1e-2, atol=0)


def test_timestep_embedder_features_are_the_dit_sinusoid():
    # 256 features of scale·t: cos half then sin half, frequencies exp(-ln(10000)·i/128) (DiT's
    # TimestepEmbedder); the default scale is 1000 (the paper preset's integer-step range)
    t = torch.tensor([0.0, 0.37, 0.9, 1.0])
    for emb, scale in ((TimestepEmbedder(32), 1000.0), (TimestepEmbedder(32, scale=1.0), 1.0)):
        seen = []
        emb.mlp[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
        emb(t)
        i = torch.arange(128, dtype=torch.float64)
        args = scale * t.double()[:, None] * torch.exp(-math.log(10000.0) * i / 128)[None]
        want = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        # fp32 arguments up to 1000 rad are rounded to ~6e-5; a 1e-4 change of ln(10000) moves them by 4e-3
        torch.testing.assert_close(seen[0].double(), want, rtol=0, atol=3e-4)


def test_sincos_2d_default_puts_the_row_first():
    # [h*w, dim], row-major positions; each half [sin(pos·ω), cos(pos·ω)], ω_k = 10000^(-k/(dim/4)); the
    # first half encodes the row unless column_first (the paper preset's table and its group table)
    dim, h, w = 16, 3, 5
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    r, c = torch.div(torch.arange(h * w), w, rounding_mode="floor").double(), (torch.arange(h * w) % w).double()

    def half(pos):
        return torch.cat([torch.sin(pos[:, None] * omega), torch.cos(pos[:, None] * omega)], dim=1)

    got = sincos_2d(dim, h, w)
    assert got.dtype == torch.float32 and got.shape == (h * w, dim)
    torch.testing.assert_close(got.double(), torch.cat([half(r), half(c)], dim=1), rtol=0, atol=1e-7)
    torch.testing.assert_close(sincos_2d(dim, h, w, column_first=True).double(), torch.cat([half(c), half(r)], dim=1),
                               rtol=0, atol=1e-7)
    # computed in fp64 and rounded once: on a 64x64 token grid the entries are within fp32 rounding
    # (~3e-8) of the formula; ω in fp32 would be off by up to ~4e-6
    dim, h = 64, 64
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    r, c = torch.div(torch.arange(h * h), h, rounding_mode="floor").double(), (torch.arange(h * h) % h).double()
    torch.testing.assert_close(sincos_2d(dim, h, h).double(), torch.cat([half(r), half(c)], dim=1), rtol=0, atol=2e-7)


def test_block_defaults_are_the_paper_preset():
    # DiTBlock/ReadBlock/WriteBlock/Attention built with their defaults hold exactly the parameters of the
    # paper model's blocks (qk-norm kind, modulated Read queries, Write LayerNorms, MLP ratios and biases)
    cfg = elit_config("tiny", 64)
    m = ElitDiT(cfg)
    c, h = cfg.hidden, cfg.heads
    for made, blk in ((DiTBlock(c, h), m.core[0]), (DiTBlock(c, h), m.head[0]), (ReadBlock(c, h), m.read),
                      (WriteBlock(c, h), m.write), (Attention(c, h), m.core[0].attn)):
        made.load_state_dict(blk.state_dict(), strict=True)  # raises on a missing, extra or reshaped tensor
    assert m.read.ada.out_features == 8 * c  # shift/scale for the latent queries, then the six of a block
    for blk in (*m.head, *m.core, *m.tail, m.read, m.write):
        assert blk.attn.qk_norm == "per_head"
    names = set(m.state_dict())
    assert {f"{blk}.mlp.{fc}.bias" for blk in ("read", "write") for fc in ("fc1", "fc2")} <= names
    assert {f"write.{n}.{p}" for n in ("norm_q", "norm_kv", "norm_mlp") for p in ("weight", "bias")} <= names
    rel = ElitDiT(preset_config("released", "tiny", 64))
    assert not any(".mlp.fc1.bias" in n or ".mlp.fc2.bias" in n for n in rel.state_dict() if n[:4] in ("read", "writ"))
    assert all(blk.attn.qk_norm is None for blk in (*rel.head, *rel.core, *rel.tail))
    assert rel.read.attn.qk_norm == rel.write.attn.qk_norm == "full_width" and rel.read.ada.out_features == 6 * c
    wide = ElitDiT(elit_config("tiny", 64, interface_mlp_ratio=2.0, mlp_ratio=3.0))
    assert wide.read.mlp.fc1.out_features == wide.write.mlp.fc1.out_features == 2 * c
    assert wide.core[0].mlp.fc1.out_features == 3 * c


def test_initial_scales():
    # DiT's init: class embeddings N(0, 0.02²); the released learned tables N(0, 0.02²); ours: unit-std
    # latent embeddings (see ElitDiT.__init__). 704 to 262144 draws: the std is known to within a few %.
    torch.manual_seed(0)
    m = ElitDiT(preset_config("released", "tiny", 64))
    for name in ("stem.y_embed.weight", "read_pos_embed", "write_pos_embed", "latent_pos_embed"):
        std = m.get_parameter(name).std().item()
        assert 0.016 < std < 0.024, (name, std)
    assert 0.85 < m.latent_embed.std().item() < 1.15
    assert 0.016 < PlainDiT(elit_config("tiny", 64)).stem.y_embed.weight.std().item() < 0.024


@pytest.mark.parametrize("preset", ["paper", "released"])
def test_buffers_follow_the_device_and_stay_out_of_the_state_dict(preset):
    cfg = preset_config(preset, "tiny", 64)
    m = ElitDiT(cfg)
    buffers = dict(m.named_buffers())
    assert buffers and set(m.state_dict()) == {n for n, _ in m.named_parameters()}  # recomputed, never saved
    p = PlainDiT(cfg)
    assert set(p.state_dict()) == {n for n, _ in p.named_parameters()}
    meta = torch.device("meta")
    m.reset_buffers(meta)  # an explicit device wins over the parameters'
    assert {n: b.device for n, b in m.named_buffers()} == {n: meta for n in buffers}
    m.reset_buffers()  # none: the parameters' device
    assert all(b.device.type == "cpu" for b in m.buffers())
    m.to(meta)
    m.reset_buffers()
    assert all(b.device == meta for b in m.buffers())
    p.stem.reset_buffers(meta)
    assert p.stem.pos_embed.device == meta
    p.stem.reset_buffers()
    assert p.stem.pos_embed.device.type == "cpu"
    p.to(meta)
    p.stem.reset_buffers()
    assert p.stem.pos_embed.device == meta


@pytest.mark.parametrize("preset", ["paper", "released"])
def test_reset_buffers_after_a_dtype_change_keeps_the_model_right(preset):
    # reset_buffers rebuilds the fixed tables in fp32 whatever the parameters' dtype (e.g. called after
    # model.to(torch.bfloat16)); the forward casts them to the tokens' dtype, so a bf16 model still runs in
    # bf16 and gives the fp32 answer
    cfg = preset_config(preset, "tiny", 64)
    torch.manual_seed(0)
    m = _perturbed(ElitDiT(cfg, backend="torch"))
    mb = copy.deepcopy(m).to(torch.bfloat16)
    mb.reset_buffers()
    assert any(b.dtype == torch.float32 for b in mb.buffers() if b.is_floating_point())
    x = _randn(2, 4, 8, 8, seed=4)
    t, y = torch.tensor([0.3, 0.8]), torch.tensor([1, 10])
    with torch.no_grad():
        got = mb(x.bfloat16(), t, y, [4, 1])
        ref = m(x, t, y, [4, 1])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.05)


def test_input_errors_say_what_was_given():
    m = ElitDiT(elit_config("tiny", 64))
    x, t, y = _randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"^x: expected \[B, 4, 8, 8\], got list$"):
        m(x.tolist(), t, y)
    with pytest.raises(ValueError, match=r"^x: expected \[B, 4, 8, 8\], got \(2, 4, 8\)$"):
        m(x[..., 0], t, y)
    with pytest.raises(ValueError, match=r"^y: expected class ids of shape \[2\] as an int64 or int32 tensor .*, got list$"):
        m(x, t, y.tolist())
    with pytest.raises(ValueError, match=r"^y: expected class ids of shape \[2\] as an int64 or int32 tensor .*, got torch.float32 \(2,\)$"):
        m(x, t, y.float())
    with pytest.raises(ValueError, match=r"^y: expected class ids of shape \[2\] as an int64 or int32 tensor .*, got torch.int64 \(1,\)$"):
        m(x, t, y[:1])
    with pytest.raises(ValueError, match=r"^y: .*convert others with y.long\(\)\), got torch.uint8 \(2,\)$"):
        m(x, t, y.to(torch.uint8))
    # a layout must live where x does: named as the layout, not as a cu_seqlens deep inside attention
    with pytest.raises(ValueError, match=r"^layout: built on device meta, but x is on cpu; build it with "
                                         r"model.layout\(budgets, 2, x.device\)$"):
        m(x, t, y, layout=m.layout([4, 1], 2, "meta"))


def test_class_id_range_check_is_the_value_check_switch():
    # reading y's values costs a host sync: set_value_checks(False) skips it, as for cu_seqlens
    from elit_kernels.attention import set_value_checks, value_checks_enabled

    m = ElitDiT(elit_config("tiny", 64))
    x, t, bad = _randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 11])
    assert value_checks_enabled()
    with pytest.raises(ValueError, match=r"^y: class ids must be in \[0, 10\]"):
        m(x, t, bad)
    set_value_checks(False)
    try:
        with pytest.raises(IndexError):  # unchecked: the embedding lookup is what fails
            m(x, t, bad)
    finally:
        set_value_checks(True)


@pytest.mark.parametrize("model", ["elit", "plain"])
def test_an_empty_batch_gives_an_empty_velocity(model):
    cfg = elit_config("tiny", 64)
    m = ElitDiT(cfg) if model == "elit" else PlainDiT(cfg)
    out = m(torch.empty(0, 4, 8, 8), torch.empty(0), torch.empty(0, dtype=torch.long))
    assert out.shape == (0, 4, 8, 8)


def test_plain_dit_gather_path_equals_the_run_path():
    # an elementwise implementation that takes a [T] token->sample index (as the compiled ones) is handed
    # the index of PlainDiT's one run; it must give the run-broadcast result
    from elit_kernels.models import ELEMENTWISE_IMPLS, ElementwiseImpl, get_elementwise, register_elementwise
    from elit_kernels.reference.modulate import gated_residual, layernorm_modulate

    register_elementwise("_test_plain_gather", ElementwiseImpl(
        lambda x, sh, sc, idx, eps: layernorm_modulate(x, sh, sc, idx, eps),  # eps passed, never defaulted
        lambda x, y, g, idx: gated_residual(x, y, g, idx), takes_runs=False))
    assert get_elementwise("_test_plain_gather").takes_runs  # wrapped: called with TokenRuns like the rest
    seen = []

    def checked_lm(x, sh, sc, runs, eps):  # the TokenRuns PlainDiT hands over describes x's rows
        seen.append((runs.total == x.shape[0], runs.batch == sh.shape[0], torch.device(runs.device) == x.device))
        return layernorm_modulate(x, sh, sc, runs, eps)

    register_elementwise("_test_plain_checked", ElementwiseImpl(checked_lm, gated_residual, takes_runs=True))
    cfg = elit_config("tiny", 64)
    torch.manual_seed(0)
    fast = _perturbed(PlainDiT(cfg, backend="torch"))
    slow = PlainDiT(cfg, backend="torch", elementwise="_test_plain_gather")
    slow.load_state_dict(fast.state_dict())
    x, t, y = _randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 10])
    try:
        with torch.no_grad():
            torch.testing.assert_close(slow(x, t, y), fast(x, t, y), rtol=1e-5, atol=1e-6)
            assert slow(x[:0], t[:0], y[:0]).shape == (0, 4, 8, 8)
            fast.elementwise = "_test_plain_checked"
            fast(x, t, y)
        assert seen and all(all(s) for s in seen), seen
    finally:
        ELEMENTWISE_IMPLS.pop("_test_plain_gather")
        ELEMENTWISE_IMPLS.pop("_test_plain_checked")
