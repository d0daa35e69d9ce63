"""DeepSeek-V2-Lite (15.7B total, 2.4B activated; HF deepseek-ai/DeepSeek-V2-Lite config.json): 27 layers (1 dense),
MLA without q compression, 64 routed experts top-6 (softmax router, no top-k renormalization), 2 shared,
YaRN x40 with mscale 0.707."""

from jaxopd.model.config import ModelConfig, RopeScaling


def get_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=102400,
        d_model=2048,
        num_layers=27,
        num_heads=16,
        mlp_dim=10944,
        attention="mla",
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope_theta=10000.0,
        rope_layout="interleaved",
        rope_scaling=RopeScaling(
            kind="yarn",
            factor=40.0,
            original_max_position_embeddings=4096,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=0.707,
            mscale_all_dim=0.707,
        ),
        max_position_embeddings=163840,
        num_experts=64,
        num_experts_per_token=6,
        num_shared_experts=2,
        moe_mlp_dim=1408,
        first_k_dense=1,
        router_score="softmax",
        num_expert_groups=1,
        topk_groups=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        rms_norm_eps=1e-6,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )
