"""Loss by position: how well a model predicts token i of a long text, averaged over position buckets.

Sequences of max(lengths) tokens are cut from a token stream at seeded offsets and scored in one forward pass each
(`teacher.make_scorer`: chunked log-probs, never float32 `[rows, seq, vocab]`). The loss of token i is
-log p(x_i | x_<i), for i >= 1 (token 0 has no context). The sorted lengths l_1 < ... < l_n are bucket ends: bucket k
holds tokens i in [l_{k-1}, l_k) with l_0 = 1. Past the trained window the loss climbs: the model never saw those
positions (or their RoPE angles) in training.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from jaxopd.distill.teacher import make_scorer
from jaxopd.training import sharding


def check_bucket_ends(lengths: Sequence[int]) -> None:
    if len(lengths) == 0 or lengths[0] < 2 or any(b <= a for a, b in zip(lengths, lengths[1:])):
        raise ValueError(f"--lengths {list(lengths)} must be increasing bucket ends, each >= 2 (the first token "
                         "has no loss)")


def bucket_losses(token_losses: np.ndarray, lengths: Sequence[int]) -> list[dict[str, float]]:
    """token_losses `[rows, max(lengths)]` (column i: the loss of token i; column 0 ignored) -> per bucket
    [l_{k-1}, l_k) its start, end, mean loss over rows and positions, perplexity exp(loss) and token count."""
    check_bucket_ends(lengths)
    buckets = []
    for start, end in zip([1, *lengths[:-1]], lengths):
        values = np.asarray(token_losses[:, start:end], np.float64)
        loss = float(values.mean())
        buckets.append({"start": int(start), "end": int(end), "loss": loss, "perplexity": float(np.exp(loss)),
                        "tokens": int(values.size)})
    return buckets


def sample_windows(stream: Sequence[int], length: int, count: int, seed: int) -> np.ndarray:
    """`[count, length]` int32 windows of `stream` starting at offsets drawn with `seed`."""
    if len(stream) < length:
        raise ValueError(f"the text has {len(stream)} tokens, fewer than the longest of --lengths ({length}); give a "
                         "longer --text or shorter --lengths")
    offsets = np.random.default_rng(seed).integers(0, len(stream) - length + 1, size=count)
    stream = np.asarray(stream, np.int32)
    return np.stack([stream[offset:offset + length] for offset in offsets])


def token_losses(model: Any, params: Any, mesh: jax.sharding.Mesh, tokens: np.ndarray, *, batch_size: int = 1,
                 chunk_size: int = 512) -> np.ndarray:
    """tokens `[rows, seq]` int32 -> `[rows, seq]` float32 loss of each token given the ones before it (column 0,
    which has no context, is 0), `batch_size` rows per forward pass."""
    rows, length = tokens.shape
    score = make_scorer(model, chunk_size)
    losses = np.zeros((rows, length), np.float32)
    for first in range(0, rows, batch_size):
        chunk = tokens[first:first + batch_size]
        batch = {"tokens": chunk, "targets": np.concatenate([chunk[:, 1:], np.zeros_like(chunk[:, :1])], axis=1),
                 "positions": np.broadcast_to(np.arange(length, dtype=np.int32), chunk.shape),
                 "segment_ids": np.ones_like(chunk)}
        with sharding.mesh_context(mesh):
            logprobs = np.asarray(score(params, batch)["logprobs"])
        # Column t scored target t + 1.
        losses[first:first + len(chunk), 1:] = -logprobs[:, :-1]
    return losses
