"""Scanned decoder layers (`ModelConfig.scan_layers`) against the unrolled model: the same params (converted by
`jaxopd.model.stacking`) give the same logits, MoE statistics, gradients and decoded tokens."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.model import ModelConfig, Transformer, init_cache, moe_layer_paths, update_expert_biases
from jaxopd.model.config import RUN_CHOICE_FIELDS, architecture_fields
from jaxopd.model.stacking import is_scanned, layer_stacks, stack_layers, to_layout, unstack_layers

from conftest import GQA, MLA_MOE, init_params

# The unrolled side of each pair (scanned is the default). GQA: one stack of 3 alike layers. MLA + MoE + MTP with
# first_k_dense=1: a dense stack of 1 and an MoE stack of 2, the MTP modules apart.
CONFIGS = {"gqa": GQA.replace(num_layers=3, scan_layers=False),
           "mla_moe_mtp": MLA_MOE.replace(num_layers=3, scan_layers=False)}


def _pair(name):
    """(unrolled config, scanned config, unrolled params, the same params stacked), plain arrays."""
    unrolled = CONFIGS[name]
    params = nn.unbox(init_params(unrolled))
    return unrolled, unrolled.replace(scan_layers=True), params, stack_layers(unrolled, dict(params))


def _close(actual, expected, tolerance=1e-6, floor=1e-30):
    """|actual - expected| <= tolerance * max(max|expected|, floor) elementwise: float32 agreement at the arrays' own
    scale (the scan body is compiled as one loop, so XLA may order a sum differently than in the unrolled program)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(float(np.abs(expected).max(initial=0.0)), floor)
    np.testing.assert_array_less(np.abs(actual - expected), tolerance * scale + 1e-30)


def _tokens():
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 97)
    segment_ids = jnp.array([[1] * 9, [1] * 5 + [2] * 3 + [0]])
    return tokens, segment_ids


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_scanned_params_are_the_unrolled_ones_stacked(name):
    unrolled, scanned, _, _ = _pair(name)
    shapes = lambda config: jax.eval_shape(
        lambda: Transformer(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    boxed = shapes(scanned)
    expected = stack_layers(unrolled, dict(nn.unbox(shapes(unrolled))),
                            stack=lambda leaves: jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), nn.unbox(boxed)) == jax.tree.map(lambda a: (a.shape, a.dtype),
                                                                                       expected)
    names = {group.name for group in layer_stacks(unrolled)}
    assert names == ({"layers"} if name == "gqa" else {"dense_layers", "moe_layers"})
    for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        assert (leaf.names[0] == "layers") == (path[0].key in names), jax.tree_util.keystr(path)
    assert is_scanned(unrolled, expected) and not is_scanned(unrolled, nn.unbox(shapes(unrolled)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_stacking_round_trips(name):
    unrolled, _, params, stacked = _pair(name)
    back = unstack_layers(unrolled, dict(stacked))
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    # to_layout converts every param-shaped dict in a bigger tree (optimizer moments) and leaves the rest alone.
    tree = {"step": 3, "moments": (dict(params), dict(params))}
    converted = to_layout(unrolled, tree, scanned=True)
    assert converted["step"] == 3
    jax.tree.map(np.testing.assert_array_equal, converted["moments"][1], stacked)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_scanned_logits_and_features_equal_unrolled(name):
    unrolled, scanned, params, stacked = _pair(name)
    tokens, segment_ids = _tokens()
    apply = lambda config, p, method: Transformer(config).apply({"params": p}, tokens, segment_ids, method=method)
    for method in ("__call__", "features"):
        outputs = [jax.jit(apply, static_argnums=(0, 2))(config, p, method) for config, p in ((scanned, stacked),
                                                                                            (unrolled, params))]
        jax.tree.map(_close, *outputs)
    if unrolled.num_experts:
        assert outputs[0].moe_load.shape == (len(moe_layer_paths(scanned)), unrolled.num_experts) == (4, 8)


@pytest.mark.parametrize("name", [
    "gqa", pytest.param("mla_moe_mtp", marks=pytest.mark.slow)])  # MLA + MoE + MTP: ~30 s to compile on 2 cores
def test_scanned_gradients_equal_unrolled(name):
    unrolled, scanned, params, stacked = _pair(name)
    tokens, segment_ids = _tokens()

    def loss(config, p):
        features = Transformer(config).apply({"params": p}, tokens, segment_ids, method="features")
        mtp = sum(jnp.mean(h ** 2) for h in features.mtp_hidden)
        logits = Transformer(config).apply({"params": p}, features.hidden, method="logits")
        return jnp.mean(logits ** 2) + mtp + features.moe_balance_loss

    expected = stack_layers(unrolled, dict(jax.jit(jax.grad(lambda p: loss(unrolled, p)))(params)))
    largest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected))
    # With remat inside the scan body ("full") the backward pass recomputes the forward, in another order of float32
    # sums: 1e-5. Arrays whose gradient vanishes in exact arithmetic (the key bias: softmax is shift-invariant) are
    # compared at a thousandth of the largest gradient.
    for remat, tolerance in (("none", 1e-6), ("full", 1e-5)):
        grads = jax.jit(jax.grad(lambda p: loss(scanned.replace(remat=remat), p)))(stacked)
        jax.tree.map(lambda a, b: _close(a, b, tolerance, floor=1e-3 * largest), grads, expected)


def test_scanned_expert_bias_update_is_per_layer():
    unrolled, scanned, params, stacked = _pair("mla_moe_mtp")
    assert moe_layer_paths(scanned) == [(("moe_layers", "mlp"), 0), (("moe_layers", "mlp"), 1),
                                        (("mtp_0", "block", "mlp"), None), (("mtp_1", "block", "mlp"), None)]
    load = jax.random.dirichlet(jax.random.key(2), jnp.ones(8), (4,))
    ours = update_expert_biases(stacked, scanned, load, rate=0.01)
    theirs = stack_layers(unrolled, dict(update_expert_biases(params, unrolled, load, rate=0.01)))
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)
    assert not np.array_equal(ours["moe_layers"]["mlp"]["expert_bias"][0] - stacked["moe_layers"]["mlp"]["expert_bias"][0],
                              ours["moe_layers"]["mlp"]["expert_bias"][1] - stacked["moe_layers"]["mlp"]["expert_bias"][1])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_scanned_decode_equals_unrolled(name):
    unrolled, scanned, params, stacked = _pair(name)
    tokens, _ = _tokens()

    @jax.jit
    def prefill_and_step(p):  # the config is static: which of the pair is read from the params' layout
        config = scanned if is_scanned(unrolled, p) else unrolled
        model, cache = Transformer(config), init_cache(config, 2, 12, "float32")
        logits, cache = model.apply({"params": p}, tokens, cache=cache, cache_index=0, method="decode")
        step, cache = model.apply({"params": p}, tokens[:, :1], cache=cache, cache_index=9, method="decode")
        # Rows at their own slots, as continuous batching writes them (each then attends to the other's last write).
        rows, cache = model.apply({"params": p}, tokens[:, 1:2], cache=cache, cache_index=jnp.array([10, 11]),
                                  method="decode")
        last, _ = model.apply({"params": p}, tokens[:, 2:3], cache=cache, cache_index=jnp.array([11, 10]),
                              method="decode")
        return logits, step, rows, last

    outputs = [prefill_and_step(params), prefill_and_step(stacked)]
    if scanned.num_experts:
        assert [a.shape[0] for a in jax.tree.leaves(init_cache(scanned, 2, 12)["layers"][1])] == [2, 2]
    jax.tree.map(_close, *outputs)
    with pytest.raises(ValueError, match="scan_layers=True"):
        Transformer(scanned).apply({"params": stacked}, tokens, cache=init_cache(unrolled, 2, 12), cache_index=0,
                                   method="decode")


