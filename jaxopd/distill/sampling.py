"""Batched generation with a KV cache: one jitted prefill of the left-padded prompts, then a decode loop.

    sampler = Sampler(model, max_prompt_len=16, max_new_tokens=8, stop_tokens=(eos_id,), pad_id=pad_id)
    prompts, lengths = left_pad([[5, 6, 7], [8, 9]], 16, pad_id)
    out = sampler(params, prompts, lengths, jax.random.key(0), temperature=1.0)
    out.tokens, out.logprobs, out.mask        # [batch, max_new_tokens] each

Prompts are left-padded so every prompt ends at column `max_prompt_len - 1` and all rows decode in step; each row's
positions count from its own first token and padding has segment id 0, so the model never attends to it. The
cache is the model's own (`jaxopd.model.init_cache`: for MLA only the compressed latent and the rope key; decoding
uses the absorbed form).

Randomness is per row: row r of a call draws its token at step t with fold_in(fold_in(rng, r), t), so a row's
completion depends only on its prompt, its index and the key, never on the other rows. That is what lets
`microbatch` (rows per chunk of one call, for long completions: only one chunk's KV cache is live at a time) leave
the sampled tokens unchanged.

`budgets` (optional, `[batch]`) give each row its own token budget: a row stops after that many tokens as after a
stop token (per-request `max_tokens`).

`logprobs` are the log-probabilities of the sampled tokens under the distribution actually sampled from (after
temperature, top-k and top-p), which is what an importance ratio against the sampler needs; with `greedy` they are
the plain log-softmax of the logits at the chosen token. `mask` is 1 on the completion up to and including the first
stop token; after it a row emits `pad_id` with mask 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxopd.model import init_cache
from jaxopd.model.cache import grow_cache

# The decode loop's cache starts this many new-token slots long and doubles as rows pass its end.
FIRST_CACHE_BUCKET = 64


def map_row_chunks(fn: Callable[[Any], Any], rows_tree: Any, rows_per_chunk: int) -> Any:
    """`fn` (a tree of `[rows, ...]` arrays -> a tree of `[rows, ...]` arrays, rows independent) applied to
    `rows_tree` `rows_per_chunk` rows at a time with lax.map, so only one chunk's intermediates are live at once;
    0 (or at least the batch): one call. Traced inside a jit.

    Chunk j holds rows j, j + n, j + 2n, ... (n chunks): with the batch split over devices in contiguous blocks,
    every chunk is spread over all of them.
    """
    batch = jax.tree.leaves(rows_tree)[0].shape[0]
    if not rows_per_chunk or rows_per_chunk >= batch:
        return fn(rows_tree)
    if batch % rows_per_chunk:
        raise ValueError(f"{batch} rows do not split into chunks of {rows_per_chunk}: use a chunk size dividing them")
    chunks = batch // rows_per_chunk
    split = lambda x: jnp.swapaxes(x.reshape(rows_per_chunk, chunks, *x.shape[1:]), 0, 1)  # [chunks, rows, ...]
    join = lambda y: jnp.swapaxes(y, 0, 1).reshape(batch, *y.shape[2:])
    return jax.tree.map(join, jax.lax.map(fn, jax.tree.map(split, rows_tree)))


@chex.dataclass(frozen=True)
class SampleOutput:
    """Completions `tokens [batch, new]` int32, their sampler `logprobs [batch, new]` float32 and `mask [batch, new]`
    float32 (1 up to and including the first stop token), and `lengths [batch]` int32 (= mask.sum(-1))."""

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array


def left_pad(prompts: Sequence[Sequence[int]], max_prompt_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (left-padded `[batch, max_prompt_len]` int32, lengths `[batch]` int32)."""
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    if len(prompts) == 0 or lengths.min() < 1 or lengths.max() > max_prompt_len:
        raise ValueError(f"prompt lengths {lengths.tolist()} must lie in [1, max_prompt_len={max_prompt_len}]; "
                         "raise max_prompt_len or shorten the prompts")
    padded = np.full((len(prompts), max_prompt_len), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        padded[row, max_prompt_len - len(prompt):] = prompt
    return padded, lengths


def prompt_layout(prompt_lengths: jax.Array, max_prompt_len: int) -> tuple[jax.Array, jax.Array]:
    """(positions, segment_ids) `[batch, max_prompt_len]` of left-padded prompts: positions count from each row's
    first real token (0 on padding), segment id 1 on real tokens and 0 on padding."""
    column = jnp.arange(max_prompt_len)[None, :]
    start = max_prompt_len - prompt_lengths[:, None]
    real = column >= start
    return jnp.where(real, column - start, 0).astype(jnp.int32), real.astype(jnp.int32)


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> jax.Array:
    """Logits `[batch, vocab]` of the distribution to sample from: divided by temperature, then everything outside
    the top_k tokens and outside the smallest set whose probability reaches top_p set to -inf (the top token is
    always kept)."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # A token is kept when the probability of the tokens ranked above it is still below top_p.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def check_options(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Sampling options checked before anything compiles."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0; use greedy=True for argmax decoding")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k!r} must be >= 1 or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must lie in (0, 1] or be None")


def choose_tokens(logits: jax.Array, keys: jax.Array, *, temperature: float, top_k: Optional[int],
                  top_p: Optional[float], greedy: bool) -> tuple[jax.Array, jax.Array]:
    """The next token of each row `[batch]` int32 from its logits `[batch, vocab]` (argmax, or drawn with the row's
    key `keys [batch]`), and its log-prob `[batch]` under the distribution it was drawn from."""
    scored = scoring_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    token = jnp.argmax(logits, axis=-1) if greedy else jax.vmap(jax.random.categorical)(keys, scored)
    logprobs = jax.nn.log_softmax(scored, axis=-1)
    return token.astype(jnp.int32), jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]


def scoring_logits(logits: jax.Array, *, temperature: float, top_k: Optional[int], top_p: Optional[float],
                   greedy: bool) -> jax.Array:
    """Float32 logits `[batch, vocab]` whose log-softmax is a sampled token's log-prob: `filter_logits`' when
    sampling, the model's own with `greedy` (argmax has no distribution of its own to report)."""
    if greedy:
        return logits.astype(jnp.float32)
    return filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)


