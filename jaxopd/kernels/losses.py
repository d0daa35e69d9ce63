"""Losses for pretraining and on-policy distillation, computed without the full float32 [batch, seq, vocab] logits.

Every function that starts from hidden states runs over the sequence in chunks of `chunk_size` positions: the chunk's
logits are formed in float32, reduced to per-position numbers and dropped. The per-chunk function is wrapped in
`jax.checkpoint`, so the backward pass recomputes each chunk's logits instead of storing them.

Public API (shapes in the letters of jaxopd/kernels/__init__.py; W is the teacher's width):
  chunked_cross_entropy(hidden [B,T,D], unembed [D,V], targets [B,T] int, loss_mask [B,T], *, chunk_size,
      z_loss_weight=0.0) -> {"loss_sum", "z_loss_sum", "token_count", "correct_count"} (float32 scalars;
      the training loss is (loss_sum + z_loss_sum) / token_count)
  token_logprobs(hidden [B,T,D], unembed [D,V], tokens [B,T] int, *, chunk_size, temperature=1.0) -> [B,T] float32
  reverse_kl(student_logits [..., V], teacher_logits [..., V], *, temperature=1.0) -> [...]    KL(student || teacher)
  forward_kl(student_logits, teacher_logits, *, temperature=1.0) -> [...]                      KL(teacher || student)
  generalized_jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0) -> [...]        GKD's JSD(beta)
  chunked_divergence(student_hidden [B,T,D], student_unembed [D,V], teacher_hidden [B,T,W], teacher_unembed [W,V],
      *, chunk_size, divergence="reverse_kl"|"forward_kl"|"jsd", beta=0.5, temperature=1.0) -> [B,T] float32
  topk_logprobs(hidden [B,T,D], unembed [D,V], *, top_k, chunk_size, temperature=1.0)
      -> (ids [B,T,U] int32, logprobs [B,T,U] float32, tail_logprob [B,T] float32)     the teacher's top-k and the rest
  chunked_topk_divergence(student_hidden [B,T,D], student_unembed [D,V], teacher_ids [B,T,U],
      teacher_logprobs [B,T,U], teacher_tail_logprob [B,T], *, chunk_size, divergence="forward_kl"|"reverse_kl",
      temperature=1.0) -> [B,T] float32       KL over the U + 1 buckets: the teacher's top-k tokens and one tail

The policy-gradient and advantage math on sampled tokens' log-probs is in jaxopd/distill/policy_gradient.py.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
TOPK_DIVERGENCES = ("reverse_kl", "forward_kl")


# ----------------------------------------------------------------------------------------------------------------------
# Chunking machinery shared by every hidden-state loss.


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (sequence positions per logits chunk)")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0 (logits are divided by it)")


def _check_hidden_unembed(name: str, hidden: Array, unembed: Array) -> None:
    if hidden.ndim != 3 or unembed.ndim != 2 or hidden.shape[-1] != unembed.shape[0]:
        raise ValueError(
            f"{name}: hidden {hidden.shape} and unembed {unembed.shape} must be [batch, seq, d] and [d, vocab]"
        )


def _map_seq_chunks(chunk_fn: Callable[..., Any], weights: Any, seq_arrays: tuple[Array, ...], chunk_size: int) -> Any:
    """Runs `chunk_fn(weights, *chunks)` over consecutive sequence chunks and stitches the outputs back together.

    seq_arrays: arrays shaped [b, t, ...]; each call sees [b, chunk_size, ...] slices and returns a pytree of
    [b, chunk_size, ...] arrays. t need not divide by chunk_size: the tail is zero-padded and the padded outputs cut.
    """
    batch, seq = seq_arrays[0].shape[:2]
    chunk_size = min(chunk_size, seq)
    num_chunks = -(-seq // chunk_size)
    pad = num_chunks * chunk_size - seq

    def to_chunks(x):  # [b, t, ...] -> [num_chunks, b, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch, num_chunks, chunk_size, *x.shape[2:]), 1, 0)

    def from_chunks(y):  # [num_chunks, b, chunk, ...] -> [b, t, ...]
        y = jnp.moveaxis(y, 0, 1).reshape(batch, num_chunks * chunk_size, *y.shape[3:])
        return y[:, :seq]

    # Rematerialize each chunk: the backward pass keeps only the chunk's inputs, never its [b, chunk, V] logits.
    remat_fn = jax.checkpoint(chunk_fn)
    outputs = jax.lax.map(lambda chunks: remat_fn(weights, *chunks), tuple(to_chunks(x) for x in seq_arrays))
    return jax.tree.map(from_chunks, outputs)


def _logits(hidden_BxIxD: Array, unembed_DxV: Array, temperature: float) -> Array:
    # Inputs stay in their dtype (bf16 weights are not copied to float32); the matmul accumulates in float32.
    logits_BxIxV = jnp.einsum("bid,dv->biv", hidden_BxIxD, unembed_DxV, preferred_element_type=jnp.float32)
    return logits_BxIxV / temperature if temperature != 1.0 else logits_BxIxV


def _target_stats_chunk(unembed_DxV, hidden_BxIxD, tokens_BxI, *, temperature):
    logits_BxIxV = _logits(hidden_BxIxD, unembed_DxV, temperature)
    log_normalizer_BxI = jax.nn.logsumexp(logits_BxIxV, axis=-1)
    target_logit_BxI = jnp.take_along_axis(logits_BxIxV, tokens_BxI[..., None], axis=-1)[..., 0]
    correct_BxI = (jnp.argmax(logits_BxIxV, axis=-1) == tokens_BxI).astype(jnp.float32)
    return target_logit_BxI - log_normalizer_BxI, log_normalizer_BxI, correct_BxI


def _target_stats(hidden, unembed, tokens, chunk_size, temperature):
    """Per position: (log-prob of `tokens`, log partition function log Z, argmax == token), all [b, t] float32."""
    chunk_fn = functools.partial(_target_stats_chunk, temperature=temperature)
    return _map_seq_chunks(chunk_fn, unembed, (hidden, tokens), chunk_size)


# ----------------------------------------------------------------------------------------------------------------------
# Cross-entropy and token scoring.


def chunked_cross_entropy(
    hidden: Array,
    unembed: Array,
    targets: Array,
    loss_mask: Array,
    *,
    chunk_size: int,
    z_loss_weight: float = 0.0,
) -> dict[str, Array]:
    """Summed next-token cross-entropy from hidden states, chunked over the sequence.

    Args:
      hidden: [batch, seq, d] final-norm hidden states (any float dtype).
      unembed: [d, vocab] output projection.
      targets: [batch, seq] int token ids to predict.
      loss_mask: [batch, seq] weights (0 on padding / document boundaries).
      chunk_size: sequence positions per logits chunk.
      z_loss_weight: weight of the PaLM z-loss (Chowdhery et al. 2022, sec. 5): z_loss_weight * log(Z)^2 per token.
    Returns:
      dict of float32 scalars: loss_sum = sum(mask * CE), z_loss_sum = z_loss_weight * sum(mask * log(Z)^2),
      token_count = sum(mask), correct_count = sum(mask * [argmax == target]). Sums, so callers can add them across
      micro-batches and hosts before dividing by token_count.
    """
    _check_chunk_size(chunk_size)
    _check_hidden_unembed("chunked_cross_entropy", hidden, unembed)
    if targets.shape != hidden.shape[:2] or loss_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"chunked_cross_entropy: targets {targets.shape} and loss_mask {loss_mask.shape} must both be "
            f"[batch, seq] = {hidden.shape[:2]}"
        )
    logprob, log_normalizer, correct = _target_stats(hidden, unembed, targets, chunk_size, 1.0)
    mask = loss_mask.astype(jnp.float32)
    return {
        "loss_sum": -jnp.sum(mask * logprob),
        "z_loss_sum": z_loss_weight * jnp.sum(mask * jnp.square(log_normalizer)),
        "token_count": jnp.sum(mask),
        "correct_count": jax.lax.stop_gradient(jnp.sum(mask * correct)),
    }


def token_logprobs(
    hidden: Array, unembed: Array, tokens: Array, *, chunk_size: int, temperature: float = 1.0
) -> Array:
    """log softmax(hidden @ unembed / temperature) at `tokens`.

    hidden [batch, seq, d], unembed [d, vocab], tokens [batch, seq] int -> [batch, seq] float32.

    Used to score sampled tokens under the student (with gradient) and the teacher (without).
    """
    _check_chunk_size(chunk_size)
    _check_temperature(temperature)
    _check_hidden_unembed("token_logprobs", hidden, unembed)
    if tokens.shape != hidden.shape[:2]:
        raise ValueError(f"token_logprobs: tokens {tokens.shape} must be [batch, seq] = {hidden.shape[:2]}")
    return _target_stats(hidden, unembed, tokens, chunk_size, temperature)[0]


# ----------------------------------------------------------------------------------------------------------------------
# Full-vocabulary divergences between student and teacher next-token distributions.


def reverse_kl(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0) -> Array:
    """KL(pi_student || pi_teacher) over the last (vocab) axis: [..., vocab] x2 -> [...] float32 (mode seeking)."""
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_s) * (log_s - log_t), axis=-1)


def forward_kl(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0) -> Array:
    """KL(pi_teacher || pi_student) over the last (vocab) axis: [..., vocab] x2 -> [...] float32 (mean seeking)."""
    return reverse_kl(teacher_logits, student_logits, temperature=temperature)


def generalized_jsd(
    student_logits: Array, teacher_logits: Array, *, beta: float = 0.5, temperature: float = 1.0
) -> Array:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1), TRL's beta convention.

    With M = beta * pi_teacher + (1 - beta) * pi_student:
      JSD(beta) = beta * KL(pi_teacher || M) + (1 - beta) * KL(pi_student || M).
    JSD(beta) / beta -> forward KL as beta -> 0 and JSD(beta) / (1 - beta) -> reverse KL as beta -> 1; like TRL, the
    endpoints beta = 0 and beta = 1 are defined as the forward and reverse KL themselves. [..., vocab] x2 -> [...].
    """
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature=temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature=temperature)
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    log_m = jnp.logaddexp(log_t + jnp.log(beta), log_s + jnp.log1p(-beta))
    kl_teacher_m = jnp.sum(jnp.exp(log_t) * (log_t - log_m), axis=-1)
    kl_student_m = jnp.sum(jnp.exp(log_s) * (log_s - log_m), axis=-1)
    return beta * kl_teacher_m + (1.0 - beta) * kl_student_m


