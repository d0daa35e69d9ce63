"""Schedules against hand-computed values at their breakpoints; the weight-decay mask and the frozen balance bias."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.training import optimizer as optim
from jaxopd.training.config import OptimizerConfig, ScheduleConfig


def _schedule(**fields):
    base = dict(kind="deepseek_v3", peak_lr=2.2e-4, warmup_steps=10, decay_start=30, decay_end=50, end_lr=2.2e-5,
                final_step=60, final_lr=7.3e-6)
    base.update(fields)
    return ScheduleConfig(**base)


@pytest.mark.parametrize("step, expected", [
    (0, 0.0), (5, 1.1e-4), (10, 2.2e-4), (29, 2.2e-4), (30, 2.2e-4),
    # cosine half way from 2.2e-4 to 2.2e-5: the mean of the two; a quarter: end + (peak-end)(1+cos(pi/4))/2
    (40, (2.2e-4 + 2.2e-5) / 2), (35, 2.2e-5 + (2.2e-4 - 2.2e-5) * (1 + math.cos(math.pi / 4)) / 2),
    (50, 2.2e-5), (59, 2.2e-5), (60, 7.3e-6), (10_000, 7.3e-6),
])
def test_deepseek_v3_schedule_at_breakpoints(step, expected):
    lr = optim.learning_rate_schedule(_schedule())(step)
    np.testing.assert_allclose(float(lr), expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("step, expected", [
    (0, 0.0), (50, 5e-4), (100, 1e-3), (550, (1e-3 + 1e-4) / 2), (1000, 1e-4), (5000, 1e-4)])
def test_warmup_cosine_schedule(step, expected):
    schedule = _schedule(kind="warmup_cosine", peak_lr=1e-3, warmup_steps=100, decay_end=1000, end_lr=1e-4)
    np.testing.assert_allclose(float(optim.learning_rate_schedule(schedule)(step)), expected, rtol=1e-6)


def test_schedule_rejects_breakpoints_out_of_order():
    with pytest.raises(ValueError, match="warmup_steps <= decay_start <= decay_end"):
        _schedule(decay_start=5)
    with pytest.raises(ValueError, match="kind"):
        _schedule(kind="linear")


def test_batch_ramp_sizes_and_tokens():
    # start 4 -> final 12 in multiples of 4 over 400 tokens of rows of 10: size 8 is due after 200 tokens
    # (5 steps of 40), size 12 after 400 tokens (3 steps of 80 reach 440).
    ramp = optim.batch_ramp(final=12, seq_len=10, multiple=4, start=4, ramp_tokens=400)
    assert [ramp.batch_size(s) for s in range(10)] == [4] * 5 + [8] * 3 + [12] * 2
    assert [ramp.tokens_before(s) for s in (0, 5, 8, 9)] == [0, 200, 440, 560]
    assert ramp.step_at_tokens(300) == 7  # tokens_before(6) = 280 < 300 <= tokens_before(7) = 360
    assert ramp.step_at_tokens(440) == 8 and ramp.step_at_tokens(1000) == 13


def test_batch_ramp_off_and_bad_multiple():
    assert optim.batch_ramp(final=16, seq_len=8, multiple=8).batch_size(123) == 16
    with pytest.raises(ValueError, match="multiple of microbatch_size"):
        optim.batch_ramp(final=12, seq_len=8, multiple=8)


def _optimizer(weight_decay=0.1, clip=0.0):
    return optim.make_optimizer(OptimizerConfig(b1=0.9, b2=0.95, eps=1e-8, weight_decay=weight_decay,
                                                grad_clip_norm=clip, schedule=ScheduleConfig(kind="constant", peak_lr=0.5)))


def _params():
    return {"embed": jnp.full((4, 3), 2.0),
            "layers_0": {"attention_norm": {"scale": jnp.full((3,), 2.0)},
                         "mlp": {"kernel": jnp.full((3, 3), 2.0), "bias": jnp.full((3,), 2.0)},
                         "moe": {"expert_bias": jnp.full((4,), 2.0), "experts": jnp.full((4, 3, 3), 2.0)}}}


def test_weight_decay_applies_to_matrices_only():
    params = _params()
    grads = jax.tree.map(jnp.zeros_like, params)
    tx = _optimizer()
    updates, _ = tx.update(grads, tx.init(params), params)
    # Zero gradient: Adam's step is 0, the decoupled decay gives -lr * wd * param = -0.5 * 0.1 * 2.
    np.testing.assert_allclose(updates["embed"], -0.1)
    np.testing.assert_allclose(updates["layers_0"]["mlp"]["kernel"], -0.1)
    np.testing.assert_allclose(updates["layers_0"]["moe"]["experts"], -0.1)
    np.testing.assert_array_equal(updates["layers_0"]["attention_norm"]["scale"], 0.0)
    np.testing.assert_array_equal(updates["layers_0"]["mlp"]["bias"], 0.0)


def test_expert_bias_gets_no_optimizer_update_and_no_moments():
    params = _params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
    tx = _optimizer(clip=1.0)
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        np.testing.assert_array_equal(updates["layers_0"]["moe"]["expert_bias"], 0.0)
    # Adam's first step moves every trained param by ~lr (sign of the gradient), decay aside.
    assert float(jnp.abs(updates["layers_0"]["mlp"]["bias"]).min()) > 0.4
    moment_shapes = [x.shape for x in jax.tree.leaves(state) if hasattr(x, "shape")]
    assert moment_shapes.count((4,)) == 0, "the balance bias must not have Adam moments"
