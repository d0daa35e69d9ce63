"""Masked causal attention and MLA vs float64 brute force; packed == per-document; absorbed MLA == naive MLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.kernels import attention as attention_lib
from jaxopd.kernels.attention import attention, mla_absorbed_decode, mla_naive
from jaxopd.kernels.masks import attention_mask


def _brute_force(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, scale, sliding_window=None):
    """One query, one head, one key at a time, in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, q_len, heads, _ = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    out = np.zeros((batch, q_len, heads, v.shape[-1]))
    for b in range(batch):
        for i in range(q_len):
            visible = [
                j for j in range(kv_len)
                if q_segment_ids[b, i] != 0 and kv_segment_ids[b, j] == q_segment_ids[b, i]
                and kv_positions[b, j] <= q_positions[b, i]
                and (sliding_window is None or q_positions[b, i] - kv_positions[b, j] < sliding_window)
            ]
            if not visible:
                continue
            for h in range(heads):
                kv_head = h // (heads // kv_heads)
                scores = np.array([q[b, i, h] @ k[b, j, kv_head] * scale for j in visible])
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[b, i, h] = sum(w * v[b, j, kv_head] for w, j in zip(weights, visible))
    return out


def _random(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# Row 0 packs two documents and ends in padding; row 1 is one document.
SEGMENT_IDS = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
POSITIONS = np.array([[0, 1, 2, 0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7, 8]], np.int32)


def _self_attention(q, k, v, **kwargs):
    ids, positions = jnp.asarray(SEGMENT_IDS), jnp.asarray(POSITIONS)
    return attention(q, k, v, q_segment_ids=ids, kv_segment_ids=ids, q_positions=positions, kv_positions=positions,
                     **kwargs)


def test_packed_attention_equals_each_document_alone_and_padding_is_zero():
    rng = np.random.default_rng(0)
    q, k, v = _random(rng, 2, 9, 4, 8), _random(rng, 2, 9, 2, 8), _random(rng, 2, 9, 2, 8)
    out = np.asarray(_self_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=0.3))
    for start, stop in [(0, 3), (3, 7)]:
        doc = lambda x: jnp.asarray(x[:1, start:stop])  # noqa: E731
        ones = jnp.ones((1, stop - start), jnp.int32)
        alone = attention(doc(q), doc(k), doc(v), q_segment_ids=ones, kv_segment_ids=ones,
                          q_positions=jnp.arange(stop - start)[None], kv_positions=jnp.arange(stop - start)[None],
                          scale=0.3)
        np.testing.assert_allclose(out[0, start:stop], np.asarray(alone)[0], rtol=1e-5, atol=1e-6)
    assert np.all(out[0, 7:] == 0.0)

    def loss(q, k, v):
        return jnp.sum(_self_attention(q, k, v, scale=0.3) ** 2)

    grads = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert np.all(np.asarray(grads[0])[0, 7:] == 0.0), "padding queries must receive no gradient"


@pytest.mark.parametrize("sliding_window", [None, 3])
@pytest.mark.parametrize("kv_heads", [1, 2, 6])
def test_attention_matches_brute_force(kv_heads, sliding_window):
    rng = np.random.default_rng(kv_heads)
    q, k, v = _random(rng, 2, 9, 6, 8), _random(rng, 2, 9, kv_heads, 8), _random(rng, 2, 9, kv_heads, 5)
    out = _self_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=0.35, sliding_window=sliding_window)
    expected = _brute_force(q, k, v, SEGMENT_IDS, SEGMENT_IDS, POSITIONS, POSITIONS, 0.35, sliding_window)
    assert out.shape == (2, 9, 6, 5) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_decode_step_over_cache_matches_brute_force():
    """Two new tokens per row against a cache with empty slots (segment 0) and a left-padded prompt."""
    rng = np.random.default_rng(3)
    kv_segment_ids = np.array([[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]], np.int32)
    kv_positions = np.array([[0, 0, 0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 4, 0, 0, 0]], np.int32)
    q_positions = np.array([[2, 3], [3, 4]], np.int32)
    q_segment_ids = np.array([[1, 1], [1, 0]], np.int32)  # row 1's second query is padding
    q, k, v = _random(rng, 2, 2, 4, 8), _random(rng, 2, 8, 2, 8), _random(rng, 2, 8, 2, 8)
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids=jnp.asarray(q_segment_ids),
                    kv_segment_ids=jnp.asarray(kv_segment_ids), q_positions=jnp.asarray(q_positions),
                    kv_positions=jnp.asarray(kv_positions), scale=0.3)
    expected = _brute_force(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, 0.3)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[1, 1] == 0.0)


