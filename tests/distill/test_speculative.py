"""MTP self-speculative decoding: the accept/reject rule against a brute-force enumeration (float64), its draws
against a chi-square test, and the sampler against the plain greedy sampler, the main model's distribution and an
independent full forward pass."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxopd.distill import sampling, speculative
from jaxopd.distill.sampling import Sampler, filter_logits, left_pad, sequence_layout
from jaxopd.distill.speculative import SpeculativeSampler, acceptance_rate, output_distribution, verify_draft
from jaxopd.model import ModelConfig, Transformer

PAD, EOS = 0, 2
STOPS = (EOS, 11)  # 11: a token greedy rows of this model reach mid-completion
PROMPTS = [[1, 5, 6, 13, 7], [1, 9], [1, 7, 15, 4], [1, 3, 3], [1, 12, 8, 8, 5, 6]]
CONFIG = ModelConfig(vocab_size=17, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                     mtp_depth=1)


def _drafting_params(params):
    """A random model whose MTP module drafts fairly well: its block is the identity (zero output projections) and
    its projection passes the next token's embedding through, plus noise, so it predicts token i + 2 from token
    i + 1 by about the embedding-to-logits map the main model mostly uses (its own blocks scaled down), as a trained
    MTP module roughly does. Drafts are then often, not always, accepted, so both branches of every step run."""
    d = CONFIG.d_model
    params = jax.tree.map(lambda x: x, params)
    mtp = params["mtp_0"]
    noise = jax.random.normal(jax.random.key(5), (2 * d, d)) * 0.5 / np.sqrt(d)
    mtp["projection"] = jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))]) + noise
    mtp["block"]["attention"]["o"] = jnp.zeros_like(mtp["block"]["attention"]["o"])
    mtp["block"]["mlp"]["w_down"] = jnp.zeros_like(mtp["block"]["mlp"]["w_down"])
    for name in ("o", "w_down"):
        group = "attention" if name == "o" else "mlp"
        params["layers"][group][name] = params["layers"][group][name] * 0.3
    # Sharpen the output head (initialized at std 0.02: near-uniform logits) so that greedy choices are well
    # separated, sampled tokens are far from uniform and stop tokens occur.
    params["unembed"] = params["unembed"] * 10.0
    return params


@pytest.fixture(scope="module")
def model_and_params():
    model = Transformer(CONFIG)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    return model, _drafting_params(params)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _chi_square_passes(counts: np.ndarray, probs: np.ndarray, p_value: float = 1e-3) -> bool:
    """Pearson's chi-square goodness of fit of `counts [vocab]` to `probs [vocab]` at level p_value, cells with an
    expected count under 5 pooled into one (the test's usual validity condition)."""
    expected = probs * counts.sum()
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected) ** 2 / expected).sum()
    return statistic < scipy.stats.chi2.ppf(1 - p_value, len(expected) - 1)


def _random_distributions(rng, batch, vocab):
    """float64 p, q `[batch, vocab]` with some exact zeros in each (tokens one side cannot emit, as top-k makes)."""
    p, q = rng.random((2, batch, vocab)) ** 3
    p[:, 0], q[:, 1] = 0.0, 0.0
    q[0] = p[0]  # p == q: nothing is ever rejected and the residual is empty
    return p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)


def test_output_distribution_is_the_target_by_enumeration():
    p, q = _random_distributions(np.random.default_rng(0), 6, 5)
    with jax.enable_x64(True):
        accept = lambda x: np.asarray(speculative.acceptance(jnp.asarray(p), jnp.asarray(q), jnp.full(6, x)))
        residual = np.asarray(speculative.residual(jnp.asarray(p), jnp.asarray(q)))
        closed_form = np.asarray(output_distribution(jnp.asarray(p), jnp.asarray(q)))
    # Enumerate every draft x and both outcomes: accept (emit x) or reject (emit y ~ residual).
    law = np.zeros_like(p)
    for x in range(5):
        drawable = q[:, x] > 0  # acceptance is only ever evaluated at drafts q can propose
        accepted = np.where(drawable, accept(x), 0.0)
        law[:, x] += q[:, x] * accepted
        law += np.where(drawable, q[:, x] * (1 - accepted), 0.0)[:, None] * residual
    np.testing.assert_allclose(law, p, atol=1e-12)
    np.testing.assert_allclose(closed_form, p, atol=1e-12)
    np.testing.assert_allclose(residual.sum(-1), 1.0, atol=1e-12)


