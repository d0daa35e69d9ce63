"""Causal attention over packed documents (segment ids + per-token positions), GQA, and DeepSeek MLA.

Every function here applies the masking rule of masks.py (same nonzero segment, key position <= query position,
optional sliding window; padding sees nothing and a query that sees nothing gets a zero output), so the same call
serves training, a decode step against a cache and chunked prefill. Softmax runs in float32; outputs come back in the
query dtype. Shapes: see jaxopd/kernels/__init__.py.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from jaxopd.kernels.blockwise_attention import blockwise_attention
from jaxopd.kernels.masks import attention_mask, masked_softmax

_IMPLEMENTATIONS = ("xla", "cudnn", "blockwise", "splash")


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
    out_BxTxHxO = jax.nn.dot_product_attention(
        q, k, v, mask=mask_BxTxS[:, None], scale=scale, implementation=backend
    )[..., :value_dim]
    return jnp.where(mask_BxTxS.any(-1)[:, :, None, None], out_BxTxHxO, 0).astype(q.dtype)


def _attention_splash(q, k, v, q_segment_ids, kv_segment_ids, scale, sliding_window, block_q, block_kv):
    """Pallas TPU splash attention (jax.experimental.pallas.ops.tpu.splash_attention), run per batch row by vmap.

    Its mask is causal by array index (a LocalMask for a sliding window) and-ed with segment equality, so it equals our
    rule only when positions are the offsets of tokens inside their document (the batch contract: positions restart
    at 0 and go up by 1). Positions are not read. On CPU it runs in Pallas interpret mode (slow: tests only). Blocks
    must be multiples of 128 (the TPU lane width); the sequence is padded to a multiple of them. Padding rows
    (segment 0) attend among themselves inside the kernel, which needs no empty row, and are zeroed after.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    if jax.default_backend() not in ("tpu", "cpu"):
        raise ValueError(f"attention implementation='splash' is a TPU kernel (CPU runs its interpreter, for tests); on "
                         f"{jax.default_backend()} use 'cudnn' or 'blockwise'")
    seq_len, heads = q.shape[1], q.shape[2]
    if block_q % 128 or block_kv % 128:
        raise ValueError(f"attention implementation='splash': block_q={block_q} and block_kv={block_kv} must be "
                         "multiples of 128 (the TPU lane width the kernel tiles by)")
    lane_len = -(-seq_len // 128) * 128
    block_q, block_kv = min(block_q, lane_len), min(block_kv, lane_len)
    tile = math.lcm(block_q, block_kv)
    padded_len = -(-seq_len // tile) * tile

    def pad_to_tiles(x):  # tail padding gets segment 0, so padded rows see only padded keys (never an empty row)
        return jnp.pad(x, [(0, 0), (0, padded_len - seq_len)] + [(0, 0)] * (x.ndim - 2))

    q, k, v, q_segment_ids, kv_segment_ids = map(pad_to_tiles, (q, k, v, q_segment_ids, kv_segment_ids))
    if sliding_window is None:
        head_mask = splash_mask.CausalMask((padded_len, padded_len))
    else:
        head_mask = splash_mask.LocalMask((padded_len, padded_len), window_size=(sliding_window - 1, 0), offset=0)
    block_sizes = splash.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q, block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv, block_q_dq=block_q, block_kv_dq=block_kv)
    kernel = splash.make_splash_mha(
        splash_mask.MultiHeadMask([head_mask] * heads), block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
        interpret=jax.default_backend() == "cpu")

    def one_row(q_HxTxA, k_KxSxA, v_KxSxO, q_segment_ids_T, kv_segment_ids_S):
        return kernel(q_HxTxA, k_KxSxA, v_KxSxO, segment_ids=splash.SegmentIds(q_segment_ids_T, kv_segment_ids_S))

    # The kernel has no scale argument: scaling q is the same.
    out_BxHxTxO = jax.vmap(one_row)(
        jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2),
        q_segment_ids, kv_segment_ids)
    out_BxTxHxO = jnp.where((q_segment_ids != 0)[:, :, None, None], jnp.swapaxes(out_BxHxTxO, 1, 2), 0)
    return out_BxTxHxO[:, :seq_len].astype(q.dtype)


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
    block_q: int = 512,
    block_kv: int = 512,
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
      implementation: "xla" (einsum + float32 softmax, any backend; float32 logits [batch, heads, q_len, kv_len]),
        "cudnn" (jax.nn.dot_product_attention's cuDNN flash attention on NVIDIA GPUs, bf16/fp16 only; our mask is
        passed as a dense [batch, 1, q_len, kv_len] mask), "blockwise" (pure-JAX online softmax over
        [block_q, block_kv] tiles, any backend, memory O(len) in forward and backward: long context; see
        blockwise_attention.py) or "splash" (Pallas splash attention, TPU; see `_attention_splash` for its limits).
      block_q, block_kv: tile sizes for "blockwise" and "splash" (ignored by the others).

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

    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"attention: {name}={block!r} must be a positive int (a tile size in tokens)")
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                   q_positions=q_positions, kv_positions=kv_positions, scale=scale,
                                   sliding_window=sliding_window, block_q=block_q, block_kv=block_kv)
    if implementation == "splash":
        if q_len != kv_len:
            raise ValueError(f"attention implementation='splash' needs q_len == kv_len (self-attention), got "
                             f"{q_len} vs {kv_len}: use 'blockwise' for decode or chunked prefill")
        return _attention_splash(q, k, v, q_segment_ids, kv_segment_ids, scale, sliding_window, block_q, block_kv)
    mask_BxTxS = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, sliding_window)
    if implementation == "cudnn":
        return _attention_jax_nn(q, k, v, mask_BxTxS, scale, "cudnn")

    groups = heads // kv_heads
    q_BxTxKxGxA = q.reshape(batch, q_len, kv_heads, groups, key_dim)
    logits_BxKxGxTxS = jnp.einsum("btkga,bska->bkgts", q_BxTxKxGxA, k, preferred_element_type=jnp.float32) * scale
    probs_BxKxGxTxS = masked_softmax(logits_BxKxGxTxS, mask_BxTxS[:, None, None])
    out_BxTxKxGxO = jnp.einsum(
        "bkgts,bsko->btkgo", probs_BxKxGxTxS.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return out_BxTxKxGxO.reshape(batch, q_len, heads, v.shape[-1]).astype(q.dtype)


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
    block_q: int = 512,
    block_kv: int = 512,
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
      implementation, block_q, block_kv: passed to `attention` ("blockwise" for long context).

    Returns:
      `[batch, q_len, heads, v_head_dim]` in q_nope.dtype.
    """
    batch, q_len, kv_len = _check_mla_inputs("mla_naive", q_nope, q_rope, latent, k_rope, w_uk, w_uv)
    heads = q_nope.shape[2]
    k_nope_BxSxHxN = jnp.einsum("bsc,chn->bshn", latent, w_uk)
    v_BxSxHxO = jnp.einsum("bsc,cho->bsho", latent, w_uv)
    k_rope_BxSxHxR = jnp.broadcast_to(k_rope[:, :, None, :], (batch, kv_len, heads, k_rope.shape[-1]))
    return attention(
        jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1),
        jnp.concatenate([k_nope_BxSxHxN, k_rope_BxSxHxR.astype(k_nope_BxSxHxN.dtype)], axis=-1),
        v_BxSxHxO,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        q_positions=q_positions,
        kv_positions=kv_positions,
        scale=scale,
        implementation=implementation,
        block_q=block_q,
        block_kv=block_kv,
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
    mask_BxTxS = attention_mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions, None)
    probs_BxHxTxS = masked_softmax(logits_BxHxTxS * scale, mask_BxTxS[:, None])
    out_latent_BxTxHxC = jnp.einsum(
        "bhts,bsc->bthc", probs_BxHxTxS.astype(latent.dtype), latent, preferred_element_type=jnp.float32
    )
    out_BxTxHxO = jnp.einsum(
        "bthc,cho->btho", out_latent_BxTxHxC.astype(w_uv.dtype), w_uv, preferred_element_type=jnp.float32
    )
    return out_BxTxHxO.astype(q_nope.dtype)
