"""The decode KV cache: a plain pytree of arrays, created by `init_cache` and threaded through `method="decode"`.

Layout (`max_len` slots per row; slot i of every layer holds the token written at cache index i):
  {"segment_ids": [batch, max_len] int32,      # 0 = empty slot (or padding), never attended to
   "layers": (per decoder layer, in order; with config.scan_layers per stack of layers
              (`jaxopd.model.stacking.layer_stacks`), each array with a leading [layers of the stack] axis)
   "mtp": one layer's arrays as below, only with init_cache(mtp=True) (speculative decoding's drafter)
       GQA: {"k": [batch, max_len, kv_heads, head_dim], "v": [batch, max_len, kv_heads, head_dim]}
       MLA: {"latent": [batch, max_len, kv_lora_rank],   # c_kv after kv_a_norm (DeepSeek-V2 eq. 9)
             "k_rope": [batch, max_len, qk_rope_head_dim]}}   # the shared key, rotary embedding applied
MLA keeps kv_lora_rank + qk_rope_head_dim numbers per token per layer, the point of MLA (DeepSeek-V2 sec. 2.1.2).

Causality inside the cache is by slot: a query written at slot s sees slots <= s of its own segment. Rotary
embeddings use the caller's token positions, so left-padded prompts (pad slots with segment 0, positions restarting at
0 on the first real token) decode exactly like their unpadded forward pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxopd.kernels.context_parallel import context_shards
from jaxopd.model.config import ModelConfig
from jaxopd.model.stacking import layer_stacks


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: str = "bfloat16", mtp: bool = False) -> dict:
    """An empty cache for `batch` rows of `max_len` tokens (layout in the module docstring), keys/values in `dtype`
    ("auto": the model's compute dtype `config.dtype`). mtp: also an "mtp" entry, one layer's keys/values (as a
    "layers" entry unstacked) for MTP depth 1's block, which `Transformer.decode_mtp` drafts with."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"init_cache: batch={batch} and max_len={max_len} must both be >= 1")
    if isinstance(dtype, str) and dtype == "auto":
        dtype = config.dtype
    if config.attention == "mla":
        layer = {
            "latent": jnp.zeros((batch, max_len, config.kv_lora_rank), dtype),
            "k_rope": jnp.zeros((batch, max_len, config.qk_rope_head_dim), dtype),
        }
    else:
        shape = (batch, max_len, config.kv_heads, config.gqa_head_dim)
        layer = {name: jnp.zeros(shape, dtype) for name in ("k", "v")}
    if config.scan_layers:
        layers = tuple({name: jnp.zeros((group.count, *array.shape), dtype) for name, array in layer.items()}
                       for group in layer_stacks(config))
    else:
        layers = tuple(dict(layer) for _ in range(config.num_layers))
    cache = {"segment_ids": jnp.zeros((batch, max_len), jnp.int32), "layers": layers}
    if mtp:
        cache["mtp"] = dict(layer)
    return cache


def grow_cache(config: ModelConfig, cache: dict, max_len: int) -> dict:
    """`cache` (from `init_cache(config, ...)`) with empty slots appended up to `max_len` slots a row: the slots
    already written keep their contents and indices, so decoding goes on as in a cache made that long at first."""
    grow = lambda array, axis: jnp.pad(array, [(0, max_len - array.shape[axis]) if i == axis else (0, 0)
                                               for i in range(array.ndim)])
    slot_axis = 2 if config.scan_layers else 1  # scanned stacks lead with [layers]
    grown = {"segment_ids": grow(cache["segment_ids"], 1),
             "layers": jax.tree.map(lambda array: grow(array, slot_axis), cache["layers"])}
    if "mtp" in cache:
        grown["mtp"] = jax.tree.map(lambda array: grow(array, 1), cache["mtp"])
    return grown


def row_slots(cache_index: jnp.ndarray | int, batch: int, t: int) -> jnp.ndarray:
    """The cache slots `[batch, t]` that `t` new tokens per row are written at: [cache_index, cache_index + t) for
    one index shared by all rows (`[]`), or from each row's own (`[batch]`, rows decoding at different lengths as in
    continuous batching)."""
    start = jnp.asarray(cache_index, jnp.int32)
    start = start[:, None] if start.ndim == 1 else start
    return jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (batch, t))


def write(cache_array: jnp.ndarray, new: jnp.ndarray, cache_index: jnp.ndarray | int,
          layer: jnp.ndarray | None = None) -> jnp.ndarray:
    """`cache_array [batch, max_len, ...]` with `new [batch, t, ...]` written at slots [cache_index, cache_index + t);
    `cache_index` is `[]` (all rows) or `[batch]` (each row's own). With `layer` (`[]`), `cache_array` is a scanned
    stack's `[layers, batch, max_len, ...]` and the write goes to that layer, in place."""
    lead = () if layer is None else (layer,)
    new = new.astype(cache_array.dtype)[(None,) * len(lead)]
    trailing = (0,) * (new.ndim - 2 - len(lead))  # the dims after the slot axis
    if jnp.ndim(cache_index) == 1:  # rows are the axis after `lead`
        write_row = lambda row, new_row, start: jax.lax.dynamic_update_slice(row, new_row, (*lead, start, *trailing))
        rows = len(lead)
        return jax.vmap(write_row, in_axes=(rows, rows, 0), out_axes=rows)(cache_array, new, cache_index)
    return jax.lax.dynamic_update_slice(cache_array, new, (*lead, 0, cache_index, *trailing))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedLayerCache:
    """One layer's cache inside a scanned stack: the stack's whole `arrays` (`[layers, batch, max_len, ...]`, the
    layer dicts of the module docstring with a leading layers axis) and this layer's index `layer` (`[]` int32).

    Scanned decode carries the stack's cache through the layer scan rather than scanning over it: scanned over, every
    step would copy each layer's cache out of the stack and the updated one into a new stack, O(max_len) of copying
    per token per layer; carried, a step writes only its new keys/values in place."""

    arrays: dict
    layer: jax.Array

    def write(self, new: dict, cache_index: jnp.ndarray | int) -> "StackedLayerCache":
        """`new` (`[batch, t, ...]` per name) written at this layer's slots [cache_index, cache_index + t)."""
        return StackedLayerCache({name: write(self.arrays[name], value, cache_index, self.layer)
                                  for name, value in new.items()}, self.layer)

    def read(self) -> dict:
        """This layer's arrays, `[batch, max_len, ...]` per name."""
        return {name: jax.lax.dynamic_index_in_dim(stack, self.layer, 0, keepdims=False)
                for name, stack in self.arrays.items()}


def slot_positions(batch: int, q_len: int, max_len: int, cache_index: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Positions for the attention mask in decode: the queries' slots `[batch, q_len]` and all slots `[batch, max_len]`."""
    q_slots = row_slots(cache_index, batch, q_len)
    kv_slots = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len))
    return q_slots, kv_slots


def attention_context(
    new: dict,
    positions: jnp.ndarray,
    segment_ids: jnp.ndarray,
    cache: dict | None,
    cache_index: jnp.ndarray | None,
    cache_segment_ids: jnp.ndarray | None,
) -> tuple[dict, dict, dict | None]:
    """What the queries of one attention layer attend to.

    Training/forward (`cache` None): the new keys/values themselves, masked by token positions and segment ids.
    Decode: `new` ([batch, t, ...] arrays) written into the layer's `cache` (a dict, or a `StackedLayerCache` in
    scanned decode) at `cache_index`; the queries attend to the whole cache, masked by slot and by `cache_segment_ids`
    (the cache's segment ids with this step's already written).

    Returns (arrays to attend to, keyword arguments for the kernels' mask, the updated layer cache or None).
    """
    if cache is None:
        mask = dict(q_segment_ids=segment_ids, kv_segment_ids=segment_ids, q_positions=positions, kv_positions=positions)
        return new, mask, None
    if isinstance(cache, StackedLayerCache):
        updated = cache.write(new, cache_index)
        attended = updated.read()
    else:
        updated = attended = {name: write(cache[name], value, cache_index) for name, value in new.items()}
    batch, q_len = segment_ids.shape
    q_slots, kv_slots = slot_positions(batch, q_len, cache_segment_ids.shape[1], cache_index)
    mask = dict(q_segment_ids=segment_ids, kv_segment_ids=cache_segment_ids, q_positions=q_slots, kv_positions=kv_slots)
    return attended, mask, updated


def self_attention_shards(cache: dict | None, initializing: bool) -> int:
    """How many blocks the sequence of this forward pass is split into over the "context" axis of the mesh set with
    `jax.set_mesh` (context parallelism, `jaxopd.kernels.context_parallel`): 1 with no mesh, no such axis, or at init
    (which only needs shapes). Decode is refused there: one new token per row does not split over devices."""
    shards = context_shards(jax.sharding.get_abstract_mesh())
    if shards > 1 and cache is not None:
        raise ValueError(f"decoding against a KV cache (sampling, generation) does not run context-parallel, but the "
                         f"mesh's context axis is {shards}: decode on a mesh with context=1 (config.mesh.context=1)")
    return 1 if initializing else shards
