"""tiled_grouped_matmul and moe_experts(grouped_matmul="tiled") against float64 numpy per-expert loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.kernels import moe

# Ragged groups: an empty first expert, an empty middle one, a group longer than a tile, and rows past the groups.
GROUP_SIZES = np.array([0, 5, 0, 11, 1, 3, 0], np.int32)
ROWS, IN, OUT = 23, 6, 4


def _numpy_grouped(x, w, group_sizes):
    """float64 per-expert loop: expert e's rows times w[e]; rows past the groups zero."""
    out = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for e, size in enumerate(group_sizes):
        out[start:start + size] = x[start:start + size].astype(np.float64) @ w[e].astype(np.float64)
        start += size
    return out


@pytest.mark.parametrize("tile", [1, 4, 8, 64])
def test_tiled_grouped_matmul_values_and_gradients_equal_per_expert_loop(tile):
    rng = np.random.default_rng(tile)
    x = rng.normal(size=(ROWS, IN)).astype(np.float32)
    w = rng.normal(size=(len(GROUP_SIZES), IN, OUT)).astype(np.float32)
    cotangent = rng.normal(size=(ROWS, OUT))
    fn = jax.jit(lambda x, w: moe.tiled_grouped_matmul(x, w, jnp.asarray(GROUP_SIZES), tile=tile))
    out, vjp = jax.vjp(fn, x, w)
    np.testing.assert_allclose(np.asarray(out), _numpy_grouped(x, w, GROUP_SIZES), rtol=1e-5, atol=1e-5)

    grad_x, grad_w = vjp(jnp.asarray(cotangent, jnp.float32))
    # d<out, c>/dx: each expert's rows get c @ w[e]^T; d/dw[e] = x_e^T c_e (zero for empty experts).
    want_x, want_w, start = np.zeros(x.shape), np.zeros(w.shape), 0
    for e, size in enumerate(GROUP_SIZES):
        rows = slice(start, start + size)
        want_x[rows] = cotangent[rows] @ w[e].astype(np.float64).T
        want_w[e] = x[rows].astype(np.float64).T @ cotangent[rows]
        start += size
    np.testing.assert_allclose(np.asarray(grad_x), want_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_w), want_w, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(grad_w)[GROUP_SIZES == 0])


def _numpy_moe(x, ids, weights, w_gate, w_up, w_down):
    """float64 loop over (token, slot) pairs of the routed SwiGLU."""
    x, weights = x.astype(np.float64), weights.astype(np.float64)
    out = np.zeros(x.shape)
    for t in range(x.shape[0]):
        for slot, e in enumerate(ids[t]):
            gate, up = x[t] @ w_gate[e].astype(np.float64), x[t] @ w_up[e].astype(np.float64)
            out[t] += weights[t, slot] * ((gate / (1 + np.exp(-gate)) * up) @ w_down[e].astype(np.float64))
    return out


def test_tiled_moe_experts_values_and_gradients_equal_float64_loop():
    rng = np.random.default_rng(0)
    tokens, d, f, experts, k = 10, 6, 5, 8, 2
    ids = np.stack([rng.choice(experts - 2, size=k, replace=False) for _ in range(tokens)]).astype(np.int32)
    ids[:6, 0] = 3  # a crowded expert; the last two experts get nothing
    ids[ids[:, 1] == 3, 1] = 0
    x = rng.normal(size=(tokens, d)).astype(np.float32)
    weights = rng.uniform(size=(tokens, k)).astype(np.float32)
    w = tuple(rng.normal(size=s).astype(np.float32) / 2 for s in ((experts, d, f), (experts, d, f), (experts, f, d)))
    fn = lambda x, weights, *w: moe.moe_experts(x, jnp.asarray(ids), weights, *w, grouped_matmul="tiled")
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(x, weights, *w)), _numpy_moe(x, ids, weights, *w),
                               rtol=1e-5, atol=1e-5)

    # Gradients of a random projection, against central differences of the float64 loop in every input.
    cotangent = rng.normal(size=(tokens, d))
    grads = jax.grad(lambda *a: jnp.sum(fn(*a) * cotangent), argnums=range(5))(x, weights, *w)
    inputs = [a.astype(np.float64) for a in (x, weights, *w)]
    step = 1e-6
    for index, (grad, value) in enumerate(zip(grads, inputs)):
        want = np.zeros(value.shape)
        for flat in range(value.size):
            shifted = [a.copy() for a in inputs]
            shifted[index].flat[flat] += step
            plus = np.sum(_numpy_moe(shifted[0], ids, *shifted[1:]) * cotangent)
            shifted[index].flat[flat] -= 2 * step
            minus = np.sum(_numpy_moe(shifted[0], ids, *shifted[1:]) * cotangent)
            want.flat[flat] = (plus - minus) / (2 * step)
        np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-4, err_msg=f"input {index}")
        if index >= 2:  # expert weights: the idle experts get exactly zero
            assert not np.any(np.asarray(grad)[experts - 2:])


def test_bad_tiled_arguments_raise_clear_errors():
    x, w = jnp.zeros((4, 3)), jnp.zeros((2, 3, 5))
    with pytest.raises(ValueError, match="group_sizes has shape"):
        moe.tiled_grouped_matmul(x, w, jnp.array([4]))
    with pytest.raises(ValueError, match="tile=0"):
        moe.tiled_grouped_matmul(x, w, jnp.array([2, 2]), tile=0)
    ids = jnp.zeros((4, 1), jnp.int32)
    with pytest.raises(ValueError, match="grouped_matmul='dense'"):
        moe.moe_experts(x, ids, jnp.ones((4, 1)), w, w, jnp.zeros((2, 5, 3)), grouped_matmul="dense")
