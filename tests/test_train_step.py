"""Pieces of the train step against brute-force references: MTP targets, the per-layer balance-bias update, and
gradient accumulation (one batch of 16 == two microbatches of 8)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxopd import config as config_lib, sharding, train, train_step

CONFIG = pathlib.Path(__file__).parent / "tiny_train_config.py"


def test_mtp_targets_match_brute_force():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 50, (3, 12)).astype(np.int32)
    loss_mask = (rng.random((3, 12)) > 0.2).astype(np.float32)
    for depth in (1, 2, 3):
        got_targets, got_mask = map(np.asarray, train_step.mtp_targets(jnp.asarray(targets), jnp.asarray(loss_mask),
                                                                        depth))
        for b in range(3):
            for i in range(12):
                valid = i + depth < 12 and all(loss_mask[b, j] for j in range(i, i + depth + 1))
                assert got_mask[b, i] == float(valid), (depth, b, i)
                if valid:
                    assert got_targets[b, i] == targets[b, i + depth]


def test_expert_biases_update_per_layer_in_numeric_order():
    # Dict keys flatten as layers_10 < layers_2 < layers_9; the update must follow the layer numbers.
    params = {name: {"moe": {"expert_bias": jnp.zeros(4), "router": jnp.ones((2, 4))}}
              for name in ("layers_2", "layers_9", "layers_10")}
    load = np.array([[0.4, 0.2, 0.2, 0.2], [0.1, 0.1, 0.4, 0.4], [0.25, 0.25, 0.25, 0.25]], np.float32)
    new = train_step.update_expert_biases(params, jnp.asarray(load), rate=0.01)
    for layer, name in enumerate(("layers_2", "layers_9", "layers_10")):
        expected = 0.01 * np.sign(load[layer].mean() - load[layer])
        np.testing.assert_allclose(new[name]["moe"]["expert_bias"], expected, atol=1e-7)
        np.testing.assert_array_equal(new[name]["moe"]["router"], 1.0)


def test_gradient_accumulation_matches_one_big_batch():
    results = []
    for microbatch_size in (16, 8):
        config = config_lib.load_config_file(CONFIG, {"microbatch_size": microbatch_size})
        run = train.build(config)
        batch = train.StepBatches(config).next(16 // microbatch_size)
        state, metrics = run.step_fn(run.state, sharding.global_batch(batch, run.mesh, leading_axes=1))
        results.append(([float(metrics[k]) for k in ("loss", "ce_loss", "mtp_loss", "grad_norm")], state["params"]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 results[0][1], results[1][1])
