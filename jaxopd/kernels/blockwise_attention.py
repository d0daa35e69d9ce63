"""Memory-efficient attention in pure JAX: softmax accumulated online over key blocks, never a [q_len, kv_len] array.

Same inputs, masking rule (masks.py) and result as `attention.attention` (call it with implementation="blockwise",
which checks the inputs). The algorithm is that of Rabe & Staats 2021 ("Self-attention does not need O(n^2) memory")
and FlashAttention-2 (Dao 2023, Alg. 1 and 2):

- forward: for each query block, a scan over key blocks keeps the running row max m, row sum l and unnormalised
  output acc in float32 (acc <- acc * exp(m_old - m_new) + exp(logits - m_new) v); it returns the output and the
  row logsumexp m + log l.
- backward (custom_vjp): each [block_q, block_kv] tile of probabilities is recomputed as exp(logits - logsumexp);
  with delta = rowsum(d_out * out), d_logits = p * (d_out v^T - delta). An outer scan over key blocks accumulates
  dk, dv; its inner scan over query blocks adds each tile's dq into one float32 dq buffer.
So the residuals kept between forward and backward are q, k, v, out and logsumexp: O(len), not O(q_len * kv_len).

Tiles whose mask is all false (future keys under causality, other documents, beyond the sliding window, padding) are
skipped with lax.cond, by a [num_q_blocks, num_kv_blocks] table computed once (`_visible_tiles`: a
[batch, block_q, block_kv] integer comparison per tile, against a tile's matmuls that cost heads * head_dim times
more). Every tile is still visited by the loops, so very small blocks pay loop overhead.

Shapes: see jaxopd/kernels/__init__.py; inside a tile, I is its query block and J its key/value block.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxopd.kernels.masks import attention_mask

# Finite floor for masked logits: the running max starts here, and exp(floor - real max) underflows to 0 without the
# inf - inf = NaN that -inf would give on rows that have seen no key yet.
_MASKED = float(jnp.finfo(jnp.float32).min)


def _to_blocks(x: jnp.ndarray, block: int) -> jnp.ndarray:
    """`[batch, len, ...]` -> `[num_blocks, batch, block, ...]`, zero-padding len up to a multiple of block (for
    segment ids, zero is padding: the added queries see nothing and the added keys are seen by nothing)."""
    batch, length = x.shape[:2]
    num_blocks = -(-length // block)
    x = jnp.pad(x, [(0, 0), (0, num_blocks * block - length)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(batch, num_blocks, block, *x.shape[2:]), 1, 0)


def _from_blocks(x: jnp.ndarray, length: int) -> jnp.ndarray:
    """`[num_blocks, batch, block, ...]` -> `[batch, length, ...]` (drops the padding)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _filled(shape, fill, *like):
    """float32 `shape` full of `fill`, varying over every manual mesh axis that one of `like` varies over: inside
    shard_map (context parallelism) a loop carry must keep one type, and the tiles added into it vary like q, k, v."""
    out = jnp.full(shape, fill, jnp.float32)
    for x in like:
        out = out + lax.full_like(x, 0, jnp.float32, shape)
    return out


def _visible_tiles(q_segment_blocks, kv_segment_blocks, q_position_blocks, kv_position_blocks, sliding_window):
    """`[nq, nk]` bool: does any query of block i see any key of block j, in any batch row.

    Computed per batch row inside the loops and reduced over the batch once at the end, so a batch sharded over
    devices costs one all-reduce of this table, not one per tile inside the attention loops.
    """
    def tiles_of_query_block(query_inputs):
        q_segment_ids, q_positions = query_inputs

        def tile(key_inputs):
            kv_segment_ids, kv_positions = key_inputs
            mask_BxIxJ = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, sliding_window)
            return mask_BxIxJ.any(axis=(1, 2))

        return lax.map(tile, (kv_segment_blocks, kv_position_blocks))

    return lax.map(tiles_of_query_block, (q_segment_blocks, q_position_blocks)).any(-1)


def _tile_logits(q_BxIxKxGxA, k_BxJxKxA, q_segment_ids, kv_segment_ids, q_positions, kv_positions, scale,
                 sliding_window):
    """float32 scaled logits of one tile, the masked ones set to the floor; also the mask broadcast to them."""
    mask_BxIxJ = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, sliding_window)
    logits_BxIxKxGxJ = jnp.einsum("bikga,bjka->bikgj", q_BxIxKxGxA, k_BxJxKxA, preferred_element_type=jnp.float32)
    visible_BxIx1x1xJ = mask_BxIxJ[:, :, None, None, :]
    return jnp.where(visible_BxIx1x1xJ, logits_BxIxKxGxJ * scale, _MASKED), visible_BxIx1x1xJ


def _forward(q_blocks, k_blocks, v_blocks, q_segment_blocks, kv_segment_blocks, q_position_blocks,
             kv_position_blocks, visible_tiles, scale, sliding_window):
    """Blocked inputs (see `_blockwise`) and `_visible_tiles` -> (out `[nq, b, bq, kv_heads, groups, dv]` in q.dtype,
    logsumexp `[nq, b, bq, kv_heads, groups]` float32, 0 on rows that see no key)."""
    value_dim = v_blocks.shape[-1]

    def attend_query_block(query_inputs):
        q_BxIxKxGxA, q_segment_ids, q_positions, visible_key_blocks = query_inputs
        stats_shape = q_BxIxKxGxA.shape[:-1]
        like = (q_BxIxKxGxA, k_blocks, v_blocks)
        init = (_filled(stats_shape, _MASKED, *like), _filled(stats_shape, 0.0, *like),
                _filled(stats_shape + (value_dim,), 0.0, *like))

        def key_block_step(carry, key_inputs):
            k_BxJxKxA, v_BxJxKxO, kv_segment_ids, kv_positions, tile_visible = key_inputs

            def accumulate(carry):
                max_BxIxKxG, sum_BxIxKxG, acc_BxIxKxGxO = carry
                logits_BxIxKxGxJ, visible = _tile_logits(q_BxIxKxGxA, k_BxJxKxA, q_segment_ids, kv_segment_ids,
                                                         q_positions, kv_positions, scale, sliding_window)
                new_max_BxIxKxG = jnp.maximum(max_BxIxKxG, logits_BxIxKxGxJ.max(-1))
                probs_BxIxKxGxJ = jnp.where(visible, jnp.exp(logits_BxIxKxGxJ - new_max_BxIxKxG[..., None]), 0.0)
                rescale_BxIxKxG = jnp.exp(max_BxIxKxG - new_max_BxIxKxG)
                acc_BxIxKxGxO = acc_BxIxKxGxO * rescale_BxIxKxG[..., None] + jnp.einsum(
                    "bikgj,bjko->bikgo", probs_BxIxKxGxJ.astype(v_BxJxKxO.dtype), v_BxJxKxO,
                    preferred_element_type=jnp.float32)
                return new_max_BxIxKxG, sum_BxIxKxG * rescale_BxIxKxG + probs_BxIxKxGxJ.sum(-1), acc_BxIxKxGxO

            return lax.cond(tile_visible, accumulate, lambda carry: carry, carry), None

        (max_BxIxKxG, sum_BxIxKxG, acc_BxIxKxGxO), _ = lax.scan(
            key_block_step, init, (k_blocks, v_blocks, kv_segment_blocks, kv_position_blocks, visible_key_blocks))
        # A row that saw any key has sum >= 1 (its max term is exp(0)); the others stay exactly zero.
        seen_BxIxKxG = sum_BxIxKxG > 0
        safe_sum_BxIxKxG = jnp.where(seen_BxIxKxG, sum_BxIxKxG, 1.0)
        out_BxIxKxGxO = jnp.where(seen_BxIxKxG[..., None], acc_BxIxKxGxO / safe_sum_BxIxKxG[..., None], 0.0)
        logsumexp_BxIxKxG = jnp.where(seen_BxIxKxG, max_BxIxKxG + jnp.log(safe_sum_BxIxKxG), 0.0)
        return out_BxIxKxGxO.astype(q_BxIxKxGxA.dtype), logsumexp_BxIxKxG

    return lax.map(attend_query_block, (q_blocks, q_segment_blocks, q_position_blocks, visible_tiles))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _blockwise(q_blocks, k_blocks, v_blocks, q_segment_blocks, kv_segment_blocks, q_position_blocks,
               kv_position_blocks, scale, sliding_window):
    """q_blocks `[nq, b, bq, kv_heads, groups, dk]`, k_blocks `[nk, b, bk, kv_heads, dk]`, v_blocks
    `[nk, b, bk, kv_heads, dv]`, segment ids and positions `[nq, b, bq]` / `[nk, b, bk]`
    -> out `[nq, b, bq, kv_heads, groups, dv]`."""
    visible_tiles = _visible_tiles(q_segment_blocks, kv_segment_blocks, q_position_blocks, kv_position_blocks,
                                   sliding_window)
    return _forward(q_blocks, k_blocks, v_blocks, q_segment_blocks, kv_segment_blocks, q_position_blocks,
                    kv_position_blocks, visible_tiles, scale, sliding_window)[0]


def _blockwise_forward(q_blocks, k_blocks, v_blocks, q_segment_blocks, kv_segment_blocks, q_position_blocks,
                       kv_position_blocks, scale, sliding_window):
    inputs = (q_blocks, k_blocks, v_blocks, q_segment_blocks, kv_segment_blocks, q_position_blocks, kv_position_blocks)
    visible_tiles = _visible_tiles(q_segment_blocks, kv_segment_blocks, q_position_blocks, kv_position_blocks,
                                   sliding_window)
    # Checkpointed: differentiated inside an outer scan (scan_layers), the forward's per-tile lax.cond otherwise
    # had every tile's float32 logits saved as scan residuals, [q blocks, key blocks, tile] per layer (jaxpr
    # f32[nq, nk, ...]; DeepSeek-V3's 128K stage asked for 128 GiB a chip), though the backward recomputes them.
    out_blocks, logsumexp_blocks = jax.checkpoint(_forward, static_argnums=(8, 9))(*inputs, visible_tiles, scale,
                                                                                 sliding_window)
    return out_blocks, (inputs, visible_tiles, out_blocks, logsumexp_blocks)


def _blockwise_backward(scale, sliding_window, residuals, d_out_blocks):
    inputs, visible_tiles, out_blocks, logsumexp_blocks = residuals
    q_blocks, k_blocks, v_blocks, q_segment_blocks, kv_segment_blocks, q_position_blocks, kv_position_blocks = inputs
    # FlashAttention-2 Alg. 2: delta_i = rowsum(dO_i * O_i) replaces the sum over keys of p * dp.
    delta_blocks = jnp.einsum("nbikgo,nbikgo->nbikg", d_out_blocks, out_blocks, preferred_element_type=jnp.float32)

    def key_block_grads(dq_blocks, key_inputs):
        k_BxJxKxA, v_BxJxKxO, kv_segment_ids, kv_positions, visible_query_blocks = key_inputs

        def query_block_step(carry, query_inputs):
            (index, q_BxIxKxGxA, d_out_BxIxKxGxO, logsumexp_BxIxKxG, delta_BxIxKxG, q_segment_ids, q_positions,
             tile_visible) = query_inputs

            def tile_grads(carry):
                dq_blocks, dk_BxJxKxA, dv_BxJxKxO = carry
                logits_BxIxKxGxJ, visible = _tile_logits(q_BxIxKxGxA, k_BxJxKxA, q_segment_ids, kv_segment_ids,
                                                         q_positions, kv_positions, scale, sliding_window)
                probs_BxIxKxGxJ = jnp.where(visible, jnp.exp(logits_BxIxKxGxJ - logsumexp_BxIxKxG[..., None]), 0.0)
                dv_BxJxKxO += jnp.einsum("bikgj,bikgo->bjko", probs_BxIxKxGxJ.astype(d_out_BxIxKxGxO.dtype),
                                         d_out_BxIxKxGxO, preferred_element_type=jnp.float32)
                d_probs_BxIxKxGxJ = jnp.einsum("bikgo,bjko->bikgj", d_out_BxIxKxGxO, v_BxJxKxO,
                                               preferred_element_type=jnp.float32)
                d_logits_BxIxKxGxJ = probs_BxIxKxGxJ * (d_probs_BxIxKxGxJ - delta_BxIxKxG[..., None]) * scale
                dq_BxIxKxGxA = jnp.einsum("bikgj,bjka->bikga", d_logits_BxIxKxGxJ.astype(k_BxJxKxA.dtype), k_BxJxKxA,
                                          preferred_element_type=jnp.float32)
                dk_BxJxKxA += jnp.einsum("bikgj,bikga->bjka", d_logits_BxIxKxGxJ.astype(q_BxIxKxGxA.dtype),
                                         q_BxIxKxGxA, preferred_element_type=jnp.float32)
                # Added into the one float32 dq buffer in place (a loop carry), rather than stacked per key block.
                return dq_blocks.at[index].add(dq_BxIxKxGxA), dk_BxJxKxA, dv_BxJxKxO

            return lax.cond(tile_visible, tile_grads, lambda carry: carry, carry), None

        like = (q_blocks, k_BxJxKxA, v_BxJxKxO, d_out_blocks)
        init = (dq_blocks, _filled(k_BxJxKxA.shape, 0.0, *like), _filled(v_BxJxKxO.shape, 0.0, *like))
        (dq_blocks, dk_BxJxKxA, dv_BxJxKxO), _ = lax.scan(
            query_block_step, init, (jnp.arange(q_blocks.shape[0]), q_blocks, d_out_blocks, logsumexp_blocks,
                                     delta_blocks, q_segment_blocks, q_position_blocks, visible_query_blocks))
        return dq_blocks, (dk_BxJxKxA, dv_BxJxKxO)

    dq_blocks, (dk_blocks, dv_blocks) = lax.scan(
        key_block_grads, _filled(q_blocks.shape, 0.0, q_blocks, k_blocks, v_blocks, d_out_blocks),
        (k_blocks, v_blocks, kv_segment_blocks, kv_position_blocks, visible_tiles.T))
    # Segment ids and positions are integers: no cotangent.
    return (dq_blocks.astype(q_blocks.dtype), dk_blocks.astype(k_blocks.dtype), dv_blocks.astype(v_blocks.dtype),
            None, None, None, None)


_blockwise.defvjp(_blockwise_forward, _blockwise_backward)


def blockwise_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    *,
    q_segment_ids: jnp.ndarray,
    kv_segment_ids: jnp.ndarray,
    q_positions: jnp.ndarray,
    kv_positions: jnp.ndarray,
    scale: float,
    sliding_window: Optional[int] = None,
    block_q: int = 512,
    block_kv: int = 512,
) -> jnp.ndarray:
    """Attention whose memory, forward and backward, is O(len) buffers plus one [block_q, block_kv] tile per head,
    instead of the [q_len, kv_len] float32 logits per head of the "xla" path.

    Arguments and result as `attention.attention` (which validates them; use it with implementation="blockwise"),
    plus the tile size: block_q queries by block_kv keys (each clipped to its length; lengths need not be multiples,
    the tail is padded with segment id 0). Larger tiles mean fewer loop steps and more memory per step. Reverse-mode
    differentiable (custom_vjp); forward-mode (jvp) is not defined.

    Returns:
      `[batch, q_len, heads, value_dim]` in q.dtype.
    """
    batch, q_len, heads, key_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    block_q, block_kv = min(block_q, q_len), min(block_kv, kv_len)
    q_BxTxKxGxA = q.reshape(batch, q_len, kv_heads, heads // kv_heads, key_dim)
    out_blocks = _blockwise(
        _to_blocks(q_BxTxKxGxA, block_q), _to_blocks(k, block_kv), _to_blocks(v, block_kv),
        _to_blocks(q_segment_ids, block_q), _to_blocks(kv_segment_ids, block_kv),
        _to_blocks(q_positions, block_q), _to_blocks(kv_positions, block_kv),
        float(scale), sliding_window)
    return _from_blocks(out_blocks, q_len).reshape(batch, q_len, heads, v.shape[-1])
