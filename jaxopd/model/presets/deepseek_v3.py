"""DeepSeek-V3 (671B total, 37B activated; DeepSeek-V3 technical report, HF deepseek-ai/DeepSeek-V3 config.json):
61 layers (3 dense), MLA, 256 routed experts top-8 in 8 groups (top-4 groups), 1 shared, sigmoid router,
YaRN x40 from 4096 tokens, one MTP depth."""

from jaxopd.model.config import ModelConfig, RopeScaling


def get_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=129280,
        d_model=7168,
        num_layers=61,
        num_heads=128,
        mlp_dim=18432,
        attention="mla",
        q_lora_rank=1536,
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
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        max_position_embeddings=163840,
        num_experts=256,
        num_experts_per_token=8,
        num_shared_experts=1,
        moe_mlp_dim=2048,
        first_k_dense=3,
        router_score="sigmoid",
        num_expert_groups=8,
        topk_groups=4,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        mtp_depth=1,
        rms_norm_eps=1e-6,
        init_std=0.006,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )
