"""The attention mask rule against a per-pair loop, and the masked softmax's zeros."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.kernels.masks import attention_mask, masked_softmax


@pytest.mark.parametrize("sliding_window", [None, 2])
def test_attention_mask_matches_the_rule_pair_by_pair(sliding_window):
    # Row 0: two packed documents then padding (q = kv). Row 1: two new tokens against a cache with empty slots.
    q_segment_ids = np.array([[1, 1, 2, 2, 0], [1, 1, 0, 0, 0]], np.int32)
    q_positions = np.array([[0, 1, 0, 1, 0], [3, 4, 0, 0, 0]], np.int32)
    kv_segment_ids = np.array([[1, 1, 2, 2, 0], [0, 1, 1, 1, 0]], np.int32)
    kv_positions = np.array([[0, 1, 0, 1, 0], [0, 0, 1, 2, 0]], np.int32)
    got = np.asarray(attention_mask(*map(jnp.asarray, (q_segment_ids, kv_segment_ids, q_positions, kv_positions)),
                                    sliding_window))
    want = np.zeros((2, 5, 5), bool)
    for b, i, j in np.ndindex(want.shape):
        distance = q_positions[b, i] - kv_positions[b, j]
        want[b, i, j] = (q_segment_ids[b, i] != 0 and q_segment_ids[b, i] == kv_segment_ids[b, j] and distance >= 0
                         and (sliding_window is None or distance < sliding_window))
    np.testing.assert_array_equal(got, want)


def test_masked_softmax_is_zero_on_masked_keys_and_empty_rows():
    logits = jnp.asarray([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    mask = jnp.asarray([[True, False, True], [False, False, False]])
    probs = np.asarray(masked_softmax(logits, mask))
    np.testing.assert_allclose(probs[0], np.exp([1.0, 0.0, 3.0]) * [1, 0, 1] / (np.e + np.e**3), rtol=1e-6)
    assert np.all(probs[1] == 0.0) and probs.dtype == np.float32
