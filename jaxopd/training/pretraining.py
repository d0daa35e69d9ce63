"""The batch source and evaluator of pretraining (config.loss "ce"): the grain pipeline's packed rows, and the
objective's loss on held-out documents."""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np

from jaxopd.data.pipeline import make_pipeline
from jaxopd.training import metrics as metrics_lib, sharding
from jaxopd.training.config import RunConfig
from jaxopd.training.flops import flops_per_token
from jaxopd.training.optimizer import batch_ramp
from jaxopd.training.state import Run


class StepBatches:
    """This process's rows of each step's batch, `[microbatches, rows, seq]` numpy.

    The data is cut into `config.data_shards` pipelines (0: one per process), each process reading its own
    contiguous group; so with data_shards fixed the global batches are the same whatever the number of processes.
    """

    def __init__(self, config: RunConfig, split: str = "train", num_batches: Optional[int] = None):
        process_count, process_index = jax.process_count(), jax.process_index()
        shards = config.data_shards or process_count
        if shards % process_count or config.microbatch_size % shards:
            raise ValueError(f"data_shards={shards} must be a multiple of the {process_count} processes and divide "
                             f"microbatch_size={config.microbatch_size}")
        per_process = shards // process_count
        self.iterators = [
            make_pipeline(config.data, seq_len=config.seq_len, batch_size=config.microbatch_size // shards,
                          seed=config.seed, process_index=process_index * per_process + i, process_count=shards,
                          split=split, num_batches=num_batches)
            for i in range(per_process)]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.next(1)

    def next(self, microbatches: int) -> dict[str, np.ndarray]:
        rows = [[next(iterator) for iterator in self.iterators] for _ in range(microbatches)]
        return {key: np.stack([np.concatenate([part[key] for part in row]) for row in rows]) for key in rows[0][0]}

    def get_state(self) -> list[Any]:
        return [iterator.get_state() for iterator in self.iterators]

    def set_state(self, state: list[Any]) -> None:
        if len(state) != len(self.iterators):
            raise ValueError(f"checkpointed data state has {len(state)} shards for this process, the run has "
                             f"{len(self.iterators)}: resume with the same data_shards and process count")
        for iterator, shard_state in zip(self.iterators, state):
            iterator.set_state(shard_state)


class PretrainingSource:
    """Each step's packed rows, `batch_ramp.batch_size(step)` of them, as global arrays on the run's mesh."""

    same_state_on_every_process = False  # each process's iterator position belongs to its shard of the data

    def __init__(self, config: RunConfig, run: Run):
        self.config, self.mesh = config, run.mesh
        self.batches = StepBatches(config)
        self.ramp = batch_ramp(config.batch_size, config.seq_len, config.microbatch_size, config.batch_ramp.start,
                               config.batch_ramp.tokens)
        self.flops_per_token = flops_per_token(config.model, config.seq_len, training=True)

    def next_batch(self, step: int, state: dict[str, Any]) -> tuple[dict[str, jax.Array], dict[str, float]]:
        microbatches = self.ramp.batch_size(step) // self.config.microbatch_size
        batch = sharding.global_batch(self.batches.next(microbatches), self.mesh, leading_axes=1)
        tokens = float(microbatches * self.config.microbatch_size * self.config.seq_len)
        return batch, {"tokens": tokens, "flops/training": tokens * self.flops_per_token}

    def get_state(self) -> list[Any]:
        return self.batches.get_state()

    def set_state(self, state: list[Any]) -> None:
        self.batches.set_state(state)


class PretrainingEvaluator:
    """Token-weighted mean of the objective's metrics over data.eval_batches held-out microbatches, as eval/<name>;
    at the start also the unigram entropy of the training targets (`unigram_entropy_batches` > 0)."""

    headline = ("eval/ce_loss",)

    def __init__(self, config: RunConfig, run: Run):
        self.config, self.run = config, run

    def start(self, params: Any) -> dict[str, float]:
        values = {}
        if self.config.unigram_entropy_batches > 0:
            values["unigram_entropy"] = unigram_entropy(self.config, self.config.unigram_entropy_batches)
        if self.config.eval_every > 0:
            values.update(self(params))
        return values

    def __call__(self, params: Any) -> dict[str, float]:
        sums, weight = {}, 0.0
        for batch in StepBatches(self.config, split="eval", num_batches=self.config.data.eval_batches):
            values = jax.device_get(self.run.eval_fn(params, sharding.global_batch(batch, self.run.mesh,
                                                                                    leading_axes=1)))
            tokens = float(values.pop("tokens"))
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + float(value) * tokens
            weight += tokens
        return {f"eval/{name}": total / max(weight, 1.0) for name, total in sums.items()}


def unigram_entropy(config: RunConfig, num_batches: int) -> float:
    """Entropy (nats) of the training targets' unigram distribution over the first `num_batches` microbatches,
    the loss of the best context-free predictor: a trained model should beat it clearly."""
    counts = np.zeros(config.model.vocab_size, np.int64)
    batches = StepBatches(config)
    for _ in range(num_batches):
        batch = next(batches)
        np.add.at(counts, batch["targets"][batch["loss_mask"] > 0], 1)
    return metrics_lib.unigram_entropy(counts)
