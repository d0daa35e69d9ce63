"""Analytic parameter and FLOP counts for a `ModelConfig` (for MFU, scaling plots and sanity checks).

Public API:
  count_params(config) -> {"total", "active", "embedding", "mtp", "mtp_active"} (ints)
  flops_per_token(config, seq_len, *, training) -> float
  decode_flops_per_token(config, context_len) -> float

Conventions (chosen to reproduce DeepSeek's published totals and activated counts: V3 671B / 37B, V2 236B / 21B,
V2-Lite 15.7B / 2.4B; each activated figure matches only when the input embedding is left out and the head kept in):
  - total: every parameter of the model, MTP modules included (what the param tree holds). DeepSeek-V3's 671B is
    total - mtp; the 685B of its Hugging Face checkpoint also counts the MTP layer's own copies of the embedding and
    output head (~1.9B), which here are shared with the main model (DeepSeek-V3 report sec. 2.2).
  - active: parameters whose matmul one token of the main model pays for: output head + attention + norms + dense
    MLPs + per MoE layer the router, shared experts and top-k routed experts. The input embedding is a lookup and is
    not included (a tied head is: its matmul is paid). MTP modules are excluded (a training objective, dropped or used
    for speculation at inference); `mtp_active` is their per-token share, without the shared head.
  - embedding: the input embedding table, vocab * d.

FLOPs count a multiply-add as 2. Forward FLOPs per token = 2 * active + attention FLOPs, 2 * heads * (qk_dim + v_dim)
* context per layer. Training is 3x forward (backward = 2x forward) and includes the MTP modules.
"""

from __future__ import annotations

from jaxopd.model.config import ModelConfig


def _attention_params(config: ModelConfig) -> int:
    d, heads = config.d_model, config.num_heads
    if config.attention == "gqa":
        head_dim, kv_heads = config.gqa_head_dim, config.kv_heads
        q, kv = heads * head_dim, kv_heads * head_dim
        bias = (q + 2 * kv) if config.attention_bias else 0
        qk_norm = 2 * head_dim if config.qk_norm else 0
        return d * (q + 2 * kv) + q * d + bias + qk_norm
    # MLA
    qk_dim = config.qk_head_dim
    if config.q_lora_rank:  # down-projection, its RMSNorm, up-projection (DeepSeek-V3 report eq. 6-7)
        q_params = d * config.q_lora_rank + config.q_lora_rank + config.q_lora_rank * heads * qk_dim
    else:
        q_params = d * heads * qk_dim
    # Joint KV down-projection (+ shared rope key), its RMSNorm, up-projection to per-head nope keys and values.
    kv_params = (
        d * (config.kv_lora_rank + config.qk_rope_head_dim)
        + config.kv_lora_rank
        + config.kv_lora_rank * heads * (config.qk_nope_head_dim + config.v_head_dim)
    )
    return q_params + kv_params + heads * config.v_head_dim * d


def _block_params(config: ModelConfig, layer: int) -> tuple[int, int]:
    """(total, active) parameters of decoder block `layer`: two RMSNorms, attention, dense MLP or MoE."""
    d = config.d_model
    shared = 2 * d + _attention_params(config)
    swiglu = lambda width: 3 * d * width
    if not config.is_moe_layer(layer):
        mlp = swiglu(config.mlp_dim)
        return shared + mlp, shared + mlp
    # Router weights [d, experts] and the load-balancing bias (DeepSeek-V3 sec. 2.1.2) are used by every token.
    router = d * config.num_experts + config.num_experts
    shared_experts = swiglu(config.moe_mlp_dim * config.num_shared_experts)
    routed = config.num_experts * swiglu(config.moe_mlp_dim)
    routed_active = config.num_experts_per_token * swiglu(config.moe_mlp_dim)
    common = shared + router + shared_experts
    return common + routed, common + routed_active


def count_params(config: ModelConfig) -> dict[str, int]:
    """Parameter counts; see the module docstring for what `total`, `active`, `embedding` and `mtp` include."""
    d, vocab = config.d_model, config.vocab_size
    embedding = vocab * d
    head = vocab * d
    blocks = [_block_params(config, layer) for layer in range(config.num_layers)]
    # + d: the final RMSNorm. A tied head is the embedding table: stored once, paid for as a matmul.
    main_total = embedding + (0 if config.tie_embeddings else head) + d + sum(total for total, _ in blocks)
    main_active = head + d + sum(active for _, active in blocks)
    # Each MTP depth (DeepSeek-V3 sec. 2.2): RMSNorms of the hidden state and of the next token's embedding, the
    # projection M [d, 2d], one decoder block, and its own final RMSNorm before the shared output head.
    mtp_total = mtp_active = 0
    for depth in range(config.mtp_depth):
        block_total, block_active = _block_params(config, config.num_layers + depth)
        mtp_total += 3 * d + 2 * d * d + block_total
        mtp_active += 3 * d + 2 * d * d + block_active
    return {
        "total": main_total + mtp_total,
        "active": main_active,
        "embedding": embedding,
        "mtp": mtp_total,
        "mtp_active": mtp_active,
    }


def _attention_flops(config: ModelConfig, context: float, *, absorbed: bool) -> float:
    """Score and value FLOPs of one layer for one query token attending to `context` keys."""
    heads = config.num_heads
    if config.attention == "mla" and absorbed:
        # Absorbed MLA (DeepSeek-V2 sec. 2.1.4): scores against the cached latent + rope key, values are the latent.
        qk_dim, v_dim = config.kv_lora_rank + config.qk_rope_head_dim, config.kv_lora_rank
    elif config.attention == "mla":
        qk_dim, v_dim = config.qk_head_dim, config.v_head_dim
    else:
        qk_dim = v_dim = config.gqa_head_dim
    return 2.0 * heads * (qk_dim + v_dim) * context


def flops_per_token(config: ModelConfig, seq_len: int, *, training: bool) -> float:
    """FLOPs per token of a full-sequence pass over `seq_len`-token causal sequences.

    training=True: forward + backward (3x forward) of the main model and the MTP modules (each MTP depth runs one
    more block and the output head). training=False: forward of the main model only (prefill / evaluation).
    A causal query attends on average to seq_len / 2 keys (min(position, sliding_window) with a window).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    window = config.sliding_window
    if window is None or window >= seq_len:
        context = seq_len / 2
    else:  # mean of min(x, window) for x uniform on [0, seq_len]
        context = window - window * window / (2 * seq_len)
    counts = count_params(config)
    forward = 2.0 * counts["active"] + config.num_layers * _attention_flops(config, context, absorbed=False)
    if not training:
        return forward
    mtp_head = config.mtp_depth * config.vocab_size * config.d_model
    mtp = 2.0 * (counts["mtp_active"] + mtp_head) + config.mtp_depth * _attention_flops(config, context, absorbed=False)
    return 3.0 * (forward + mtp)


def decode_flops_per_token(config: ModelConfig, context_len: int) -> float:
    """Forward FLOPs to sample one token attending to `context_len` cached tokens (MLA in its absorbed form).

    Absorbing W_UK / W_UV into the query / output costs 2 * kv_lora_rank * heads * (nope + v) per token, the same as
    the up-projection parameters, so the matmul term is unchanged; only the attention dims change.
    """
    if context_len < 0:
        raise ValueError(f"context_len={context_len} must be >= 0")
    context = context_len if config.sliding_window is None else min(context_len, config.sliding_window)
    attention = config.num_layers * _attention_flops(config, context, absorbed=True)
    return 2.0 * count_params(config)["active"] + attention
