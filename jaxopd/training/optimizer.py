"""Optimizer and schedules: AdamW with a weight-decay mask and a frozen MoE balance bias, learning-rate schedules
(DeepSeek-V3's multi-phase one and plain warmup-cosine) and the token-based batch-size ramp.

Weight decay (decided here, once): every weight matrix and expert tensor decays, the embedding and unembedding
included (as GPT-2/nanoGPT and the Llama recipes do); norm scales and biases do not. The MoE `expert_bias`
(DeepSeek-V3 §2.1.2, aux-loss-free balancing) gets no optimizer update at all: `set_to_zero` keeps it out of Adam's
moments and of the decay, and the trainer moves it with `update_balance_bias` instead.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Any, Callable

import flax.core.meta as meta
import jax
import optax

from jaxopd.training.config import OptimizerConfig, ScheduleConfig

FROZEN_PARAMS = ("expert_bias",)


def learning_rate_schedule(schedule: ScheduleConfig) -> optax.Schedule:
    """The learning rate as a function of the optimizer step.

    kinds: "constant" (peak_lr); "warmup_cosine" (0 -> peak_lr linearly over warmup_steps, cosine to end_lr at
    decay_end, then end_lr); "deepseek_v3" (DeepSeek-V3 §4.2: linear warmup to peak_lr over warmup_steps, constant
    until decay_start, cosine to end_lr at decay_end, constant end_lr, then final_lr from final_step on).
    """
    kind = schedule.kind  # ScheduleConfig checked the kind and the order of the breakpoints
    if kind == "constant":
        return optax.constant_schedule(schedule.peak_lr)
    decay_start = schedule.decay_start if kind == "deepseek_v3" else schedule.warmup_steps
    pieces = [
        optax.linear_schedule(0.0, schedule.peak_lr, max(schedule.warmup_steps, 1)),
        optax.constant_schedule(schedule.peak_lr),
        optax.cosine_decay_schedule(schedule.peak_lr, max(schedule.decay_end - decay_start, 1),
                                    alpha=schedule.end_lr / schedule.peak_lr),
        optax.constant_schedule(schedule.end_lr),
    ]
    boundaries = [schedule.warmup_steps, decay_start, schedule.decay_end]
    if kind == "deepseek_v3" and schedule.final_step >= 0:
        pieces.append(optax.constant_schedule(schedule.final_lr))
        boundaries.append(schedule.final_step)
    return optax.join_schedules(pieces, boundaries)


@dataclasses.dataclass(frozen=True)
class BatchRamp:
    """Global batch size per step when it grows with the tokens consumed (DeepSeek-V3 §4.2: 3072 -> 15360
    sequences over the first 469B tokens).

    The size grows linearly in tokens from `start` to `final` over `ramp_tokens` and is rounded down to a multiple
    of `multiple` (the microbatch size: a step is a whole number of microbatches, so each size compiles once).
    `segments` holds (first step, batch size, tokens consumed before that step) for each size.
    """

    segments: tuple[tuple[int, int, int], ...]
    seq_len: int

    def batch_size(self, step: int) -> int:
        return self._segment(step)[1]

    def tokens_before(self, step: int) -> int:
        """Tokens consumed by steps 0 .. step-1."""
        first, size, tokens = self._segment(step)
        return tokens + (step - first) * size * self.seq_len

    def step_at_tokens(self, tokens: float) -> int:
        """The first step that starts with at least `tokens` consumed (to express token breakpoints in steps)."""
        index = max(bisect.bisect_right([t for _, _, t in self.segments], tokens) - 1, 0)
        first, size, before = self.segments[index]
        return first + math.ceil(max(tokens - before, 0) / (size * self.seq_len))

    def _segment(self, step: int) -> tuple[int, int, int]:
        return self.segments[bisect.bisect_right([s for s, _, _ in self.segments], step) - 1]


def batch_ramp(final: int, seq_len: int, multiple: int, start: int = 0, ramp_tokens: float = 0) -> BatchRamp:
    """Builds the ramp; `start=0` or `ramp_tokens=0` means a constant batch of `final` sequences."""
    if final % multiple:
        raise ValueError(f"batch_size={final} is not a multiple of microbatch_size={multiple}")
    if start <= 0 or ramp_tokens <= 0 or start >= final:
        return BatchRamp(((0, final, 0),), seq_len)
    sizes = range(max(start // multiple, 1) * multiple, final + 1, multiple)
    segments, step, tokens = [], 0, 0
    for size, next_size in zip(sizes, list(sizes[1:])):
        segments.append((step, size, tokens))
        # The ramp reaches next_size once (next_size - start) / (final - start) of ramp_tokens are consumed.
        threshold = (next_size - start) / (final - start) * ramp_tokens
        steps = max(math.ceil((threshold - tokens) / (size * seq_len)), 1)
        step, tokens = step + steps, tokens + steps * size * seq_len
    segments.append((step, final, tokens))
    return BatchRamp(tuple(segments), seq_len)


def param_labels(params: Any) -> Any:
    """'frozen' for params the optimizer must not touch (the MoE balance bias), 'trained' for the rest."""
    def label(path, _):
        return "frozen" if _leaf_name(path) in FROZEN_PARAMS else "trained"
    return _map_params(label, params)


def weight_decay_mask(params: Any) -> Any:
    """True where weight decay applies: not on norm scales (any path part naming a norm) nor biases."""
    def decays(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return not (any("norm" in n.lower() for n in names) or names[-1].endswith("bias"))
    return _map_params(decays, params)


def make_optimizer(optimizer: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW (clipping by global norm first) on trained params; the frozen ones get a zero update."""
    adamw = optax.chain(
        optax.clip_by_global_norm(optimizer.grad_clip_norm) if optimizer.grad_clip_norm > 0 else optax.identity(),
        optax.adamw(learning_rate_schedule(optimizer.schedule), b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps,
                    weight_decay=optimizer.weight_decay, mask=weight_decay_mask),
    )
    return optax.multi_transform({"trained": adamw, "frozen": optax.set_to_zero()}, param_labels)


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def _map_params(fn: Callable, params: Any) -> Any:
    """tree_map_with_path that treats Flax's logical-partitioning boxes as leaves: the optimizer state is first built
    on boxed abstract params so that its moments carry the params' logical axis names."""
    return jax.tree_util.tree_map_with_path(fn, params, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
