"""transformers drop-in (docs/transformers.md): a tiny random DeepseekV32ForCausalLM, built in code (no download),
run through register() and absorb_mla() on every CPU-testable backend, against HF's own eager path.

The model is deliberately tiny (2 layers, hidden 64, 4 heads, kv_lora_rank 32, rope 16, vocab 128) so
the Triton interpreter stays affordable, and ``index_topk`` (4) is far below the sequence lengths so the
indexer's selection really changes the answer (checked by test_selection_matters).
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV32ForCausalLM"):
    pytest.skip(f"transformers {transformers.__version__} has no DeepseekV32ForCausalLM", allow_module_level=True)

import attention  # noqa: E402
from attention.integrations import transformers as sat  # noqa: E402

CPU_BACKENDS = [b.name for b in attention.backends() if "cpu" in b.test_devices()]
TOL = 1e-4
PROMPT = 12
NEW_TOKENS = 16


def _config(**over):
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
              num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=32, q_lora_rank=48,
              qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, index_topk=4, index_head_dim=32,
              index_n_heads=2, first_k_dense_replace=1, max_position_embeddings=256, pad_token_id=0,
              bos_token_id=1, eos_token_id=2,
              # larger than the default 0.02 so logits spread (std ~0.8) and a wrong selection shows
              initializer_range=0.1)
    kw.update(over)
    cfg = transformers.DeepseekV32Config(**kw)
    cfg._attn_implementation = "eager"
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = transformers.DeepseekV32ForCausalLM(_config()).eval()
    m.generation_config.eos_token_id = None  # always 16 new tokens, so the comparison covers them all
    return m


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0     # left padding
    mask[2, 9:] = 0     # right padding
    ids[mask == 0] = 0
    return ids, mask


@pytest.fixture(scope="module")
def left_padded():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128, (3, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :2] = 0
    ids[mask == 0] = 0
    return ids, mask


def _eager(model):
    model.config._attn_implementation = "eager"
    sat.unabsorb_mla(model)


@pytest.fixture(scope="module")
def eager_logits(model, batch):
    _eager(model)
    with torch.no_grad():
        return model(input_ids=batch[0], attention_mask=batch[1]).logits


@pytest.fixture(scope="module")
def eager_tokens(model, left_padded):
    _eager(model)
    with torch.no_grad():
        return model.generate(input_ids=left_padded[0], attention_mask=left_padded[1],
                              max_new_tokens=NEW_TOKENS, do_sample=False)


def _run(fn):
    """Run fn; a backend that declines these inputs (its own reasons) skips rather than fails."""
    try:
        return fn()
    except ValueError as e:
        if "cannot run these inputs" in str(e):
            pytest.skip(str(e))
        raise


def _real_max_err(got, ref, mask):
    # Padded query rows carry no meaning (HF's eager fills them with a softmax over nothing).
    return (got - ref)[mask.bool()].abs().max().item()


def test_selection_matters(model, batch, eager_logits):
    """The top-k really prunes: the same model with a top-k covering everything gives other logits."""
    _eager(model)
    saved = [layer.self_attn.indexer.index_topk for layer in model.model.layers]
    try:
        for layer in model.model.layers:
            layer.self_attn.indexer.index_topk = 10_000
        with torch.no_grad():
            dense = model(input_ids=batch[0], attention_mask=batch[1]).logits
    finally:
        for layer, k in zip(model.model.layers, saved):
            layer.self_attn.indexer.index_topk = k
    assert _real_max_err(dense, eager_logits, batch[1]) > 100 * TOL


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_register_logits_match_eager(model, batch, eager_logits, backend):
    name = sat.register(f"selective_attention_{backend}", backend=backend)
    _eager(model)
    model.config._attn_implementation = name
    try:
        with torch.no_grad():
            got = _run(lambda: model(input_ids=batch[0], attention_mask=batch[1]).logits)
    finally:
        _eager(model)
    assert got.shape == eager_logits.shape
    assert torch.isfinite(got).all()
    assert _real_max_err(got, eager_logits, batch[1]) <= TOL


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_absorb_mla_logits_match_eager(model, batch, eager_logits, backend):
    _eager(model)
    sat.absorb_mla(model, backend=backend)
    try:
        with torch.no_grad():
            got = _run(lambda: model(input_ids=batch[0], attention_mask=batch[1]).logits)
    finally:
        _eager(model)
    assert torch.isfinite(got).all()
    assert _real_max_err(got, eager_logits, batch[1]) <= TOL


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_register_generate_matches_eager(model, left_padded, eager_tokens, backend):
    name = sat.register(f"selective_attention_{backend}", backend=backend)
    _eager(model)
    model.config._attn_implementation = name
    try:
        with torch.no_grad():
            got = _run(lambda: model.generate(input_ids=left_padded[0], attention_mask=left_padded[1],
                                              max_new_tokens=NEW_TOKENS, do_sample=False))
    finally:
        _eager(model)
    assert got.shape == (3, PROMPT + NEW_TOKENS)
    assert torch.equal(got, eager_tokens)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_absorb_mla_generate_matches_eager(model, left_padded, eager_tokens, backend):
    _eager(model)
    sat.absorb_mla(model, backend=backend)
    try:
        with torch.no_grad():
            out = _run(lambda: model.generate(input_ids=left_padded[0], attention_mask=left_padded[1],
                                              max_new_tokens=NEW_TOKENS, do_sample=False,
                                              return_dict_in_generate=True))
    finally:
        _eager(model)
    assert torch.equal(out.sequences, eager_tokens)
    # The cache generate() used holds paged latents: real tokens only, kv_lora_rank + rope values each.
    layers = out.cache.layers
    assert all(isinstance(layer, sat.PagedLatentCacheLayer) for layer in layers)
    real = int(left_padded[1].sum()) + 3 * (NEW_TOKENS - 1)  # the last token is never fed back
    for layer in layers:
        assert sum(layer.paged.lengths) == real
        assert layer.paged.kv.shape[-1] + layer.paged.kv_rope.shape[-1] == 32 + 16


def test_absorb_mla_cached_decode_logits_match_eager(model):
    """Prefill + three single-token steps with explicit caches (left padding): per-step logits."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    steps = torch.randint(3, 128, (2, 3), generator=g)

    def run():
        cache = transformers.DynamicCache(config=model.config)
        m = mask
        with torch.no_grad():
            logits = [model(input_ids=ids, attention_mask=m, cache=cache, use_cache=True).logits[:, -1]]
            for j in range(steps.shape[1]):
                m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], dim=1)
                logits.append(model(input_ids=steps[:, j:j + 1], attention_mask=m, cache=cache,
                                    use_cache=True).logits[:, -1])
        return torch.stack(logits)

    _eager(model)
    ref = run()
    sat.absorb_mla(model)
    try:
        got = run()
    finally:
        _eager(model)
    assert (got - ref).abs().max().item() <= TOL


