"""rms_norm and swiglu vs float64 numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.kernels.layers import rms_norm, swiglu


def test_rms_norm_matches_numpy_and_keeps_dtype():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 8)) * 3.0
    scale = rng.standard_normal(8)
    expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-5) * scale
    out = rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(scale, jnp.float32), 1e-5)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)
    out_bf16 = rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(scale, jnp.float32), 1e-5)
    assert out_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out_bf16, np.float64), expected, rtol=2e-2, atol=2e-2)
    # eps matters for near-zero rows: the output stays finite and small.
    zeros = rms_norm(jnp.zeros((1, 8)), jnp.ones(8), 1e-6)
    assert np.all(np.asarray(zeros) == 0)


def test_swiglu_matches_numpy():
    rng = np.random.default_rng(1)
    d, f = 6, 10
    x = rng.standard_normal((3, 4, d))
    w_gate, w_up, w_down = rng.standard_normal((d, f)), rng.standard_normal((d, f)), rng.standard_normal((f, d))
    gate = x @ w_gate
    expected = (gate / (1 + np.exp(-gate)) * (x @ w_up)) @ w_down
    out = swiglu(*(jnp.asarray(a, jnp.float32) for a in (x, w_gate, w_up, w_down)))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="scale"):
        rms_norm(jnp.zeros((2, 8)), jnp.ones(4))
    with pytest.raises(ValueError, match="w_down"):
        swiglu(jnp.zeros((2, 4)), jnp.zeros((4, 6)), jnp.zeros((4, 6)), jnp.zeros((4, 6)))
