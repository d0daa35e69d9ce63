"""LoRA (jaxopd/model/lora.py): adapter gradients against closed forms (a linear layer in float64 numpy; the full
model's weight gradient mapped onto the adapters) and finite differences, the LoRA model equal to its base at init,
the merged export equal to the LoRA model, dropout, adapter sharding axes and config errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.kernels.layers import LowRank, low_rank
from jaxopd.model import ModelConfig, Transformer, init_cache, lora, moe_layer_paths
from jaxopd.model.stacking import layer_stacks
from tests.model.conftest import CONFIGS, GQA, MLA_MOE, init_params, random_tokens

RANK = 3


def _lora_params(config: ModelConfig, seed: int = 5):
    """(LoRA config, unboxed params): the conftest's base weights, adapters A and B both random (B nonzero, so the
    adapters change the model)."""
    lora_config = config.replace(lora_rank=RANK, lora_alpha=6.0)
    base = nn.unbox(init_params(config))
    shapes = jax.eval_shape(lambda: Transformer(lora_config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    adapters, _ = lora.split(nn.unbox(shapes["params"]))
    rng = np.random.default_rng(seed)
    adapters = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), adapters)
    return lora_config, lora.combine(adapters, base)


def _probe_loss(config, params, tokens, probe):
    return jnp.sum(Transformer(config).apply({"params": params}, tokens) * probe)


def test_linear_layer_adapter_gradients_equal_the_closed_form():
    rng = np.random.default_rng(0)
    x, a, b, g = (rng.standard_normal(s) for s in ((5, 7), (7, RANK), (RANK, 4), (5, 4)))
    scale = 2.5
    loss = lambda a, b: jnp.sum(low_rank(jnp.asarray(x, jnp.float32), LowRank(a, b * scale)) * g)
    grad_a, grad_b = jax.grad(loss, argnums=(0, 1))(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    # y = s (x A) B:  dL/dA = s x^T (g B^T),  dL/dB = s (x A)^T g.
    np.testing.assert_allclose(grad_a, scale * x.T @ (g @ b.T), rtol=1e-5)
    np.testing.assert_allclose(grad_b, scale * (x @ a).T @ g, rtol=1e-5)


@pytest.mark.parametrize("name", ["gqa", "mla_moe"])
def test_adapter_gradients_equal_the_merged_models_weight_gradient_mapped_onto_them(name):
    """W' = W + s A B, so dL/dA = s dL/dW' B^T and dL/dB = s A^T dL/dW' (per expert for the expert stacks)."""
    config, params = _lora_params(CONFIGS[name])
    tokens = random_tokens(config, (2, 6))
    probe = jax.random.normal(jax.random.key(3), (2, 6, config.vocab_size))
    adapters, base = lora.split(params)
    adapter_grads = jax.jit(jax.grad(lambda ad: _probe_loss(config, lora.combine(ad, base), tokens, probe)))(adapters)
    merged_config, merged = lora.merged(config, params)
    weight_grads = jax.jit(jax.grad(lambda p: _probe_loss(merged_config, p, tokens, probe)))(merged)
    scale = config.lora_scale
    flat_grads = dict(jax.tree_util.tree_flatten_with_path(adapter_grads)[0])
    flat_params, flat_weight_grads = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (params, weight_grads))
    stacks = {group.name for group in layer_stacks(config)} if config.scan_layers else set()
    checked = 0
    for path, grad_a in flat_grads.items():
        if not path[-1].key.endswith("_lora_a"):
            continue
        weight_name = path[-1].key[: -len("_lora_a")]
        b_path = (*path[:-1], jax.tree_util.DictKey(weight_name + "_lora_b"))
        a, b = np.asarray(flat_params[path], np.float64), np.asarray(flat_params[b_path], np.float64)
        dw = np.asarray(flat_weight_grads[(*path[:-1], jax.tree_util.DictKey(weight_name))], np.float64)
        stacked = a.ndim + b.ndim - 2 - dw.ndim
        lead = a.shape[:stacked]
        a2 = a.reshape(*lead, -1, RANK)
        b2 = b.reshape(*lead, RANK, -1)
        dw2 = dw.reshape(*lead, a2.shape[-2], b2.shape[-1])
        want_a = scale * dw2 @ np.swapaxes(b2, -1, -2)
        want_b = scale * np.swapaxes(a2, -1, -2) @ dw2
        tolerance = 1e-4 * max(np.abs(want_a).max(), np.abs(want_b).max())
        np.testing.assert_allclose(np.asarray(grad_a).reshape(want_a.shape), want_a, atol=tolerance,
                                   err_msg=jax.tree_util.keystr(path))
        np.testing.assert_allclose(np.asarray(flat_grads[b_path]).reshape(want_b.shape), want_b, atol=tolerance,
                                   err_msg=jax.tree_util.keystr(b_path))
        checked += a.shape[0] if path[0].key in stacks else 1  # a stacked adapter holds one per layer
    # Every adapted weight: GQA q/k/v/o + dense MLP per layer; MLA q_a/q_b/kv_a/kv_b/o, dense MLP, routed and
    # shared experts, the MTP blocks' too.
    assert checked == (2 * 7 if name == "gqa" else (5 + 3) * 1 + (5 + 3 + 3) * 1 + (5 + 3 + 3) * 2)


