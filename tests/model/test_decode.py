"""KV-cache decode: chunked prefill then token-by-token steps reproduce the full forward pass, left padding included."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CONFIGS, init_params, random_tokens

from jaxopd.model import Transformer, init_cache
from jaxopd.model.stacking import layer_stacks


@functools.partial(jax.jit, static_argnames="config")
def _forward(config, params, tokens, segment_ids, positions):
    return Transformer(config).apply({"params": params}, tokens, segment_ids, positions)


@functools.partial(jax.jit, static_argnames=("config", "last_only"))
def _decode(config, params, tokens, positions, segment_ids, cache, cache_index, last_only=False):
    return Transformer(config).apply({"params": params}, tokens, positions=positions, segment_ids=segment_ids,
                                     cache=cache, cache_index=cache_index, last_only=last_only, method="decode")


@pytest.mark.parametrize("name", ["mla_moe", "gqa"])
def test_prefill_then_steps_equal_full_forward_with_left_padding(name):
    config = CONFIGS[name]
    params = init_params(config)
    prompt_lengths, prompt_row, new_tokens, max_len = (6, 2, 4), 6, 3, 12
    batch, total = len(prompt_lengths), prompt_row + new_tokens
    # Row r: (prompt_row - n) pad slots, then an n-token prompt and the tokens "generated" after it.
    pads = np.array([prompt_row - n for n in prompt_lengths])
    tokens = np.asarray(random_tokens(config, (batch, total)))
    real = np.arange(total)[None] >= pads[:, None]
    tokens = jnp.asarray(np.where(real, tokens, 0))
    segment_ids = jnp.asarray(real.astype(np.int32))
    positions = jnp.asarray(np.maximum(np.arange(total)[None] - pads[:, None], 0))
    full = _forward(config, params, tokens, segment_ids, positions)

    cache = init_cache(config, batch, max_len, "float32")
    steps = [(0, 3), (3, 6)] + [(s, s + 1) for s in range(prompt_row, total)]  # two prefill chunks, then one by one
    for begin, end in steps:
        logits, cache = _decode(config, params, tokens[:, begin:end], positions[:, begin:end],
                                segment_ids[:, begin:end], cache, jnp.int32(begin))
        mask = real[:, begin:end]
        np.testing.assert_allclose(np.asarray(logits)[mask], np.asarray(full[:, begin:end])[mask], atol=5e-5,
                                   err_msg=f"slots [{begin}, {end})")
    np.testing.assert_array_equal(cache["segment_ids"][:, :total], segment_ids)
    assert not np.asarray(cache["segment_ids"][:, total:]).any()


def test_decode_mtp_equals_the_forward_pass_mtp_logits():
    """MTP depth 1 decoded against its own cache (a prefill chunk, then one position at a time, each after the main
    model's decode_hidden of the same slots) gives the logits of `features`' first MTP output."""
    config = CONFIGS["mla_moe"]
    params = init_params(config)
    model = Transformer(config)
    batch, total = 2, 7
    tokens = random_tokens(config, (batch, total))
    features = model.apply({"params": params}, tokens, method="features")
    expected = np.asarray(model.apply({"params": params}, features.mtp_hidden[0], method="logits"))
    cache = init_cache(config, batch, total + 1, "float32", mtp=True)
    assert set(cache["mtp"]) == {"latent", "k_rope"}
    ones = jnp.ones((batch, total), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (batch, total))
    # The last position's next token lies past the row (features zeroes its embedding): compare the others.
    @jax.jit
    def step(chunk, next_tokens, segment_ids, chunk_positions, cache, begin):
        hidden, cache = model.apply({"params": params}, chunk, segment_ids, chunk_positions, cache, begin,
                                    method="decode_hidden")
        return model.apply({"params": params}, hidden, next_tokens, segment_ids, chunk_positions, cache, begin,
                           method="decode_mtp")

    for begin, end in [(0, 4), (4, 5), (5, 6)]:
        window = slice(begin, end)
        logits, cache = step(tokens[:, window], tokens[:, begin + 1:end + 1], ones[:, window], positions[:, window],
                             cache, jnp.int32(begin))
        np.testing.assert_allclose(np.asarray(logits), expected[:, window], atol=5e-5, err_msg=f"slots {window}")


def test_decode_mtp_needs_an_mtp_cache():
    config = CONFIGS["mla_moe"]
    params = init_params(config)
    hidden = jnp.zeros((1, 1, config.d_model))
    tokens = jnp.ones((1, 1), jnp.int32)
    with pytest.raises(ValueError, match=r"init_cache\(config, batch, max_len, dtype, mtp=True\)"):
        Transformer(config).apply({"params": params}, hidden, tokens, tokens, tokens, init_cache(config, 1, 4),
                                  jnp.int32(0), method="decode_mtp")


def test_last_only_prefill_gives_the_last_column_and_the_same_cache():
    config = CONFIGS["mla_moe"]
    params = init_params(config)
    tokens = random_tokens(config, (2, 5))
    full = _forward(config, params, tokens, None, None)
    logits, cache = _decode(config, params, tokens, None, None, init_cache(config, 2, 8, "float32"), jnp.int32(0),
                            last_only=True)
    assert logits.shape == (2, 1, config.vocab_size)
    np.testing.assert_allclose(logits[:, 0], full[:, -1], atol=5e-5)
    _, all_columns_cache = _decode(config, params, tokens, None, None, init_cache(config, 2, 8, "float32"),
                                   jnp.int32(0))
    jax.tree.map(np.testing.assert_array_equal, cache, all_columns_cache)


def test_decode_positions_default_to_cache_slots():
    config = CONFIGS["gqa"]
    params = init_params(config)
    tokens = random_tokens(config, (2, 6))
    full = _forward(config, params, tokens, None, None)
    cache = init_cache(config, 2, 8, "float32")
    prompt_logits, cache = _decode(config, params, tokens[:, :4], None, None, cache, jnp.int32(0))
    step_logits, cache = _decode(config, params, tokens[:, 4:5], None, None, cache, jnp.int32(4))
    np.testing.assert_allclose(prompt_logits, full[:, :4], atol=5e-5)
    np.testing.assert_allclose(step_logits, full[:, 4:5], atol=5e-5)


def _leading_axes(config):
    """The leading axes of each `cache["layers"]` entry's arrays: one entry per stack of layers, `[layers of the
    stack]`, when scanned; one per layer, none, when unrolled."""
    if config.scan_layers:
        return [(group.count,) for group in layer_stacks(config)]
    return [()] * config.num_layers


@pytest.mark.parametrize("scan_layers", [True, False])
def test_mla_cache_holds_only_latent_and_rope_key(scan_layers):
    config = CONFIGS["mla_moe"].replace(scan_layers=scan_layers)
    cache = init_cache(config, batch=3, max_len=16, dtype="bfloat16")
    assert cache["segment_ids"].shape == (3, 16) and cache["segment_ids"].dtype == jnp.int32
    assert len(cache["layers"]) == len(_leading_axes(config))
    for layer, lead in zip(cache["layers"], _leading_axes(config)):
        assert set(layer) == {"latent", "k_rope"}
        assert layer["latent"].shape == (*lead, 3, 16, config.kv_lora_rank) and layer["latent"].dtype == jnp.bfloat16
        assert layer["k_rope"].shape == (*lead, 3, 16, config.qk_rope_head_dim)
    per_token_per_layer = sum(a.size for a in jax.tree.leaves(cache["layers"])) / (3 * 16 * config.num_layers)
    assert per_token_per_layer == config.kv_lora_rank + config.qk_rope_head_dim


@pytest.mark.parametrize("scan_layers", [True, False])
def test_gqa_cache_holds_kv_heads(scan_layers):
    config = CONFIGS["gqa"].replace(scan_layers=scan_layers)
    cache = init_cache(config, batch=2, max_len=8, dtype="float32")
    assert len(cache["layers"]) == len(_leading_axes(config))
    for layer, lead in zip(cache["layers"], _leading_axes(config)):
        assert set(layer) == {"k", "v"}
        assert layer["k"].shape == layer["v"].shape == (*lead, 2, 8, config.num_kv_heads, config.head_dim)


def test_decode_rejects_a_cache_that_does_not_fit():
    config = CONFIGS["gqa"]
    params = init_params(config)
    model = Transformer(config)
    tokens = jnp.ones((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="max_len"):
        model.apply({"params": params}, tokens, cache=init_cache(config, 2, 4), cache_index=2, method="decode")
    with pytest.raises(ValueError, match="init_cache"):
        model.apply({"params": params}, tokens, cache=init_cache(config, 3, 8), cache_index=0, method="decode")
