"""Llama 3.1 8B (HF meta-llama/Llama-3.1-8B config.json): 32 layers, GQA 32/8 heads, llama3 RoPE scaling x8 from
8192 tokens (128K context). For the original Llama 3 8B (8K context), set rope_scaling=None."""

from jaxopd.model.config import ModelConfig, RopeScaling


def get_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=128256,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=14336,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            kind="llama3", factor=8.0, original_max_position_embeddings=8192, low_freq_factor=1.0, high_freq_factor=4.0
        ),
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_embeddings=False,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )
