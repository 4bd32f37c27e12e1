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
# the install command as the README gives it: without --no-build-isolation the build cannot import torch (a new
# user ran the one these reasons once named, and it failed)
_EXTRA = '`pip install --no-build-isolation -e ".[integrations]"`'
needs_tf = pytest.mark.skipif(not HAS_TF, reason=f"transformers is not installed: the optional extra {_EXTRA}")
needs_df = pytest.mark.skipif(not HAS_DF, reason=f"diffusers is not installed: the optional extra {_EXTRA}")

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
    """Packed position_ids with a 2-D padding mask: transformers reads no packing then (sdpa, eager and its
    flash-attention path alike), and neither does elit: equal to eager on every valid row. (An earlier version split
    the sequences here, and a padding slot's position read as a restart cut tokens off from those before a hole.)"""
    ref, ours = _tf_pair("llama", backend)
    lens = [4, 7, 3]
    ids = _ids(2, sum(lens), seed=6)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    mask = torch.ones(2, sum(lens), dtype=torch.long)
    mask[0, 4:6] = 0
    mask[1, 13:] = 0
    mask[1, 0] = 0
    got = ours(ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
    want = ref(ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
    assert (got - want)[mask.bool()].abs().max() <= ATOL


@needs_tf
@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_hole_with_generate_style_position_ids(backend):
    """generate() gives a padding slot position 1 (cumsum - 1, masked_fill 1): [0, 1, 1, 2, 3, 4] for the mask
    [1, 1, 0, 1, 1, 1]. The pad slot's position is not a restart: the tokens after the hole see those before it, as
    in transformers' own attention (it found 0.17 of logit error before restarts were read over valid tokens)."""
    ref, ours = _tf_pair("llama", backend)
    ids = _ids(2, 6, seed=9)
    am = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 1, 1, 0, 0, 1]])
    pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)
    want = ref(ids, attention_mask=am, position_ids=pos, use_cache=False).logits
    got = ours(ids, attention_mask=am, position_ids=pos, use_cache=False).logits
    assert (got - want)[am.bool()].abs().max() <= ATOL


@needs_tf
def test_transformers_masks_elit_cannot_express_are_refused():
    """A bidirectional block over a causal mask (block_sequence_ids, as PaliGemma's image tokens: transformers adds it
    without use_vmap) and chunked attention past its first chunk raise NotImplementedError naming mask_function; the
    plain causal, padded and bidirectional masks do not."""
    from transformers import LlamaConfig
    from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
    from elit_kernels.integrations.transformers import register

    name = register("elit_masks", backend="torch")
    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=101)
    cfg._attn_implementation = name
    emb, ones = torch.randn(1, 6, 32), torch.ones(1, 6, dtype=torch.long)
    kw = dict(config=cfg, inputs_embeds=emb, attention_mask=ones, position_ids=None, cache=None)
    with pytest.raises(NotImplementedError, match="^mask_function: some queries may see the key after them"):
        create_causal_mask(**kw, block_sequence_ids=torch.tensor([[-1, 0, 0, 0, -1, -1]]))
    assert create_causal_mask(**kw) is None
    padded = torch.tensor([[0, 1, 1, 1, 1, 1]])
    assert torch.equal(create_causal_mask(**{**kw, "attention_mask": padded}), padded.bool())
    assert create_bidirectional_mask(config=cfg, inputs_embeds=emb, attention_mask=ones) is None
    # chunked attention (Llama 4's local layers) past its first chunk; the same model's full-attention layers and
    # inputs within one chunk run
    from transformers.masking_utils import create_chunked_causal_mask

    cfg.attention_chunk_size = 4
    with pytest.raises(NotImplementedError, match="^mask_function: the model attends in chunks of attention_chunk_size=4"):
        create_chunked_causal_mask(**kw)
    assert create_causal_mask(**kw) is None
    assert create_chunked_causal_mask(**{**kw, "inputs_embeds": emb[:, :3], "attention_mask": ones[:, :3]}) is None


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
    q2, kv2 = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)
    with pytest.raises(ValueError, match="^attention_mask: has 1 rows for a batch of 2"):
        elit_attention_forward(module, q2, kv2, kv2, torch.ones(1, 3, dtype=torch.bool), elit_backend="torch")
    for bad in (-1, 2.5, "4"):
        with pytest.raises(ValueError, match="^sliding_window: expected None or an int >= 1"):
            elit_attention_forward(module, q, kv, kv, None, sliding_window=bad, elit_backend="torch")
    with pytest.raises(ValueError, match="^name: '' cannot be registered: it is empty"):
        register("")
    with pytest.raises(TypeError, match="^name: expected a str, got int"):
        register(3)


