"""Continuous batching for rollouts: a fixed number of decode slots, refilled from a queue as rows finish.

    sampler = ContinuousSampler(model, max_prompt_len=512, max_new_tokens=4096, stop_tokens=(eos_id,), pad_id=0,
                                slots=64)
    out = sampler(params, prompts, lengths, jax.random.key(0))     # same call and SampleOutput as `Sampler`

The static `Sampler` decodes its whole batch until the longest row stops: with the long-tailed completion lengths
of reasoning rollouts most rows sit finished for most of the loop. Here `slots` rows decode together; when one
stops, its slot takes the next queued prompt. A thin host loop drives fixed-shape jitted programs:

  insert: prefill `b` queued prompts (their last `p` columns) into `b` free slots; `b` and `p` are padded up to
          powers of two (at most `slots` and `max_prompt_len`), so a run compiles a small known set of programs
          (`compiled_shapes`) whatever its batch sizes and prompt lengths;
  decode: decode every live slot one token a step until an eighth of the slots are free while prompts are queued
          (then the host refills them: one round trip per few finished rows, not per row), or until all are done.

Each slot keeps the static sampler's column layout (prompt left-padded to end at column max_prompt_len - 1, new
token j at column max_prompt_len + j, positions from the row's first real token) and its own cache index, so a row
decodes exactly as it would in a static batch; row r's token j is drawn with fold_in(fold_in(rng, r), j) as there.
Tokens and log-probs therefore equal the static sampler's row by row (to the float rounding of a different batch
composition), and the output rows are in the input order.

On a mesh the slots are split over the devices as the prompts' rows are. Host-side decisions read only small arrays
gathered whole on every process (which slots are live, their lengths), so every process of a multi-host run takes
the same ones.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxopd.distill.sampling import SampleOutput, check_options, choose_tokens, prompt_layout, row_budgets
from jaxopd.model import init_cache


def _to_host(array: jax.Array) -> np.ndarray:
    """The whole array on this host (gathered from the other processes when it is split across them)."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


class _Placement:
    """Where the engine's arrays live: on one device, or — when the prompts are split over a mesh — the slots split
    as the prompts' rows are (the cache `[slots, ...]`, or `[layers, slots, ...]` when scanned) and the host's small
    inputs replicated, so every device decodes its share of the slots."""

    def __init__(self, prompts: jax.Array, slots: int):
        sharding = getattr(prompts, "sharding", None)
        self.mesh = sharding.mesh if isinstance(sharding, NamedSharding) and len(sharding.device_set) > 1 else None
        if self.mesh is None:
            return
        self.rows_spec = sharding.spec[0] if sharding.spec else None
        names = (self.rows_spec,) if isinstance(self.rows_spec, str) else tuple(self.rows_spec or ())
        parts = int(np.prod([self.mesh.shape[name] for name in names]))
        if slots % parts:
            raise ValueError(f"decode slots={slots} do not split over the {parts} shards of the prompts' rows "
                             f"({' x '.join(names)}): use distill.decode_slots divisible by {parts}")

    def split(self, axis: int) -> Optional[NamedSharding]:
        return None if self.mesh is None else NamedSharding(self.mesh, P(*([None] * axis), self.rows_spec))

    def make(self, build: Callable[[], Any], slot_axis: Callable[[Any], int]) -> Any:
        """`build()`'s arrays, each its own buffer (they are donated), split along `slot_axis(path)`."""
        if self.mesh is None:
            return jax.jit(build)()
        shapes = jax.eval_shape(build)
        shardings = jax.tree_util.tree_map_with_path(lambda path, _: self.split(slot_axis(path)), shapes)
        return jax.jit(build, out_shardings=shardings)()

    def host(self, value: np.ndarray) -> jax.Array | np.ndarray:
        """A host value (the same on every process) as a replicated array of the mesh."""
        if self.mesh is None:
            return value
        return jax.make_array_from_callback(value.shape, NamedSharding(self.mesh, P()), lambda index: value[index])

    def rows(self, value: np.ndarray) -> jax.Array:
        """Output rows `[batch, ...]` (the same on every process) split as the prompts' rows are."""
        if self.mesh is None:
            return jnp.asarray(value)
        sharding = NamedSharding(self.mesh, P(self.rows_spec))
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _bucket(n: int, top: int) -> int:
    """The smallest power of two >= n, capped at `top`."""
    return min(top, 1 << max(0, int(n) - 1).bit_length())


@chex.dataclass(frozen=True)
class _Slots:
    """Decode state of every slot `[slots]`: the row it holds (for its RNG key), tokens generated so far (`step`),
    prompt length, token budget, live flag, the logits of its next token `[slots, vocab]`, and its completion so far:
    `tokens`, `logprobs` `[slots, max_new_tokens]`."""

    row: jax.Array
    step: jax.Array
    prompt_length: jax.Array
    budget: jax.Array
    live: jax.Array
    logits: jax.Array
    tokens: jax.Array
    logprobs: jax.Array


