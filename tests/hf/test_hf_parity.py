"""load_hf / save_hf against transformers (PyTorch, float32): tiny random models of every supported architecture,
saved with save_pretrained, loaded by jaxopd, logits compared on real tokens of a padded batch longer than the
RoPE-scaling's original context; then written back by save_hf and loaded by transformers."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch_file

import jaxopd
from jaxopd.hf.safetensors_io import SafetensorsReader

# transformers' save_pretrained keeps num_nextn_predict_layers=1 but drops the MTP weights; test_mtp_* covers that.
pytestmark = pytest.mark.filterwarnings("ignore:config.json asks for 1 multi-token-prediction")

VOCAB, SEQ, ORIGINAL_CONTEXT = 96, 24, 16  # SEQ > ORIGINAL_CONTEXT exercises the RoPE extension
TOLERANCE = 1e-4
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=ORIGINAL_CONTEXT,
            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
MLA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=12,
           qk_nope_head_dim=8, first_k_dense_replace=1, max_position_embeddings=64, rms_norm_eps=1e-6)
GQA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)


def deepseek_v3(q_lora_rank):
    return transformers.DeepseekV3Config(
        **MLA, q_lora_rank=q_lora_rank, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, rope_parameters=dict(YARN))


def deepseek_v2_lite():
    return transformers.DeepseekV2Config(
        **MLA, q_lora_rank=None, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, n_group=1,
        topk_group=1, topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False,
        rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707))


def qwen3(tied):
    return transformers.Qwen3Config(**GQA, head_dim=12, tie_word_embeddings=tied,
                                    rope_parameters=dict(rope_type="default", rope_theta=1e6))


def qwen2():
    return transformers.Qwen2Config(**GQA, rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=2.0))


def llama3():
    return transformers.LlamaConfig(**GQA, rope_parameters=dict(
        rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=ORIGINAL_CONTEXT))


def randomized(config, seed=0):
    """A transformers model whose every weight (norm scales and the DeepSeek-V3 router bias too) is random, so no
    part of the network can hide behind a zero or one initialisation."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn_like(tensor) * 0.05)
            elif "norm" in name:
                tensor.copy_(1.0 + 0.1 * torch.randn_like(tensor))
            elif tensor.is_floating_point() and "inv_freq" not in name:
                tensor.copy_(torch.randn_like(tensor) * 0.1)
    return model