@needs_tf
@pytest.mark.parametrize("name", ["sdpa", "flash_attention_2", "eager", "flex_attention", "paged|eager"])
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


@needs_tf
@pytest.mark.parametrize("name, why", [
    ("paged|elit", "transformers strips the 'paged|' prefix"), ("paged|sdpa", "transformers strips the 'paged|'"),
    (" elit", "it is not a plain identifier"), ("elit ", "it is not a plain identifier"),
    ("elit|x", "it is not a plain identifier"), ("org/elit", "transformers loads names of the form 'org/repo"),
    ("org/elit:fn", "transformers loads names"), ("1elit", "it is not a plain identifier"),
    ("elit_flash", "contains 'flash'"), ("my_sdpa", "contains 'sdpa'"), ("elit_flex_attention", "contains 'flex"),
])
def test_transformers_register_names_transformers_reads_differently(name, why):
    """A name transformers would not look up as typed (it strips 'paged|', loads 'org/repo' from the Hub, routes
    'flash' / 'sdpa' / 'flex_attention' names through its own checks) is refused, saying which names work; a
    plain one (letters, digits, '_', '-') is registered as it is."""
    import transformers

    from elit_kernels.integrations.transformers import register

    before = dict(transformers.AttentionInterface._global_mapping)
    with pytest.raises(ValueError, match=rf"^name: '{re.escape(name)}' .*{re.escape(why)}.*Allowed: an ASCII letter "
                                         r"followed by letters, digits, '_' or '-'"):
        register(name)
    assert dict(transformers.AttentionInterface._global_mapping) == before
    for ok in ("elit-test_2", "E"):
        assert register(ok) == ok and ok in transformers.AttentionInterface._global_mapping


def _window_sets_differ(key_ok, first_q, left, right) -> bool:
    """Brute force: does any valid query (key positions >= first_q) see another set of keys when the window is
    counted over the gathered valid tokens of its row than when it is counted over positions?"""
    for row in key_ok.tolist():
        for p, ok in enumerate(row):
            if not ok or p < first_q:
                continue
            same = [j for j in range(len(row)) if row[j]]
            i = same.index(p)
            lo, hi = (0 if left < 0 else max(0, i - left)), (len(same) if right < 0 else i + right + 1)
            gathered = set(same[lo:hi])
            by_pos = {j for j in same if (left < 0 or j >= p - left) and (right < 0 or j <= p + right)}
            if gathered != by_pos:
                return True
    return False


@needs_tf
def test_transformers_window_hole_check_matches_brute_force():
    """The exact hole check (refuse only when a query's packed window would hold other keys than its positional
    one) against a brute-force set comparison, on random masks with holes, causal and two-sided windows and
    cached queries; both outcomes occur."""
    from elit_kernels.integrations.transformers import _check_window_holes

    g = torch.Generator().manual_seed(11)
    outcomes = set()
    for trial in range(300):
        b, s = 3, int(torch.randint(4, 14, (1,), generator=g))
        key_ok = torch.rand(b, s, generator=g) > torch.rand(1, generator=g).item() * 0.6
        w = int(torch.randint(1, 6, (1,), generator=g))
        right = 0 if trial % 2 else w - 1
        first_q = int(torch.randint(0, s, (1,), generator=g))
        want = _window_sets_differ(key_ok, first_q, w - 1, right)
        outcomes.add(want)
        try:
            _check_window_holes(key_ok, first_q, s, w - 1, right, w)
            got = False
        except ValueError as e:
            msg = str(e)
            assert msg.startswith("attention_mask: padding between the valid tokens") and f"sliding_window={w}" in msg
            got = True
        assert got == want, (key_ok, first_q, w, right)
    assert outcomes == {True, False}


