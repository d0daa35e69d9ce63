"""Losses for pretraining and on-policy distillation, computed without the full float32 [batch, seq, vocab] logits.

Every function that starts from hidden states runs over the sequence in chunks of `chunk_size` positions: the chunk's
logits are formed in float32, reduced to per-position numbers and dropped. The per-chunk function is wrapped in
`jax.checkpoint`, so the backward pass recomputes each chunk's logits instead of storing them.

Public API (shapes: b = batch, t = seq, d = model width, V = vocab):
  chunked_cross_entropy(hidden [b,t,d], unembed [d,V], targets [b,t] int, loss_mask [b,t], *, chunk_size,
      z_loss_weight=0.0) -> {"loss_sum", "z_loss_sum", "token_count", "correct_count"} (float32 scalars;
      the training loss is (loss_sum + z_loss_sum) / token_count)
  token_logprobs(hidden [b,t,d], unembed [d,V], tokens [b,t] int, *, chunk_size, temperature=1.0) -> [b,t] float32
  reverse_kl(student_logits [..., V], teacher_logits [..., V], *, temperature=1.0) -> [...]    KL(student || teacher)
  forward_kl(student_logits, teacher_logits, *, temperature=1.0) -> [...]                      KL(teacher || student)
  generalized_jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0) -> [...]        GKD's JSD(beta)
  chunked_divergence(student_hidden [b,t,ds], student_unembed [ds,V], teacher_hidden [b,t,dt], teacher_unembed [dt,V],
      *, chunk_size, divergence="reverse_kl"|"forward_kl"|"jsd", beta=0.5, temperature=1.0) -> [b,t] float32
  sampled_reverse_kl_advantages(student_logprobs [b,t], teacher_logprobs [b,t], mask [b,t], coef=1.0) -> [b,t]
  policy_gradient_loss(logprobs [b,t], sampler_logprobs [b,t], advantages [b,t], mask [b,t], *, clip_epsilon=None,
      advantage_clip=None, normalize="tokens"|"sequences") -> (loss scalar, metrics dict)
  group_normalized_advantages(rewards [prompts * group_size], group_size, eps=1e-6) -> [prompts * group_size]
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


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


def _logits(hidden_BxCxD: Array, unembed_DxV: Array, temperature: float) -> Array:
    # Inputs stay in their dtype (bf16 weights are not copied to float32); the matmul accumulates in float32.
    logits_BxCxV = jnp.einsum("bcd,dv->bcv", hidden_BxCxD, unembed_DxV, preferred_element_type=jnp.float32)
    return logits_BxCxV / temperature if temperature != 1.0 else logits_BxCxV


def _target_stats_chunk(unembed_DxV, hidden_BxCxD, tokens_BxC, *, temperature):
    logits_BxCxV = _logits(hidden_BxCxD, unembed_DxV, temperature)
    log_normalizer_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_logit_BxC = jnp.take_along_axis(logits_BxCxV, tokens_BxC[..., None], axis=-1)[..., 0]
    correct_BxC = (jnp.argmax(logits_BxCxV, axis=-1) == tokens_BxC).astype(jnp.float32)
    return target_logit_BxC - log_normalizer_BxC, log_normalizer_BxC, correct_BxC


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


def _divergence_chunk(weights, student_hidden_BxCxD, teacher_hidden_BxCxE, *, divergence, beta, temperature):
    student_unembed_DxV, teacher_unembed_ExV = weights
    student_BxCxV = _logits(student_hidden_BxCxD, student_unembed_DxV, 1.0)
    teacher_BxCxV = _logits(teacher_hidden_BxCxE, teacher_unembed_ExV, 1.0)
    if divergence == "reverse_kl":
        return reverse_kl(student_BxCxV, teacher_BxCxV, temperature=temperature)
    if divergence == "forward_kl":
        return forward_kl(student_BxCxV, teacher_BxCxV, temperature=temperature)
    return generalized_jsd(student_BxCxV, teacher_BxCxV, beta=beta, temperature=temperature)


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
# Sampled-token objectives: on-policy distillation and policy gradient.


def sampled_reverse_kl_advantages(
    student_logprobs: Array, teacher_logprobs: Array, mask: Array, coef: float = 1.0
) -> Array:
    """Per-token OPD advantage -coef * (log pi_student(x_t) - log pi_teacher(x_t)), 0 where mask is 0: [batch, seq].

    With x_t sampled from the student, E[log pi_s(x_t) - log pi_t(x_t)] is exactly KL(pi_s || pi_t) at that prefix, so
    this is the one-sample estimate of the negated reverse KL (discount 0: no returns are accumulated). No gradient.
    """
    if not student_logprobs.shape == teacher_logprobs.shape == mask.shape:
        raise ValueError(
            f"sampled_reverse_kl_advantages: student_logprobs {student_logprobs.shape}, teacher_logprobs "
            f"{teacher_logprobs.shape} and mask {mask.shape} must have the same [batch, seq] shape"
        )
    advantages = -coef * (student_logprobs.astype(jnp.float32) - teacher_logprobs.astype(jnp.float32))
    return jax.lax.stop_gradient(jnp.where(mask > 0, advantages, 0.0))


def policy_gradient_loss(
    logprobs: Array,
    sampler_logprobs: Array,
    advantages: Array,
    mask: Array,
    *,
    clip_epsilon: Optional[float] = None,
    advantage_clip: Optional[float] = None,
    normalize: str = "tokens",
) -> tuple[Array, dict[str, Array]]:
    """Importance-sampled policy-gradient loss, optionally PPO-clipped (Schulman et al. 2017, eq. 7).

    ratio_t = exp(logprobs_t - stop_gradient(sampler_logprobs_t)); advantages are always stop_gradient.
    Per-token objective: ratio * A, or with clip_epsilon: min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A).
    loss = -(masked mean of the objective), averaged over all tokens ("tokens") or per sequence then over sequences
    that have at least one token ("sequences").

    Args:
      logprobs: [batch, seq] log-probs of the sampled tokens under the policy being trained.
      sampler_logprobs: [batch, seq] log-probs under the policy that sampled them (equal on-policy: ratio = 1).
      advantages: [batch, seq]; mask: [batch, seq] (1 on completion tokens).
      advantage_clip: if set, advantages are clipped to [-advantage_clip, advantage_clip] first.
    Returns:
      (loss scalar, metrics): metrics are stop-gradient scalars ratio_mean, clip_fraction, advantage_mean,
      sampler_kl (k1 estimate of KL(sampler || policy)), token_count.
    """
    if not logprobs.shape == sampler_logprobs.shape == advantages.shape == mask.shape or logprobs.ndim != 2:
        raise ValueError(
            f"policy_gradient_loss: logprobs {logprobs.shape}, sampler_logprobs {sampler_logprobs.shape}, advantages "
            f"{advantages.shape} and mask {mask.shape} must all be the same [batch, seq] shape"
        )
    if normalize not in ("tokens", "sequences"):
        raise ValueError(f"normalize={normalize!r} must be 'tokens' or 'sequences'")
    if clip_epsilon is not None and not clip_epsilon > 0:
        raise ValueError(f"clip_epsilon={clip_epsilon!r} must be > 0 or None (no clipping)")
    if advantage_clip is not None and not advantage_clip > 0:
        raise ValueError(f"advantage_clip={advantage_clip!r} must be > 0 or None")

    mask = mask.astype(jnp.float32)
    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    if advantage_clip is not None:
        advantages = jnp.clip(advantages, -advantage_clip, advantage_clip)
    log_ratio = logprobs.astype(jnp.float32) - jax.lax.stop_gradient(sampler_logprobs.astype(jnp.float32))
    ratio = jnp.exp(log_ratio)
    objective = ratio * advantages
    clipped = jnp.zeros_like(ratio)
    if clip_epsilon is not None:
        clipped_objective = jnp.clip(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon) * advantages
        clipped = (clipped_objective < objective).astype(jnp.float32)
        objective = jnp.minimum(objective, clipped_objective)

    token_count = jnp.sum(mask)
    token_mean = lambda x: jnp.sum(mask * x) / jnp.maximum(token_count, 1.0)
    if normalize == "tokens":
        loss = -token_mean(objective)
    else:
        per_sequence_count = jnp.sum(mask, axis=1)
        per_sequence = jnp.sum(mask * objective, axis=1) / jnp.maximum(per_sequence_count, 1.0)
        has_tokens = (per_sequence_count > 0).astype(jnp.float32)
        loss = -jnp.sum(per_sequence * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)
    metrics = {
        "ratio_mean": token_mean(ratio),
        "clip_fraction": token_mean(clipped),
        "advantage_mean": token_mean(advantages),
        "sampler_kl": token_mean(-log_ratio),
        "token_count": token_count,
    }
    return loss, jax.lax.stop_gradient(metrics)


def group_normalized_advantages(rewards: Array, group_size: int, eps: float = 1e-6) -> Array:
    """GRPO baseline (Shao et al. 2024, sec. 4.1.2): (r - group mean) / (group std + eps).

    rewards: [num_prompts * group_size], the group_size samples of each prompt contiguous. std is the population std
    (ddof=0). Returns the same shape, float32; broadcast it over the completion tokens for policy_gradient_loss.
    """
    if rewards.ndim != 1 or group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"group_normalized_advantages: rewards {rewards.shape} must be 1-D with a length divisible by "
            f"group_size={group_size} (samples of one prompt contiguous)"
        )
    grouped = rewards.astype(jnp.float32).reshape(-1, group_size)
    centered = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    return (centered / (jnp.std(grouped, axis=1, keepdims=True) + eps)).reshape(-1)
