"""The KV-cache sampler against full (cache-free) forward passes of the same model, computed in float64 numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopd.model import ModelConfig, Transformer
from jaxopd.distill import sampling
from jaxopd.distill.sampling import Sampler, cache_buckets, filter_logits, left_pad, sequence_layout

PAD, EOS = 0, 2
PROMPTS = [[1, 5, 6, 13, 7], [1, 9], [1, 7, 15, 4]]


@pytest.fixture(scope="module")
def model_and_params():
    config = ModelConfig(vocab_size=17, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
    model = Transformer(config)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    # Sharpen the random model so greedy choices are well separated and EOS does occur.
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 and x.shape[-1] == config.vocab_size else x, params)
    return model, params


def full_logits(model, params, layout):
    """float64 logits of a cache-free forward pass over prompt + completion rows."""
    logits = model.apply({"params": params}, layout["tokens"], segment_ids=layout["segment_ids"],
                         positions=layout["positions"])
    return np.asarray(logits, np.float64)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_sampled_logprobs_equal_full_forward_log_softmax(model_and_params):
    model, params = model_and_params
    prompts, lengths = left_pad(PROMPTS, 6, PAD)
    sampler = Sampler(model, 6, 5, (EOS,), PAD)
    out = sampler(params, prompts, lengths, jax.random.key(3), temperature=1.0)
    layout = sequence_layout(jnp.asarray(prompts), jnp.asarray(lengths), out)
    reference = log_softmax(full_logits(model, params, layout))
    targets, mask = np.asarray(layout["targets"]), np.asarray(layout["loss_mask"])
    expected = np.take_along_axis(reference, targets[..., None], -1)[..., 0] * mask
    assert mask.sum() >= 9  # at least three tokens per row were compared
    np.testing.assert_allclose(np.asarray(layout["target_sampler_logprobs"]), expected, atol=2e-5)


def test_tempered_top_k_logprobs_are_those_of_the_filtered_distribution(model_and_params):
    model, params = model_and_params
    prompts, lengths = left_pad(PROMPTS, 6, PAD)
    out = Sampler(model, 6, 4, (EOS,), PAD)(params, prompts, lengths, jax.random.key(4), temperature=0.7, top_k=3)
    layout = sequence_layout(jnp.asarray(prompts), jnp.asarray(lengths), out)
    logits = full_logits(model, params, layout) / 0.7
    kth = np.sort(logits, -1)[..., -3][..., None]
    reference = log_softmax(np.where(logits >= kth, logits, -np.inf))
    targets, mask = np.asarray(layout["targets"]), np.asarray(layout["loss_mask"]) > 0
    expected = np.take_along_axis(reference, targets[..., None], -1)[..., 0]
    assert np.isfinite(expected[mask]).all()  # every sampled token was inside its top 3
    np.testing.assert_allclose(np.asarray(layout["target_sampler_logprobs"])[mask], expected[mask], atol=2e-5)


@pytest.mark.parametrize("first_bucket", [64, 2])  # one cache for all 6 steps; a cache grown 2 -> 4 -> 6
def test_greedy_equals_argmax_loop_without_cache_and_ignores_left_padding(model_and_params, first_bucket,
                                                                          monkeypatch):
    monkeypatch.setattr(sampling, "FIRST_CACHE_BUCKET", first_bucket)
    model, params = model_and_params
    new = 6
    prompts, lengths = left_pad(PROMPTS, 7, PAD)
    out = Sampler(model, 7, new, (EOS,), PAD)(params, prompts, lengths, jax.random.key(0), greedy=True)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    width = 7 + new
    # One right-padded row per call (padding has segment id 0), so the reference forward compiles once.
    forward = jax.jit(lambda row, segments: model.apply({"params": params}, row, segment_ids=segments))
    for row, prompt in enumerate(PROMPTS):
        sequence, expected = list(prompt), []
        while len(expected) < new and (not expected or expected[-1] != EOS):
            padded = np.asarray([sequence + [PAD] * (width - len(sequence))], np.int32)
            logits = forward(padded, (np.arange(width) < len(sequence)).astype(np.int32)[None])
            expected.append(int(np.argmax(np.asarray(logits[0, len(sequence) - 1], np.float64))))
            sequence.append(expected[-1])
        assert tokens[row, :len(expected)].tolist() == expected
        assert mask[row].tolist() == [1.0] * len(expected) + [0.0] * (new - len(expected))
        assert (tokens[row, len(expected):] == PAD).all()
    shortest = PROMPTS[1]  # the most left padding in the batch; alone it has none
    alone = Sampler(model, len(shortest), new, (EOS,), PAD)(
        params, np.asarray([shortest], np.int32), np.asarray([len(shortest)], np.int32), jax.random.key(0), greedy=True)
    assert np.asarray(alone.tokens)[0].tolist() == tokens[1].tolist()


def test_stop_token_ends_each_row_and_lengths_count_it(model_and_params):
    model, params = model_and_params
    prompts, lengths = left_pad(PROMPTS * 4, 6, PAD)
    out = Sampler(model, 6, 8, (EOS, 11), PAD)(params, prompts, lengths, jax.random.key(5), temperature=1.5)
    tokens, mask, out_lengths = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.lengths)
    stopped = 0
    for row in range(tokens.shape[0]):
        n = int(out_lengths[row])
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert not np.isin(tokens[row, :n - 1], [EOS, 11]).any()  # no stop token before the last kept one
        if n < 8:
            assert tokens[row, n - 1] in (EOS, 11) and (tokens[row, n:] == PAD).all()
            stopped += 1
    assert stopped > 0


def test_filter_logits_top_p_keeps_the_smallest_set_reaching_p():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 12)) * 2
    top_p = 0.7
    filtered = np.asarray(filter_logits(jnp.asarray(logits, jnp.float32), top_p=top_p))
    for row in range(logits.shape[0]):
        probs = np.exp(logits[row] - logits[row].max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        needed = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)  # brute force: smallest prefix >= top_p
        assert set(np.flatnonzero(np.isfinite(filtered[row]))) == set(order[:needed].tolist())


def test_bad_options_raise_before_compiling(model_and_params):
    model, params = model_and_params
    prompts, lengths = left_pad(PROMPTS, 6, PAD)
    sampler = Sampler(model, 6, 2, (EOS,), PAD)
    with pytest.raises(ValueError, match="temperature"):
        sampler(params, prompts, lengths, jax.random.key(0), temperature=0.0)
    with pytest.raises(ValueError, match="max_prompt_len"):
        left_pad([[1] * 7], 6, PAD)


def test_unrolled_model_samples_what_the_scanned_one_does(model_and_params):
    """The fixture's model is scanned (the default scan_layers): the sampler's prefill and decode steps run over the
    stacked cache (one per stack of layers); unrolled, with the same params one layer each, it samples the same."""
    from jaxopd.model.stacking import unstack_layers

    model, params = model_and_params
    assert model.config.scan_layers
    unrolled = Transformer(model.config.replace(scan_layers=False))
    prompts, lengths = left_pad(PROMPTS, 6, PAD)
    outs = [Sampler(m, 6, 5, (EOS,), PAD)(p, prompts, lengths, jax.random.key(3), temperature=1.0)
            for m, p in ((model, params), (unrolled, unstack_layers(model.config, dict(params))))]
    np.testing.assert_array_equal(outs[1].tokens, outs[0].tokens)
    np.testing.assert_allclose(outs[1].logprobs, outs[0].logprobs, atol=1e-6)


def test_a_growing_cache_samples_what_a_whole_one_does(model_and_params, monkeypatch):
    """The decode cache grows in buckets (2, 4, 8, 11 new slots here); tokens and log-probs are those of a cache
    holding all 11 from the start, rows that stop early included."""
    model, params = model_and_params
    prompts, lengths = left_pad(PROMPTS * 3, 6, PAD)
    outputs = []
    for first_bucket in (64, 2):
        monkeypatch.setattr(sampling, "FIRST_CACHE_BUCKET", first_bucket)
        outputs.append(Sampler(model, 6, 11, (EOS,), PAD)(params, prompts, lengths, jax.random.key(8), temperature=1.5))
    assert cache_buckets(11) == [2, 4, 8, 11]
    whole, grown = outputs
    np.testing.assert_array_equal(grown.tokens, whole.tokens)
    np.testing.assert_array_equal(grown.mask, whole.mask)
    np.testing.assert_allclose(grown.logprobs, whole.logprobs, atol=1e-5)
    assert 0 < np.asarray(whole.lengths).min() < 11 == np.asarray(whole.lengths).max()  # some stop, some run out
