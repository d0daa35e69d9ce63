"""Losses against float64 numpy references and closed forms."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.kernels import losses

B, T, D, V = 2, 7, 6, 11  # T = 7 is not a multiple of the chunk sizes used below


def _np_log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _np_kl(log_p, log_q):
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def _inputs(seed=0, d=D):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, T, d)).astype(np.float32)
    unembed = rng.normal(size=(d, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = (rng.random((B, T)) > 0.3).astype(np.float32)
    return hidden, unembed, targets, mask


def _np_cross_entropy(hidden, unembed, targets, mask, z_loss_weight):
    """float64 full-softmax CE, z-loss and their analytic gradients (dCE/dlogits = softmax - onehot)."""
    h, w = hidden.astype(np.float64), unembed.astype(np.float64)
    logits = h @ w
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target_logit = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    probs = np.exp(logits - log_z[..., None])
    onehot = np.eye(V)[targets]
    dlogits = mask[..., None] * ((probs - onehot) + 2 * z_loss_weight * log_z[..., None] * probs)
    return {
        "loss_sum": (mask * (log_z - target_logit)).sum(),
        "z_loss_sum": z_loss_weight * (mask * log_z**2).sum(),
        "token_count": mask.sum(),
        "correct_count": (mask * (logits.argmax(-1) == targets)).sum(),
        "grad_hidden": dlogits @ w.T,
        "grad_unembed": np.einsum("btd,btv->dv", h, dlogits),
    }


@pytest.mark.parametrize("chunk_size", [3, 7, 64])
def test_chunked_cross_entropy_matches_float64_softmax(chunk_size):
    hidden, unembed, targets, mask = _inputs()
    got = losses.chunked_cross_entropy(hidden, unembed, targets, mask, chunk_size=chunk_size, z_loss_weight=1e-2)
    want = _np_cross_entropy(hidden, unembed, targets, mask, 1e-2)
    for key in ("loss_sum", "z_loss_sum", "token_count", "correct_count"):
        np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-5, err_msg=key)


def test_chunked_cross_entropy_gradient_matches_analytic_and_unchunked():
    hidden, unembed, targets, mask = _inputs(1)
    z = 1e-2

    def chunked(h, w):
        out = losses.chunked_cross_entropy(h, w, targets, mask, chunk_size=3, z_loss_weight=z)
        return out["loss_sum"] + out["z_loss_sum"]

    def unchunked(h, w):
        logits = jnp.einsum("btd,dv->btv", h, w)
        log_z = jax.nn.logsumexp(logits, -1)
        target = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return jnp.sum(mask * (log_z - target + z * log_z**2))

    grad_h, grad_w = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, unembed)
    want = _np_cross_entropy(hidden, unembed, targets, mask, z)
    np.testing.assert_allclose(grad_h, want["grad_hidden"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad_w, want["grad_unembed"], rtol=1e-4, atol=1e-5)
    ref_h, ref_w = jax.grad(unchunked, argnums=(0, 1))(hidden, unembed)
    np.testing.assert_allclose(grad_h, ref_h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_w, ref_w, rtol=1e-5, atol=1e-6)


def _all_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield getattr(var.aval, "shape", ())
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _all_shapes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _all_shapes(sub)


def test_cross_entropy_forward_and_backward_never_hold_full_logits():
    b, t, d, v, chunk = 2, 64, 8, 512, 16
    hidden, unembed = jnp.ones((b, t, d)), jnp.ones((d, v))
    targets, mask = jnp.zeros((b, t), jnp.int32), jnp.ones((b, t))

    def loss(h, w):
        return losses.chunked_cross_entropy(h, w, targets, mask, chunk_size=chunk, z_loss_weight=1e-4)["loss_sum"]

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, unembed).jaxpr
    sizes = [int(np.prod(shape)) for shape in _all_shapes(jaxpr)]
    assert max(sizes) == b * chunk * v, "largest intermediate should be one [b, chunk, vocab] logits chunk"


def test_token_logprobs_matches_float64_with_temperature():
    hidden, unembed, tokens, _ = _inputs(2)
    got = losses.token_logprobs(hidden, unembed, tokens, chunk_size=4, temperature=0.7)
    log_probs = _np_log_softmax(hidden.astype(np.float64) @ unembed.astype(np.float64) / 0.7)
    want = np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]
    assert got.shape == (B, T) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_token_logprobs_bfloat16_inputs_accumulate_in_float32():
    hidden, unembed, tokens, _ = _inputs(3)
    hidden_bf16, unembed_bf16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(unembed, jnp.bfloat16)
    got = losses.token_logprobs(hidden_bf16, unembed_bf16, tokens, chunk_size=4)
    logits = np.asarray(hidden_bf16, np.float64) @ np.asarray(unembed_bf16, np.float64)
    want = np.take_along_axis(_np_log_softmax(logits), tokens[..., None], -1)[..., 0]
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _random_logits(seed, shape=(B, T, V)):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape) * 2, rng.normal(size=shape) * 2


def test_full_divergences_match_float64():
    student, teacher = _random_logits(8)
    log_s, log_t = _np_log_softmax(student / 1.5), _np_log_softmax(teacher / 1.5)
    args = (jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32))
    np.testing.assert_allclose(losses.reverse_kl(*args, temperature=1.5), _np_kl(log_s, log_t), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(losses.forward_kl(*args, temperature=1.5), _np_kl(log_t, log_s), rtol=1e-4, atol=1e-6)
    beta = 0.3
    log_m = np.log(beta * np.exp(log_t) + (1 - beta) * np.exp(log_s))
    want_jsd = beta * _np_kl(log_t, log_m) + (1 - beta) * _np_kl(log_s, log_m)
    got_jsd = losses.generalized_jsd(*args, beta=beta, temperature=1.5)
    np.testing.assert_allclose(got_jsd, want_jsd, rtol=1e-4, atol=1e-6)


def test_generalized_jsd_beta_limits_follow_gkd_convention():
    student, teacher = _random_logits(9, (4, V))
    log_s, log_t = _np_log_softmax(student), _np_log_softmax(teacher)
    forward, reverse = _np_kl(log_t, log_s), _np_kl(log_s, log_t)
    args = (jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32))
    np.testing.assert_allclose(losses.generalized_jsd(*args, beta=0.0), forward, rtol=1e-4)
    np.testing.assert_allclose(losses.generalized_jsd(*args, beta=1.0), reverse, rtol=1e-4)
    # The endpoints are the limits of the rescaled divergence, so beta = 0 / 1 are not an arbitrary labelling.
    assert np.all(np.abs(forward - reverse) > 0.1 * forward), "pick logits where the two KLs differ"
    small = 1e-4
    np.testing.assert_allclose(losses.generalized_jsd(*args, beta=small) / small, forward, rtol=1e-2)
    np.testing.assert_allclose(losses.generalized_jsd(*args, beta=1 - small) / small, reverse, rtol=1e-2)


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "jsd"])
def test_chunked_divergence_matches_float64_and_gradient_matches_unchunked(divergence):
    rng = np.random.default_rng(10)
    d_student, d_teacher = 5, 9
    s_hidden, s_unembed = rng.normal(size=(B, T, d_student)), rng.normal(size=(d_student, V))
    t_hidden, t_unembed = rng.normal(size=(B, T, d_teacher)), rng.normal(size=(d_teacher, V))
    beta, temperature = 0.4, 2.0
    log_s = _np_log_softmax(s_hidden @ s_unembed / temperature)
    log_t = _np_log_softmax(t_hidden @ t_unembed / temperature)
    log_m = np.log(beta * np.exp(log_t) + (1 - beta) * np.exp(log_s))
    want = {
        "reverse_kl": _np_kl(log_s, log_t),
        "forward_kl": _np_kl(log_t, log_s),
        "jsd": beta * _np_kl(log_t, log_m) + (1 - beta) * _np_kl(log_s, log_m),
    }[divergence]
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    kwargs = dict(divergence=divergence, beta=beta, temperature=temperature)

    def chunked(sh, su, th, tu):
        return losses.chunked_divergence(sh, su, th, tu, chunk_size=3, **kwargs)

    inputs = tuple(map(f32, (s_hidden, s_unembed, t_hidden, t_unembed)))
    np.testing.assert_allclose(chunked(*inputs), want, rtol=1e-4, atol=1e-6)

    mask = f32(rng.random((B, T)) > 0.3)
    by_name = {"reverse_kl": losses.reverse_kl, "forward_kl": losses.forward_kl}
    full = lambda s, t: by_name[divergence](s, t, temperature=temperature) if divergence in by_name else (
        losses.generalized_jsd(s, t, beta=beta, temperature=temperature))
    unchunked = lambda sh, su: jnp.sum(mask * full(sh @ su, f32(t_hidden) @ f32(t_unembed)))
    grads = jax.grad(lambda *a: jnp.sum(mask * chunked(*a)), argnums=(0, 1, 2, 3))(*inputs)
    ref = jax.grad(unchunked, argnums=(0, 1))(f32(s_hidden), f32(s_unembed))
    np.testing.assert_allclose(grads[0], ref[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads[1], ref[1], rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(grads[2]) == 0) and np.all(np.asarray(grads[3]) == 0), "teacher must get no gradient"


def test_bad_inputs_raise_clear_errors():
    hidden, unembed, targets, mask = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        losses.chunked_cross_entropy(hidden, unembed, targets, mask, chunk_size=0)
    with pytest.raises(ValueError, match="targets"):
        losses.chunked_cross_entropy(hidden, unembed, targets[:, :3], mask, chunk_size=4)
    with pytest.raises(ValueError, match="unembed"):
        losses.token_logprobs(hidden, unembed.T, targets, chunk_size=4)
    with pytest.raises(ValueError, match="beta"):
        losses.chunked_divergence(hidden, unembed, hidden, unembed, chunk_size=4, divergence="jsd", beta=1.5)
