"""The model on an 8-device CPU mesh (params placed by logical axis rules) computes what it computes on one device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GQA, MLA_MOE, init_params, random_tokens

from jaxopd.model import Transformer

AXES = ("data", "fsdp", "tensor", "expert")
# A simple rule table for this test only (the trainer owns the real one). Flax gives each mesh axis to the first
# logical axis of an array that asks for it, so ("batch", "embed") activations shard batch over fsdp, not embed.
RULES = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("expert_mlp", "tensor"),
    ("q_lora", None),
    ("kv_lora", None),
    ("norm", None),
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, mesh_shape",
    [
        (MLA_MOE.replace(vocab_size=96), (2, 2, 2, 1)),
        (MLA_MOE.replace(vocab_size=96, expert_parallel=True), (1, 2, 1, 4)),
        (GQA.replace(vocab_size=96), (2, 2, 2, 1)),
    ],
    ids=["mla_moe-2x2x2x1", "mla_moe_expert_parallel-1x2x1x4", "gqa-2x2x2x1"],
)
def test_sharded_features_equal_single_device(config, mesh_shape):
    params = init_params(config)
    tokens = random_tokens(config, (4, 8))
    segment_ids = jnp.array([[1] * 8, [1] * 3 + [2] * 5, [0] * 2 + [1] * 6, [1] * 6 + [0] * 2])

    def features(p, t, s):
        return Transformer(config).apply({"params": p}, t, s, method="features")

    expected = jax.jit(features)(nn.unbox(params), tokens, segment_ids)

    auto = (jax.sharding.AxisType.Auto,) * len(AXES)  # as the trainer's mesh; Explicit mode is not supported
    mesh = jax.make_mesh(mesh_shape, AXES, axis_types=auto, devices=jax.devices()[:8])
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(params), mesh, RULES)
    sharded_params = jax.device_put(nn.unbox(params), shardings)
    data_sharding = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec("batch", "seq"), mesh, RULES)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        # Initializing under the mesh works with any dummy batch (expert-parallel dispatch is skipped at init).
        jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
        inputs = (sharded_params, *jax.device_put((tokens, segment_ids), data_sharding))
        got = jax.jit(features)(*inputs)
        # config.expert_parallel routes the experts through the shard_map kernel, and only then.
        assert ("shard_map" in str(jax.make_jaxpr(features)(*inputs))) == config.expert_parallel
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(sharded_params))
    for want, have in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(have), np.asarray(want), rtol=1e-5, atol=1e-5)
