"""Context parallelism: self-attention over a sequence split along a mesh axis, one block of tokens per device.

Each device keeps its own block of queries and all-gathers the keys/values of the whole row over the context axis,
with their segment ids and positions, then runs an ordinary kernel of attention.py on [local queries x all keys]:
the causal and per-document masks come from the gathered positions and segment ids (the rule of masks.py), so the
result equals single-device attention exactly, whatever the documents' boundaries. The backward pass is the
all-gather's transpose, a reduce-scatter of the keys'/values' gradients back to their owners.

An all-gather rather than a ring (ring attention passes key blocks round while computing): simpler and exact, at
the price of holding one layer's keys/values for the whole row on every device and not overlapping the gather with
compute. Blocks are contiguous, so under causality the last device has the most visible keys (a zigzag layout would
balance that; the blockwise kernel already skips the tiles no query sees).

Only the context axis is manual (`jax.shard_map(axis_names={axis})`); batch, heads and weights keep whatever
sharding the other mesh axes give them. Shapes: see jaxopd/kernels/__init__.py.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxopd.kernels.attention import attention, mla_naive

# "splash" tiles one square self-attention ([len, len]); here local queries meet the whole row's keys.
CONTEXT_PARALLEL_IMPLEMENTATIONS = ("xla", "cudnn", "blockwise")


def check_context_split(seq_len: int, shards: int, what: str = "seq_len") -> None:
    """Raises ValueError unless `seq_len` tokens split into `shards` equal blocks (the mesh's context axis)."""
    if seq_len % shards:
        raise ValueError(f"{what}={seq_len} is not divisible by the mesh's context axis (config.mesh.context="
                         f"{shards}): each device holds seq_len / context tokens of a row; use a seq_len that is a "
                         f"multiple of {shards} or change config.mesh.context")


def _over_context(
    local_fn: Callable[..., jnp.ndarray],
    local: Sequence[jnp.ndarray],
    gathered: Sequence[jnp.ndarray],
    replicated: Sequence[Any],
    mesh: Any,
    axis: str,
) -> jnp.ndarray:
    """`local_fn(*local, *gathered, *replicated)` with every `[batch, len, ...]` array of `local` and `gathered` split
    along len over mesh axis `axis`: `local` stay the device's block, `gathered` are all-gathered to the whole row,
    `replicated` (weights) are passed whole. The result `[batch, len, ...]` is split like `local`."""
    if axis not in mesh.shape:
        raise ValueError(f"context parallelism over axis {axis!r}: the mesh has axes {tuple(mesh.shape)}")
    shards = mesh.shape[axis]
    for array in (*local, *gathered):
        check_context_split(array.shape[1], shards, "sequence length")
    num_local, num_gathered = len(local), len(gathered)

    def body(*args):
        blocks = args[:num_local]
        rows = [jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in args[num_local:num_local + num_gathered]]
        return local_fn(*blocks, *rows, *args[num_local + num_gathered:])

    split = P(None, axis)
    return jax.shard_map(
        body, mesh=mesh, in_specs=(split,) * (num_local + num_gathered) + (P(),) * len(replicated),
        out_specs=split, axis_names={axis},
    )(*local, *gathered, *replicated)


def _check_implementation(implementation: str) -> None:
    if implementation not in CONTEXT_PARALLEL_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation={implementation!r} does not run context-parallel (local queries "
                         f"against the gathered row): use one of {CONTEXT_PARALLEL_IMPLEMENTATIONS}, or "
                         "config.mesh.context=1")


def context_parallel_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    *,
    segment_ids: jnp.ndarray,
    positions: jnp.ndarray,
    scale: float,
    mesh: Any,
    axis: str = "context",
    sliding_window: Optional[int] = None,
    implementation: str = "xla",
    block_q: int = 512,
    block_kv: int = 512,
) -> jnp.ndarray:
    """`attention.attention` for self-attention (q and k/v of the same tokens) with the sequence split over `axis`.

    Args:
      q: `[batch, len, heads, key_dim]`; k: `[batch, len, kv_heads, key_dim]`; v: `[batch, len, kv_heads, value_dim]`.
      segment_ids, positions: `[batch, len]` int, of the tokens of q and k alike.
      mesh: the mesh (or abstract mesh) whose axis `axis` splits len; len must divide by its size.
      scale, sliding_window, implementation ("xla", "cudnn" or "blockwise"), block_q, block_kv: as `attention`.

    Returns:
      `[batch, len, heads, value_dim]` in q.dtype, split over `axis` like q.
    """
    _check_implementation(implementation)

    def local(q, q_segment_ids, q_positions, k, v, kv_segment_ids, kv_positions):
        return attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                         q_positions=q_positions, kv_positions=kv_positions, scale=scale,
                         sliding_window=sliding_window, implementation=implementation, block_q=block_q,
                         block_kv=block_kv)

    return _over_context(local, (q, segment_ids, positions), (k, v, segment_ids, positions), (), mesh, axis)


def context_parallel_mla(
    q_nope: jnp.ndarray,
    q_rope: jnp.ndarray,
    latent: jnp.ndarray,
    k_rope: jnp.ndarray,
    w_uk: jnp.ndarray,
    w_uv: jnp.ndarray,
    *,
    segment_ids: jnp.ndarray,
    positions: jnp.ndarray,
    scale: float,
    mesh: Any,
    axis: str = "context",
    implementation: str = "xla",
    block_q: int = 512,
    block_kv: int = 512,
) -> jnp.ndarray:
    """`attention.mla_naive` for self-attention with the sequence split over `axis`.

    What travels is the compressed latent and the shared rope key (kv_lora_rank + qk_rope_head_dim numbers per token:
    576 for DeepSeek-V3), not the per-head keys and values (heads * (qk_head_dim + v_head_dim): 40960), 71x less in
    the gather and in the backward reduce-scatter; each device then up-projects the whole row itself (w_uk, w_uv), a
    few percent of the local attention's FLOPs at long context.

    Args:
      q_nope, q_rope, latent, k_rope, w_uk, w_uv: as `mla_naive`, with q_len == kv_len == len.
      segment_ids, positions: `[batch, len]` int.
      mesh, axis: as `context_parallel_attention`; scale, implementation, block_q, block_kv: as `mla_naive`.

    Returns:
      `[batch, len, heads, v_head_dim]` in q_nope.dtype, split over `axis`.
    """
    _check_implementation(implementation)

    def local(q_nope, q_rope, q_segment_ids, q_positions, latent, k_rope, kv_segment_ids, kv_positions, w_uk, w_uv):
        return mla_naive(q_nope, q_rope, latent, k_rope, w_uk, w_uv, q_segment_ids=q_segment_ids,
                         kv_segment_ids=kv_segment_ids, q_positions=q_positions, kv_positions=kv_positions,
                         scale=scale, implementation=implementation, block_q=block_q, block_kv=block_kv)

    return _over_context(local, (q_nope, q_rope, segment_ids, positions), (latent, k_rope, segment_ids, positions),
                         (w_uk, w_uv), mesh, axis)


def context_shards(mesh: Any, axis: str = "context") -> int:
    """How many blocks mesh axis `axis` splits a sequence into: 1 with no mesh set or no such axis."""
    return 1 if mesh.empty or axis not in mesh.shape else int(mesh.shape[axis])