def test_verify_draft_draws_pass_chi_square_and_always_accepting_fails():
    vocab, draws = 7, 20000
    p_logits, q_logits = jax.random.normal(jax.random.key(1), (2, 1, vocab)) * 1.5
    q_logits = q_logits.at[0, 3].set(-jnp.inf)  # a token the drafter never proposes
    keys = jax.random.split(jax.random.key(2), (draws, 3))
    q_rows, p_rows = jnp.repeat(q_logits, draws, 0), jnp.repeat(p_logits, draws, 0)
    draft = jax.vmap(jax.random.categorical)(keys[:, 0], q_rows)
    accepted, token = jax.jit(verify_draft)(p_rows, q_rows, draft, keys[:, 1], keys[:, 2])
    counts = np.bincount(np.asarray(token), minlength=vocab)
    p = np.asarray(jax.nn.softmax(p_logits[0]), np.float64)
    assert _chi_square_passes(counts, p)
    assert 0.2 < float(accepted.mean()) < 0.95
    # The test has power: emitting every draft (the distribution q) is rejected.
    assert not _chi_square_passes(np.bincount(np.asarray(draft), minlength=vocab), p)


# One cache for the whole run; a cache grown 2 -> 4 -> 8 -> 13 new slots while rows are 1 or 2 tokens apart.
@pytest.mark.parametrize("first_bucket", [64, 2])
def test_greedy_equals_plain_greedy_row_by_row(model_and_params, first_bucket, monkeypatch):
    monkeypatch.setattr(sampling, "FIRST_CACHE_BUCKET", first_bucket)
    model, params = model_and_params
    prompts, lengths = left_pad(PROMPTS, 6, PAD)
    budgets = np.asarray([12, 3, 12, 12, 12], np.int32)
    plain = Sampler(model, 6, 12, STOPS, PAD)(params, prompts, lengths, jax.random.key(0), greedy=True,
                                              budgets=budgets)
    out = SpeculativeSampler(model, 6, 12, STOPS, PAD)(params, prompts, lengths, jax.random.key(0), greedy=True,
                                                       budgets=budgets)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(plain.tokens))
    np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(plain.mask))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(plain.logprobs), atol=1e-5)
    lengths_out = np.asarray(out.lengths)
    last = np.asarray(out.tokens)[np.arange(len(PROMPTS)), lengths_out - 1]
    ends_on_stop = np.isin(last, STOPS) & (lengths_out > 1) & (lengths_out < budgets)  # a stop in the loop
    assert ends_on_stop.any() and (lengths_out == budgets).any(), out.tokens  # rows stop on stops and budgets
    assert 0 < int(out.accepted.sum()) < int(out.drafted.sum())  # both branches ran
    assert 0 < acceptance_rate(out) < 1


@pytest.mark.parametrize("options, first_bucket", [(dict(temperature=1.0), 64),
                                                   (dict(temperature=0.7, top_k=6, top_p=0.9), 2)])
