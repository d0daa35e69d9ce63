"""Prompts in, rollouts out: batched rollouts with their texts, FLOP counts (prompt rows and their stream:
prompts.py).

One rollout batch is `prompts_per_step` prompts, each sampled `group_size` times (the group's samples contiguous,
as GRPO's normalization expects), laid out by `jaxopd.distill.sampling.sequence_layout` as training rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxopd.distill.prompts import Prompt
from jaxopd.distill.sampling import SampleOutput, Sampler, left_pad, sequence_layout
from jaxopd.model import ModelConfig
from jaxopd.training import sharding
from jaxopd.training.flops import decode_flops_per_token, flops_per_token

# Per-token counts depend only on (config, context length): cache them, a step asks for thousands.
_decode_flops = functools.lru_cache(maxsize=None)(decode_flops_per_token)
_forward_flops = functools.lru_cache(maxsize=None)(flops_per_token)


@dataclasses.dataclass
class Rollouts:
    """Sampled completions laid out as training rows (`layout`: sequence_layout's dict of `[rows, seq]` arrays, global
    with a mesh), the prompt of each row, their decoded texts, and the prompt/completion lengths used for FLOP counts
    (these four of this process's rows only)."""

    layout: dict[str, jax.Array]
    prompts: list[Prompt]
    completions: list[str]
    prompt_lengths: np.ndarray
    completion_lengths: np.ndarray


def rollout(sampler: Sampler, params: Any, tokenizer: Any, prompts: Sequence[Prompt], rng: jax.Array, *,
            group_size: int, mesh: Optional[Mesh] = None, **sampling: Any) -> Rollouts:
    """Samples `group_size` completions per prompt (the group's rows contiguous).

    With a `mesh`, `prompts` are this process's share and its rows are assembled with the other processes' (in
    process order) into global arrays split over the mesh's batch axes: the sampler runs on the global batch,
    `layout` holds global arrays, and the texts and lengths are this process's rows, read from its own shards.
    Completion texts leave out the EOS token that ended them."""
    repeated = [prompt for prompt in prompts for _ in range(group_size)]
    padded, lengths = left_pad([list(prompt.ids) for prompt in repeated], sampler.max_prompt_len, sampler.pad_id)
    inputs = {"prompts": padded, "lengths": lengths}
    if mesh is not None:
        inputs = sharding.global_batch(inputs, mesh)
    output: SampleOutput = sampler(params, inputs["prompts"], inputs["lengths"], rng, **sampling)
    read = sharding.local_rows if mesh is not None else np.asarray
    tokens, completion_lengths = read(output.tokens), read(output.lengths)
    completions = [tokenizer.decode(row[:length - int(length > 0 and row[length - 1] in sampler.stop_tokens)])
                   for row, length in zip(tokens, completion_lengths)]
    return Rollouts(sequence_layout(inputs["prompts"], inputs["lengths"], output), repeated, completions, lengths,
                    completion_lengths)


def sampling_flops(config: ModelConfig, prompt_lengths: np.ndarray, completion_lengths: np.ndarray) -> float:
    """Forward FLOPs of generating the completions: the prefill of each prompt plus one cached decode step per
    completion token, each attending to the tokens before it (jaxopd.training.flops conventions)."""
    total = 0.0
    for prompt_length, completion_length in zip(prompt_lengths.tolist(), completion_lengths.tolist()):
        total += prompt_length * _forward_flops(config, prompt_length, training=False)
        total += sum(_decode_flops(config, prompt_length + j) for j in range(completion_length))
    return total


def sequence_flops(config: ModelConfig, segment_ids: np.ndarray, *, training: bool) -> float:
    """FLOPs of a full-sequence pass (forward, or forward + backward) over each row's real tokens."""
    total = 0.0
    for length in (np.asarray(segment_ids) > 0).sum(-1).tolist():
        if length:
            total += length * _forward_flops(config, length, training=training)
    return total
