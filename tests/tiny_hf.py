"""Tiny Hugging Face checkpoints for tests, written the way a user's would be: transformers' `save_pretrained` (random
weights, float32 unless asked) and a `tokenizers` tokenizer with tokenizer_config.json.

    write_tokenizer(directory)           tokenizer.json + tokenizer_config.json (bos/eos/pad, a chat template)
    write_qwen3(directory)               a Qwen3 (GQA, qk-norm) causal LM, with the tokenizer
    write_deepseek_v3(directory)         a DeepSeek-V3 (MLA with q_lora_rank, 1 dense + 1 MoE layer of 4 routed
                                         experts top-2 and 1 shared), with the tokenizer

The tokenizer is character-level over ALPHABET (digits, + - = and space) plus the special tokens; its vocabulary
(SPECIALS + ALPHABET) fits the models' VOCAB rows.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

SPECIALS = ("<pad>", "<bos>", "<eos>", "<|user|>", "<|assistant|>")
ALPHABET = "0123456789+-= "
VOCAB = 32  # model rows; the tokenizer uses the first len(SPECIALS) + len(ALPHABET) = 19
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_tokenizer(directory: str | pathlib.Path, chat_template: str | None = CHAT_TEMPLATE) -> pathlib.Path:
    """A character-level `tokenizers` tokenizer (tokenizer.json) and its tokenizer_config.json (bos/eos/pad names and
    `chat_template` when given) in `directory` (created); returns the directory."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(SPECIALS + tuple(ALPHABET))}
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIALS))
    tokenizer.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
                              "eos_token": "<eos>", "pad_token": "<pad>", "model_max_length": 64}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def _save(config: Any, directory: str | pathlib.Path, seed: int, dtype: str, tokenizer: bool) -> pathlib.Path:
    import torch
    import transformers

    directory = pathlib.Path(directory)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype)).eval()
    model.save_pretrained(directory)
    if tokenizer:
        write_tokenizer(directory)
    return directory


def write_qwen3(directory: str | pathlib.Path, *, seed: int = 0, dtype: str = "float32", tokenizer: bool = True,
                **overrides: Any) -> pathlib.Path:
    """A tiny random Qwen3 (2 layers, d_model 32, 4 heads / 2 kv heads of 8, rope_theta 1e6) saved by
    `save_pretrained` in `dtype`, with the tokenizer files unless tokenizer=False; `overrides` go to Qwen3Config."""
    import transformers

    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  rope_parameters=dict(rope_type="default", rope_theta=1e6))
    return _save(transformers.Qwen3Config(**{**fields, **overrides}), directory, seed, dtype, tokenizer)


def write_deepseek_v3(directory: str | pathlib.Path, *, seed: int = 1, dtype: str = "float32", tokenizer: bool = True,
                      **overrides: Any) -> pathlib.Path:
    """A tiny random DeepSeek-V3 (MLA with q_lora_rank 16; layer 0 dense, layer 1 MoE: 4 routed experts top-2 in 2
    groups, 1 shared) saved by `save_pretrained` in `dtype` (transformers drops the MTP weights), with the tokenizer
    files unless tokenizer=False; `overrides` go to DeepseekV3Config. A larger initializer_range than the student's
    makes its next-token distributions peaked, so a student has something to learn."""
    import transformers

    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                  num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                  q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                  n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                  routed_scaling_factor=1.0, norm_topk_prob=True, max_position_embeddings=64, rms_norm_eps=1e-6,
                  num_nextn_predict_layers=0, initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    return _save(transformers.DeepseekV3Config(**{**fields, **overrides}), directory, seed, dtype, tokenizer)