def test_logprobs_equal_full_forward(model_and_params, options, first_bucket, monkeypatch):
    monkeypatch.setattr(sampling, "FIRST_CACHE_BUCKET", first_bucket)
    model, params = model_and_params
    prompts, lengths = left_pad(PROMPTS, 6, PAD)
    out = SpeculativeSampler(model, 6, 10, (EOS,), PAD)(params, prompts, lengths, jax.random.key(3), **options)
    layout = sequence_layout(jnp.asarray(prompts), jnp.asarray(lengths), out)
    logits = model.apply({"params": params}, layout["tokens"], segment_ids=layout["segment_ids"],
                         positions=layout["positions"])
    batch, seq, vocab = logits.shape
    filtered = filter_logits(logits.reshape(-1, vocab), **options).reshape(batch, seq, vocab)
    reference = _log_softmax(np.asarray(filtered, np.float64))
    targets, mask = np.asarray(layout["targets"]), np.asarray(layout["loss_mask"])
    expected = np.take_along_axis(reference, targets[..., None], -1)[..., 0]
    expected = np.where(mask > 0, expected, 0.0)
    assert mask.sum() >= 3 * len(PROMPTS) and int(out.accepted.sum()) > 0
    np.testing.assert_allclose(np.asarray(layout["target_sampler_logprobs"]), expected, atol=1e-5)


def _completion_marginals(model, params, prompt, options, positions):
    """float64 law `[vocab]` of completion token `position` for each of `positions` under the main model alone
    (after filter_logits), by enumerating every earlier completion token in one batched forward pass."""
    vocab = CONFIG.vocab_size
    laws = []
    for position in positions:
        prefixes = np.asarray(list(itertools.product(range(vocab), repeat=position)), np.int32).reshape(-1, position)
        rows = np.concatenate([np.tile(prompt, (len(prefixes), 1)), prefixes], axis=1)
        logits = model.apply({"params": params}, jnp.asarray(rows))
        log_probs = _log_softmax(np.asarray(filter_logits(
            logits.reshape(-1, vocab), **options).reshape(*rows.shape, vocab), np.float64))
        prefix_log_prob = sum(np.take_along_axis(log_probs[:, len(prompt) - 1 + j], prefixes[:, j:j + 1], -1)[:, 0]
                              for j in range(position))
        laws.append((np.exp(prefix_log_prob)[:, None] * np.exp(log_probs[:, -1])).sum(0))
    return laws


@pytest.mark.slow  # 6000 rows, four compiled samplers: about a minute on 2 loaded cores
@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.8, top_k=8)])
def test_sampled_tokens_are_distributed_as_the_main_model(model_and_params, options, monkeypatch):
    """Completion tokens 1 and 2 of one prompt over many rows (token 1 is always a verified draft or its
    replacement, token 2 a bonus token or the next step's verified draft) against the main model's marginals."""
    model, params = model_and_params
    prompt, draws = np.asarray([1, 5, 6], np.int32), 6000
    prompts = np.tile(prompt, (draws, 1))
    lengths = np.full(draws, len(prompt), np.int32)
    laws = _completion_marginals(model, params, prompt, options, (1, 2))

    def sample():
        # No stop tokens: every row has all three tokens.
        out = SpeculativeSampler(model, len(prompt), 3, (), PAD)(params, prompts, lengths, jax.random.key(7),
                                                                 **options)
        return np.asarray(out.tokens), out

    tokens, out = sample()
    assert 0.1 < acceptance_rate(out) < 0.95
    for column, law in zip((1, 2), laws):
        assert _chi_square_passes(np.bincount(tokens[:, column], minlength=CONFIG.vocab_size), law)
    # The test has power: accepting every draft samples the MTP module's distribution instead, and fails.
    monkeypatch.setattr(speculative, "verify_draft", lambda p, q, draft, *keys: (jnp.ones(draft.shape, bool), draft))
    tokens, _ = sample()
    assert not _chi_square_passes(np.bincount(tokens[:, 1], minlength=CONFIG.vocab_size), laws[0])


def test_model_without_mtp_is_refused():
    model = Transformer(ModelConfig(vocab_size=17, d_model=32, num_layers=1, num_heads=4, head_dim=8, mlp_dim=64))
    with pytest.raises(ValueError, match="mtp_depth=0.*distill.speculative='off'"):
        SpeculativeSampler(model, 6, 4, (EOS,), PAD)
