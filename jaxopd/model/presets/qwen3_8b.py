"""Qwen3-8B (HF Qwen/Qwen3-8B config.json): 36 layers, GQA 32/8 heads of 128 with q/k RMSNorm, untied head."""

from jaxopd.model.config import ModelConfig


def get_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=151936,
        d_model=4096,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=12288,
        qk_norm=True,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_embeddings=False,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )
