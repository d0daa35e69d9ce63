"""Small modules shared by every architecture: a parameter helper, RMSNorm, token embedding and the SwiGLU MLP.

Dtype policy (all modules): parameters are stored in `config.param_dtype` and cast to `config.dtype` for compute;
norms, softmax and logits run in float32 inside the kernels.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxopd.kernels.layers import LowRank, rms_norm, swiglu
from jaxopd.model import lora
from jaxopd.model.config import ModelConfig


def param(
    module: nn.Module,
    name: str,
    shape: Sequence[int],
    axes: Sequence[Optional[str]],
    init: Optional[Callable] = None,
    dtype: Optional[str] = None,
) -> jnp.ndarray:
    """Create (or fetch) parameter `name` annotated with logical axis names; normal(config.init_std) by default.

    The value comes back unboxed in its storage dtype (`config.param_dtype` unless `dtype` is given).
    """
    config: ModelConfig = module.config
    init = init or nn.initializers.normal(config.init_std)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype or config.param_dtype)


def projection(
    module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[Optional[str]], num_in: int, target: str,
    num_stacked: int = 0,
) -> tuple[jnp.ndarray, Optional[LowRank]]:
    """param `name` (`shape`: `num_stacked` stacked dims, `num_in` input dims, then output dims) and, when
    config.lora_targets holds `target`, its LoRA update (`jaxopd.model.lora.adapter`), else None."""
    return param(module, name, shape, axes), lora.adapter(module, name, shape, axes, num_in, target, num_stacked)


def compute(module: nn.Module, array: jnp.ndarray) -> jnp.ndarray:
    """`array` (a parameter) in the compute dtype."""
    return array.astype(module.config.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned `scale [dim]` (logical axis "norm"), initialized to ones."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones)
        return rms_norm(x, scale, self.config.rms_norm_eps)


class Embed(nn.Module):
    """Token embedding `embedding [vocab, d]` ("vocab", "embed"); `attend` is the tied output head."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.embedding = param(self, "embedding", (c.vocab_size, c.d_model), ("vocab", "embed"))

    def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """tokens `[batch, seq]` int -> `[batch, seq, d]` in the compute dtype."""
        return compute(self, jnp.take(self.embedding, tokens, axis=0))

    def attend(self, hidden: jnp.ndarray) -> jnp.ndarray:
        """hidden `[batch, seq, d]` -> float32 logits `[batch, seq, vocab]` against the embedding table."""
        return jnp.einsum("btd,vd->btv", hidden, compute(self, self.embedding), preferred_element_type=jnp.float32)


class MLP(nn.Module):
    """SwiGLU MLP: `w_gate`, `w_up [d, width]` ("embed", "mlp"), `w_down [width, d]` ("mlp", "embed"); LoRA
    target `target` ("mlp" for the dense layers, "experts" for the MoE's shared experts)."""

    config: ModelConfig
    width: int
    target: str = "mlp"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x `[..., d]` -> `[..., d]`."""
        d = self.config.d_model
        w_gate, gate_update = projection(self, "w_gate", (d, self.width), ("embed", "mlp"), 1, self.target)
        w_up, up_update = projection(self, "w_up", (d, self.width), ("embed", "mlp"), 1, self.target)
        w_down, down_update = projection(self, "w_down", (self.width, d), ("mlp", "embed"), 1, self.target)
        updates = (lora.with_dropout(self, gate_update, x.shape), lora.with_dropout(self, up_update, x.shape),
                   lora.with_dropout(self, down_update, (*x.shape[:-1], self.width)))
        return swiglu(x, compute(self, w_gate), compute(self, w_up), compute(self, w_down), updates)
