import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jaxopd.distill.teacher import save_model
from jaxopd.model import ModelConfig, Transformer
from jaxopd.training.config import base_config, model_config_dict, save_config

# The bundled sentencepiece tokenizer's vocabulary, a 256-position window.
FIELDS = dict(vocab_size=4096, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
              max_position_embeddings=256)
TRAINED_SEQ_LEN = 128
BUNDLED_CORPUS = pathlib.Path(__file__).resolve().parents[2] / "data" / "corpus" / "python_stdlib.jsonl.gz"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run workdir as the loop leaves it: config.json (data.tokenizer = the bundled tokenizer, seq_len 128) and
    checkpoints/ with a random tiny model. Returns (workdir, model, params)."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    model = Transformer(ModelConfig(**FIELDS))
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    config = base_config()
    config.model = model_config_dict(FIELDS)
    config.seq_len = TRAINED_SEQ_LEN
    save_config(config, workdir)
    save_model(workdir / "checkpoints", FIELDS, params)
    return workdir, model, params


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """A Hugging Face directory as save_pretrained leaves it (random tiny Llama, 128 positions) with its own
    byte-level BPE tokenizer.json (512 pieces, trained on a few corpus files) and tokenizer_config.json."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    import torch

    from jaxopd.data.tokenizer import read_training_texts

    directory = tmp_path_factory.mktemp("hf_checkpoint")
    texts = [text for _, text in zip(range(20), read_training_texts([str(BUNDLED_CORPUS)]))]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                      bos_token_id=0, eos_token_id=1)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory
