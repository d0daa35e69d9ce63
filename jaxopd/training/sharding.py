"""Device mesh, logical-axis rules and multi-host start-up.

The mesh has five axes, outermost first: "data" (pure data parallel; across slices/hosts), "fsdp" (data parallel
with params and optimizer state sharded, ZeRO-3 style, over it and the expert and context axes), "expert" (MoE experts split; tokens are sharded over it
too, so it also acts as data parallelism for the dense layers), "context" (the sequence of each row split: every
token-wise op runs on its block, attention all-gathers keys/values, `jaxopd.kernels.context_parallel`; it
communicates every attention layer, so it sits inside the data axes) and "tensor" (Megatron-style heads/MLP split,
innermost because it communicates every layer).

Params and activations carry logical axis names (CONTRACTS.md); `LOGICAL_AXIS_RULES` maps them to mesh axes in
priority order, Flax style: a rule is skipped when its mesh axes are already used by another dimension of the same
array, so the activation `[batch, seq, embed]` keeps fsdp for batch and leaves embed whole.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxopd.kernels.context_parallel import check_context_split
from jaxopd.training.config import DistributedConfig, MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert_mlp", "tensor"),
    ("experts", "expert"),
    # Weights are sharded over every axis that does not already split them (ZeRO-3 over fsdp x expert x context:
    # the context axis holds a block of every row's tokens, so for weights it is one more data-parallel axis, and a
    # 128K-token stage, whose chips are mostly context shards, needs it to fit the state); expert weights already
    # use "expert" for their expert dimension and fall back to fsdp x context.
    ("embed", ("fsdp", "expert", "context")),
    ("embed", ("fsdp", "context")),
    ("embed", "fsdp"),
    # Activations' sequence axis: split over "context" (context parallelism; size 1 leaves it whole).
    ("seq", "context"),
    ("head_dim", None),
    # MLA's low-rank axes: the up-projections q_b [r, h, q] and kv_b [c, h, q] would otherwise sit whole on every
    # device when tensor=1 (DeepSeek-V3: 0.65 GiB a layer in fp32, x3 with Adam). Their down-projections q_a/kv_a
    # [d, r] already use fsdp for "embed", so they keep the rank whole.
    ("q_lora", ("fsdp", "context")),
    ("q_lora", "fsdp"),
    ("kv_lora", ("fsdp", "context")),
    ("kv_lora", "fsdp"),
    ("norm", None),
    # the stacked axis of scanned decoder layers (jaxopd.model.stacking): every device holds its shard of each layer
    ("layers", None),
)


def mesh_shape(mesh_config: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Sizes for MESH_AXES from config.mesh; one axis may be -1, meaning all the devices the others leave."""
    sizes = [int(getattr(mesh_config, axis)) for axis in MESH_AXES]
    if sum(size == -1 for size in sizes) > 1:
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    if any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
    described = dict(zip(MESH_AXES, sizes))
    fixed = math.prod(size for size in sizes if size != -1)
    if -1 not in sizes and fixed != num_devices:
        raise ValueError(f"config.mesh {described} uses {fixed} devices but {num_devices} exist; make the sizes "
                         f"multiply to {num_devices} or set one axis to -1 to take the rest")
    if num_devices % fixed:
        raise ValueError(f"config.mesh {described} needs a multiple of {fixed} devices but {num_devices} exist; "
                         f"make the product of the fixed sizes divide {num_devices}")
    sizes = [num_devices // fixed if size == -1 else size for size in sizes]
    return tuple(sizes)


def make_mesh(mesh_config: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The device mesh over all (or the given) devices, axes MESH_AXES, sharding propagated automatically."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def batch_partition(mesh: Mesh) -> int:
    """How many ways the batch dimension is split (product of the batch axes)."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str = "microbatch_size") -> None:
    parts = batch_partition(mesh)
    if batch_size % parts:
        axes = " x ".join(f"{axis}={mesh.shape[axis]}" for axis in BATCH_AXES)
        raise ValueError(
            f"{what}={batch_size} is not divisible by the {parts} batch shards of the mesh ({axes}); "
            f"use a {what} that is a multiple of {parts} or change config.mesh")


def check_context_divisible(seq_len: int, mesh: Mesh, what: str = "seq_len") -> None:
    """Raises ValueError unless rows of `seq_len` tokens split evenly over the mesh's context axis."""
    check_context_split(seq_len, mesh.shape["context"], what)


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """Sharding of a batch array [*leading, batch, ...]: batch split over BATCH_AXES, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading_axes), BATCH_AXES))


def logical_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree whose leaves are Flax logically partitioned (unboxed structure); unannotated leaves
    are replicated. Raises ValueError when a dimension does not divide over its mesh axes."""
    specs = nn.get_partition_spec(boxed_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)
    shapes = nn.meta.unbox(boxed_tree)

    def check(path, shape_struct, sharding):
        for dim, axes in zip(shape_struct.shape, sharding.spec):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            parts = math.prod(mesh.shape[axis] for axis in axes)
            if dim % parts:
                raise ValueError(
                    f"{jax.tree_util.keystr(path)} of shape {shape_struct.shape} cannot be split over mesh axes {axes} "
                    f"({parts} ways): dimension {dim} is not divisible; change config.mesh or the model sizes")

    jax.tree_util.tree_map_with_path(check, shapes, shardings)
    return shardings


def bytes_per_device(abstract_tree: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree of shape structs (e.g. the train state) under `shardings`."""
    sizes = jax.tree.map(lambda x, s: math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize,
                         abstract_tree, shardings)
    return int(sum(jax.tree.leaves(sizes)))


def check_fits(state_bytes: int, device: jax.Device, fraction: float = 0.9) -> None:
    """Raises ValueError when the sharded train state alone would take more than `fraction` of a device's memory
    (checked where the device reports its memory: GPUs and TPUs)."""
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit and state_bytes > fraction * limit:
        raise ValueError(
            f"the params + optimizer state need {state_bytes / 2**30:.1f} GiB per device but a {device.device_kind} "
            f"has {limit / 2**30:.1f} GiB: raise config.mesh fsdp/expert/tensor (shard the state more), use more "
            f"devices, or a smaller model")


@contextlib.contextmanager
def mesh_context(mesh: Mesh) -> Iterator[None]:
    """The mesh and LOGICAL_AXIS_RULES in effect, as model code expects while it is traced (its
    `nn.with_logical_constraint` annotations and shard_map over the mesh axes)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield


def within_mesh(mesh: Mesh, jitted: Callable[..., Any]) -> Callable[..., Any]:
    """`jitted`, traced and run inside `mesh_context(mesh)` (what the model's sharding annotations need)."""
    def call(*args):
        with mesh_context(mesh):
            return jitted(*args)
    return call


def abstract_arrays(tree: Any, shardings: Any) -> Any:
    """`tree`'s arrays as ShapeDtypeStructs carrying `shardings` (a restore target: orbax reads into those shards)."""
    return jax.tree.map(lambda x, named: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=named), tree, shardings)


def initialize_distributed(distributed: DistributedConfig) -> None:
    """Joins the multi-host job when launched as one: config.distributed.coordinator_address (or the standard
    JAX_COORDINATOR_ADDRESS) with num_processes/process_id, or `auto_detect` on a TPU pod/SLURM where JAX finds them.
    Cross-process collectives on CPU use gloo (the jax default; set explicitly so tests do not depend on it)."""
    address = distributed.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not (address or distributed.auto_detect):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=address or None,
        num_processes=distributed.num_processes if distributed.num_processes > 0 else None,
        process_id=distributed.process_id if distributed.process_id >= 0 else None,
    )


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh, leading_axes: int = 0) -> dict[str, jax.Array]:
    """Global arrays from this process's rows of the batch (multi-host: each process holds its slice of the batch
    axis, in process order)."""
    sharding = batch_sharding(mesh, leading_axes)
    return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in batch.items()}


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a global array whose first axis was assembled from the processes' rows in process
    order (`global_batch`): its contiguous block of `rows / process_count` rows, read from the shards this process
    holds (never a gather of the whole array), whatever the array's sharding."""
    rows = array.shape[0] // jax.process_count()
    start = jax.process_index() * rows
    if array.is_fully_addressable:
        return np.asarray(array)[start:start + rows]
    local = np.empty((rows, *array.shape[1:]), array.dtype)
    filled = np.zeros(local.shape, bool)
    for shard in array.addressable_shards:
        first, last, _ = shard.index[0].indices(array.shape[0])
        low, high = max(first, start), min(last, start + rows)
        if low < high:
            target = (slice(low - start, high - start), *shard.index[1:])
            local[target] = np.asarray(shard.data)[low - first:high - first]
            filled[target] = True
    if not filled.all():
        raise ValueError(f"rows {start}:{start + rows} of an array sharded as {array.sharding} are not all held by "
                         f"process {jax.process_index()}: shard its first axis over the mesh's batch axes")
    return local


def process_sum(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over the processes (float64, the same on every process); the values themselves on one."""
    if jax.process_count() == 1:
        return dict(values)
    from jax.experimental import multihost_utils
    # Gathered as the float64's two uint32 words: jax without x64 would round float64 to float32 on the way.
    words = np.asarray(list(values.values()), np.float64).view(np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(words), np.uint32).view(np.float64)
    return dict(zip(values, gathered.sum(0).tolist()))
