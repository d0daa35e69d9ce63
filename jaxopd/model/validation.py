"""Config and input checks with messages that name the fix, and the default segment ids / positions."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxopd.model.config import ModelConfig


def check_config(c: ModelConfig) -> None:
    """Raise ValueError for a config no model can be built from."""
    has_dense_layers = c.num_experts == 0 or c.first_k_dense > 0
    for name in ("vocab_size", "d_model", "num_layers", "num_heads") + (("mlp_dim",) if has_dense_layers else ()):
        if getattr(c, name) < 1:
            raise ValueError(f"config.{name}={getattr(c, name)} must be >= 1")
    for name in ("dtype", "param_dtype"):
        try:
            jnp.dtype(getattr(c, name))
        except TypeError:
            raise ValueError(f"config.{name}={getattr(c, name)!r} is not a dtype name (e.g. 'float32', 'bfloat16')")
    if c.rope_layout not in ("rotate_half", "interleaved"):
        raise ValueError(f"config.rope_layout={c.rope_layout!r} must be 'rotate_half' or 'interleaved'")
    if c.attention == "gqa":
        kv_heads = c.kv_heads
        if c.head_dim is None and c.d_model % c.num_heads:
            raise ValueError(f"d_model={c.d_model} is not divisible by num_heads={c.num_heads}: set config.head_dim")
        if c.num_heads % kv_heads:
            raise ValueError(f"num_heads={c.num_heads} must be a multiple of num_kv_heads={kv_heads} (GQA groups)")
    elif c.attention == "mla":
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(c, name) < 1:
                raise ValueError(f"attention='mla' needs config.{name} >= 1, got {getattr(c, name)}")
        if c.q_lora_rank is not None and c.q_lora_rank < 1:
            raise ValueError(f"config.q_lora_rank={c.q_lora_rank} must be >= 1, or None for a direct q projection")
    else:
        raise ValueError(f"config.attention={c.attention!r} must be 'gqa' or 'mla'")
    if c.num_experts:
        if c.num_experts_per_token < 1 or c.moe_mlp_dim < 1:
            raise ValueError(
                f"num_experts={c.num_experts} needs num_experts_per_token >= 1 and moe_mlp_dim >= 1, got "
                f"{c.num_experts_per_token} and {c.moe_mlp_dim}"
            )
    if not 0 <= c.first_k_dense <= c.num_layers:
        raise ValueError(f"first_k_dense={c.first_k_dense} must lie in [0, num_layers={c.num_layers}]")
    if c.mtp_depth < 0:
        raise ValueError(f"mtp_depth={c.mtp_depth} must be >= 0")


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
        if len(cache["layers"]) != config.num_layers or batch != tokens.shape[0]:
            raise ValueError(
                f"cache holds {len(cache['layers'])} layers of batch {batch}; this model needs {config.num_layers} "
                f"layers of batch {tokens.shape[0]}: make it with init_cache(config, batch, max_len, dtype)"
            )
        if isinstance(cache_index, (int, np.integer)) and not 0 <= cache_index <= max_len - tokens.shape[1]:
            raise ValueError(
                f"cache_index={cache_index} with {tokens.shape[1]} tokens does not fit the cache's max_len={max_len}"
            )
    return segment_ids.astype(jnp.int32), positions.astype(jnp.int32)
