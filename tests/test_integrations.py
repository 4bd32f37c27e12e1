"""elit_kernels behind transformers and diffusers, on tiny random models built from configs (no downloads).

Every model runs twice from the same weights: once with the library's own attention (transformers "eager",
diffusers' default processors / native dispatcher backend) and once through ``elit_kernels.integrations``;
outputs (fp32, <= 1e-5) and parameter gradients must agree. Backends are named explicitly (the registry's
CPU backends: "torch", and "cpp" where built): under TRITON_INTERPRET=1 default dispatch would pick the
interpreted Triton kernels.
"""
from __future__ import annotations

import copy
import warnings
import importlib.util
import re

import pytest
import torch

from cases import backend_params

HAS_TF = importlib.util.find_spec("transformers") is not None
HAS_DF = importlib.util.find_spec("diffusers") is not None
needs_tf = pytest.mark.skipif(not HAS_TF, reason='transformers is not installed: the optional extra `pip install -e ".[integrations]"`')
needs_df = pytest.mark.skipif(not HAS_DF, reason='diffusers is not installed: the optional extra `pip install -e ".[integrations]"`')

ATOL = 1e-5


def _runs_whole_models_on_cpu(b) -> bool:
    """The models here run on the CPU in fp32: the backends with CPU kernels of their own. Not the interpreted
    Triton kernels (minutes per model) and not the reference (it reads cu_seqlens on the host, which the
    fullgraph compile tests cannot trace; the library's own attention is the truth here)."""
    return b.devices in (None, ("cpu",)) and b.name != "reference"


BACKENDS = backend_params(keep=_runs_whole_models_on_cpu)


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(ref, ours, atol=ATOL):
    gr, go = _grads(ref), _grads(ours)
    assert gr.keys() == go.keys() and len(gr) > 0
    worst = max((gr[n] - go[n]).abs().max().item() for n in gr)
    assert worst <= atol, f"max parameter-gradient difference {worst:.3g} > {atol}"


# --------------------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------------------

