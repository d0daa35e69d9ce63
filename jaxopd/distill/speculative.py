"""MTP self-speculative decoding: the model's MTP module (depth 1) drafts one token, the main model verifies it in
the same 2-position decode pass that computes the token after it, and speculative (rejection) sampling keeps the
sampled distribution exactly the main model's (Leviathan et al. 2023, Chen et al. 2023).

    sampler = SpeculativeSampler(model, max_prompt_len=16, max_new_tokens=8, stop_tokens=(eos_id,), pad_id=pad_id)
    out = sampler(params, prompts, lengths, rng, temperature=1.0)       # as Sampler; out.drafted, out.accepted

One step per row, with x its last emitted token (not yet in the cache, at slot s) and d the draft for the token after
it, drawn from the MTP distribution q:
  1. verify: the main model decodes [x, d] at slots [s, s + 1] -> p0 (the token after x) and p1 (the token after d);
  2. accept d with probability min(1, p0(d) / q(d)); if accepted, also emit a bonus token from p1; if rejected, emit
     a token from normalize(max(0, p0 - q)) instead (`verify_draft`). Either way each emitted token is distributed as
     the main model's p (`output_distribution` is that law in closed form);
  3. draft: the MTP block decodes main positions [s, s + 1] (the hidden state of each and the token after it) and the
     column of the row's new last token gives the next q. After a rejection the second column (built on d) is stale;
     the next step overwrites its slot and nothing attends past its own slot meanwhile.
The cache index advances by 1 + accepted: a rejected draft's keys at slot s + 1 are overwritten by the next step's
write there, and a query at slot s sees only slots <= s (`jaxopd.model.cache`).

temperature/top-k/top-p are applied to p and q alike (`filter_logits`), so tokens are distributed as the plain
`Sampler` draws them and `logprobs` are the main model's log-probabilities under that same distribution (with
`greedy`, the plain log-softmax, as `Sampler`); greedy accepts the draft when it is the main model's argmax, so its
tokens are the plain greedy tokens. Randomness is per row (step t of row r uses fold_in(fold_in(rng, r), t)), so a
row's completion does not depend on the other rows or on `microbatch`; it is a different draw than `Sampler`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import chex
import jax
import jax.numpy as jnp

from jaxopd.distill.sampling import (Sampler, SampleOutput, cache_buckets, choose_tokens, prompt_layout,
                                     scoring_logits, while_in_cache_buckets)
from jaxopd.model import init_cache


def acceptance(p: jax.Array, q: jax.Array, draft: jax.Array) -> jax.Array:
    """min(1, p(d) / q(d)) `[batch]` for probabilities p, q `[batch, vocab]` and drafts d `[batch]` drawn from q."""
    take = lambda probs: jnp.take_along_axis(probs, draft[:, None], axis=-1)[:, 0]
    return jnp.minimum(1.0, take(p) / take(q))


def residual(p: jax.Array, q: jax.Array) -> jax.Array:
    """normalize(max(0, p - q)) `[batch, vocab]`, what a rejected draft is replaced from; p itself where p == q (then
    nothing is ever rejected, but the row must still be a distribution)."""
    excess = jnp.maximum(p - q, 0.0)
    total = excess.sum(-1, keepdims=True)
    return jnp.where(total > 0, excess / jnp.where(total > 0, total, 1.0), p)


def output_distribution(p: jax.Array, q: jax.Array) -> jax.Array:
    """The law `[batch, vocab]` of the token `verify_draft` emits with draft ~ q: q(y) min(1, p(y)/q(y)) +
    (1 - sum_x q(x) min(1, p(x)/q(x))) residual(y); equal to p (the proof, checked by brute force in the tests)."""
    accepted = q * jnp.minimum(1.0, p / jnp.where(q > 0, q, 1.0))
    return accepted + (1.0 - accepted.sum(-1, keepdims=True)) * residual(p, q)


def verify_draft(p_logits: jax.Array, q_logits: jax.Array, draft: jax.Array, accept_keys: jax.Array,
                 residual_keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling of one position: target logits p `[batch, vocab]`, draft logits q `[batch, vocab]` (both
    already filtered), drafts `[batch]` drawn from softmax(q), per-row keys `[batch]` -> (accepted `[batch]` bool,
    the emitted token `[batch]` int32: the draft where accepted, else a draw from `residual`)."""
    p, q = jax.nn.softmax(p_logits, axis=-1), jax.nn.softmax(q_logits, axis=-1)
    uniform = jax.vmap(jax.random.uniform)(accept_keys)
    accepted = uniform < acceptance(p, q, draft)
    replacement = jax.vmap(jax.random.categorical)(residual_keys, jnp.log(residual(p, q)))
    return accepted, jnp.where(accepted, draft, replacement).astype(jnp.int32)


@chex.dataclass(frozen=True)
class SpeculativeOutput(SampleOutput):
    """`SampleOutput` and, per row `[batch]` int32, the drafts verified (`drafted`) and accepted (`accepted`)."""

    drafted: jax.Array
    accepted: jax.Array


@dataclasses.dataclass(frozen=True)
class SpeculativeSampler(Sampler):
    """`Sampler` drafting with the model's MTP depth 1 (module docstring); the model must have mtp_depth >= 1."""

    def __post_init__(self):
        if self.model.config.mtp_depth < 1:
            raise ValueError(f"speculative decoding drafts with the MTP module, but this model has mtp_depth="
                             f"{self.model.config.mtp_depth}: use the plain Sampler (distill.speculative='off')")
        super().__post_init__()

    def _generate_rows(self, params, prompts, prompt_lengths, budgets, row_ids, rng, *, temperature, top_k, top_p,
                       greedy):
        batch, prompt_len = prompts.shape
        apply = lambda method, *args, **kwargs: self.model.apply({"params": params}, *args, method=method, **kwargs)
        row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, row_ids)
        step_keys = lambda step, n: jax.vmap(lambda key: jax.random.split(jax.random.fold_in(key, step), n))(row_keys)
        # filter_logits' when sampling (the only case verify_draft sees), the model's own with greedy
        filtered = lambda logits: scoring_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                                 greedy=greedy)
        stop_tokens = jnp.asarray(self.stop_tokens, jnp.int32)
        rows = jnp.arange(batch)

        def draw(logits, keys):
            """A token `[batch]` from logits `[batch, vocab]` as the plain sampler draws it, and its log-prob."""
            return choose_tokens(logits, keys, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)

        def logprob_of(logits, token):
            return jnp.take_along_axis(jax.nn.log_softmax(filtered(logits), axis=-1), token[:, None], axis=-1)[:, 0]

        def emit(out, index, token, logprob, on):
            """Write token/log-prob/mask at column index `[batch]` of the rows where `on`."""
            tokens, logprobs, mask = out
            column = jnp.where(on, index, self.max_new_tokens)  # out of bounds: dropped
            return (tokens.at[rows, column].set(token, mode="drop"), logprobs.at[rows, column].set(logprob, mode="drop"),
                    mask.at[rows, column].set(1.0, mode="drop"))

        def stops(token, count):
            return jnp.isin(token, stop_tokens) | (count >= budgets)

        # Prefill: the prompts through the main model, the first token from its last column, then the MTP block over
        # the prompt (each position with the token after it, the first sampled token after the last) for the first
        # draft. The cache (main model's and MTP block's) grows in buckets as the Sampler's does, up to one slot past
        # prompt + max_new_tokens: a finished row's verify pass may write there.
        buckets = cache_buckets(self.max_new_tokens + 1)
        cache = init_cache(self.model.config, batch, prompt_len + buckets[0], self.cache_dtype, mtp=True)
        positions, segment_ids = prompt_layout(prompt_lengths, prompt_len)
        hidden, cache = apply("decode_hidden", prompts, segment_ids, positions, cache, jnp.int32(0))
        keys = step_keys(0, 2)
        first, first_logprob = draw(apply("logits", hidden[:, -1:])[:, 0], keys[:, 0])
        shape = (batch, self.max_new_tokens)
        out = (jnp.full(shape, self.pad_id, jnp.int32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
        out = emit(out, jnp.zeros(batch, jnp.int32), first, first_logprob, jnp.ones(batch, bool))
        next_tokens = jnp.concatenate([prompts[:, 1:], first[:, None]], axis=1)
        q_logits, cache = apply("decode_mtp", hidden, next_tokens, segment_ids, positions, cache, jnp.int32(0),
                                last_only=True)
        draft, _ = draw(q_logits[:, 0], keys[:, 1])

        def body(carry):
            step, count, last, draft, q_logits, cache, done, drafted, accepted_total, out = carry
            live = jnp.logical_not(done)
            keys = step_keys(step, 4)
            slot = prompt_len + count - 1  # the last token's: count tokens are out, the last not yet in the cache
            pair_positions = (prompt_lengths + count - 1)[:, None] + jnp.arange(2)
            pair_segments = jnp.broadcast_to(live.astype(jnp.int32)[:, None], (batch, 2))
            hidden, cache = apply("decode_hidden", jnp.stack([last, draft], 1), pair_segments, pair_positions, cache,
                                  slot)
            p_logits = apply("logits", hidden)
            if greedy:
                target = jnp.argmax(p_logits[:, 0], axis=-1).astype(jnp.int32)
                accepted, first = draft == target, target
            else:
                accepted, first = verify_draft(filtered(p_logits[:, 0]), filtered(q_logits), draft, keys[:, 0],
                                               keys[:, 1])
            bonus, bonus_logprob = draw(p_logits[:, 1], keys[:, 2])
            out = emit(out, count, first, logprob_of(p_logits[:, 0], first), live)
            first_stops = stops(first, count + 1)
            second = live & accepted & jnp.logical_not(first_stops)
            out = emit(out, count + 1, bonus, bonus_logprob, second)
            done = done | first_stops | (second & stops(bonus, count + 2))
            # The next draft: the MTP column of the row's new last token (first after a rejection, bonus after an
            # acceptance); the column built on a rejected draft is stale and overwritten by the next step.
            mtp_logits, cache = apply("decode_mtp", hidden, jnp.stack([first, bonus], 1), pair_segments,
                                      pair_positions, cache, slot)
            q_logits = jnp.where(accepted[:, None], mtp_logits[:, 1], mtp_logits[:, 0])
            next_draft, _ = draw(q_logits, keys[:, 3])
            count = count + jnp.where(live, 1 + accepted, 0)
            return (step + 1, count, jnp.where(accepted, bonus, first), next_draft, q_logits, cache, done,
                    drafted + live, accepted_total + (live & accepted), out)

        def cond(carry):
            step, done = carry[0], carry[6]
            return (step < self.max_new_tokens) & jnp.logical_not(jnp.all(done))

        zeros = jnp.zeros(batch, jnp.int32)
        init = (jnp.int32(1), jnp.ones(batch, jnp.int32), first, draft, q_logits[:, 0], cache,
                stops(first, jnp.ones(batch, jnp.int32)), zeros, zeros, out)
        # A step writes the pair at new-token slots count - 1 and count of each row. A live row's count is below its
        # budget; a finished row's may pass the cache's end (a last accepted draft), where its writes, clamped into
        # its own last slots, change nothing that is read again.
        needed = lambda carry: jnp.max(jnp.where(carry[6], 0, carry[1])) + 1
        carry = while_in_cache_buckets(cond, body, init, self.model.config, prompt_len, buckets, needed, cache_at=5)
        (tokens, logprobs, mask), drafted, accepted = carry[-1], carry[-3], carry[-2]
        return SpeculativeOutput(tokens=tokens, logprobs=logprobs, mask=mask, lengths=mask.sum(-1).astype(jnp.int32),
                                 drafted=drafted, accepted=accepted)


def acceptance_rate(out: SpeculativeOutput) -> float:
    """Accepted drafts / verified drafts over a batch (nan with no draft verified)."""
    drafted = float(jnp.sum(out.drafted))
    return float(jnp.sum(out.accepted)) / drafted if drafted else float("nan")
