"""Qwen3-32B (HF Qwen/Qwen3-32B config.json): 64 layers, GQA 64/8 heads of 128 with q/k RMSNorm, untied head; the
teacher of configs/opd_qwen3.py."""

from jaxopd.model.config import ModelConfig


def get_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=151936,
        d_model=5120,
        num_layers=64,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=25600,
        qk_norm=True,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_embeddings=False,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )
