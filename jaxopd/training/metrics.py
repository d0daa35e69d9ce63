"""Run metrics: metrics.jsonl (one JSON object per logged step), TensorBoard events, a tqdm progress bar, and the
small statistics the trainer logs (MoE load balance, unigram entropy, MFU)."""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any, Optional

import numpy as np
import tqdm

# Dense bf16 peak FLOP/s per chip by jax `device_kind` (vendor data sheets). MFU is logged only for these.
PEAK_FLOPS_PER_DEVICE = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def peak_flops(device_kind: str) -> Optional[float]:
    """Peak FLOP/s of one device, None when unknown (CPU, unlisted accelerators)."""
    if device_kind in PEAK_FLOPS_PER_DEVICE:
        return PEAK_FLOPS_PER_DEVICE[device_kind]
    matches = [kind for kind in PEAK_FLOPS_PER_DEVICE if device_kind.startswith(kind)]
    return PEAK_FLOPS_PER_DEVICE[max(matches, key=len)] if matches else None


def moe_load_stats(moe_load: np.ndarray) -> dict[str, float]:
    """Balance of expert loads `[num_moe_layers, num_experts]` (fraction of routed slots; rows sum to 1).

    Ratios are relative to a perfectly uniform load 1/num_experts: max_load_ratio is the busiest expert over all
    layers (1.0 = balanced), min_load_ratio the idlest, load_cv the mean over layers of the coefficient of variation.
    """
    load = np.asarray(moe_load, np.float64)
    if load.size == 0:
        return {}
    ratio = load * load.shape[-1] / np.maximum(load.sum(-1, keepdims=True), 1e-12)
    return {"moe/max_load_ratio": float(ratio.max()), "moe/min_load_ratio": float(ratio.min()),
            "moe/load_cv": float(np.mean(ratio.std(-1)))}


def unigram_entropy(token_counts: np.ndarray) -> float:
    """Entropy in nats of the empirical unigram distribution (the loss of the best context-free predictor)."""
    counts = np.asarray(token_counts, np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class MetricsWriter:
    """Appends metric dicts to workdir/metrics.jsonl and TensorBoard events (workdir/tensorboard/); only the writing
    process (process 0) writes.

    Both files are written and flushed in the calling thread, so a failed write (a full disk, a read-only or vanished
    directory) raises OSError from `write` at once. (tensorboardX's SummaryWriter writes from a thread of its own
    that dies on such an error, after which `add_scalar` blocks forever on its full queue.)
    """

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = self._events = None
        self._failed = False
        if enabled:
            workdir = pathlib.Path(workdir)
            workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(workdir / "metrics.jsonl", "a")
            if tensorboard:
                from tensorboardX.event_file_writer import EventsWriter
                (workdir / "tensorboard").mkdir(exist_ok=True)
                self._events = EventsWriter(str(workdir / "tensorboard" / "events"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        values = {name: _plain(value) for name, value in metrics.items()}
        try:
            self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self._jsonl.flush()
            if self._events is not None:
                from tensorboardX.proto import event_pb2, summary_pb2
                scalars = [summary_pb2.Summary.Value(tag=name, simple_value=value) for name, value in values.items()
                           if isinstance(value, (int, float)) and math.isfinite(value)]
                self._events.write_event(event_pb2.Event(wall_time=time.time(), step=step,
                                                         summary=summary_pb2.Summary(value=scalars)))
                self._events.flush()
        except OSError:
            self._failed = True
            raise

    def close(self) -> None:
        """Closes the files; after a failed write, without raising again (the buffered bytes cannot be written)."""
        for file in (self._jsonl, self._events):
            if file is not None:
                try:
                    file.close()
                except OSError:
                    if not self._failed:
                        raise


class ProgressBar:
    """tqdm bar over the run's steps with the objective's headline figure, tokens/s and the latest eval results;
    tqdm supplies the ETA."""

    def __init__(self, total: int, initial: int, *, headline: str, enabled: bool = True):
        self._bar = tqdm.tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
        self._headline = headline
        self._figures: dict[str, str] = {}

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        self._bar.update(step - self._bar.n)
        if self._headline in metrics:
            self._figures[self._headline] = f"{metrics[self._headline]:.4f}"
        self._figures["tok_s"] = f"{metrics['tokens_per_second']:.0f}"
        self._bar.set_postfix(self._figures, refresh=False)

    def show_eval(self, metrics: dict[str, Any]) -> None:
        self._figures.update({name: f"{value:.4f}" for name, value in metrics.items()})
        self._bar.set_postfix(self._figures)

    def close(self) -> None:
        self._bar.close()


def _plain(value: Any) -> Any:
    """JSON-able Python scalars from numpy/jax scalars (NaN and Inf kept; json writes them as NaN/Infinity)."""
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "item"):
        value = np.asarray(value)
        return value.item() if value.size == 1 else value.tolist()
    return value
