"""Forward+backward tokens/s of jaxopd (jit) against transformers (PyTorch eager) on CPU, float32, on the two model
shapes of `benchmarks/generation.py` (DeepSeek-V3: MLA + 16 routed experts top-2 + a shared one; Qwen3: GQA, dense).
Each transformers model gets random weights, is written by `save_pretrained` and read by `jaxopd.load_hf`, so both
sides compute the same function (the script checks the losses agree). In one process the two sides alternate, step by
step, so a change in the machine's load hits both; the table gives medians. For MoE, jaxopd runs once per grouped
matmul (`ModelConfig.grouped_matmul`: "tiled", the CPU default, and "ragged_dot").

    PYTHONPATH=. python benchmarks/forward_backward.py [--batch 8 --seq 512 --repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import jaxopd
from benchmarks.generation import VOCAB, deepseek_v3, qwen3
from jaxopd.model import Transformer


def jax_step_fn(model, params, inputs, targets):
    def loss_fn(params):
        logits = model.apply({"params": params}, inputs)
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logprobs, targets[..., None], axis=-1).mean()

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    return lambda: float(jax.block_until_ready(grad_fn(params))[0])


def torch_step_fn(model, inputs, targets):
    def step():
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(input_ids=inputs).logits.flatten(0, 1), targets.flatten())
        loss.backward()
        return float(loss.detach())
    return step


def seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def run(name, make, batch, seq, repeats) -> None:
    torch.manual_seed(0)
    reference = make()
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        with warnings.catch_warnings():  # transformers' DeepSeek-V3 config names an MTP layer it never stores
            warnings.simplefilter("ignore", UserWarning)
            model, params = jaxopd.load_hf(directory, dtype="float32")
    reference.train()
    tokens = np.random.default_rng(0).integers(0, VOCAB, (batch, seq + 1)).astype(np.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    kernels = ("tiled", "ragged_dot") if model.config.num_experts else (model.config.grouped_matmul_kernel,)
    steps = {f"jaxopd ({kernel})" if model.config.num_experts else "jaxopd": jax_step_fn(
        Transformer(model.config.replace(grouped_matmul=kernel)), params, jnp.asarray(inputs), jnp.asarray(targets))
        for kernel in kernels}
    steps["transformers"] = torch_step_fn(reference, torch.from_numpy(inputs).long(), torch.from_numpy(targets).long())
    losses = {label: step() for label, step in steps.items()}  # compiles, warms up, and checks agreement
    if max(losses.values()) - min(losses.values()) > 1e-3 * max(1.0, abs(losses["transformers"])):
        raise RuntimeError(f"{name}: the models disagree: losses {losses}")
    times = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            times[label].append(seconds(step))
    millions = sum(p.numel() for p in reference.parameters()) / 1e6
    torch_median = float(np.median(times["transformers"]))
    print(f"\n{name}: {millions:.1f}M parameters, batch {batch} x seq {seq}, float32, "
          f"loss {losses['transformers']:.4f}")
    print("| implementation | s / step (median) | tokens / s | vs transformers |")
    print("|---|---|---|---|")
    for label, runs in times.items():
        median = float(np.median(runs))
        print(f"| {label} | {median:.3f} | {batch * seq / median:,.0f} | {torch_median / median:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="deepseek_v3,qwen3")
    args = parser.parse_args()
    print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices), PyTorch {torch.__version__}"
          f" ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    makers = {"deepseek_v3": deepseek_v3, "qwen3": qwen3}
    for name in args.models.split(","):
        run(name, makers[name], args.batch, args.seq, args.repeats)


if __name__ == "__main__":
    main()
