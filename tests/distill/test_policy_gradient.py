"""Policy-gradient and advantage math against closed forms, analytic softmax gradients and numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.distill import policy_gradient

B, T, V = 2, 7, 11


def _np_log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _np_kl(log_p, log_q):
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def test_sampled_reverse_kl_is_unbiased_for_exact_reverse_kl():
    student_logits = np.array([2.0, 0.5, -1.0, 0.0, 1.0])
    teacher_logits = np.array([0.0, 1.5, 0.5, -2.0, 1.0])
    log_s, log_t = _np_log_softmax(student_logits), _np_log_softmax(teacher_logits)
    exact = _np_kl(log_s, log_t)
    n = 20000
    samples = jax.random.categorical(jax.random.key(0), jnp.asarray(student_logits), shape=(1, n))
    student_lp, teacher_lp = jnp.asarray(log_s)[samples], jnp.asarray(log_t)[samples]
    advantages = np.asarray(policy_gradient.sampled_reverse_kl_advantages(student_lp, teacher_lp, jnp.ones((1, n))))
    estimate = -advantages.mean()
    standard_error = advantages.std() / np.sqrt(n)
    assert abs(estimate - exact) < 4 * standard_error, (estimate, exact, standard_error)


def test_sampled_reverse_kl_advantages_scale_and_mask():
    rng = np.random.default_rng(4)
    lp_s, lp_t = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    mask = (rng.random((B, T)) > 0.5).astype(np.float32)
    got = policy_gradient.sampled_reverse_kl_advantages(jnp.asarray(lp_s), jnp.asarray(lp_t), jnp.asarray(mask),
                                                        coef=0.5)
    np.testing.assert_allclose(got, mask * -0.5 * (lp_s - lp_t), rtol=1e-6, atol=1e-7)


def _softmax_policy_logprobs(theta, actions):
    return jnp.take_along_axis(jax.nn.log_softmax(theta, -1), actions[..., None], -1)[..., 0]


def test_teacher_equal_to_student_gives_zero_advantage_and_zero_gradient():
    rng = np.random.default_rng(5)
    theta = jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32)
    actions = jnp.asarray(rng.integers(0, V, size=(B, T)))
    mask = jnp.ones((B, T))

    def loss(theta):
        lp = _softmax_policy_logprobs(theta, actions)
        advantages = policy_gradient.sampled_reverse_kl_advantages(lp, lp, mask)
        return policy_gradient.policy_gradient_loss(lp, lp, advantages, mask)[0]

    lp = _softmax_policy_logprobs(theta, actions)
    assert np.all(np.asarray(policy_gradient.sampled_reverse_kl_advantages(lp, lp, mask)) == 0.0)
    assert np.all(np.asarray(jax.grad(loss)(theta)) == 0.0)


@pytest.mark.parametrize("off_policy", [False, True])
def test_policy_gradient_matches_analytic_softmax_gradient(off_policy):
    rng = np.random.default_rng(6)
    theta = rng.normal(size=(B, T, V))
    actions = rng.integers(0, V, size=(B, T))
    advantages = rng.normal(size=(B, T))
    mask = (rng.random((B, T)) > 0.3).astype(np.float64)
    log_pi = _np_log_softmax(theta)
    lp = np.take_along_axis(log_pi, actions[..., None], -1)[..., 0]
    sampler_lp = lp + (rng.normal(size=(B, T)) * 0.3 if off_policy else 0.0)

    def loss(theta):
        logprobs = _softmax_policy_logprobs(theta, jnp.asarray(actions))
        return policy_gradient.policy_gradient_loss(logprobs, jnp.asarray(sampler_lp, jnp.float32), advantages, mask)[0]

    got = jax.grad(loss)(jnp.asarray(theta, jnp.float32))
    # d/dtheta of -(1/N) sum_t A_t pi(a_t)/pi_old(a_t) = -(1/N) A_t ratio_t (onehot(a_t) - softmax(theta_t)).
    ratio = np.exp(lp - sampler_lp)
    want = -(mask * advantages * ratio)[..., None] * (np.eye(V)[actions] - np.exp(log_pi)) / mask.sum()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_ppo_clip_zeroes_gradient_outside_trust_region():
    eps = 0.2
    # (ratio, advantage): clipped when the ratio moved past the trust region in the advantage's favour.
    cases = [(1.5, 1.0, True), (0.5, -1.0, True), (0.5, 1.0, False), (1.5, -1.0, False), (1.1, 1.0, False)]
    ratio = np.array([[c[0] for c in cases]])
    advantages = np.array([[c[1] for c in cases]], np.float32)
    sampler_lp = np.full_like(ratio, -1.0)
    logprobs = jnp.asarray(sampler_lp + np.log(ratio), jnp.float32)
    mask = jnp.ones_like(logprobs)

    def loss(lp):
        return policy_gradient.policy_gradient_loss(lp, jnp.asarray(sampler_lp), advantages, mask, clip_epsilon=eps)

    grad, metrics = jax.grad(loss, has_aux=True)(logprobs)
    clipped = np.array([[c[2] for c in cases]])
    want = np.where(clipped, 0.0, -ratio * advantages / len(cases))
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["clip_fraction"], clipped.mean(), rtol=1e-6)


def test_policy_gradient_sequence_normalization_and_advantage_clip():
    rng = np.random.default_rng(7)
    lp = rng.normal(size=(3, T)) * 0.1
    sampler_lp = lp + rng.normal(size=(3, T)) * 0.1
    advantages = rng.normal(size=(3, T)) * 3
    mask = (rng.random((3, T)) > 0.4).astype(np.float64)
    mask[2] = 0.0  # a sequence without tokens does not count
    loss, _ = policy_gradient.policy_gradient_loss(lp, sampler_lp, advantages, mask, advantage_clip=1.0,
                                                   normalize="sequences")
    objective = np.exp(lp - sampler_lp) * np.clip(advantages, -1, 1) * mask
    want = -np.mean(objective[:2].sum(1) / mask[:2].sum(1))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_group_normalized_advantages_match_numpy():
    rng = np.random.default_rng(11)
    rewards = rng.normal(size=(3 * 4,))
    got = policy_gradient.group_normalized_advantages(jnp.asarray(rewards), group_size=4, eps=1e-6)
    grouped = rewards.reshape(3, 4)
    want = (grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    mask = jnp.ones((B, T))
    with pytest.raises(ValueError, match="normalize"):
        policy_gradient.policy_gradient_loss(mask, mask, mask, mask, normalize="batch")
    with pytest.raises(ValueError, match="group_size"):
        policy_gradient.group_normalized_advantages(jnp.ones(7), group_size=4)
