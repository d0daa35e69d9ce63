"""All-to-all expert parallelism (jaxopd.kernels.moe.moe_experts_all_to_all) on the 8-device CPU mesh against the
single-device moe_experts (values and gradients) and numpy float64 loops (capacity drops)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.kernels import moe
from jaxopd.kernels.layers import LowRank

D, F, E, K = 8, 6, 16, 3
AUTO = jax.sharding.AxisType.Auto

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)")


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AUTO,) * len(shape), devices=jax.devices()[:8])


def _weights(rng):
    shapes = ((E, D, F), (E, D, F), (E, F, D))
    return [rng.normal(size=s).astype(np.float32) / np.sqrt(s[1]) for s in shapes]


def _ragged_ids(rng, tokens):
    """Distinct experts per token from [0, 14): with 2 experts per shard on 8 shards the last shard receives
    nothing; expert 3 is never chosen either; expert 0 takes every token's first slot (a crowded expert)."""
    allowed = np.array([e for e in range(E - 2) if e not in (0, 3)])
    rest = np.stack([rng.choice(allowed, size=K - 1, replace=False) for _ in range(tokens)])
    return np.concatenate([np.zeros((tokens, 1), int), rest], axis=1).astype(np.int32)


def _numpy_moe(x, ids, weights, w, kept=None):
    x, weights = np.asarray(x, np.float64), np.asarray(weights, np.float64)
    w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in w)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            if kept is not None and not kept[t, slot]:
                continue
            e = ids[t, slot]
            gate = x[t] @ w_gate[e]
            out[t] += weights[t, slot] * ((gate / (1 + np.exp(-gate)) * (x[t] @ w_up[e])) @ w_down[e])
    return out


MESHES = [((8,), ("expert",), ("expert",)), ((2, 4), ("fsdp", "expert"), ("fsdp", "expert")),
          ((2, 4), ("expert", "tensor"), ("expert",))]
MESH_IDS = ["expert8", "fsdp2-expert4", "expert2-tensor4-replicated"]


@pytest.mark.parametrize("mesh_shape, names, token_axes", MESHES, ids=MESH_IDS)
@pytest.mark.parametrize("exchange", ["all_to_all", "ragged_emulated"])
def test_all_to_all_values_and_gradients_equal_single_device(mesh_shape, names, token_axes, exchange, monkeypatch):
    if exchange == "ragged_emulated":
        # XLA:CPU lacks ragged-all-to-all: run the ragged exchange's offsets through the documented semantics.
        monkeypatch.setattr(jax.lax, "ragged_all_to_all", _ragged_all_to_all_by_gather)
    mesh = _mesh(mesh_shape, names)
    rng = np.random.default_rng(0)
    tokens = 32
    x = rng.normal(size=(tokens, D)).astype(np.float32)
    ids = _ragged_ids(rng, tokens)
    weights = rng.uniform(size=(tokens, K)).astype(np.float32)
    w = _weights(rng)
    probe = rng.normal(size=(tokens, D)).astype(np.float32)
    kind = "ragged_all_to_all" if exchange == "ragged_emulated" else exchange

    def loss(fn, x, weights, *w):
        out = fn(x, ids, weights, *w)
        return jnp.sum(out * probe), out

    def parallel(*args):
        out, dropped = moe.moe_experts_all_to_all(*args, mesh=mesh, token_axes=token_axes, exchange=kind)
        return out + 0 * dropped  # dropped must be 0; kept in the graph so it is computed

    argnums = (0, 1, 2, 3, 4)
    grads, out = jax.jit(jax.grad(lambda *a: loss(parallel, *a), argnums=argnums, has_aux=True))(x, weights, *w)
    want, _ = jax.grad(lambda *a: loss(moe.moe_experts, *a), argnums=argnums, has_aux=True)(x, weights, *w)
    np.testing.assert_allclose(np.asarray(out), _numpy_moe(x, ids, weights, w), rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads, want):
        assert np.abs(np.asarray(r)).max() > 0, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5, err_msg=name)
    _, dropped = jax.jit(lambda *a: moe.moe_experts_all_to_all(*a, mesh=mesh, token_axes=token_axes,
                                                               exchange=kind))(x, ids, weights, *w)
    assert int(dropped) == 0


