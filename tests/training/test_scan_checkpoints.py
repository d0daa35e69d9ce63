"""Checkpoints across layer layouts (`model.scan_layers`): the bundled checkpoints (saved scanned, their configs
from before scan_layers existed) load into unrolled models too, and a run resumes, params and optimizer moments, in
the other layout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopd.bundled import resolve_path
from jaxopd.distill.teacher import read_model_fields
from jaxopd.model import Transformer
from jaxopd.model.stacking import stack_layers, to_layout
from jaxopd.training import checkpoint, sharding
from jaxopd.training.config import MeshConfig, model_config_dict, to_model_config
from jaxopd.training.state import abstract_params

# MoE with a dense first layer: a dense and an MoE stack, sharded over 8 devices (fsdp) and 2 experts' shards.
FIELDS = dict(vocab_size=17, d_model=16, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32,
              num_experts=4, num_experts_per_token=2, moe_mlp_dim=8, first_k_dense=1)


def _model(fields, scan_layers):
    return Transformer(to_model_config(model_config_dict({**fields, "scan_layers": scan_layers})))


def _mesh():
    return sharding.make_mesh(MeshConfig(data=1, fsdp=-1, expert=2))


@pytest.mark.parametrize("name", ["teacher", "student_init"])
def test_bundled_scanned_checkpoints_load_unrolled(name):
    path = resolve_path(f"data/tasks/arithmetic/{name}")
    step, fields = read_model_fields(path)
    assert "scan_layers" not in fields  # the saved config predates scan_layers: the arrays tell the layout
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1))
    tokens = jnp.array([[1, 5, 6, 7, 2, 3]])
    logits, loaded = [], []
    for scan_layers in (True, False):
        model = _model(fields, scan_layers)
        params = checkpoint.load_params(path, abstract_params(model, mesh), step)
        loaded.append(params)
        logits.append(np.asarray(model.apply({"params": params}, tokens)))
    assert "layers" in loaded[0] and not any(key.startswith("layers_") for key in loaded[0])
    jax.tree.map(np.testing.assert_array_equal, loaded[0], stack_layers(model.config, jax.device_get(loaded[1])))
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-6, atol=1e-6 * np.abs(logits[0]).max())


def _state(model, mesh):
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    params = jax.tree.map(lambda x: x + 0.0, params)
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(params)
    # moments that differ from the params, so that a swapped leaf would show
    _, opt_state = optimizer.update(jax.tree.map(jnp.sin, params), opt_state, params)
    state = {"params": params, "opt_state": opt_state, "step": jnp.int32(7),
             "rng": jax.random.key_data(jax.random.key(1))}
    shardings = sharding.logical_shardings(
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]), mesh)
    return state, shardings


@pytest.mark.parametrize("saved_scanned", [False, True])
def test_a_run_resumes_in_the_other_layout(tmp_path, saved_scanned):
    mesh = _mesh()
    saved_model, run_model = _model(FIELDS, saved_scanned), _model(FIELDS, not saved_scanned)
    state, _ = _state(saved_model, mesh)
    saver = checkpoint.Checkpointer(tmp_path, every=1, keep=1)
    config = {"steps": 10, "model": {**FIELDS, "scan_layers": saved_scanned}}
    saver.save(7, state, [{"position": 3}], config)
    saver.wait()

    expected, param_shardings = _state(run_model, mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), expected)
    abstract["params"] = sharding.abstract_arrays(expected["params"], param_shardings)
    resumed, data_state = checkpoint.Checkpointer(tmp_path, every=1, keep=1).restore_latest(
        abstract, {**config, "model": {**FIELDS, "scan_layers": not saved_scanned}})
    assert data_state == [{"position": 3}] and int(resumed["step"]) == 7
    # the saved state, converted: stacking the unrolled one gives the scanned one
    unrolled, scanned = (resumed, state) if saved_scanned else (state, resumed)
    for part in ("params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, to_layout(saved_model.config, jax.device_get(unrolled[part]), True),
                     jax.device_get(scanned[part]))
    # read straight into the run's shardings (expert weights over "expert", the rest over fsdp)
    jax.tree.map(lambda leaf, wanted: assert_equivalent(leaf.sharding, wanted, leaf.ndim), resumed["params"],
                 param_shardings)


def assert_equivalent(actual, wanted, ndim):
    assert actual.is_equivalent_to(wanted, ndim), (actual, wanted)
