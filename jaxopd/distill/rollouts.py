"""Prompts in, scored rollouts out: the prompt stream (grain), batched rollouts with their rewards, FLOP counts.

One rollout batch is `prompts_per_step` prompts, each sampled `group_size` times (the group's samples contiguous,
as GRPO's normalization expects), laid out by `jaxopd.distill.sampling.sequence_layout` as training rows.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
from typing import Any, Callable, Optional, Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from jaxopd.training import sharding
from jaxopd.bundled import resolve_path
from jaxopd.data.sources import expand_paths
from jaxopd.training.flops import decode_flops_per_token, flops_per_token
from jaxopd.model import ModelConfig
from jaxopd.distill.sampling import SampleOutput, Sampler, left_pad, sequence_layout

# Per-token counts depend only on (config, context length): cache them, a step asks for thousands.
_decode_flops = functools.lru_cache(maxsize=None)(decode_flops_per_token)
_forward_flops = functools.lru_cache(maxsize=None)(flops_per_token)


def load_prompts(paths: str, field: str, *, key: str, tokenizer: Any = None, add_bos: bool = True,
                 max_prompt_len: int = 0, long_prompts: str = "error") -> list[str]:
    """Every prompt of JSON Lines files (comma-separated paths or globs; `field` of each non-blank line), in file
    order, checked before any step runs: a line that is not a JSON object with a string `field`, or a file set with no
    prompt, is an error naming the file and line; a prompt whose tokens (BOS included) exceed `max_prompt_len` is an
    error naming the first one (`long_prompts="error"`) or is left out, counted and reported ("skip"), never cut.
    `key` is the config key the paths came from, for the messages. Without a tokenizer lengths are not checked."""
    try:
        files = expand_paths([resolve_path(p) for p in paths.split(",") if p])
    except ValueError as error:
        raise ValueError(f"{key}={paths!r}: {error}".replace("; set data.paths", f"; set {key}")) from error
    prompts, too_long = [], []
    for path in files:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            lines = f.read().split(b"\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            text = _prompt_of(line, field, where=f"{path}:{number}")
            length = len(encode_prompts(tokenizer, [text], add_bos)[0]) if tokenizer is not None else 0
            if length > max_prompt_len:
                too_long.append((f"{path}:{number}", length))
            else:
                prompts.append(text)
    if too_long:
        where, length = too_long[0]
        counted = f"{len(too_long)} of the {len(prompts) + len(too_long)} prompts of {key} are longer than " \
                  f"distill.max_prompt_len={max_prompt_len} tokens (BOS included), the first at {where} ({length} tokens)"
        if long_prompts == "error":
            raise ValueError(f"{counted}: raise distill.max_prompt_len (seq_len with it), shorten them, or set "
                             "distill.long_prompts='skip' to leave them out")
        if jax.process_index() == 0:
            print(f"{counted}: left out (distill.long_prompts='skip')", flush=True)
    if not prompts:
        raise ValueError(f"{key}={paths!r} holds no prompt" + (" that fits distill.max_prompt_len" if too_long else "")
                         + f" ({', '.join(files)}); give JSON Lines with a {field!r} field on each line")
    return prompts


def _prompt_of(line: bytes, field: str, where: str) -> str:
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: malformed JSON ({error.msg} at column {error.colno}); a prompts file holds one "
                         "JSON object per line") from error
    if not isinstance(row, dict) or field not in row:
        found = f"fields {sorted(row)}" if isinstance(row, dict) else f"a JSON {type(row).__name__}"
        raise ValueError(f"{where}: no field {field!r} ({found}); set distill.prompt_field to the field holding "
                         "the prompt")
    if not isinstance(row[field], str):
        raise ValueError(f"{where}: field {field!r} is a JSON {type(row[field]).__name__}, not a string")
    return row[field]


def read_prompts(paths: str, field: str, count: int, key: str = "distill.eval_prompts", **checks: Any) -> list[str]:
    """The first `count` prompts of JSON Lines files, in file order (a fixed eval set), checked by `load_prompts`
    (lengths only when `checks` give it a tokenizer)."""
    prompts = load_prompts(paths, field, key=key, **checks)
    if count > len(prompts):
        raise ValueError(f"{count} prompts requested (distill.eval_prompts_count) but {key}={paths!r} has "
                         f"{len(prompts)}; lower distill.eval_prompts_count or give more prompts")
    return prompts[:count]


class PromptStream:
    """Prompt texts (checked by `load_prompts`) shuffled with `seed`, reshuffled every epoch and repeated forever,
    through grain; `get_state()`/`set_state()` resume exactly.

    On several processes every process holds the same global stream and `next(count)` returns its share: the
    `process_index`-th of `process_count` contiguous parts of the next `count` prompts. So the prompts of a step are
    the same whatever the number of processes, and the state (the global position) is too."""

    def __init__(self, prompts: Sequence[str], seed: int, process_index: int = 0, process_count: int = 1):
        self._dataset = grain.MapDataset.source(list(prompts)).shuffle(seed=seed).repeat(None)
        self._process_index, self._process_count = process_index, process_count
        self._next_index = 0  # global position of the next prompt (what grain's iterator state calls next_index)

    def next(self, count: int) -> list[str]:
        """This process's part of the next `count` prompts (count must divide by the process count)."""
        if count % self._process_count:
            raise ValueError(f"{count} prompts do not split evenly over {self._process_count} processes")
        share = count // self._process_count
        start = self._next_index + self._process_index * share
        self._next_index += count
        return [self._dataset[index] for index in range(start, start + share)]

    def get_state(self) -> Any:
        return {"next_index": self._next_index}

    def set_state(self, state: Any) -> None:
        self._next_index = int(state["next_index"])


