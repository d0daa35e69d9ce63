"""Blockwise (online-softmax) attention and the splash route vs float64 numpy; gradients vs the "xla" path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.kernels.attention import attention, mla_naive


def _reference(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, scale, sliding_window=None):
    """Dense float64 numpy attention with the mask written out from the rule; rows with no visible key are 0."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    distance = q_positions[:, :, None] - kv_positions[:, None, :]
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (q_segment_ids[:, :, None] > 0)
    mask &= (distance >= 0) & (distance < (np.inf if sliding_window is None else sliding_window))
    logits = np.einsum("bthd,bshd->bhts", q, k) * scale
    logits = np.where(mask[:, None], logits, -np.inf)
    row_max = np.max(logits, axis=-1, keepdims=True)
    weights = np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0))
    weights /= np.maximum(weights.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhts,bshv->bthv", weights, v)


def _packed_batch(lengths_per_row, seq_len):
    """Segment ids 1..k per document with positions restarting at 0, then padding (segment 0)."""
    segment_ids = np.zeros((len(lengths_per_row), seq_len), np.int32)
    positions = np.zeros_like(segment_ids)
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for doc, n in enumerate(lengths, 1):
            segment_ids[row, start:start + n], positions[row, start:start + n] = doc, np.arange(n)
            start += n
    return segment_ids, positions


def _random(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _run(implementation, q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, **kwargs):
    """Output and the gradients of a random projection of it, for q, k, v."""
    projection = jnp.asarray(np.random.default_rng(99).standard_normal((q.shape[0], q.shape[1], q.shape[2],
                                                                          v.shape[-1])), jnp.float32)
    masks = dict(q_segment_ids=jnp.asarray(q_segment_ids), kv_segment_ids=jnp.asarray(kv_segment_ids),
                 q_positions=jnp.asarray(q_positions), kv_positions=jnp.asarray(kv_positions))

    def loss(q, k, v):
        out = attention(q, k, v, **masks, implementation=implementation, **kwargs)
        return jnp.sum(out.astype(jnp.float32) * projection), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        *(jnp.asarray(a) for a in (q, k, v)))
    return out, grads


# Two rows: three documents then padding; one document of 30 then padding. 37 is not a multiple of any block below.
SEGMENT_IDS, POSITIONS = _packed_batch([(10, 15, 5), (30,)], 37)


@pytest.mark.parametrize("kv_heads,sliding_window,block_q,block_kv", [
    (2, None, 8, 16), (1, None, 16, 8), (4, 4, 8, 8), (2, 6, 64, 64),
], ids=["gqa", "mqa-tall-tiles", "window", "one-tile"])
def test_blockwise_matches_float64_and_xla_gradients_on_packed_documents(kv_heads, sliding_window, block_q, block_kv):
    rng = np.random.default_rng(kv_heads)
    q, k, v = _random(rng, 2, 37, 4, 8), _random(rng, 2, 37, kv_heads, 8), _random(rng, 2, 37, kv_heads, 5)
    args = (q, k, v, SEGMENT_IDS, SEGMENT_IDS, POSITIONS, POSITIONS)
    out, grads = _run("blockwise", *args, scale=0.4, sliding_window=sliding_window, block_q=block_q,
                      block_kv=block_kv)
    assert out.shape == (2, 37, 4, 5) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), _reference(*args, 0.4, sliding_window), rtol=1e-5, atol=1e-5)
    _, xla_grads = _run("xla", *args, scale=0.4, sliding_window=sliding_window)
    for name, got, want in zip("qkv", grads, xla_grads):
        assert np.abs(np.asarray(want)).max() > 0.1, "the projection must give non-trivial gradients"
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_decode_chunk_against_cache_with_offsets():
    """Three new queries per row at positions after a prefix, against a cache whose tail slots are empty
    (segment 0); the two rows have different offsets, and row 1's last query is padding."""
    rng = np.random.default_rng(5)
    cache_len, chunk, prefix = 40, 3, (20, 31)
    kv_segment_ids, kv_positions = _packed_batch([(n + chunk,) for n in prefix], cache_len)
    q_positions = np.array([np.arange(n, n + chunk) for n in prefix], np.int32)
    q_segment_ids = np.array([[1, 1, 1], [1, 1, 0]], np.int32)
    q, k, v = _random(rng, 2, chunk, 4, 8), _random(rng, 2, cache_len, 2, 8), _random(rng, 2, cache_len, 2, 8)
    args = (q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
    out, grads = _run("blockwise", *args, scale=0.35, block_q=2, block_kv=16)
    np.testing.assert_allclose(np.asarray(out), _reference(*args, 0.35), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[1, 2] == 0.0)
    _, xla_grads = _run("xla", *args, scale=0.35)
    for got, want in zip(grads, xla_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_fully_padded_rows_are_zero_with_finite_zero_gradients():
    rng = np.random.default_rng(6)
    segment_ids, positions = _packed_batch([(7, 6), ()], 21)  # row 1 is all padding
    q, k, v = _random(rng, 2, 21, 2, 8), _random(rng, 2, 21, 2, 8), _random(rng, 2, 21, 2, 8)
    out, grads = _run("blockwise", q, k, v, segment_ids, segment_ids, positions, positions, scale=0.3, block_q=4,
                      block_kv=8)
    out = np.asarray(out)
    assert np.all(out[1] == 0.0) and np.all(out[0, 13:] == 0.0) and np.abs(out[0, :13]).min() > 0
    for grad in map(np.asarray, grads):
        assert np.isfinite(grad).all()
        assert np.all(grad[1] == 0.0) and np.all(grad[0, 13:] == 0.0), "padding must get no gradient"


def test_bfloat16_inputs_keep_dtype_and_match_xla():
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(_random(rng, 2, 37, 4, 8), jnp.bfloat16) for _ in range(3))
    args = (q, k, v, SEGMENT_IDS, SEGMENT_IDS, POSITIONS, POSITIONS)
    out, grads = _run("blockwise", *args, scale=0.3, block_q=8, block_kv=8)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    np.testing.assert_allclose(np.asarray(out, np.float64), _reference(*args, 0.3), atol=3e-2)
    _, xla_grads = _run("xla", *args, scale=0.3)
    for got, want in zip(grads, xla_grads):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.abs(got - want).max() <= 0.03 * np.abs(want).max()


def test_fully_masked_tiles_are_skipped_not_read():
    """NaN values in the last key block: causality masks them for every query before it, and a tile that was
    computed anyway would turn them into NaN (0 * NaN). So finite results there show the tiles were skipped."""
    rng = np.random.default_rng(10)
    segment_ids, positions = _packed_batch([(32,)], 32)
    q, k, v = _random(rng, 1, 32, 2, 8), _random(rng, 1, 32, 2, 8), _random(rng, 1, 32, 2, 8)
    v[:, 24:] = np.nan
    out, grads = _run("blockwise", q, k, v, segment_ids, segment_ids, positions, positions, scale=0.3, block_q=8,
                      block_kv=8)
    expected = _reference(q, k, np.nan_to_num(v), segment_ids, segment_ids, positions, positions, 0.3)
    np.testing.assert_allclose(np.asarray(out)[:, :24], expected[:, :24], rtol=1e-5, atol=1e-5)
    assert np.isnan(np.asarray(out)[:, 24:]).all()
    # dq of the early queries and dv of the early keys only involve skipped tiles besides finite ones (dk does not:
    # the late queries' NaN output reaches every key they see).
    assert np.isfinite(np.asarray(grads[0])[:, :24]).all() and np.isfinite(np.asarray(grads[2])[:, :24]).all()


def test_mla_naive_blockwise_equals_xla():
    rng = np.random.default_rng(8)
    heads, nope, rope, rank, v_dim = 3, 8, 4, 10, 6
    inputs = dict(q_nope=_random(rng, 2, 37, heads, nope), q_rope=_random(rng, 2, 37, heads, rope),
                  latent=_random(rng, 2, 37, rank), k_rope=_random(rng, 2, 37, rope),
                  w_uk=_random(rng, rank, heads, nope) * 0.5, w_uv=_random(rng, rank, heads, v_dim) * 0.5)
    masks = dict(q_segment_ids=SEGMENT_IDS, kv_segment_ids=SEGMENT_IDS, q_positions=POSITIONS, kv_positions=POSITIONS)
    outs = [np.asarray(mla_naive(**inputs, **masks, scale=(nope + rope) ** -0.5, **kwargs))
            for kwargs in ({}, dict(implementation="blockwise", block_q=8, block_kv=16))]
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def _fwd_bwd_temp_bytes(implementation, seq_len, scanned=False, **kwargs):
    """Temporary bytes of grad(attention) compiled for CPU; `scanned`: as two layers of a lax.scan (what
    model.scan_layers builds), each layer's attention over its own q, k, v."""
    ids, positions = jnp.ones((1, seq_len), jnp.int32), jnp.arange(seq_len)[None]
    shape = jax.ShapeDtypeStruct(((2,) if scanned else ()) + (1, seq_len, 1, 16), jnp.float32)

    def attend(q, k, v):
        return attention(q, k, v, q_segment_ids=ids, kv_segment_ids=ids, q_positions=positions,
                         kv_positions=positions, scale=0.25, implementation=implementation, **kwargs)

    def loss(q, k, v):
        if not scanned:
            return jnp.sum(attend(q, k, v))
        total, _ = jax.lax.scan(lambda carry, qkv: (carry + jnp.sum(attend(*qkv)), None), 0.0, (q, k, v))
        return total

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("scanned", [False, True])
def test_forward_backward_never_holds_a_seq_by_seq_array(scanned):
    # Scanned, the forward's tiles were once all kept as scan residuals ([q blocks, key blocks, tile] float32: the
    # whole [t, s] logits again), though the backward recomputes them.
    seq_len = 2048
    logits_bytes = seq_len * seq_len * 4
    assert _fwd_bwd_temp_bytes("xla", seq_len, scanned) >= logits_bytes  # the measure sees [t, s] when it is there
    layers = 2 if scanned else 1  # measured: 0.96 MB unscanned, 2.4 MB for the two scanned layers (42.8 MB before)
    assert _fwd_bwd_temp_bytes("blockwise", seq_len, scanned, block_q=128, block_kv=128) < layers * logits_bytes / 8


def test_batch_sharded_over_devices_communicates_once():
    """With the batch split over 8 devices, the skip decisions must not all-reduce once per tile inside the loops:
    the compiled gradient holds a single all-reduce (of the [q_blocks, kv_blocks] visibility table)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    shape = jax.ShapeDtypeStruct((8, 64, 2, 8), jnp.float32, sharding=rows)
    ids = jax.ShapeDtypeStruct((8, 64), jnp.int32, sharding=rows)

    def loss(q, k, v, segment_ids, positions):
        return jnp.sum(attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, q_positions=positions,
                                 kv_positions=positions, scale=0.3, implementation="blockwise", block_q=16,
                                 block_kv=16))

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape, ids, ids).compile().as_text()
    all_reduces = [line for line in hlo.splitlines() if " all-reduce(" in line or " all-reduce-start(" in line]
    assert len(all_reduces) == 1 and "pred[4,4]" in all_reduces[0], all_reduces


def test_splash_route_in_interpret_mode_matches_float64_and_xla_gradients():
    """Pallas splash attention run by the Pallas interpreter on CPU: packed documents, GQA, a sliding window, a
    length (200) padded up to its 128-wide tiles."""
    rng = np.random.default_rng(9)
    segment_ids, positions = _packed_batch([(90, 60, 20), (200,)], 200)
    q, k, v = _random(rng, 2, 200, 4, 8), _random(rng, 2, 200, 2, 8), _random(rng, 2, 200, 2, 4)
    args = (q, k, v, segment_ids, segment_ids, positions, positions)
    out, grads = _run("splash", *args, scale=0.3, sliding_window=50, block_q=128, block_kv=128)
    np.testing.assert_allclose(np.asarray(out), _reference(*args, 0.3, 50), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[0, 170:] == 0.0)
    _, xla_grads = _run("xla", *args, scale=0.3, sliding_window=50)
    for got, want in zip(grads, xla_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_bad_blocks_and_splash_decode_raise_clear_errors():
    x, ids = jnp.zeros((1, 8, 2, 4)), jnp.ones((1, 8), jnp.int32)
    kwargs = dict(q_segment_ids=ids, kv_segment_ids=ids, q_positions=ids, kv_positions=ids, scale=1.0)
    with pytest.raises(ValueError, match="block_kv=0"):
        attention(x, x, x, implementation="blockwise", block_kv=0, **kwargs)
    with pytest.raises(ValueError, match="multiples of 128"):
        attention(x, x, x, implementation="splash", block_q=64, **kwargs)
    with pytest.raises(ValueError, match="q_len == kv_len"):
        attention(x[:, :1], x, x, implementation="splash", **{**kwargs, "q_segment_ids": ids[:, :1],
                                                               "q_positions": ids[:, :1]})
