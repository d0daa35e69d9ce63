"""Long completions: sampling and teacher scoring in row microbatches give the unchunked results, a bfloat16 KV cache
samples close to the float32 one, completions cut at max_new_tokens without a stop token are trained on, and
microbatching shrinks the compiled programs' temporary memory."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd import train
from jaxopd.distill.sampling import Sampler, left_pad, sequence_layout
from jaxopd.distill.teacher import make_scorer
from jaxopd.model import ModelConfig, Transformer, init_cache
from tests.distill.test_distill import config_for

PAD, EOS = 0, 2
CONFIG = ModelConfig(vocab_size=17, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
NEVER = 10**6  # a stop token no model of this vocabulary can emit: every completion runs to max_new_tokens


@pytest.fixture(scope="module")
def model_and_params():
    model = Transformer(CONFIG)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    return model, params


def _prompts(rows, max_prompt_len=6, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [[1] + rng.integers(3, 17, size=rng.integers(1, max_prompt_len)).tolist() for _ in range(rows)]
    return left_pad(prompts, max_prompt_len, PAD)


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.8, top_k=5, top_p=0.9)])
def test_sampling_microbatches_leave_the_sampled_tokens_bitwise_unchanged(model_and_params, options):
    model, params = model_and_params
    prompts, lengths = _prompts(8)
    outputs = [Sampler(model, 6, 12, (EOS,), PAD, microbatch=micro)(params, prompts, lengths, jax.random.key(7),
                                                                    **options) for micro in (0, 2, 4)]
    assert 0 < int(outputs[0].mask.sum()) < outputs[0].mask.size, "some rows stop early, some run on"
    for chunked in outputs[1:]:
        np.testing.assert_array_equal(chunked.tokens, outputs[0].tokens)
        np.testing.assert_array_equal(chunked.mask, outputs[0].mask)
        np.testing.assert_allclose(chunked.logprobs, outputs[0].logprobs, rtol=1e-5, atol=1e-6)
    # Per-row randomness: a row's completion does not depend on the rows beside it.
    alone = Sampler(model, 6, 12, (EOS,), PAD)(params, prompts[:4], lengths[:4], jax.random.key(7), **options)
    np.testing.assert_array_equal(alone.tokens, outputs[0].tokens[:4])


def test_sampling_microbatch_must_divide_the_rows(model_and_params):
    model, params = model_and_params
    prompts, lengths = _prompts(6)
    with pytest.raises(ValueError, match="distill.sampling_microbatch"):
        Sampler(model, 6, 4, (EOS,), PAD, microbatch=4)(params, prompts, lengths, jax.random.key(0))


def test_teacher_scoring_microbatches_equal_one_pass(model_and_params):
    model, params = model_and_params
    prompts, lengths = _prompts(8)
    layout = sequence_layout(jnp.asarray(prompts), jnp.asarray(lengths),
                             Sampler(model, 6, 10, (EOS,), PAD)(params, prompts, lengths, jax.random.key(1)))
    kwargs = dict(return_hidden=True, top_k=3, temperature=1.2)
    whole = make_scorer(model, 4, **kwargs)(params, layout)
    chunked = make_scorer(model, 4, microbatch=2, **kwargs)(params, layout)
    assert set(whole) == {"logprobs", "hidden", "topk_ids", "topk_logprobs", "tail_logprob"}
    np.testing.assert_array_equal(chunked["topk_ids"], whole["topk_ids"])
    for key in ("logprobs", "hidden", "topk_logprobs", "tail_logprob"):
        np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_bfloat16_kv_cache_samples_close_to_the_float32_cache(model_and_params):
    model, params = model_and_params
    assert init_cache(CONFIG, 1, 4, "auto")["layers"][0]["k"].dtype == jnp.float32  # auto = the model's dtype
    assert init_cache(CONFIG.replace(dtype="bfloat16"), 1, 4, "auto")["layers"][0]["k"].dtype == jnp.bfloat16
    prompts, lengths = _prompts(8)
    f32, bf16 = (Sampler(model, 6, 16, (NEVER,), PAD, cache_dtype=dtype)(params, prompts, lengths,
                                                                         jax.random.key(3))
                 for dtype in ("float32", "bfloat16"))
    assert not np.array_equal(f32.logprobs, bf16.logprobs), "the bfloat16 cache must actually be used"
    # Compare each row up to its first differing token (after it the two continue from different prefixes).
    same_prefix = np.cumprod(np.asarray(f32.tokens) == np.asarray(bf16.tokens), axis=1).astype(bool)
    assert same_prefix.mean() > 0.5
    np.testing.assert_allclose(np.asarray(bf16.logprobs)[same_prefix], np.asarray(f32.logprobs)[same_prefix],
                               atol=5e-2)


def test_completions_cut_at_max_new_tokens_are_trained_on(model_and_params):
    model, params = model_and_params
    prompts, lengths = _prompts(16, max_prompt_len=8)
    new = 5
    out = Sampler(model, 8, new, (NEVER,), PAD)(params, prompts, lengths, jax.random.key(2))
    np.testing.assert_array_equal(out.lengths, new)  # no stop token: every row cut at max_new_tokens
    layout = sequence_layout(jnp.asarray(prompts), jnp.asarray(lengths), out)
    # Column 7 (the prompt's last) predicts the first completion token, column 7 + new - 1 the last one.
    expected = np.zeros((16, 8 + new))
    expected[:, 7:7 + new] = 1
    np.testing.assert_array_equal(layout["loss_mask"], expected)
    layout.update(teacher_logprobs=layout["target_sampler_logprobs"] - 1.0,
                  task_advantages=jnp.zeros_like(layout["loss_mask"]))
    config = config_for("reverse_kl", **{"distill.kl_baseline": False})
    objective = train.OBJECTIVES["reverse_kl"].objective
    totals = objective.totals(jax.tree.map(lambda x: x[None], layout), config)
    grad = lambda batch: jax.grad(lambda p: objective.loss(model, p, batch, totals, config)[0])(params)
    # The last token of a cut completion moves the gradient like any other completion token.
    last = 7 + new - 1
    moved = {**layout, "teacher_logprobs": layout["teacher_logprobs"].at[:, last].add(-3.0)}
    difference = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), grad(moved), grad(layout))
    assert max(jax.tree.leaves(difference)) > 1e-3


def test_row_microbatches_shrink_the_compiled_temporary_memory(model_and_params):
    model, params = model_and_params
    rows, new = 16, 64
    prompts, lengths = (jnp.asarray(x) for x in _prompts(rows))

    def temp_bytes(sampler):
        budgets = jnp.full(rows, new, jnp.int32)
        return sampler._jitted.lower(params, prompts, lengths, budgets, jax.random.key(0), temperature=1.0, top_k=None,
                                     top_p=None, greedy=False).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = (temp_bytes(Sampler(model, 6, new, (EOS,), PAD, microbatch=micro)) for micro in (0, 2))
    cache_bytes = 2 * CONFIG.num_layers * rows * (6 + new) * CONFIG.kv_heads * CONFIG.gqa_head_dim * 4
    assert whole > cache_bytes > chunked, (whole, cache_bytes, chunked)