def test_finite_differences_through_the_model_match_one_adapter_entry():
    config, params = _lora_params(MLA_MOE)
    tokens = random_tokens(config, (1, 6))
    probe = jax.random.normal(jax.random.key(4), (1, 6, config.vocab_size))
    layer = moe_layer_paths(config)[0][0]  # routed experts' w_down: behind attention, the router and the shared experts
    grads = jax.jit(jax.grad(lambda p: _probe_loss(config, p, tokens, probe)))(params)
    grad_entries = grads[layer[0]][layer[1]]["w_down_lora_a"]
    index = np.unravel_index(np.argmax(np.abs(grad_entries)), grad_entries.shape)  # an expert the tokens reach
    grad, entry = grad_entries[index], params[layer[0]][layer[1]]["w_down_lora_a"][index]

    @jax.jit
    def loss_at(value):
        changed = jax.tree.map(lambda x: x, params)
        changed[layer[0]][layer[1]]["w_down_lora_a"] = params[layer[0]][layer[1]]["w_down_lora_a"].at[index].set(value)
        return _probe_loss(config, changed, tokens, probe)

    step = 1e-2
    finite_difference = (loss_at(entry + step) - loss_at(entry - step)) / (2 * step)
    assert abs(float(grad)) > 1e-2
    np.testing.assert_allclose(float(finite_difference), float(grad), rtol=2e-2)


def test_lora_model_at_init_computes_exactly_its_base_model(config):
    lora_config = config.replace(lora_rank=RANK)
    tokens = random_tokens(config, (2, 6))
    fresh = Transformer(lora_config).init(jax.random.key(1), tokens)["params"]
    adapters, _ = lora.split(nn.unbox(fresh))
    assert adapters and all(not np.any(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]
                            if path[-1].key.endswith("_lora_b"))
    base = nn.unbox(init_params(config))
    want = jax.jit(Transformer(config).apply)({"params": base}, tokens)
    got = jax.jit(Transformer(lora_config).apply)({"params": lora.combine(adapters, base)}, tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_merged_model_logits_equal_the_lora_models(config):
    lora_config, params = _lora_params(config)
    tokens = random_tokens(config, (2, 6))
    merged_config, merged = lora.merged(lora_config, params)
    assert merged_config == config and not lora.split(merged)[0]
    assert jax.tree.structure(merged) == jax.tree.structure(nn.unbox(init_params(config)))
    lora_logits = jax.jit(Transformer(lora_config).apply)({"params": params}, tokens)
    base_logits = jax.jit(Transformer(config).apply)({"params": lora.split(params)[1]}, tokens)
    merged_logits = jax.jit(Transformer(merged_config).apply)({"params": merged}, tokens)
    assert np.abs(lora_logits - base_logits).max() > 0.1  # the adapters matter
    np.testing.assert_allclose(merged_logits, lora_logits, rtol=1e-5, atol=1e-4)


def test_dropout_is_identity_at_zero_and_without_an_rng_and_stochastic_otherwise():
    config, params = _lora_params(GQA)
    tokens = random_tokens(config, (2, 6))
    plain = jax.jit(Transformer(config).apply)({"params": params}, tokens)
    with_rng = lambda c, seed: jax.jit(lambda p, rng: Transformer(c).apply(p, tokens, rngs={"dropout": rng}))(
        {"params": params}, jax.random.key(seed))
    np.testing.assert_array_equal(with_rng(config, 0), plain)  # rate 0
    dropping = config.replace(lora_dropout=0.5)
    np.testing.assert_array_equal(jax.jit(Transformer(dropping).apply)({"params": params}, tokens), plain)  # no rng
    first, again, other = with_rng(dropping, 0), with_rng(dropping, 0), with_rng(dropping, 1)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - plain).max() > 1e-3 and np.abs(first - other).max() > 1e-3