def test_absorb_mla_refuses_a_cache_filled_by_the_expanded_path(model):
    ids = torch.randint(3, 128, (1, 5))
    cache = transformers.DynamicCache(config=model.config)
    _eager(model)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    sat.absorb_mla(model)
    try:
        with pytest.raises(RuntimeError, match="fresh cache"):
            with torch.no_grad():
                model(input_ids=ids[:, :1], cache=cache, use_cache=True)
    finally:
        _eager(model)


def test_register_returns_the_name_and_registers_both_interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = sat.register("selective_attention")
    assert name == "selective_attention"
    assert name in AttentionInterface._global_mapping
    assert name in AttentionMaskInterface._global_mapping


def test_from_pretrained_with_attn_implementation(model, batch, eager_logits, tmp_path):
    """The documented entry: save locally, load with attn_implementation=register()'s name."""
    name = sat.register()
    _eager(model)
    model.save_pretrained(tmp_path)
    loaded = transformers.DeepseekV32ForCausalLM.from_pretrained(tmp_path, attn_implementation=name).eval()
    assert loaded.config._attn_implementation == name
    with torch.no_grad():
        got = loaded(input_ids=batch[0], attention_mask=batch[1]).logits
    assert _real_max_err(got, eager_logits, batch[1]) <= TOL


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.int8], ids=["fp8", "int8"])
def test_absorb_mla_quantized_cache_equals_the_float_cache_of_the_same_values(model, batch, eager_logits,
                                                                               cache_dtype):
    """absorb_mla(cache_dtype=fp8/int8) stores the latent quantized (rope in the model's dtype) and gives
    the logits of the float cache holding the dequantized latents (a hook rounds the latent through
    quantize_kv the same way): the quantization is the only difference, and it is visible."""
    import python_ref

    _eager(model)
    sat.absorb_mla(model, cache_dtype=cache_dtype, scale_block=16)
    try:
        cache = transformers.DynamicCache(config=model.config)
        with torch.no_grad():
            got = model(input_ids=batch[0], attention_mask=batch[1], cache=cache, use_cache=True).logits
        paged = cache.layers[0].paged
        assert paged.kv.dtype == cache_dtype and paged.kv_scale.shape[-1] == 2  # 32 latent values, tiles of 16
        assert paged.kv_rope.dtype == torch.float32
        sat.unabsorb_mla(model)
        sat.absorb_mla(model)  # float cache

        def round_trip(module, args, out):
            return python_ref.dequantize(*attention.quantize_kv(out, cache_dtype, 16), 16)

        hooks = [layer.self_attn.kv_a_layernorm.register_forward_hook(round_trip) for layer in model.model.layers]
        try:
            with torch.no_grad():
                want = model(input_ids=batch[0], attention_mask=batch[1]).logits
        finally:
            for h in hooks:
                h.remove()
    finally:
        _eager(model)
    assert _real_max_err(got, want, batch[1]) <= TOL
    assert _real_max_err(got, eager_logits, batch[1]) > TOL  # the cache really is quantized


def test_absorb_mla_bad_cache_dtype(model):
    with pytest.raises(TypeError, match="cache_dtype"):
        sat.absorb_mla(model, cache_dtype=torch.float8_e5m2)
    _eager(model)