def cache_buckets(max_new_tokens: int) -> list[int]:
    """New-token lengths of the decode cache, in order: FIRST_CACHE_BUCKET doubled until max_new_tokens, which ends
    the list. A step attends over the current bucket's slots only, not over the longest completion's from step 0."""
    buckets = [min(FIRST_CACHE_BUCKET, max_new_tokens)]
    while buckets[-1] < max_new_tokens:
        buckets.append(min(2 * buckets[-1], max_new_tokens))
    return buckets


def while_in_cache_buckets(cond: Callable[[Any], jax.Array], body: Callable[[Any], Any], carry: Any, config: Any,
                           prompt_len: int, buckets: list[int], new_slots_needed: Callable[[Any], jax.Array],
                           cache_at: int) -> Any:
    """`jax.lax.while_loop(cond, body, carry)` with the decode cache (`carry[cache_at]`, made with `buckets[0]` new
    slots) grown through `buckets` (`grow_cache`): each bucket's loop runs while `cond` holds and the next step's
    writes fit, `new_slots_needed(carry) <= bucket` (the new-token slots the next step writes up to, all rows); the
    last bucket must hold every step's. Loops after the last row stopped run zero times."""
    for bucket, next_bucket in zip(buckets, buckets[1:] + [None]):
        fits = lambda carry, bucket=bucket: cond(carry) & (new_slots_needed(carry) <= bucket)
        carry = jax.lax.while_loop(fits, body, carry)
        if next_bucket is not None:
            grown = grow_cache(config, carry[cache_at], prompt_len + next_bucket)
            carry = (*carry[:cache_at], grown, *carry[cache_at + 1:])
    return carry


