"""A MoE model's loss and gradients on an expert-parallel 8-device CPU mesh are the same with
model.expert_dispatch="all_to_all" as with "all_gather", and as on one device; model.moe_capacity_factor drops
what a float64 brute force says it drops."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import MLA_MOE, init_params, random_tokens

from jaxopd.kernels.moe import route
from jaxopd.model import Transformer
from jaxopd.model.moe import MoE
from jaxopd.model.config import RUN_CHOICE_FIELDS, architecture_fields
from jaxopd.training import sharding
from jaxopd.training.config import MeshConfig
from jaxopd.training.sharding import LOGICAL_AXIS_RULES


pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)")


@pytest.mark.slow  # three compiles of a model forward+backward: ~35-45 s on 2 loaded cores
@pytest.mark.parametrize("lora_rank", [0, 2], ids=["base", "lora-experts"])
def test_all_to_all_dispatch_loss_and_grads_equal_all_gather(lora_rank):
    # No MTP blocks: their MoE layers would only add compile time.
    base = MLA_MOE.replace(vocab_size=96, mtp_depth=0, expert_parallel=True, lora_rank=lora_rank, lora_targets=("experts",))
    params = nn.unbox(init_params(base))
    tokens = random_tokens(base, (8, 8))  # one row per device: the trainer's rules shard the batch 8 ways
    segment_ids = jnp.array([[1] * 8, [1] * 3 + [2] * 5, [0] * 2 + [1] * 6, [1] * 6 + [0] * 2] * 2)
    probe = jax.random.normal(jax.random.key(3), (8, 8, base.d_model))

    def loss_and_grads(config, params, tokens, segment_ids):
        def loss(p):
            features = Transformer(config).apply({"params": p}, tokens, segment_ids, method="features")
            return jnp.sum(features.hidden * probe) + features.moe_balance_loss
        return jax.value_and_grad(loss)(params)

    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, expert=4), jax.devices()[:8])
    results = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(init_params(base)), mesh, LOGICAL_AXIS_RULES)
        data_sharding = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec("batch", "seq"), mesh,
                                                    LOGICAL_AXIS_RULES)
        inputs = (jax.device_put(params, shardings), *jax.device_put((tokens, segment_ids), data_sharding))
        for dispatch in ("all_gather", "all_to_all"):
            config = base.replace(expert_dispatch=dispatch)
            fn = jax.jit(lambda *a, config=config: loss_and_grads(config, *a))
            jaxpr = str(jax.make_jaxpr(fn)(*inputs))
            assert ("all_to_all" in jaxpr) == (dispatch == "all_to_all")  # the choice reaches the kernel
            results[dispatch] = fn(*inputs)
    one_device = jax.jit(lambda *a: loss_and_grads(base.replace(expert_parallel=False), *a))(
        params, tokens, segment_ids)

    (loss, grads), (want_loss, want_grads) = results["all_to_all"], results["all_gather"]
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(one_device[0]), rtol=1e-5)
    expert_leaves = 0
    for (path, g), r, single in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads),
                                    jax.tree.leaves(one_device[1])):
        name = jax.tree_util.keystr(path)
        expert_leaves += "w_gate" in name and "shared" not in name and np.abs(np.asarray(g)).max() > 0
        # float32 sums in other orders: the dispatches and one device differ by ~1e-6 of each leaf's scale.
        atol = 1e-5 * np.abs(np.asarray(single)).max()
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=atol, err_msg=name)
        np.testing.assert_allclose(np.asarray(g), np.asarray(single), rtol=1e-4, atol=atol, err_msg=name)
    assert expert_leaves > 0  # routed experts' weights (or their adapters) take gradient


def test_expert_dispatch_is_a_checked_run_choice():
    with pytest.raises(ValueError, match="config.expert_dispatch='ragged' must be"):
        MLA_MOE.replace(expert_dispatch="ragged")
    # init_from compares only the architecture: a run may change its dispatch against any checkpoint.
    assert "expert_dispatch" in RUN_CHOICE_FIELDS and "expert_dispatch" not in architecture_fields()


def test_capacity_factor_drops_the_pairs_past_each_block_as_numpy_says():
    # One MoE layer on 8 devices (expert=4 x fsdp=2): 4 tokens a device, 8 pairs; capacity factor 0.5 -> C =
    # ceil(0.5 * 8 / 4) = 1 row per peer block, so the crowded peers drop pairs. moe_capacity_factor=None must
    # give the dropless layer, and the difference between the two must be the dropped pairs' weighted expert
    # outputs, computed in float64 from the routing.
    base = MLA_MOE.replace(expert_parallel=True, expert_dispatch="all_to_all", num_shared_experts=0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4, base.d_model)).astype(np.float32)
    segment_ids = jnp.ones((8, 4), jnp.int32)
    params = nn.unbox(MoE(base).init(jax.random.key(0), jnp.asarray(x), segment_ids))["params"]
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, expert=4), jax.devices()[:8])
    outputs = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        for capacity in (None, 0.5):
            layer = MoE(base.replace(moe_capacity_factor=capacity))
            outputs[capacity] = np.asarray(jax.jit(lambda p, a: layer.apply({"params": p}, a, segment_ids)[0])(
                params, jnp.asarray(x)), np.float64)
    dense = np.asarray(jax.jit(lambda p, a: MoE(base.replace(expert_parallel=False)).apply(
        {"params": p}, a, segment_ids)[0])(params, jnp.asarray(x)), np.float64)
    np.testing.assert_allclose(outputs[None], dense, rtol=1e-5, atol=1e-5)

    x_NxD = x.reshape(-1, base.d_model)
    ids, weights, _ = route(jnp.asarray(x_NxD) @ params["router"], params["expert_bias"],
                            top_k=base.num_experts_per_token, score=base.router_score,
                            num_groups=base.num_expert_groups, topk_groups=base.topk_groups,
                            normalize=base.norm_topk_prob, scale=base.routed_scaling_factor)
    ids, weights = np.asarray(ids), np.asarray(weights, np.float64)
    w_gate, w_up, w_down = (np.asarray(params[name], np.float64) for name in ("w_gate", "w_up", "w_down"))
    k, per_device, local = base.num_experts_per_token, 4, base.num_experts // 4
    missing = np.zeros_like(x_NxD, np.float64)
    dropped = 0
    for device in range(8):  # tokens are batch-major, 4 consecutive ones a device
        pairs = sorted((ids[t, u], t * k + u) for t in range(device * per_device, (device + 1) * per_device)
                       for u in range(k))
        for peer in range(4):  # each peer block keeps its first C = 1 pair in (expert, pair) order
            for expert, pair in [p for p in pairs if p[0] // local == peer][1:]:
                t, u = divmod(pair, k)
                gate, up = x_NxD[t] @ w_gate[expert], x_NxD[t] @ w_up[expert]
                missing[t] += weights[t, u] * ((gate / (1 + np.exp(-gate)) * up) @ w_down[expert])
                dropped += 1
    assert 0 < dropped < ids.size
    np.testing.assert_allclose(outputs[0.5], outputs[None] - missing.reshape(x.shape), rtol=1e-5, atol=1e-5)


def test_capacity_factor_is_checked_and_a_run_choice():
    with pytest.raises(ValueError, match="config.moe_capacity_factor=0 must be > 0"):
        MLA_MOE.replace(expert_parallel=True, expert_dispatch="all_to_all", moe_capacity_factor=0)
    with pytest.raises(ValueError, match="applies to all-to-all expert dispatch only"):
        MLA_MOE.replace(expert_parallel=True, moe_capacity_factor=1.25)  # all_gather dispatch
    with pytest.raises(ValueError, match="applies to all-to-all expert dispatch only"):
        MLA_MOE.replace(expert_dispatch="all_to_all", moe_capacity_factor=1.25)  # not expert-parallel
    assert "moe_capacity_factor" in RUN_CHOICE_FIELDS and "moe_capacity_factor" not in architecture_fields()
@pytest.mark.slow  # two compiles of a model forward+backward: ~40 s on 2 loaded cores
def test_tiled_grouped_matmul_model_equals_ragged_dot_and_is_chosen_on_cpu():
    base = MLA_MOE.replace(vocab_size=96, mtp_depth=0)
    params = nn.unbox(init_params(base))
    tokens = random_tokens(base, (2, 8))
    probe = jax.random.normal(jax.random.key(3), (2, 8, base.d_model))

    def loss_and_grads(config):
        def loss(p):
            return jnp.sum(Transformer(config).apply({"params": p}, tokens, method="features").hidden * probe)
        return jax.jit(jax.value_and_grad(loss))(params)

    (tiled_loss, tiled_grads), (ragged_loss, ragged_grads) = (
        loss_and_grads(base.replace(grouped_matmul=kind)) for kind in ("tiled", "ragged_dot"))
    np.testing.assert_allclose(tiled_loss, ragged_loss, rtol=1e-5)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(tiled_grads), jax.tree_util.tree_leaves(ragged_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(np.asarray(r)).max(), err_msg=str(path))
    assert base.grouped_matmul == "auto" and base.grouped_matmul_kernel == "tiled"  # these tests run on CPU
    with pytest.raises(ValueError, match="config.grouped_matmul='dense' must be"):
        base.replace(grouped_matmul="dense")
    assert "grouped_matmul" in RUN_CHOICE_FIELDS and "grouped_matmul" not in architecture_fields()
