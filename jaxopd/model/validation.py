"""Input checks with messages that name the fix, and the default segment ids / positions (the config checks itself:
`ModelConfig.__post_init__`)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxopd.model.cache import init_cache
from jaxopd.model.config import ModelConfig


def default_positions(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """`[b, t]` positions restarting at 0 wherever the segment id changes (packed documents, left padding)."""
    batch, seq = segment_ids.shape
    index = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    starts = jnp.concatenate(
        [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def check_inputs(
    config: ModelConfig,
    tokens: jnp.ndarray,
    segment_ids: Optional[jnp.ndarray],
    positions: Optional[jnp.ndarray],
    cache: Optional[dict] = None,
    cache_index=None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Validate shapes and fill defaults: returns (segment_ids, positions), both `[b, t]` int32."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be [batch, seq] integers, got shape {tokens.shape} dtype {tokens.dtype}")
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
        positions = default_positions(segment_ids)
    for name, array in (("segment_ids", segment_ids), ("positions", positions)):
        if array.shape != tokens.shape:
            raise ValueError(f"{name}.shape={array.shape} must equal tokens.shape={tokens.shape} ([batch, seq])")
    if cache is not None:
        batch, max_len = cache["segment_ids"].shape
        expected = jax.eval_shape(lambda: init_cache(config, tokens.shape[0], max_len, "float32"))["layers"]
        shapes = lambda tree: jax.tree.map(lambda array: tuple(array.shape), tree)
        if shapes(cache["layers"]) != shapes(expected):
            raise ValueError(
                f"cache holds layers {shapes(cache['layers'])} of batch {batch}; this model (num_layers="
                f"{config.num_layers}, scan_layers={config.scan_layers}) needs {shapes(expected)} of batch "
                f"{tokens.shape[0]}: make it with init_cache(config, batch, max_len, dtype)"
            )
        if isinstance(cache_index, (int, np.integer)) and not 0 <= cache_index <= max_len - tokens.shape[1]:
            raise ValueError(
                f"cache_index={cache_index} with {tokens.shape[1]} tokens does not fit the cache's max_len={max_len}"
            )
    return segment_ids.astype(jnp.int32), positions.astype(jnp.int32)