def _divergence_chunk(weights, student_hidden_BxIxD, teacher_hidden_BxIxW, *, divergence, beta, temperature):
    student_unembed_DxV, teacher_unembed_WxV = weights
    student_BxIxV = _logits(student_hidden_BxIxD, student_unembed_DxV, 1.0)
    teacher_BxIxV = _logits(teacher_hidden_BxIxW, teacher_unembed_WxV, 1.0)
    if divergence == "reverse_kl":
        return reverse_kl(student_BxIxV, teacher_BxIxV, temperature=temperature)
    if divergence == "forward_kl":
        return forward_kl(student_BxIxV, teacher_BxIxV, temperature=temperature)
    return generalized_jsd(student_BxIxV, teacher_BxIxV, beta=beta, temperature=temperature)


def chunked_divergence(
    student_hidden: Array,
    student_unembed: Array,
    teacher_hidden: Array,
    teacher_unembed: Array,
    *,
    chunk_size: int,
    divergence: str = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Array:
    """Per-position full-vocabulary divergence between student and teacher, chunked over the sequence.

    Args:
      student_hidden: [batch, seq, d_student]; student_unembed: [d_student, vocab].
      teacher_hidden: [batch, seq, d_teacher]; teacher_unembed: [d_teacher, vocab]. The teacher is a fixed target:
        its inputs are wrapped in stop_gradient.
      divergence: "reverse_kl" (KL(student || teacher)), "forward_kl" (KL(teacher || student)) or "jsd"
        (generalized_jsd with `beta`).
    Returns:
      [batch, seq] float32 divergence per position; the caller masks and averages.
    """
    _check_chunk_size(chunk_size)
    _check_temperature(temperature)
    _check_hidden_unembed("chunked_divergence (student)", student_hidden, student_unembed)
    _check_hidden_unembed("chunked_divergence (teacher)", teacher_hidden, teacher_unembed)
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} must be one of {DIVERGENCES}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta!r} must lie in [0, 1] (0 = forward KL, 1 = reverse KL)")
    if student_hidden.shape[:2] != teacher_hidden.shape[:2] or student_unembed.shape[1] != teacher_unembed.shape[1]:
        raise ValueError(
            f"chunked_divergence: student (hidden {student_hidden.shape}, unembed {student_unembed.shape}) and teacher "
            f"(hidden {teacher_hidden.shape}, unembed {teacher_unembed.shape}) must share [batch, seq] and vocab"
        )
    chunk_fn = functools.partial(_divergence_chunk, divergence=divergence, beta=beta, temperature=temperature)
    weights = (student_unembed, jax.lax.stop_gradient(teacher_unembed))
    return _map_seq_chunks(chunk_fn, weights, (student_hidden, jax.lax.stop_gradient(teacher_hidden)), chunk_size)


