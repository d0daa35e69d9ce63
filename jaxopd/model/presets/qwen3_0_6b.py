"""Qwen3-0.6B (HF Qwen/Qwen3-0.6B config.json): 28 layers, GQA 16/8 heads of 128 with q/k RMSNorm, tied embeddings."""

from jaxopd.model.config import ModelConfig


def get_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=151936,
        d_model=1024,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=3072,
        qk_norm=True,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_embeddings=True,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )
