"""Flax linen modules for DeepSeek-V3/V2, Qwen3/Qwen2 and Llama 3 decoders, built on `jaxopd.kernels`.

Only the config is imported eagerly: `jaxopd.kernels.rope` imports `jaxopd.model.config`, and the modules import the
kernels, so importing the modules here would make `import jaxopd.kernels.rope` circular. The rest loads on first use.
"""

import importlib

from jaxopd.model.config import ModelConfig, RopeScaling

_LAZY = {
    "Features": "jaxopd.model.transformer",
    "Transformer": "jaxopd.model.transformer",
    "moe_layer_paths": "jaxopd.model.transformer",
    "unembedding": "jaxopd.model.transformer",
    "update_expert_biases": "jaxopd.model.transformer",
    "init_cache": "jaxopd.model.cache",
    "load_preset": "jaxopd.model.presets",
}

__all__ = ["ModelConfig", "RopeScaling", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxopd.model' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
