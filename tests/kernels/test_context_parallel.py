"""Context-parallel attention (sequence split over a mesh axis, keys/values all-gathered) on the 8-device CPU mesh, at
8K tokens with several documents per row: values equal float64 attention computed document by document, gradients
equal single-device attention's; GQA and MLA. The single-device side runs blockwise whatever the split side runs
(xla's [8K, 8K] logits per head would dominate the test; blockwise == xla is test_blockwise_attention.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from jaxopd.kernels.attention import attention, mla_naive
from jaxopd.kernels.context_parallel import context_parallel_attention, context_parallel_mla

# Per row length, two rows of documents: their boundaries fall inside the devices' blocks (len / 8 or len / 4 tokens)
# and across them; row 0 ends in padding. 8K is the size (slow on 2 CPU cores); 1K runs the same cases fast.
DOCUMENTS = {8192: ([3000, 2500, 1692], [100, 4000, 4092]), 1024: ([300, 250, 300], [10, 500, 514])}
SLOW = pytest.mark.slow


def _packed(seq):
    segment_ids = np.zeros((2, seq), np.int32)
    positions = np.zeros((2, seq), np.int32)
    for row, lengths in enumerate(DOCUMENTS[seq]):
        start = 0
        for doc, length in enumerate(lengths, start=1):
            segment_ids[row, start:start + length] = doc
            positions[row, start:start + length] = np.arange(length)
            start += length
    return segment_ids, positions


def _documents_float64(q, k, v, segment_ids, positions, scale, sliding_window=None):
    """Causal attention of each document alone, in float64 (GQA: query head h reads kv head h // groups); zero on
    padding. Independent of the packed mask rule: it never sees another document."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for row in range(q.shape[0]):
        for doc in set(segment_ids[row].tolist()) - {0}:
            where = np.flatnonzero(segment_ids[row] == doc)
            k_doc, v_doc = (np.repeat(a[row, where], groups, axis=1) for a in (k, v))
            logits = np.matmul(q[row, where].transpose(1, 0, 2), k_doc.transpose(1, 2, 0)) * scale
            distance = positions[row, where][:, None] - positions[row, where][None, :]
            visible = distance >= 0
            if sliding_window is not None:
                visible &= distance < sliding_window
            logits = np.where(visible, logits, -np.inf)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[row, where] = np.matmul(probs, v_doc.transpose(1, 0, 2)).transpose(1, 0, 2)
    return out


def _mesh(data, context):
    return jax.make_mesh((data, context), ("data", "context"), axis_types=(AxisType.Auto,) * 2)


def _grads(fn, args, cotangent):
    """fn(*args) and the gradient of <fn(*args), cotangent> w.r.t. every arg, jitted."""
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent)  # noqa: E731
    return jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums=tuple(range(len(a))))(*a)))(*args)


def _assert_close(got, expected, tol):
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=tol, atol=tol * np.abs(np.asarray(e)).max())


# At 8K tokens the blockwise local kernel only: the "xla" one's float32 logits of a device's queries against the whole
# row made its 8K case the suite's slowest kernel test (55 s) for the same gather and masks the 1024 case checks.
@pytest.mark.parametrize("seq, implementation, mesh_shape, sliding_window", [
    (1024, "xla", (1, 8), None), (1024, "blockwise", (2, 4), None), (1024, "blockwise", (1, 8), 70),
    pytest.param(8192, "blockwise", (1, 8), None, marks=SLOW), pytest.param(8192, "blockwise", (2, 4), 700, marks=SLOW),
])
def test_gqa_equals_single_device_in_values_and_gradients(seq, implementation, mesh_shape, sliding_window):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, seq, heads, 8)), jnp.float32) for heads in (4, 2, 2))
    cotangent = jnp.asarray(rng.standard_normal((2, seq, 4, 8)), jnp.float32)
    segment_ids, positions = map(jnp.asarray, _packed(seq))
    block = seq // 16  # blocks smaller than a device's share, so the blockwise loops run several tiles each
    kwargs = dict(scale=0.25, sliding_window=sliding_window, implementation=implementation, block_q=block,
                  block_kv=block)
    mesh = _mesh(*mesh_shape)

    def split(q, k, v):
        return context_parallel_attention(q, k, v, segment_ids=segment_ids, positions=positions, mesh=mesh, **kwargs)

    def whole(q, k, v):
        return attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, q_positions=positions,
                         kv_positions=positions, **{**kwargs, "implementation": "blockwise"})

    with jax.set_mesh(mesh):
        out, grads = _grads(split, (q, k, v), cotangent)
    assert out.sharding.spec[1] == "context"  # the output stays split like the queries
    expected_out, expected_grads = _grads(whole, (q, k, v), cotangent)
    reference = _documents_float64(q, k, v, *_packed(seq), 0.25, sliding_window)
    np.testing.assert_allclose(np.asarray(out), reference, atol=1e-5)
    _assert_close(grads, expected_grads, 1e-5)


