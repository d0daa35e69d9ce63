"""DeepSeek Multi-head Latent Attention (DeepSeek-V2 sec. 2.1, V3 sec. 2.1.1) wired onto `jaxopd.kernels`.

Forward/prefill up-projects the latent (`mla_naive`); decode reads the latent cache as stored (`mla_absorbed_decode`).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxopd.kernels.attention import mla_absorbed_decode, mla_naive
from jaxopd.kernels.context_parallel import context_parallel_mla
from jaxopd.kernels.rope import apply_rope, rope_frequencies, yarn_softmax_scale_factor
from jaxopd.model.cache import attention_context, self_attention_shards
from jaxopd.model.config import ModelConfig
from jaxopd.model import lora
from jaxopd.model.layers import RMSNorm, compute, projection


class MLAttention(nn.Module):
    """Parameters (h heads, dn/dr/dv = qk_nope/qk_rope/v head dims, c = kv_lora_rank, r = q_lora_rank):
      q_lora_rank None (V2-Lite): `q [d, h, dn + dr]`;
      else: `q_a [d, r]` ("embed", "q_lora"), `q_a_norm/scale [r]`, `q_b [r, h, dn + dr]` ("q_lora", "q_heads", ...);
      `kv_a [d, c + dr]` ("embed", "kv_lora"): the latent and the shared rope key (HF kv_a_proj_with_mqa);
      `kv_a_norm/scale [c]`; `kv_b [c, h, dn + dv]` ("kv_lora", "q_heads", "head_dim"): per head, the no-rope key
      up-projection W_uk (first dn) and the value up-projection W_uv (last dv); `o [h, dv, d]`.
    """

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

        With a `cache` ({"latent": [batch, max_len, c], "k_rope": [batch, max_len, dr]}) this is one decode step.
        """
        cfg = self.config
        # First: decode under a context-parallel mesh is refused before any sharding constraint sees its 1 token.
        context_shards = self_attention_shards(cache, self.is_initializing())
        d, heads, rank = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank
        nope, rope, v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk_dim = cfg.qk_head_dim

        if cfg.q_lora_rank is None:
            w_q, q_update = projection(self, "q", (d, heads, qk_dim), ("embed", "q_heads", "head_dim"), 1, "attention")
            q_BxTxHxQ = jnp.einsum("btd,dhq->bthq", x, compute(self, w_q)) + lora.apply(self, x, q_update)
        else:
            w_q_a, q_a_update = projection(self, "q_a", (d, cfg.q_lora_rank), ("embed", "q_lora"), 1, "attention")
            w_q_b, q_b_update = projection(self, "q_b", (cfg.q_lora_rank, heads, qk_dim),
                                           ("q_lora", "q_heads", "head_dim"), 1, "attention")
            q_a_BxTxR = jnp.einsum("btd,dr->btr", x, compute(self, w_q_a)) + lora.apply(self, x, q_a_update)
            q_latent_BxTxR = RMSNorm(cfg, name="q_a_norm")(q_a_BxTxR)
            q_BxTxHxQ = (jnp.einsum("btr,rhq->bthq", q_latent_BxTxR, compute(self, w_q_b))
                         + lora.apply(self, q_latent_BxTxR, q_b_update))
        q_BxTxHxQ = nn.with_logical_constraint(q_BxTxHxQ, ("batch", "seq", "q_heads", None))
        w_kv_a, kv_a_update = projection(self, "kv_a", (d, rank + rope), ("embed", "kv_lora"), 1, "attention")
        w_kv_b, kv_b_update = projection(self, "kv_b", (rank, heads, nope + v_dim), ("kv_lora", "q_heads", "head_dim"),
                                         1, "attention")
        w_o, o_update = projection(self, "o", (heads, v_dim, d), ("q_heads", "head_dim", "embed"), 2, "attention")

        kv_a_BxTxA = jnp.einsum("btd,da->bta", x, compute(self, w_kv_a)) + lora.apply(self, x, kv_a_update)
        latent_BxTxC = RMSNorm(cfg, name="kv_a_norm")(kv_a_BxTxA[..., :rank])
        inv_freq, rope_scale = rope_frequencies(rope, cfg.rope_theta, cfg.rope_scaling)
        # One rope key per token, shared by all heads (DeepSeek-V2 eq. 14): rotate it as a single head.
        k_rope_BxTxR = apply_rope(kv_a_BxTxA[:, :, None, rank:], positions, inv_freq, cfg.rope_layout, rope_scale)[:, :, 0]
        q_nope_BxTxHxN = q_BxTxHxQ[..., :nope]
        q_rope_BxTxHxR = apply_rope(q_BxTxHxQ[..., nope:], positions, inv_freq, cfg.rope_layout, rope_scale)

        # The kernels take kv_b whole (decode absorbs it into the queries): its LoRA update is folded in.
        kv_b = compute(self, w_kv_b) + lora.folded(kv_b_update)
        w_uk_CxHxN, w_uv_CxHxV = kv_b[..., :nope], kv_b[..., nope:]
        # YaRN temperature on the logits of all dimensions (DeepSeek-V2 config mscale_all_dim).
        scale = qk_dim**-0.5 * yarn_softmax_scale_factor(cfg.rope_scaling)
        kernel_args = dict(scale=scale, implementation=cfg.attention_implementation, block_q=cfg.attention_block_q,
                           block_kv=cfg.attention_block_kv)
        if context_shards > 1:
            # The latent and the rope key travel between devices, not the up-projected keys/values (71x fewer
            # numbers for DeepSeek-V3; see context_parallel_mla).
            out_BxTxHxV = context_parallel_mla(
                q_nope_BxTxHxN, q_rope_BxTxHxR, compute(self, latent_BxTxC), compute(self, k_rope_BxTxR),
                w_uk_CxHxN, w_uv_CxHxV, segment_ids=segment_ids, positions=positions,
                mesh=jax.sharding.get_abstract_mesh(), **kernel_args)
            new_cache = None
        else:
            kv, mask, new_cache = attention_context(
                {"latent": latent_BxTxC, "k_rope": k_rope_BxTxR}, positions, segment_ids, cache, cache_index,
                cache_segment_ids,
            )
            latent, k_rope = compute(self, kv["latent"]), compute(self, kv["k_rope"])
            if cache is None:
                out_BxTxHxV = mla_naive(q_nope_BxTxHxN, q_rope_BxTxHxR, latent, k_rope, w_uk_CxHxN, w_uv_CxHxV,
                                        **mask, **kernel_args)
            else:
                out_BxTxHxV = mla_absorbed_decode(
                    q_nope_BxTxHxN, q_rope_BxTxHxR, latent, k_rope, w_uk_CxHxN, w_uv_CxHxV, **mask, scale=scale
                )
        out_BxTxD = (jnp.einsum("bthv,hvd->btd", out_BxTxHxV, compute(self, w_o))
                     + lora.apply(self, out_BxTxHxV, o_update))
        return out_BxTxD, new_cache
