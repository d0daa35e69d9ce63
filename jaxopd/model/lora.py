"""LoRA (Hu et al. 2021) for every weight of the kinds `ModelConfig.lora_targets` names: the adapters, their place in
the param tree, the split the trainer uses to train them alone, and `merged` for export.

Each adapted weight `name` of shape `[in..., out...]` gets two params beside it (as peft: A kaiming-uniform, B zero,
so a fresh LoRA model computes exactly its base model):
  {name}_lora_a   [in..., rank]     the weight's logical axes for its input dims, the rank axis replicated
  {name}_lora_b   [rank, out...]    zeros; the rank axis replicated, then the weight's output axes
and its output gains ((dropout(x) A) B) * lora_alpha / lora_rank, never forming A B (`jaxopd.kernels.layers.low_rank`).
Expert stacks `[E, in, out]` get per-expert adapters `[E, in, rank]`, `[E, rank, out]`, run through the same grouped
matmuls as the experts. MLA's `kv_b` is the one exception: the MLA kernels consume it as a weight (absorbed into the
queries when decoding), so its update is folded in, `kv_b + A B * scale` (a `[c, h, dn + dv]` tensor per layer), and
takes no dropout.

Dropout (`lora_dropout`) applies only when the model is applied with a "dropout" rng (the train step passes one).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxopd.kernels.layers import LowRank, low_rank
from jaxopd.model.config import ModelConfig

__all__ = ["SUFFIXES", "adapter", "apply", "combine", "folded", "is_adapter", "merged", "partition", "split",
           "summarize", "with_dropout"]

SUFFIXES = ("_lora_a", "_lora_b")


def _kaiming_uniform(fan_in: int):
    # peft's default: torch kaiming_uniform_(a=sqrt(5)) on A, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def adapter(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[Optional[str]], num_in: int,
            target: str, num_stacked: int = 0) -> Optional[LowRank]:
    """The adapter of weight `name` (`shape` = stacked dims, `num_in` input dims, then output dims; `axes` its logical
    axes) when config.lora_targets holds `target`, else None: a, b in the compute dtype, b times the scale."""
    config: ModelConfig = module.config
    if not config.has_lora(target):
        return None
    rank, split = config.lora_rank, num_stacked + num_in
    stacked, inputs, outputs = tuple(shape[:num_stacked]), tuple(shape[num_stacked:split]), tuple(shape[split:])
    stacked_axes, input_axes = tuple(axes[:num_stacked]), tuple(axes[num_stacked:split])
    output_axes = tuple(axes[split:])
    a = module.param(f"{name}_lora_a", nn.with_logical_partitioning(_kaiming_uniform(math.prod(inputs)),
                                                                     stacked_axes + input_axes + (None,)),
                     stacked + inputs + (rank,), config.param_dtype)
    b = module.param(f"{name}_lora_b", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                     stacked_axes + (None,) + output_axes),
                     stacked + (rank,) + outputs, config.param_dtype)
    return LowRank(a.astype(config.dtype), (b * config.lora_scale).astype(config.dtype))


def with_dropout(module: nn.Module, update: Optional[LowRank], input_shape: Sequence[int]) -> Optional[LowRank]:
    """`update` with an inverted-dropout keep mask `input_shape` (the adapter's input) when config.lora_dropout > 0
    and the model is applied with a "dropout" rng (training); else as it is."""
    rate = module.config.lora_dropout
    if update is None or rate == 0 or not module.has_rng("dropout"):
        return update
    kept = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, tuple(input_shape))
    return update._replace(keep=kept.astype(module.config.dtype) / (1.0 - rate))


def apply(module: nn.Module, x: jnp.ndarray, update: Optional[LowRank]) -> jnp.ndarray | float:
    """The update's output for input x `[..., in...]` -> `[..., out...]` (dropout drawn here); 0.0 without one."""
    return low_rank(x, with_dropout(module, update, x.shape))


def folded(update: Optional[LowRank]) -> jnp.ndarray | float:
    """A b `[in..., out...]` (the scaled delta weight) for a weight the kernels consume whole; 0.0 without one."""
    return 0.0 if update is None else _delta(update.a, update.b, num_stacked=0)


def is_adapter(name: str) -> bool:
    return name.endswith(SUFFIXES)


def partition(config: ModelConfig, tree: Any) -> tuple[Any, Any]:
    """(trained, frozen) parts of a param-shaped tree of nested dicts (params, boxed params, their shardings): with
    LoRA the adapters and everything else; without, the whole tree and {}. `combine` puts them back together."""
    if not config.lora_rank:
        return tree, {}
    return split(tree)


def split(tree: Mapping) -> tuple[dict, dict]:
    """(adapters, everything else) of a param-shaped tree of nested dicts; either may be {}."""
    adapters, base = {}, {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            sub_adapters, sub_base = split(value)
            if sub_adapters:
                adapters[key] = sub_adapters
            if sub_base:
                base[key] = sub_base
        elif is_adapter(key):
            adapters[key] = value
        else:
            base[key] = value
    return adapters, base


def combine(trained: Mapping, frozen: Mapping) -> dict:
    """The inverse of `partition`: the two disjoint trees of nested dicts merged into one."""
    result = dict(frozen)
    for key, value in trained.items():
        result[key] = combine(value, frozen[key]) if key in frozen else value
    return result


def summarize(paths: Sequence[str]) -> str:
    """Param paths (`jax.tree_util.keystr` strings) for a message: the first five that are not adapters, and how
    many adapters (a LoRA model has thousands)."""
    adapters = [path for path in paths if is_adapter(path.rstrip("']"))]
    others = [path for path in paths if not is_adapter(path.rstrip("']"))]
    parts = ([str(others[:5])] if others else []) + ([f"{len(adapters)} LoRA adapters"] if adapters else [])
    return " and ".join(parts)


def merged(config: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
    """(config with the lora fields at their defaults (rank 0), params with every adapter folded in, W + (A B) *
    scale, and the adapters removed): the plain model export writes. params: unboxed arrays; merged weights keep
    their dtype (the sum is taken in float32)."""
    if not config.lora_rank:
        return config, params
    adapters, base = split(params)
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name.startswith("lora_")}
    return config.replace(**defaults), _fold(adapters, base, config.lora_scale)


def _fold(adapters: Mapping, base: Mapping, scale: float) -> dict:
    result = dict(base)
    for key, value in adapters.items():
        if isinstance(value, Mapping):
            result[key] = _fold(value, base[key], scale)
        elif key.endswith(SUFFIXES[0]):
            name = key[: -len(SUFFIXES[0])]
            a, b, weight = value, adapters[name + SUFFIXES[1]], base[name]
            delta = _delta(a.astype(jnp.float32), b.astype(jnp.float32), a.ndim + b.ndim - 2 - weight.ndim)
            result[name] = (weight.astype(jnp.float32) + scale * delta).astype(weight.dtype)
    return result


def _delta(a: jnp.ndarray, b: jnp.ndarray, num_stacked: int) -> jnp.ndarray:
    """A B `[stacked..., in..., out...]` for a `[stacked..., in..., r]`, b `[stacked..., r, out...]` (the stacked axes,
    experts, are batch axes of the product)."""
    stacked, inputs, outputs = a.shape[:num_stacked], a.shape[num_stacked:-1], b.shape[num_stacked + 1:]
    rank = a.shape[-1]
    product = jnp.matmul(a.reshape(math.prod(stacked), math.prod(inputs), rank),
                         b.reshape(math.prod(stacked), rank, math.prod(outputs)))
    return product.reshape(stacked + inputs + outputs)
