"""A tiny DeepSeek-V3-shaped model (~2.4M parameters) for CPU training, tests and demos: MLA with a q low-rank
projection, DeepSeekMoE (sigmoid router, 8 experts in 2 groups, top-2, one shared expert) after one dense layer,
interleaved RoPE, and one multi-token-prediction depth."""

from jaxopd.model.config import ModelConfig


def get_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=4096,
        d_model=128,
        num_layers=4,
        num_heads=4,
        mlp_dim=384,
        attention="mla",
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        rope_theta=10000.0,
        rope_layout="interleaved",
        max_position_embeddings=1024,
        num_experts=8,
        num_experts_per_token=2,
        num_shared_experts=1,
        moe_mlp_dim=64,
        first_k_dense=1,
        router_score="sigmoid",
        num_expert_groups=2,
        topk_groups=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        mtp_depth=1,
        rms_norm_eps=1e-6,
    )
