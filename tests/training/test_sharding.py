"""Mesh sizes, the logical-axis rules and the errors for meshes and batches that do not fit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from jaxopd.model import ModelConfig, Transformer
from jaxopd.training import sharding
from jaxopd.training.config import MeshConfig


def _mesh_config(**sizes):
    return MeshConfig(**{"data": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1, **sizes})


def test_minus_one_takes_the_remaining_devices():
    assert sharding.mesh_shape(_mesh_config(data=-1, tensor=2), 8) == (4, 1, 1, 1, 2)
    assert sharding.mesh_shape(_mesh_config(fsdp=-1, expert=2), 8) == (1, 4, 2, 1, 1)
    assert sharding.mesh_shape(_mesh_config(fsdp=2, context=-1), 8) == (1, 2, 1, 4, 1)
    mesh = sharding.make_mesh(_mesh_config(data=2, fsdp=-1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "expert": 1, "context": 1, "tensor": 1}


@pytest.mark.parametrize("sizes, message", [
    (dict(data=16), "uses 16 devices but 8 exist"),
    (dict(data=3, fsdp=-1), "multiple of 3 devices"),
    (dict(data=-1, fsdp=-1), "at most one axis may be -1"),
    (dict(tensor=0), "positive or -1"),
])
def test_mesh_errors_say_what_to_change(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.mesh_shape(_mesh_config(**sizes), 8)


def test_batch_not_divisible_by_batch_shards():
    mesh = sharding.make_mesh(_mesh_config(data=2, fsdp=2, tensor=2))
    sharding.check_batch_divisible(8, mesh)
    with pytest.raises(ValueError, match="microbatch_size=6 is not divisible by the 4 batch shards"):
        sharding.check_batch_divisible(6, mesh)


@pytest.mark.parametrize("names, expected", [
    # Weights: ZeRO-3 over every data-like axis, the context axis included.
    (("embed", "mlp"), P(("fsdp", "expert", "context"), "tensor")),
    (("vocab", "embed"), P("tensor", ("fsdp", "expert", "context"))),
    (("experts", "embed", "expert_mlp"), P("expert", ("fsdp", "context"), "tensor")),
    (("embed", "q_lora"), P(("fsdp", "expert", "context"), None)),
    # MLA's up-projections q_b / kv_b: the low rank over fsdp x context, not replicated on every device
    (("q_lora", "q_heads", "head_dim"), P(("fsdp", "context"), "tensor", None)),
    (("kv_lora", "q_heads", "head_dim"), P(("fsdp", "context"), "tensor", None)),
    (("norm",), P(None)),
    (("batch", "seq", "embed"), P(("data", "fsdp", "expert"), "context", None)),
    (("batch", "seq", "vocab"), P(("data", "fsdp", "expert"), "context", "tensor")),
    (("batch", "seq", "q_heads", "head_dim"), P(("data", "fsdp", "expert"), "context", "tensor", None)),
])
def test_logical_rules(names, expected):
    assert nn.logical_to_mesh_axes(names, sharding.LOGICAL_AXIS_RULES) == expected


def test_every_contract_name_has_a_rule():
    contract = {"vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "experts", "expert_mlp", "q_lora",
                "kv_lora", "norm", "batch", "seq"}
    assert contract <= {name for name, _ in sharding.LOGICAL_AXIS_RULES}


def test_logical_shardings_reject_indivisible_dims():
    mesh = sharding.make_mesh(_mesh_config(fsdp=8))
    boxed = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((12, 16), "float32"), ("embed", "mlp"))}
    with pytest.raises(ValueError, match=r"\['w'\] of shape \(12, 16\) cannot be split over mesh axes"):
        sharding.logical_shardings(boxed, mesh)
    boxed = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((16, 12), "float32"), ("embed", "mlp"))}
    assert sharding.logical_shardings(boxed, mesh)["w"].spec == P(("fsdp", "expert", "context"), "tensor")


def test_state_bytes_per_device_and_too_large_model_error():
    mesh = sharding.make_mesh(_mesh_config(fsdp=8))
    boxed = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((64, 16), "float32"), ("embed", "mlp")),
             "scale": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((16,), "float32"), ("norm",))}
    shardings = sharding.logical_shardings(boxed, mesh)
    # w split 8 ways over embed: 8 x 16 floats; the norm scale replicated: 16 floats.
    assert sharding.bytes_per_device(nn.meta.unbox(boxed), shardings) == (8 * 16 + 16) * 4

    class Device:
        device_kind = "small accelerator"

        def memory_stats(self):
            return {"bytes_limit": 2**30}

    sharding.check_fits(2**29, Device())
    with pytest.raises(ValueError, match="need 2.0 GiB per device but a small accelerator has 1.0 GiB: raise config"):
        sharding.check_fits(2**31, Device())


def test_rows_not_divisible_by_the_context_axis():
    mesh = sharding.make_mesh(_mesh_config(fsdp=2, context=4))
    sharding.check_context_divisible(1024, mesh)
    with pytest.raises(ValueError, match=r"seq_len=1022 is not divisible .*config.mesh.context=4"):
        sharding.check_context_divisible(1022, mesh)


def test_mla_up_projections_are_split_over_fsdp():
    # With tensor=1 the heads axis is whole, so only the low-rank axis can split q_b / kv_b (DeepSeek-V3: 37.8 GiB
    # of fp32 state per chip of v5p-2048 when they sat whole on every device).
    config = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, mlp_dim=48, attention="mla",
                         q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    boxed = jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    shardings = sharding.logical_shardings(boxed["params"], sharding.make_mesh(_mesh_config(fsdp=8)))
    shapes = nn.meta.unbox(boxed["params"])
    attention = {name: shardings["layers"]["attention"][name].shard_shape(shapes["layers"]["attention"][name].shape)
                 for name in ("q_b", "kv_b")}
    assert attention == {"q_b": (1, 3, 4, 12), "kv_b": (1, 2, 4, 16)}  # [layers, rank / 8, heads, q]
