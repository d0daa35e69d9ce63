"""Tests for jaxopd/kernels/moe.py against numpy float64 loops, hand-built cases and transformers' routers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.kernels import moe
from jaxopd.kernels.layers import LowRank

TOKENS, D, F, E, K = 12, 8, 6, 8, 3


def _expert_weights(seed, num_experts=E, d=D, f=F):
    rng = np.random.default_rng(seed)
    shapes = ((num_experts, d, f), (num_experts, d, f), (num_experts, f, d))
    return [rng.normal(size=s).astype(np.float32) / np.sqrt(s[1]) for s in shapes]


def _distinct_ids(rng, tokens, num_experts, k):
    return np.stack([rng.choice(num_experts, size=k, replace=False) for _ in range(tokens)]).astype(np.int32)


def _numpy_moe(x, ids, weights, w_gate, w_up, w_down):
    x, weights, w_gate, w_up, w_down = (np.asarray(a, np.float64) for a in (x, weights, w_gate, w_up, w_down))
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = ids[t, slot]
            gate = x[t] @ w_gate[e]
            hidden = gate / (1.0 + np.exp(-gate)) * (x[t] @ w_up[e])
            out[t] += weights[t, slot] * (hidden @ w_down[e])
    return out


def _jax_dense_moe(x, ids, weights, w_gate, w_up, w_down):
    """Per-(token, slot) gather of the expert matrices: the obvious reference for gradients."""
    gate_TxKxF = jnp.einsum("td,tkdf->tkf", x, w_gate[ids])
    up_TxKxF = jnp.einsum("td,tkdf->tkf", x, w_up[ids])
    out_TxKxD = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(gate_TxKxF) * up_TxKxF, w_down[ids])
    return jnp.einsum("tkd,tk->td", out_TxKxD, weights)


def test_moe_experts_equals_float64_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(TOKENS, D)).astype(np.float32)
    ids = _distinct_ids(rng, TOKENS, E, K)
    ids[:, 0] = 5  # a crowded expert, and (with E=8, 12 tokens) likely some idle ones
    ids[ids[:, 1] == 5, 1] = 0
    ids[ids[:, 2] == 5, 2] = 1
    weights = rng.uniform(size=(TOKENS, K)).astype(np.float32)
    w = _expert_weights(1)
    got = jax.jit(moe.moe_experts)(x, ids, weights, *w)
    np.testing.assert_allclose(np.asarray(got), _numpy_moe(x, ids, weights, *w), rtol=1e-5, atol=1e-5)


def test_moe_experts_gradients_match_dense_reference():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(TOKENS, D)).astype(np.float32)
    ids = _distinct_ids(rng, TOKENS, E, K)
    weights = rng.uniform(size=(TOKENS, K)).astype(np.float32)
    w = _expert_weights(3)
    probe = rng.normal(size=(TOKENS, D)).astype(np.float32)

    def loss(fn, x, weights, *w):
        return jnp.sum(fn(x, ids, weights, *w) * probe)

    argnums = (0, 1, 2, 3, 4)
    got = jax.jit(jax.grad(lambda *a: loss(moe.moe_experts, *a), argnums=argnums))(x, weights, *w)
    want = jax.grad(lambda *a: loss(_jax_dense_moe, *a), argnums=argnums)(x, weights, *w)
    for name, g, r in zip(("x", "weights", "w_gate", "w_up", "w_down"), got, want):
        assert np.abs(np.asarray(r)).max() > 0, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5, err_msg=name)


def test_moe_experts_keeps_bfloat16_inputs_close_to_float32():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(TOKENS, D)).astype(np.float32)
    ids = _distinct_ids(rng, TOKENS, E, K)
    weights = rng.uniform(size=(TOKENS, K)).astype(np.float32)
    w = _expert_weights(5)
    got = moe.moe_experts(jnp.asarray(x, jnp.bfloat16), ids, weights, *(jnp.asarray(a, jnp.bfloat16) for a in w))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), _numpy_moe(x, ids, weights, *w), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(
    "mesh_shape, token_axes",
    [((2, 4), ("data", "expert")), ((2, 4), ("data",)), ((1, 8), ("expert",))],
    ids=["tokens-over-data-and-expert", "tokens-over-data-only", "expert-8"],
)
def test_expert_parallel_equals_single_device(mesh_shape, token_axes):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS for 8 CPU devices)")
    mesh = jax.make_mesh(mesh_shape, ("data", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rng = np.random.default_rng(12)
    tokens = 16
    x = rng.normal(size=(tokens, D)).astype(np.float32)
    ids = _distinct_ids(rng, tokens, E, K)
    weights = rng.uniform(size=(tokens, K)).astype(np.float32)
    w = _expert_weights(13)
    probe = rng.normal(size=(tokens, D)).astype(np.float32)

    def loss(fn, *args):
        out = fn(args[0], ids, *args[1:])
        return jnp.sum(out * probe), out

    parallel = lambda x, ids, *a: moe.moe_experts_expert_parallel(x, ids, *a, mesh=mesh, token_axes=token_axes)
    argnums = (0, 1, 2, 3, 4)
    grads, out = jax.jit(jax.grad(lambda *a: loss(parallel, *a), argnums=argnums, has_aux=True))(x, weights, *w)
    want_grads, _ = jax.grad(lambda *a: loss(moe.moe_experts, *a), argnums=argnums, has_aux=True)(x, weights, *w)
    np.testing.assert_allclose(np.asarray(out), _numpy_moe(x, ids, weights, *w), rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5, err_msg=name)


def _logit(p):
    p = np.asarray(p, np.float64)
    return np.log(p / (1 - p)).astype(np.float32)


def test_group_limited_sigmoid_skips_best_expert_in_masked_group():
    # 4 groups of 2. Group top-2 sums: g0 = 0.95+0.05 = 1.0, g1 = 1.18, g2 = 1.12, g3 = 0.2; keep g1, g2.
    # Expert 0 has the best single score but lies in the dropped group g0.
    scores = np.array([[0.95, 0.05, 0.60, 0.58, 0.56, 0.56, 0.1, 0.1]])
    ids, weights, _ = moe.route(_logit(scores), top_k=2, num_groups=4, topk_groups=2, scale=2.0)
    assert sorted(np.asarray(ids)[0].tolist()) == [2, 3]
    order = np.argsort(np.asarray(ids)[0])
    np.testing.assert_allclose(np.asarray(weights)[0][order], 2.0 * np.array([0.60, 0.58]) / 1.18, rtol=1e-6)
    # Without groups expert 0 wins.
    ids_flat, _, _ = moe.route(_logit(scores), top_k=2)
    assert sorted(np.asarray(ids_flat)[0].tolist()) == [0, 2]


def test_group_score_is_top2_sum_for_sigmoid_and_max_for_softmax():
    # Group 0 holds the single best expert, group 1 the best pair: the two rules disagree on the same logits.
    logits = np.array([[3.0, 0.0, 2.5, 2.4]], np.float32)
    sigmoid_ids, _, _ = moe.route(logits, top_k=1, num_groups=2, topk_groups=1, score="sigmoid")
    softmax_ids, _, _ = moe.route(logits, top_k=1, num_groups=2, topk_groups=1, score="softmax")
    assert np.asarray(sigmoid_ids).tolist() == [[2]]
    assert np.asarray(softmax_ids).tolist() == [[0]]


def test_bias_changes_selection_but_not_weights_and_gets_no_gradient():
    scores = np.array([[0.9, 0.8, 0.3, 0.2], [0.1, 0.7, 0.6, 0.5]])
    bias = np.array([0.0, 0.0, 0.0, 0.7], np.float32)
    ids, weights, got_scores = moe.route(_logit(scores), bias, top_k=2, normalize=False)
    assert np.sort(np.asarray(ids), axis=1).tolist() == [[0, 3], [1, 3]]
    np.testing.assert_allclose(np.asarray(got_scores), scores, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(weights), np.take_along_axis(scores, np.asarray(ids), 1), rtol=1e-6)

    bias_grad = jax.grad(lambda b: moe.route(_logit(scores), b, top_k=2)[1].sum())(bias)
    np.testing.assert_array_equal(np.asarray(bias_grad), 0.0)


def test_normalization_and_scale():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(5, 8)).astype(np.float32)
    for score in ("sigmoid", "softmax"):
        ids, weights, scores = moe.route(logits, top_k=3, score=score, scale=2.5)
        picked = np.take_along_axis(np.asarray(scores, np.float64), np.asarray(ids), 1)
        np.testing.assert_allclose(np.asarray(weights), 2.5 * picked / picked.sum(1, keepdims=True), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(weights).sum(1), 2.5, rtol=1e-6)
        # The chosen experts are the k best scores.
        np.testing.assert_array_equal(np.sort(picked, 1)[:, ::-1], -np.sort(-np.asarray(scores), 1)[:, :3])


def test_router_gradient_reaches_logits():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(4, 8)).astype(np.float32)
    probe = rng.normal(size=(4, 2)).astype(np.float32)
    grad = jax.grad(lambda l: (moe.route(l, top_k=2, normalize=False)[1] * probe).sum())(logits)
    ids = np.asarray(moe.route(logits, top_k=2)[0])
    s = 1 / (1 + np.exp(-logits.astype(np.float64)))
    want = np.zeros_like(s)
    np.put_along_axis(want, ids, probe * np.take_along_axis(s * (1 - s), ids, 1), 1)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-7)


# --- parity with transformers' routers (PyTorch, float32) ---


def _sorted_by_expert(ids, weights):
    order = np.argsort(ids, axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(weights, order, 1)


def _compare_router(router, hidden, bias=None, **route_kwargs):
    import torch

    with torch.no_grad():
        logits, ref_weights, ref_ids = router(torch.from_numpy(hidden))
    ids, weights, _ = moe.route(logits.numpy(), bias, **route_kwargs)
    ref_ids, ref_weights = _sorted_by_expert(ref_ids.numpy(), ref_weights.float().numpy())
    ids, weights = _sorted_by_expert(np.asarray(ids), np.asarray(weights))
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(weights, ref_weights, rtol=1e-5, atol=1e-7)


def test_sigmoid_routing_matches_transformers_deepseek_v3_router():
    torch = pytest.importorskip("torch")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    torch.manual_seed(0)
    config = DeepseekV3Config(
        hidden_size=16, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True,
    )
    router = DeepseekV3TopkRouter(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    router.e_score_correction_bias.copy_(torch.randn(16) * 0.3)
    hidden = np.random.default_rng(8).normal(size=(64, 16)).astype(np.float32)
    kwargs = dict(top_k=4, score="sigmoid", num_groups=4, topk_groups=2, normalize=True, scale=2.5)
    _compare_router(router, hidden, router.e_score_correction_bias.numpy(), **kwargs)


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_softmax_routing_matches_transformers_deepseek_v2_router(topk_method):
    torch = pytest.importorskip("torch")
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    torch.manual_seed(1)
    config = DeepseekV2Config(
        hidden_size=16, num_attention_heads=2, n_routed_experts=16, num_experts_per_tok=3, n_group=4, topk_group=2,
        topk_method=topk_method, routed_scaling_factor=1.5,
    )
    router = DeepseekV2TopkRouter(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    hidden = np.random.default_rng(9).normal(size=(64, 16)).astype(np.float32)
    groups = dict(num_groups=4, topk_groups=2) if topk_method == "group_limited_greedy" else {}
    _compare_router(router, hidden, top_k=3, score="softmax", normalize=False, scale=1.5, **groups)


def test_softmax_routing_matches_transformers_qwen2_moe_router():
    torch = pytest.importorskip("torch")
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    torch.manual_seed(2)
    config = Qwen2MoeConfig(hidden_size=16, num_experts=12, num_experts_per_tok=4, norm_topk_prob=True)
    router = Qwen2MoeTopKRouter(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    hidden = np.random.default_rng(10).normal(size=(64, 16)).astype(np.float32)
    _compare_router(router, hidden, top_k=4, score="softmax", normalize=True)


# --- load accounting and balancing ---


def test_expert_load_counts_slots_and_skips_padding():
    ids = np.array([[[0, 1], [1, 2], [3, 3]], [[2, 1], [0, 0], [0, 0]]], np.int32)  # [batch=2, seq=3, k=2]
    mask = np.array([[1, 1, 1], [1, 0, 0]])
    load = moe.expert_load(ids, 4, mask)
    np.testing.assert_allclose(np.asarray(load), np.array([1, 3, 2, 2]) / 8)
    np.testing.assert_allclose(np.asarray(moe.expert_load(ids, 4)), np.array([5, 3, 2, 2]) / 12)
    np.testing.assert_array_equal(np.asarray(moe.expert_load(ids, 4, np.zeros((2, 3)))), 0.0)


def test_update_balance_bias_moves_toward_mean_load():
    bias = np.array([0.1, 0.0, -0.2, 0.0], np.float32)
    load = np.array([0.4, 0.25, 0.1, 0.25], np.float32)
    got = moe.update_balance_bias(bias, load, 0.01)
    np.testing.assert_allclose(np.asarray(got), [0.09, 0.0, -0.19, 0.0], rtol=1e-6)


def _numpy_sequence_loss(scores, ids, segment_ids):
    num_experts, k = scores.shape[-1], ids.shape[-1]
    losses = []
    for b in range(scores.shape[0]):
        for seg in sorted(set(segment_ids[b].tolist()) - {0}):
            tokens = np.nonzero(segment_ids[b] == seg)[0]
            s = scores[b, tokens].astype(np.float64)
            counts = np.array([(ids[b, tokens] == i).any(-1).sum() for i in range(num_experts)])
            f = num_experts / (k * len(tokens)) * counts
            p = (s / s.sum(-1, keepdims=True)).mean(0)
            losses.append((f * p).sum())
    return np.mean(losses)


def test_sequence_balance_loss_equals_numpy_formula():
    rng = np.random.default_rng(11)
    batch, seq, k = 3, 10, 2
    logits = rng.normal(size=(batch, seq, E)).astype(np.float32)
    ids, _, scores = moe.route(logits, top_k=k)
    segment_ids = np.array([[1] * 4 + [2] * 5 + [0], [1] * 10, [1, 1, 2, 3, 3, 3, 0, 0, 0, 0]], np.int32)
    scores, ids = np.asarray(scores), np.asarray(ids)
    got = moe.sequence_balance_loss(scores, ids, segment_ids)
    np.testing.assert_allclose(float(got), _numpy_sequence_loss(scores, ids, segment_ids), rtol=1e-5)
    got_rows = moe.sequence_balance_loss(scores, ids)
    rows_want = _numpy_sequence_loss(scores, ids, np.ones((batch, seq), int))
    np.testing.assert_allclose(float(got_rows), rows_want, rtol=1e-5)
    # Padding may hold zero scores without poisoning the gradient.
    zeroed = scores.copy()
    zeroed[segment_ids == 0] = 0.0
    grad = jax.grad(lambda s: moe.sequence_balance_loss(s, ids, segment_ids))(zeroed)
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0


def test_sequence_balance_loss_is_one_when_perfectly_balanced():
    # Every expert chosen equally often and uniform scores: f_i = 1, P_i = 1/E, loss = 1 (eqs. 18-20).
    ids = np.arange(E, dtype=np.int32).reshape(1, E // 2, 2)
    scores = np.full((1, E // 2, E), 0.3, np.float32)
    np.testing.assert_allclose(float(moe.sequence_balance_loss(scores, ids)), 1.0, rtol=1e-6)


def test_bad_arguments_raise_clear_errors():
    logits = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="score="):
        moe.route(logits, top_k=2, score="relu")
    with pytest.raises(ValueError, match="num_groups=3"):
        moe.route(logits, top_k=2, num_groups=3)
    with pytest.raises(ValueError, match="top_k=5"):
        moe.route(logits, top_k=5, num_groups=4, topk_groups=2)
    with pytest.raises(ValueError, match="bias"):
        moe.route(logits, np.zeros(7, np.float32), top_k=2)
    w = _expert_weights(0)
    mesh = jax.make_mesh((1, 1), ("data", "expert"), devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="expert_axis='experts'"):
        moe.moe_experts_expert_parallel(np.zeros((4, D), np.float32), np.zeros((4, 2), np.int32),
                                        np.zeros((4, 2)), *w, mesh=mesh, expert_axis="experts")
    with pytest.raises(ValueError, match="expert weights"):
        moe.moe_experts(np.zeros((4, D + 1), np.float32), np.zeros((4, 2), np.int32), np.zeros((4, 2)), *w)


def _expert_updates(seed, tokens, rank=2, with_keep=True):
    """Per-expert LoRA updates of (w_gate, w_up, w_down) with random a, b and inverted-dropout keep masks."""
    rng = np.random.default_rng(seed)
    updates = []
    for d_in, d_out in ((D, F), (D, F), (F, D)):
        keep = (rng.random((tokens, K, d_in)) > 0.3) / 0.7 if with_keep else None
        updates.append(LowRank(rng.normal(size=(E, d_in, rank)).astype(np.float32),
                               rng.normal(size=(E, rank, d_out)).astype(np.float32) / 2,
                               None if keep is None else keep.astype(np.float32)))
    return tuple(updates)


def _numpy_lora_moe(x, ids, weights, w, updates):
    x, weights = np.asarray(x, np.float64), np.asarray(weights, np.float64)
    out = np.zeros_like(x)

    def project(t, slot, e, v, weight, update):
        keep = 1.0 if update.keep is None else update.keep[t, slot]
        return v @ weight[e] + ((keep * v) @ update.a[e].astype(np.float64)) @ update.b[e].astype(np.float64)

    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            e = ids[t, slot]
            gate = project(t, slot, e, x[t], w[0].astype(np.float64), updates[0])
            hidden = gate / (1.0 + np.exp(-gate)) * project(t, slot, e, x[t], w[1].astype(np.float64), updates[1])
            out[t] += weights[t, slot] * project(t, slot, e, hidden, w[2].astype(np.float64), updates[2])
    return out


def test_moe_experts_lora_updates_equal_float64_loop():
    rng = np.random.default_rng(20)
    x = rng.normal(size=(TOKENS, D)).astype(np.float32)
    ids = _distinct_ids(rng, TOKENS, E, K)
    weights = rng.uniform(size=(TOKENS, K)).astype(np.float32)
    w, updates = _expert_weights(21), _expert_updates(22, TOKENS)
    got = jax.jit(moe.moe_experts)(x, ids, weights, *w, updates)
    want = _numpy_lora_moe(x, ids, weights, w, updates)
    assert np.abs(want - _numpy_moe(x, ids, weights, *w)).max() > 0.1  # the updates matter
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_expert_parallel_lora_updates_and_their_gradients_equal_single_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS for 8 CPU devices)")
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rng = np.random.default_rng(23)
    tokens = 16
    x = rng.normal(size=(tokens, D)).astype(np.float32)
    ids = _distinct_ids(rng, tokens, E, K)
    weights = rng.uniform(size=(tokens, K)).astype(np.float32)
    w, updates = _expert_weights(24), _expert_updates(25, tokens)
    probe = rng.normal(size=(tokens, D)).astype(np.float32)

    def loss(fn, updates):
        return jnp.sum(fn(x, ids, weights, *w, updates) * probe)

    parallel = lambda *a: moe.moe_experts_expert_parallel(*a, mesh=mesh, token_axes=("data", "expert"))
    got = jax.jit(jax.grad(lambda u: loss(parallel, u)))(updates)
    want = jax.grad(lambda u: loss(moe.moe_experts, u))(updates)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        # The gradients reach a few hundred: float32 sums in another order differ by ~1e-7 of the largest entry,
        # which is more than 1e-4 of an entry near zero.
        r = np.asarray(r)
        np.testing.assert_allclose(np.asarray(g), r, rtol=1e-4, atol=1e-6 * np.abs(r).max())
    out = jax.jit(parallel)(x, ids, weights, *w, updates)
    np.testing.assert_allclose(np.asarray(out), _numpy_lora_moe(x, ids, weights, w, updates), rtol=1e-5, atol=1e-5)