def test_scanned_lora_adapters_are_stacked_and_merge_per_layer():
    from jaxopd.model import lora

    unrolled = CONFIGS["mla_moe_mtp"].replace(lora_rank=2)
    scanned = unrolled.replace(scan_layers=True)
    params = nn.unbox(init_params(unrolled))  # B adapters random too, so each layer's update shows
    stacked = stack_layers(unrolled, dict(params))
    boxed = jax.eval_shape(lambda: Transformer(scanned).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    assert jax.tree.map(lambda a: a.shape, nn.unbox(boxed["params"])) == jax.tree.map(lambda a: a.shape, stacked)
    assert stacked["moe_layers"]["mlp"]["w_down_lora_a"].shape == (2, 8, 16, 2)  # [layers, experts, in, rank]
    tokens, segment_ids = _tokens()
    logits = [jax.jit(lambda p, c=c: Transformer(c).apply({"params": p}, tokens, segment_ids))(p)
              for c, p in ((scanned, stacked), (unrolled, params))]
    _close(*logits)
    merged_config, merged = lora.merged(scanned, stacked)
    assert merged_config == scanned.replace(lora_rank=0)
    jax.tree.map(_close, merged, stack_layers(unrolled, dict(lora.merged(unrolled, params)[1])))


@pytest.mark.slow  # two real compiles of the tiny preset's forward+backward, ~20-40 s on 2 loaded cores
def test_scanned_compile_time_is_nearly_flat_in_depth():
    from benchmarks.scan_compile import compile_seconds
    from jaxopd.model import load_preset

    tiny = load_preset("tiny").replace(scan_layers=True)
    shallow, deep = (compile_seconds(tiny.replace(num_layers=n)) for n in (2, 32))
    print(f"scanned tiny preset, jit(fwd+bwd) compile: 2 layers {shallow:.1f} s, 32 layers {deep:.1f} s")
    assert deep <= 4 * shallow


def test_scanned_is_the_default_and_a_run_choice():
    """On by default; init_from never takes scan_layers from a checkpoint nor compares it (either layout loads)."""
    assert ModelConfig(vocab_size=8, d_model=4, num_layers=1, num_heads=1, mlp_dim=4).scan_layers
    assert "scan_layers" in RUN_CHOICE_FIELDS and "scan_layers" not in architecture_fields()