@needs_tf
@pytest.mark.parametrize("backend", BACKENDS)
def test_transformers_window_with_padding_holes(backend):
    """Mistral (window 4) with holes in the padding mask: a hole a query's window reaches past is refused with a
    ValueError naming attention_mask (the packed window would count valid tokens, not positions); holes the
    window does not reach past, and holes without a window (Llama), match eager on every valid row."""
    ref, ours = _tf_pair("mistral", backend)
    ids = _ids(2, 10, seed=12)
    bad = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1, 0, 1], [1] * 10])
    with pytest.raises(ValueError, match=r"^attention_mask: padding between the valid tokens of a sequence \(a hole\) "
                                         r"inside a query's sliding window \(sliding_window=4\).*left and/or right"):
        ours(ids, attention_mask=bad, use_cache=False)
    fine = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1, 0, 1, 1]])
    outs = [m(ids, attention_mask=fine, use_cache=False).logits for m in (ref, ours)]
    assert (outs[0] - outs[1])[fine.bool()].abs().max() <= ATOL
    ref, ours = _tf_pair("llama", backend)  # no window: holes anywhere
    outs = [m(ids, attention_mask=bad, use_cache=False).logits for m in (ref, ours)]
    assert (outs[0] - outs[1])[bad.bool()].abs().max() <= ATOL


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
    with pytest.raises(TypeError, match="^is_causal: expected a bool"):  # a truthy "False" turned causal on
        elit_dispatch_attention(q, q, q, is_causal="False")
    # a sample whose keys are all masked gets zeros, additive or boolean (SDPA's answer there depends on how it
    # rounds the shared bias: ordinary attention for -1e4, a plain mean for finfo.min)
    for m in (torch.tensor([[0.0, -1e4], [-1e4, -1e4]]), torch.tensor([[True, False], [False, False]])):
        assert torch.equal(key_mask(m, 2, 1, 2, 1), torch.tensor([[True, False], [False, False]]))
        out = elit_dispatch_attention(torch.randn(2, 1, 1, 8), torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8), m,
                                      elit_backend="torch")
        assert torch.equal(out[1], torch.zeros_like(out[1]))
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


@needs_df
def test_diffusers_use_elit_again_rebinds_the_processors(monkeypatch):
    """A second use_elit with another backend rebinds the processors it put in (they then run the new backend),
    reports them as rebound and says so; the same backend again changes nothing and says nothing."""
    import elit_kernels.integrations.diffusers as D

    make_model, make_inputs = _df_models()["dit"]
    torch.manual_seed(0)
    ref = make_model().eval()
    ours = copy.deepcopy(ref)
    assert D.use_elit(ours, backend="torch")["processor"] > 0
    with pytest.warns(UserWarning, match=r"^use_elit: \d+ elit attention processors ran elit_kernels backend\(s\) "
                                         r"'torch'; they now run 'reference'"):
        report = D.use_elit(ours, backend="reference")
    assert report["rebound"] == report["processor"] > 0 and report["unchanged"] == []
    seen = []
    real = D.flash_attn_func
    monkeypatch.setattr(D, "flash_attn_func", lambda *a, **k: seen.append(k.get("backend")) or real(*a, **k))
    inputs = make_inputs()
    got = ours(**inputs).sample
    assert seen and set(seen) == {"reference"}
    assert (got - ref(**inputs).sample).abs().max() <= ATOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = D.use_elit(ours, backend="reference")
    assert again["rebound"] == 0 and again["processor"] == report["processor"]


def _mask_forms(batch, heads, sq, sk, g):
    """name -> mask (True / 0.0 = attend) in every layout AttnProcessor2_0 accepts, from one random key mask with
    at least one valid key per sample."""
    ok = torch.rand(batch, sk, generator=g) > 0.4
    ok[:, int(torch.randint(0, sk, (1,), generator=g))] = True
    add = torch.zeros(batch, sk).masked_fill(~ok, -10000.0)
    return {"bool [B, S_k]": ok, "additive [B, S_k]": add, "additive [B, 1, S_k]": add[:, None],
            "bool [B, 1, S_k]": ok[:, None], "additive [B, S_q, S_k]": add[:, None].expand(batch, sq, sk).clone(),
            "additive [B*H, 1, S_k]": add.repeat_interleave(heads, 0)[:, None],
            "finfo.min [B*H, S_q, S_k]": torch.zeros(batch * heads, sq, sk).masked_fill(
                ~ok.repeat_interleave(heads, 0)[:, None], torch.finfo(torch.float32).min)}


@needs_df
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_diffusers_processor_accepts_every_mask_form(backend, cross):
    """ElitAttnProcessor takes every attention_mask layout AttnProcessor2_0 takes (it prepares them with
    attn.prepare_attention_mask as diffusers does, [batch * heads, 1, S_k] included), with the same outputs and
    input gradients."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from elit_kernels.integrations.diffusers import ElitAttnProcessor

    g = torch.Generator().manual_seed(21)
    torch.manual_seed(3)
    ref = Attention(query_dim=16, heads=2, dim_head=8, cross_attention_dim=12 if cross else None).eval()
    ref.set_processor(AttnProcessor2_0())
    ours = copy.deepcopy(ref)
    ours.set_processor(ElitAttnProcessor(backend))
    x = torch.randn(2, 6, 16, generator=g)
    ctx = torch.randn(2, 5, 12, generator=g) if cross else None
    sk = 5 if cross else 6
    for name, mask in _mask_forms(2, 2, 6, sk, g).items():
        outs = []
        for m in (ref, ours):
            xi = x.clone().requires_grad_()
            out = m(xi, encoder_hidden_states=ctx, attention_mask=mask)
            (out * torch.linspace(-1, 1, 16)).sum().backward()
            outs.append((out.detach(), xi.grad))
        assert (outs[0][0] - outs[1][0]).abs().max() <= ATOL, name
        assert (outs[0][1] - outs[1][1]).abs().max() <= ATOL, name


@needs_df
def test_diffusers_processor_applies_the_declared_scale():
    """Attention(scale_qk=False) (attn.scale = 1.0, T5FilmDecoder): ElitAttnProcessor applies attn.scale, as
    AttnProcessor (diffusers' choice for such modules) does; AttnProcessor2_0, if set by hand, ignores it, so
    use_elit says the outputs change. With the default scale all three agree."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    from elit_kernels.integrations.diffusers import use_elit

    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(5))
    for scale_qk in (False, True):
        torch.manual_seed(4)
        sdpa = Attention(query_dim=16, heads=2, dim_head=8, scale_qk=scale_qk).eval()
        sdpa.set_processor(AttnProcessor2_0())
        classic = copy.deepcopy(sdpa)
        classic.set_processor(AttnProcessor())
        ours = copy.deepcopy(sdpa)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert use_elit(ours, backend="torch")["processor"] == 1
        said = [str(w.message) for w in caught if "attn.scale" in str(w.message)]
        with torch.no_grad():
            got, want, sdpa_out = ours(x), classic(x), sdpa(x)
        assert (got - want).abs().max() <= ATOL
        if scale_qk:
            assert not said and (got - sdpa_out).abs().max() <= ATOL
        else:
            assert said and said[0].startswith("use_elit: 1 AttnProcessor2_0 processors were on attentions whose "
                                               "attn.scale is not head_dim**-0.5")
            assert (got - sdpa_out).abs().max() > 1e-2  # the declared scale, not SDPA's default


