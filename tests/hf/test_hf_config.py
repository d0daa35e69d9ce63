"""jaxopd.hf pieces that need no model: config translation, fp8 dequantization, reading
sharded checkpoints, and the errors users see."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch_file

from jaxopd.hf.checkpoint import _Checkpoint, _ShardWriter, dequantize_fp8_blockwise
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


def _quantize_blockwise_float64(weight, block=128):
    """Reference fp8 quantization: per 128x128 tile scale = max|w| / 448 (e4m3 max), stored as scale_inv."""
    rows, cols = weight.shape
    scale_inv = np.zeros((-(-rows // block), -(-cols // block)))
    quantized = np.zeros_like(weight)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            tile = weight[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale_inv[i, j] = np.abs(tile).max() / 448.0
            quantized[i * block:(i + 1) * block, j * block:(j + 1) * block] = tile / scale_inv[i, j]
    fp8 = torch.from_numpy(quantized).to(torch.float8_e4m3fn)
    expected = np.zeros_like(weight)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rows_, cols_ = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            expected[rows_, cols_] = fp8[rows_, cols_].to(torch.float64).numpy() * scale_inv[i, j]
    return fp8, torch.from_numpy(scale_inv.astype(np.float32)), expected


def test_fp8_blockwise_dequantization_with_partial_edge_blocks(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.05, (300, 200)) * rng.uniform(0.1, 10, (300, 1))  # tiles with very different ranges
    fp8, scale_inv, expected = _quantize_blockwise_float64(weight)
    save_torch_file({"w.weight": fp8, "w.weight_scale_inv": scale_inv, "b": torch.ones(3)},
                    tmp_path / "model.safetensors")
    checkpoint = _Checkpoint(tmp_path)
    loaded = checkpoint.read("w.weight", (128, 128))
    assert loaded.dtype == np.float32 and loaded.shape == (300, 200)
    np.testing.assert_allclose(loaded, expected, rtol=1e-6, atol=0)
    # e4m3 keeps 3 mantissa bits; its smallest step (subnormals) is 2^-9 of the tile's scale.
    step = np.kron(scale_inv.numpy().astype(np.float64), np.ones((128, 128)))[:300, :200] * 2.0**-9
    assert np.all(np.abs(loaded - weight) <= 2.0**-4 * np.abs(weight) + step)
    np.testing.assert_array_equal(checkpoint.read("b", (128, 128)), np.ones(3, np.float32))


def test_dequantize_rejects_scales_that_do_not_tile():
    with pytest.raises(ValueError, match="does not tile"):
        dequantize_fp8_blockwise(np.zeros((300, 200), ml_dtypes.float8_e4m3fn), np.ones((2, 2), np.float32))


def test_shard_writer_splits_and_indexes(tmp_path):
    tensors = {f"t{i}": np.full((10, 10), i, np.float32) for i in range(5)}  # 400 bytes each
    writer = _ShardWriter(tmp_path, max_shard_bytes=900)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == 2000
    checkpoint = _Checkpoint(tmp_path)
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(checkpoint.read(name, (128, 128)), tensor)


def test_index_naming_a_tensor_its_shard_lacks_is_reported(tmp_path):
    save_file({"a": np.zeros(2, np.float32)}, tmp_path / "model-00001-of-00001.safetensors")
    weight_map = {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="tensor 'b' is listed in .* but missing from .*model-00001-of-00001"):
        _Checkpoint(tmp_path).read("b", (128, 128))



def test_dynamic_rope_loads_as_static_ntk_with_a_warning():
    hf = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 128, "rope_theta": 10000.0,
          "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    with pytest.warns(UserWarning, match="static NTK"):
        config = config_from_hf(hf)
    assert (config.rope_scaling.kind, config.rope_scaling.factor) == ("ntk", 2.0)
