"""The one model configuration: a frozen dataclass that can express DeepSeek-V3/V2, Qwen3/Qwen2 and Llama 3."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from jaxopd.kernels.rope import RopeScaling

__all__ = ["ModelConfig", "RopeScaling"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only transformer.

    Attention is "gqa" (Llama/Qwen: num_kv_heads, head_dim, optional q/k RMSNorm) or "mla" (DeepSeek: q_lora_rank,
    kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim). Layers below `first_k_dense` use a dense SwiGLU MLP
    of width `mlp_dim`; the rest use DeepSeekMoE when `num_experts > 0`.

    Fields keep Hugging Face's meaning (None = the default); the values derived from them are properties, written once:
      kv_heads        key/value heads: num_kv_heads, or num_heads when unset (MLA: one per query head).
      gqa_head_dim    GQA width of every q/k/v head: head_dim, or d_model // num_heads when unset.
      qk_head_dim     MLA width of every query/key head: qk_nope_head_dim + qk_rope_head_dim.
      is_moe_layer(layer)  whether decoder layer `layer` (MTP blocks are layers num_layers, num_layers + 1, ...)
                      runs DeepSeekMoE rather than the dense MLP.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    attention: str = "gqa"
    # GQA
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    qk_norm: bool = False
    attention_bias: bool = False
    # MLA
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Positions
    rope_theta: float = 10000.0
    rope_layout: str = "rotate_half"  # "rotate_half" (transformers, Qwen, Llama) or "interleaved" (DeepSeek reference)
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 4096
    sliding_window: Optional[int] = None
    # Mixture of experts
    num_experts: int = 0
    num_experts_per_token: int = 0
    num_shared_experts: int = 0
    moe_mlp_dim: int = 0
    first_k_dense: int = 0
    router_score: str = "sigmoid"  # "sigmoid" (DeepSeek-V3) or "softmax" (V2, Qwen-MoE, Mixtral)
    num_expert_groups: int = 1
    topk_groups: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # Multi-token prediction depth (DeepSeek-V3 uses 1).
    mtp_depth: int = 0
    # Misc
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02  # normal(0, init_std) for every matrix and the embedding (HF `initializer_range`)
    dtype: str = "float32"  # compute dtype; softmax, norms and logits stay float32
    param_dtype: str = "float32"
    remat: bool = False  # rematerialize each decoder block in the backward pass (nn.remat)
    # How the forward pass runs (not the architecture): `jaxopd.kernels.attention` implementation for training and
    # prefill, and whether routed experts run expert-parallel (shard_map over the "expert" axis of the mesh set
    # with `jax.set_mesh`; at init or with no mesh set they run unsharded).
    attention_implementation: str = "xla"  # "xla", "cudnn", "blockwise" (long context) or "splash" (TPU)
    attention_block_q: int = 512  # tile sizes of "blockwise" and "splash"
    attention_block_kv: int = 512
    expert_parallel: bool = False

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer >= self.first_k_dense

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
