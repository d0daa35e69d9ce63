"""The pre-norm decoder block and DeepSeek-V3's multi-token-prediction (MTP) module built around one."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxopd.model.attention import GQAAttention
from jaxopd.model.cache import StackedLayerCache
from jaxopd.model.config import ModelConfig
from jaxopd.model.layers import MLP, RMSNorm, compute, param
from jaxopd.model.mla import MLAttention
from jaxopd.model.moe import MoE

# Per-layer MoE statistics: (load [experts], balance loss scalar), or None for a dense layer.
MoEStats = Optional[tuple[jnp.ndarray, jnp.ndarray]]


class Block(nn.Module):
    """x + attention(attention_norm(x)), then + mlp(mlp_norm(x)). Parameters: `attention_norm/scale`, `attention/*`
    (GQAAttention or MLAttention), `mlp_norm/scale`, `mlp/*` (MLP of width mlp_dim, or MoE).

    scan_body: as the body of `nn.scan` (`jaxopd.model.stacking`), return the block's output as the scan's carry and
    its MoE stats as its per-layer output, `(carry, (stats, None))`. Without a cache the carry is x; in decode it is
    `(x, the stack's cache arrays)` and `cache` is this layer's index in the stack (`StackedLayerCache`)."""

    config: ModelConfig
    layer: int
    scan_body: bool = False

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        positions: jnp.ndarray,
        segment_ids: jnp.ndarray,
        cache: Optional[dict] = None,
        cache_index: Optional[jnp.ndarray] = None,
        cache_segment_ids: Optional[jnp.ndarray] = None,
    ) -> tuple[jnp.ndarray, MoEStats, Optional[dict]] | tuple[jnp.ndarray, tuple[MoEStats, Optional[dict]]]:
        """x `[batch, t, d]` -> (`[batch, t, d]`, MoE stats or None, updated layer cache or None)."""
        c = self.config
        if self.scan_body and cache is not None:
            x, stack = x
            cache = StackedLayerCache(stack, cache)
        attention_cls = MLAttention if c.attention == "mla" else GQAAttention
        attended, new_cache = attention_cls(c, name="attention")(
            RMSNorm(c, name="attention_norm")(x), positions, segment_ids, cache, cache_index, cache_segment_ids
        )
        x = nn.with_logical_constraint(x + attended, ("batch", "seq", "embed"))
        normed = RMSNorm(c, name="mlp_norm")(x)
        if c.is_moe_layer(self.layer):
            mlp_out, stats = MoE(c, name="mlp")(normed, segment_ids)
        else:
            mlp_out, stats = MLP(c, c.mlp_dim, name="mlp")(normed), None
        x = nn.with_logical_constraint(x + mlp_out, ("batch", "seq", "embed"))
        if self.scan_body:
            return (x if new_cache is None else (x, new_cache.arrays)), (stats, None)
        return x, stats, new_cache


class MTPModule(nn.Module):
    """Multi-token prediction depth k (DeepSeek-V3 sec. 2.2, eq. 21-23), k = 1 + index.

    h'_i = eh_proj [RMSNorm_e(Emb(t_{i+k})) ; RMSNorm_h(h^{k-1}_i)], h^k = Block(h'), output = norm(h^k), which the
    shared output head turns into the prediction of token i + k + 1. The embedding half comes first, as in the
    order DeepSeek's released MTP weights are used by inference engines (vLLM, SGLang); the paper writes the hidden
    first. Parameter names mirror DeepSeek's checkpoint: `embed_norm` (enorm), `hidden_norm` (hnorm), `projection
    [2d, d]` (eh_proj; logical axes (None, "embed")), `block/*` (the decoder layer), `norm` (shared_head.norm).
    """

    config: ModelConfig
    layer: int
    block_cls: type = Block

    @nn.compact
    def __call__(
        self,
        hidden: jnp.ndarray,
        next_embeddings: jnp.ndarray,
        positions: jnp.ndarray,
        segment_ids: jnp.ndarray,
        cache: Optional[dict] = None,
        cache_index: Optional[jnp.ndarray] = None,
        cache_segment_ids: Optional[jnp.ndarray] = None,
    ) -> tuple[jnp.ndarray, jnp.ndarray, MoEStats, Optional[dict]]:
        """hidden h^{k-1} `[batch, t, d]`, next_embeddings Emb(t_{i+k}) `[batch, t, d]` ->
        (h^k `[batch, t, d]` for the next depth, normalized output `[batch, t, d]`, MoE stats or None, the block's
        updated cache or None). With a cache (decode, as `Block`), slot i holds the block's keys for main position i."""
        c = self.config
        projection = param(self, "projection", (2 * c.d_model, c.d_model), (None, "embed"))
        joined_BxTx2D = jnp.concatenate(
            [RMSNorm(c, name="embed_norm")(next_embeddings), RMSNorm(c, name="hidden_norm")(hidden)], axis=-1
        )
        x = jnp.einsum("bte,ed->btd", joined_BxTx2D, compute(self, projection))
        x, stats, new_cache = self.block_cls(c, self.layer, name="block")(x, positions, segment_ids, cache, cache_index,
                                                                           cache_segment_ids)
        return x, RMSNorm(c, name="norm")(x), stats, new_cache
