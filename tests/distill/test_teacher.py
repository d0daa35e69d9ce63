"""Loading teachers: saved by jaxopd (the bundled checkpoint, model sections an older jaxopd wrote), and Hugging Face
directories onto a multi-device mesh."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxopd.bundled import resolve_path
from jaxopd.distill.teacher import load_model, read_model_fields, save_model, score_texts
from jaxopd.model import ModelConfig, Transformer
from jaxopd.training import sharding
from jaxopd.training.config import MeshConfig
from tests import tiny_hf

FIELDS = dict(vocab_size=17, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)


def test_bundled_teacher_saved_with_remat_false_loads_without_remat():
    path = resolve_path("data/tasks/arithmetic/teacher")
    assert read_model_fields(path)[1]["remat"] is False  # its config was written before remat policies had names
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


@pytest.mark.parametrize("mesh_config", [MeshConfig(data=1, fsdp=-1), MeshConfig(data=2, fsdp=2, tensor=2)],
                         ids=["fsdp8", "data2-fsdp2-tensor2"])
def test_hf_teachers_load_onto_any_mesh_and_score_as_transformers(tmp_path, mesh_config):
    """An MLA + MoE DeepSeek-V3 and a Qwen3 written by save_pretrained, read into shards of an 8-device mesh: the
    log-probs of a completion equal transformers' float32 log-softmax."""
    prompt, completion = [1, 6, 7, 15], [8, 17, 9, 2]
    tokens = torch.tensor([prompt + completion])
    mesh = sharding.make_mesh(mesh_config)
    for write in (tiny_hf.write_deepseek_v3, tiny_hf.write_qwen3):
        directory = write(tmp_path / write.__name__, tokenizer=False)
        model, params = load_model(directory, mesh)
        assert {leaf.sharding.mesh.shape_tuple for leaf in jax.tree.leaves(params)} == {mesh.shape_tuple}
        reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        log_probs = torch.log_softmax(reference(tokens).logits[0].double(), -1).detach().numpy()
        expected = [log_probs[len(prompt) - 1 + i, token] for i, token in enumerate(completion)]
        np.testing.assert_allclose(score_texts(model, params, prompt, completion), expected, atol=1e-5, rtol=0)
