"""Params + optimizer-state bytes of a LoRA run against a full run of the same model, from shapes alone.

The train state is built with `jax.eval_shape` (`jaxopd.training.state.abstract_state`), so a real-size model costs
no memory. "full" trains every param (AdamW's two float32 moments each); "lora" trains the adapters alone, the
optimizer state holding only theirs. Totals are for the whole model, before sharding (divide by the fsdp size).

Run: PYTHONPATH=. python -m benchmarks.lora_memory [--presets tiny,qwen3_8b,deepseek_v3 --rank 32]
Prints one Markdown table row per preset.
"""

import argparse
import math

import flax.linen as nn
import jax
import numpy as np

from jaxopd.model import Transformer, load_preset, lora
from jaxopd.training.config import OptimizerConfig
from jaxopd.training.optimizer import make_optimizer
from jaxopd.training.state import abstract_state


def _bytes(tree) -> int:
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def state_bytes(config) -> dict[str, int]:
    """{params, adapters, optimizer} bytes of the train state of `config` (shapes only)."""
    state = nn.unbox(abstract_state(Transformer(config), make_optimizer(OptimizerConfig()), np.zeros((1, 8), np.int32)))
    return {"params": _bytes(state["params"]), "adapters": _bytes(lora.split(state["params"])[0]),
            "optimizer": _bytes(state["opt_state"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,qwen3_8b,deepseek_v3")
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    gib = 2.0**30
    print("| preset | param dtype | full params GiB | full optimizer GiB | LoRA adapters GiB (% of params) | "
          "LoRA optimizer GiB | params + optimizer, full / LoRA GiB | optimizer ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.presets.split(","):
        config = load_preset(name)
        full, adapted = state_bytes(config), state_bytes(config.replace(lora_rank=args.rank))
        print(f"| {name} | {config.param_dtype} | {full['params'] / gib:.3f} | {full['optimizer'] / gib:.3f} | "
              f"{adapted['adapters'] / gib:.4f} ({100 * adapted['adapters'] / full['params']:.2f}%) | "
              f"{adapted['optimizer'] / gib:.4f} | {(full['params'] + full['optimizer']) / gib:.2f} / "
              f"{(adapted['params'] + adapted['optimizer']) / gib:.2f} | "
              f"{full['optimizer'] / adapted['optimizer']:.0f}x |")


if __name__ == "__main__":
    main()
