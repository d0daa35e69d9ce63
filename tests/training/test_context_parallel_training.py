"""The train step with each row split over the mesh's context axis matches one device; run configs that cannot run
context-parallel are refused before anything is built, naming the key."""

import pathlib

import jax
import numpy as np
import pytest

from jaxopd.training import config as config_lib, sharding
from jaxopd.training.objectives import CROSS_ENTROPY
from jaxopd.training.pretraining import StepBatches
from jaxopd.training.state import build

CONFIG = pathlib.Path(__file__).parents[1] / "tiny_train_config.py"


def _two_steps(overrides, devices):
    config = config_lib.to_run_config(config_lib.load_config_file(CONFIG, overrides))
    run = build(config, CROSS_ENTROPY, devices)
    batches = StepBatches(config)
    state, values = run.state, []
    for _ in range(2):
        batch = sharding.global_batch(batches.next(2), run.mesh, leading_axes=1)
        state, metrics = run.step_fn(state, batch)
        values.append([float(metrics[name]) for name in ("loss", "ce_loss", "mtp_loss", "grad_norm")])
    return np.array(values), state


@pytest.mark.slow  # two train steps compiled, ~60 s on 2 CPU cores
def test_context4_fsdp2_step_matches_one_device():
    # Blockwise with 4-token tiles, so each device's 8 tokens of the 32-token rows span several tiles.
    kernel = {"model.attention_implementation": "blockwise", "model.attention_block_q": 4,
              "model.attention_block_kv": 4, "microbatch_size": 2, "batch_size": 4}
    expected, expected_state = _two_steps({**kernel, "mesh.data": 1}, jax.devices()[:1])
    values, state = _two_steps({**kernel, "mesh.data": 1, "mesh.fsdp": 2, "mesh.context": 4}, jax.devices())
    np.testing.assert_allclose(values, expected, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 state["params"], expected_state["params"])


@pytest.mark.parametrize("overrides, message", [
    ({"mesh.context": 3, "seq_len": 32}, r"seq_len=32 is not divisible by mesh.context=3"),
    ({"mesh.context": 2, "model.attention_implementation": "splash"},
     r"model.attention_implementation='splash' does not run context-parallel \(mesh.context=2\)"),
    ({"mesh.context": 2, "loss": "reverse_kl"}, r"mesh.context=2: distillation samples with a KV cache"),
])
def test_run_configs_that_cannot_split_rows_are_refused(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.to_run_config(config_lib.load_config_file(CONFIG, {"mesh.data": 1, **overrides}))


def test_context_taking_the_remaining_devices_is_checked_once_the_mesh_is_built():
    config = config_lib.to_run_config(config_lib.load_config_file(
        CONFIG, {"mesh.data": 1, "mesh.context": -1, "seq_len": 36, "microbatch_size": 1, "batch_size": 1}))
    with pytest.raises(ValueError, match=r"seq_len=36 is not divisible .*config.mesh.context=8"):
        build(config, CROSS_ENTROPY)
