"""jaxopd.hf.config: Hugging Face config.json <-> ModelConfig, and the errors users see for what is not supported."""

import pytest
import transformers

from jaxopd.hf.config import config_from_hf, config_to_hf
from jaxopd.model.config import RopeScaling

DEEPSEEK_V3 = {
    "model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
    "moe_intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
    "n_shared_experts": 1, "n_routed_experts": 8, "routed_scaling_factor": 2.5, "kv_lora_rank": 16,
    "q_lora_rank": None, "qk_rope_head_dim": 8, "v_head_dim": 8, "qk_nope_head_dim": 8, "n_group": 4,
    "topk_group": 2, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "norm_topk_prob": True,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "num_nextn_predict_layers": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1,
}


def test_deepseek_v3_config_maps_every_field():
    config = config_from_hf(DEEPSEEK_V3)
    assert (config.attention, config.q_lora_rank, config.kv_lora_rank) == ("mla", None, 16)
    assert (config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim) == (8, 8, 8)
    assert (config.num_experts, config.num_experts_per_token, config.num_shared_experts, config.moe_mlp_dim) == (8, 2, 1, 16)
    assert (config.num_expert_groups, config.topk_groups, config.first_k_dense) == (4, 2, 1)
    assert (config.router_score, config.norm_topk_prob, config.routed_scaling_factor) == ("sigmoid", True, 2.5)
    assert config.rope_layout == "interleaved" and config.mtp_depth == 1
    assert config.rope_scaling == RopeScaling(kind="yarn", factor=4.0, original_max_position_embeddings=64,
                                              beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)


def test_rope_parameters_and_legacy_rope_scaling_agree():
    new_style = {k: v for k, v in DEEPSEEK_V3.items() if k not in ("rope_theta", "rope_scaling")}
    new_style["rope_parameters"] = {**DEEPSEEK_V3["rope_scaling"], "rope_type": "yarn", "rope_theta": 10000.0}
    del new_style["rope_parameters"]["type"]
    assert config_from_hf(new_style) == config_from_hf(DEEPSEEK_V3)


def test_deepseek_v2_lite_config_is_softmax_greedy():
    hf = {**DEEPSEEK_V3, "model_type": "deepseek_v2", "scoring_func": "softmax", "topk_method": "greedy",
          "n_group": 1, "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0}
    config = config_from_hf(hf)
    assert (config.router_score, config.num_expert_groups, config.norm_topk_prob) == ("softmax", 1, False)
    assert config.rope_layout == "interleaved" and config.mtp_depth == 0


@pytest.mark.parametrize("model_type,qk_norm,bias", [("qwen3", True, False), ("qwen2", False, True), ("llama", False, False)])
def test_gqa_configs(model_type, qk_norm, bias):
    hf = {"model_type": model_type, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
          "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}
    config = config_from_hf(hf)
    assert (config.attention, config.num_kv_heads, config.head_dim) == ("gqa", 2, 8)
    assert (config.qk_norm, config.attention_bias, config.tie_embeddings) == (qk_norm, bias, True)
    assert config.rope_theta == 500000.0 and config.rope_scaling.kind == "llama3"
    assert config.rope_scaling.original_max_position_embeddings == 32 and config.rope_scaling.factor == 8.0


@pytest.mark.parametrize("hf", [DEEPSEEK_V3, {**DEEPSEEK_V3, "q_lora_rank": 24, "rope_interleave": False},
                                {**DEEPSEEK_V3, "first_k_dense_replace": 3}])
def test_config_round_trips_through_hf(hf):
    config = config_from_hf(hf)
    written = config_to_hf(config, "float32")
    assert config_from_hf(written) == config
    transformers_config = transformers.AutoConfig.for_model(**written)  # transformers accepts what we write
    assert transformers_config.num_hidden_layers == config.num_layers


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mixtral"}, "model_type='mixtral'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"moe_layer_freq": 2}, "moe_layer_freq=2"),
    ({"scoring_func": "sqrtsoftplus"}, "scoring_func='sqrtsoftplus'"),
    ({"topk_method": "group_limited_greedy"}, "topk_method/scoring_func"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_type='longrope'"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0, "attention_factor": 0.5}}, "attention_factor"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"num_key_value_heads": 2}, "num_key_value_heads=2"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
])
def test_unsupported_config_values_name_the_field(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config_from_hf({**DEEPSEEK_V3, **change})


def test_sliding_window_qwen_is_refused():
    hf = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "use_sliding_window": True}
    with pytest.raises(ValueError, match="use_sliding_window"):
        config_from_hf(hf)


def test_dynamic_rope_loads_as_static_ntk_with_a_warning():
    hf = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 128, "rope_theta": 10000.0,
          "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    with pytest.warns(UserWarning, match="static NTK"):
        config = config_from_hf(hf)
    assert (config.rope_scaling.kind, config.rope_scaling.factor) == ("ntk", 2.0)