def test_adapters_carry_their_weights_input_and_output_axes():
    boxed = jax.eval_shape(lambda: Transformer(MLA_MOE.replace(lora_rank=RANK)).init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    layer = boxed["moe_layers"]  # scanned: each adapter stacked over the stack's layers, axis "layers" first
    assert layer["attention"]["o_lora_a"].names == ("layers", "q_heads", "head_dim", None)
    assert layer["attention"]["o_lora_b"].names == ("layers", None, "embed")
    assert layer["attention"]["kv_b_lora_b"].names == ("layers", None, "q_heads", "head_dim")
    assert layer["mlp"]["w_up_lora_a"].names == ("layers", "experts", "embed", None)
    assert layer["mlp"]["w_down_lora_b"].names == ("layers", "experts", None, "embed")
    assert layer["mlp"]["w_up_lora_a"].value.shape == (1, 8, 32, RANK)
    assert layer["mlp"]["shared"]["w_down_lora_a"].names == ("layers", "mlp", None)
    only_attention = jax.eval_shape(lambda: Transformer(MLA_MOE.replace(lora_rank=RANK, lora_targets=("attention",)))
                                    .init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(lora.split(only_attention)[0])[0]]
    assert names and all("attention" in n for n in names)


@pytest.mark.parametrize("changes, message", [
    ({"lora_rank": -1}, "lora_rank=-1 must be >= 0"),
    ({"lora_rank": 4, "lora_targets": ("attention", "embedding")}, r"lora_targets has \['embedding'\].*'attention', "
                                                                   "'mlp' or 'experts'"),
    ({"lora_rank": 4, "lora_targets": ()}, "needs at least one config.lora_targets"),
    ({"lora_rank": 4, "lora_dropout": 1.0}, r"lora_dropout=1.0 must lie in \[0, 1\)"),
    ({"lora_rank": 4, "lora_alpha": 0.0}, "lora_alpha=0.0 must be > 0"),
])
def test_bad_lora_settings_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        GQA.replace(**changes)


def test_lora_targets_from_a_saved_config_stay_hashable():
    assert hash(GQA.replace(lora_rank=2, lora_targets=["mlp"])) == hash(GQA.replace(lora_rank=2, lora_targets=("mlp",)))


def test_summarize_counts_adapters_instead_of_listing_them():
    paths = [f"['layers_{i}']['attention']['q_lora_a']" for i in range(3000)] + ["['mtp_0']['norm']['scale']"]
    assert lora.summarize(paths) == "[\"['mtp_0']['norm']['scale']\"] and 3000 LoRA adapters"


@pytest.mark.parametrize("name", ["gqa", "mla_moe"])
def test_decoding_a_lora_model_token_by_token_gives_its_forward_logits(name):
    """The sampler's path: MLA decode absorbs kv_b, with its folded update, into the queries."""
    config, params = _lora_params(CONFIGS[name])
    tokens = random_tokens(config, (2, 5))
    model = Transformer(config)
    want = jax.jit(model.apply)({"params": params}, tokens)
    step = jax.jit(lambda cache, token, index: model.apply({"params": params}, token, cache=cache, cache_index=index,
                                                            method="decode"))
    cache = init_cache(config, 2, 8, jnp.float32)
    for index in range(tokens.shape[1]):
        logits, cache = step(cache, tokens[:, index : index + 1], index)
        np.testing.assert_allclose(logits[:, 0], want[:, index], rtol=1e-4, atol=1e-4)