# ----------------------------------------------------------------------------------------------------------------------
# Top-k divergences: the teacher's top-k tokens plus one tail bucket for the rest of the vocabulary, so a teacher's
# distribution travels as U numbers per position instead of its hidden states and unembedding.


def _check_top_k(top_k: int, vocab: int) -> None:
    if not isinstance(top_k, int) or not 1 <= top_k <= vocab:
        raise ValueError(f"top_k={top_k!r} must be an int in [1, vocab={vocab}] (teacher tokens kept per position)")


def _tail_log_mass(logits_BxIxV: Array, ids_BxIxU: Array) -> Array:
    """log sum(exp(logits)) over the tokens outside the distinct `ids` `[b, i]`: the tail bucket, up to log Z.

    Summed over the complement itself rather than as log(Z - sum over the top-k), which cancels catastrophically in
    float32 exactly when the top-k hold nearly all the mass. Needs U < V (an empty complement has no finite log).
    """
    outside_BxIxV = jnp.put_along_axis(logits_BxIxV, ids_BxIxU, -jnp.inf, axis=-1, inplace=False)
    return jax.nn.logsumexp(outside_BxIxV, axis=-1)


def _topk_chunk(unembed_DxV, hidden_BxIxD, *, top_k, temperature):
    logits_BxIxV = _logits(hidden_BxIxD, unembed_DxV, temperature)
    log_z_BxI = jax.nn.logsumexp(logits_BxIxV, axis=-1)
    top_BxIxU, ids_BxIxU = jax.lax.top_k(logits_BxIxV, top_k)
    if top_k < logits_BxIxV.shape[-1]:
        tail_BxI = _tail_log_mass(logits_BxIxV, ids_BxIxU) - log_z_BxI
    else:  # the top-k are the whole vocabulary: the tail bucket is empty
        tail_BxI = jnp.full_like(log_z_BxI, -jnp.inf)
    return ids_BxIxU.astype(jnp.int32), top_BxIxU - log_z_BxI[..., None], tail_BxI