def _ragged_all_to_all_by_gather(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                 axis_name):
    """jax.lax.ragged_all_to_all as its docstring defines it, from all-gathers (one slice per peer): sender i's
    rows [input_offsets[j], + send_sizes[j]) land at rows [output_offsets[j], ...) of peer j's output."""
    me = jax.lax.axis_index(axis_name)
    gathered = [jax.lax.all_gather(a, axis_name) for a in (operand, input_offsets, send_sizes, output_offsets)]
    all_operands, all_in, all_send, all_out = gathered
    rows = jnp.arange(output.shape[0])
    for sender in range(all_operands.shape[0]):
        start, size, land = all_in[sender, me], all_send[sender, me], all_out[sender, me]
        here = (rows >= land) & (rows < land + size)
        source = jnp.clip(start + rows - land, 0, operand.shape[0] - 1)
        mask = here.reshape(here.shape + (1,) * (operand.ndim - 1))
        output = jnp.where(mask, all_operands[sender][source], output)
    return output


def test_capacity_drops_the_pairs_past_each_block_and_counts_them():
    mesh = _mesh((2, 4), ("fsdp", "expert"))
    rng = np.random.default_rng(1)
    tokens = 32  # 4 per device, 12 pairs; capacity 1.0 -> C = 3 rows per peer block
    x = rng.normal(size=(tokens, D)).astype(np.float32)
    ids = _ragged_ids(rng, tokens)
    weights = rng.uniform(size=(tokens, K)).astype(np.float32)
    w = _weights(rng)
    out, dropped = jax.jit(lambda *a: moe.moe_experts_all_to_all(*a, mesh=mesh, capacity_factor=1.0))(
        x, ids, weights, *w)

    # Brute force: per device (4 consecutive tokens), per peer (expert // 4), its pairs in (expert, pair) order;
    # the first 3 are kept.
    kept = np.zeros(ids.shape, bool)
    for device in range(8):
        pairs = [(ids[t, u], t * K + u, t, u) for t in range(4 * device, 4 * device + 4) for u in range(K)]
        for peer in range(4):
            for _, _, t, u in sorted(p for p in pairs if p[0] // 4 == peer)[:3]:
                kept[t, u] = True
    assert 0 < (~kept).sum() < kept.size
    assert int(dropped) == (~kept).sum()
    np.testing.assert_allclose(np.asarray(out), _numpy_moe(x, ids, weights, w, kept), rtol=1e-5, atol=1e-5)


def test_lora_updates_and_their_gradients_equal_single_device():
    mesh = _mesh((2, 4), ("fsdp", "expert"))
    rng = np.random.default_rng(2)
    tokens = 16
    x = rng.normal(size=(tokens, D)).astype(np.float32)
    ids = _ragged_ids(rng, tokens)
    weights = rng.uniform(size=(tokens, K)).astype(np.float32)
    w = _weights(rng)
    updates = tuple(LowRank(rng.normal(size=(E, i, 2)).astype(np.float32),
                            rng.normal(size=(E, 2, o)).astype(np.float32) / 2,
                            ((rng.random((tokens, K, i)) > 0.3) / 0.7).astype(np.float32))
                    for i, o in ((D, F), (D, F), (F, D)))
    probe = rng.normal(size=(tokens, D)).astype(np.float32)

    def loss(fn, x, updates):
        return jnp.sum(fn(x, ids, weights, *w, updates) * probe)

    parallel = lambda *a: moe.moe_experts_all_to_all(*a, mesh=mesh)[0]
    got = jax.jit(jax.grad(lambda *a: loss(parallel, *a), argnums=(0, 1)))(x, updates)
    want = jax.grad(lambda *a: loss(moe.moe_experts, *a), argnums=(0, 1))(x, updates)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)
    out = jax.jit(parallel)(x, ids, weights, *w, updates)
    want_out = moe.moe_experts(x, ids, weights, *w, updates)
    assert np.abs(np.asarray(want_out) - _numpy_moe(x, ids, weights, w)).max() > 0.1  # the updates matter
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
    mesh = _mesh((2, 4), ("fsdp", "expert"))
    args = (np.zeros((8, D), np.float32), np.zeros((8, K), np.int32), np.zeros((8, K), np.float32), *_weights(
        np.random.default_rng(0)))
    with pytest.raises(ValueError, match="token_axes"):
        moe.moe_experts_all_to_all(*args, mesh=mesh, token_axes=("fsdp",))
    with pytest.raises(ValueError, match="capacity_factor=0"):
        moe.moe_experts_all_to_all(*args, mesh=mesh, capacity_factor=0)
    with pytest.raises(ValueError, match="exchange='ragged'"):
        moe.moe_experts_all_to_all(*args, mesh=mesh, exchange="ragged")
