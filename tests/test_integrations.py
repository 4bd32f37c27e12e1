"""elit_kernels behind transformers and diffusers, on tiny random models built from configs (no downloads).

Every model runs twice from the same weights: once with the library's own attention (transformers "eager",
diffusers' default processors / native dispatcher backend) and once through ``elit_kernels.integrations``;
outputs (fp32, <= 1e-5) and parameter gradients must agree. Backends are named explicitly ("torch", and
"cpp" where built): under TRITON_INTERPRET=1 default dispatch would pick the interpreted Triton kernels.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import elit_kernels
from elit_kernels.backends import get_backend

HAS_TF = importlib.util.find_spec("transformers") is not None
HAS_DF = importlib.util.find_spec("diffusers") is not None
needs_tf = pytest.mark.skipif(not HAS_TF, reason="transformers is not importable (pip install -r requirements.txt)")
needs_df = pytest.mark.skipif(not HAS_DF, reason="diffusers is not importable (pip install -r requirements.txt)")

ATOL = 1e-5


def _backends():
    out = ["torch"]
    if "cpp" in elit_kernels.known_backends() and get_backend("cpp").is_available():
        out.append("cpp")
    else:
        out.append(pytest.param("cpp", marks=pytest.mark.skip(reason="cpp: elit_kernels._C not built")))
    return out


BACKENDS = _backends()


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

