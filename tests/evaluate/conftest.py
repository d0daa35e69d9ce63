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
