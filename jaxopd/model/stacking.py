"""Scanned decoder layers (`ModelConfig.scan_layers`): which layers share a stack, and the conversion of param-shaped
trees between the unrolled layout (`layers_{i}/...`, one subtree per layer) and the scanned one (`<stack>/...`, every
leaf stacked `[layers, ...]`, logical axis "layers").

Stacks (`layer_stacks`): layers of one kind run under one `nn.scan`, so a model whose layers are all alike has one
stack, `layers`; DeepSeek's first `first_k_dense` dense layers and its MoE layers are two, `dense_layers` then
`moe_layers`. MTP blocks are never stacked (`mtp_{j}` in both layouts).

The conversions are structural and work on any tree whose dicts hold a model's top-level param keys somewhere
(params, their shapes or shardings, optimizer states with param-shaped moments, LoRA adapter subtrees): each such
dict is converted, everything else is passed through. They pop the layer entries out of the dicts they are given, and
drop each array once it is stacked or sliced, so a caller who hands over its only reference never holds a layer's
arrays twice.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from jaxopd.model.config import ModelConfig

__all__ = ["LayerStack", "is_scanned", "layer_key", "layer_stacks", "stack_layers", "to_layout", "unstack_layers"]


@dataclasses.dataclass(frozen=True)
class LayerStack:
    """Decoder layers first .. first + count - 1, scanned as one module whose params live under `name`."""

    name: str
    first: int
    count: int

    @property
    def layers(self) -> range:
        return range(self.first, self.first + self.count)


def layer_stacks(config: ModelConfig) -> tuple[LayerStack, ...]:
    """The stacks of `config`'s decoder layers, in layer order (see the module docstring)."""
    dense = config.first_k_dense if config.num_experts else config.num_layers
    if dense in (0, config.num_layers):
        return (LayerStack("layers", 0, config.num_layers),)
    return LayerStack("dense_layers", 0, dense), LayerStack("moe_layers", dense, config.num_layers - dense)


def layer_key(layer: int) -> str:
    """The unrolled layout's key of decoder layer `layer`."""
    return f"layers_{layer}"


def _stack_numpy(leaves: list) -> Any:
    return np.stack([np.asarray(leaf) for leaf in leaves])


def stack_layers(config: ModelConfig, tree: dict, stack: Callable[[list], Any] = _stack_numpy) -> dict:
    """One param-shaped dict in the unrolled layout -> the scanned layout; `stack(leaves of one param, in layer
    order)` makes each stacked leaf (numpy by default). A stack none of whose layers is in `tree` (a LoRA adapter tree
    without adapters there) is left out. Pops the layer entries out of `tree`."""
    out = {key: value for key, value in tree.items() if not key.startswith("layers_")}
    for group in layer_stacks(config):
        layers = [tree.pop(layer_key(layer)) for layer in group.layers if layer_key(layer) in tree]
        if not layers:
            continue
        if len(layers) != group.count:
            raise ValueError(f"stacking {group.name}: {len(layers)} of layers {group.layers} are present; a stack "
                             "needs all or none")
        flat = [jax.tree.flatten(layer) for layer in layers]
        treedef = flat[0][1]
        leaves = [list(layer_leaves) for layer_leaves, _ in flat]
        del layers, flat
        stacked = []
        for index in range(treedef.num_leaves):
            stacked.append(stack([layer_leaves[index] for layer_leaves in leaves]))
            for layer_leaves in leaves:
                layer_leaves[index] = None  # free each layer's copy as soon as it is stacked
        out[group.name] = jax.tree.unflatten(treedef, stacked)
    return out


def unstack_layers(config: ModelConfig, tree: dict, take: Callable[[Any, int], Any] = lambda leaf, i: leaf[i]
                   ) -> dict:
    """One param-shaped dict in the scanned layout -> the unrolled layout; `take(stacked leaf, i)` is the leaf of the
    stack's i-th layer. Pops the stacks out of `tree`."""
    stack_names = {group.name for group in layer_stacks(config)}
    out = {key: value for key, value in tree.items() if key not in stack_names}
    for group in layer_stacks(config):
        if group.name not in tree:
            continue
        leaves, treedef = jax.tree.flatten(tree.pop(group.name))
        per_layer: list[list] = [[] for _ in group.layers]
        for index in range(len(leaves)):
            for i, layer_leaves in enumerate(per_layer):
                layer_leaves.append(take(leaves[index], i))
            leaves[index] = None
        for layer, layer_leaves in zip(group.layers, per_layer):
            out[layer_key(layer)] = jax.tree.unflatten(treedef, layer_leaves)
    return out


def _is_params_root(config: ModelConfig, node: Any) -> bool:
    names = {group.name for group in layer_stacks(config)}
    return isinstance(node, dict) and any(key.startswith("layers_") or key in names for key in node)


def is_scanned(config: ModelConfig, tree: Any) -> bool:
    """Whether the first param-shaped dict in `tree` is in the scanned layout (ValueError when it holds none)."""
    roots = jax.tree.leaves(tree, is_leaf=lambda node: _is_params_root(config, node))
    for root in roots:
        if _is_params_root(config, root):
            return not any(key.startswith("layers_") for key in root)
    raise ValueError("the tree holds no decoder layers (neither layers_{i} nor stacked layers)")


def to_layout(config: ModelConfig, tree: Any, scanned: bool, stack: Callable[[list], Any] = _stack_numpy,
              take: Callable[[Any, int], Any] = lambda leaf, i: leaf[i]) -> Any:
    """`tree` with every param-shaped dict in it converted to the scanned (`scanned` True) or unrolled layout (a dict
    already in that layout is unchanged); `stack`/`take` as for `stack_layers`/`unstack_layers`. The layers are
    popped out of `tree`'s dicts (pass `jax.tree.map(lambda x: x, tree)` to keep `tree` whole)."""

    def convert(node: Any) -> Any:
        if not _is_params_root(config, node):
            return node
        return stack_layers(config, node, stack) if scanned else unstack_layers(config, node, take)

    return jax.tree.map(convert, tree, is_leaf=lambda node: _is_params_root(config, node))
