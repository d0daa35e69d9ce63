"""Needle in a haystack: a key/value sentence hidden at a depth of filler text, retrieved by greedy generation. The
needle, question and answer format is data/retrieval.py's, which also makes the training documents of that format.

Each case is one prompt of a context length L and a depth d in [0, 1]. L counts every position the model sees: the
prompt (BOS, filler, the needle, more filler, the question) and the ANSWER_TOKENS generated after it, so L <=
max_position_embeddings keeps the whole case inside the model's window. With `body` = the number of filler tokens
(L - ANSWER_TOKENS - BOS - needle - question), the needle starts at token BOS + round(d * body): right after BOS at
d = 0, right before the question at d = 1. The question ends with the start of the answer sentence ("... The secret
key for Alice is"), so a base model answers by continuing it; the score is exact: 1 when the first run of digits in
the completion is the key, else 0. A cell of the grid is the mean over its samples.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import numpy as np

from jaxopd.data.retrieval import Needle, make_needles, place_needles
from jaxopd.distill.sampling import Sampler
from jaxopd.training import sharding

# Room for the 6-digit key however a tokenizer splits it (one token per digit at most), a leading space and a stop.
ANSWER_TOKENS = 12


@dataclasses.dataclass(frozen=True)
class Case:
    """One prompt of the grid: `tokens [length - ANSWER_TOKENS]` with the needle's tokens at `needle_start`."""

    length: int
    depth: float
    sample: int
    needle: Needle
    tokens: list[int]
    needle_start: int


def make_cases(tokenizer: Any, filler_ids: Sequence[int], lengths: Sequence[int], depths: Sequence[float],
               samples: int, seed: int) -> list[Case]:
    """Every (length, depth, sample) prompt: needle and filler offset drawn from a generator seeded by (seed,
    length, depth, sample), so a case does not depend on which other lengths or depths are asked for."""
    prefix = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    cases = []
    for length in lengths:
        prompt_len = length - ANSWER_TOKENS
        for depth in depths:
            for sample in range(samples):
                rng = np.random.default_rng([seed, length, round(depth * 10**6), sample])
                needle, = make_needles(rng)
                needle_ids, question_ids = tokenizer.encode(needle.statement), tokenizer.encode(needle.question)
                body = prompt_len - len(prefix) - len(needle_ids) - len(question_ids)
                if body < 0:
                    raise ValueError(
                        f"length {length}: the needle {needle.statement.strip()!r} ({len(needle_ids)} tokens), the "
                        f"question ({len(question_ids)} tokens), BOS ({len(prefix)}) and {ANSWER_TOKENS} answer "
                        f"tokens need {length - body} positions; use lengths of at least {length - body}")
                if len(filler_ids) < body:
                    raise ValueError(f"length {length} needs {body} filler tokens but the text has only "
                                     f"{len(filler_ids)}; give a longer --text or shorter --lengths")
                offset = int(rng.integers(0, len(filler_ids) - body + 1))
                tokens, (start,) = place_needles(filler_ids[offset:offset + body], [needle_ids], question_ids,
                                                 [depth], prefix)
                cases.append(Case(length, depth, sample, needle, tokens, start))
    return cases


def score_completion(completion: str, key: str) -> float:
    """1.0 when the first run of digits in `completion` is exactly `key` (no digit more or fewer), else 0.0."""
    digits = re.search(r"\d+", completion)
    return float(digits is not None and digits.group() == key)


def check_lengths(lengths: Sequence[int], max_position_embeddings: int, allow_beyond_window: bool) -> None:
    """Raises ValueError for lengths past the model's window unless they are asked for on purpose."""
    beyond = [length for length in lengths if length > max_position_embeddings]
    if beyond and not allow_beyond_window:
        raise ValueError(f"--lengths {beyond} exceed the model's max_position_embeddings={max_position_embeddings}; "
                         "drop them, or pass --allow_beyond_window to measure retrieval past the window on purpose")


def run_niah(model: Any, params: Any, tokenizer: Any, mesh: jax.sharding.Mesh, cases: Sequence[Case], *,
             batch_size: int = 8) -> list[dict[str, Any]]:
    """Greedy retrieval on every case (`batch_size` prompts per generation call): one record per case with its
    needle, needle_start, completion (text and token ids) and score."""
    records = []
    for length in sorted({case.length for case in cases}):
        group = [case for case in cases if case.length == length]
        sampler = Sampler(model, length - ANSWER_TOKENS, ANSWER_TOKENS, (tokenizer.eos_id,), tokenizer.pad_id)
        for first in range(0, len(group), batch_size):
            rows = group[first:first + batch_size]
            # Repeat the last row to a full batch: one compilation per length.
            prompts = np.asarray([case.tokens for case in rows] + [rows[-1].tokens] * (batch_size - len(rows)),
                                 np.int32)
            with sharding.mesh_context(mesh):  # greedy: the key is never drawn from
                output = sampler(params, prompts, np.full(len(prompts), prompts.shape[1], np.int32),
                                 jax.random.key(0), greedy=True)
            tokens, completion_lengths = np.asarray(output.tokens), np.asarray(output.lengths)
            for case, row, count in zip(rows, tokens, completion_lengths):
                completion = tokenizer.decode(row[:count])
                records.append({"length": case.length, "depth": case.depth, "sample": case.sample,
                                "name": case.needle.name, "key": case.needle.key, "needle_start": case.needle_start,
                                "completion": completion, "completion_ids": row[:count].tolist(),
                                "score": score_completion(completion, case.needle.key)})
    return records


def score_grid(records: Sequence[dict[str, Any]], lengths: Sequence[int], depths: Sequence[float]
               ) -> list[list[float]]:
    """Mean score of each cell, `[len(depths)][len(lengths)]` (rows are depths, as the figure draws them)."""
    return [[float(np.mean([r["score"] for r in records if r["length"] == length and r["depth"] == depth]))
             for length in lengths] for depth in depths]