@dataclasses.dataclass
class Rollouts:
    """Sampled completions laid out as training rows (`layout`: sequence_layout's dict of `[rows, seq]` arrays, global
    with a mesh), their decoded texts, the task rewards `[rows]`, and the prompt/completion lengths used for FLOP
    counts (these four of this process's rows only)."""

    layout: dict[str, jax.Array]
    completions: list[str]
    rewards: np.ndarray
    prompt_lengths: np.ndarray
    completion_lengths: np.ndarray


def encode_prompts(tokenizer: Any, prompts: Sequence[str], add_bos: bool) -> list[list[int]]:
    prefix = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    return [prefix + tokenizer.encode(prompt) for prompt in prompts]


def rollout(sampler: Sampler, params: Any, tokenizer: Any, prompts: Sequence[str], rng: jax.Array, *,
            group_size: int, add_bos: bool, checker: Callable[[str, str], bool], mesh: Optional[Mesh] = None,
            **sampling: Any) -> Rollouts:
    """Samples `group_size` completions per prompt and checks each with `checker(prompt, completion_text)`.

    With a `mesh`, `prompts` are this process's share and its rows are assembled with the other processes' (in
    process order) into global arrays split over the mesh's batch axes: the sampler runs on the global batch,
    `layout` holds global arrays, and the texts, rewards and lengths are this process's rows, read from its own
    shards."""
    repeated = [prompt for prompt in prompts for _ in range(group_size)]
    padded, lengths = left_pad(encode_prompts(tokenizer, repeated, add_bos), sampler.max_prompt_len,
                               sampler.pad_id)
    inputs = {"prompts": padded, "lengths": lengths}
    if mesh is not None:
        inputs = sharding.global_batch(inputs, mesh)
    output: SampleOutput = sampler(params, inputs["prompts"], inputs["lengths"], rng, **sampling)
    read = sharding.local_rows if mesh is not None else np.asarray
    tokens, completion_lengths = read(output.tokens), read(output.lengths)
    completions = [tokenizer.decode(row[:length]) for row, length in zip(tokens, completion_lengths)]
    rewards = np.asarray([float(checker(p, c)) for p, c in zip(repeated, completions)], np.float32)
    return Rollouts(sequence_layout(inputs["prompts"], inputs["lengths"], output), completions, rewards, lengths,
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
