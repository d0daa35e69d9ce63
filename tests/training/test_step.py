"""Pieces of the train step: MTP targets vs brute force, the balance-bias update wired to the step's expert loads,
and gradient accumulation (one batch of 16 == two microbatches of 8)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxopd.training import config as config_lib, sharding
from jaxopd.training.objectives import CROSS_ENTROPY, mtp_targets
from jaxopd.training.pretraining import StepBatches
from jaxopd.training.state import build
from jaxopd.model import moe_layer_paths

CONFIG = pathlib.Path(__file__).parents[1] / "tiny_train_config.py"


def test_mtp_targets_match_brute_force():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 50, (3, 12)).astype(np.int32)
    loss_mask = (rng.random((3, 12)) > 0.2).astype(np.float32)
    for depth in (1, 2, 3):
        got_targets, got_mask = map(np.asarray, mtp_targets(jnp.asarray(targets), jnp.asarray(loss_mask), depth))
        for b in range(3):
            for i in range(12):
                valid = i + depth < 12 and all(loss_mask[b, j] for j in range(i, i + depth + 1))
                assert got_mask[b, i] == float(valid), (depth, b, i)
                if valid:
                    assert got_targets[b, i] == targets[b, i + depth]


def test_step_moves_each_expert_bias_against_its_load_and_nothing_else_with_zero_lr():
    config = config_lib.to_run_config(config_lib.load_config_file(CONFIG, {
        "optimizer.schedule.kind": "constant", "optimizer.schedule.peak_lr": 0.0, "moe_bias_rate": 0.01}))
    run = build(config, CROSS_ENTROPY)
    before = jax.tree.map(np.asarray, run.state["params"])
    batch = sharding.global_batch(StepBatches(config).next(2), run.mesh, leading_axes=1)
    state, metrics = run.step_fn(run.state, batch)
    load = np.asarray(metrics["moe_load"])  # [moe layers (main then MTP), experts], mean over microbatches
    layers = moe_layer_paths(config.model)  # (path, row in a scanned stack or None) per MoE layer
    assert load.shape == (len(layers), 8) and np.allclose(load.sum(-1), 1.0)
    for row, (path, stacked_row) in enumerate(layers):
        old, new = before, state["params"]
        for key in path:
            old, new = old[key], new[key]
        old, new = (old["expert_bias"], new["expert_bias"]) if stacked_row is None else (
            old["expert_bias"][stacked_row], new["expert_bias"][stacked_row])
        np.testing.assert_allclose(new, old + 0.01 * np.sign(load[row].mean() - load[row]), atol=1e-7)
    paths = {path for path, _ in layers}
    # With learning rate 0 every other param is unchanged.
    changed = jax.tree_util.tree_flatten_with_path(jax.tree.map(lambda a, b: bool((np.asarray(a) != b).any()),
                                                                state["params"], before))[0]
    assert {jax.tree_util.keystr(p) for p, c in changed if c} == {
        jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in (*path, "expert_bias"))) for path in paths}


def test_gradient_accumulation_matches_one_big_batch():
    results = []
    for microbatch_size in (16, 8):
        config = config_lib.to_run_config(config_lib.load_config_file(CONFIG, {"microbatch_size": microbatch_size}))
        run = build(config, CROSS_ENTROPY)
        batch = StepBatches(config).next(16 // microbatch_size)
        state, metrics = run.step_fn(run.state, sharding.global_batch(batch, run.mesh, leading_axes=1))
        results.append(([float(metrics[k]) for k in ("loss", "ce_loss", "mtp_loss", "grad_norm")], state["params"]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 results[0][1], results[1][1])