def _tf_pair(kind: str, backend: str):
    """(eager model, elit model) with the same random weights; Llama: 4 query / 2 kv heads (GQA);
    Mistral: the same with a sliding window of 4."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from elit_kernels.integrations.transformers import register

    name = register(f"elit_{backend}", backend=backend)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    torch.manual_seed(0)
    if kind == "llama":
        ref = LlamaForCausalLM._from_config(LlamaConfig(**common), attn_implementation="eager")
    else:
        ref = MistralForCausalLM._from_config(MistralConfig(sliding_window=4, **common), attn_implementation="eager")
    ref.eval()
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation(name)
    assert ours.config._attn_implementation == name
    return ref, ours


def _ids(b, s, seed=1):
    return torch.randint(0, 101, (b, s), generator=torch.Generator().manual_seed(seed))


@needs_tf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_transformers_left_padded_outputs_and_grads(kind, backend):
    ref, ours = _tf_pair(kind, backend)
    ids = _ids(3, 10)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, :6] = 0
    valid = mask.bool()
    outs = []
    for m in (ref, ours):
        logits = m(ids, attention_mask=mask, use_cache=False).logits
        (logits[valid] * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        outs.append(logits.detach())
    assert (outs[0] - outs[1])[valid].abs().max() <= ATOL
    _assert_same_grads(ref, ours)


@needs_tf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_transformers_packed_position_ids(kind, backend):
    """Three sequences packed in one row (positions restart): equal to running each sequence alone."""
    ref, ours = _tf_pair(kind, backend)
    lens = [4, 7, 3]
    ids = _ids(1, sum(lens), seed=2)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    got = ours(ids, position_ids=pos, use_cache=False).logits
    parts, a = [], 0
    for n in lens:
        parts.append(ref(ids[:, a:a + n], use_cache=False).logits)
        a += n
    want = torch.cat(parts, 1)
    assert (got - want).abs().max() <= ATOL
    # transformers' own packed mask (eager, no cache) agrees too, gradients included
    r = ref(ids, position_ids=pos, use_cache=False).logits
    assert (r - got).abs().max() <= ATOL
    r.square().mean().backward()
    got.square().mean().backward()
    _assert_same_grads(ref, ours)


@needs_tf
@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_packed_position_ids_under_compile(backend):
    """Compiled (fullgraph): the packing is still read from position_ids (on the device, no host read), never
    one dense causal call across the packed sequences."""
    import torch._dynamo

    ref, ours = _tf_pair("llama", backend)
    lens = [4, 7, 3]
    ids = _ids(1, sum(lens), seed=2)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    want = torch.cat([ref(ids[:, a:a + n], use_cache=False).logits for a, n in zip((0, 4, 11), lens)], 1)
    torch._dynamo.reset()
    f = torch.compile(lambda i, p: ours(i, position_ids=p, use_cache=False).logits, fullgraph=True,
                      backend="aot_eager")
    got = f(ids, pos)
    assert (got - want).abs().max() <= ATOL
    # one unpacked row (positions 0..n-1) through the same compiled graph path: plain causal attention
    plain = torch.arange(sum(lens))[None]
    assert (f(ids, plain) - ref(ids, use_cache=False).logits).abs().max() <= ATOL


@needs_tf
@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_packing_and_padding_mask_together(backend):
    """Packed position_ids and a 2-D padding mask (padding at the start of the second sequence and at the end of
    the third): each sequence attends only to its own valid tokens, as when run alone with its own mask."""
    ref, ours = _tf_pair("llama", backend)
    lens, starts = [4, 7, 3], (0, 4, 11)
    ids = _ids(2, sum(lens), seed=6)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    mask = torch.ones(2, sum(lens), dtype=torch.long)
    mask[0, 4:6] = 0
    mask[1, 13:] = 0
    mask[1, 0] = 0
    got = ours(ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
    for a, n in zip(starts, lens):
        m = mask[:, a:a + n]
        want = ref(ids[:, a:a + n], position_ids=pos[:, a:a + n], attention_mask=m, use_cache=False).logits
        err = (got[:, a:a + n] - want)[m.bool()].abs().max()
        assert err <= ATOL, f"sequence at {a}: max abs err {err:.3g}"


@needs_tf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tgt_len", [6, 4], ids=["same_length", "shorter"])
def test_transformers_cross_attention_right_padded_encoder_mask(backend, tgt_len):
    """Bart: the encoder mask (right padding) is a key mask for the decoder's cross-attention; every decoder
    query is computed, whether or not the decoder length equals the encoder's."""
    from transformers import BartConfig, BartForConditionalGeneration

    from elit_kernels.integrations.transformers import register

    cfg = BartConfig(vocab_size=101, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = BartForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation(register(f"elit_{backend}", backend=backend))
    src, tgt = _ids(2, 6, seed=7), _ids(2, tgt_len, seed=8)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 3:] = 0
    outs = []
    for m in (ref, ours):
        logits = m(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, use_cache=False).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        outs.append(logits.detach())
    assert (outs[0] - outs[1]).abs().max() <= ATOL
    _assert_same_grads(ref, ours)


@needs_tf
@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_packed_cu_seqlens_kwargs(backend):
    """DataCollatorWithFlattening-style kwargs: cu_seq_lens_* int32 and max_length_* as 0-dim tensors."""
    ref, ours = _tf_pair("llama", backend)
    lens = [5, 2, 6]
    ids = _ids(1, sum(lens), seed=3)
    cu = torch.tensor([0, 5, 7, 13], dtype=torch.int32)
    mx = torch.tensor(6, dtype=torch.int32)
    got = ours(ids, position_ids=torch.cat([torch.arange(n) for n in lens])[None], use_cache=False,
               cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=mx, max_length_k=mx).logits
    want = torch.cat([ref(ids[:, a:b], use_cache=False).logits for a, b in ((0, 5), (5, 7), (7, 13))], 1)
    assert (got - want).abs().max() <= ATOL


