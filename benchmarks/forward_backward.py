"""Forward+backward throughput of one model in jaxopd (jit) and in transformers (PyTorch eager), same weights, batch
and float32 dtype, on CPU. The transformers model is jaxopd's own parameters written by `save_hf` and read back with
`from_pretrained`, so the two compute the same function (the script checks the losses agree).

    PYTHONPATH=. python benchmarks/forward_backward.py [--batch 4 --seq 128 --steps 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import jaxopd
from jaxopd.model import Transformer
from models.tiny import get_config


def time_steps(step, steps: int) -> float:
    """Seconds per call of `step`, after one warm-up call (compilation for jax)."""
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    config = get_config().replace(dtype="float32", param_dtype="float32", mtp_depth=0)
    model = Transformer(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    params = model.init(jax.random.key(0), jnp.asarray(inputs[:1, :8]))["params"]

    def loss_fn(params, inputs, targets):
        logits = model.apply({"params": params}, inputs)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logprobs, targets[..., None], axis=-1).mean()

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    jax_inputs, jax_targets = jnp.asarray(inputs), jnp.asarray(targets)

    def jax_step():
        loss, grads = grad_fn(params, jax_inputs, jax_targets)
        jax.block_until_ready(grads)
        return loss

    with tempfile.TemporaryDirectory() as directory:
        jaxopd.save_hf(model, params, directory)
        torch_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    torch_model.train()
    torch_inputs, torch_targets = torch.from_numpy(inputs).long(), torch.from_numpy(targets).long()

    def torch_step():
        torch_model.zero_grad(set_to_none=True)
        logits = torch_model(input_ids=torch_inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch_targets.flatten())
        loss.backward()
        return loss.detach()

    jax_loss, torch_loss = float(jax_step()), float(torch_step())
    if abs(jax_loss - torch_loss) > 1e-3 * max(1.0, abs(torch_loss)):
        raise RuntimeError(f"the two models disagree: loss {jax_loss} (jaxopd) vs {torch_loss} (transformers)")
    tokens_per_step = args.batch * args.seq
    jax_seconds, torch_seconds = time_steps(jax_step, args.steps), time_steps(torch_step, args.steps)
    print(f"model: {type(torch_model).__name__} from models/tiny.py, {sum(p.numel() for p in torch_model.parameters())}"
          f" parameters; batch {args.batch} x seq {args.seq}, float32, CPU ({jax.device_count()} jax devices, "
          f"{torch.get_num_threads()} torch threads); loss {jax_loss:.4f} (jaxopd) vs {torch_loss:.4f} (transformers)")
    print("| implementation | s / step | tokens / s |")
    print("|---|---|---|")
    print(f"| jaxopd (jax.jit) | {jax_seconds:.4f} | {tokens_per_step / jax_seconds:,.0f} |")
    print(f"| transformers {transformers.__version__} (PyTorch {torch.__version__} eager) | {torch_seconds:.4f} | "
          f"{tokens_per_step / torch_seconds:,.0f} |")
    print(f"jaxopd / transformers throughput ratio: {torch_seconds / jax_seconds:.2f}x")


if __name__ == "__main__":
    main()