def test_bfloat16_inputs_keep_dtype_and_stay_close():
    rng = np.random.default_rng(4)
    q, k, v = _random(rng, 2, 9, 4, 8), _random(rng, 2, 9, 2, 8), _random(rng, 2, 9, 2, 8)
    out = _self_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), scale=0.3)
    assert out.dtype == jnp.bfloat16
    expected = _brute_force(q, k, v, SEGMENT_IDS, SEGMENT_IDS, POSITIONS, POSITIONS, 0.3)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=5e-2)


def test_jax_nn_route_matches_einsum_route():
    """The "cudnn" route's wrapping (dense mask, v padded to the key size, empty rows zeroed) checked through
    jax.nn's XLA backend; the cuDNN kernel itself needs an NVIDIA GPU."""
    rng = np.random.default_rng(5)
    q, k, v = _random(rng, 2, 9, 4, 12), _random(rng, 2, 9, 2, 12), _random(rng, 2, 9, 2, 8)
    ids, positions = jnp.asarray(SEGMENT_IDS), jnp.asarray(POSITIONS)
    mask = attention_mask(ids, ids, positions, positions, None)
    routed = attention_lib._attention_jax_nn(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask, 0.3, "xla")
    expected = _brute_force(q, k, v, SEGMENT_IDS, SEGMENT_IDS, POSITIONS, POSITIONS, 0.3)
    assert routed.shape == (2, 9, 4, 8)
    np.testing.assert_allclose(np.asarray(routed), expected, rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
    q, k = jnp.zeros((1, 9, 3, 8)), jnp.zeros((1, 9, 2, 8))
    ids = jnp.ones((1, 9), jnp.int32)
    kwargs = dict(q_segment_ids=ids, kv_segment_ids=ids, q_positions=ids, kv_positions=ids, scale=1.0)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        attention(q, k, k, **kwargs)
    with pytest.raises(ValueError, match="implementation"):
        attention(k, k, k, implementation="flash", **kwargs)
    with pytest.raises(ValueError, match="sliding_window"):
        attention(k, k, k, sliding_window=0, **kwargs)
    with pytest.raises(ValueError, match="q_positions"):
        attention(k, k, k, **{**kwargs, "q_positions": jnp.ones((9, 1), jnp.int32)})


# ---- MLA --------------------------------------------------------------------------------------------------------------

HEADS, NOPE, ROPE, RANK, VDIM = 3, 8, 4, 10, 6


def _mla_inputs(rng, q_len, kv_len, batch=2):
    return dict(
        q_nope=_random(rng, batch, q_len, HEADS, NOPE), q_rope=_random(rng, batch, q_len, HEADS, ROPE),
        latent=_random(rng, batch, kv_len, RANK), k_rope=_random(rng, batch, kv_len, ROPE),
        w_uk=_random(rng, RANK, HEADS, NOPE) * 0.5, w_uv=_random(rng, RANK, HEADS, VDIM) * 0.5)


def _mla_brute_force(inputs, q_segment_ids, kv_segment_ids, q_positions, kv_positions, scale):
    """Up-project in float64 numpy, then the attention brute force."""
    a = {name: np.asarray(x, np.float64) for name, x in inputs.items()}
    k_nope = np.einsum("bsc,chn->bshn", a["latent"], a["w_uk"])
    k_rope = np.repeat(a["k_rope"][:, :, None, :], HEADS, axis=2)
    return _brute_force(np.concatenate([a["q_nope"], a["q_rope"]], -1), np.concatenate([k_nope, k_rope], -1),
                        np.einsum("bsc,chv->bshv", a["latent"], a["w_uv"]),
                        q_segment_ids, kv_segment_ids, q_positions, kv_positions, scale)


def _call(fn, inputs, q_segment_ids, kv_segment_ids, q_positions, kv_positions, scale):
    return np.asarray(fn(**{name: jnp.asarray(x) for name, x in inputs.items()},
                         q_segment_ids=jnp.asarray(q_segment_ids), kv_segment_ids=jnp.asarray(kv_segment_ids),
                         q_positions=jnp.asarray(q_positions), kv_positions=jnp.asarray(kv_positions), scale=scale))


def test_mla_naive_and_absorbed_match_brute_force_on_packed_training_batch():
    rng = np.random.default_rng(6)
    inputs = _mla_inputs(rng, 9, 9)
    scale = (NOPE + ROPE) ** -0.5
    mask_args = (SEGMENT_IDS, SEGMENT_IDS, POSITIONS, POSITIONS, scale)
    expected = _mla_brute_force(inputs, *mask_args)
    naive = _call(mla_naive, inputs, *mask_args)
    absorbed = _call(mla_absorbed_decode, inputs, *mask_args)
    assert naive.shape == absorbed.shape == (2, 9, HEADS, VDIM)
    np.testing.assert_allclose(naive, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(absorbed, expected, rtol=1e-4, atol=1e-5)
    assert np.all(absorbed[0, 7:] == 0.0)


@pytest.mark.parametrize("q_len", [1, 3], ids=["decode_step", "chunk"])
def test_absorbed_decode_equals_naive_attention_over_cache(q_len):
    """Queries at positions after a prefix in a partly filled cache (max_len 8; empty slots have segment 0)."""
    rng = np.random.default_rng(7 + q_len)
    max_len, prefix = 8, np.array([2, 4])
    kv_segment_ids = np.zeros((2, max_len), np.int32)
    kv_positions = np.zeros((2, max_len), np.int32)
    q_positions = np.zeros((2, q_len), np.int32)
    for b, n in enumerate(prefix):  # the chunk's own tokens are already written to the cache, as in decode
        kv_segment_ids[b, : n + q_len] = 1
        kv_positions[b, : n + q_len] = np.arange(n + q_len)
        q_positions[b] = np.arange(n, n + q_len)
    q_segment_ids = np.ones((2, q_len), np.int32)
    inputs = _mla_inputs(rng, q_len, max_len)
    mask_args = (q_segment_ids, kv_segment_ids, q_positions, kv_positions, 0.25)
    naive = _call(mla_naive, inputs, *mask_args)
    absorbed = _call(mla_absorbed_decode, inputs, *mask_args)
    np.testing.assert_allclose(absorbed, naive, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(naive, _mla_brute_force(inputs, *mask_args), rtol=1e-4, atol=1e-5)


def test_mla_shape_errors_name_the_argument():
    rng = np.random.default_rng(8)
    inputs = {name: jnp.asarray(x) for name, x in _mla_inputs(rng, 2, 4).items()}
    inputs["w_uk"] = inputs["w_uk"][:, :, :-1]
    ids = jnp.ones((2, 2), jnp.int32)
    kv_ids = jnp.ones((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="w_uk"):
        mla_absorbed_decode(**inputs, q_segment_ids=ids, kv_segment_ids=kv_ids, q_positions=ids,
                            kv_positions=kv_ids, scale=1.0)


@pytest.mark.parametrize("mla_fn", [mla_naive, mla_absorbed_decode], ids=["naive", "absorbed"])
def test_mla_kernels_compose_to_transformers_deepseek_v3_attention(mla_fn):
    """rms_norm + interleaved YaRN rope + MLA on two packed documents == transformers' DeepseekV3Attention on each
    document alone. Pins the weight layouts (w_uk/w_uv from kv_b_proj) and both YaRN temperatures."""
    import torch
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    from jaxopd.kernels.layers import rms_norm
    from jaxopd.kernels.rope import apply_rope, rope_frequencies, yarn_softmax_scale_factor
    from jaxopd.model.config import RopeScaling

    d_model, q_lora, theta = 16, 12, 10000.0
    scaling = RopeScaling(kind="yarn", factor=4.0, original_max_position_embeddings=32, mscale=1.0,
                          mscale_all_dim=0.8)
    config = DeepseekV3Config(
        hidden_size=d_model, num_attention_heads=HEADS, num_key_value_heads=HEADS, q_lora_rank=q_lora,
        kv_lora_rank=RANK, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=VDIM, rope_interleave=True,
        max_position_embeddings=128, attention_bias=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": theta, "factor": scaling.factor,
                         "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 0.8})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    layer = hf.DeepseekV3Attention(config, layer_idx=0).eval()
    with torch.no_grad():
        for norm in (layer.q_a_layernorm, layer.kv_a_layernorm):
            norm.weight.uniform_(0.5, 1.5)
    rotary = hf.DeepseekV3RotaryEmbedding(config)
    weights = {name: p.detach().numpy() for name, p in layer.named_parameters()}

    lengths = (5, 4)
    rng = np.random.default_rng(9)
    x = _random(rng, 1, sum(lengths), d_model)
    expected = []
    for start, n in zip(np.cumsum((0,) + lengths[:-1]), lengths):
        doc = torch.from_numpy(x[:, start:start + n])
        causal = torch.triu(torch.full((n, n), float("-inf")), 1)[None, None]
        with torch.no_grad():
            out, _ = layer(doc, rotary(doc, torch.arange(n)[None]), causal)
        expected.append(out.numpy())
    expected = np.concatenate(expected, axis=1)

    segment_ids = jnp.asarray(np.repeat(np.arange(1, len(lengths) + 1), lengths)[None], jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(n) for n in lengths])[None], jnp.int32)
    inv_freq, rope_scale = rope_frequencies(ROPE, theta, scaling)
    eps = config.rms_norm_eps
    q_BxTxF = rms_norm(x @ weights["q_a_proj.weight"].T, jnp.asarray(weights["q_a_layernorm.weight"]), eps)
    q_BxTxHxD = (q_BxTxF @ weights["q_b_proj.weight"].T).reshape(1, -1, HEADS, NOPE + ROPE)
    compressed = x @ weights["kv_a_proj_with_mqa.weight"].T
    latent = rms_norm(compressed[..., :RANK], jnp.asarray(weights["kv_a_layernorm.weight"]), eps)
    k_rope = apply_rope(jnp.asarray(compressed[..., None, RANK:]), positions, inv_freq, "interleaved", rope_scale)
    up_HxFxC = weights["kv_b_proj.weight"].reshape(HEADS, NOPE + VDIM, RANK)
    out = mla_fn(
        q_BxTxHxD[..., :NOPE], apply_rope(q_BxTxHxD[..., NOPE:], positions, inv_freq, "interleaved", rope_scale),
        latent, k_rope[:, :, 0], jnp.asarray(up_HxFxC[:, :NOPE].transpose(2, 0, 1)),
        jnp.asarray(up_HxFxC[:, NOPE:].transpose(2, 0, 1)), q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
        q_positions=positions, kv_positions=positions,
        scale=(NOPE + ROPE) ** -0.5 * yarn_softmax_scale_factor(scaling))
    ours = np.asarray(out).reshape(1, sum(lengths), HEADS * VDIM) @ weights["o_proj.weight"].T
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
