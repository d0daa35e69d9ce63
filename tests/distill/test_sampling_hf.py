"""Greedy generation with the KV cache equals transformers' `generate` on random parity models loaded by load_hf."""

import contextlib

import jax
import numpy as np
import pytest
import torch
import transformers

import jaxopd
from jaxopd.distill.sampling import Sampler, left_pad

PROMPTS = [[1, 5, 6, 13, 7, 9], [1, 9], [1, 7, 15, 4]]
NEW = 8


def qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False))


def deepseek_v3():
    return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64, tie_word_embeddings=False))


@pytest.mark.parametrize("make", [qwen3, deepseek_v3], ids=["qwen3", "deepseek_v3"])
def test_greedy_matches_transformers_generate(make, tmp_path):
    torch.manual_seed(0)
    reference = make().eval()
    with torch.no_grad():  # sharpen the random head so greedy choices are not near-ties
        reference.lm_head.weight.mul_(4.0)
    reference.save_pretrained(tmp_path)
    expected = []
    for prompt in PROMPTS:
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    # transformers' DeepSeek-V3 config asks for an MTP module it never stores: load_hf says so and loads without it.
    expected_warning = (pytest.warns(UserWarning, match="no model.layers.2.* tensors are stored")
                        if make is deepseek_v3 else contextlib.nullcontext())
    with expected_warning:
        model, params = jaxopd.load_hf(tmp_path, dtype="float32")
    prompts, lengths = left_pad(PROMPTS, 6, 0)
    # No stop tokens: transformers generates exactly NEW tokens, so compare all of them.
    out = Sampler(model, 6, NEW, (), 0)(params, prompts, lengths, jax.random.key(0),
                                         greedy=True)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected))