@dataclasses.dataclass(frozen=True)
class ContinuousSampler:
    """`Sampler`'s interface over `slots` continuously refilled decode slots (module docstring); `cache_dtype` as
    `Sampler`'s. The jitted programs see only slot-shaped arrays, never the call's batch, so calls of any batch
    size reuse them."""

    model: nn.Module
    max_prompt_len: int
    max_new_tokens: int
    stop_tokens: tuple[int, ...]
    pad_id: int
    slots: int
    cache_dtype: Any = "auto"

    def __post_init__(self):
        if self.max_prompt_len < 1 or self.max_new_tokens < 1 or self.slots < 1:
            raise ValueError(f"max_prompt_len={self.max_prompt_len}, max_new_tokens={self.max_new_tokens} and "
                             f"slots={self.slots} must all be >= 1")
        object.__setattr__(self, "_insert", jax.jit(self._insert_rows, donate_argnums=(1, 2)))
        object.__setattr__(self, "_decode", jax.jit(self._decode_until, donate_argnums=(1, 2), static_argnames=(
            "temperature", "top_k", "top_p", "greedy")))
        object.__setattr__(self, "_shapes", set())

    @property
    def compiled_shapes(self) -> list[tuple[str, int, int]]:
        """("insert", rows, prompt columns) and ("decode", slots, 0) of every program this sampler has run, sorted."""
        return sorted(self._shapes)

    def __call__(self, params: Any, prompts: jax.Array, prompt_lengths: jax.Array, rng: jax.Array, *,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 greedy: bool = False, budgets: Optional[jax.Array] = None) -> SampleOutput:
        """prompts `[batch, max_prompt_len]` left-padded, prompt_lengths `[batch]`, optional per-row token budgets
        `[batch]` (at most max_new_tokens) -> SampleOutput `[batch, max_new_tokens]`, rows in input order (split
        over devices as `prompts` is)."""
        check_options(temperature, top_k, top_p)
        chex.assert_shape(prompts, (None, self.max_prompt_len))
        batch = prompts.shape[0]
        chex.assert_shape(prompt_lengths, (batch,))
        host_budgets = _to_host(row_budgets(budgets, batch, self.max_new_tokens))
        host_prompts, host_lengths = _to_host(prompts), _to_host(prompt_lengths)
        config, new = self.model.config, self.max_new_tokens
        place = _Placement(prompts, self.slots)
        layer_axis = 1 if config.scan_layers else 0  # scanned stacks lead with [layers]
        cache = place.make(lambda: init_cache(config, self.slots, self.max_prompt_len + new, self.cache_dtype),
                           lambda path: layer_axis if path[0].key == "layers" else 0)
        ints = lambda: jnp.ones(self.slots, jnp.int32)
        slots = place.make(lambda: _Slots(
            row=ints(), step=ints() * 0, prompt_length=ints(), budget=ints(), live=jnp.zeros(self.slots, bool),
            logits=jnp.zeros((self.slots, config.vocab_size), jnp.float32),
            tokens=jnp.full((self.slots, new), self.pad_id, jnp.int32),
            logprobs=jnp.zeros((self.slots, new), jnp.float32)), lambda path: 0)
        tokens = np.full((batch, new), self.pad_id, np.int32)
        logprobs, mask = np.zeros((batch, new), np.float32), np.zeros((batch, new), np.float32)
        options = dict(temperature=float(temperature), top_k=top_k, top_p=top_p, greedy=greedy)
        queue = collections.deque(range(batch))
        holder = np.full(self.slots, -1)  # the row each slot decodes, -1: free
        while queue or (holder >= 0).any():
            free = np.flatnonzero(holder < 0)
            if queue and free.size:
                take = np.asarray([queue.popleft() for _ in range(min(free.size, len(queue)))])
                rows_bucket = _bucket(len(take), self.slots)
                prompt_bucket = _bucket(int(host_lengths[take].max()), self.max_prompt_len)
                picked = np.zeros((rows_bucket, prompt_bucket), np.int32)
                picked[:len(take)] = host_prompts[take, self.max_prompt_len - prompt_bucket:]
                # Entries past the rows taken pad the bucket: slot index `slots` is out of range, so dropped.
                fields = {"row": take, "slot": free[:len(take)], "length": host_lengths[take],
                          "budget": host_budgets[take]}
                fields = {name: np.pad(value.astype(np.int32), (0, rows_bucket - len(take)),
                                       constant_values=self.slots if name == "slot" else 1)
                          for name, value in fields.items()}
                holder[free[:len(take)]] = take
                self._shapes.add(("insert", rows_bucket, prompt_bucket))
                cache, slots = self._insert(params, cache, slots, place.host(picked),
                                            {name: place.host(value) for name, value in fields.items()})
            self._shapes.add(("decode", self.slots, 0))
            # Stop for a refill once enough slots are free to be worth a host round trip (or all queued rows fit).
            refill_at = min(len(queue), max(1, self.slots // 8)) if queue else 0
            cache, slots = self._decode(params, cache, slots, rng, place.host(np.int32(refill_at)), **options)
            live, steps = _to_host(slots.live), _to_host(slots.step)
            done = np.flatnonzero((holder >= 0) & ~live)
            if done.size:
                done_tokens, done_logprobs = _to_host(slots.tokens)[done], _to_host(slots.logprobs)[done]
                for slot, slot_tokens, slot_logprobs in zip(done, done_tokens, done_logprobs):
                    row, length = holder[slot], steps[slot]
                    tokens[row, :length], logprobs[row, :length] = slot_tokens[:length], slot_logprobs[:length]
                    mask[row, :length] = 1.0
                holder[done] = -1
        return SampleOutput(tokens=place.rows(tokens), logprobs=place.rows(logprobs), mask=place.rows(mask),
                            lengths=place.rows(mask.sum(-1).astype(np.int32)))

    def _insert_rows(self, params, cache, slots: _Slots, prompts, fields):
        """Prefill `prompts [b, p]` (left-padded to p columns) into slots `fields["slot"] [b]` for rows
        `fields["row"]` with their lengths and budgets; entries whose slot is out of range are dropped."""
        config = self.model.config
        prompt_bucket = prompts.shape[1]
        slot_ids = fields["slot"]
        positions, segment_ids = prompt_layout(fields["length"], prompt_bucket)
        new_cache = init_cache(config, prompts.shape[0], prompt_bucket, self.cache_dtype)
        logits, new_cache = self.model.apply({"params": params}, prompts, positions=positions,
                                             segment_ids=segment_ids, cache=new_cache, cache_index=jnp.int32(0),
                                             last_only=True, method="decode")
        columns = slice(self.max_prompt_len - prompt_bucket, self.max_prompt_len)
        # A slot's old row leaves stale keys/values behind; clearing its segment ids hides them until overwritten.
        segments = cache["segment_ids"].at[slot_ids].set(0, mode="drop")
        segments = segments.at[slot_ids, columns].set(new_cache["segment_ids"], mode="drop")
        scanned = config.scan_layers  # scanned stacks lead with [layers]
        place = lambda old, new: (old.at[:, slot_ids, columns] if scanned else old.at[slot_ids, columns]).set(
            new.astype(old.dtype), mode="drop")
        layers = jax.tree.map(place, cache["layers"], new_cache["layers"])
        put = lambda array, value: array.at[slot_ids].set(value, mode="drop")
        slots = _Slots(row=put(slots.row, fields["row"]), step=put(slots.step, 0),
                       prompt_length=put(slots.prompt_length, fields["length"]),
                       budget=put(slots.budget, fields["budget"]), live=put(slots.live, True),
                       logits=put(slots.logits, logits[:, -1].astype(jnp.float32)),
                       tokens=put(slots.tokens, self.pad_id), logprobs=put(slots.logprobs, 0.0))
        return {"segment_ids": segments, "layers": layers}, slots

    def _decode_until(self, params, cache, slots: _Slots, rng, refill_at, *, temperature, top_k, top_p, greedy):
        """Decode all live slots until `refill_at` slots are free (0: never), or until none is live."""
        stop_tokens = jnp.asarray(self.stop_tokens, jnp.int32)
        slot_index = jnp.arange(self.slots)

        def body(carry):
            cache, slots = carry
            keys = jax.vmap(lambda row, step: jax.random.fold_in(jax.random.fold_in(rng, row), step))(
                slots.row, slots.step)
            token, logprob = choose_tokens(slots.logits, keys, temperature=temperature, top_k=top_k, top_p=top_p,
                                           greedy=greedy)
            live = slots.live
            token = jnp.where(live, token, self.pad_id)
            column = jnp.where(live, slots.step, self.max_new_tokens)  # finished or free slots write nothing
            finished = live & (jnp.isin(token, stop_tokens) | (slots.step + 1 >= slots.budget))
            # Feed the token back at its row's own column and position (a free slot rewrites a column of its own).
            logits, cache = self.model.apply(
                {"params": params}, token[:, None], positions=(slots.prompt_length + slots.step)[:, None],
                segment_ids=live.astype(jnp.int32)[:, None], cache=cache,
                cache_index=self.max_prompt_len + jnp.minimum(slots.step, self.max_new_tokens - 1), method="decode")
            slots = slots.replace(step=slots.step + live, live=live & ~finished,
                                  logits=logits[:, -1].astype(jnp.float32),
                                  tokens=slots.tokens.at[slot_index, column].set(token, mode="drop"),
                                  logprobs=slots.logprobs.at[slot_index, column].set(logprob, mode="drop"))
            return cache, slots

        def cond(carry):
            live = carry[1].live
            return jnp.any(live) & ((refill_at == 0) | (jnp.sum(~live) < refill_at))

        return jax.lax.while_loop(cond, body, (cache, slots))