@needs_df
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sq, sk", [(3, 5), (5, 3), (4, 4), (1, 6), (6, 1)])
def test_diffusers_dispatcher_causal_matches_native(backend, sq, sk):
    """is_causal through the "elit" dispatcher backend is what diffusers' "native" backend (SDPA, top-left
    aligned) computes, also when S_q != S_k; outputs and q/k/v gradients. A mask with is_causal is refused as
    native refuses it."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    from elit_kernels.integrations.diffusers import register

    member = register(backend)
    g = torch.Generator().manual_seed(sq * 10 + sk)
    base = [torch.randn(2, n, 2, 8, generator=g) for n in (sq, sk, sk)]
    outs = []
    for which in ("native", member):
        q, k, v = (t.clone().requires_grad_() for t in base)
        out = dispatch_attention_fn(q, k, v, is_causal=True, backend=which)
        (out * torch.linspace(-1, 1, 8)).sum().backward()
        outs.append((out.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*outs):
        assert (a - b).abs().max() <= ATOL
    with pytest.raises(ValueError, match="^is_causal: True together with attn_mask is not supported"):
        dispatch_attention_fn(*base, attn_mask=torch.ones(2, sk, dtype=torch.bool), is_causal=True, backend=member)


@needs_tf
def test_transformers_deterministic_as_transformers_reads_it(monkeypatch):
    """transformers' flash-attention path asks for a deterministic backward through a ``deterministic`` kwarg or,
    unset, ``$FLASH_ATTENTION_DETERMINISTIC == "1"`` (enable_full_determinism sets it); ours reads both the same
    way. A registered CPU spy that declares no deterministic backward, first in default dispatch, shows which ran."""
    from elit_kernels.attention import dispatch as D
    from elit_kernels.attention import registry as R
    from elit_kernels.integrations.transformers import elit_attention_forward

    class Atomic(R.Backend):
        name, priority, known_answer, devices = "_atomic_tf", 10_000, False, ("cpu",)
        calls = 0

        def forward(self, inp):
            Atomic.calls += 1
            return R.get_backend("reference").forward(inp)
    R.register_backend(Atomic())
    D.clear_decisions()
    module = torch.nn.Module()
    module.is_causal = True
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 5, 8, generator=g, requires_grad=True)
    kv = torch.randn(2, 2, 5, 8, generator=g)
    want = elit_attention_forward(module, q, kv, kv, None, elit_backend="reference")[0]
    monkeypatch.delenv("FLASH_ATTENTION_DETERMINISTIC", raising=False)
    for env, kw, spy_runs in ((None, {}, True), ("1", {}, False), ("0", {}, True), (None, {"deterministic": True}, False),
                              ("1", {"deterministic": False}, True)):
        if env is None:
            monkeypatch.delenv("FLASH_ATTENTION_DETERMINISTIC", raising=False)
        else:
            monkeypatch.setenv("FLASH_ATTENTION_DETERMINISTIC", env)
        before = Atomic.calls
        out = elit_attention_forward(module, q, kv, kv, None, **kw)[0]
        torch.testing.assert_close(out, want)
        assert (Atomic.calls > before) == spy_runs, (env, kw)


@needs_tf
def test_transformers_under_autocast_runs_as_its_flash_attention_path():
    """A fuzz: under autocast, Llama's RoPE left q/k in fp32 while v came from the projection in bf16, and elit
    attention refused the mixed dtypes (TypeError naming v): every autocast forward failed. As transformers' own
    flash-attention path does, fp32 q/k/v run in the autocast dtype; the logits match the sdpa implementation's."""
    ref, ours = _tf_pair("llama", "torch")
    ref.set_attn_implementation("sdpa")
    ids = _ids(3, 10)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :3] = 0
    outs = []
    for m in (ref, ours):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(m(ids, attention_mask=mask, use_cache=False).logits)
    assert outs[0].dtype == outs[1].dtype
    valid = mask.bool()
    assert (outs[0].float() - outs[1].float())[valid].abs().max() <= 2e-2
    # any of q/k/v in fp32 runs in the autocast dtype (sdpa's inputs are all cast): mixed dtypes are not refused
    from elit_kernels.integrations.transformers import elit_attention_forward

    module = ours.model.layers[0].self_attn
    x = [torch.randn(2, 4, 5, 8) for _ in range(3)]
    for fp32 in range(3):
        qkv = [t.to(torch.float32 if i == fp32 else torch.bfloat16) for i, t in enumerate(x)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = elit_attention_forward(module, *qkv, None, is_causal=True)
        assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 4, 8)
