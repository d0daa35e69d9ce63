"""Grouped-query attention (Llama 3, Qwen2/Qwen3): q/k/v/o projections, optional q/k/v bias and per-head q/k RMSNorm,
RoPE, masked causal attention from `jaxopd.kernels`."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxopd.kernels.attention import attention
from jaxopd.kernels.context_parallel import context_parallel_attention
from jaxopd.kernels.rope import apply_rope, rope_frequencies
from jaxopd.model.cache import attention_context, self_attention_shards
from jaxopd.model.config import ModelConfig
from jaxopd.model import lora
from jaxopd.model.layers import RMSNorm, compute, param, projection


class GQAAttention(nn.Module):
    """Parameters: `q [d, heads, head_dim]`, `k`, `v [d, kv_heads, head_dim]`, `o [heads, head_dim, d]`;
    with `attention_bias` also `q_bias [heads, head_dim]`, `k_bias`, `v_bias [kv_heads, head_dim]` (Qwen2); with
    `qk_norm` also `q_norm/scale`, `k_norm/scale [head_dim]` (Qwen3)."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        positions: jnp.ndarray,
        segment_ids: jnp.ndarray,
        cache: Optional[dict] = None,
        cache_index: Optional[jnp.ndarray] = None,
        cache_segment_ids: Optional[jnp.ndarray] = None,
    ) -> tuple[jnp.ndarray, Optional[dict]]:
        """x `[batch, t, d]`, positions/segment_ids `[batch, t]` -> (`[batch, t, d]`, updated layer cache or None).

        With a `cache` ({"k", "v": [batch, max_len, kv_heads, head_dim]}) this is one decode step; see `jaxopd.model.cache`.
        """
        c = self.config
        # First: decode under a context-parallel mesh is refused before any sharding constraint sees its 1 token.
        context_shards = self_attention_shards(cache, self.is_initializing())
        d, heads = c.d_model, c.num_heads
        kv_heads, head_dim = c.kv_heads, c.gqa_head_dim
        w_q, q_update = projection(self, "q", (d, heads, head_dim), ("embed", "q_heads", "head_dim"), 1, "attention")
        w_k, k_update = projection(self, "k", (d, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), 1,
                                   "attention")
        w_v, v_update = projection(self, "v", (d, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), 1,
                                   "attention")
        w_o, o_update = projection(self, "o", (heads, head_dim, d), ("q_heads", "head_dim", "embed"), 2, "attention")

        q_BxTxHxK = jnp.einsum("btd,dhk->bthk", x, compute(self, w_q)) + lora.apply(self, x, q_update)
        k_BxTxGxK = jnp.einsum("btd,dgk->btgk", x, compute(self, w_k)) + lora.apply(self, x, k_update)
        v_BxTxGxK = jnp.einsum("btd,dgk->btgk", x, compute(self, w_v)) + lora.apply(self, x, v_update)
        if c.attention_bias:
            zeros = nn.initializers.zeros
            q_BxTxHxK += compute(self, param(self, "q_bias", (heads, head_dim), ("q_heads", "head_dim"), zeros))
            k_BxTxGxK += compute(self, param(self, "k_bias", (kv_heads, head_dim), ("kv_heads", "head_dim"), zeros))
            v_BxTxGxK += compute(self, param(self, "v_bias", (kv_heads, head_dim), ("kv_heads", "head_dim"), zeros))
        if c.qk_norm:  # Qwen3: RMSNorm over head_dim of every head, before RoPE
            q_BxTxHxK = RMSNorm(c, name="q_norm")(q_BxTxHxK)
            k_BxTxGxK = RMSNorm(c, name="k_norm")(k_BxTxGxK)
        q_BxTxHxK = nn.with_logical_constraint(q_BxTxHxK, ("batch", "seq", "q_heads", None))

        inv_freq, rope_scale = rope_frequencies(head_dim, c.rope_theta, c.rope_scaling)
        q_BxTxHxK = apply_rope(q_BxTxHxK, positions, inv_freq, c.rope_layout, rope_scale)
        k_BxTxGxK = apply_rope(k_BxTxGxK, positions, inv_freq, c.rope_layout, rope_scale)

        kernel_args = dict(scale=head_dim**-0.5, sliding_window=c.sliding_window, block_q=c.attention_block_q,
                           block_kv=c.attention_block_kv)
        if context_shards > 1:
            out_BxTxHxK = context_parallel_attention(
                q_BxTxHxK, compute(self, k_BxTxGxK), compute(self, v_BxTxGxK), segment_ids=segment_ids,
                positions=positions, mesh=jax.sharding.get_abstract_mesh(),
                implementation=c.attention_implementation, **kernel_args)
            new_cache = None
        else:
            kv, mask, new_cache = attention_context(
                {"k": k_BxTxGxK, "v": v_BxTxGxK}, positions, segment_ids, cache, cache_index, cache_segment_ids
            )
            out_BxTxHxK = attention(
                q_BxTxHxK, compute(self, kv["k"]), compute(self, kv["v"]), **mask, **kernel_args,
                # Decode attends t queries to a longer cache: the plain path; the others are for self-attention.
                implementation=c.attention_implementation if cache is None else "xla",
            )
        out_BxTxD = (jnp.einsum("bthk,hkd->btd", out_BxTxHxK, compute(self, w_o))
                     + lora.apply(self, out_BxTxHxK, o_update))
        return out_BxTxD, new_cache