@needs_tf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_transformers_kv_cache_decoding(kind, backend):
    """Left-padded prefill, then three cached decoding steps (keys longer than queries)."""
    ref, ours = _tf_pair(kind, backend)
    ids = _ids(2, 7, seed=4)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        states = [m(ids, attention_mask=mask, use_cache=True) for m in (ref, ours)]
        for step in range(3):
            nxt = _ids(2, 1, seed=10 + step)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            states = [m(nxt, attention_mask=mask, cache=s.past_key_values, use_cache=True)
                      for m, s in zip((ref, ours), states)]
            assert (states[0].logits - states[1].logits).abs().max() <= ATOL


@needs_tf
@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "left-padded"])
def test_transformers_static_cache_prefill_and_decoding(kind, padded):
    """A StaticCache holds more key slots than tokens written: the queries are the last keys written, not the last
    slots, and the empty slots are never attended (with or without an attention_mask)."""
    from transformers import StaticCache

    ref, ours = _tf_pair(kind, "torch")
    ids = _ids(2, 5, seed=6)
    mask = torch.ones(2, 5, dtype=torch.long)
    if padded:
        mask[0, :2] = 0
    caches = [StaticCache(config=m.config, max_cache_len=12) for m in (ref, ours)]
    with torch.no_grad():
        outs = [m(ids, attention_mask=mask if padded else None, past_key_values=c, use_cache=True)
                for m, c in zip((ref, ours), caches)]
        valid = mask.bool()  # padding queries' outputs are not defined
        assert (outs[0].logits - outs[1].logits)[valid].abs().max() <= ATOL
        for step in range(3):
            nxt = _ids(2, 1, seed=20 + step)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            pos = torch.tensor([5 + step])
            outs = [m(nxt, attention_mask=mask if padded else None, past_key_values=c, use_cache=True,
                      cache_position=pos) for m, c in zip((ref, ours), caches)]
            assert (outs[0].logits - outs[1].logits).abs().max() <= ATOL, step


@needs_tf
def test_transformers_gqa_runs_without_repeating_kv(monkeypatch):
    """k/v reach elit_kernels with the model's 2 kv heads, not repeated to 4."""
    import elit_kernels.integrations.transformers as T

    ref, ours = _tf_pair("llama", "torch")
    seen = []
    real = T.flash_attn_func

    def spy(q, k, v, **kw):
        seen.append((q.shape[2], k.shape[2]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(T, "flash_attn_func", spy)
    ours(_ids(2, 5), use_cache=False)
    assert seen and all(s == (4, 2) for s in seen)


@needs_tf
def test_transformers_mistral_window_matters():
    """The sliding window changes the result (10 tokens, window 4): ours follows it, not full causal."""
    ref, ours = _tf_pair("mistral", "torch")
    ids = _ids(1, 10, seed=5)
    full = copy.deepcopy(ref)
    full.config.sliding_window = None
    a = ours(ids, use_cache=False).logits
    assert (a - ref(ids, use_cache=False).logits).abs().max() <= ATOL
    assert (a - full(ids, use_cache=False).logits).abs().max() > 1e-3


@needs_tf
def test_transformers_clear_errors():
    from elit_kernels.integrations.transformers import elit_attention_forward, elit_attention_mask, register

    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(1, 4, 3, 8)
    kv = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="^backend: unknown backend 'bogus'"):
        register(backend="bogus")
    with pytest.raises(NotImplementedError, match="^s_aux: "):
        elit_attention_forward(module, q, kv, kv, None, s_aux=torch.zeros(4), elit_backend="torch")
    with pytest.raises(NotImplementedError, match="^dropout_p: "):
        elit_attention_forward(module, q, kv, kv, None, dropout=0.1, elit_backend="torch")
    with pytest.raises(TypeError, match="^attention_mask: expected None or a 2-D boolean key mask"):
        elit_attention_forward(module, q, kv, kv, torch.zeros(1, 1, 3, 3), elit_backend="torch")
    with pytest.raises(NotImplementedError, match="^mask_function: "):
        elit_attention_mask(1, 3, 3, attention_mask=None, use_vmap=True)
    with pytest.raises(TypeError, match="^name: "):
        register("")


@needs_tf
@pytest.mark.parametrize("name", ["sdpa", "flash_attention_2", "eager", "flex_attention", "paged|sdpa"])
def test_transformers_register_refuses_to_replace_a_builtin(name):
    # transformers' registry is process-wide: registering under "sdpa" would silently move every model of the
    # process (ones that never asked for ours) onto our attention. Refused by name unless asked for explicitly.
    import transformers

    from elit_kernels.integrations.transformers import register

    before = (dict(transformers.AttentionInterface._global_mapping),
              dict(transformers.AttentionMaskInterface._global_mapping))
    with pytest.raises(ValueError, match=rf"^name: '{re.escape(name)}' is transformers' own attention implementation; "
                                         r".*replace_builtin=True.*sdpa"):
        register(name)
    with pytest.raises(TypeError, match="^replace_builtin: expected a bool"):
        register("elit_x", replace_builtin="yes")
    after = (dict(transformers.AttentionInterface._global_mapping),
             dict(transformers.AttentionMaskInterface._global_mapping))
    assert after == before  # nothing was registered
    if name == "sdpa":  # asked for explicitly: done, then put back for the rest of the process
        try:
            assert register("sdpa", replace_builtin=True) == "sdpa"
            assert transformers.AttentionInterface._global_mapping["sdpa"] is not before[0]["sdpa"]
        finally:
            transformers.AttentionInterface._global_mapping["sdpa"] = before[0]["sdpa"]
            transformers.AttentionMaskInterface._global_mapping["sdpa"] = before[1]["sdpa"]


# --------------------------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------------------------

def _df_models():
    """name -> (model factory, inputs factory) for tiny random diffusers models (fp32, batch 2)."""
    from diffusers import (DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel,
                           QwenImageTransformer2DModel, SD3Transformer2DModel)

    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return {
        "flux": (lambda: FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                                pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
                 lambda: dict(hidden_states=r(2, 16, 4), encoder_hidden_states=r(2, 5, 32),
                              pooled_projections=r(2, 32), timestep=torch.tensor([0.3, 0.8]), img_ids=r(16, 3),
                              txt_ids=r(5, 3))),
        # text mask with the padding first in sample 0: valid keys are not a prefix
        "qwenimage": (lambda: QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                                          attention_head_dim=16, num_attention_heads=2,
                                                          joint_attention_dim=16, axes_dims_rope=(4, 6, 6)),
                      lambda: dict(hidden_states=r(2, 16, 16), encoder_hidden_states=r(2, 5, 16),
                                   encoder_hidden_states_mask=torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1]]),
                                   timestep=torch.tensor([0.3, 0.8]), img_shapes=[(1, 4, 4)] * 2)),
        "dit": (lambda: DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                              out_channels=8, num_layers=1, sample_size=8, patch_size=2,
                                              num_embeds_ada_norm=10),
                lambda: dict(hidden_states=r(2, 4, 8, 8), timestep=torch.tensor([3, 7]),
                             class_labels=torch.tensor([1, 2]))),
        "pixart": (lambda: PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                    out_channels=8, num_layers=1, cross_attention_dim=16,
                                                    caption_channels=12, sample_size=8, patch_size=2),
                   lambda: dict(hidden_states=r(2, 4, 8, 8), encoder_hidden_states=r(2, 5, 12),
                                encoder_attention_mask=torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1]]),
                                timestep=torch.tensor([3, 7]), added_cond_kwargs={"resolution": None,
                                                                                  "aspect_ratio": None})),
        "sd3": (lambda: SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                              caption_projection_dim=16, pooled_projection_dim=16, out_channels=4),
                lambda: dict(hidden_states=r(2, 4, 8, 8), encoder_hidden_states=r(2, 5, 16),
                             pooled_projections=r(2, 16), timestep=torch.tensor([0.3, 0.8]))),
    }


ROUTE = {"flux": "dispatcher", "qwenimage": "dispatcher", "dit": "processor", "pixart": "processor", "sd3": "processor"}


@needs_df
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(ROUTE))
def test_diffusers_models_outputs_and_grads(name, backend, monkeypatch):
    import elit_kernels.integrations.diffusers as D

    make_model, make_inputs = _df_models()[name]
    torch.manual_seed(0)
    ref = make_model().eval()
    ours = copy.deepcopy(ref)
    report = D.use_elit(ours, backend=backend)
    assert report[ROUTE[name]] > 0 and report["unchanged"] == []
    calls = []
    real = D.attention_bshd
    monkeypatch.setattr(D, "attention_bshd", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = make_inputs()
    outs = []
    for m in (ref, ours):
        out = m(**inputs).sample
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outs.append(out.detach())
    assert calls, "the model did not run through elit_kernels"
    assert (outs[0] - outs[1]).abs().max() <= ATOL
    _assert_same_grads(ref, ours)


@needs_df
@pytest.mark.parametrize("backend", BACKENDS)
def test_diffusers_masked_prefix_not_first(backend):
    """Sq = 1, Sk = 2, mask [[False, True]]: only the second key counts (diffusers' flash_varlen backend
    assumes valid keys come first and would attend to the first one)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    from elit_kernels.integrations.diffusers import register

    member = register(backend)
    q, k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8)
    out = dispatch_attention_fn(q, k, v, attn_mask=torch.tensor([[False, True]]), backend=member)
    torch.testing.assert_close(out, v[:, 1:], atol=1e-6, rtol=0)
    # a 4-D mask that varies per sample, against SDPA with the same mask
    q, k, v = torch.randn(2, 3, 2, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    mask = torch.tensor([[True, False, True, False, False, True], [False, False, False, True, True, True]])
    got = dispatch_attention_fn(q, k, v, attn_mask=mask[:, None, None, :], backend=member)
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            attn_mask=mask[:, None, None, :]).transpose(1, 2)
    assert (got - want).abs().max() <= ATOL


@needs_df
def test_diffusers_backend_name_and_clear_errors():
    from diffusers.models.attention_dispatch import AttentionBackendName, attention_backend, dispatch_attention_fn

    from elit_kernels.integrations.diffusers import elit_dispatch_attention, key_mask, register, use_elit

    member = register("torch")
    assert AttentionBackendName("elit") is member and member.value == "elit"
    q = torch.randn(1, 3, 2, 8)
    with attention_backend("elit"):  # diffusers' public context manager accepts the new name
        out = dispatch_attention_fn(q, q, q)
    torch.testing.assert_close(out, elit_dispatch_attention(q, q, q, elit_backend="reference"), atol=1e-6, rtol=0)
    with pytest.raises(NotImplementedError, match="^attn_mask: masks that differ between queries"):
        key_mask(torch.tensor([[[True, False], [False, True]]]), 1, 2, 2, 2)
    with pytest.raises(NotImplementedError, match="^attn_mask: additive biases"):
        key_mask(torch.tensor([[0.0, -1.5]]), 1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"^attn_mask: shape \(1, 3\) does not broadcast"):
        key_mask(torch.ones(1, 3, dtype=torch.bool), 1, 1, 2, 2)
    with pytest.raises(NotImplementedError, match="^_parallel_config: "):
        elit_dispatch_attention(q, q, q, _parallel_config=object())
    with pytest.raises(NotImplementedError, match="^dropout_p: "):
        elit_dispatch_attention(q, q, q, dropout_p=0.1)
    with pytest.raises(TypeError, match="^model: "):
        use_elit("not a model")
    # a backend name is checked when it is bound, not at the first forward
    with pytest.raises(ValueError, match="^backend: unknown backend 'bogus'; known backends: "):
        register("bogus")
    with pytest.raises(TypeError, match="^backend: expected a str or None, got float"):
        use_elit(torch.nn.Linear(2, 2), backend=3.5)
    # the dispatcher entry is one per process: binding it to another backend says so
    with pytest.warns(UserWarning, match="ran elit_kernels backend 'torch'; it now runs 'reference' for every model"):
        register("reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register("reference")  # the same backend again: nothing changes, nothing said


@needs_df
def test_diffusers_moved_private_names_fail_clearly(monkeypatch):
    from diffusers.models import attention_dispatch as ad

    from elit_kernels.integrations.diffusers import register

    monkeypatch.delattr(ad, "_AttentionBackendRegistry")
    with pytest.raises(ImportError, match=r"supports diffusers 0\.42\.x .* no diffusers\.models\.attention_dispatch"
                                          r"\._AttentionBackendRegistry"):
        register()
