"""Flax linen modules for DeepSeek-V3/V2, Qwen3/Qwen2 and Llama 3 decoders, built on `jaxopd.kernels`."""

from jaxopd.model.cache import init_cache
from jaxopd.model.config import ModelConfig, RopeScaling
from jaxopd.model.presets import load_preset
from jaxopd.model.transformer import Features, Transformer, moe_layer_paths, unembedding, update_expert_biases

__all__ = [
    "Features",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "init_cache",
    "load_preset",
    "moe_layer_paths",
    "unembedding",
    "update_expert_biases",
]
