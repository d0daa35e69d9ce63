"""The attention mask over packed documents (segment ids + per-token positions), shared by every attention kernel.

Masking rule: query token i sees key token j when both are in the same nonzero segment and
kv_position[j] <= q_position[i] (and, with a sliding window W, q_position[i] - kv_position[j] < W, as in
transformers' Mistral/Qwen2). Segment id 0 marks padding (or an empty cache slot): it sees nothing and is seen by
nothing; a query that sees nothing gets a zero output rather than NaN. Because the rule uses positions rather than
array indices, the same call serves training (q = kv), a decode step (one query against a cache) and chunked prefill.

Shapes: see jaxopd/kernels/__init__.py.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

def attention_mask(
    q_segment_ids: jnp.ndarray,
    kv_segment_ids: jnp.ndarray,
    q_positions: jnp.ndarray,
    kv_positions: jnp.ndarray,
    sliding_window: Optional[int],
) -> jnp.ndarray:
    """Which keys each query may attend to, by the rule in this module's docstring.

    Args:
      q_segment_ids, q_positions: `[batch, q_len]` int.
      kv_segment_ids, kv_positions: `[batch, kv_len]` int.
      sliding_window: keys at most sliding_window - 1 positions back are visible; None for full causal attention.

    Returns:
      `[batch, q_len, kv_len]` bool.
    """
    same_segment_BxTxS = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (q_segment_ids[:, :, None] != 0)
    distance_BxTxS = q_positions[:, :, None] - kv_positions[:, None, :]
    mask_BxTxS = same_segment_BxTxS & (distance_BxTxS >= 0)
    if sliding_window is not None:
        mask_BxTxS &= distance_BxTxS < sliding_window
    return mask_BxTxS


def masked_softmax(logits: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """float32 softmax over the last axis that puts exactly 0 on masked keys, and 0 on rows with no visible key.

    `mask` broadcasts against `logits`. A finite floor (not -inf) keeps fully masked rows finite (uniform), and the
    final `where` zeroes them.
    """
    logits = jnp.where(mask, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