def topk_logprobs(
    hidden: Array, unembed: Array, *, top_k: int, chunk_size: int, temperature: float = 1.0
) -> tuple[Array, Array, Array]:
    """The top_k most likely next tokens of softmax(hidden @ unembed / temperature) and the mass of all others.

    hidden [batch, seq, d], unembed [d, vocab] -> (ids [batch, seq, top_k] int32 in descending probability,
    logprobs [batch, seq, top_k] float32 their log-probs, tail_logprob [batch, seq] float32 = log(1 - sum of their
    probabilities), -inf when top_k = vocab). The teacher's side of `chunked_topk_divergence`, without gradient.
    """
    _check_chunk_size(chunk_size)
    _check_temperature(temperature)
    _check_hidden_unembed("topk_logprobs", hidden, unembed)
    _check_top_k(top_k, unembed.shape[1])
    chunk_fn = functools.partial(_topk_chunk, top_k=top_k, temperature=temperature)
    return jax.lax.stop_gradient(_map_seq_chunks(chunk_fn, unembed, (hidden,), chunk_size))


def _bucket_kl(log_p: Array, log_q: Array) -> Array:
    """sum_b p_b (log p_b - log q_b) over the last axis of log-probabilities."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _topk_divergence_chunk(unembed_DxV, hidden_BxIxD, ids_BxIxU, teacher_BxIxU, teacher_tail_BxI, *, divergence,
                           temperature):
    logits_BxIxV = _logits(hidden_BxIxD, unembed_DxV, temperature)
    log_z_BxI = jax.nn.logsumexp(logits_BxIxV, axis=-1)
    student_BxIxU = jnp.take_along_axis(logits_BxIxV, ids_BxIxU, axis=-1) - log_z_BxI[..., None]
    if ids_BxIxU.shape[-1] < logits_BxIxV.shape[-1]:  # else the tail is empty for both: no bucket
        student_tail_BxI = _tail_log_mass(logits_BxIxV, ids_BxIxU) - log_z_BxI
        student_BxIxU = jnp.concatenate([student_BxIxU, student_tail_BxI[..., None]], axis=-1)
        teacher_BxIxU = jnp.concatenate([teacher_BxIxU, teacher_tail_BxI[..., None]], axis=-1)
    if divergence == "forward_kl":
        return _bucket_kl(teacher_BxIxU, student_BxIxU)
    return _bucket_kl(student_BxIxU, teacher_BxIxU)


def chunked_topk_divergence(
    student_hidden: Array,
    student_unembed: Array,
    teacher_ids: Array,
    teacher_logprobs: Array,
    teacher_tail_logprob: Array,
    *,
    chunk_size: int,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
) -> Array:
    """Per-position KL between student and teacher over U + 1 buckets: the teacher's top-k tokens and the tail.

    The coarse-grained distributions put on each of the teacher's top-k tokens its own probability and on the tail
    bucket the mass of every other token; KL between them is a lower bound of the full KL (data processing) and
    equals it when top_k = vocab. The student's bucket log-probs come from its own chunked logits (gathered at
    `teacher_ids`, the tail summed over the complement).

    Args:
      student_hidden: [batch, seq, d]; student_unembed: [d, vocab].
      teacher_ids, teacher_logprobs, teacher_tail_logprob: `topk_logprobs` of the teacher at the same positions and
        the same `temperature` ([batch, seq, top_k] int, [batch, seq, top_k], [batch, seq]); a fixed target.
      divergence: "forward_kl" (sum_b p_b log(p_b / q_b), teacher p) or "reverse_kl" (sum_b q_b log(q_b / p_b)).
    Returns:
      [batch, seq] float32 divergence per position; the caller masks and averages.
    """
    _check_chunk_size(chunk_size)
    _check_temperature(temperature)
    _check_hidden_unembed("chunked_topk_divergence", student_hidden, student_unembed)
    if divergence not in TOPK_DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} must be one of {TOPK_DIVERGENCES}")
    rows_seq = student_hidden.shape[:2]
    if (teacher_ids.ndim != 3 or teacher_ids.shape[:2] != rows_seq or teacher_logprobs.shape != teacher_ids.shape
            or teacher_tail_logprob.shape != rows_seq):
        raise ValueError(
            f"chunked_topk_divergence: teacher_ids {teacher_ids.shape}, teacher_logprobs {teacher_logprobs.shape} and "
            f"teacher_tail_logprob {teacher_tail_logprob.shape} must be [batch, seq, top_k] x2 and [batch, seq] with "
            f"[batch, seq] = {rows_seq}"
        )
    _check_top_k(teacher_ids.shape[-1], student_unembed.shape[1])
    chunk_fn = functools.partial(_topk_divergence_chunk, divergence=divergence, temperature=temperature)
    teacher = jax.lax.stop_gradient((teacher_logprobs.astype(jnp.float32), teacher_tail_logprob.astype(jnp.float32)))
    return _map_seq_chunks(chunk_fn, student_unembed, (student_hidden, teacher_ids, *teacher), chunk_size)