@pytest.mark.parametrize("seq, implementation", [(1024, "xla"), (1024, "blockwise"),
                                                 pytest.param(8192, "blockwise", marks=SLOW)])
def test_mla_gathering_the_latent_equals_single_device_in_values_and_gradients(seq, implementation):
    rng = np.random.default_rng(1)
    heads, nope, rope, rank, v_dim = 2, 8, 4, 16, 12
    shapes = [(2, seq, heads, nope), (2, seq, heads, rope), (2, seq, rank), (2, seq, rope), (rank, heads, nope),
              (rank, heads, v_dim)]
    args = tuple(jnp.asarray(0.5 * rng.standard_normal(shape), jnp.float32) for shape in shapes)
    cotangent = jnp.asarray(rng.standard_normal((2, seq, heads, v_dim)), jnp.float32)
    segment_ids, positions = map(jnp.asarray, _packed(seq))
    kwargs = dict(scale=(nope + rope) ** -0.5, implementation=implementation, block_q=seq // 16, block_kv=seq // 16)
    mesh = _mesh(2, 4)

    def split(*args):
        return context_parallel_mla(*args, segment_ids=segment_ids, positions=positions, mesh=mesh, **kwargs)

    def whole(*args):
        return mla_naive(*args, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, q_positions=positions,
                         kv_positions=positions, **{**kwargs, "implementation": "blockwise"})

    with jax.set_mesh(mesh):
        out, grads = _grads(split, args, cotangent)
    expected_out, expected_grads = _grads(whole, args, cotangent)
    q_nope, q_rope, latent, k_rope, w_uk, w_uv = (np.asarray(a, np.float64) for a in args)
    keys = np.concatenate([np.einsum("bsc,chn->bshn", latent, w_uk),
                           np.broadcast_to(k_rope[:, :, None], (2, seq, heads, rope))], -1)
    reference = _documents_float64(np.concatenate([q_nope, q_rope], -1), keys, np.einsum("bsc,cho->bsho", latent, w_uv),
                                   *_packed(seq), kwargs["scale"])
    np.testing.assert_allclose(np.asarray(out), reference, atol=1e-5)
    # The weights' gradients too: replicated over the context axis, each device's part is summed.
    _assert_close(grads, expected_grads, 1e-5)


def test_bad_inputs_name_the_fix():
    mesh = _mesh(1, 8)
    ones = jnp.ones((1, 1020), jnp.int32)
    q = jnp.zeros((1, 1020, 2, 8))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"sequence length=1020 is not divisible .*context=8"):
        context_parallel_attention(q, q, q, segment_ids=ones, positions=ones, scale=1.0, mesh=mesh)
    with pytest.raises(ValueError, match=r"implementation='splash' does not run context-parallel"):
        context_parallel_attention(q, q, q, segment_ids=ones, positions=ones, scale=1.0, mesh=mesh,
                                   implementation="splash")
    with pytest.raises(ValueError, match=r"axis 'seq'.*the mesh has axes \('data', 'context'\)"):
        context_parallel_attention(q, q, q, segment_ids=ones, positions=ones, scale=1.0, mesh=mesh, axis="seq")