def padded_batch():
    """Two rows; the second ends in 7 padding tokens. Returns tokens, mask [2, SEQ] int64."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, VOCAB, (2, SEQ))
    mask = np.ones((2, SEQ), np.int64)
    mask[1, SEQ - 7:] = 0
    return tokens, mask


def hf_logits(model, tokens, mask):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits.numpy()


def jaxopd_logits(model, params, tokens, mask):
    positions = np.broadcast_to(np.arange(SEQ), tokens.shape)
    logits = model.apply({"params": params}, jnp.asarray(tokens, jnp.int32), segment_ids=jnp.asarray(mask, jnp.int32),
                         positions=jnp.asarray(positions, jnp.int32))
    return np.asarray(logits)


def max_error_on_real_tokens(ours, reference, mask):
    return float(np.abs(ours - reference)[mask.astype(bool)].max())


ARCHITECTURES = {
    "deepseek_v3": lambda: deepseek_v3(q_lora_rank=None),
    "deepseek_v3_q_lora": lambda: deepseek_v3(q_lora_rank=24),
    "deepseek_v2_lite": deepseek_v2_lite,
    "qwen3": lambda: qwen3(tied=False),
    "qwen3_tied": lambda: qwen3(tied=True),
    "qwen2": qwen2,
    "llama3": llama3,
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_logits_match_transformers_and_save_hf_round_trips(name, tmp_path):
    reference = randomized(ARCHITECTURES[name]())
    reference.save_pretrained(tmp_path / "hf")
    tokens, mask = padded_batch()
    expected = hf_logits(reference, tokens, mask)

    model, params = jaxopd.load_hf(tmp_path / "hf", dtype="float32")
    error = max_error_on_real_tokens(jaxopd_logits(model, params, tokens, mask), expected, mask)
    print(f"{name}: max |logit error| jaxopd vs transformers = {error:.2e}")
    assert error <= TOLERANCE

    jaxopd.save_hf(model, params, tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager",
                                                                 dtype=torch.float32).eval()
    assert type(reloaded) is type(reference)
    assert max_error_on_real_tokens(hf_logits(reloaded, tokens, mask), expected, mask) <= TOLERANCE


def test_sharded_checkpoints_load_and_save(tmp_path):
    reference = randomized(deepseek_v3(q_lora_rank=24), seed=3)
    reference.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    tokens, mask = padded_batch()
    expected = hf_logits(reference, tokens, mask)
    model, params = jaxopd.load_hf(tmp_path / "hf", dtype="float32")
    assert max_error_on_real_tokens(jaxopd_logits(model, params, tokens, mask), expected, mask) <= TOLERANCE

    jaxopd.save_hf(model, params, tmp_path / "ours", max_shard_size=40_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager",
                                                                 dtype=torch.float32).eval()
    assert max_error_on_real_tokens(hf_logits(reloaded, tokens, mask), expected, mask) <= TOLERANCE


def _single_file(path):
    return load_file(path / "model.safetensors")


def test_fp8_checkpoint_matches_transformers_on_dequantized_weights(tmp_path):
    """Every 2-D projection of a DeepSeek-V3 checkpoint is stored as float8_e4m3fn with 128x128 block scales (the
    real format); loading it must equal transformers running on the float64-dequantized weights."""
    reference = randomized(deepseek_v3(q_lora_rank=24), seed=5)
    reference.save_pretrained(tmp_path / "hf")
    tensors = _single_file(tmp_path / "hf")
    quantized = {}
    for name, weight in tensors.items():
        if weight.ndim == 2 and "proj" in name:  # DeepSeek quantizes the linear projections, not gate/embed/head
            scale_inv = np.abs(weight).max() / 448.0  # one (partial) 128x128 block at these sizes
            fp8 = torch.from_numpy(weight / scale_inv).to(torch.float8_e4m3fn)
            tensors[name] = (fp8.to(torch.float64).numpy() * scale_inv).astype(np.float32)
            quantized[name] = fp8
            quantized[name + "_scale_inv"] = torch.tensor([[scale_inv]], dtype=torch.float32)
        else:
            quantized[name] = torch.from_numpy(weight)
    assert sum(name.endswith("_scale_inv") for name in quantized) > 20
    (tmp_path / "hf" / "model.safetensors").unlink()
    save_torch_file(quantized, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))

    # transformers reads the float64-dequantized weights from a plain float32 copy of the checkpoint.
    randomized(deepseek_v3(q_lora_rank=24)).save_pretrained(tmp_path / "dequantized")
    save_file(tensors, tmp_path / "dequantized" / "model.safetensors", metadata={"format": "pt"})
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dequantized", attn_implementation="eager",
                                                                  dtype=torch.float32).eval()
    tokens, mask = padded_batch()
    model, params = jaxopd.load_hf(tmp_path / "hf", dtype="float32")
    error = max_error_on_real_tokens(jaxopd_logits(model, params, tokens, mask), hf_logits(reference, tokens, mask), mask)
    assert error <= TOLERANCE


def _with_mtp_layer(path, num_layers):
    """Append a DeepSeek-V3 MTP module as layer `num_layers`, the way deepseek-ai checkpoints store it: a full
    decoder layer (random copies of layer num_layers - 1's shapes) plus enorm, hnorm, eh_proj and shared_head."""
    tensors = _single_file(path)
    rng = np.random.default_rng(7)
    last, mtp = f"model.layers.{num_layers - 1}.", f"model.layers.{num_layers}."
    hidden = tensors["model.norm.weight"].shape[0]
    for name, tensor in list(tensors.items()):
        if name.startswith(last):
            tensors[mtp + name[len(last):]] = rng.normal(0, 0.1, tensor.shape).astype(np.float32)
    tensors[mtp + "enorm.weight"] = rng.normal(1, 0.1, hidden).astype(np.float32)
    tensors[mtp + "hnorm.weight"] = rng.normal(1, 0.1, hidden).astype(np.float32)
    tensors[mtp + "eh_proj.weight"] = rng.normal(0, 0.1, (hidden, 2 * hidden)).astype(np.float32)
    tensors[mtp + "shared_head.norm.weight"] = rng.normal(1, 0.1, hidden).astype(np.float32)
    tensors[mtp + "shared_head.head.weight"] = tensors["lm_head.weight"]
    tensors[mtp + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return tensors


def _transformers_mtp_hidden(reference, tensors, tokens):
    """Depth-1 MTP output by transformers' own `MtpLayer` (DeepSeek-V3's decoder layer and RMSNorm; embedding half
    first), fed the main model's final-norm hidden states and the next token's embedding; `[b, t - 1, d]`."""
    from transformers.modeling_layers import MtpLayer
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    config, layer = reference.config, reference.config.num_hidden_layers
    mtp = MtpLayer(config, DeepseekV3DecoderLayer, DeepseekV3RMSNorm, layer).float().eval()
    prefix, experts = f"model.layers.{layer}.", range(config.n_routed_experts)
    stacked = {
        "mtp_block.mlp.experts.gate_up_proj": np.stack([np.concatenate(
            [tensors[f"{prefix}mlp.experts.{e}.gate_proj.weight"], tensors[f"{prefix}mlp.experts.{e}.up_proj.weight"]])
            for e in experts]),
        "mtp_block.mlp.experts.down_proj": np.stack([tensors[f"{prefix}mlp.experts.{e}.down_proj.weight"] for e in experts]),
    }
    state = {"post_norm.weight": tensors[prefix + "shared_head.norm.weight"], **stacked}
    for name, tensor in tensors.items():
        short = name[len(prefix):]
        if name.startswith(prefix) and ".experts." not in name and not short.startswith(("shared_head", "embed_tokens")):
            state[short if short.split(".")[0] in ("enorm", "hnorm", "eh_proj") else "mtp_block." + short] = tensor
    mtp.load_state_dict({name: torch.from_numpy(np.asarray(t)) for name, t in state.items()}, strict=True)
    input_ids = torch.from_numpy(tokens)
    length = tokens.shape[1] - 1
    with torch.no_grad():
        hidden = reference.model(input_ids=input_ids).last_hidden_state[:, :length]
        next_embeddings = reference.model.embed_tokens(input_ids[:, 1:])
        positions = torch.arange(length)[None].expand(tokens.shape[0], -1)
        causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
        return mtp(next_embeddings, hidden, reference.model.rotary_emb(hidden, positions), causal, positions, None).numpy()


def test_mtp_module_matches_transformers_mtp_layer_and_saves_unchanged(tmp_path):
    config = deepseek_v3(q_lora_rank=24)
    reference = randomized(config)
    reference.save_pretrained(tmp_path / "hf")
    written = _with_mtp_layer(tmp_path / "hf", config.num_hidden_layers)
    model, params = jaxopd.load_hf(tmp_path / "hf", dtype="float32")
    assert model.config.mtp_depth == 1
    tokens = np.random.default_rng(2).integers(0, VOCAB, (2, SEQ))
    features = model.apply({"params": params}, jnp.asarray(tokens, jnp.int32), method="features")
    expected = _transformers_mtp_hidden(reference, written, tokens)
    error = float(np.abs(np.asarray(features.mtp_hidden[0])[:, : SEQ - 1] - expected).max())
    print(f"deepseek_v3 MTP: max |hidden error| jaxopd vs transformers MtpLayer = {error:.2e}")
    assert error <= TOLERANCE

    jaxopd.save_hf(model, params, tmp_path / "ours")
    saved = _single_file(tmp_path / "ours")
    assert sorted(saved) == sorted(written)
    for name, tensor in written.items():
        np.testing.assert_array_equal(saved[name], tensor, err_msg=name)


def test_mtp_config_without_stored_module_loads_without_it(tmp_path):
    randomized(deepseek_v3(q_lora_rank=None)).save_pretrained(tmp_path / "hf")  # num_nextn_predict_layers=1
    with pytest.warns(UserWarning, match="multi-token-prediction"):
        model, _ = jaxopd.load_hf(tmp_path / "hf", dtype="float32")
    assert model.config.mtp_depth == 0


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    randomized(qwen3(tied=False)).save_pretrained(tmp_path / "hf")
    tensors = _single_file(tmp_path / "hf")
    missing = tensors.pop("model.layers.1.self_attn.k_norm.weight")
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.k_norm.weight' is missing from .*model.safetensors"):
        jaxopd.load_hf(tmp_path / "hf", dtype="float32")

    tensors["model.layers.1.self_attn.k_norm.weight"] = missing
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(6, np.float32)  # known-ignorable
    tensors["model.layers.0.mlp.extra.weight"] = np.ones(3, np.float32)
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(ValueError, match=r"1 tensors .* no place .*'model.layers.0.mlp.extra.weight'"):
        jaxopd.load_hf(tmp_path / "hf", dtype="float32")


def test_wrong_shape_names_the_tensor(tmp_path):
    randomized(llama3()).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["intermediate_size"] = 40
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.layers.0.mlp.gate_proj.weight"):
        jaxopd.load_hf(tmp_path / "hf", dtype="float32")


def test_mesh_placement_uses_logical_axes(tmp_path):
    import jax
    from jax.sharding import Mesh, NamedSharding

    randomized(deepseek_v3(q_lora_rank=24)).save_pretrained(tmp_path / "hf")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "expert"))
    rules = (("experts", "expert"), ("embed", "fsdp"), ("vocab", None), ("mlp", None), ("expert_mlp", None),
             ("q_heads", None), ("kv_heads", None), ("head_dim", None), ("q_lora", None), ("kv_lora", None),
             ("norm", None))
    _, params = jaxopd.load_hf(tmp_path / "hf", dtype="float32", mesh=mesh, rules=rules)
    _, host = jaxopd.load_hf(tmp_path / "hf", dtype="float32")
    leaves, host_leaves = jax.tree.leaves(params), jax.tree.leaves(host)
    assert all(isinstance(leaf.sharding, NamedSharding) for leaf in leaves)
    # The experts axis: first of a layer's [E, in, out], second of a scanned stack's [layers, E, in, out].
    expert_params = [leaf for leaf in leaves if leaf.ndim in (3, 4) and leaf.shape[leaf.ndim - 3] == 8]
    assert any(leaf.ndim == 4 for leaf in expert_params)  # the default: scanned
    assert all(leaf.sharding.spec[leaf.ndim - 3] == "expert" for leaf in expert_params)
    for leaf, host_leaf in zip(leaves, host_leaves):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(host_leaf))


