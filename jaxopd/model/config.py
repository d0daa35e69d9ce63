"""The one model configuration: a frozen dataclass that can express DeepSeek-V3/V2, Qwen3/Qwen2 and Llama 3.

Every string option is a `Literal` and every field is checked once, in `ModelConfig.__post_init__`: a config no model
can be built from cannot be constructed (nor made by `replace`), so the modules read fields without re-checking them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional, get_args

import jax

from jaxopd.kernels.rope import RopeLayout, RopeScaling, check_rope_scaling

__all__ = ["CONTEXT_EXTENSION_FIELDS", "FORWARD_PASS_FIELDS", "RUN_CHOICE_FIELDS", "AttentionImplementation",
           "AttentionKind", "DTypeName", "ExpertDispatch", "GroupedMatmulChoice", "LoraTarget", "ModelConfig",
           "RematPolicy", "RopeScaling", "RouterScore", "architecture_fields"]

AttentionKind = Literal["gqa", "mla"]
RouterScore = Literal["sigmoid", "softmax"]  # "sigmoid" (DeepSeek-V3) or "softmax" (V2, Qwen-MoE, Mixtral)
# `jaxopd.kernels.attention` implementations: "blockwise" for long context, "splash" on TPU.
AttentionImplementation = Literal["xla", "cudnn", "blockwise", "splash"]
DTypeName = Literal["float32", "bfloat16", "float16"]
# What each decoder block keeps for the backward pass; `jaxopd.model.remat` says what each saves and recomputes.
RematPolicy = Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload"]
# How expert-parallel MoE layers move tokens to the expert shards (`jaxopd.kernels.moe`): every token to every shard
# (moe_experts_expert_parallel), or each (token, expert) pair to its expert's shard only (moe_experts_all_to_all,
# dropless unless moe_capacity_factor; "ragged_all_to_all" moves only the filled rows but runs on GPU/TPU only,
# XLA:CPU lacks the op).
ExpertDispatch = Literal["all_gather", "all_to_all", "ragged_all_to_all"]
# How routed experts' grouped matmuls run (`jaxopd.kernels.moe.moe_experts`): "ragged_dot" (grouped kernels on GPU
# and TPU; XLA:CPU lowers it to a masked matmul over every expert), "tiled" (groups padded to fixed tiles, one
# batched matmul: the routed FLOPs on any backend), or "auto": "tiled" on CPU, "ragged_dot" elsewhere.
GroupedMatmulChoice = Literal["auto", "ragged_dot", "tiled"]
# Module kinds a LoRA adapter can be attached to (`jaxopd.model.lora`): "attention" (GQA q/k/v/o; MLA q or q_a/q_b,
# kv_a, kv_b, o), "mlp" (the dense SwiGLU layers) and "experts" (routed and shared experts).
LoraTarget = Literal["attention", "mlp", "experts"]


def _either(options: Any) -> str:
    """The values of a Literal as prose: 'a' or 'b'; 'a', 'b' or 'c'."""
    quoted = [repr(option) for option in get_args(options)]
    return f"{', '.join(quoted[:-1])} or {quoted[-1]}"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder-only transformer.

    Attention is "gqa" (Llama/Qwen: num_kv_heads, head_dim, optional q/k RMSNorm) or "mla" (DeepSeek: q_lora_rank,
    kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim). Layers below `first_k_dense` use a dense SwiGLU MLP
    of width `mlp_dim`; the rest use DeepSeekMoE when `num_experts > 0`.

    Fields keep Hugging Face's meaning (None = the default); the values derived from them are properties, written once:
      kv_heads        key/value heads: num_kv_heads, or num_heads when unset (MLA: one per query head).
      gqa_head_dim    GQA width of every q/k/v head: head_dim, or d_model // num_heads when unset.
      qk_head_dim     MLA width of every query/key head: qk_nope_head_dim + qk_rope_head_dim.
      lora_scale      the LoRA scale lora_alpha / lora_rank (as peft); has_lora(target): rank > 0 and target listed.
      is_moe_layer(layer)  whether decoder layer `layer` (MTP blocks are layers num_layers, num_layers + 1, ...)
                      runs DeepSeekMoE rather than the dense MLP.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    attention: AttentionKind = "gqa"
    # GQA
    num_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    qk_norm: bool = False
    attention_bias: bool = False
    # MLA
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Positions
    rope_theta: float = 10000.0
    rope_layout: RopeLayout = "rotate_half"  # "rotate_half" (transformers, Qwen, Llama) or "interleaved" (DeepSeek)
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 4096
    sliding_window: Optional[int] = None
    # Mixture of experts
    num_experts: int = 0
    num_experts_per_token: int = 0
    num_shared_experts: int = 0
    moe_mlp_dim: int = 0
    first_k_dense: int = 0
    router_score: RouterScore = "sigmoid"
    num_expert_groups: int = 1
    topk_groups: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # Multi-token prediction depth (DeepSeek-V3 uses 1).
    mtp_depth: int = 0
    # Misc
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02  # normal(0, init_std) for every matrix and the embedding (HF `initializer_range`)
    dtype: DTypeName = "float32"  # compute dtype; softmax, norms and logits stay float32
    param_dtype: DTypeName = "float32"
    # How the forward pass runs (not the architecture): what each decoder block keeps for the backward pass and
    # what it recomputes (`jaxopd.model.remat`; saved configs' remat false/true load as "none"/"full"), the
    # `jaxopd.kernels.attention` implementation for training and prefill, and whether routed experts run
    # expert-parallel (shard_map over the "expert" axis of the mesh set with `jax.set_mesh`; at init or with no mesh
    # set they run unsharded) with which dispatch (ExpertDispatch above), and whether the decoder blocks run under
    # one `nn.scan` per stack of like layers (the default: params stacked `[layers, ...]`, `jaxopd.model.stacking`;
    # compile time nearly flat in depth) or unrolled, one module per layer, for debugging (checkpoints convert
    # between the two on load).
    remat: RematPolicy = "none"
    attention_implementation: AttentionImplementation = "xla"
    attention_block_q: int = 512  # tile sizes of "blockwise" and "splash"
    attention_block_kv: int = 512
    expert_parallel: bool = False
    expert_dispatch: ExpertDispatch = "all_gather"
    # All-to-all dispatch only: None is dropless (each device's per-peer blocks hold all its T * k (token, slot)
    # pairs, sized for the worst routing); c > 0 sizes them ceil(c * T * k / expert shards), so c = 1 fits a perfectly
    # balanced routing and pairs past a full block are dropped (they add zero; the shared experts and the residual
    # still carry the token). Buffers shrink by expert shards / c.
    moe_capacity_factor: Optional[float] = None
    grouped_matmul: GroupedMatmulChoice = "auto"
    scan_layers: bool = True
    # LoRA (Hu et al. 2021; `jaxopd.model.lora`): rank 0 is off. Otherwise every weight of the targeted kinds gets
    # adapters A [in, rank], B [rank, out] (B zero, so the model starts as its base), its output gains
    # (dropout(x) A) B * lora_alpha / lora_rank, and training updates the adapters only.
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[LoraTarget, ...] = ("attention", "mlp", "experts")

    def __post_init__(self) -> None:
        """Raise ValueError, naming the field and the fix, for a config no model can be built from."""
        has_dense_layers = self.num_experts == 0 or self.first_k_dense > 0
        for name in ("vocab_size", "d_model", "num_layers", "num_heads") + (("mlp_dim",) if has_dense_layers else ()):
            if getattr(self, name) < 1:
                raise ValueError(f"config.{name}={getattr(self, name)} must be >= 1")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in get_args(DTypeName):
                raise ValueError(f"config.{name}={getattr(self, name)!r} is not a dtype name ({_either(DTypeName)})")
        for name, options in (("rope_layout", RopeLayout), ("router_score", RouterScore),
                              ("remat", RematPolicy), ("attention_implementation", AttentionImplementation),
                              ("expert_dispatch", ExpertDispatch), ("grouped_matmul", GroupedMatmulChoice)):
            if getattr(self, name) not in get_args(options):
                raise ValueError(f"config.{name}={getattr(self, name)!r} must be {_either(options)}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        if self.attention == "gqa":
            if self.head_dim is None and self.d_model % self.num_heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}: set "
                                 "config.head_dim")
            if self.num_heads % self.kv_heads:
                raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.kv_heads} "
                                 "(GQA groups)")
        elif self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, name) < 1:
                    raise ValueError(f"attention='mla' needs config.{name} >= 1, got {getattr(self, name)}")
            if self.q_lora_rank is not None and self.q_lora_rank < 1:
                raise ValueError(f"config.q_lora_rank={self.q_lora_rank} must be >= 1, or None for a direct q projection")
        else:
            raise ValueError(f"config.attention={self.attention!r} must be {_either(AttentionKind)}")
        if self.num_experts:
            if self.num_experts_per_token < 1 or self.moe_mlp_dim < 1:
                raise ValueError(
                    f"num_experts={self.num_experts} needs num_experts_per_token >= 1 and moe_mlp_dim >= 1, got "
                    f"{self.num_experts_per_token} and {self.moe_mlp_dim}"
                )
        if self.moe_capacity_factor is not None:
            if not self.moe_capacity_factor > 0:
                raise ValueError(f"config.moe_capacity_factor={self.moe_capacity_factor} must be > 0, or None for "
                                 "dropless dispatch")
            if not (self.num_experts and self.expert_parallel and self.expert_dispatch != "all_gather"):
                raise ValueError(
                    f"config.moe_capacity_factor={self.moe_capacity_factor} applies to all-to-all expert dispatch "
                    f"only: set num_experts > 0, expert_parallel=True and expert_dispatch 'all_to_all' or "
                    f"'ragged_all_to_all' (now {self.num_experts}, {self.expert_parallel}, "
                    f"{self.expert_dispatch!r}), or moe_capacity_factor=None")
        if not 0 <= self.first_k_dense <= self.num_layers:
            raise ValueError(f"first_k_dense={self.first_k_dense} must lie in [0, num_layers={self.num_layers}]")
        if self.mtp_depth < 0:
            raise ValueError(f"mtp_depth={self.mtp_depth} must be >= 0")
        self._check_lora()

    def _check_lora(self) -> None:
        # A saved config (JSON) or the command line gives a list: keep the config hashable.
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.lora_rank < 0:
            raise ValueError(f"config.lora_rank={self.lora_rank} must be >= 0 (0 turns LoRA off)")
        unknown = [t for t in self.lora_targets if t not in get_args(LoraTarget)]
        if unknown:
            raise ValueError(f"config.lora_targets has {unknown}: each target must be {_either(LoraTarget)}")
        if self.lora_rank:
            if not self.lora_targets:
                raise ValueError(f"config.lora_rank={self.lora_rank} needs at least one config.lora_targets "
                                 f"({_either(LoraTarget)}), or set lora_rank=0")
            if self.lora_alpha <= 0:
                raise ValueError(f"config.lora_alpha={self.lora_alpha} must be > 0 (the adapters' scale is "
                                 "lora_alpha / lora_rank)")
            if not 0 <= self.lora_dropout < 1:
                raise ValueError(f"config.lora_dropout={self.lora_dropout} must lie in [0, 1)")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def has_lora(self, target: str) -> bool:
        return self.lora_rank > 0 and target in self.lora_targets

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer >= self.first_k_dense

    @property
    def grouped_matmul_kernel(self) -> str:
        """The grouped matmul routed experts run on this backend: `grouped_matmul` with "auto" resolved."""
        if self.grouped_matmul != "auto":
            return self.grouped_matmul
        return "tiled" if jax.default_backend() == "cpu" else "ragged_dot"

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# How the forward pass runs, not what the weights mean (moe_capacity_factor also decides which overflowing pairs are
# dropped): these may change when a run resumes.
FORWARD_PASS_FIELDS = ("remat", "attention_implementation", "attention_block_q", "attention_block_kv",
                       "expert_parallel", "expert_dispatch", "moe_capacity_factor", "grouped_matmul",
                       "scan_layers")
# Fields a run chooses for itself, never read from or compared with a checkpoint the model is loaded from: the
# forward pass, the dtypes, the initialization of fresh params, and LoRA adapters (trained on top of the weights).
RUN_CHOICE_FIELDS = FORWARD_PASS_FIELDS + ("dtype", "param_dtype", "init_std", "lora_rank", "lora_alpha",
                                           "lora_dropout", "lora_targets")

# Architecture fields that a run may change from the checkpoint it starts from (`init_from`): the positions the model
# is trained for and how RoPE stretches to them (a context-extension stage, DeepSeek-V3 §4.3). The weights do not
# depend on them, so the config's value, when it sets one, is used instead of the checkpoint's.
CONTEXT_EXTENSION_FIELDS = ("rope_scaling", "max_position_embeddings")


def architecture_fields() -> tuple[str, ...]:
    """The ModelConfig fields that say what the weights mean: every field but RUN_CHOICE_FIELDS."""
    return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in RUN_CHOICE_FIELDS)
