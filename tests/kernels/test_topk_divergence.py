"""Top-k teacher distributions and the KL over their k + 1 buckets, against float64 numpy brute force (sorting the
full softmax, summing the tail directly) and float64 finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.kernels import losses

B, T, D, V = 2, 7, 5, 11  # T = 7 is not a multiple of the chunk sizes below


def _np_log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _np_buckets(log_probs, ids):
    """log-probs [..., k (+1)] of the k tokens `ids` and, when k < vocab, of the tail (summed directly)."""
    top = np.take_along_axis(log_probs, ids, -1)
    if ids.shape[-1] == log_probs.shape[-1]:
        return top
    outside = np.ones(log_probs.shape, bool)
    np.put_along_axis(outside, ids, False, -1)
    tail = np.log(np.where(outside, np.exp(log_probs), 0.0).sum(-1))
    return np.concatenate([top, tail[..., None]], -1)


def _np_topk_kl(s_hidden, s_unembed, t_logits, top_k, divergence, temperature):
    log_t = _np_log_softmax(t_logits / temperature)
    ids = np.argsort(-log_t, -1)[..., :top_k]
    p = _np_buckets(log_t, ids)
    q = _np_buckets(_np_log_softmax(s_hidden @ s_unembed / temperature), ids)
    if divergence == "reverse_kl":
        p, q = q, p
    return (np.exp(p) * (p - q)).sum(-1)


def _inputs(seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(B, T, D)), rng.normal(size=(D, V)), rng.normal(size=(B, T, D + 2)),
            rng.normal(size=(D + 2, V)) * 2, (rng.random((B, T)) > 0.3).astype(np.float64))


def _teacher(t_hidden, t_unembed, top_k, temperature, chunk_size=3):
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return losses.topk_logprobs(f32(t_hidden), f32(t_unembed), top_k=top_k, chunk_size=chunk_size,
                                temperature=temperature)


@pytest.mark.parametrize("top_k", [1, 3, V - 1, V])
def test_topk_logprobs_match_float64_sort_and_direct_tail_sum(top_k):
    _, _, t_hidden, t_unembed, _ = _inputs(0)
    ids, logprobs, tail = _teacher(t_hidden, t_unembed, top_k, temperature=1.5)
    log_t = _np_log_softmax(t_hidden @ t_unembed / 1.5)
    want_ids = np.argsort(-log_t, -1)[..., :top_k]
    np.testing.assert_array_equal(ids, want_ids)
    buckets = _np_buckets(log_t, want_ids)
    np.testing.assert_allclose(logprobs, buckets[..., :top_k], rtol=1e-5, atol=1e-5)
    if top_k == V:
        assert np.all(np.asarray(tail) == -np.inf), "an empty tail has probability 0"
    else:
        np.testing.assert_allclose(tail, buckets[..., -1], rtol=1e-5, atol=1e-5)


def test_tail_is_accurate_when_the_top_k_hold_nearly_all_the_mass():
    # p(tail) = 10 e^-30 ~ 1e-12: 1 - sum(p_topk) is exactly 0 in float32, so log1p(-sum) would give -inf.
    hidden = jnp.asarray(np.eye(1, D)[None].repeat(T, 1), jnp.float32)  # [1, T, D]
    unembed = np.zeros((D, V), np.float32)
    unembed[0, 0] = 30.0
    _, logprobs, tail = losses.topk_logprobs(hidden, jnp.asarray(unembed), top_k=1, chunk_size=4)
    assert float(jnp.exp(logprobs).max()) == 1.0
    np.testing.assert_allclose(tail, np.log(10.0) - np.logaddexp(30.0, np.log(10.0)), rtol=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("top_k", [1, 4, V - 1, V])
def test_topk_divergence_matches_float64_brute_force(divergence, top_k):
    s_hidden, s_unembed, t_hidden, t_unembed, _ = _inputs(1)
    temperature = 0.8
    teacher = _teacher(t_hidden, t_unembed, top_k, temperature)
    got = losses.chunked_topk_divergence(jnp.asarray(s_hidden, jnp.float32), jnp.asarray(s_unembed, jnp.float32),
                                         *teacher, chunk_size=3, divergence=divergence, temperature=temperature)
    want = _np_topk_kl(s_hidden, s_unembed, t_hidden @ t_unembed, top_k, divergence, temperature)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(got) >= -1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_topk_divergence_with_k_equal_vocab_is_the_full_divergence(divergence):
    s_hidden, s_unembed, t_hidden, t_unembed, _ = _inputs(2)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    topk = losses.chunked_topk_divergence(f32(s_hidden), f32(s_unembed), *_teacher(t_hidden, t_unembed, V, 1.3),
                                          chunk_size=4, divergence=divergence, temperature=1.3)
    full = losses.chunked_divergence(f32(s_hidden), f32(s_unembed), f32(t_hidden), f32(t_unembed), chunk_size=4,
                                     divergence=divergence, temperature=1.3)
    np.testing.assert_allclose(topk, full, rtol=1e-5, atol=1e-6)
    # With k < vocab it is a lower bound of the full divergence (merging buckets never increases a KL).
    fewer = losses.chunked_topk_divergence(f32(s_hidden), f32(s_unembed), *_teacher(t_hidden, t_unembed, 3, 1.3),
                                           chunk_size=4, divergence=divergence, temperature=1.3)
    assert np.all(np.asarray(fewer) <= np.asarray(full) + 1e-6) and np.any(np.asarray(fewer) < np.asarray(full) - 1e-3)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("top_k", [3, V])
def test_topk_divergence_gradient_matches_float64_finite_differences_at_any_chunking(divergence, top_k):
    s_hidden, s_unembed, t_hidden, t_unembed, mask = _inputs(3)
    temperature = 1.2
    teacher = _teacher(t_hidden, t_unembed, top_k, temperature)
    t_logits = t_hidden @ t_unembed

    def loss(h, w, chunk_size):
        per_token = losses.chunked_topk_divergence(h, w, *teacher, chunk_size=chunk_size, divergence=divergence,
                                                   temperature=temperature)
        return jnp.sum(jnp.asarray(mask, jnp.float32) * per_token)

    def np_loss(h, w):
        return (mask * _np_topk_kl(h, w, t_logits, top_k, divergence, temperature)).sum()

    def finite_differences(x, f, eps=1e-6):
        grad = np.zeros_like(x)
        for index in np.ndindex(x.shape):
            step = np.zeros_like(x)
            step[index] = eps
            grad[index] = (f(x + step) - f(x - step)) / (2 * eps)
        return grad

    want_h = finite_differences(s_hidden, lambda h: np_loss(h, s_unembed))
    want_w = finite_differences(s_unembed, lambda w: np_loss(s_hidden, w))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    for chunk_size in (3, 16):  # a ragged last chunk; one chunk longer than the sequence
        value, (grad_h, grad_w) = jax.value_and_grad(loss, argnums=(0, 1))(f32(s_hidden), f32(s_unembed), chunk_size)
        np.testing.assert_allclose(value, np_loss(s_hidden, s_unembed), rtol=1e-5)
        np.testing.assert_allclose(grad_h, want_h, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(grad_w, want_w, rtol=1e-3, atol=1e-5)
    assert np.abs(want_h).max() > 1e-2  # a gradient that is not 0


def test_teacher_inputs_get_no_gradient():
    s_hidden, s_unembed, t_hidden, t_unembed, _ = _inputs(4)
    ids, logprobs, tail = _teacher(t_hidden, t_unembed, 4, 1.0)
    grads = jax.grad(lambda lp, tl: losses.chunked_topk_divergence(
        jnp.asarray(s_hidden, jnp.float32), jnp.asarray(s_unembed, jnp.float32), ids, lp, tl, chunk_size=3).sum(),
        argnums=(0, 1))(logprobs, tail)
    assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_bad_inputs_raise_clear_errors():
    s_hidden, s_unembed, t_hidden, t_unembed, _ = _inputs(5)
    hidden, unembed = jnp.asarray(t_hidden, jnp.float32), jnp.asarray(t_unembed, jnp.float32)
    for top_k in (0, V + 1):
        with pytest.raises(ValueError, match=rf"top_k={top_k} must be an int in \[1, vocab=11\]"):
            losses.topk_logprobs(hidden, unembed, top_k=top_k, chunk_size=4)
    ids, logprobs, tail = _teacher(t_hidden, t_unembed, 4, 1.0)
    student = (jnp.asarray(s_hidden, jnp.float32), jnp.asarray(s_unembed, jnp.float32))
    with pytest.raises(ValueError, match="teacher_ids"):
        losses.chunked_topk_divergence(*student, ids[:, :3], logprobs[:, :3], tail[:, :3], chunk_size=4)
    with pytest.raises(ValueError, match="teacher_ids"):
        losses.chunked_topk_divergence(*student, ids, logprobs[..., :2], tail, chunk_size=4)
    with pytest.raises(ValueError, match="divergence='jsd'"):
        losses.chunked_topk_divergence(*student, ids, logprobs, tail, chunk_size=4, divergence="jsd")
