"""The train step on the 8-device CPU mesh, for several mesh shapes, matches one device to float32 tolerance."""

import pathlib

import jax
import numpy as np
import pytest

from jaxopd.training import config as config_lib, sharding
from jaxopd.training.objectives import CROSS_ENTROPY
from jaxopd.training.pretraining import StepBatches
from jaxopd.training.state import build

CONFIG = pathlib.Path(__file__).parents[1] / "tiny_train_config.py"


def _two_steps(mesh_sizes, devices):
    config = config_lib.to_run_config(config_lib.load_config_file(
        CONFIG, {f"mesh.{axis}": size for axis, size in mesh_sizes.items()}))
    run = build(config, CROSS_ENTROPY, devices)
    batches = StepBatches(config)
    state, values = run.state, []
    for _ in range(2):
        batch = sharding.global_batch(batches.next(2), run.mesh, leading_axes=1)
        state, metrics = run.step_fn(state, batch)
        values.append([float(metrics[name]) for name in ("loss", "ce_loss", "mtp_loss", "grad_norm")])
    return np.array(values), state


@pytest.fixture(scope="module")
def single_device():
    return _two_steps(dict(data=1), jax.devices()[:1])


@pytest.mark.parametrize("mesh_sizes", [
    dict(data=8), dict(data=1, fsdp=8), dict(data=2, tensor=4), dict(data=1, expert=8),
    dict(data=1, fsdp=2, expert=2, tensor=2),
], ids=lambda sizes: "-".join(f"{k}{v}" for k, v in sizes.items()))
@pytest.mark.slow
def test_sharded_step_matches_one_device(mesh_sizes, single_device):
    expected, expected_state = single_device
    values, state = _two_steps({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **mesh_sizes}, jax.devices())
    np.testing.assert_allclose(values, expected, rtol=2e-5)
    # Params after two updates (the MoE balance bias included) agree too.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 state["params"], expected_state["params"])


def test_params_are_created_sharded():
    config = config_lib.to_run_config(config_lib.load_config_file(CONFIG, {"mesh.data": 1, "mesh.fsdp": 8}))
    run = build(config, CROSS_ENTROPY)
    sharded = [leaf for leaf in jax.tree.leaves(run.state["params"]) if not leaf.sharding.is_fully_replicated]
    assert sharded, "with fsdp=8 the weight matrices must be split"
    for leaf in sharded:
        assert leaf.addressable_shards[0].data.size < leaf.size
