"""Loading teachers saved by jaxopd: the bundled checkpoint, and model sections an older jaxopd wrote."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxopd.bundled import resolve_path
from jaxopd.distill.teacher import load_model, read_model_fields, save_model
from jaxopd.model import ModelConfig, Transformer

FIELDS = dict(vocab_size=17, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)


def test_bundled_teacher_saved_with_remat_false_loads_without_remat():
    path = resolve_path("data/tasks/arithmetic/teacher")
    assert read_model_fields(path)[1]["remat"] is False  # written before remat policies had names
    model, params = load_model(path)
    assert model.config.remat == "none"
    logits = model.apply({"params": params}, jnp.array([[1, 5, 6, 7]]))
    assert logits.shape == (1, 4, 17) and np.isfinite(np.asarray(logits)).all()


def test_checkpoint_saved_with_remat_true_loads_with_full_remat(tmp_path: pathlib.Path):
    model = Transformer(ModelConfig(**FIELDS))
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    loaded, loaded_params = load_model(save_model(tmp_path / "old", {**FIELDS, "remat": True}, params))
    assert loaded.config == model.config.replace(remat="full")
    tokens = jnp.array([[3, 1, 4, 1]])
    np.testing.assert_allclose(loaded.apply({"params": loaded_params}, tokens), model.apply({"params": params}, tokens),
                               rtol=1e-6, atol=1e-6)
