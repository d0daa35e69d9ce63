"""Llama 3.2 1B (HF meta-llama/Llama-3.2-1B config.json): 16 layers, GQA 32/8 heads of 64, tied embeddings,
llama3 RoPE scaling x32 from 8192 tokens."""

from jaxopd.model.config import ModelConfig, RopeScaling


def get_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=128256,
        d_model=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=8192,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            kind="llama3", factor=32.0, original_max_position_embeddings=8192, low_freq_factor=1.0, high_freq_factor=4.0
        ),
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_embeddings=True,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )
