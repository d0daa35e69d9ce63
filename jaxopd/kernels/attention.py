"""Causal attention over packed documents (segment ids + per-token positions), GQA, and DeepSeek MLA.

Masking rule, shared by every function here: query token i sees key token j when both are in the same nonzero segment
and kv_position[j] <= q_position[i] (and, with a sliding window W, q_position[i] - kv_position[j] < W, as in
transformers' Mistral/Qwen2). Segment id 0 marks padding (or an empty cache slot): it sees nothing and is seen by
nothing; a query that sees nothing gets a zero output rather than NaN. Because the rule uses positions rather than
array indices, the same call serves training (q = kv), a decode step (t=1 query against a cache) and chunked prefill.

Softmax runs in float32; outputs come back in the query dtype.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

_IMPLEMENTATIONS = ("xla", "cudnn")


def _attention_mask(
    q_segment_ids: jnp.ndarray,
    kv_segment_ids: jnp.ndarray,
    q_positions: jnp.ndarray,
    kv_positions: jnp.ndarray,
    sliding_window: Optional[int],
) -> jnp.ndarray:
    """`[batch, q_len, kv_len]` bool: which keys each query may attend to (see module docstring)."""
    same_segment_BxTxS = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (q_segment_ids[:, :, None] != 0)
    distance_BxTxS = q_positions[:, :, None] - kv_positions[:, None, :]
    mask_BxTxS = same_segment_BxTxS & (distance_BxTxS >= 0)
    if sliding_window is not None:
        mask_BxTxS &= distance_BxTxS < sliding_window
    return mask_BxTxS


def _masked_softmax(logits: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """float32 softmax over the last axis that puts exactly 0 on masked keys, and 0 on rows with no visible key.

    A finite floor (not -inf) keeps fully masked rows finite (uniform), and the final `where` zeroes them.
    """
    logits = jnp.where(mask, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    return jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)


def _check_mask_inputs(name, q_len, kv_len, batch, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
    for what, array, length in (
        ("q_segment_ids", q_segment_ids, q_len),
        ("q_positions", q_positions, q_len),
        ("kv_segment_ids", kv_segment_ids, kv_len),
        ("kv_positions", kv_positions, kv_len),
    ):
        if array.shape != (batch, length):
            raise ValueError(f"{name}: {what}.shape={array.shape} must be [batch, len] = {(batch, length)}")


def _attention_jax_nn(q, k, v, mask_BxTxS, scale, backend):
    """jax.nn.dot_product_attention with our mask (cuDNN flash attention when backend="cudnn").

    jax.nn requires one head size for q, k and v, so a narrower v (MLA: 128 vs 192) is zero-padded and sliced back;
    rows with no visible key are zeroed here because jax.nn returns the uniform average for them.
    """
    key_dim, value_dim = q.shape[-1], v.shape[-1]
    if value_dim < key_dim:
        v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, key_dim - value_dim)))
    elif value_dim > key_dim:
        q, k = (jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, value_dim - key_dim))) for x in (q, k))
    out_BxTxHxV = jax.nn.dot_product_attention(
        q, k, v, mask=mask_BxTxS[:, None], scale=scale, implementation=backend
    )[..., :value_dim]
    return jnp.where(mask_BxTxS.any(-1)[:, :, None, None], out_BxTxHxV, 0).astype(q.dtype)


def attention(
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
    implementation: str = "xla",
) -> jnp.ndarray:
    """Masked causal multi-head attention with grouped KV heads (GQA/MQA).

    Args:
      q: `[batch, q_len, heads, key_dim]`.
      k: `[batch, kv_len, kv_heads, key_dim]`; heads % kv_heads == 0, query head i uses KV head i // (heads/kv_heads)
        (transformers' repeat_kv order).
      v: `[batch, kv_len, kv_heads, value_dim]`.
      q_segment_ids, q_positions: `[batch, q_len]` int.
      kv_segment_ids, kv_positions: `[batch, kv_len]` int.
      scale: multiplies q.k (usually key_dim**-0.5, times `yarn_softmax_scale_factor`).
      sliding_window: keys at most sliding_window - 1 positions back are visible; None for full causal attention.
      implementation: "xla" (einsum + float32 softmax, any backend) or "cudnn" (jax.nn.dot_product_attention's cuDNN
        flash attention on NVIDIA GPUs, bf16/fp16 only; our mask is passed as a dense [batch, 1, q_len, kv_len] mask).

    Returns:
      `[batch, q_len, heads, value_dim]` in q.dtype.
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"attention implementation={implementation!r} is unknown: use one of {_IMPLEMENTATIONS}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects 4-D q, k, v [batch, len, heads, dim], got {q.shape}, {k.shape}, {v.shape}")
    batch, q_len, heads, key_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if k.shape != (batch, kv_len, kv_heads, key_dim) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"attention: k {k.shape} and v {v.shape} must be [batch, kv_len, kv_heads, dim] for q {q.shape}")
    if heads % kv_heads:
        raise ValueError(f"attention: heads={heads} must be a multiple of kv_heads={kv_heads} (GQA groups)")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window} must be >= 1 (or None for full causal attention)")
    _check_mask_inputs("attention", q_len, kv_len, batch, q_segment_ids, kv_segment_ids, q_positions, kv_positions)

    mask_BxTxS = _attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, sliding_window)
    if implementation == "cudnn":
        return _attention_jax_nn(q, k, v, mask_BxTxS, scale, "cudnn")

    groups = heads // kv_heads
    q_BxTxKxGxD = q.reshape(batch, q_len, kv_heads, groups, key_dim)
    logits_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k, preferred_element_type=jnp.float32) * scale
    probs_BxKxGxTxS = _masked_softmax(logits_BxKxGxTxS, mask_BxTxS[:, None, None])
    out_BxTxKxGxV = jnp.einsum(
        "bkgts,bskv->btkgv", probs_BxKxGxTxS.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return out_BxTxKxGxV.reshape(batch, q_len, heads, v.shape[-1]).astype(q.dtype)


# ---- DeepSeek Multi-head Latent Attention (DeepSeek-V2 sec. 2.1) -----------------------------------------------------
# Per token the cache keeps only the normalized latent c_kv [kv_lora_rank] and the shared, already rotated rope key
# [qk_rope_head_dim]. Per head, k = [c_kv W_uk ; k_rope] and v = c_kv W_uv. Both functions below take the same
# arguments and compute the same attention; they differ only in where W_uk and W_uv are applied.


def _check_mla_inputs(name, q_nope, q_rope, latent, k_rope, w_uk, w_uv):
    batch, q_len, heads, nope_dim = q_nope.shape
    kv_len, rank = latent.shape[1], latent.shape[2]
    rope_dim = q_rope.shape[-1]
    expected = {
        "q_rope": (q_rope.shape, (batch, q_len, heads, rope_dim)),
        "latent": (latent.shape, (batch, kv_len, rank)),
        "k_rope": (k_rope.shape, (batch, kv_len, rope_dim)),
        "w_uk": (w_uk.shape, (rank, heads, nope_dim)),
        "w_uv": (w_uv.shape, (rank, heads, w_uv.shape[-1])),
    }
    for what, (got, want) in expected.items():
        if got != want:
            raise ValueError(
                f"{name}: {what}.shape={got} does not fit q_nope {q_nope.shape} [b,t,h,dn], latent [b,s,c] "
                f"(expected {want}); w_uk is [kv_lora_rank, heads, qk_nope_head_dim], w_uv [kv_lora_rank, heads, v_dim]"
            )
    return batch, q_len, kv_len


def mla_naive(
    q_nope: jnp.ndarray,
    q_rope: jnp.ndarray,
    latent: jnp.ndarray,
    k_rope: jnp.ndarray,
    w_uk: jnp.ndarray,
    w_uv: jnp.ndarray,
    *,
    q_segment_ids: jnp.ndarray,
    kv_segment_ids: jnp.ndarray,
    q_positions: jnp.ndarray,
    kv_positions: jnp.ndarray,
    scale: float,
    implementation: str = "xla",
) -> jnp.ndarray:
    """MLA by up-projecting the latent to per-head keys and values, then ordinary attention (training, prefill).

    Args:
      q_nope: `[batch, q_len, heads, qk_nope_head_dim]`.
      q_rope: `[batch, q_len, heads, qk_rope_head_dim]`, rotary embedding already applied.
      latent: `[batch, kv_len, kv_lora_rank]`, the compressed KV after its RMSNorm.
      k_rope: `[batch, kv_len, qk_rope_head_dim]`, the shared rope key, rotary embedding already applied.
      w_uk: `[kv_lora_rank, heads, qk_nope_head_dim]` and w_uv: `[kv_lora_rank, heads, v_head_dim]`, the two halves
        of the KV up-projection (HF `kv_b_proj.weight` [h*(dn+dv), c] viewed as [h, dn+dv, c], split, transposed).
      q_segment_ids, q_positions: `[batch, q_len]`; kv_segment_ids, kv_positions: `[batch, kv_len]`.
      scale: softmax scale, (qk_nope_head_dim + qk_rope_head_dim)**-0.5 * yarn_softmax_scale_factor(...).
      implementation: passed to `attention`.

    Returns:
      `[batch, q_len, heads, v_head_dim]` in q_nope.dtype.
    """
    batch, q_len, kv_len = _check_mla_inputs("mla_naive", q_nope, q_rope, latent, k_rope, w_uk, w_uv)
    heads = q_nope.shape[2]
    k_nope_BxSxHxN = jnp.einsum("bsc,chn->bshn", latent, w_uk)
    v_BxSxHxV = jnp.einsum("bsc,chv->bshv", latent, w_uv)
    k_rope_BxSxHxR = jnp.broadcast_to(k_rope[:, :, None, :], (batch, kv_len, heads, k_rope.shape[-1]))
    return attention(
        jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1),
        jnp.concatenate([k_nope_BxSxHxN, k_rope_BxSxHxR.astype(k_nope_BxSxHxN.dtype)], axis=-1),
        v_BxSxHxV,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_positions=q_positions,
        kv_positions=kv_positions,
        scale=scale,
        implementation=implementation,
    )


def mla_absorbed_decode(
    q_nope: jnp.ndarray,
    q_rope: jnp.ndarray,
    latent: jnp.ndarray,
    k_rope: jnp.ndarray,
    w_uk: jnp.ndarray,
    w_uv: jnp.ndarray,
    *,
    q_segment_ids: jnp.ndarray,
    kv_segment_ids: jnp.ndarray,
    q_positions: jnp.ndarray,
    kv_positions: jnp.ndarray,
    scale: float,
) -> jnp.ndarray:
    """MLA computed in the latent space: W_uk is absorbed into the query and W_uv into the output (DeepSeek-V2
    sec. 2.1.2), so attention reads the cache as stored and never builds per-head keys or values.

    q_nope W_uk^T . c_kv == q_nope . (c_kv W_uk), and softmax(.) (c_kv W_uv) == (softmax(.) c_kv) W_uv. This costs
    O(heads * kv_lora_rank) per cached token instead of O(heads * (dn + dv)) plus the up-projection of the whole
    cache, which is why decode (q_len = 1, or a short chunk) uses it. Arguments and result are exactly those of
    `mla_naive` (latent and k_rope are the cache: `[batch, max_len, kv_lora_rank]`, `[batch, max_len, rope_dim]`,
    with kv_segment_ids 0 on empty slots).
    """
    batch, q_len, kv_len = _check_mla_inputs("mla_absorbed_decode", q_nope, q_rope, latent, k_rope, w_uk, w_uv)
    _check_mask_inputs(
        "mla_absorbed_decode", q_len, kv_len, batch, q_segment_ids, kv_segment_ids, q_positions, kv_positions
    )
    q_latent_BxTxHxC = jnp.einsum("bthn,chn->bthc", q_nope, w_uk, preferred_element_type=jnp.float32)
    logits_BxHxTxS = jnp.einsum(
        "bthc,bsc->bhts", q_latent_BxTxHxC.astype(latent.dtype), latent, preferred_element_type=jnp.float32
    ) + jnp.einsum("bthr,bsr->bhts", q_rope, k_rope, preferred_element_type=jnp.float32)
    mask_BxTxS = _attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, None)
    probs_BxHxTxS = _masked_softmax(logits_BxHxTxS * scale, mask_BxTxS[:, None])
    out_latent_BxTxHxC = jnp.einsum(
        "bhts,bsc->bthc", probs_BxHxTxS.astype(latent.dtype), latent, preferred_element_type=jnp.float32
    )
    out_BxTxHxV = jnp.einsum(
        "bthc,chv->bthv", out_latent_BxTxHxC.astype(w_uv.dtype), w_uv, preferred_element_type=jnp.float32
    )
    return out_BxTxHxV.astype(q_nope.dtype)
