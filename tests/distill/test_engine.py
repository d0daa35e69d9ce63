"""Continuous batching (ContinuousSampler) against the static Sampler, row by row, and against a float64 cache-free
forward pass; per-row budgets; the fixed set of compiled shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.distill.engine import ContinuousSampler
from jaxopd.distill.sampling import Sampler, left_pad, sequence_layout
from jaxopd.model import ModelConfig, Transformer
from jaxopd.training import sharding
from jaxopd.training.config import MeshConfig

PAD, EOS = 0, 2
STOPS = (EOS, 7, 11)  # several stop tokens, so rows of the random model stop at varied steps
MAX_PROMPT, MAX_NEW = 12, 10


def _model(**overrides):
    config = ModelConfig(vocab_size=19, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                         **overrides)
    model = Transformer(config)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    # Sharpen the random model so greedy choices are well separated and EOS does occur at varied steps.
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 and x.shape[-1] == config.vocab_size else x, params)
    return model, params


@pytest.fixture(scope="module")
def gqa():
    return _model()


def _prompts(count, seed=0):
    rng = np.random.default_rng(seed)
    rows = [[1] + rng.integers(3, 19, size=rng.integers(0, MAX_PROMPT)).tolist() for _ in range(count)]
    return left_pad(rows, MAX_PROMPT, PAD)


def _pair(model, slots, **kwargs):
    static = Sampler(model, MAX_PROMPT, MAX_NEW, STOPS, PAD, **kwargs)
    engine = ContinuousSampler(model, MAX_PROMPT, MAX_NEW, STOPS, PAD, slots=slots, **kwargs)
    return static, engine


def _assert_same(a, b):
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
    np.testing.assert_array_equal(np.asarray(a.lengths), np.asarray(b.lengths))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=2e-5)


@pytest.mark.parametrize("slots", [1, 4])
def test_greedy_rows_equal_the_static_sampler(gqa, slots):
    model, params = gqa
    prompts, lengths = _prompts(13)
    static, engine = _pair(model, slots)
    # Greedy rows of the random model rarely stop: budgets make them finish at varied steps, so slots refill.
    budgets = np.random.default_rng(0).integers(1, MAX_NEW + 1, size=13).astype(np.int32)
    expected = static(params, prompts, lengths, jax.random.key(0), greedy=True, budgets=budgets)
    got = engine(params, prompts, lengths, jax.random.key(0), greedy=True, budgets=budgets)
    _assert_same(expected, got)
    assert len(set(np.asarray(expected.lengths).tolist())) > 3


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.8, top_k=5), dict(top_p=0.9)])
def test_sampled_rows_equal_the_static_sampler_under_the_same_keys(gqa, options):
    model, params = gqa
    prompts, lengths = _prompts(11, seed=1)
    static, engine = _pair(model, 4)
    expected = static(params, prompts, lengths, jax.random.key(7), **options)
    _assert_same(expected, engine(params, prompts, lengths, jax.random.key(7), **options))


def test_logprobs_equal_a_float64_forward_pass(gqa):
    model, params = gqa
    prompts, lengths = _prompts(9, seed=2)
    out = ContinuousSampler(model, MAX_PROMPT, MAX_NEW, STOPS, PAD, slots=2)(params, prompts, lengths,
                                                                              jax.random.key(3))
    layout = sequence_layout(jnp.asarray(prompts), jnp.asarray(lengths), out)
    logits = np.asarray(model.apply({"params": params}, layout["tokens"], segment_ids=layout["segment_ids"],
                                    positions=layout["positions"]), np.float64)
    logits -= logits.max(-1, keepdims=True)
    reference = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets, mask = np.asarray(layout["targets"]), np.asarray(layout["loss_mask"])
    expected = np.take_along_axis(reference, targets[..., None], -1)[..., 0] * mask
    assert mask.sum() >= 2 * 9
    np.testing.assert_allclose(np.asarray(layout["target_sampler_logprobs"]), expected, atol=2e-5)


def test_per_row_budgets_stop_rows_in_both_samplers(gqa):
    model, params = gqa
    prompts, lengths = _prompts(10, seed=3)
    budgets = np.array([1, 10, 3, 7, 2, 10, 5, 1, 9, 4], np.int32)
    static, engine = _pair(model, 3)
    expected = static(params, prompts, lengths, jax.random.key(1), budgets=budgets)
    got = engine(params, prompts, lengths, jax.random.key(1), budgets=budgets)
    _assert_same(expected, got)
    assert (np.asarray(got.lengths) <= budgets).all() and (np.asarray(got.lengths) == budgets).any()
    with pytest.raises(ValueError, match="budgets must lie in"):
        engine(params, prompts, lengths, jax.random.key(1), budgets=budgets * 2)


@pytest.mark.parametrize("overrides", [dict(scan_layers=False), dict(attention="mla", q_lora_rank=None, kv_lora_rank=16,
                                                                         qk_nope_head_dim=8, qk_rope_head_dim=8,
                                                                         v_head_dim=8, num_experts=4,
                                                                         num_experts_per_token=2, moe_mlp_dim=16,
                                                                         first_k_dense=1)],
                         ids=["unrolled", "mla-moe"])
@pytest.mark.slow
def test_other_models_equal_the_static_sampler(overrides):
    model, params = _model(**overrides)
    prompts, lengths = _prompts(7, seed=4)
    static, engine = _pair(model, 3)
    _assert_same(static(params, prompts, lengths, jax.random.key(2)),
                 engine(params, prompts, lengths, jax.random.key(2)))


def test_a_run_compiles_only_bucketed_shapes(gqa):
    model, params = gqa
    engine = ContinuousSampler(model, MAX_PROMPT, MAX_NEW, STOPS, PAD, slots=8)
    for count, seed in ((5, 0), (13, 1), (21, 2), (8, 3)):
        prompts, lengths = _prompts(count, seed)
        engine(params, prompts, lengths, jax.random.key(seed))
    shapes = engine.compiled_shapes
    inserts = [(rows, columns) for kind, rows, columns in shapes if kind == "insert"]
    assert [s for s in shapes if s[0] == "decode"] == [("decode", 8, 0)]
    # Rows in {1, 2, 4, 8}, prompt columns in {1, 2, 4, 8, 12}: at most 20 insert programs whatever the batches.
    assert all(rows in (1, 2, 4, 8) and columns in (1, 2, 4, 8, 12) for rows, columns in inserts), inserts
    # Nothing else compiled: the programs never see a call's batch size.
    assert engine._insert._cache_size() == len(inserts) and engine._decode._cache_size() == 1


@pytest.mark.slow
def test_on_a_mesh_the_rows_equal_one_device(gqa):
    from jax.sharding import NamedSharding, PartitionSpec

    model, params = gqa
    prompts, lengths = _prompts(16, seed=5)
    expected = ContinuousSampler(model, MAX_PROMPT, MAX_NEW, STOPS, PAD, slots=8)(params, prompts, lengths,
                                                                                   jax.random.key(4))
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2), jax.devices()[:4])  # the trainer's mesh
    rows = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
    with jax.set_mesh(mesh):
        got = ContinuousSampler(model, MAX_PROMPT, MAX_NEW, STOPS, PAD, slots=8)(
            params, jax.device_put(prompts, rows), jax.device_put(lengths, rows), jax.random.key(4))
        with pytest.raises(ValueError, match="slots=6 do not split over the 4 shards"):
            ContinuousSampler(model, MAX_PROMPT, MAX_NEW, STOPS, PAD, slots=6)(
                params, jax.device_put(prompts, rows), jax.device_put(lengths, rows), jax.random.key(4))
    _assert_same(expected, got)
    assert got.tokens.sharding.is_equivalent_to(rows, 2)
