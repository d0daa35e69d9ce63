"""Which Hugging Face tensor fills which of our parameters, and how its layout changes on the way.

One `Entry` per parameter of ours. Hugging Face stores `nn.Linear` weights as `[out, in]`; we store kernels as
`[in..., out...]` with heads split out (`[d_model, heads, head_dim]`), and stack routed experts into `[experts, ...]`.
An entry's `names` array has the shape of our stacked leading axes (`[experts]` for expert weights, `[]` otherwise,
and a `[layers]` axis first for the scanned layers of `ModelConfig.scan_layers`); each name fills one slice, so
loading and saving go tensor by tensor in either layout.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

import numpy as np

from jaxopd.model.config import ModelConfig
from jaxopd.model.stacking import layer_key, layer_stacks


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter of ours.

    path: its key path in the params tree.
    names: Hugging Face tensor names, array of the shape of our stacked leading axes ([] or [experts], after
      [layers] when scanned).
    layout: "linear" (HF [out, in] -> ours [in..., out...]; `in_ndim` leading axes of ours form `in`),
      "vector" (any shape <-> 1-D), or "table" (same 2-D layout, e.g. embeddings).
    fill: value to use when the tensor is absent (parameters the source architecture does not have).
    """

    path: tuple[str, ...]
    names: np.ndarray
    layout: str
    in_ndim: int = 1
    fill: Optional[float] = None

    def to_ours(self, hf_tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """One slice of our parameter, `shape` without the stacked axes, from one Hugging Face tensor."""
        if self.layout == "linear":
            hf_tensor = hf_tensor.T
        if math.prod(hf_tensor.shape) != math.prod(shape):
            raise ValueError(f"tensor {self.names.flat[0]!r} has shape {hf_tensor.shape}, which does not fit parameter "
                             f"{'/'.join(self.path)} of shape {shape} implied by config.json")
        return hf_tensor.reshape(shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        """The inverse of `to_ours` for one slice."""
        if self.layout == "linear":
            return ours.reshape(math.prod(ours.shape[: self.in_ndim]), -1).T
        if self.layout == "vector":
            return ours.reshape(-1)
        return ours


def _one(path: tuple[str, ...], name: str, layout: str, **kwargs) -> Entry:
    return Entry(path, np.array(name, dtype=object), layout, **kwargs)


def _experts(path: tuple[str, ...], template: str, num_experts: int, **kwargs) -> Entry:
    names = np.array([template.format(expert=e) for e in range(num_experts)], dtype=object)
    return Entry(path, names, "linear", **kwargs)


def _swiglu(ours: tuple[str, ...], hf: str) -> list[Entry]:
    return [_one(ours + ("w_gate",), f"{hf}.gate_proj.weight", "linear"),
            _one(ours + ("w_up",), f"{hf}.up_proj.weight", "linear"),
            _one(ours + ("w_down",), f"{hf}.down_proj.weight", "linear")]


def _attention_entries(config: ModelConfig, ours: tuple[str, ...], hf: str) -> list[Entry]:
    if config.attention == "gqa":
        entries = [_one(ours + (p,), f"{hf}.{p}_proj.weight", "linear") for p in ("q", "k", "v")]
        entries.append(_one(ours + ("o",), f"{hf}.o_proj.weight", "linear", in_ndim=2))
        if config.attention_bias:
            entries += [_one(ours + (f"{p}_bias",), f"{hf}.{p}_proj.bias", "vector") for p in ("q", "k", "v")]
        if config.qk_norm:
            entries += [_one(ours + ("q_norm", "scale"), f"{hf}.q_norm.weight", "vector"),
                        _one(ours + ("k_norm", "scale"), f"{hf}.k_norm.weight", "vector")]
        return entries
    if config.q_lora_rank is None:
        entries = [_one(ours + ("q",), f"{hf}.q_proj.weight", "linear")]
    else:
        entries = [_one(ours + ("q_a",), f"{hf}.q_a_proj.weight", "linear"),
                   _one(ours + ("q_a_norm", "scale"), f"{hf}.q_a_layernorm.weight", "vector"),
                   _one(ours + ("q_b",), f"{hf}.q_b_proj.weight", "linear")]
    return entries + [
        _one(ours + ("kv_a",), f"{hf}.kv_a_proj_with_mqa.weight", "linear"),
        _one(ours + ("kv_a_norm", "scale"), f"{hf}.kv_a_layernorm.weight", "vector"),
        _one(ours + ("kv_b",), f"{hf}.kv_b_proj.weight", "linear"),
        _one(ours + ("o",), f"{hf}.o_proj.weight", "linear", in_ndim=2),
    ]


def _mlp_entries(config: ModelConfig, layer: int, ours: tuple[str, ...], hf: str) -> list[Entry]:
    if not config.is_moe_layer(layer):
        return _swiglu(ours, hf)
    entries = [
        _one(ours + ("router",), f"{hf}.gate.weight", "linear"),
        # Softmax-routed checkpoints (DeepSeek-V2) have no balance bias; it starts at zero.
        _one(ours + ("expert_bias",), f"{hf}.gate.e_score_correction_bias", "vector",
             fill=0.0 if config.router_score == "softmax" else None),
    ]
    entries += [_experts(ours + (f"w_{p}",), f"{hf}.experts.{{expert}}.{p}_proj.weight", config.num_experts)
                for p in ("gate", "up", "down")]
    if config.num_shared_experts:
        entries += _swiglu(ours + ("shared",), f"{hf}.shared_experts")
    return entries


def _block_entries(config: ModelConfig, layer: int, ours: tuple[str, ...], hf: str) -> list[Entry]:
    return [
        _one(ours + ("attention_norm", "scale"), f"{hf}.input_layernorm.weight", "vector"),
        *_attention_entries(config, ours + ("attention",), f"{hf}.self_attn"),
        _one(ours + ("mlp_norm", "scale"), f"{hf}.post_attention_layernorm.weight", "vector"),
        *_mlp_entries(config, layer, ours + ("mlp",), f"{hf}.mlp"),
    ]


def param_entries(config: ModelConfig) -> list[Entry]:
    """Every parameter of `Transformer(config)` with its Hugging Face source, in checkpoint order."""
    entries = [_one(("embed", "embedding"), "model.embed_tokens.weight", "table")]
    if config.scan_layers:
        for group in layer_stacks(config):
            per_layer = [_block_entries(config, layer, (group.name,), f"model.layers.{layer}") for layer in group.layers]
            # the same parameter of every layer of the stack: one entry whose names gain the [layers] axis
            entries += [dataclasses.replace(same[0], names=np.stack([entry.names for entry in same]))
                        for same in zip(*per_layer)]
    else:
        for layer in range(config.num_layers):
            entries += _block_entries(config, layer, (layer_key(layer),), f"model.layers.{layer}")
    entries.append(_one(("final_norm", "scale"), "model.norm.weight", "vector"))
    if not config.tie_embeddings:
        entries.append(_one(("unembed",), "lm_head.weight", "linear"))
    # DeepSeek-V3 stores MTP module k as decoder layer num_layers + k (its embedding and head are shared with the
    # main model and stored again there; see `ignorable`).
    for depth in range(config.mtp_depth):
        hf = f"model.layers.{config.num_layers + depth}"
        ours = (f"mtp_{depth}",)
        entries += [
            _one(ours + ("embed_norm", "scale"), f"{hf}.enorm.weight", "vector"),
            _one(ours + ("hidden_norm", "scale"), f"{hf}.hnorm.weight", "vector"),
            _one(ours + ("projection",), f"{hf}.eh_proj.weight", "linear"),
            *_block_entries(config, config.num_layers + depth, ours + ("block",), hf),
            _one(ours + ("norm", "scale"), f"{hf}.shared_head.norm.weight", "vector"),
        ]
    return entries


def shared_copies(config: ModelConfig) -> dict[str, str]:
    """Tensors DeepSeek checkpoints store twice: {copy name: name of the tensor it repeats}."""
    copies = {}
    for depth in range(config.mtp_depth):
        hf = f"model.layers.{config.num_layers + depth}"
        copies[f"{hf}.embed_tokens.weight"] = "model.embed_tokens.weight"
        copies[f"{hf}.shared_head.head.weight"] = "model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"
    return copies


_ROTARY_TABLE = re.compile(r"\.rotary_emb\.inv_freq$")


def ignorable(name: str, config: ModelConfig) -> bool:
    """Stored tensors that hold nothing we load: RoPE tables (recomputed), a tied head, MTP's repeated embedding."""
    if _ROTARY_TABLE.search(name):
        return True
    if name == "lm_head.weight" and config.tie_embeddings:
        return True
    return name in shared_copies(config)
