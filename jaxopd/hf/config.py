"""Translate Hugging Face `config.json` dicts to `ModelConfig` and back.

Supported `model_type`s: deepseek_v3, deepseek_v2 (MLA + DeepSeekMoE), qwen3, qwen2, llama (GQA). Anything this
package cannot compute exactly is refused with a ValueError that names the field, never silently approximated —
except `rope_type="dynamic"`, which is mapped to the static NTK-aware base change with a warning (see below).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

from jaxopd.model.config import ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "qwen3", "qwen2", "llama")


def _fail(model_type: str, field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{model_type} config: {field}={value!r} is not supported: {why}")


def _rope_from_hf(hf: dict, model_type: str) -> tuple[float, Optional[RopeScaling]]:
    """(rope_theta, RopeScaling | None) from either the transformers-5 `rope_parameters` dict or the legacy
    top-level `rope_theta` + `rope_scaling` fields that original checkpoints (e.g. deepseek-ai/DeepSeek-V3) carry."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    if params and any(isinstance(v, dict) for v in params.values()):
        raise _fail(model_type, "rope_parameters", params, "per-layer-type RoPE parameters are not modelled")
    merged = {**legacy, **params}
    theta = float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type", merged.get("type", "default"))
    partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise _fail(model_type, "partial_rotary_factor", partial, "RoPE must cover the whole rotary head dim")
    if kind in (None, "default"):
        return theta, None
    max_positions = hf.get("max_position_embeddings", 4096)
    factor = merged.get("factor")
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(factor))
    if kind == "dynamic":
        # transformers recomputes the NTK base from the running sequence length; our tables are static, so we use
        # the NTK-aware base for the full scaled context. Short sequences then see slightly different frequencies.
        warnings.warn(
            f"{model_type}: rope_type='dynamic' is loaded as static NTK-aware scaling (factor={factor}); logits differ"
            " from transformers' dynamic scaling, most on sequences shorter than max_position_embeddings",
            stacklevel=3,
        )
        return theta, RopeScaling(kind="ntk", factor=float(factor), original_max_position_embeddings=max_positions)
    if kind == "yarn":
        original = merged.get("original_max_position_embeddings", max_positions)
        if factor is None:  # DeepSeek-style: the factor is implied by the context extension (as transformers does)
            factor = max_positions / original
        if merged.get("attention_factor") is not None:
            raise _fail(model_type, "rope_parameters.attention_factor", merged["attention_factor"],
                        "YaRN's attention factor is derived from factor/mscale/mscale_all_dim; remove the override")
        if merged.get("truncate", True) is not True:
            raise _fail(model_type, "rope_parameters.truncate", merged["truncate"],
                        "only the truncated (integer) YaRN correction range is implemented")
        return theta, RopeScaling(
            kind="yarn",
            factor=float(factor),
            original_max_position_embeddings=int(original),
            beta_fast=float(merged.get("beta_fast") or 32.0),
            beta_slow=float(merged.get("beta_slow") or 1.0),
            mscale=float(merged.get("mscale") or 1.0),
            mscale_all_dim=float(merged.get("mscale_all_dim") or 0.0),
        )
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3",
            factor=float(factor),
            original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        )
    raise _fail(model_type, "rope_type", kind, "supported: default, linear, dynamic, yarn, llama3")


def _moe_from_hf(hf: dict, model_type: str) -> dict:
    num_experts = hf.get("n_routed_experts") or 0
    if not num_experts or hf.get("first_k_dense_replace", 0) >= hf["num_hidden_layers"]:
        return dict(first_k_dense=hf["num_hidden_layers"])
    if hf.get("moe_layer_freq", 1) != 1:
        raise _fail(model_type, "moe_layer_freq", hf["moe_layer_freq"],
                    "every layer from first_k_dense_replace on must be MoE")
    default_score = "sigmoid" if model_type == "deepseek_v3" else "softmax"
    score = hf.get("scoring_func", default_score)
    if score not in ("sigmoid", "softmax"):
        raise _fail(model_type, "scoring_func", score, "supported: sigmoid, softmax")
    default_method = "noaux_tc" if model_type == "deepseek_v3" else "greedy"
    method = hf.get("topk_method", default_method)
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise _fail(model_type, "topk_method", method, "supported: greedy, group_limited_greedy, noaux_tc")
    if model_type == "deepseek_v3" and (method != "noaux_tc" or score != "sigmoid"):
        raise _fail(model_type, "topk_method/scoring_func", (method, score),
                    "DeepSeek-V3 routing is sigmoid scores + bias with group-limited top-k ('noaux_tc')")
    grouped = method != "greedy"
    return dict(
        num_experts=num_experts,
        num_experts_per_token=hf["num_experts_per_tok"],
        num_shared_experts=hf.get("n_shared_experts") or 0,
        moe_mlp_dim=hf["moe_intermediate_size"],
        first_k_dense=hf.get("first_k_dense_replace", 0),
        router_score=score,
        num_expert_groups=(hf.get("n_group") or 1) if grouped else 1,
        topk_groups=(hf.get("topk_group") or 1) if grouped else 1,
        norm_topk_prob=bool(hf.get("norm_topk_prob", model_type == "deepseek_v3")),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
    )