def test_checkpoint_reader_sees_every_shard(tmp_path):
    randomized(qwen2()).save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    checkpoint = SafetensorsReader(tmp_path / "hf")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(checkpoint.file_of) == set(index["weight_map"])


def test_bfloat16_load_and_save(tmp_path):
    """bfloat16 loading rounds each float32 weight once (router and expert bias stay float32); save_hf in bfloat16
    writes exactly those values, which transformers and load_hf read back."""
    import jax

    randomized(deepseek_v3(q_lora_rank=24), seed=9).save_pretrained(tmp_path / "hf")
    _, exact = jaxopd.load_hf(tmp_path / "hf", dtype="float32")
    model, params = jaxopd.load_hf(tmp_path / "hf", dtype=jnp.bfloat16)
    for (path, leaf), exact_leaf in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(exact)):
        keep_float32 = path[-1].key in ("router", "expert_bias")
        assert leaf.dtype == (jnp.float32 if keep_float32 else jnp.bfloat16), jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(exact_leaf).astype(leaf.dtype))

    jaxopd.save_hf(model, params, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "bfloat16"
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.bfloat16)
    _, reloaded = jaxopd.load_hf(tmp_path / "ours", dtype="bfloat16")
    for leaf, reloaded_leaf in zip(jax.tree.leaves(params), jax.tree.leaves(reloaded)):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(reloaded_leaf))


@pytest.mark.parametrize("name", [pytest.param("deepseek_v3_mtp", marks=pytest.mark.slow), "qwen3"])
def test_scanned_model_matches_transformers_and_saves_the_same_tensors(name, tmp_path):
    """scan_layers: the stacked params (DeepSeek: a dense stack of 1 and an MoE stack of 2, the MTP module apart)
    are filled from and written back to the per-layer tensors, and compute what transformers does."""
    if name == "qwen3":
        config = qwen3(tied=False)
    else:
        config = deepseek_v3(q_lora_rank=24)
        config.num_hidden_layers = 3
    reference = randomized(config)
    reference.save_pretrained(tmp_path / "hf")
    written = (_with_mtp_layer(tmp_path / "hf", config.num_hidden_layers) if name == "deepseek_v3_mtp"
               else _single_file(tmp_path / "hf"))
    model, params = jaxopd.load_hf(tmp_path / "hf", dtype="float32", scan_layers=True)
    stacks = {"deepseek_v3_mtp": {"dense_layers": 1, "moe_layers": 2}, "qwen3": {"layers": 2}}[name]
    assert {key: params[key]["mlp_norm"]["scale"].shape[0] for key in stacks} == stacks
    assert not any(key.startswith("layers_") for key in params)
    tokens, mask = padded_batch()
    error = max_error_on_real_tokens(jaxopd_logits(model, params, tokens, mask), hf_logits(reference, tokens, mask),
                                     mask)
    print(f"{name} scanned: max |logit error| jaxopd vs transformers = {error:.2e}")
    assert error <= TOLERANCE
    if name == "deepseek_v3_mtp":
        assert model.config.mtp_depth == 1
        mtp_tokens = np.random.default_rng(2).integers(0, VOCAB, (2, SEQ))
        features = model.apply({"params": params}, jnp.asarray(mtp_tokens, jnp.int32), method="features")
        expected = _transformers_mtp_hidden(reference, written, mtp_tokens)
        assert float(np.abs(np.asarray(features.mtp_hidden[0])[:, : SEQ - 1] - expected).max()) <= TOLERANCE
    jaxopd.save_hf(model, params, tmp_path / "ours")
    saved = _single_file(tmp_path / "ours")
    assert sorted(saved) == sorted(written)
    for tensor_name, tensor in written.items():
        np.testing.assert_array_equal(saved[tensor_name], tensor, err_msg=tensor_name)