def row_budgets(budgets: Optional[jax.Array], batch: int, max_new_tokens: int) -> jax.Array:
    """Per-row token budgets `[batch]` int32 (a row stops after its budget's tokens as after a stop token);
    None: max_new_tokens for every row."""
    if budgets is None:
        return jnp.full(batch, max_new_tokens, jnp.int32)
    chex.assert_shape(budgets, (batch,))
    if isinstance(budgets, np.ndarray) and not ((budgets >= 1) & (budgets <= max_new_tokens)).all():
        raise ValueError(f"budgets must lie in [1, max_new_tokens={max_new_tokens}], got {budgets.min()}.."
                         f"{budgets.max()}")
    return jnp.asarray(budgets, jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Jitted generation for one model and fixed shapes: prompts `[batch, max_prompt_len]`, completions
    `[batch, max_new_tokens]`. Call it with params, left-padded prompts, their lengths and an RNG key; sampling
    options are static (each new combination compiles once). `microbatch`: rows decoded together (0: all; it must
    divide the batch); `cache_dtype`: the KV cache's ("auto": the model's compute dtype).

    The decode loop's cache grows in `cache_buckets` (64 new tokens, doubled as rows reach the end) rather than
    holding max_new_tokens slots from the first step: early steps attend over what exists. A growth copies the cache
    into the longer one, so at the last one the old and the full cache are live together (at most 1.5x the full
    cache)."""

    model: nn.Module
    max_prompt_len: int
    max_new_tokens: int
    stop_tokens: tuple[int, ...]
    pad_id: int
    cache_dtype: Any = "auto"
    microbatch: int = 0

    def __post_init__(self):
        if self.max_prompt_len < 1 or self.max_new_tokens < 1:
            raise ValueError(f"max_prompt_len={self.max_prompt_len} and max_new_tokens={self.max_new_tokens} "
                             "must both be >= 1")
        if self.microbatch < 0:
            raise ValueError(f"microbatch={self.microbatch} must be >= 0 (rows decoded together; 0: all)")
        jitted = jax.jit(self._generate, static_argnames=("temperature", "top_k", "top_p", "greedy"))
        object.__setattr__(self, "_jitted", jitted)

    def __call__(self, params: Any, prompts: jax.Array, prompt_lengths: jax.Array, rng: jax.Array, *,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 greedy: bool = False, budgets: Optional[jax.Array] = None) -> SampleOutput:
        """prompts `[batch, max_prompt_len]` left-padded, prompt_lengths `[batch]`, optional per-row token budgets
        `[batch]` (at most max_new_tokens; default all max_new_tokens) -> SampleOutput."""
        check_options(temperature, top_k, top_p)
        chex.assert_shape(prompts, (None, self.max_prompt_len))
        chex.assert_shape(prompt_lengths, (prompts.shape[0],))
        if self.microbatch and prompts.shape[0] % self.microbatch:
            raise ValueError(f"{prompts.shape[0]} rows do not split into sampling microbatches of {self.microbatch}: "
                             "use a microbatch (distill.sampling_microbatch) that divides the rows")
        budgets = row_budgets(budgets, prompts.shape[0], self.max_new_tokens)
        return self._jitted(params, prompts, prompt_lengths, budgets, rng, temperature=float(temperature),
                            top_k=top_k, top_p=top_p, greedy=greedy)

    def prefill(self, params: Any, prompts: jax.Array, prompt_lengths: jax.Array,
                new_slots: Optional[int] = None) -> tuple[jax.Array, Any]:
        """(logits `[batch, 1, vocab]` at each prompt's last token, the cache holding the prompts and `new_slots`
        empty slots, default max_new_tokens): generation's first pass, traceable on its own (jaxopd.plan compiles it
        apart)."""
        batch, prompt_len = prompts.shape
        new_slots = self.max_new_tokens if new_slots is None else new_slots
        cache = init_cache(self.model.config, batch, prompt_len + new_slots, self.cache_dtype)
        positions, segment_ids = prompt_layout(prompt_lengths, prompt_len)
        return self.model.apply({"params": params}, prompts, positions=positions, segment_ids=segment_ids,
                                cache=cache, cache_index=jnp.int32(0), last_only=True, method="decode")

    def decode_step(self, params: Any, token: jax.Array, positions: jax.Array, segment_ids: jax.Array, cache: Any,
                    cache_index: jax.Array) -> tuple[jax.Array, Any]:
        """One cached decode step: tokens `[batch]` at `positions`/`segment_ids` `[batch, 1]`, written at slot
        `cache_index` -> (logits `[batch, 1, vocab]`, the updated cache)."""
        return self.model.apply({"params": params}, token[:, None], positions=positions, segment_ids=segment_ids,
                                cache=cache, cache_index=cache_index, method="decode")

    def _generate(self, params, prompts, prompt_lengths, budgets, rng, *, temperature, top_k, top_p, greedy):
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
        rows = (prompts, prompt_lengths, budgets, jnp.arange(prompts.shape[0], dtype=jnp.int32))
        return map_row_chunks(lambda chunk: self._generate_rows(params, *chunk, rng, **options), rows,
                              self.microbatch)

    def _generate_rows(self, params, prompts, prompt_lengths, budgets, row_ids, rng, *, temperature, top_k, top_p,
                       greedy):
        batch, prompt_len = prompts.shape
        row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, row_ids)
        buckets = cache_buckets(self.max_new_tokens)
        logits, cache = self.prefill(params, prompts, prompt_lengths, buckets[0])
        stop_tokens = jnp.asarray(self.stop_tokens, jnp.int32)
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)

        def body(carry):
            step, step_logits, cache, done, tokens, logprobs, mask = carry
            keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
            token, logprob = choose_tokens(step_logits, keys, **options)
            live = jnp.logical_not(done)
            token = jnp.where(live, token, self.pad_id)
            tokens = tokens.at[:, step].set(token)
            logprobs = logprobs.at[:, step].set(jnp.where(live, logprob, 0.0))
            mask = mask.at[:, step].set(live.astype(jnp.float32))
            done = done | jnp.isin(token, stop_tokens) | (step + 1 >= budgets)
            # Feed the token back: it sits at column prompt_len + step, position prompt_length + step.
            next_logits, cache = self.decode_step(params, token, (prompt_lengths + step)[:, None],
                                                  live.astype(jnp.int32)[:, None], cache, prompt_len + step)
            return step + 1, next_logits[:, -1], cache, done, tokens, logprobs, mask

        shape = (batch, self.max_new_tokens)
        carry = (jnp.int32(0), logits[:, -1], cache, jnp.zeros(batch, bool), jnp.full(shape, self.pad_id, jnp.int32),
                 jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
        # Step s writes new-token slot s; every row is done by step max_new_tokens (its budget).
        carry = while_in_cache_buckets(lambda carry: jnp.logical_not(jnp.all(carry[3])), body, carry,
                                       self.model.config, prompt_len, buckets, lambda carry: carry[0] + 1, cache_at=2)
        _, _, _, _, tokens, logprobs, mask = carry
        return SampleOutput(tokens=tokens, logprobs=logprobs, mask=mask, lengths=mask.sum(-1).astype(jnp.int32))


def sequence_layout(prompts: jax.Array, prompt_lengths: jax.Array, completions: SampleOutput) -> dict[str, jax.Array]:
    """Prompt + completion as one training/scoring row per sample, in the Batch contract's layout.

    Returns `[batch, max_prompt_len + new]` arrays: tokens, positions, segment_ids (1 on real tokens), targets (the
    next token), loss_mask (1 where the target is a completion token under the mask) and `target_sampler_logprobs`
    (the sampler's log-prob of each target, 0 elsewhere).
    """
    batch, prompt_len = prompts.shape
    tokens = jnp.concatenate([prompts, completions.tokens], axis=1)
    prompt_positions, prompt_segments = prompt_layout(prompt_lengths, prompt_len)
    new = completions.tokens.shape[1]
    completion_positions = prompt_lengths[:, None] + jnp.arange(new)[None, :]
    positions = jnp.concatenate([prompt_positions, jnp.where(completions.mask > 0, completion_positions, 0)], axis=1)
    segment_ids = jnp.concatenate([prompt_segments, completions.mask.astype(jnp.int32)], axis=1)
    # Column c predicts the token at c + 1: the prompt's last column predicts the first completion token.
    shift = lambda x, fill: jnp.concatenate([x[:, 1:], jnp.full((batch, 1), fill, x.dtype)], axis=1)
    zeros = jnp.zeros((batch, prompt_len - 1), jnp.float32)
    loss_mask = jnp.concatenate([zeros, completions.mask, jnp.zeros((batch, 1), jnp.float32)], axis=1)
    sampler_logprobs = jnp.concatenate([zeros, completions.logprobs, jnp.zeros((batch, 1), jnp.float32)], axis=1)
    return {"tokens": tokens, "positions": positions.astype(jnp.int32), "segment_ids": segment_ids,
            "targets": shift(tokens, 0), "loss_mask": loss_mask, "target_sampler_logprobs": sampler_logprobs}