def config_from_hf(hf: dict) -> ModelConfig:
    """`ModelConfig` for a Hugging Face config dict; ValueError naming the field for anything unsupported."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported by jaxopd.load_hf; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise _fail(model_type, "hidden_act", hf["hidden_act"], "the MLP is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        raise _fail(model_type, "mlp_bias", True, "MLP projections have no bias")
    quant = hf.get("quantization_config")
    if quant and (quant.get("quant_method") != "fp8" or list(quant.get("weight_block_size") or []) != [128, 128]):
        raise _fail(model_type, "quantization_config", quant,
                    "only DeepSeek's block-wise fp8 (weight_block_size [128, 128]) is dequantized on load")
    theta, scaling = _rope_from_hf(hf, model_type)
    common = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"],
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if model_type.startswith("deepseek"):
        if hf.get("attention_bias"):
            raise _fail(model_type, "attention_bias", True, "MLA projections have no bias")
        heads, kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
        if kv_heads != heads:
            raise _fail(model_type, "num_key_value_heads", kv_heads, f"MLA needs one kv head per query head ({heads})")
        # DeepSeek's reference code rotates interleaved pairs; transformers' V2 always does, V3 unless told not to.
        interleaved = model_type == "deepseek_v2" or hf.get("rope_interleave", True)
        return ModelConfig(
            **common,
            **_moe_from_hf(hf, model_type),
            attention="mla",
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            rope_layout="interleaved" if interleaved else "rotate_half",
            mtp_depth=hf.get("num_nextn_predict_layers", 0) if model_type == "deepseek_v3" else 0,
        )
    if hf.get("use_sliding_window"):
        raise _fail(model_type, "use_sliding_window", True, "per-layer sliding windows (max_window_layers) are not "
                    "modelled; set use_sliding_window=false for full attention")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise _fail(model_type, "layer_types", sorted(set(layer_types)), "only full_attention layers are modelled")
    if model_type == "llama" and hf.get("attention_bias"):
        raise _fail(model_type, "attention_bias", True, "Llama's bias on o_proj is not modelled (only q/k/v bias)")
    if model_type == "qwen3" and hf.get("attention_bias"):
        raise _fail(model_type, "attention_bias", True, "Qwen3's bias on o_proj is not modelled (only q/k/v bias)")
    return ModelConfig(
        **common,
        attention="gqa",
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        qk_norm=model_type == "qwen3",
        attention_bias=model_type == "qwen2",
    )


def _rope_to_hf(config: ModelConfig) -> dict:
    scaling = config.rope_scaling
    if scaling is None:
        return {"rope_type": "default", "rope_theta": config.rope_theta}
    common = {"rope_theta": config.rope_theta, "factor": scaling.factor}
    if scaling.kind == "linear":
        return {"rope_type": "linear", **common}
    if scaling.kind == "yarn":
        return {"rope_type": "yarn", **common, "original_max_position_embeddings": scaling.original_max_position_embeddings,
                "beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow, "mscale": scaling.mscale,
                "mscale_all_dim": scaling.mscale_all_dim}
    if scaling.kind == "llama3":
        return {"rope_type": "llama3", **common, "original_max_position_embeddings": scaling.original_max_position_embeddings,
                "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor}
    raise ValueError(f"rope_scaling.kind={scaling.kind!r} has no exact transformers equivalent; save_hf supports "
                     "linear, yarn and llama3")


def hf_model_type(config: ModelConfig) -> str:
    """The transformers architecture that computes exactly what `config` describes."""
    if config.attention == "mla":
        if config.num_experts and config.router_score == "softmax":
            return "deepseek_v2"
        return "deepseek_v3"
    if config.num_experts:
        raise ValueError("save_hf: GQA attention with MoE has no supported transformers architecture here")
    if config.qk_norm:
        if config.attention_bias:
            raise ValueError("save_hf: qk_norm together with attention_bias matches no supported architecture")
        return "qwen3"
    if config.attention_bias:
        if config.gqa_head_dim != config.d_model // config.num_heads:
            raise ValueError(f"save_hf: Qwen2 needs head_dim == d_model // num_heads, got head_dim={config.head_dim}")
        return "qwen2"
    return "llama"


def config_to_hf(config: ModelConfig, dtype: str) -> dict:
    """config.json contents for `config` (transformers-5 field names), `dtype` being the stored tensor dtype."""
    model_type = hf_model_type(config)
    architecture = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[model_type]
    hf: dict[str, Any] = dict(
        architectures=[architecture],
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.mlp_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters=_rope_to_hf(config),
        dtype=dtype,
    )
    if config.attention == "gqa":
        hf.update(num_key_value_heads=config.kv_heads, head_dim=config.gqa_head_dim, attention_bias=False)
        if model_type == "qwen2":
            del hf["head_dim"], hf["attention_bias"]
        return hf
    hf.update(
        num_key_value_heads=config.num_heads,
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        attention_bias=False,
        first_k_dense_replace=config.first_k_dense if config.num_experts else config.num_layers,
        # A dense MLA model is a DeepSeek config whose dense prefix covers every layer (transformers wants ints).
        n_routed_experts=config.num_experts or 1,
        num_experts_per_tok=config.num_experts_per_token or 1,
        n_shared_experts=config.num_shared_experts,
        moe_intermediate_size=config.moe_mlp_dim or config.mlp_dim,
        routed_scaling_factor=config.routed_scaling_factor,
        norm_topk_prob=config.norm_topk_prob,
        n_group=config.num_expert_groups,
        topk_group=config.topk_groups,
        scoring_func=config.router_score,
    )
    if model_type == "deepseek_v3":
        hf.update(rope_interleave=config.rope_layout == "interleaved", topk_method="noaux_tc",
                  num_nextn_predict_layers=config.mtp_depth)
    else:
        if config.rope_layout != "interleaved":
            raise ValueError("save_hf: DeepSeek-V2 always rotates interleaved pairs; rope_layout must be 'interleaved'")
        hf["topk_method"] = "group_limited_greedy" if config.num_expert_groups > 1 else "greedy"
    return hf

